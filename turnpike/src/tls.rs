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
    /// A control plane: server authentication (and client, for symmetry).
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
            Role::ControlPlane => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
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

/// `serve`'s in-memory certificates: the control plane's server identity and the data
/// plane's client identity, both under a CA made now and forgotten.
pub fn ephemeral() -> anyhow::Result<(Pems, Pems)> {
    let ca = Ca::generate()?;
    let cp = ca.issue(
        Role::ControlPlane,
        CONTROL_PLANE_NAME,
        &[
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ],
    )?;
    let dp = ca.issue(Role::DataPlane, "turnpike-dataplane-local", &[])?;
    Ok((cp, dp))
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
            ca.issue(Role::DataPlane, &format!("turnpike-dataplane-{id}"), &[])?,
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
