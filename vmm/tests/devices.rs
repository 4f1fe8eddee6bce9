//! virtio devices against the test guest's drivers on real KVM: disks (the image file's
//! bytes are checked here), read-only disks, several disks, entropy, and two VMs on a
//! bridge in a network namespace exchanging checksummed frames.

mod common;

use common::{TIMEOUT, kvm_or_skip, vmm};
use novacron_guest_image::watch::Watched;
use std::process::Command;

/// The test guest's pattern for word `k` of sector `s` (docs/test-guest.md).
fn blk_word(s: u64, k: u64) -> u64 {
    s.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ k.wrapping_mul(0xc2b2_ae3d_27d4_eb4f) ^ 0xb10c
}

fn image(dir: &std::path::Path, name: &str, bytes: u64) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path).unwrap().set_len(bytes).unwrap();
    path
}

fn line_starting(vm: &mut Watched, prefix: &str) -> String {
    vm.wait_for(prefix, TIMEOUT, |l| l.text.starts_with(prefix)).unwrap().text
}

#[test]
fn kvm_virtio_blk_writes_reach_the_image_and_read_back() {
    if !kvm_or_skip("kvm_virtio_blk_writes_reach_the_image_and_read_back") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk0 = image(dir.path(), "disk0.img", 1 << 20);
    let disk1 = image(dir.path(), "disk1.img", 2 << 20);
    let ro = image(dir.path(), "ro.img", 1 << 20);
    std::fs::write(&ro, vec![0x5a; 1 << 20]).unwrap();
    let mut cmd = vmm();
    cmd.args(["--mem", "64", "--cmdline", "ws=2 hb=100 exit=3 blk=64"]);
    for spec in [
        format!("path={},id=first-disk", disk0.display()),
        format!("path={}", disk1.display()),
        format!("path={},ro", ro.display()),
    ] {
        cmd.arg("--disk").arg(spec);
    }
    let mut vm = Watched::spawn(cmd).unwrap();

    let first = line_starting(&mut vm, "BLK ");
    let second = line_starting(&mut vm, "BLK ");
    let third = line_starting(&mut vm, "BLK ");
    let (status, stderr) = vm.wait_exit(TIMEOUT).unwrap();

    assert_eq!(first, "BLK OK disk=0 sectors=64 capacity=2048 id=first-disk");
    assert_eq!(second, "BLK OK disk=1 sectors=64 capacity=4096 id=disk1.img");
    assert_eq!(third, "BLK RO OK disk=2 capacity=2048 id=ro.img write=refused");
    assert_eq!(status.code(), Some(0), "{stderr}");
    for path in [&disk0, &disk1] {
        let bytes = std::fs::read(path).unwrap();
        for s in 0..64u64 {
            for k in 0..64u64 {
                let at = (s * 512 + k * 8) as usize;
                let word = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
                assert_eq!(word, blk_word(s, k), "{} sector {s} word {k}", path.display());
            }
        }
        assert!(bytes[64 * 512..].iter().all(|&b| b == 0), "nothing written past sector 64");
    }
    assert!(std::fs::read(&ro).unwrap().iter().all(|&b| b == 0x5a), "the read-only image is unchanged");
}

#[test]
fn kvm_virtio_rng_gives_the_guest_entropy() {
    if !kvm_or_skip("kvm_virtio_rng_gives_the_guest_entropy") {
        return;
    }
    let mut cmd = vmm();
    cmd.args(["--mem", "64", "--rng", "--cmdline", "ws=2 hb=100 exit=2 rng=1024"]);
    let mut vm = Watched::spawn(cmd).unwrap();

    let line = line_starting(&mut vm, "RNG ");

    assert!(line.starts_with("RNG OK bytes=1024 distinct="), "{line}");
    let distinct: u32 = line.rsplit('=').next().unwrap().parse().unwrap();
    assert!(distinct > 200, "1024 random bytes take most byte values: {line}");
}

