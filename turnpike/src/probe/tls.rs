//! The TLS side of the probe: which roots to trust, a verifier that keeps the
//! certificate chain it was shown (so that a refused certificate is still described),
//! the classification of a failed handshake into the check it failed, and what the
//! leaf certificate says (names, days to expiry).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// The ALPN protocol id of TURN (RFC 7443).
pub const ALPN_TURN: &[u8] = b"stun.turn";

/// Where Debian, Fedora, Alpine and others keep the system's CA bundle.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Whom the probe trusts.
#[derive(Debug, Clone)]
pub enum Trust {
    /// The system's CA bundle (`SSL_CERT_FILE`, else the distribution's usual file).
    System,
    /// Only the CAs in this PEM file (`--ca`).
    File(PathBuf),
    /// Nothing is verified but signatures (`--insecure`): reported as a warning.
    Insecure,
}

/// The certificate chain the server showed, as the verifier saw it.
pub type SeenChain = Arc<Mutex<Vec<CertificateDer<'static>>>>;

fn load_pem(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not PEM", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{} holds no certificate", path.display());
    Ok(certs)
}

/// The roots for `trust` (empty for [`Trust::Insecure`]) and where they came from.
pub fn roots(trust: &Trust) -> anyhow::Result<(RootCertStore, String)> {
    let (certs, from) = match trust {
        Trust::Insecure => return Ok((RootCertStore::empty(), "none (--insecure)".into())),
        Trust::File(p) => (load_pem(p)?, p.display().to_string()),
        Trust::System => {
            let env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
            let path = env
                .into_iter()
                .chain(SYSTEM_BUNDLES.iter().map(PathBuf::from))
                .find(|p| p.is_file())
                .context(
                    "no system CA bundle found (SSL_CERT_FILE, /etc/ssl/certs/ca-certificates.crt, ...): \
                     give the server's CA with --ca FILE",
                )?;
            (load_pem(&path)?, path.display().to_string())
        }
    };
    let mut store = RootCertStore::empty();
    let (added, _ignored) = store.add_parsable_certificates(certs);
    anyhow::ensure!(added > 0, "no usable CA certificate in {from}");
    Ok((store, from))
}

/// Verifies as rustls's WebPKI verifier does (or not at all, insecure), remembering the
/// chain it was shown.
#[derive(Debug)]
struct Recording {
    inner: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
    seen: SeenChain,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut seen) = self.seen.lock() {
            *seen = std::iter::once(end_entity)
                .chain(intermediates)
                .map(|c| c.clone().into_owned())
                .collect();
        }
        match &self.inner {
            Some(v) => {
                v.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            None => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client configuration offering ALPN `stun.turn`, and the slot its verifier writes
/// the server's chain into.
pub fn client_config(trust: &Trust) -> anyhow::Result<(Arc<ClientConfig>, SeenChain, String)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (store, from) = roots(trust)?;
    let inner = match trust {
        Trust::Insecure => None,
        _ => Some(
            WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
                .build()
                .context("cannot build the certificate verifier")?,
        ),
    };
    let seen = SeenChain::default();
    let verifier = Arc::new(Recording {
        inner,
        provider: provider.clone(),
        seen: seen.clone(),
    });
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("no TLS protocol version")?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_TURN.to_vec()];
    Ok((Arc::new(cfg), seen, from))
}

/// The name to verify and send as SNI: a DNS name, or an IP address.
pub fn server_name(name: &str) -> anyhow::Result<ServerName<'static>> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(name.to_owned()).map_err(|e| anyhow::anyhow!("{name:?}: {e}"))
}

/// Which check a failed handshake failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFailure {
    /// The chain does not lead to a trusted root (or is badly signed, or unusable).
    Chain,
    /// The certificate does not name the server.
    Name,
    /// The certificate has expired or is not valid yet.
    Expiry,
    /// The handshake failed for another reason (protocol, alert, connection).
    Handshake,
}

/// Classifies the error of a failed handshake.
pub fn classify(e: &std::io::Error) -> TlsFailure {
    let Some(err) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return TlsFailure::Handshake;
    };
    match err {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                TlsFailure::Name
            }
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => TlsFailure::Expiry,
            _ => TlsFailure::Chain,
        },
        _ => TlsFailure::Handshake,
    }
}

/// What the leaf certificate says.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CertInfo {
    /// Its subject (RFC 4514 form).
    pub subject: String,
    /// Its issuer.
    pub issuer: String,
    /// DNS names and IP addresses in its subjectAltName.
    pub names: Vec<String>,
    /// notAfter, RFC 3339-ish (UTC).
    pub not_after: String,
    /// Whole days from now to notAfter (negative: expired).
    pub days_to_expiry: i64,
    /// Certificates the server sent (the leaf and its intermediates).
    pub chain_len: usize,
}

/// Describes the leaf of `chain` at unix time `now_secs`; `None` if it does not parse.
pub fn describe(chain: &[CertificateDer<'_>], now_secs: i64) -> Option<CertInfo> {
    use x509_parser::extensions::GeneralName;
    let leaf = chain.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let names = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some((*d).to_owned()),
                    GeneralName::IPAddress(b) => match b.len() {
                        4 => <[u8; 4]>::try_from(*b)
                            .ok()
                            .map(|a| IpAddr::from(a).to_string()),
                        16 => <[u8; 16]>::try_from(*b)
                            .ok()
                            .map(|a| IpAddr::from(a).to_string()),
                        _ => None,
                    },
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let not_after = cert.validity().not_after;
    let secs_left = not_after.timestamp() - now_secs;
    Some(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        names,
        not_after: not_after
            .to_rfc2822()
            .unwrap_or_else(|_| not_after.timestamp().to_string()),
        days_to_expiry: secs_left.div_euclid(86_400),
        chain_len: chain.len(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn describes_a_leaf_and_counts_days() {
        let mut p = rcgen::CertificateParams::new(vec!["turn.test".to_owned()]).unwrap();
        p.subject_alt_names
            .push(rcgen::SanType::IpAddress("192.0.2.7".parse().unwrap()));
        p.not_after = rcgen::date_time_ymd(2030, 1, 31);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        // 2030-01-01T00:00:00Z: 30 days before notAfter.
        let info = describe(&[cert.der().clone()], 1_893_456_000).unwrap();
        assert_eq!(info.names, vec!["turn.test", "192.0.2.7"]);
        assert_eq!(info.days_to_expiry, 30);
        assert_eq!(info.chain_len, 1);
        assert!(describe(&[], 0).is_none());
    }

    #[test]
    fn names_are_dns_or_ip() {
        assert!(matches!(
            server_name("127.0.0.1").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("turn.example").unwrap(),
            ServerName::DnsName(_)
        ));
        assert!(server_name("bad name!").is_err());
    }
}
