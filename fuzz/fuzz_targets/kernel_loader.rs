//! Any file given as --kernel: ELF32/ELF64/PVH/bzImage detection and loading must return
//! an error for malformed images, never panic or write outside guest memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use novacron_vmm::boot::load_kernel;
use novacron_vmm::vstate::memory::{self, GuestMemory};
use std::sync::OnceLock;

/// 32 MiB of guest memory, reused across inputs (what earlier inputs wrote does not matter).
fn guest_memory() -> &'static GuestMemory {
    static MEM: OnceLock<GuestMemory> = OnceLock::new();
    MEM.get_or_init(|| memory::create(32 << 20).expect("map 32 MiB of guest memory"))
}

fuzz_target!(|data: &[u8]| {
    let _ = load_kernel(guest_memory(), data);
});
