//! A request to the daemon's control port, as prost decodes it and the daemon checks it:
//! the first byte picks the message, the rest is its protobuf encoding. Decoding and
//! checking must answer with an error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use novacron_daemon::{convert, pb};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else { return };
    match kind % 3 {
        0 => {
            if let Ok(r) = pb::CreateVmRequest::decode(bytes) {
                let _ = convert::spec_from_pb(r.spec);
            }
        }
        1 => {
            if let Ok(r) = pb::SetLimitRequest::decode(bytes) {
                let _ = convert::limit_request(&r);
            }
        }
        _ => {
            if let Ok(r) = pb::MigrateVmRequest::decode(bytes) {
                let _ = convert::name(&r.name);
                let _ = convert::name(&r.to_host);
            }
        }
    }
});
