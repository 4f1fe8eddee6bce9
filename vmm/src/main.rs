//! `novacron-vmm`: the VMM process on its own (`novacron vmm run` runs the same code).

/// Run one KVM virtual machine.
#[derive(clap::Parser)]
#[command(name = "novacron-vmm", version)]
struct Cli {
    #[command(flatten)]
    vm: novacron_vmm::config::VmArgs,
    /// Continue the VM of this snapshot directory instead of booting (the VM's shape and
    /// devices come from the snapshot; --api-sock and --serial-file apply).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "cmdline", "disks", "nets", "rng"])]
    restore_from: Option<std::path::PathBuf>,
    /// With --restore-from: how the snapshot's memory comes in (as `vmm restore --memory`).
    #[arg(long, value_enum, value_name = "HOW", requires = "restore_from", default_value_t = novacron_vmm::process::RestoreMemory::Auto)]
    restore_memory: novacron_vmm::process::RestoreMemory,
    /// Receive the VM from a live migration on ADDR (QUIC) instead of booting; the VM's
    /// shape comes from the source; --api-sock and --serial-file apply.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["kernel", "initrd", "cmdline", "disks", "nets", "rng", "restore_from"])]
    receive_on: Option<String>,
    /// With --receive-on: the TLS directory (ca.pem, node.pem, node.key).
    #[arg(long, value_name = "DIR", requires = "receive_on")]
    tls_dir: Option<std::path::PathBuf>,
    /// With --receive-on: a snapshot of an earlier state of this VM (pages it holds are not sent).
    #[arg(long, value_name = "DIR", requires = "receive_on")]
    base: Option<std::path::PathBuf>,
    /// With --receive-on and --require-permit: the keeper that claims the VM at the commit.
    #[arg(long, value_name = "PATH", requires_all = ["receive_on", "require_permit"])]
    claim_from: Option<std::path::PathBuf>,
}

fn main() {
    novacron_vmm::process::init_logging();
    let code = match novacron_vmm::process::parse_args::<Cli>() {
        Ok(Cli { vm, receive_on: Some(listen), tls_dir, base, claim_from, .. }) => {
            let args = novacron_vmm::migrate::destination::ReceiveArgs {
                listen,
                api_sock: vm.api_sock,
                tls_dir,
                base,
                serial_file: vm.serial_file,
                require_permit: vm.require_permit,
                claim_from,
                resume_window: novacron_migration::destination::RESUME_WINDOW.as_secs(),
                workers: None,
            };
            novacron_vmm::migrate::destination::receive_vm(&args)
        }
        Ok(Cli { vm, restore_from: Some(from), restore_memory, .. }) => {
            let args = novacron_vmm::process::RestoreArgs {
                from,
                api_sock: vm.api_sock,
                serial_file: vm.serial_file,
                require_permit: vm.require_permit,
                memory: restore_memory,
            };
            novacron_vmm::process::restore_vm(&args)
        }
        Ok(cli) => novacron_vmm::process::run_vm(&cli.vm),
        Err(code) => code,
    };
    std::process::exit(code);
}
