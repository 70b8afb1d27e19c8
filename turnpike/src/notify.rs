//! systemd's readiness protocol (`sd_notify`), without libsystemd: a datagram to the
//! Unix socket named by `NOTIFY_SOCKET` (a path, or an abstract name after `@`). With
//! `Type=notify` and `NotifyAccess=all`, `systemctl start` returns once the relay is
//! ready, and after an upgrade (`SIGUSR2`) the new process tells systemd it is the main
//! process now, before the old one exits (else systemd would take the old one's exit for
//! the service's and stop the new one with it).

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (e.g. `READY=1`) to systemd; nothing when not run by it. Failures are
/// logged, not fatal: the relay serves either way.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                sock.send_to_addr(state.as_bytes(), &SocketAddr::from_abstract_name(name)?)?;
            }
            None => {
                sock.send_to(state.as_bytes(), &path)?;
            }
        }
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}
