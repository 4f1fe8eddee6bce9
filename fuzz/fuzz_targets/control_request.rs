//! A line on the VMM's control socket: parsing must answer with an error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = novacron_vmm::api::parse_request(data);
});
