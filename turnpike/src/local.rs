//! The in-process link between `serve`'s two planes: the data plane's agent reaches the
//! control plane's actor through channels of the plane contract's values. No socket, no
//! TLS, no encoding, and one clock: an Allocate crosses no loopback connection.

use std::time::Duration;

use turnpike_controlplane_runtime::{ControlPlaneHandle, LocalDown, LocalRefused, LocalUp};
use turnpike_dataplane::agent::{AttachError, Connect, DownLink, Refused, UpLink};
use turnpike_plane::{Down, Punted, Up};

/// Attaches to the control plane of this process.
#[derive(Debug)]
pub struct Local {
    cp: ControlPlaneHandle,
}

impl Local {
    /// The link to `cp` (its queue down holds `--plane-queue` messages).
    pub fn new(cp: ControlPlaneHandle) -> Local {
        Local { cp }
    }
}

/// The sending half.
#[derive(Debug)]
pub struct Sender(LocalUp);

/// The receiving half.
#[derive(Debug)]
pub struct Receiver(LocalDown);

fn refused(e: LocalRefused) -> Refused {
    match e {
        LocalRefused::Full => Refused::Full,
        LocalRefused::Closed => Refused::Closed,
    }
}

impl UpLink for Sender {
    fn try_punts(&self, p: Vec<Punted>) -> Result<(), Refused> {
        self.0.try_punts(p).map_err(refused)
    }

    async fn send(&self, m: Up) -> Result<(), Refused> {
        self.0.send(m).await.map_err(refused)
    }
}

impl DownLink for Receiver {
    async fn recv(&mut self) -> Option<Down> {
        self.0.recv().await
    }
}

impl Connect for Local {
    type Up = Sender;
    type Down = Receiver;

    fn target(&mut self) -> Option<String> {
        Some("in-process".to_owned())
    }

    async fn attach(&mut self, opening: Vec<Up>) -> Result<(Sender, Receiver), AttachError> {
        let mut opening = opening.into_iter();
        let Some(Up::Hello(hello)) = opening.next() else {
            return Err(AttachError::Refused(
                "an attachment opens with a Hello".to_owned(),
            ));
        };
        let (up, down) = self
            .cp
            .attach_local(hello)
            .await
            .map_err(|e| AttachError::Refused(e.message().to_owned()))?;
        for m in opening {
            up.send(m)
                .await
                .map_err(|_| AttachError::Unreachable("control plane stopped".to_owned()))?;
        }
        Ok((Sender(up), Receiver(down)))
    }

    async fn changed(&mut self) {
        std::future::pending().await
    }

    async fn backoff(&mut self) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    fn attached(&mut self) {}
}
