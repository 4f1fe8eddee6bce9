//! The destination machine driven by a scripted source under simulated time: a whole
//! receive, and a failure at every step, each asserting which error it is.

use super::*;
use crate::dirty::DirtySet;
use crate::page::{self, ZERO_HASH};
use crate::protocol::BatchBuilder;

const PAGES: usize = 8;
/// Each frame's length, as the driver would count it.
const FRAME: u64 = 100;

#[derive(Debug, thiserror::Error)]
#[error("the test VM refuses to {0}")]
struct TestFault(&'static str);

/// Guest memory and the VM steps, failing the one named in `fail`.
#[derive(Default)]
struct TestVm {
    mem: Vec<Vec<u8>>,
    built: Option<Vec<u8>>,
    started: bool,
    fail: Option<&'static str>,
    /// It can run post-copy.
    post_copy: bool,
}

impl TestVm {
    fn failing(step: &'static str) -> Self {
        TestVm { fail: Some(step), ..TestVm::default() }
    }

    fn step(&self, step: &'static str) -> Result<(), VmFault> {
        if self.fail == Some(step) {
            return Err(Box::new(TestFault(step)));
        }
        Ok(())
    }
}

impl GuestPages for TestVm {
    fn page(&mut self, page: u64) -> Option<&mut [u8]> {
        if self.built.is_some() {
            return None;
        }
        self.mem.get_mut(usize::try_from(page).ok()?).map(|p| &mut p[..])
    }
}

impl DestinationVm for TestVm {
    fn prepare(&mut self, hello: &Hello) -> Result<(), VmFault> {
        self.step("prepare")?;
        self.mem = vec![vec![0; PAGE_SIZE]; (hello.regions.iter().sum::<u64>() / PAGE_SIZE as u64) as usize];
        Ok(())
    }

    fn build(&mut self, state: &[u8]) -> Result<(), VmFault> {
        self.step("build")?;
        self.built = Some(state.to_vec());
        Ok(())
    }

    fn start(&mut self) -> Result<(), VmFault> {
        self.step("start")?;
        self.started = true;
        Ok(())
    }

    fn check_post_copy(&mut self) -> Result<(), VmFault> {
        match self.post_copy {
            true => Ok(()),
            false => Err("no post-copy here".into()),
        }
    }

    fn start_post_copy(&mut self, _pending: &DirtySet) -> Result<(), VmFault> {
        self.start()
    }

    fn place(&mut self, page: u64, content: Option<&[u8]>) -> Result<(), VmFault> {
        let slot = self.mem.get_mut(usize::try_from(page)?).ok_or("no such page")?;
        slot.copy_from_slice(content.unwrap_or(&[0; PAGE_SIZE]));
        Ok(())
    }
}

/// The frames of a committed fuzz seed.
fn seed(name: &str) -> Vec<Message> {
    let path = format!("{}/../fuzz/corpus/migration_stream/{name}", env!("CARGO_MANIFEST_DIR"));
    let bytes = std::fs::read(&path).unwrap();
    let mut at = 0;
    let mut messages = Vec::new();
    while at < bytes.len() {
        let len = crate::protocol::frame_len(bytes[at..at + 4].try_into().unwrap()).unwrap();
        messages.push(crate::protocol::decode_message(&bytes[at + 4..at + 4 + len]).unwrap());
        at += 4 + len;
    }
    messages
}

#[test]
fn test_the_post_copy_fuzz_seeds_reach_the_end_and_the_digest_failure() {
    let mut run = Run::new(TestVm { post_copy: true, ..TestVm::default() });
    let mut frames = seed("post-copy.bin");
    let done = frames.pop().unwrap();
    run.frames(frames);
    assert_eq!((run.machine.step(), run.vm.started, run.machine.missing_pages()), (Step::PostCopy, true, 0));
    let (sent, failed) = run.frame(done);
    assert!(failed.is_none() && matches!(sent[..], [Message::PostCopyComplete]), "{sent:?} {failed:?}");
    assert_eq!(run.machine.report().map(|r| r.post_copy_pages), Some(2));

    let mut run = Run::new(TestVm { post_copy: true, ..TestVm::default() });
    let mut frames = seed("post-copy-digest-differs.bin");
    let done = frames.pop().unwrap();
    run.frames(frames);
    let (_, failed) = run.frame(done);
    let Some(ReceiveError::PostCopyLost { missing: 0, cause, .. }) = failed else { panic!("{failed:?}") };
    assert!(matches!(*cause, ReceiveError::MemoryDigest { .. }), "{cause}");
}

#[test]
fn test_a_new_link_that_never_says_resume_is_dropped_and_the_next_one_resumes() {
    let mut run = Run::new(TestVm { post_copy: true, ..TestVm::default() });
    let mut frames = seed("post-copy.bin");
    frames.truncate(frames.len() - 2); // the guest runs; its last pages have not come
    run.frames(frames);
    assert_eq!(run.machine.step(), Step::PostCopy);
    let relisten = run.machine.handle(run.now, Event::LinkLost(LinkError::Closed), &mut run.vm);
    assert!(matches!(relisten, Some(Action::Relisten)), "{relisten:?}");
    // A link that stays silent: after RESUME_HELLO it is rejected, and the port listened on again.
    assert!(run.machine.handle(run.now, Event::Relinked, &mut run.vm).is_none());
    assert_eq!(run.machine.deadline(), run.now + RESUME_HELLO);
    let quiet = run.machine.handle(run.now + RESUME_HELLO - Duration::from_millis(1), Event::Timer, &mut run.vm);
    assert!(quiet.is_none(), "{quiet:?}");
    let reject = run.machine.handle(run.now + RESUME_HELLO, Event::Timer, &mut run.vm);
    assert!(matches!(&reject, Some(Action::Reject(why)) if why.contains("no Resume")), "{reject:?}");
    assert_eq!(run.machine.step(), Step::AwaitingResume);
    // The next link resumes, within the window.
    run.now += RESUME_HELLO;
    assert!(run.machine.handle(run.now, Event::Relinked, &mut run.vm).is_none());
    let Message::PostCopyPending(pending) = &seed("post-copy.bin")[4] else { panic!("the seed's fifth frame") };
    let session = pending.session;
    let (sent, failed) = run.frame(Message::Resume(session));
    assert!(failed.is_none() && matches!(sent[..], [Message::PostCopyPending(_)]), "{sent:?} {failed:?}");
    assert_eq!(run.machine.step(), Step::PostCopy);
}

#[test]
fn test_post_copy_is_refused_by_a_vm_that_cannot_and_pending_pages_need_the_offer() {
    let mut run = Run::new(TestVm::default());
    let frames = seed("post-copy.bin");
    run.frame(frames[0].clone());
    let (answer, _) = run.frame(Message::PostCopyAsk);
    assert!(
        matches!(&answer[..], [Message::PostCopyAnswer(Some(why))] if why.contains("no post-copy here")),
        "{answer:?}"
    );
    // Without the offer, a list of pending pages is out of turn.
    let e = run.fails(frames[4].clone());
    assert!(matches!(e, ReceiveError::Unexpected { got: "PostCopyPending", .. }), "{e}");
}

fn hello(version: u16, pages: usize) -> Message {
    Message::Hello(Hello { version, machine: b"machine".to_vec(), regions: vec![(pages * PAGE_SIZE) as u64] })
}

/// Page `i` as the source holds it: some non-zero pattern.
fn content(i: usize) -> Vec<u8> {
    (0..PAGE_SIZE).map(|b| (b * (i + 7) + i) as u8 | 1).collect()
}

/// Pages 1 and 3 full, page 5 a copy of page 1, page 2 zero (it was zero already).
fn pages() -> Message {
    let mut batch = BatchBuilder::default();
    batch.full(1, &content(1));
    batch.full(3, &content(3));
    batch.copy(5, 1);
    batch.zero(2);
    Message::Pages(batch.finish(None))
}

const STATE: &[u8] = b"the VM's saved state";

/// The digests of what `pages()` and `STATE` make.
fn digests() -> Digests {
    let mut memory = MemoryDigest::default();
    for (i, p) in [(1, content(1)), (3, content(3)), (5, content(1))] {
        memory.replace(i, &ZERO_HASH, &page::hash(&p));
    }
    Digests { memory: memory.bytes(), state: *blake3::hash(STATE).as_bytes() }
}

/// A destination machine and its VM, with a simulated clock.
struct Run {
    machine: DestinationMachine<'static>,
    vm: TestVm,
    now: Instant,
    start: Instant,
}

impl Run {
    fn new(vm: TestVm) -> Self {
        let start = Instant::now();
        Run { machine: DestinationMachine::new(start, None), vm, now: start, start }
    }

    /// Handles `event` `after` the last one, doing VM steps as the driver does; answers
    /// what was sent, and the failure if there was one.
    fn event(&mut self, after: Duration, event: Event) -> (Vec<Message>, Option<ReceiveError>) {
        self.now += after;
        let (mut sent, mut next) = (Vec::new(), Some(event));
        while let Some(event) = next.take() {
            let Some(action) = self.machine.handle(self.now, event, &mut self.vm) else { continue };
            match action.run_on(&mut self.vm) {
                Ok(event) => next = Some(event),
                Err(Action::Send(m)) => sent.push(m),
                Err(Action::SendAll(m)) => sent.extend(m),
                Err(Action::Fail(e)) => return (sent, Some(e)),
                Err(other) => panic!("the machine asked for {other:?}"),
            }
        }
        (sent, None)
    }

    fn frame(&mut self, message: Message) -> (Vec<Message>, Option<ReceiveError>) {
        self.event(Duration::from_millis(10), Event::Frame { message, len: FRAME })
    }

    /// Sends the frames, which must all be taken without a failure.
    fn frames(&mut self, messages: impl IntoIterator<Item = Message>) {
        for m in messages {
            let name = m.name();
            let (_, failed) = self.frame(m);
            assert!(failed.is_none(), "{name}: {failed:?}");
        }
    }

    /// The frame that must fail the receive; answers the error.
    fn fails(&mut self, message: Message) -> ReceiveError {
        let (_, failed) = self.frame(message);
        self.failed(failed)
    }

    fn failed(&mut self, failed: Option<ReceiveError>) -> ReceiveError {
        let Some(e) = failed else { panic!("the receive went on at {:?}", self.machine.step()) };
        assert_eq!(self.machine.step(), Step::Failed);
        assert!(!self.vm.started, "nothing runs after a failure");
        // A failed receive takes nothing more.
        let (sent, again) = self.frame(Message::Commit);
        assert!(sent.is_empty() && again.is_none());
        assert!(self.machine.report().is_none());
        e
    }
}

/// The fault the VM gave, as the source of `e`.
fn vm_fault(e: &ReceiveError) -> Option<&TestFault> {
    std::error::Error::source(e)?.downcast_ref::<TestFault>()
}

#[test]
fn test_a_whole_receive_writes_the_pages_checks_both_digests_and_runs_the_vm_only_on_commit() {
    let mut run = Run::new(TestVm::default());

    let (welcome, _) = run.frame(hello(PROTOCOL_VERSION, PAGES));
    assert!(matches!(&welcome[..], [Message::Welcome(w)] if w.base.is_empty()), "{welcome:?}");
    assert_eq!(run.machine.step(), Step::Receiving);
    let (received, _) = run.frame(pages());
    assert!(matches!(received[..], [Message::Received(n)] if n == 2 * FRAME), "{received:?}");
    let (sent, _) = run.frame(Message::State(STATE.to_vec()));
    assert!(sent.is_empty());
    let (ready, _) = run.frame(Message::Verify(digests()));
    assert!(matches!(&ready[..], [Message::Ready(d)] if *d == digests()), "{ready:?}");
    assert_eq!((run.machine.step(), run.vm.built.as_deref(), run.vm.started), (Step::Commit, Some(STATE), false));
    let (running, _) = run.frame(Message::Commit);

    assert!(matches!(running[..], [Message::Running]), "{running:?}");
    assert!(run.vm.started);
    assert_eq!(run.machine.step(), Step::Done);
    for (i, page) in run.vm.mem.iter().enumerate() {
        let want = match i {
            1 | 5 => content(1),
            3 => content(3),
            _ => vec![0; PAGE_SIZE],
        };
        assert!(*page == want, "page {i}");
    }
    let report = run.machine.report().unwrap();
    assert_eq!(report.pages_received, 4);
    assert_eq!(report.bytes_received, 5 * FRAME);
    assert_eq!(report.memory_digest, hex(&digests().memory));
    // From Hello to Running: four frames 10 ms apart.
    assert_eq!(report.total_ms, 40);
    assert_eq!(run.now.duration_since(run.start), Duration::from_millis(50));
}

#[test]
fn test_a_version_outside_the_window_is_refused_and_names_both_ends() {
    for version in [OLDEST_PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1] {
        let mut run = Run::new(TestVm::default());
        let e = run.fails(hello(version, PAGES));
        assert!(matches!(e, ReceiveError::Version(v) if v == version), "{e}");
        assert!(e.to_string().contains("upgrade the older"), "{e}");
        assert!(run.vm.mem.is_empty(), "no memory was made");
    }
    for version in OLDEST_PROTOCOL_VERSION..=PROTOCOL_VERSION {
        let mut run = Run::new(TestVm::default());
        run.frames([hello(version, PAGES)]);
        assert_eq!(run.machine.step(), Step::Receiving, "version {version} is in the window");
    }
}

#[test]
fn test_regions_past_16_tib_are_refused_before_the_vm_makes_memory() {
    let mut run = Run::new(TestVm::default());
    let e = run.fails(Message::Hello(Hello { version: PROTOCOL_VERSION, machine: vec![], regions: vec![u64::MAX, 1] }));
    assert!(matches!(&e, ReceiveError::Regions(r) if *r == [u64::MAX, 1]), "{e}");
    let mut run = Run::new(TestVm::default());
    let e = run.fails(hello(PROTOCOL_VERSION, (MAX_PAGES + 1) as usize));
    assert!(matches!(e, ReceiveError::Regions(_)), "{e}");
}

#[test]
fn test_a_vm_step_that_fails_fails_the_receive_and_keeps_the_vms_error_as_its_source() {
    let mut run = Run::new(TestVm::failing("prepare"));
    let e = run.fails(hello(PROTOCOL_VERSION, PAGES));
    assert!(matches!(e, ReceiveError::Prepare(_)), "{e}");
    assert_eq!(vm_fault(&e).map(|f| f.0), Some("prepare"));
    assert_eq!(crate::error_chain(&e), "cannot make the VM's memory: the test VM refuses to prepare");

    let mut run = Run::new(TestVm::failing("build"));
    run.frames([hello(PROTOCOL_VERSION, PAGES), pages(), Message::State(STATE.to_vec())]);
    let e = run.fails(Message::Verify(digests()));
    assert!(matches!(e, ReceiveError::Build(_)), "{e}");
    assert_eq!(vm_fault(&e).map(|f| f.0), Some("build"));

    let mut run = Run::new(TestVm::failing("start"));
    run.frames([hello(PROTOCOL_VERSION, PAGES), pages(), Message::State(STATE.to_vec()), Message::Verify(digests())]);
    let e = run.fails(Message::Commit);
    assert!(matches!(e, ReceiveError::Start(_)), "{e}");
    assert_eq!(vm_fault(&e).map(|f| f.0), Some("start"));
}

#[test]
fn test_a_message_out_of_its_step_is_refused_and_says_what_was_due() {
    let script =
        || [hello(PROTOCOL_VERSION, PAGES), pages(), Message::State(STATE.to_vec()), Message::Verify(digests())];
    // (messages taken first, the stray one, what was due)
    let cases: Vec<(usize, Message, &str)> = vec![
        (0, pages(), "Hello"),
        (0, Message::Commit, "Hello"),
        (1, hello(PROTOCOL_VERSION, PAGES), "Pages, State or Verify"),
        (1, Message::Commit, "Pages, State or Verify"),
        (1, Message::Running, "Pages, State or Verify"),
        (2, Message::Welcome(Welcome { base: vec![] }), "Pages, State or Verify"),
        (4, pages(), "Commit"),
        (4, Message::State(STATE.to_vec()), "Commit"),
        (4, Message::Verify(digests()), "Commit"),
    ];
    for (taken, stray, due) in cases {
        let got = stray.name();
        let mut run = Run::new(TestVm::default());
        run.frames(script().into_iter().take(taken));
        let e = run.fails(stray);
        assert!(
            matches!(e, ReceiveError::Unexpected { expected, got: g } if expected == due && g == got),
            "after {taken} messages, {got}: {e}"
        );
    }
    // Verify with no State before it.
    let mut run = Run::new(TestVm::default());
    run.frames([hello(PROTOCOL_VERSION, PAGES), pages()]);
    let e = run.fails(Message::Verify(digests()));
    assert!(matches!(e, ReceiveError::Unexpected { expected: "State", got: "Verify" }), "{e}");
}

#[test]
fn test_a_digest_that_differs_fails_before_the_vm_is_built() {
    for wrong in ["memory", "state"] {
        let mut run = Run::new(TestVm::default());
        run.frames([hello(PROTOCOL_VERSION, PAGES), pages(), Message::State(STATE.to_vec())]);
        let mut theirs = digests();
        match wrong {
            "memory" => theirs.memory[0] ^= 1,
            _ => theirs.state[0] ^= 1,
        }
        let e = run.fails(Message::Verify(theirs));
        match wrong {
            "memory" => assert!(matches!(e, ReceiveError::MemoryDigest { .. }), "{e}"),
            _ => assert!(matches!(e, ReceiveError::StateDigest { .. }), "{e}"),
        }
        assert!(e.to_string().starts_with(&format!("{wrong} digest mismatch")), "{e}");
        assert!(run.vm.built.is_none(), "not built on a mismatch");
    }
}

#[test]
fn test_a_bad_batch_fails_the_receive() {
    let mut run = Run::new(TestVm::default());
    run.frames([hello(PROTOCOL_VERSION, PAGES)]);
    let mut batch = BatchBuilder::default();
    batch.full(PAGES as u64, &content(0));
    let e = run.fails(Message::Pages(batch.finish(None)));
    assert!(matches!(&e, ReceiveError::BadBatch(why) if why.contains("outside")), "{e}");

    let mut run = Run::new(TestVm::default());
    run.frames([hello(PROTOCOL_VERSION, PAGES)]);
    let mut batch = BatchBuilder::default();
    batch.base(1, 0);
    let e = run.fails(Message::Pages(batch.finish(None)));
    assert!(matches!(&e, ReceiveError::BadBatch(why) if why.contains("offered none")), "{e}");
}

#[test]
fn test_a_silent_source_times_out_at_the_deadline_and_not_before() {
    let mut run = Run::new(TestVm::default());
    let (sent, failed) = run.event(HELLO_TIMEOUT - Duration::from_millis(1), Event::Timer);
    assert!(sent.is_empty() && failed.is_none(), "early timers are ignored");
    let (_, failed) = run.event(Duration::from_millis(1), Event::Timer);
    let e = run.failed(failed);
    assert!(matches!(e, ReceiveError::Timeout { waiting: "Hello", after } if after == HELLO_TIMEOUT), "{e}");

    // Every frame moves the deadline on: a source that keeps sending is never timed out.
    let mut run = Run::new(TestVm::default());
    run.frames([hello(PROTOCOL_VERSION, PAGES)]);
    for _ in 0..3 {
        let (_, failed) = run.event(MESSAGE_TIMEOUT - Duration::from_secs(1), Event::Timer);
        assert!(failed.is_none());
        run.frames([pages()]);
    }
    assert_eq!(run.machine.deadline(), run.now + MESSAGE_TIMEOUT);
    let (_, failed) = run.event(MESSAGE_TIMEOUT, Event::Timer);
    let e = run.failed(failed);
    assert!(matches!(e, ReceiveError::Timeout { waiting: "Pages, State or Verify", .. }), "{e}");

    // Built and ready, the commit that never comes.
    let mut run = Run::new(TestVm::default());
    run.frames([hello(PROTOCOL_VERSION, PAGES), pages(), Message::State(STATE.to_vec()), Message::Verify(digests())]);
    let (_, failed) = run.event(MESSAGE_TIMEOUT, Event::Timer);
    let e = run.failed(failed);
    assert!(matches!(e, ReceiveError::Timeout { waiting: "Commit", .. }), "{e}");
    assert!(run.vm.built.is_some() && !run.vm.started, "built, never run");
}

/// The committed session a version-1 source sent (`fixtures/session-v1.bin`: frames of
/// `v1_session()`). Once the protocol is at 2, it is the N-1 stream a rolling upgrade
/// must still receive; it stays as it is.
const SESSION_V1: &[u8] = include_bytes!("../../fixtures/session-v1.bin");

/// Page 3 as the second batch changes it: a few words of `content(3)`.
fn content_3_changed() -> Vec<u8> {
    let mut page = content(3);
    page[8..16].copy_from_slice(b"changed!");
    page[2000..2004].copy_from_slice(&[0, 0, 0, 0]);
    page
}

/// The memory the session leaves: page 1 zeroed again, 3 changed by a delta, 5 a copy of
/// page 1's first content, 6 full.
fn v1_memory() -> Vec<Vec<u8>> {
    let mut mem = vec![vec![0; PAGE_SIZE]; PAGES];
    (mem[3], mem[5], mem[6]) = (content_3_changed(), content(1), content(6));
    mem
}

fn digest_of(mem: &[Vec<u8>]) -> [u8; 32] {
    let mut digest = MemoryDigest::default();
    for (i, p) in mem.iter().enumerate().filter(|(_, p)| p.iter().any(|b| *b != 0)) {
        digest.replace(i as u64, &ZERO_HASH, &page::hash(p));
    }
    digest.bytes()
}

/// A version-1 session: every kind of page entry, a raw batch and a zstd one.
fn v1_session() -> Vec<Message> {
    let mut second = BatchBuilder::default();
    assert!(second.delta(3, &content(3), &content_3_changed(), 1024));
    second.full(6, &content(6));
    second.zero(1);
    let mut zstd = zstd::bulk::Compressor::new(1).unwrap();
    let second = second.finish(Some(&mut zstd));
    assert!(second.compressed, "the second batch is the zstd one");
    let digests = Digests { memory: digest_of(&v1_memory()), state: *blake3::hash(STATE).as_bytes() };
    vec![
        hello(1, PAGES),
        pages(),
        Message::Pages(second),
        Message::State(STATE.to_vec()),
        Message::Verify(digests),
        Message::Commit,
    ]
}

fn frames(messages: &[Message]) -> Vec<u8> {
    messages.iter().flat_map(|m| crate::protocol::encode_frame(m).unwrap()).collect()
}

#[test]
fn test_the_committed_v1_session_is_received_to_a_running_vm() {
    let mut run = Run::new(TestVm::default());
    let mut rest = SESSION_V1;
    while !rest.is_empty() {
        let len = crate::protocol::frame_len(rest[..4].try_into().unwrap()).unwrap();
        let message = crate::protocol::decode_message(&rest[4..4 + len]).unwrap();
        rest = &rest[4 + len..];
        let (_, failed) = run.event(Duration::from_millis(1), Event::Frame { message, len: 4 + len as u64 });
        assert!(failed.is_none(), "{failed:?}");
    }

    assert_eq!(run.machine.step(), Step::Done);
    assert!(run.vm.started && run.vm.built.as_deref() == Some(STATE));
    assert!(run.vm.mem == v1_memory(), "the memory the v1 session describes");
    let report = run.machine.report().unwrap();
    assert_eq!((report.pages_received, report.bytes_received), (7, SESSION_V1.len() as u64));
}

/// While this build speaks version 1, what it sends for the session is the fixture byte
/// for byte: a change to the wire format needs a new protocol version (and this fixture
/// kept as the N-1 stream). `NOVACRON_WRITE_FIXTURES=1` writes it anew, for a new version.
#[test]
fn test_this_build_sends_the_v1_session_as_committed_while_it_speaks_v1() {
    let now = frames(&v1_session());
    if std::env::var_os("NOVACRON_WRITE_FIXTURES").is_some() {
        std::fs::write(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/session-v1.bin"), &now).unwrap();
    }
    if PROTOCOL_VERSION == 1 {
        assert!(now == SESSION_V1, "the v1 wire format changed: bump PROTOCOL_VERSION and keep the fixture");
    }
}

#[test]
fn test_a_link_probe_answers_each_frame_with_a_receipt_and_builds_nothing() {
    let mut run = Run::new(TestVm::default());

    let (first, _) = run.frame(Message::Probe(vec![0xa5; 1000]));
    let (second, _) = run.frame(Message::Probe(vec![0x5a; 1000]));
    let (done, failed) = run.frame(Message::ProbeDone);

    assert!(matches!(first[..], [Message::Received(n)] if n == FRAME), "{first:?}");
    assert!(matches!(second[..], [Message::Received(n)] if n == 2 * FRAME), "{second:?}");
    assert!(done.is_empty() && failed.is_none(), "{done:?} {failed:?}");
    assert_eq!(run.machine.outcome(), Some(Received::Probe { bytes: 3 * FRAME }));
    assert!(run.vm.mem.is_empty() && run.vm.built.is_none(), "a probe prepared or built a VM");
    // A probe that ended takes nothing more.
    let (sent, again) = run.frame(hello(PROTOCOL_VERSION, PAGES));
    assert!(sent.is_empty() && again.is_none());
    assert_eq!(run.machine.step(), Step::Probed);
}

#[test]
fn test_a_probe_inside_a_migration_or_a_migration_inside_a_probe_is_refused() {
    let mut run = Run::new(TestVm::default());
    run.frames([hello(PROTOCOL_VERSION, PAGES)]);
    let e = run.fails(Message::Probe(vec![1; 10]));
    assert!(matches!(e, ReceiveError::Unexpected { expected: "Pages, State or Verify", got: "Probe" }), "{e}");

    let mut run = Run::new(TestVm::default());
    run.frames([Message::Probe(vec![1; 10])]);
    let e = run.fails(hello(PROTOCOL_VERSION, PAGES));
    assert!(matches!(e, ReceiveError::Unexpected { expected: "Probe or ProbeDone", got: "Hello" }), "{e}");
}

#[test]
fn test_a_probe_longer_than_its_bound_is_refused() {
    let mut run = Run::new(TestVm::default());
    let (_, ok) =
        run.event(Duration::from_millis(1), Event::Frame { message: Message::Probe(vec![]), len: MAX_PROBE_BYTES });
    assert!(ok.is_none(), "{ok:?}");
    let e = run.fails(Message::Probe(vec![]));
    assert!(matches!(e, ReceiveError::ProbeTooLong), "{e}");
}

/// Batches with every kind of entry over `pages` pages, from the source's own encoder on
/// two workers: a round of new pages (whole, zero, copies), then a round of deltas.
fn encoded_rounds(pages: u64) -> Vec<crate::protocol::PageBatch> {
    let mut encoder = crate::encoder::PageEncoder::new(pages, 1 << 20, true, 2).unwrap();
    let all: Vec<u64> = (0..pages).collect();
    let mut batches = Vec::new();
    for round in 0..2u8 {
        let data: Vec<u8> = all
            .iter()
            .flat_map(|&p| match p % 5 {
                0 => vec![0; PAGE_SIZE],
                1 => content(1),
                _ => {
                    let mut c = crate::noise(p + 1, PAGE_SIZE);
                    c[16] = round;
                    c
                }
            })
            .collect();
        encoder.add_pages(&all, &data);
        encoder.finish();
        batches.extend(std::iter::from_fn(|| encoder.take_batch()).map(|(b, _)| b));
    }
    batches
}

#[test]
fn test_batches_applied_together_on_workers_write_what_one_by_one_writes() {
    let pages = 1024;
    let batches = encoded_rounds(pages);
    assert!(batches.len() > 4, "{} batches", batches.len());
    let mut one = TestVm { mem: vec![vec![0; PAGE_SIZE]; pages as usize], ..TestVm::default() };
    let mut by_one = PageWriter::with_workers(pages, 1).unwrap();
    for batch in &batches {
        by_one.apply(&mut one, None, batch).unwrap();
    }
    let mut together = TestVm { mem: vec![vec![0; PAGE_SIZE]; pages as usize], ..TestVm::default() };
    let mut on_two = PageWriter::with_workers(pages, 2).unwrap();
    for run in batches.chunks(3) {
        on_two.apply_all(&mut together, None, run).unwrap();
    }
    assert!(together.mem == one.mem, "the memory differs");
    assert_eq!(on_two.digest(), by_one.digest());
    assert_eq!(on_two.received(), by_one.received());

    // A batch refused while it is written: refused by name, and the batches before it
    // are written, as one by one.
    let mut bad = BatchBuilder::default();
    bad.full(pages, &content(0));
    let mut run = batches[..2].to_vec();
    run.push(bad.finish(None));
    let mut vm = TestVm { mem: vec![vec![0; PAGE_SIZE]; pages as usize], ..TestVm::default() };
    let e = PageWriter::with_workers(pages, 2).unwrap().apply_all(&mut vm, None, &run).unwrap_err();
    assert!(matches!(&e, ReceiveError::BadBatch(why) if why.contains("outside the VM's 1024 pages")), "{e}");
    let mut first_two = TestVm { mem: vec![vec![0; PAGE_SIZE]; pages as usize], ..TestVm::default() };
    PageWriter::with_workers(pages, 1).unwrap().apply_all(&mut first_two, None, &batches[..2]).unwrap();
    assert!(vm.mem == first_two.mem);
}

#[test]
fn test_a_run_of_batches_is_taken_while_receiving_and_refused_before() {
    let batch = |page: u64| {
        let mut b = BatchBuilder::default();
        b.full(page, &content(page as usize));
        b.finish(None)
    };
    let mut run = Run::new(TestVm::default());
    let (_, failed) = run.event(Duration::from_millis(1), Event::Pages { batches: vec![batch(0)], len: FRAME });
    let e = run.failed(failed);
    assert!(matches!(e, ReceiveError::Unexpected { got: "Pages", .. }), "{e}");

    let mut run = Run::new(TestVm::default());
    run.frames([hello(PROTOCOL_VERSION, PAGES)]);
    let (sent, failed) =
        run.event(Duration::from_millis(1), Event::Pages { batches: vec![batch(1), batch(2)], len: 2 * FRAME });
    assert!(failed.is_none(), "{failed:?}");
    assert!(matches!(sent[..], [Message::Received(n)] if n == 3 * FRAME), "one receipt for the run: {sent:?}");
    assert_eq!((run.vm.mem[1].clone(), run.vm.mem[2].clone()), (content(1), content(2)));
}
