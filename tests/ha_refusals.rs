//! The cluster store as an operator gets it wrong (issue 11, "Bad input and failures"): a
//! wrong or unreachable etcd URL, an etcd cluster without quorum, a certificate etcd
//! refuses, a second daemon with a host name in use, a host joining with another cluster
//! CA. Each is refused with one line that says what to fix, and changes nothing. Real etcd
//! (Debian's 3.4, three members, TLS) and real daemons; no guest runs here.

mod common;

use common::daemon::{Daemon, refusal_line, str_of};
use common::stderr;
use novacron_daemon::pb;
use novacron_store::testing::EtcdCluster;
use std::time::Duration;

fn wait_ready(etcd: &EtcdCluster) {
    common::block_on(etcd.wait_ready(Duration::from_secs(30))).unwrap();
}

/// Every key under /novacron/ with its value, as etcdctl would list them.
fn store_contents(etcd: &EtcdCluster) -> Vec<(String, Vec<u8>)> {
    common::block_on(async {
        use novacron_store::Store;
        let store = novacron_store::etcd::EtcdStore::connect(&etcd.config()).await.unwrap();
        let listing = store.list("/novacron/").await.unwrap();
        listing.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect()
    })
}

/// The host records and leases only (the leader's record changes as tenures go on).
fn hosts_and_leases(etcd: &EtcdCluster) -> Vec<(String, Vec<u8>)> {
    store_contents(etcd).into_iter().filter(|(k, _)| k.contains("/hosts/") || k.contains("/alive/")).collect()
}

fn refused(d: &mut Daemon) -> String {
    let (code, err) = d.start_refused();
    assert_eq!(code, Some(1), "{err}");
    assert!(d.keeper_pids().is_empty(), "a refused daemon starts no keeper: {err}");
    refusal_line(&err)
}

#[test]
fn etcd_urls_that_are_malformed_or_unreachable_are_refused_in_one_line() {
    let ca = tempfile::tempdir().unwrap();
    novacron_migration::tls::init(ca.path(), "etcd").unwrap();
    for (url, says) in [
        ("etcd.example:2379", "not a URL"),
        ("https://127.0.0.1:1", "cannot reach the cluster store at https://127.0.0.1:1"),
    ] {
        let mut d = Daemon::for_etcd("h1", ca.path(), &[url.to_string()], &[]);
        let line = refused(&mut d);
        assert!(line.contains(url) && line.contains(says) && line.contains("--etcd"), "{url}: {line}");
    }
}

#[test]
fn without_quorum_calls_fail_fast_with_unavailable_a_new_daemon_is_refused_and_nothing_changes() {
    let Some((mut etcd, ca)) = common::etcd_with_ca(None) else { return };
    let h1 = Daemon::on_etcd("h1", ca.path(), &etcd.endpoints(), &[]);
    h1.json(&["vm", "create", "before", "--mem", "32", "--no-start"]);
    let before = store_contents(&etcd);

    etcd.kill_member(1);
    etcd.kill_member(2);
    let out = h1.cli(&["vm", "create", "web", "--mem", "32", "--no-start"]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("no quorum") && err.contains("may still take effect"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let code = h1.grpc(async |mut c| {
        let spec = pb::VmSpec { name: "web".into(), vcpus: 1, mem_mib: 32, ..Default::default() };
        c.create_vm(pb::CreateVmRequest { spec: Some(spec), start: Some(false) }).await.unwrap_err().code()
    });
    assert_eq!(code, tonic::Code::Unavailable);
    let mut h2 = Daemon::for_etcd("h2", ca.path(), &etcd.endpoints(), &[]);
    let line = refused(&mut h2);
    assert!(line.contains("quorum"), "{line}");

    etcd.start_member(1).unwrap();
    etcd.start_member(2).unwrap();
    wait_ready(&etcd);
    // A write the store did not confirm may still be committed now (etcd's leader had taken
    // it): never half of it. The record and the VM are both there, or neither.
    let vms = |contents: Vec<(String, Vec<u8>)>| -> Vec<String> {
        contents.into_iter().map(|(k, _)| k).filter(|k| k.contains("/vms/")).collect()
    };
    let recorded = vms(store_contents(&etcd));
    let vms_before = vms(before);
    if recorded == vms_before {
        assert_eq!(h1.vm_names(), ["before"], "the refused create left nothing");
        h1.json(&["vm", "create", "web", "--mem", "32", "--no-start"]);
    } else {
        assert_eq!(recorded, ["/novacron/vms/before", "/novacron/vms/web"]);
        h1.wait_vm("web", "was made from its record", |v| str_of(v, "phase") == "stopped");
        let again = h1.cli(&["vm", "create", "web", "--mem", "32", "--no-start"]);
        assert!(stderr(&again).contains("already exists"), "{}", stderr(&again));
    }
    assert_eq!(h1.vm_names(), ["before", "web"]);
}

#[test]
fn a_certificate_of_another_ca_is_refused_by_etcd_and_by_a_cluster_it_tries_to_join() {
    let Some((etcd, _ca)) = common::etcd_with_ca(None) else { return };
    let other = tempfile::tempdir().unwrap();
    novacron_migration::tls::init(other.path(), "other").unwrap();
    let mut d = Daemon::for_etcd("h1", other.path(), &etcd.endpoints(), &[]);
    let line = refused(&mut d);
    assert!(
        line.contains("do not trust each other's certificates") && line.contains(&d.tls_dir().display().to_string()),
        "{line}"
    );
    assert!(hosts_and_leases(&etcd).is_empty(), "nothing written");

    // On the embedded store: a host with a certificate of another CA joins the first daemon.
    let primary = Daemon::start("p1");
    let mut joining = Daemon::new("p2", &[]);
    let tls = joining.tls_dir();
    common::issue_cert("p2", other.path(), &tls);
    joining.extra.extend(["--tls-dir".into(), tls.display().to_string(), "--join".into(), primary.addr.clone()]);
    let line = refused(&mut joining);
    assert!(line.contains("do not trust each other's certificates") && line.contains(&primary.addr), "{line}");
    let hosts = primary.json(&["host", "list"]);
    assert_eq!(hosts.as_array().map(Vec::len), Some(1), "{hosts}");
}

#[test]
fn a_host_name_in_use_is_refused_and_the_host_that_holds_it_is_untouched() {
    let Some((etcd, ca)) = common::etcd_with_ca(None) else { return };
    let h1 = Daemon::on_etcd("h1", ca.path(), &etcd.endpoints(), &[]);
    let held = hosts_and_leases(&etcd);
    let mut again = Daemon::for_etcd("h1", ca.path(), &etcd.endpoints(), &[]);
    let line = refused(&mut again);
    assert!(line.contains("host name h1 is in use") && line.contains("--name"), "{line}");
    assert_eq!(hosts_and_leases(&etcd), held, "the first h1's record and lease are as they were");
    let hosts = h1.json(&["host", "list"]);
    let first = &hosts.as_array().unwrap()[0];
    assert_eq!((str_of(first, "address"), str_of(first, "state")), (h1.addr.as_str(), "up"));
}
