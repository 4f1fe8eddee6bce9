//! Drives a [`DestinationMachine`] over a link and a VM: the only part of the
//! receive that waits, reads the clock or touches a socket.

use super::{Action, DestinationMachine, DestinationVm, Event, ReceiveError, Received, Step};
use crate::destination::BaseImage;
use crate::protocol::{Message, PageBatch};
use crate::transport::{Link, LinkError};
use std::time::{Duration, Instant};

/// How a receive gets a new link after it lost one during post-copy: waits until the
/// deadline for a source to connect (None: none did). The lost link is closed first, so
/// that its port is free to listen on again.
pub type Relisten<'a> = &'a mut dyn FnMut(Instant) -> Option<Link>;

/// Receives a migration over `link` into `vm`, offering `base` to the source. On an error
/// the source is told why (unless the link itself failed or the source aborted), and
/// nothing of the VM runs, unless a post-copy had started it (`PostCopyLost`: the caller
/// stops it). A dry run's probe ends it too, with nothing built. During post-copy a lost
/// link is replaced by `relisten`'s, for at most `options.resume_window`. Answers the
/// outcome and the link it ended on (None: it ended waiting for a new one).
pub fn receive<V: DestinationVm>(
    vm: &mut V,
    link: Link,
    base: Option<&BaseImage>,
    options: ReceiveOptions,
    relisten: Relisten<'_>,
) -> (Result<Received, ReceiveError>, Option<Link>) {
    let mut link = Some(link);
    let result = drive(vm, &mut link, base, options, relisten);
    (result, link)
}

/// How a receive runs.
#[derive(Debug, Clone, Copy)]
pub struct ReceiveOptions {
    /// During a post-copy, how long a lost link waits for the source to come back.
    pub resume_window: Duration,
    /// Threads the page writer decompresses and hashes on (0: one per core).
    pub workers: usize,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions { resume_window: super::RESUME_WINDOW, workers: 0 }
    }
}

fn drive<V: DestinationVm>(
    vm: &mut V,
    link: &mut Option<Link>,
    base: Option<&BaseImage>,
    options: ReceiveOptions,
    relisten: Relisten<'_>,
) -> Result<Received, ReceiveError> {
    let mut machine = DestinationMachine::new(Instant::now(), base);
    machine.set_resume_window(options.resume_window);
    machine.set_workers(options.workers);
    // The answer to the VM step last asked for, handled before the link is read again.
    let mut pending: Option<Event> = None;
    // What the link gave after a run of page batches, for the next turn.
    let mut held: Option<Result<Message, LinkError>> = None;
    let mut link_dead = false;
    loop {
        if let Some(outcome) = machine.outcome() {
            return Ok(outcome);
        }
        let event = match (pending.take(), link.as_mut()) {
            (Some(event), _) => event,
            // No link since a relisten that found none (its port was busy): listen again.
            (None, None) => Event::LinkLost(LinkError::Closed),
            (None, Some(l)) => {
                let before = l.consumed();
                let wait = machine.deadline().saturating_duration_since(Instant::now());
                let read = match held.take() {
                    Some(read) => read,
                    None => l.recv(wait),
                };
                match read {
                    Ok(Message::Pages(batch)) if machine.step() == Step::Receiving => {
                        let batches = gather_pages(l, batch, &mut held);
                        Event::Pages { batches, len: l.consumed() - before }
                    }
                    Ok(message) => Event::Frame { message, len: l.consumed() - before },
                    Err(LinkError::Timeout(_)) => Event::Timer,
                    Err(e) => {
                        link_dead = true;
                        Event::LinkLost(e)
                    }
                }
            }
        };
        let was = machine.step();
        let action = match machine.handle(Instant::now(), event, vm) {
            Some(action) => action,
            None => continue,
        };
        match action.run_on(vm) {
            Ok(event) => pending = Some(event),
            Err(Action::Send(message)) => {
                let sent = link.as_mut().map_or(Err(LinkError::Closed), |l| l.send(&message).map(drop));
                // During post-copy a send on a lost link is noticed by the next read.
                if let Err(e) = sent
                    && !matches!(machine.step(), Step::PostCopy)
                {
                    return Err(e.into());
                }
            }
            Err(Action::SendAll(messages)) => {
                if let Some(l) = link.as_mut() {
                    for message in &messages {
                        if l.send(message).is_err() {
                            break;
                        }
                    }
                }
            }
            Err(Action::Relisten) => {
                // The lost link holds the port: drop it (its runtime and sockets) before
                // listening there again.
                drop(link.take());
                held = None;
                match relisten(machine.deadline()) {
                    Some(new) => {
                        *link = Some(new);
                        link_dead = false;
                        pending = Some(Event::Relinked);
                    }
                    None => pending = Some(Event::Timer),
                }
            }
            Err(Action::Reject(reason)) => {
                if let Some(l) = link.as_mut() {
                    l.abort(&reason);
                }
                link_dead = true;
                pending = Some(Event::LinkLost(LinkError::PeerAborted(reason)));
            }
            Err(Action::Fail(e)) => {
                if let Some(l) = link.as_mut()
                    && !link_dead
                {
                    l.abort(&crate::error_chain(&e));
                }
                return Err(e);
            }
            Err(other) => {
                tracing::error!(?other, "the receive got an action it cannot do");
            }
        }
        if machine.step() == Step::PostCopy
            && was != Step::PostCopy
            && let Some(l) = link.as_ref()
        {
            vm.request_pages_over(l);
        }
    }
}

/// Batches taken at once at most: enough for the writer's workers to share, few enough
/// that the receipt for them is not late.
pub const GATHER_BATCHES: usize = 8;

/// `first` and the page batches already waiting behind it on `link`; the first other
/// message (or error) goes into `held`. A held message's frame bytes are counted with
/// the batches (its own event then has none): the total stays right.
fn gather_pages(link: &mut Link, first: PageBatch, held: &mut Option<Result<Message, LinkError>>) -> Vec<PageBatch> {
    let mut batches = vec![first];
    while batches.len() < GATHER_BATCHES {
        match link.try_recv() {
            Some(Ok(Message::Pages(batch))) => batches.push(batch),
            Some(other) => {
                *held = Some(other);
                break;
            }
            None => break,
        }
    }
    batches
}
