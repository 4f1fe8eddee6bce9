//! What the embedded store's etcd-compatible service takes from another daemon (a
//! transaction, as protobuf bytes) and what the cluster reads back from the store (a VM
//! record, JSON): decoding and checking must give a value or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use novacron_store::etcd::pb;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(txn) = pb::TxnRequest::decode(data) {
        let _ = novacron_store::serve::txn_from_pb(txn);
    }
    let kv = novacron_store::KeyValue {
        key: "/novacron/vms/x".into(),
        value: data.to_vec(),
        create_revision: 1,
        mod_revision: 1,
        version: 1,
        lease: 0,
    };
    let _ = novacron_cluster::records::decode::<novacron_cluster::records::VmRecord>(&kv);
});
