//! The io_uring backend.

use std::io;
use std::sync::{Arc, mpsc};

use nix::sys::eventfd::EventFd;

use crate::engine::Core;

/// Whether this kernel offers what the backend needs.
pub(crate) fn probe() -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "not yet"))
}

/// Runs a worker on io_uring until it is told to stop.
pub(crate) fn run(
    core: Core,
    wake: Arc<EventFd>,
    ready: mpsc::SyncSender<io::Result<()>>,
) -> io::Result<()> {
    crate::mmsg::run(core, wake, ready)
}
