// The VMM process is started once per VM and its start-up is on the boot path: link it as
// a position-dependent executable, so that the dynamic loader has no relocations to apply
// (and no relocated pages to dirty) before `main`. The code itself stays PIC, which links
// fine into a non-PIE executable.
fn main() {
    println!("cargo:rustc-link-arg-bin=novacron-vmm=-no-pie");
}
