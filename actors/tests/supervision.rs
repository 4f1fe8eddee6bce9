//! The supervisors against real VMM processes running the test guest on KVM: a SIGKILLed
//! VMM is restarted by its VmSupervisor while a neighbour runs on undisturbed; a panicked
//! VmSupervisor is restarted by the HostSupervisor and re-adopts the running guest; the
//! `never` and bounded `on-failure` policies give up when they should; an evicted VMM (its
//! keeper found another host owning the VM) is never restarted, even under `always`; admission refuses
//! what does not fit or is malformed, and changes nothing; a host restarted on the same
//! state store re-adopts its running VMs and restarts the one that died meanwhile.

mod common;

use common::{HB_PERIOD, Host, SerialTail, gaps, kvm_or_skip, sigkill, spec, vmm_pids_under, wait_heartbeat};
use novacron_actors::{
    Capacity, HostConfig, HostError, HostMsg, HostSupervisor, ProcessExit, RestartPolicy, SpecError, VmMsg, VmPhase,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvm_sigkilled_vmm_is_restarted_and_the_neighbour_keeps_its_heartbeat() {
    if !kvm_or_skip("kvm_sigkilled_vmm_is_restarted_and_the_neighbour_keeps_its_heartbeat") {
        return;
    }
    let host = Host::start(|_| {}).await;
    let victim = host.create(spec("victim")).await.unwrap();
    let neighbour = host.create(spec("neighbour")).await.unwrap();
    let old = host.wait_running("victim").await;
    host.wait_running("neighbour").await;
    let mut victim_log = SerialTail::new(&victim.serial_log);
    let mut neighbour_log = SerialTail::new(&neighbour.serial_log);
    wait_heartbeat(&mut victim_log, 3).await;
    wait_heartbeat(&mut neighbour_log, 3).await;
    let seen_before_kill = neighbour_log.heartbeats().len();
    // Follow the neighbour on a thread of its own from before the kill until well after
    // the restart, polling 20 times per heartbeat period.
    let stop = Arc::new(AtomicBool::new(false));
    let follower = std::thread::spawn({
        let stop = stop.clone();
        move || {
            while !stop.load(Ordering::Relaxed) {
                neighbour_log.poll();
                std::thread::sleep(Duration::from_millis(5));
            }
            neighbour_log
        }
    });

    sigkill(old.pid.unwrap());
    let new = host.wait_vm("victim", "restarted", |i| i.restarts == 1 && i.phase == VmPhase::Running).await;
    wait_heartbeat(&mut victim_log, 3).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let neighbour_log = follower.join().unwrap();
    let after_kill = &neighbour_log.heartbeats()[seen_before_kill - 1..];
    let (longest, holes) = gaps(after_kill);
    eprintln!("neighbour: {} heartbeats after the kill, longest gap {longest:?}", after_kill.len());

    assert_ne!(new.pid, old.pid, "a new VMM process");
    assert_eq!(new.last_exit, Some(ProcessExit::Signal(libc::SIGKILL)));
    assert_eq!(victim_log.replaced, 1, "the restarted VMM writes a fresh serial log");
    assert_eq!(victim_log.boots(), 1, "the new log is one boot of the new guest");
    assert_eq!(host.get("neighbour").await.restarts, 0);
    assert_eq!(neighbour_log.boots(), 1, "the neighbour never rebooted");
    assert!(holes.is_empty(), "the neighbour's heartbeat sequence has holes: {holes:?}");
    assert!(after_kill.len() >= 10, "the neighbour kept beating: {} heartbeats in >1 s", after_kill.len());
    // Its heartbeats come every 100 ms; allow a few periods of jitter on a loaded 2-core
    // host, no more.
    assert!(longest < HB_PERIOD * 5, "the neighbour's heartbeat stalled for {longest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvm_panicked_vm_supervisor_is_restarted_and_readopts_the_running_guest() {
    if !kvm_or_skip("kvm_panicked_vm_supervisor_is_restarted_and_readopts_the_running_guest") {
        return;
    }
    // The panic is on purpose: print it without a backtrace (RUST_BACKTRACE=1 makes the
    // default hook slow).
    std::panic::set_hook(Box::new(|info| eprintln!("{info}")));
    let host = Host::start(|_| {}).await;
    let created = host.create(spec("steady")).await.unwrap();
    let before = host.wait_running("steady").await;
    let mut log = SerialTail::new(&created.serial_log);
    let last_before = wait_heartbeat(&mut log, 3).await;
    let old_actor = host.vm_actor("steady").await;

    old_actor.cast(VmMsg::Crash).unwrap();
    let deadline = Instant::now() + common::TIMEOUT;
    let new_actor = loop {
        // While its successor starts (from a task), the host says so instead of a supervisor.
        let answer = ractor::call!(host.actor, HostMsg::VmActor, "steady".to_string()).unwrap();
        match answer {
            Ok(actor) if actor.get_id() != old_actor.get_id() => break actor,
            Ok(_) | Err(HostError::Restarting(_)) => {}
            Err(e) => panic!("the VM's supervisor is neither running nor restarting: {e}"),
        }
        assert!(Instant::now() < deadline, "the VmSupervisor was not restarted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let after = host.get("steady").await;
    let later = wait_heartbeat(&mut log, last_before + 10).await;
    let paused = ractor::call!(new_actor, VmMsg::Pause).unwrap();
    let resumed = ractor::call!(new_actor, VmMsg::Resume).unwrap();
    // The re-adopted supervisor still watches the process: a kill is restarted.
    sigkill(before.pid.unwrap());
    let restarted = host.wait_vm("steady", "restarted", |i| i.restarts == 1 && i.phase == VmPhase::Running).await;
    let _ = std::panic::take_hook();

    assert_eq!(after.pid, before.pid, "the same VMM process, adopted");
    assert_eq!(after.phase, VmPhase::Running);
    assert_eq!(after.restarts, 0, "adopting is not a restart of the VM");
    assert!(later >= last_before + 10);
    assert_eq!(log.replaced, 0, "the serial log was not replaced");
    assert_eq!(log.boots(), 1, "no reboot: one boot in the log");
    assert!(gaps(&log.heartbeats()).1.is_empty(), "the heartbeat sequence continued without holes");
    assert_eq!(paused.unwrap().phase, VmPhase::Paused);
    assert_eq!(resumed.unwrap().phase, VmPhase::Running);
    assert_ne!(restarted.pid, before.pid);
    assert_eq!(restarted.last_exit, Some(ProcessExit::Signal(libc::SIGKILL)), "still our child: real status");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvm_never_and_spent_on_failure_policies_leave_killed_vms_down() {
    if !kvm_or_skip("kvm_never_and_spent_on_failure_policies_leave_killed_vms_down") {
        return;
    }
    let host = Host::start(|_| {}).await;
    let mut never = spec("never");
    never.restart = RestartPolicy::Never;
    let mut once = spec("once");
    once.restart = RestartPolicy::OnFailure {
        max_restarts: 1,
        window: Duration::from_secs(60),
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(50),
    };
    host.create(never).await.unwrap();
    let once_info = host.create(once).await.unwrap();
    let never_pid = host.wait_running("never").await.pid.unwrap();
    let first_pid = host.wait_running("once").await.pid.unwrap();

    sigkill(never_pid);
    sigkill(first_pid);
    let second = host.wait_vm("once", "restarted", |i| i.restarts == 1 && i.phase == VmPhase::Running).await;
    sigkill(second.pid.unwrap());
    let once_down = host.wait_vm("once", "failed", |i| i.phase == VmPhase::Failed).await;
    let never_down = host.wait_vm("never", "failed", |i| i.phase == VmPhase::Failed).await;
    // Long enough for a wrongly scheduled restart (50 ms backoff) to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let once_later = host.get("once").await;
    let never_later = host.get("never").await;
    let socket_answers = novacron_vmm::api::client::call(
        &once_info.socket,
        novacron_vmm::api::Request::Status,
        Duration::from_millis(500),
    )
    .is_ok();

    assert_eq!(never_down.restarts, 0);
    assert_eq!(never_down.pid, None);
    assert_eq!(never_down.last_exit, Some(ProcessExit::Signal(libc::SIGKILL)));
    assert_ne!(second.pid, Some(first_pid));
    assert_eq!(once_down.restarts, 1, "the second kill is not restarted");
    assert_eq!(once_down.pid, None);
    assert_eq!((once_later.phase, once_later.restarts, once_later.pid), (VmPhase::Failed, 1, None));
    assert_eq!((never_later.phase, never_later.pid), (VmPhase::Failed, None));
    assert!(!socket_answers, "no VMM is serving the given-up VM's socket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvm_an_evicted_vmm_is_not_restarted_even_under_always_while_a_shut_down_one_is() {
    if !kvm_or_skip("kvm_an_evicted_vmm_is_not_restarted_even_under_always_while_a_shut_down_one_is") {
        return;
    }
    use novacron_vmm::api::{Request, client::call};
    let host = Host::start(|_| {}).await;
    let mut shut = spec("shut");
    shut.restart = RestartPolicy::Always;
    let mut evicted = spec("evicted");
    evicted.restart = RestartPolicy::Always;
    let shut = host.create(shut).await.unwrap();
    let evicted = host.create(evicted).await.unwrap();
    host.wait_running("shut").await;
    host.wait_running("evicted").await;

    let call_timeout = Duration::from_secs(2);
    call(&shut.socket, Request::Shutdown, call_timeout).unwrap();
    call(&evicted.socket, Request::Evict { owner_epoch: 2 }, call_timeout).unwrap();
    let restarted = host.wait_vm("shut", "restarted", |i| i.restarts == 1 && i.phase == VmPhase::Running).await;
    let stopped = host.wait_vm("evicted", "stopped", |i| i.phase == VmPhase::Stopped).await;
    // Long enough for a wrongly scheduled restart (the `always` delay is 100 ms) to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = host.get("evicted").await;

    assert_eq!(restarted.last_exit, Some(ProcessExit::Code(0)), "a shutdown is restarted under always");
    assert_eq!(stopped.last_exit, Some(ProcessExit::Code(novacron_vmm::runtime::EVICTED_EXIT_CODE)));
    assert_eq!((later.phase, later.restarts, later.pid), (VmPhase::Stopped, 0, None), "never restarted");
    assert!(vmm_pids_under(host.dir.path()).iter().all(|pid| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        !String::from_utf8_lossy(&cmdline).contains("evicted.sock")
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvm_admission_refuses_oversized_duplicate_and_badly_named_vms_and_changes_nothing() {
    if !kvm_or_skip("kvm_admission_refuses_oversized_duplicate_and_badly_named_vms_and_changes_nothing") {
        return;
    }
    // A fixed capacity, so that "too big" means the same on any machine.
    let host = Host::start(|c| c.capacity = Some(Capacity { vcpus: 2, mem_mib: 4096 })).await;
    host.create(spec("first")).await.unwrap();
    let first = host.wait_running("first").await;
    let info_before = host.info().await;
    let files_before = files(host.dir.path());
    let capacity = info_before.capacity;
    let mut too_many_vcpus = spec("wide");
    too_many_vcpus.vcpus = 2; // one is taken by "first"
    let mut too_much_memory = spec("big");
    too_much_memory.mem_mib = capacity.mem_mib + 1;

    let wide = host.create(too_many_vcpus).await.unwrap_err();
    let big = host.create(too_much_memory).await.unwrap_err();
    let duplicate = host.create(spec("first")).await.unwrap_err();
    let bad_name = host.create(spec("Bad_Name")).await.unwrap_err();

    assert!(matches!(wide, HostError::NoCapacity { ref name, .. } if name == "wide"), "{wide}");
    assert!(matches!(big, HostError::NoCapacity { ref name, .. } if name == "big"), "{big}");
    assert!(big.to_string().contains("does not fit"), "{big}");
    assert!(matches!(duplicate, HostError::AlreadyExists(ref n) if n == "first"), "{duplicate}");
    assert!(matches!(bad_name, HostError::InvalidSpec(SpecError::Name { .. })), "{bad_name}");
    assert!(bad_name.to_string().contains("Bad_Name"), "{bad_name}");
    assert_eq!(host.info().await, info_before, "capacity and VM count unchanged");
    let names: Vec<String> = host.list().await.into_iter().map(|i| i.name).collect();
    assert_eq!(names, ["first"]);
    assert_eq!(files(host.dir.path()), files_before, "no files for refused VMs");
    let first_after = host.get("first").await;
    assert_eq!((first_after.pid, first_after.restarts, first_after.phase), (first.pid, 0, VmPhase::Running));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvm_stop_start_delete_a_vm() {
    if !kvm_or_skip("kvm_stop_start_delete_a_vm") {
        return;
    }
    let host = Host::start(|_| {}).await;
    let created = host.create(spec("brief")).await.unwrap();
    let running = host.wait_running("brief").await;
    wait_heartbeat(&mut SerialTail::new(&created.serial_log), 2).await;

    // Stop: a clean shutdown; the VM stays defined and holds its capacity.
    let stopped = ractor::call!(host.actor, HostMsg::StopVm, "brief".to_string()).unwrap().unwrap();
    assert_eq!(stopped.phase, VmPhase::Stopped);
    assert_eq!(stopped.last_exit, Some(ProcessExit::Code(0)), "a shutdown through the socket, not a kill");
    assert_eq!(stopped.pid, None);
    assert!(!std::path::Path::new(&format!("/proc/{}", running.pid.unwrap())).exists(), "the process is gone");
    let listed: Vec<_> = host.list().await.into_iter().map(|i| (i.name, i.phase)).collect();
    assert_eq!(listed, [("brief".to_string(), VmPhase::Stopped)]);
    assert_eq!(host.info().await.used, Capacity { vcpus: 1, mem_mib: 64 });

    // Start: a fresh boot of the same VM.
    let started = ractor::call!(host.actor, HostMsg::StartVm, "brief".to_string()).unwrap().unwrap();
    assert!(started.pid.is_some() && started.pid != running.pid, "{started:?}");
    wait_heartbeat(&mut SerialTail::new(&created.serial_log), 1).await;

    // Delete: stopped and forgotten, its capacity free.
    let deleted = ractor::call!(host.actor, HostMsg::DeleteVm, "brief".to_string()).unwrap().unwrap();
    let again = ractor::call!(host.actor, HostMsg::DeleteVm, "brief".to_string()).unwrap();
    let info = host.info().await;
    assert_eq!((deleted.phase, deleted.pid), (VmPhase::Stopped, None));
    assert!(!std::path::Path::new(&format!("/proc/{}", started.pid.unwrap())).exists(), "the process is gone");
    assert!(matches!(again, Err(HostError::NotFound(ref n)) if n == "brief"));
    assert!(host.list().await.is_empty());
    assert_eq!((info.vms, info.used), (0, Capacity { vcpus: 0, mem_mib: 0 }));
}

fn files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvm_a_restarted_host_readopts_its_vms_from_the_store_without_rebooting_them() {
    if !kvm_or_skip("kvm_a_restarted_host_readopts_its_vms_from_the_store_without_rebooting_them") {
        return;
    }
    let first = Host::start(|c| c.data_dir = Some(c.runtime_dir.clone())).await;
    let keeps = first.create(spec("keeps")).await.unwrap();
    first.create(spec("dies")).await.unwrap();
    let keeps_before = first.wait_running("keeps").await;
    let dies_before = first.wait_running("dies").await;
    let mut log = SerialTail::new(&keeps.serial_log);
    let last_before = wait_heartbeat(&mut log, 3).await;

    // The host goes away as a crashed daemon would: its actors end, its VMMs do not. While
    // nobody watches, one of them is killed.
    first.actor.stop_and_wait(None, Some(Duration::from_secs(10))).await.unwrap();
    sigkill(dies_before.pid.unwrap());
    let alone = wait_heartbeat(&mut log, last_before + 3).await;

    let mut config = HostConfig::new(first.dir.path(), common::vmm_binary());
    config.data_dir = Some(first.dir.path().to_owned());
    config.stop_timeout = Duration::from_secs(3);
    let (second, _) = ractor::Actor::spawn(None, HostSupervisor, config).await.unwrap();
    let get = |name: &'static str| {
        let second = second.clone();
        async move { ractor::call!(second, HostMsg::GetVm, name.to_string()).unwrap().unwrap() }
    };
    let keeps_after = get("keeps").await;
    let deadline = Instant::now() + common::TIMEOUT;
    let dies_after = loop {
        let info = get("dies").await;
        if info.phase == VmPhase::Running && info.pid.is_some() {
            break info;
        }
        assert!(Instant::now() < deadline, "the VM killed while no host ran was not restarted: {info:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let later = wait_heartbeat(&mut log, alone + 5).await;
    let listed = ractor::call!(second, HostMsg::ListVms).unwrap();
    let processes = vmm_pids_under(first.dir.path());
    second.stop_and_wait(None, Some(Duration::from_secs(10))).await.unwrap();

    assert_eq!(listed.len(), 2, "both VMs came back from the store: {listed:?}");
    assert_eq!(keeps_after.pid, keeps_before.pid, "the running VMM was adopted, not restarted");
    assert_eq!(keeps_after.phase, VmPhase::Running);
    assert_eq!(keeps_after.restarts, 0);
    assert!(later > alone, "the adopted guest keeps beating");
    assert_eq!(log.boots(), 1, "no reboot: one boot in the serial log");
    assert_eq!(log.replaced, 0);
    assert!(gaps(&log.heartbeats()).1.is_empty(), "the heartbeat sequence has no holes");
    assert_ne!(dies_after.pid, dies_before.pid, "the killed VM runs in a new VMM process");
    assert_eq!(dies_after.restarts, 1, "its restart policy counted the exit nobody watched");
    let mut expected = vec![keeps_before.pid.unwrap(), dies_after.pid.unwrap()];
    expected.sort_unstable();
    let mut processes = processes;
    processes.sort_unstable();
    assert_eq!(processes, expected, "exactly one VMM per VM: no duplicates");
}
