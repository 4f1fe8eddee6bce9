//! Builds `guest/kernel` with the same cargo, in its own workspace and target directory, so
//! that its `panic = "abort"` profile and freestanding flags never touch this workspace.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    // NOVACRON_TEST_GUEST_SRC builds the guest from another checkout of guest/kernel (to
    // keep working on the VMM while the guest's tree is mid-change).
    println!("cargo:rerun-if-env-changed=NOVACRON_TEST_GUEST_SRC");
    let kernel_dir =
        env::var_os("NOVACRON_TEST_GUEST_SRC").map(PathBuf::from).unwrap_or_else(|| manifest_dir.join("../kernel"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for path in ["src", "link.ld", "build.rs", "Cargo.toml", "Cargo.lock", ".cargo/config.toml"] {
        println!("cargo:rerun-if-changed={}", kernel_dir.join(path).display());
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = out_dir.join("guest-target");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&kernel_dir).args(["build", "--release", "--offline", "--quiet", "--target-dir"]).arg(&target_dir);
    // The outer build's flags (sanitizers under cargo fuzz, coverage, clippy's wrapper) are
    // for this workspace only.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        let outer_only = key.starts_with("CARGO_PROFILE_")
            || key.starts_with("CARGO_TARGET_")
            || key.starts_with("CARGO_BUILD_")
            || matches!(
                key.as_str(),
                "RUSTFLAGS"
                    | "CARGO_ENCODED_RUSTFLAGS"
                    | "RUSTDOCFLAGS"
                    | "CARGO_ENCODED_RUSTDOCFLAGS"
                    | "RUSTC_WORKSPACE_WRAPPER"
                    | "RUSTC_WRAPPER"
                    | "CARGO_LLVM_COV"
                    | "LLVM_PROFILE_FILE"
            );
        if outer_only {
            cmd.env_remove(&key);
        }
    }
    let output = cmd.output().expect("could not run cargo to build the test guest");
    if !output.status.success() {
        panic!(
            "building the test guest (guest/kernel) failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let elf = target_dir.join("x86_64-unknown-linux-gnu/release/novacron-test-guest");
    std::fs::copy(&elf, out_dir.join("test-guest.elf")).expect("the test guest build produced no ELF");
}
