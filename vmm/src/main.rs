//! `novacron-vmm`: the VMM process on its own (`novacron vm run` runs the same code).

/// Run one KVM virtual machine.
#[derive(clap::Parser)]
#[command(name = "novacron-vmm", version)]
struct Cli {
    #[command(flatten)]
    vm: novacron_vmm::config::VmArgs,
}

fn main() {
    novacron_vmm::process::init_logging();
    let code = match novacron_vmm::process::parse_args::<Cli>() {
        Ok(cli) => novacron_vmm::process::run_vm(&cli.vm),
        Err(code) => code,
    };
    std::process::exit(code);
}
