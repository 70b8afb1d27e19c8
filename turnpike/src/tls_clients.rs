//! The certificates of TURN over TLS: read from PEM files (several pairs: the client's
//! SNI picks one), made at start for development, and reloaded on SIGHUP and when the
//! files change. The data-plane workers read the configuration through an `ArcSwap`:
//! a reload reaches new connections while open ones keep their session.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow};
use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sha2::{Digest, Sha256};

/// The ALPN protocol of TURN (RFC 7443).
pub const ALPN_TURN: &[u8] = b"stun.turn";

/// Successful certificate reloads.
pub static TLS_RELOADS: AtomicU64 = AtomicU64::new(0);
/// Reloads that failed (the previous certificates stay in use).
pub static TLS_RELOAD_FAILURES: AtomicU64 = AtomicU64::new(0);

/// A certificate chain file and its private key file (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPair {
    /// The chain, leaf first.
    pub cert: PathBuf,
    /// The leaf's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// A development certificate made at start.
#[derive(Clone)]
pub struct SelfSigned {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PEM).
    pub key_pem: String,
    /// SHA-256 of the certificate's DER, `AB:CD:...`.
    pub sha256_fingerprint: String,
}

impl std::fmt::Debug for SelfSigned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelfSigned")
            .field("sha256_fingerprint", &self.sha256_fingerprint)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `AB:CD:...`: the SHA-256 of a DER certificate, as browsers and `openssl x509
/// -fingerprint -sha256` show it.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Chooses among several certificates by the client's SNI: the first whose names match,
/// else the first (also without SNI, e.g. a client connecting by IP).
#[derive(Debug)]
struct BySni {
    keys: Vec<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let first = self.keys.first().cloned();
        let Some(name) = hello.server_name() else {
            return first;
        };
        let Ok(name) = ServerName::try_from(name) else {
            return first;
        };
        self.keys
            .iter()
            .find(|k| {
                k.end_entity_cert()
                    .ok()
                    .and_then(|der| ParsedCertificate::try_from(der).ok())
                    .is_some_and(|c| rustls::client::verify_server_name(&c, &name).is_ok())
            })
            .cloned()
            .or(first)
    }
}

fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    what: &str,
) -> anyhow::Result<Arc<CertifiedKey>> {
    if chain.is_empty() {
        return Err(anyhow!("{what}: no certificate"));
    }
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| anyhow!("{what}: unusable private key: {e}"))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match()
        .map_err(|e| anyhow!("{what}: the key does not belong to the certificate: {e}"))?;
    Ok(Arc::new(ck))
}

fn server_config(keys: Vec<Arc<CertifiedKey>>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(BySni { keys }));
    cfg.alpn_protocols = vec![ALPN_TURN.to_vec()];
    if let Ok(t) = rustls::crypto::ring::Ticketer::new() {
        cfg.ticketer = t;
    }
    Ok(Arc::new(cfg))
}

fn read_pair(p: &CertPair) -> anyhow::Result<Arc<CertifiedKey>> {
    let chain = CertificateDer::pem_file_iter(&p.cert)
        .with_context(|| format!("cannot read {}", p.cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: bad PEM certificate", p.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&p.key)
        .with_context(|| format!("{}: no usable PEM private key", p.key.display()))?;
    certified(chain, key, &p.cert.display().to_string())
}

/// The server configuration of these pairs (the first is the default certificate).
pub fn load(pairs: &[CertPair]) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let keys = pairs
        .iter()
        .map(read_pair)
        .collect::<anyhow::Result<Vec<_>>>()?;
    if keys.is_empty() {
        return Err(anyhow!("no certificate configured"));
    }
    server_config(keys)
}

/// The server configuration of one certificate and key given as PEM text.
pub fn from_pem(cert_pem: &str, key_pem: &str) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("bad PEM certificate")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("bad PEM key")?;
    server_config(vec![certified(chain, key, "certificate")?])
}

