//! Drives a [`DestinationMachine`] over a link and a VM: the only part of the
//! receive that waits, reads the clock or touches a socket.

use super::{Action, DestinationMachine, DestinationVm, Event, ReceiveError, Received};
use crate::destination::BaseImage;
use crate::transport::{Link, LinkError};
use std::time::Instant;

/// Receives a migration over `link` into `vm`, offering `base` to the source. On an error
/// the source is told why (unless the link itself failed or the source aborted), and
/// nothing of the VM runs. A dry run's probe ends it too, with nothing built.
pub fn receive<V: DestinationVm>(
    vm: &mut V,
    link: &mut Link,
    base: Option<&BaseImage>,
) -> Result<Received, ReceiveError> {
    let mut machine = DestinationMachine::new(Instant::now(), base);
    // The answer to the VM step last asked for, handled before the link is read again.
    let mut pending: Option<Event> = None;
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
                    Err(e) => return Err(e.into()),
                }
            }
        };
        match machine.handle(Instant::now(), event, vm) {
            None => {}
            Some(Action::Send(message)) => {
                link.send(&message)?;
            }
            Some(Action::Prepare(hello)) => pending = Some(Event::Prepared(vm.prepare(&hello))),
            Some(Action::Build(state)) => pending = Some(Event::Built(vm.build(&state))),
            Some(Action::Start) => pending = Some(Event::Started(vm.start())),
            Some(Action::Fail(e)) => {
                link.abort(&crate::error_chain(&e));
                return Err(e);
            }
        }
    }
}
