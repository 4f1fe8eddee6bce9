//! Drives a [`DestinationMachine`] over a link and a VM: the only part of the
//! receive that waits, reads the clock or touches a socket.

use super::{Action, DestinationMachine, DestinationVm, Event, ReceiveError, Received, Step};
use crate::destination::BaseImage;
use crate::transport::{Link, LinkError};
use std::time::{Duration, Instant};

/// How a receive gets a new link after it lost one during post-copy: waits until the
/// deadline for a source to connect (None: none did).
pub type Relisten<'a> = &'a mut dyn FnMut(Instant) -> Option<Link>;

/// Receives a migration over `link` into `vm`, offering `base` to the source. On an error
/// the source is told why (unless the link itself failed or the source aborted), and
/// nothing of the VM runs, unless a post-copy had started it (`PostCopyLost`: the caller
/// stops it). A dry run's probe ends it too, with nothing built. During post-copy a lost
/// link is replaced by `relisten`'s, for at most `resume_window`.
pub fn receive<V: DestinationVm>(
    vm: &mut V,
    link: &mut Link,
    base: Option<&BaseImage>,
    resume_window: Duration,
    relisten: Relisten<'_>,
) -> Result<Received, ReceiveError> {
    let mut machine = DestinationMachine::new(Instant::now(), base);
    machine.set_resume_window(resume_window);
    // The answer to the VM step last asked for, handled before the link is read again.
    let mut pending: Option<Event> = None;
    let mut link_dead = false;
    loop {
        if let Some(outcome) = machine.outcome() {
            return Ok(outcome);
        }
        let event = match pending.take() {
            Some(event) => event,
            None => {
                let before = link.consumed();
                let wait = machine.deadline().saturating_duration_since(Instant::now());
                match link.recv(wait) {
                    Ok(message) => Event::Frame { message, len: link.consumed() - before },
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
                // During post-copy a send on a lost link is noticed by the next read.
                if let Err(e) = link.send(&message)
                    && !matches!(machine.step(), Step::PostCopy)
                {
                    return Err(e.into());
                }
            }
            Err(Action::SendAll(messages)) => {
                for message in &messages {
                    if link.send(message).is_err() {
                        break;
                    }
                }
            }
            Err(Action::Relisten) => match relisten(machine.deadline()) {
                Some(new) => {
                    *link = new;
                    link_dead = false;
                    pending = Some(Event::Relinked);
                }
                None => pending = Some(Event::Timer),
            },
            Err(Action::Reject(reason)) => {
                link.abort(&reason);
                link_dead = true;
                pending = Some(Event::LinkLost(LinkError::PeerAborted(reason)));
            }
            Err(Action::Fail(e)) => {
                if !link_dead {
                    link.abort(&crate::error_chain(&e));
                }
                return Err(e);
            }
            Err(other) => {
                tracing::error!(?other, "the receive got an action it cannot do");
            }
        }
        if machine.step() == Step::PostCopy && was != Step::PostCopy {
            vm.request_pages_over(link);
        }
    }
}
