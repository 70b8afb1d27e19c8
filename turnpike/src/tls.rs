//! Certificates for the gRPC ports: mutual TLS between the planes, TLS for Admin.
//!
//! A fleet's certificates come from files (`grpc_ca`, `grpc_cert`, `grpc_key`), made with
//! `turnpike ctl certs` or any PKI. `serve` without them makes a CA and both planes'
//! certificates in memory at start: its stream runs over loopback inside one process,
//! and nothing else can attach (no one else has that CA's key).

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use turnpike_controlplane_runtime::service::DATA_PLANE_PREFIX;

/// The name the control plane's certificate carries and data planes check, unless the
/// control plane's address is a name of its own (then that name, or an IP SAN).
pub const CONTROL_PLANE_NAME: &str = "turnpike-controlplane";
/// The CA's distinguished name: fixed, so that `ctl certs` can issue more certificates
/// later from the CA key alone.
const CA_NAME: &str = "turnpike fleet CA";

/// PEM text of a CA, and one certificate and key signed by it.
#[derive(Clone)]
pub struct Pems {
    /// The CA certificate (trust anchor for both sides).
    pub ca: String,
    /// This side's certificate chain.
    pub cert: String,
    /// This side's private key.
    pub key: String,
}

impl std::fmt::Debug for Pems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pems { .. }")
    }
}

impl Pems {
    /// Reads the three files.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<Pems> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
        };
        Ok(Pems {
            ca: read(ca)?,
            cert: read(cert)?,
            key: read(key)?,
        })
    }

    /// The server side: our identity; client certificates are verified against the CA
    /// when presented. They are optional at the TLS layer so that an Admin caller may use
    /// a token instead; the ControlPlane service refuses a stream without one.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
            .client_auth_optional(true)
            .timeout(std::time::Duration::from_secs(5))
    }

    /// The client side: verify the server against the CA (by `domain`) and present our
    /// identity.
    pub fn client(&self, domain: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
            .domain_name(domain)
    }
}

/// A CA that can sign certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// The CA key, PEM (written once by `ctl certs`; `serve` never writes it).
    key_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ca { .. }")
    }
}

fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_after = rcgen::date_time_ymd(2046, 1, 1);
    Ok(p)
}

/// Which side a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A control plane: server authentication only. Nothing presents it as a client
    /// (`serve`'s own data plane gets a data-plane certificate), and a stolen one must
    /// not be able to attach as a data plane.
    ControlPlane,
    /// A data plane: client authentication.
    DataPlane,
}

