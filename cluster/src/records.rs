//! The cluster's keys in the store and what they hold (`docs/ha.md`, "Keys"). Values are
//! JSON, so that `etcdctl get --prefix /novacron/` shows them as they are.

use novacron_store::{KeyValue, StoreError};
use serde::{Deserialize, Serialize};

pub const PREFIX: &str = "/novacron/";
pub const VMS: &str = "/novacron/vms/";
pub const ALIVE: &str = "/novacron/alive/";
pub const HOSTS: &str = "/novacron/hosts/";
pub const LEADER: &str = "/novacron/leader";

pub fn vm_key(name: &str) -> String {
    format!("{VMS}{name}")
}

pub fn alive_key(host: &str) -> String {
    format!("{ALIVE}{host}")
}

pub fn host_key(host: &str) -> String {
    format!("{HOSTS}{host}")
}

/// The last part of a key under `prefix`.
pub fn name_of<'a>(key: &'a str, prefix: &str) -> Option<&'a str> {
    key.strip_prefix(prefix).filter(|n| !n.is_empty() && !n.contains('/'))
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("the cluster record {key} is not valid JSON of its kind")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot encode the cluster record {key}")]
    Encode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub fn decode<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Result<T, RecordError> {
    serde_json::from_slice(&kv.value).map_err(|source| RecordError::Decode { key: kv.key.clone(), source })
}

pub fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, RecordError> {
    serde_json::to_vec(value).map_err(|source| RecordError::Encode { key: key.to_string(), source })
}

/// A VM's ownership, with the rest of its record (spec, desired state), which only the
/// daemons read, kept as it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The only host that may run the VM.
    pub owner: String,
    /// Raised by every change of owner; a VMM runs only under a permit of this epoch.
    pub epoch: u64,
    /// A live migration in flight to this host: its keeper may claim the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving_to: Option<String>,
    #[serde(flatten)]
    pub rest: serde_json::Map<String, serde_json::Value>,
}

/// `hosts/HOST`: a member of the cluster, written by its daemon when it starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub name: String,
    /// Its control port.
    pub address: String,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Taken out of placement (`host cordon`): no new VM goes there.
    #[serde(default)]
    pub cordoned: bool,
}

/// `alive/HOST`: kept under the host's lease by its keeper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliveRecord {
    /// Which machine and data dir the keeper runs for: another one with the same host name
    /// is refused.
    pub identity: String,
    pub pid: u32,
    pub lease: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_vm_record_keeps_fields_it_does_not_know() {
        let json = br#"{"owner":"h1","epoch":4,"spec":{"name":"web","mem_mib":64},"desired":"running"}"#;
        let kv = KeyValue {
            key: vm_key("web"),
            value: json.to_vec(),
            create_revision: 1,
            mod_revision: 2,
            version: 1,
            lease: 0,
        };

        let mut record: VmRecord = decode(&kv).unwrap();
        record.owner = "h2".into();
        record.epoch += 1;
        let again: serde_json::Value = serde_json::from_slice(&encode(&kv.key, &record).unwrap()).unwrap();

        assert_eq!(again["owner"], "h2");
        assert_eq!(again["epoch"], 5);
        assert_eq!(again["spec"]["mem_mib"], 64);
        assert_eq!(again["desired"], "running");
        assert!(again.get("moving_to").is_none());
    }

    #[test]
    fn test_names_come_only_from_direct_children_of_a_prefix() {
        assert_eq!(name_of("/novacron/vms/web-1", VMS), Some("web-1"));
        assert_eq!(name_of("/novacron/vms/", VMS), None);
        assert_eq!(name_of("/novacron/vms/a/b", VMS), None);
        assert_eq!(name_of("/novacron/hosts/a", VMS), None);
    }
}
