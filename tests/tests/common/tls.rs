//! TURN over TLS from the client side: a test CA issuing server certificates (written to
//! files the server loads), and a rustls client that verifies them.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, StreamOwned, SupportedProtocolVersion,
};

use super::stream::{POLL, TurnStream};

/// The name the test server certificates carry.
pub const SERVER_NAME: &str = "turn.test";
/// The ALPN protocol of TURN (RFC 7443).
pub const ALPN: &[u8] = b"stun.turn";

/// TURN over a rustls client session on a TCP connection.
pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// A CA for one test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (the client's only trust anchor).
    pub cert: CertificateDer<'static>,
    /// The same, PEM (for programs that read a CA file).
    pub cert_pem: String,
}

/// A server certificate and its key, PEM, and the certificate's DER.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "turnpike test CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

impl TestCa {
    pub fn new() -> TestCa {
        let key = KeyPair::generate().unwrap();
        let cert = ca_params().self_signed(&key).unwrap();
        TestCa {
            cert: cert.der().clone(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(ca_params(), key),
        }
    }

    /// A server certificate for `name` with a fresh key and serial `serial`.
    pub fn issue(&self, name: &str, serial: u64) -> Leaf {
        let mut p = CertificateParams::new(vec![name.to_owned()]).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        p.distinguished_name = dn;
        p.serial_number = Some(SerialNumber::from(serial));
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }
}

/// A server certificate and key in files of a temporary directory (removed on drop).
pub struct CertFiles {
    dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    pub fn write(tag: &str, leaf: &Leaf) -> CertFiles {
        let dir = std::env::temp_dir().join(format!("turnpike-tls-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let files = CertFiles {
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            dir,
        };
        files.replace(leaf);
        files
    }

    /// Replaces both files, each by a rename (a reader never sees half a file).
    pub fn replace(&self, leaf: &Leaf) {
        for (path, text) in [(&self.cert, &leaf.cert_pem), (&self.key, &leaf.key_pem)] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
    }

    pub fn cert_str(&self) -> &str {
        self.cert.to_str().unwrap()
    }

    pub fn key_str(&self) -> &str {
        self.key.to_str().unwrap()
    }
}

impl Drop for CertFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A client configuration trusting only `ca`, limited to `versions` (all if empty),
/// offering `alpn` if given.
pub fn client_config(
    ca: &CertificateDer<'static>,
    versions: &[&'static SupportedProtocolVersion],
    alpn: Option<&[u8]>,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider);
    let builder = if versions.is_empty() {
        builder.with_safe_default_protocol_versions()
    } else {
        builder.with_protocol_versions(versions)
    };
    let mut cfg = builder
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    if let Some(p) = alpn {
        cfg.alpn_protocols = vec![p.to_vec()];
    }
    Arc::new(cfg)
}

/// Connects to `addr` and completes a TLS handshake for `name` (bounded in time);
/// an error if the handshake fails (certificate verification included).
pub fn connect(addr: SocketAddr, cfg: Arc<ClientConfig>, name: &str) -> io::Result<TlsStream> {
    let mut sock = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    sock.set_write_timeout(Some(Duration::from_secs(10)))?;
    let server_name = ServerName::try_from(name.to_owned())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut conn = ClientConnection::new(cfg, server_name)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)?;
    }
    sock.set_read_timeout(Some(POLL))?;
    Ok(StreamOwned::new(conn, sock))
}

/// TURN over TLS to `addr`, verifying [`SERVER_NAME`].
pub fn turn_tls(
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
    user: &str,
    password: &str,
) -> TurnStream<TlsStream> {
    let io = connect(addr, cfg, SERVER_NAME)
        .unwrap_or_else(|e| panic!("TLS handshake with {addr}: {e}"));
    TurnStream::over(io, user, password)
}
