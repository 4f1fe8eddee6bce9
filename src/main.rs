//! `novacron`: the command line of NovaCron.

mod cli;
mod demo;
mod migrate;
mod remote;

fn main() {
    std::process::exit(cli::main());
}
