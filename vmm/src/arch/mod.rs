//! Architecture support. Only x86-64 is built today.

pub mod x86_64;
