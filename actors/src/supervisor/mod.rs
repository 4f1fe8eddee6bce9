//! Supervision building blocks shared by the actors: restart policies and their decisions.

pub mod policy;
