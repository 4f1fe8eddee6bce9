//! `novacron-vmm`: the VMM process on its own (`novacron vm run` runs the same code).

use clap::Parser;

/// Run one KVM virtual machine.
#[derive(Parser)]
#[command(name = "novacron-vmm", version)]
struct Cli {
    #[command(flatten)]
    vm: novacron_vmm::config::VmArgs,
}

fn main() {
    novacron_vmm::process::init_logging();
    let cli = Cli::parse();
    std::process::exit(novacron_vmm::process::run_vm(&cli.vm));
}