/// A self-signed certificate for `names` (DNS names, or IP addresses as IP SANs).
pub fn self_signed(names: &[String]) -> anyhow::Result<SelfSigned> {
    let made = rcgen::generate_simple_self_signed(names.to_vec())
        .context("cannot make a self-signed certificate")?;
    Ok(SelfSigned {
        cert_pem: made.cert.pem(),
        key_pem: made.signing_key.serialize_pem(),
        sha256_fingerprint: fingerprint(made.cert.der()),
    })
}

/// What identifies a file's version: replaced by rename or rewritten in place.
fn stamp(p: &Path) -> Option<(std::time::SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

fn stamps(pairs: &[CertPair]) -> Vec<Option<(std::time::SystemTime, u64, u64)>> {
    pairs
        .iter()
        .flat_map(|p| [stamp(&p.cert), stamp(&p.key)])
        .collect()
}

/// Loads `pairs` again into `swap`; on failure the previous configuration stays.
fn reload(pairs: &[CertPair], swap: &ArcSwap<rustls::ServerConfig>, why: &str) -> bool {
    match load(pairs) {
        Ok(cfg) => {
            swap.store(cfg);
            TLS_RELOADS.fetch_add(1, Ordering::Relaxed);
            let prints: Vec<String> = pairs
                .iter()
                .filter_map(|p| {
                    let der = CertificateDer::pem_file_iter(&p.cert).ok()?.next()?.ok()?;
                    Some(fingerprint(&der))
                })
                .collect();
            tracing::info!(why, fingerprints = ?prints, "TLS certificates reloaded");
            true
        }
        Err(e) => {
            TLS_RELOAD_FAILURES.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(why, error = %format!("{e:#}"), "TLS certificates not reloaded; the previous ones stay in use");
            false
        }
    }
}

/// Reloads the certificates into `swap` on SIGHUP and when a file changes (checked every
/// `every`).
pub fn spawn_every(
    pairs: Vec<CertPair>,
    swap: Arc<ArcSwap<rustls::ServerConfig>>,
    every: Duration,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot watch SIGHUP")?;
    // What was loaded is what the files are now: a change right after this call is
    // noticed, whenever the task first runs.
    let mut seen = stamps(&pairs);
    Ok(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A change is loaded once the files have stayed the same for one check: a
        // renewal that writes the certificate, then the key, is loaded once, whole.
        let mut settling: Option<Vec<_>> = None;
        loop {
            let why = tokio::select! {
                _ = hup.recv() => "SIGHUP",
                _ = tick.tick() => {
                    let now = stamps(&pairs);
                    if now == seen {
                        settling = None;
                        continue;
                    }
                    if settling.as_ref() != Some(&now) {
                        settling = Some(now);
                        continue;
                    }
                    "files changed"
                }
            };
            settling = None;
            seen = stamps(&pairs);
            reload(&pairs, &swap, why);
        }
    }))
}

