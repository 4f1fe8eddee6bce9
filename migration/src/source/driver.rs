//! Drives a [`SourceMachine`] over a link and a VM: the only part of the sending end
//! that waits, reads the clock or touches a socket.

use super::{Control, MigrateError, Report, SourceAction, SourceEvent, SourceMachine, SourceOptions, SourceVm};
use crate::dirty::DirtySet;
use crate::page::PAGE_SIZE;
use crate::transport::{Link, LinkError};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The longest wait for the destination before a cancel is looked at again.
const CANCEL_POLL: Duration = Duration::from_millis(50);
/// Between two tries to reach the destination again during post-copy.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

/// Makes a new link to the destination (during post-copy, after one was lost).
pub type Reconnect<'a> = &'a mut dyn FnMut() -> Result<Link, LinkError>;

/// Migrates the VM over `link`. On success the VM is paused here and runs there; on a
/// failure that is not `committed()`, it runs here as before. A post-copy replaces a
/// lost link with `reconnect`'s.
pub fn migrate<V: SourceVm>(
    vm: &mut V,
    link: &mut Link,
    options: SourceOptions,
    control: Control,
    reconnect: Reconnect<'_>,
) -> Result<Report, MigrateError> {
    let mut machine = SourceMachine::new(Instant::now(), vm.machine(), vm.regions(), options)?;
    let mut driver = Driver { link, control, buf: Vec::new(), cancelled: false, reconnect, earlier_wire_bytes: 0 };
    loop {
        driver.publish(&machine);
        machine.set_link(driver.link.rtt(), driver.link.bandwidth_limit());
        if let Some(action) = machine.poll() {
            if let Some(result) = driver.act(vm, &mut machine, action) {
                driver.publish(&machine);
                return result;
            }
            driver.take_waiting(&mut machine);
            continue;
        }
        // Nothing to do but wait for the destination (or its deadline, or a cancel).
        let wait = machine.deadline().map_or(CANCEL_POLL, |d| d.saturating_duration_since(Instant::now()));
        let event = match driver.link.recv(wait.min(CANCEL_POLL)) {
            Ok(message) => SourceEvent::Frame(message),
            Err(LinkError::Timeout(_)) => SourceEvent::Timer,
            Err(e) => SourceEvent::LinkFailed(e),
        };
        machine.handle(Instant::now(), event);
        driver.check_cancel(&mut machine);
    }
}

struct Driver<'l, 'r> {
    link: &'l mut Link,
    reconnect: Reconnect<'r>,
    control: Control,
    /// Pages read for the machine.
    buf: Vec<u8>,
    cancelled: bool,
    /// Wire bytes of the links lost before this one (a post-copy's).
    earlier_wire_bytes: u64,
}

impl Driver<'_, '_> {
    /// Does `action`; answers the outcome once the machine has finished.
    fn act<V: SourceVm>(
        &mut self,
        vm: &mut V,
        machine: &mut SourceMachine,
        action: SourceAction,
    ) -> Option<Result<Report, MigrateError>> {
        let event = match action {
            SourceAction::Send(frame) => match self.link.send_frame(frame) {
                Ok(()) => return None,
                Err(e) => SourceEvent::LinkFailed(e),
            },
            SourceAction::SendPages { frame, shard } => match self.link.send_pages(shard, frame) {
                Ok(()) => return None,
                Err(e) => SourceEvent::LinkFailed(e),
            },
            SourceAction::StartDirtyLog => {
                SourceEvent::DirtyLogStarted(vm.start_dirty_log().map(|()| vm.touched_pages()))
            }
            SourceAction::ReadPages(pages) => {
                self.buf.resize(pages.len() * PAGE_SIZE, 0);
                let read =
                    pages.iter().zip(self.buf.chunks_exact_mut(PAGE_SIZE)).try_for_each(|(p, b)| vm.read_page(*p, b));
                SourceEvent::PagesRead(read.map(|()| &self.buf[..]))
            }
            SourceAction::Harvest => {
                let mut dirty = DirtySet::new(machine.pages());
                SourceEvent::Harvested(vm.harvest_dirty(&mut dirty).map(|()| dirty))
            }
            SourceAction::PauseAndSave => SourceEvent::Saved(vm.pause_and_save()),
            SourceAction::Throttle(percent) => {
                vm.set_throttle(percent);
                return None;
            }
            SourceAction::ReleaseDisks => {
                vm.release_disks();
                return None;
            }
            SourceAction::Abort { reason, dirty_log, resume } => {
                // Tell the destination (it may already know), then give the VM back.
                self.link.abort(&reason);
                if dirty_log {
                    vm.stop_dirty_log();
                }
                if resume && let Err(e) = vm.resume() {
                    tracing::error!("cannot resume the VM after a failed migration: {}", crate::error_chain(&*e));
                }
                return None;
            }
            SourceAction::Reconnect => loop {
                if machine.deadline().is_some_and(|d| Instant::now() >= d) {
                    break SourceEvent::Timer;
                }
                match (self.reconnect)() {
                    Ok(link) => {
                        self.earlier_wire_bytes += self.link.wire_bytes();
                        *self.link = link;
                        break SourceEvent::Reconnected;
                    }
                    Err(e) => {
                        tracing::info!("post-copy: the destination is not back yet: {}", crate::error_chain(&e));
                        std::thread::sleep(RECONNECT_PAUSE);
                    }
                }
            },
            SourceAction::Finish(result) => {
                return Some((*result).map(|mut report| {
                    report.wire_bytes = self.earlier_wire_bytes + self.link.wire_bytes();
                    report.transport = self.link.transport();
                    report.lanes = self.link.lanes_opened();
                    report
                }));
            }
        };
        machine.handle(Instant::now(), event);
        None
    }

    /// Hands the machine what arrived meanwhile (receipts, an abort) and a cancel, between
    /// its actions: reading pages does not wait for the link.
    fn take_waiting(&mut self, machine: &mut SourceMachine) {
        while let Some(read) = self.link.try_recv() {
            match read {
                Ok(message) => machine.handle(Instant::now(), SourceEvent::Frame(message)),
                // A closed link answers this on every call: hand it over once.
                Err(e) => {
                    machine.handle(Instant::now(), SourceEvent::LinkFailed(e));
                    break;
                }
            }
        }
        self.check_cancel(machine);
    }

    fn check_cancel(&mut self, machine: &mut SourceMachine) {
        if !self.cancelled && self.control.cancel.load(Ordering::Relaxed) {
            self.cancelled = true;
            machine.handle(Instant::now(), SourceEvent::Cancel);
        }
    }

    fn publish(&self, machine: &SourceMachine) {
        let progress = machine.progress().clone();
        self.control.update(|p| *p = progress);
    }
}
