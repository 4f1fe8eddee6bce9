//! `novacron`: the command line of NovaCron.

mod cli;
mod demo;

fn main() {
    std::process::exit(cli::main());
}