/// A network namespace with a bridge and two taps on it; removed on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Option<Self> {
        let script = "ip link set lo up && ip link add br0 type bridge && ip tuntap add dev tapa mode tap && \
                      ip tuntap add dev tapb mode tap && ip link set tapa master br0 && ip link set tapb master br0 && \
                      ip link set br0 up && ip link set tapa up && ip link set tapb up";
        Self::with("bridge", script)
    }

    /// A namespace of this test process named after `what`, set up by `script`.
    fn with(what: &str, script: &str) -> Option<Self> {
        let name = format!("nc-test-{}-{what}", std::process::id());
        let ok = |args: &[&str]| Command::new("ip").args(args).status().is_ok_and(|s| s.success());
        if !ok(&["netns", "add", &name]) {
            return None;
        }
        let ns = Netns { name };
        ok(&["netns", "exec", &ns.name, "sh", "-c", script]).then_some(ns)
    }

    /// Whether interface `name` exists in the namespace.
    fn has_link(&self, name: &str) -> bool {
        Command::new("ip").args(["-n", &self.name, "link", "show", name]).output().is_ok_and(|o| o.status.success())
    }

    fn vmm(&self) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, env!("CARGO_BIN_EXE_novacron-vmm")]);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

#[test]
fn kvm_virtio_net_two_vms_on_a_bridge_exchange_checksummed_frames() {
    if !kvm_or_skip("kvm_virtio_net_two_vms_on_a_bridge_exchange_checksummed_frames") {
        return;
    }
    let Some(ns) = Netns::new() else {
        assert!(std::env::var_os("NOVACRON_REQUIRE_KVM").is_none(), "network namespaces are required (root, iproute2)");
        eprintln!("\n*** SKIPPED: cannot create a network namespace with taps (needs root and iproute2) ***\n");
        return;
    };
    let mut echo = ns.vmm();
    echo.args(["--mem", "64", "--net", "tap=tapa,mac=52:54:00:00:00:0a", "--cmdline", "ws=2 hb=1000 net=echo"]);
    let mut echo = Watched::spawn(echo).unwrap();
    line_starting(&mut echo, "NET ECHO mac=52:54:00:00:00:0a");
    let mut sender = ns.vmm();
    sender.args(["--mem", "64", "--net", "tap=tapb,mac=52:54:00:00:00:0b", "--cmdline", "ws=2 hb=1000 net=send:40"]);
    let mut sender = Watched::spawn(sender).unwrap();

    let verdict = line_starting(&mut sender, "NET ");

    assert_eq!(verdict, "NET OK sent=40 echoed=40 mac=52:54:00:00:00:0b");
    let echoed = line_starting(&mut echo, "NET ECHOED");
    assert!(echoed.starts_with("NET ECHOED n="), "{echoed}");
}

#[test]
fn kvm_missing_disk_image_and_tap_names_are_refused_with_one_line() {
    if !kvm_or_skip("kvm_missing_disk_image_and_tap_names_are_refused_with_one_line") {
        return;
    }
    let missing = vmm().args(["--disk", "path=/nonexistent/disk.img"]).output().unwrap();
    let bad_spec = vmm().args(["--disk", "file=/x"]).output().unwrap();

    for (out, needle) in [(missing, "does not exist"), (bad_spec, "unknown disk setting")] {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains(needle), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    }
}

#[test]
fn kvm_virtio_blk_acknowledged_writes_survive_a_killed_vmm() {
    if !kvm_or_skip("kvm_virtio_blk_acknowledged_writes_survive_a_killed_vmm") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), "disk.img", 1 << 20);
    let mut cmd = vmm();
    cmd.args(["--mem", "64", "--cmdline", "ws=2 hb=100 blk=32"]).arg("--disk").arg(format!("path={}", disk.display()));
    let mut vm = Watched::spawn(cmd).unwrap();

    // Written, flushed and read back: then the VMM dies without any chance to clean up.
    line_starting(&mut vm, "BLK OK");
    vm.child.kill().unwrap();
    let status = vm.child.wait().unwrap();

    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));
    let bytes = std::fs::read(&disk).unwrap();
    let bad = (0..32u64)
        .flat_map(|s| (0..64u64).map(move |k| (s, k)))
        .filter(|&(s, k)| {
            let at = (s * 512 + k * 8) as usize;
            u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) != blk_word(s, k)
        })
        .count();
    assert_eq!(bad, 0, "every flushed word is in the image after SIGKILL");
}

fn netns_or_skip(what: &str, script: &str) -> Option<Netns> {
    let ns = Netns::with(what, script);
    if ns.is_none() {
        assert!(std::env::var_os("NOVACRON_REQUIRE_KVM").is_none(), "network namespaces are required (root, iproute2)");
        eprintln!("\n*** SKIPPED: cannot create a network namespace (needs root and iproute2) ***\n");
    }
    ns
}

