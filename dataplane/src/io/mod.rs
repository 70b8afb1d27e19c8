//! The I/O side of the data plane: the threads, sockets and system calls that drive the
//! sans-IO core (`crate::core`). Everything here may import the core; nothing in the core
//! imports from here.
//!
//! - `start`: [`DataPlane::start`](crate::DataPlane::start) (sockets, workers, the XDP
//!   fast path) and the [`DataPlaneHandle`](crate::DataPlaneHandle) the control side
//!   drives the workers with;
//! - `worker`: what both backends share (clock, command queue, the core's outputs);
//! - `uring` and `mmsg`: the two backends' loops (io_uring, or epoll with
//!   recvmmsg/sendmmsg);
//! - `batch`: GSO grouping and the refused-GSO fallback, shared by both backends;
//! - `slab`: socket creation, and the worker's sockets indexed by
//!   [`Token`](crate::core::Token);
//! - `conns`: TCP and TLS client connections (accept, PROXY header, TLS, framing,
//!   send queues), in the workers;
//! - `front`: the front door, a port shared by TURN and a web server (async: routes
//!   on the first bytes, hands TURN connections to the workers, splices the web's);
//! - `sys`: raw socket calls (GSO, DONT-FRAGMENT, buffer sizes, `malloc_trim`).

pub(crate) mod batch;
pub(crate) mod conns;
pub(crate) mod front;
#[allow(unsafe_code)]
pub(crate) mod handover;
#[allow(unsafe_code)]
pub(crate) mod mmsg;
pub(crate) mod slab;
pub(crate) mod start;
#[allow(unsafe_code)]
pub(crate) mod sys;
#[allow(unsafe_code)]
pub(crate) mod uring;
pub(crate) mod worker;
