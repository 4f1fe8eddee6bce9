//! For tests (and benches): the `novacron-vmm` binary of this build, built when it is
//! missing or stale. It lives here because every crate's tests that run real VMs need it
//! and this crate is already their dev-dependency.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The `novacron-vmm` binary: `$NOVACRON_VMM` if set, else the one of this build profile
/// (`target/<profile>/novacron-vmm`, which `cargo test --workspace` builds). When it is
/// missing, or older than a source file of the crates it is made of, it is built once per
/// test binary with `cargo build -p novacron-vmm --bin novacron-vmm`. (A package's tests
/// only get `CARGO_BIN_EXE_*` for their own binaries, hence this. Building it every time
/// would not be free: `-p novacron-vmm` unifies features differently from a workspace
/// build, so its dependencies would be compiled a second time.)
pub fn vmm_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            if let Some(path) = std::env::var_os("NOVACRON_VMM") {
                return PathBuf::from(path);
            }
            // target/<profile>/deps/<test>-<hash> -> target/<profile>
            let exe = std::env::current_exe().unwrap();
            let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_owned();
            let binary = profile_dir.join("novacron-vmm");
            if is_fresh(&binary) {
                return binary;
            }
            let mut cmd = Command::new(env!("CARGO"));
            cmd.args(["build", "-p", "novacron-vmm", "--bin", "novacron-vmm"]);
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            let out = cmd.output().unwrap();
            assert!(out.status.success(), "building novacron-vmm failed:\n{}", String::from_utf8_lossy(&out.stderr));
            assert!(binary.is_file(), "{} is missing after the build", binary.display());
            binary
        })
        .clone()
}

/// True when `binary` exists and is newer than every source of the VMM.
fn is_fresh(binary: &Path) -> bool {
    let Ok(built) = std::fs::metadata(binary).and_then(|m| m.modified()) else { return false };
    // This crate is guest/image: the workspace is two levels up.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).unwrap();
    let sources = ["vmm", "devices", "migration", "guest/image", "guest/kernel/src", "Cargo.lock"];
    !sources.iter().any(|s| newer_than(&root.join(s), built))
}

fn newer_than(path: &Path, time: std::time::SystemTime) -> bool {
    let Ok(meta) = std::fs::symlink_metadata(path) else { return false };
    if meta.is_dir() {
        let skip = path.file_name().is_some_and(|n| n == "target" || n == "tests" || n == "benches");
        !skip
            && std::fs::read_dir(path)
                .map(|entries| entries.flatten().any(|e| newer_than(&e.path(), time)))
                .unwrap_or(false)
    } else {
        meta.modified().is_ok_and(|m| m > time)
    }
}

/// `novacron-vmm` processes whose command line names `dir` (e.g. a test's runtime
/// directory, where their control sockets are).
pub fn vmm_pids_under(dir: &Path) -> Vec<u32> {
    pids_under(dir, |program, _| program.ends_with("novacron-vmm"))
}

/// Host keepers (`novacron keeper`) whose command line names `dir` (a daemon's data dir).
pub fn keeper_pids_under(dir: &Path) -> Vec<u32> {
    pids_under(dir, |program, first| program.ends_with("novacron") && first == Some("keeper"))
}

/// Processes whose command line names `dir` and whose program (and first argument)
/// `wanted` accepts.
fn pids_under(dir: &Path, wanted: impl Fn(&str, Option<&str>) -> bool) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            // The program itself, not e.g. a daemon given --vmm-binary .../novacron-vmm.
            let mut words = cmdline.split('\0');
            let program = words.next().unwrap_or_default();
            wanted(program, words.next()) && cmdline.contains(&needle)
        })
        .collect()
}

/// SIGKILLs every `novacron-vmm` process and keeper whose command line names `dir` (a
/// test's or a demo's directory), so that nothing it started outlives it.
pub fn kill_vmms_under(dir: &Path) {
    for pid in vmm_pids_under(dir).into_iter().chain(keeper_pids_under(dir)) {
        // SAFETY: kill has no memory effects; the pid runs a VMM whose command line names
        // this caller's own directory.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}