#[test]
fn kvm_tap_that_does_not_exist_is_refused_unless_creation_is_asked_for() {
    if !kvm_or_skip("kvm_tap_that_does_not_exist_is_refused_unless_creation_is_asked_for") {
        return;
    }
    let Some(ns) = netns_or_skip("tap", "ip link set lo up") else { return };

    let typo = ns.vmm().args(["--mem", "64", "--net", "tap=typo0"]).output().unwrap();
    let typo_exists = ns.has_link("typo0");
    let mut asked = ns.vmm();
    asked.args(["--mem", "64", "--net", "tap=made0,create", "--cmdline", "ws=2 hb=100"]);
    let mut asked = Watched::spawn(asked).unwrap();
    let booted = asked.wait_for("HB 1", TIMEOUT, |l| l.text.starts_with("HB "));
    let made_exists = ns.has_link("made0");

    let stderr = String::from_utf8_lossy(&typo.stderr);
    assert_eq!(typo.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("tap typo0 does not exist"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(!typo_exists, "no tap was created for the typo");
    assert!(booted.is_ok(), "{booted:?}");
    assert!(made_exists, "with `create` the tap is made");
}

#[test]
fn kvm_one_image_attached_twice_read_write_is_refused() {
    if !kvm_or_skip("kvm_one_image_attached_twice_read_write_is_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), "disk.img", 1 << 20);
    let spec = format!("path={}", disk.display());

    let out = vmm().args(["--mem", "64", "--disk", &spec, "--disk", &spec]).output().unwrap();

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is in use by this VM itself (the image is attached twice)"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

#[test]
fn kvm_second_vmm_on_a_read_write_image_is_refused_naming_the_first() {
    if !kvm_or_skip("kvm_second_vmm_on_a_read_write_image_is_refused_naming_the_first") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), "disk.img", 1 << 20);
    let rw = format!("path={}", disk.display());
    let ro = format!("path={},ro", disk.display());
    let mut first = vmm();
    first.args(["--mem", "64", "--disk", &rw, "--cmdline", "ws=2 hb=100 blk=8"]);
    let mut first = Watched::spawn(first).unwrap();
    let first_blk = line_starting(&mut first, "BLK ");

    let writer = vmm().args(["--mem", "64", "--disk", &rw]).output().unwrap();
    let reader = vmm().args(["--mem", "64", "--disk", &ro]).output().unwrap();
    let seq = first.heartbeats().last().copied().unwrap_or(0);
    let alive = first.wait_for(
        "a later heartbeat",
        TIMEOUT,
        |l| matches!(l.parsed, novacron_guest_image::report::GuestLine::Heartbeat(s) if s > seq + 2),
    );

    assert!(first_blk.starts_with("BLK OK"), "{first_blk}");
    let holder = format!("is in use by process {}", first.child.id());
    for (what, out) in [("a second writer", writer), ("a reader", reader)] {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
        assert!(stderr.contains(&holder), "{what}: {holder:?} not in {stderr}");
        assert!(stderr.contains("novacron-vmm"), "{what}: the holder's command line: {stderr}");
    }
    assert!(alive.is_ok(), "the first VM runs on");
}

#[test]
fn kvm_read_only_images_are_shared_by_many_vmms() {
    if !kvm_or_skip("kvm_read_only_images_are_shared_by_many_vmms") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), "base.img", 1 << 20);
    let ro = format!("path={},ro", disk.display());
    let spawn = || {
        let mut cmd = vmm();
        cmd.args(["--mem", "64", "--disk", &ro, "--cmdline", "ws=2 hb=100 blk=8"]);
        Watched::spawn(cmd).unwrap()
    };
    let (mut a, mut b) = (spawn(), spawn());

    let (line_a, line_b) = (line_starting(&mut a, "BLK "), line_starting(&mut b, "BLK "));
    let writer = vmm().args(["--mem", "64", "--disk", &format!("path={}", disk.display())]).output().unwrap();

    assert!(line_a.starts_with("BLK RO OK") && line_b.starts_with("BLK RO OK"), "{line_a} / {line_b}");
    let stderr = String::from_utf8_lossy(&writer.stderr);
    assert_eq!(writer.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is open read-only by process"), "{stderr}");
}
