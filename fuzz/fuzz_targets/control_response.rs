//! A response line from a VMM's control socket, as the daemon reads it: parsing must
//! answer with an error, never panic (the VMM is not trusted).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(line) = std::str::from_utf8(data) {
        let _ = novacron_vmm::api::client::parse_response(line);
    }
});