impl Ca {
    /// A new CA with a fresh key.
    pub fn generate() -> anyhow::Result<Ca> {
        let key = KeyPair::generate()?;
        let cert = ca_params()?.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(ca_params()?, key),
        })
    }

    /// The CA of `ca.pem` and `ca.key` in `dir`, made earlier by [`Ca::generate`].
    pub fn load(dir: &Path) -> anyhow::Result<Ca> {
        let cert_pem = std::fs::read_to_string(dir.join("ca.pem"))
            .with_context(|| format!("cannot read {}/ca.pem", dir.display()))?;
        let key_pem = std::fs::read_to_string(dir.join("ca.key"))
            .with_context(|| format!("cannot read {}/ca.key", dir.display()))?;
        let key = KeyPair::from_pem(&key_pem).context("ca.key is not a PEM private key")?;
        Ok(Ca {
            cert_pem,
            key_pem: String::new(),
            issuer: Issuer::new(ca_params()?, key),
        })
    }

    /// A leaf certificate for `name` (its common name and first SAN), with extra SANs
    /// (DNS names or IPs).
    pub fn issue(&self, role: Role, name: &str, sans: &[String]) -> anyhow::Result<Pems> {
        let mut names = vec![name.to_owned()];
        names.extend(sans.iter().cloned());
        let mut p = CertificateParams::new(names)
            .with_context(|| format!("{name:?} is not a valid certificate name"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        p.distinguished_name = dn;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = match role {
            Role::ControlPlane => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Role::DataPlane => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        p.not_after = rcgen::date_time_ymd(2036, 1, 1);
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok(Pems {
            ca: self.cert_pem.clone(),
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

/// `serve`'s in-memory certificate for a `--grpc-listen` without the fleet's files: the
/// control plane's server identity under a CA made now and forgotten (no data plane can
/// attach there; `serve`'s own is attached in process).
pub fn ephemeral() -> anyhow::Result<Pems> {
    let ca = Ca::generate()?;
    ca.issue(
        Role::ControlPlane,
        CONTROL_PLANE_NAME,
        &[
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ],
    )
}

/// The certificate name of data plane `id`.
pub fn data_plane_name(id: &str) -> String {
    format!("{DATA_PLANE_PREFIX}{id}")
}

/// The data-plane id a certificate (PEM chain, the leaf first) names: its first DNS
/// name `turnpike-dataplane-ID`, else its first DNS name, else its common name. `None`
/// if the PEM holds no certificate or the certificate no name.
pub fn data_plane_id_of(cert_pem: &str) -> Option<String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let dns: Vec<&str> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(*d),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if let Some(id) = dns.iter().find_map(|d| d.strip_prefix(DATA_PLANE_PREFIX)) {
        return Some(id.to_owned());
    }
    if let Some(d) = dns.first() {
        return Some((*d).to_owned());
    }
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(cn.strip_prefix(DATA_PLANE_PREFIX).unwrap_or(cn).to_owned())
}

/// What `ctl certs` writes: a CA (unless `dir` has one: then more certificates from
/// it), a control-plane certificate with `sans`, and one per data plane id.
pub fn write_set(
    dir: &Path,
    sans: &[String],
    data_planes: &[String],
) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ca = if dir.join("ca.key").exists() {
        Ca::load(dir)?
    } else {
        let ca = Ca::generate()?;
        write(dir, "ca.pem", &ca.cert_pem, false)?;
        write(dir, "ca.key", &ca.key_pem, true)?;
        ca
    };
    let mut written = vec![dir.join("ca.pem")];
    let mut emit = |base: &str, p: Pems| -> anyhow::Result<()> {
        write(dir, &format!("{base}.pem"), &p.cert, false)?;
        write(dir, &format!("{base}.key"), &p.key, true)?;
        written.push(dir.join(format!("{base}.pem")));
        Ok(())
    };
    let mut cp_sans = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    cp_sans.extend(sans.iter().cloned());
    emit(
        "controlplane",
        ca.issue(Role::ControlPlane, CONTROL_PLANE_NAME, &cp_sans)?,
    )?;
    for id in data_planes {
        emit(
            &format!("dataplane-{id}"),
            ca.issue(Role::DataPlane, &data_plane_name(id), &[])?,
        )?;
    }
    Ok(written)
}

fn write(dir: &Path, name: &str, text: &str, secret: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join(name);
    let mode = if secret { 0o600 } else { 0o644 };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::server::WebPkiClientVerifier;

    use super::*;

    fn der(pem: &str) -> CertificateDer<'static> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        CertificateDer::from(p.contents)
    }

    /// Issue 25, N10: the control plane's certificate authenticates a server and cannot
    /// be presented as a client (a data plane); a data plane's is the reverse.
    #[test]
    fn control_plane_certificate_is_for_servers_only() {
        let dir = std::env::temp_dir().join(format!("turnpike-eku-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write_set(&dir, &[], &["dp1".to_owned()]).unwrap();
        let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap();
        let (ca, cp, dp) = (
            der(&read("ca.pem")),
            der(&read("controlplane.pem")),
            der(&read("dataplane-dp1.pem")),
        );
        let _ = std::fs::remove_dir_all(&dir);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).unwrap();
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let clients = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .unwrap();
        let servers = WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .unwrap();
        let now = UnixTime::now();
        let name = ServerName::try_from(CONTROL_PLANE_NAME).unwrap();
        assert!(
            servers
                .verify_server_cert(&cp, &[], &name, &[], now)
                .is_ok()
        );
        let as_client = clients.verify_client_cert(&cp, &[], now);
        assert!(
            as_client.is_err(),
            "the control-plane certificate passes as a client certificate"
        );
        assert!(clients.verify_client_cert(&dp, &[], now).is_ok());
        let dp_name = ServerName::try_from("turnpike-dataplane-dp1").unwrap();
        assert!(
            servers
                .verify_server_cert(&dp, &[], &dp_name, &[], now)
                .is_err()
        );
    }

    #[test]
    fn a_data_plane_id_is_read_from_its_certificate() {
        let ca = Ca::generate().unwrap();
        let dp = ca
            .issue(Role::DataPlane, &data_plane_name("dp7"), &[])
            .unwrap();
        assert_eq!(data_plane_id_of(&dp.cert).as_deref(), Some("dp7"));
        let other = ca.issue(Role::DataPlane, "edge-3.example", &[]).unwrap();
        assert_eq!(
            data_plane_id_of(&other.cert).as_deref(),
            Some("edge-3.example")
        );
        assert_eq!(data_plane_id_of("not a certificate"), None);
    }
}