/// [`spawn_every`] with a 2-second check of the files.
pub fn spawn(
    pairs: Vec<CertPair>,
    swap: Arc<ArcSwap<rustls::ServerConfig>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    spawn_every(pairs, swap, Duration::from_secs(2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConnection};

    /// A CA and leaf certificates it signs, as PEM files in a fresh directory.
    struct Pki {
        dir: PathBuf,
        ca: rcgen::Issuer<'static, rcgen::KeyPair>,
        ca_pem: String,
    }

    impl Pki {
        fn new(tag: &str) -> Pki {
            let dir = std::env::temp_dir().join(format!(
                "turnpike-tls-{tag}-{}-{}",
                std::process::id(),
                rand::random::<u32>()
            ));
            std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new())
                .unwrap_or_else(|e| panic!("{e}"));
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
            let cert = p.self_signed(&key).unwrap_or_else(|e| panic!("{e}"));
            Pki {
                dir,
                ca_pem: cert.pem(),
                ca: rcgen::Issuer::new(p, key),
            }
        }

        /// A leaf for `names` written as `file.pem`/`file.key`.
        fn leaf(&self, file: &str, names: &[&str]) -> CertPair {
            let p = rcgen::CertificateParams::new(
                names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
            let cert = p
                .signed_by(&key, &self.ca)
                .unwrap_or_else(|e| panic!("{e}"));
            let pair = CertPair {
                cert: self.dir.join(format!("{file}.pem")),
                key: self.dir.join(format!("{file}.key")),
            };
            std::fs::write(&pair.cert, cert.pem()).unwrap_or_else(|e| panic!("{e}"));
            std::fs::write(&pair.key, key.serialize_pem()).unwrap_or_else(|e| panic!("{e}"));
            pair
        }

        fn client(
            &self,
            versions: &[&'static rustls::SupportedProtocolVersion],
            alpn: &[&[u8]],
        ) -> Arc<ClientConfig> {
            let mut roots = RootCertStore::empty();
            let der = CertificateDer::from_pem_slice(self.ca_pem.as_bytes())
                .unwrap_or_else(|e| panic!("{e}"));
            roots.add(der).unwrap_or_else(|e| panic!("{e}"));
            let mut c = ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(versions)
                .unwrap_or_else(|e| panic!("{e}"))
                .with_root_certificates(roots)
                .with_no_client_auth();
            c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
            Arc::new(c)
        }
    }

    impl Drop for Pki {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Runs a handshake in memory; the client's view of it, or the first error.
    fn handshake(
        client: Arc<ClientConfig>,
        name: &str,
        server: Arc<rustls::ServerConfig>,
    ) -> Result<ClientConnection, rustls::Error> {
        let name = ServerName::try_from(name.to_owned()).unwrap_or_else(|e| panic!("{e}"));
        let mut c = ClientConnection::new(client, name)?;
        let mut s = ServerConnection::new(server)?;
        for _ in 0..20 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap_or_else(|e| panic!("{e}"));
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap_or_else(|e| panic!("{e}"));
            }
            let server_result = s.process_new_packets();
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap_or_else(|e| panic!("{e}"));
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap_or_else(|e| panic!("{e}"));
            }
            c.process_new_packets()?;
            server_result?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(c);
            }
        }
        panic!("handshake did not finish");
    }

    fn leaf_der(c: &ClientConnection) -> Vec<u8> {
        c.peer_certificates()
            .and_then(|p| p.first())
            .map(|d| d.to_vec())
            .unwrap_or_default()
    }

    fn pem_der(p: &Path) -> Vec<u8> {
        CertificateDer::pem_file_iter(p)
            .ok()
            .and_then(|mut i| i.next())
            .and_then(Result::ok)
            .map(|d| d.to_vec())
            .unwrap_or_default()
    }

    #[test]
    fn tls12_tls13_alpn_and_no_alpn() {
        let pki = Pki::new("versions");
        let pair = pki.leaf("turn", &["turn.test"]);
        let server = load(std::slice::from_ref(&pair)).unwrap_or_else(|e| panic!("{e:#}"));
        for v in [&rustls::version::TLS12, &rustls::version::TLS13] {
            let c = handshake(pki.client(&[v], &[ALPN_TURN]), "turn.test", server.clone())
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(c.protocol_version(), Some(v.version));
            assert_eq!(c.alpn_protocol(), Some(ALPN_TURN));
            let c = handshake(pki.client(&[v], &[]), "turn.test", server.clone())
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(c.alpn_protocol(), None);
        }
    }

    #[test]
    fn sni_picks_the_matching_certificate_else_the_first() {
        let pki = Pki::new("sni");
        let a = pki.leaf("a", &["a.test"]);
        let b = pki.leaf("b", &["*.b.test"]);
        let server = load(&[a.clone(), b.clone()]).unwrap_or_else(|e| panic!("{e:#}"));
        let client = pki.client(&[&rustls::version::TLS13], &[]);
        let got =
            |name: &str| handshake(client.clone(), name, server.clone()).map(|c| leaf_der(&c));
        assert_eq!(got("a.test").ok(), Some(pem_der(&a.cert)));
        assert_eq!(got("x.b.test").ok(), Some(pem_der(&b.cert)));
        // Unknown name: the default (first) certificate, which the client then refuses.
        assert!(got("c.test").is_err());
    }

    #[test]
    fn a_wrong_name_fails_verification_and_a_foreign_key_is_refused() {
        let pki = Pki::new("wrong");
        let pair = pki.leaf("turn", &["turn.test"]);
        let server = load(std::slice::from_ref(&pair)).unwrap_or_else(|e| panic!("{e:#}"));
        let client = pki.client(&[&rustls::version::TLS13], &[]);
        assert!(handshake(client, "other.test", server).is_err());
        let other = pki.leaf("other", &["turn.test"]);
        let mixed = CertPair {
            cert: pair.cert.clone(),
            key: other.key.clone(),
        };
        let e = load(&[mixed])
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(e.contains("does not belong"), "{e}");
        let e = load(&[CertPair {
            cert: pki.dir.join("missing.pem"),
            key: pair.key.clone(),
        }])
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
        assert!(e.contains("missing.pem"), "{e}");
    }

    #[test]
    fn reload_swaps_for_new_handshakes_and_keeps_the_old_on_failure() {
        let pki = Pki::new("reload");
        let pair = pki.leaf("turn", &["turn.test"]);
        let first = pem_der(&pair.cert);
        let swap =
            ArcSwap::new(load(std::slice::from_ref(&pair)).unwrap_or_else(|e| panic!("{e:#}")));
        let client = pki.client(&[&rustls::version::TLS13], &[]);
        let before = swap.load_full();
        // New files in place (as a certificate renewal writes them).
        let _ = pki.leaf("turn", &["turn.test"]);
        let second = pem_der(&pair.cert);
        assert_ne!(first, second);
        assert!(reload(std::slice::from_ref(&pair), &swap, "test"));
        let c = handshake(client.clone(), "turn.test", swap.load_full())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(leaf_der(&c), second);
        // A session made with the configuration from before keeps it.
        let c = handshake(client.clone(), "turn.test", before).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(leaf_der(&c), first);
        // A broken file: the current configuration stays.
        std::fs::write(&pair.key, "not a key").unwrap_or_else(|e| panic!("{e}"));
        assert!(!reload(std::slice::from_ref(&pair), &swap, "test"));
        let c = handshake(client, "turn.test", swap.load_full()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(leaf_der(&c), second);
    }

    #[tokio::test]
    async fn a_changed_file_is_noticed() {
        let pki = Pki::new("watch");
        let pair = pki.leaf("turn", &["turn.test"]);
        let swap = Arc::new(ArcSwap::new(
            load(std::slice::from_ref(&pair)).unwrap_or_else(|e| panic!("{e:#}")),
        ));
        let before = swap.load_full();
        let task = spawn_every(vec![pair.clone()], swap.clone(), Duration::from_millis(50))
            .unwrap_or_else(|e| panic!("{e:#}"));
        tokio::time::sleep(Duration::from_millis(120)).await;
        // Replaced by rename, as tools that write atomically do.
        let tmp = pki.leaf("tmp", &["turn.test"]);
        std::fs::rename(&tmp.key, &pair.key).unwrap_or_else(|e| panic!("{e}"));
        std::fs::rename(&tmp.cert, &pair.cert).unwrap_or_else(|e| panic!("{e}"));
        let mut changed = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if !Arc::ptr_eq(&before, &swap.load_full()) {
                changed = true;
                break;
            }
        }
        task.abort();
        assert!(changed, "the new files were not loaded");
    }

    #[test]
    fn self_signed_has_the_names_and_a_fingerprint() {
        let s = self_signed(&["localhost".into(), "127.0.0.1".into()])
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(s.sha256_fingerprint.len(), 32 * 3 - 1);
        let cfg = from_pem(&s.cert_pem, &s.key_pem).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(cfg.alpn_protocols, vec![ALPN_TURN.to_vec()]);
    }
}
