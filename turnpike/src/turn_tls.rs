//! TURN over TLS: the certificate the data-plane workers serve, from files (reloaded on
//! SIGHUP and when they change) or made at start (`--tls-self-signed`).

use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;

use crate::config::{Config, TlsSource};
use crate::tls_clients::{self, CertPair};

/// Builds the TLS configuration of the TLS listeners and starts its reloader; `None`
/// without TLS. Must run inside the tokio runtime (the reloader is a task).
pub fn start(cfg: &Config) -> anyhow::Result<Option<Arc<ArcSwap<rustls::ServerConfig>>>> {
    match &cfg.tls {
        TlsSource::None => Ok(None),
        TlsSource::Files(pairs) => {
            let pairs: Vec<CertPair> = pairs
                .iter()
                .map(|(cert, key)| CertPair {
                    cert: cert.clone(),
                    key: key.clone(),
                })
                .collect();
            let config = tls_clients::load(&pairs).context("TURN over TLS certificate")?;
            let swap = Arc::new(ArcSwap::new(config));
            tls_clients::spawn(pairs, Arc::clone(&swap)).context("certificate reloader")?;
            Ok(Some(swap))
        }
        TlsSource::SelfSigned => {
            let mut names: Vec<String> = vec!["localhost".to_owned()];
            for a in cfg.listen.iter().chain(cfg.streams.iter().map(|s| &s.addr)) {
                let ip = a.ip().to_string();
                if !a.ip().is_unspecified() && !names.contains(&ip) {
                    names.push(ip);
                }
            }
            let made = tls_clients::self_signed(&names).context("self-signed certificate")?;
            let config = tls_clients::from_pem(&made.cert_pem, &made.key_pem)
                .context("self-signed certificate")?;
            println!(
                "turnpike: self-signed TLS certificate for {} (development only), SHA-256 fingerprint {}",
                names.join(", "),
                made.sha256_fingerprint
            );
            Ok(Some(Arc::new(ArcSwap::new(config))))
        }
    }
}
