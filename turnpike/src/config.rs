//! Configuration: a TOML file, `TURNPIKE_*` environment variables and flags, in rising
//! order of precedence. Every option has a default; see `deploy/turnpike.toml`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Args;
use serde::Deserialize;
use turnpike_controlplane::{Cidr, PeerPolicy, ServerConfig};
use turnpike_dataplane::{Backend, FrontListen, StreamLimits, StreamListen, WebRules};
use turnpike_plane::{RelayIp, advertised_addr};

/// A configuration error: the option it concerns and what is wrong. Exit code 64.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {option}: {message}")]
pub struct ConfigError {
    /// The option, as spelled in the config file (flag in parentheses).
    pub option: String,
    /// What is wrong.
    pub message: String,
}

fn err(option: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        option: option.to_owned(),
        message: message.into(),
    }
}

/// The file form. Unknown keys are an error, so typos do not pass silently.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// UDP listening addresses.
    pub listen: Option<Vec<String>>,
    /// Relay IPs.
    pub relay_ips: Option<Vec<String>>,
    /// Behind a 1:1 NAT: "PUBLIC/PRIVATE" per relay IP (or "PUBLIC" when one relay IP of
    /// that family exists), the address clients are given for a private relay IP.
    pub external_ips: Option<Vec<String>>,
    /// NAT behaviour discovery (RFC 5780): the server's second IP address.
    pub alt_ip: Option<String>,
    /// Relay port range "MIN-MAX".
    pub relay_ports: Option<String>,
    /// Realm.
    pub realm: Option<String>,
    /// Static users, "name:password".
    pub users: Option<Vec<String>>,
    /// TURN REST API shared secrets, newest first.
    pub auth_secrets: Option<Vec<String>>,
    /// Peer ranges allowed despite the default deny list.
    pub allow_peers: Option<Vec<String>>,
    /// Peer ranges always denied.
    pub deny_peers: Option<Vec<String>>,
    /// Worker threads, 0 = one per core.
    pub workers: Option<usize>,
    /// auto | uring | mmsg.
    pub io_backend: Option<String>,
    /// gRPC listening address (control plane: ControlPlane and Admin services).
    pub grpc_listen: Option<String>,
    /// Prometheus metrics listening address.
    pub metrics_listen: Option<String>,
    /// Default allocation lifetime (s).
    pub default_lifetime: Option<u32>,
    /// Maximum allocation lifetime (s).
    pub max_lifetime: Option<u32>,
    /// Nonce lifetime (s).
    pub nonce_lifetime: Option<u32>,
    /// Allocations per user, 0 = unlimited.
    pub user_quota: Option<u32>,
    /// Allocations in all, 0 = unlimited.
    pub total_quota: Option<u32>,
    /// Bytes per second per allocation and direction, 0 = unlimited.
    pub bandwidth_limit: Option<u64>,
    /// Unauthenticated requests per second per client address (IP:port), 0 = unlimited
    /// (and no per-IP cap either).
    pub unauth_rate: Option<u32>,
    /// Unauthenticated requests per second per source IP, all ports together (many
    /// clients behind one NAT share it), 0 = unlimited.
    pub unauth_ip_rate: Option<u32>,
    /// Pin workers to cores.
    pub pin_workers: Option<bool>,
    /// Data-plane identity (split mode). Its certificate must name it (a DNS name
    /// `turnpike-dataplane-ID` or `ID`); by default it is read from the certificate.
    pub data_plane_id: Option<String>,
    /// Accept RFC 5766 channel numbers 0x5000..=0x7FFF.
    pub legacy_channel_numbers: Option<bool>,
    /// Relay sockets each data-plane worker keeps bound in advance per relay IP, so that
    /// an Allocate needs no bind round trip; 0 turns the pool off.
    pub relay_pool: Option<usize>,
    /// The fleet CA (PEM) that signs every plane's certificate.
    pub grpc_ca: Option<PathBuf>,
    /// This process's certificate chain (PEM) for the planes' mutual TLS.
    pub grpc_cert: Option<PathBuf>,
    /// This process's private key (PEM).
    pub grpc_key: Option<PathBuf>,
    /// The name data planes expect in the control plane's certificate.
    pub grpc_server_name: Option<String>,
    /// Admin listening address (default: the gRPC port in `controlplane`, 127.0.0.1:3479
    /// in `serve`).
    pub admin_listen: Option<String>,
    /// Admin bearer token.
    pub admin_token: Option<String>,
    /// File holding the Admin bearer token (first line).
    pub admin_token_file: Option<PathBuf>,
    /// Connections open at once per gRPC, Admin or metrics listener.
    pub max_connections: Option<usize>,
    /// Seconds without a byte from a gRPC, Admin or metrics client before its
    /// connection is closed.
    pub idle_timeout: Option<u64>,
    /// Connections open at once per source (IPv4 address, IPv6 /64) on each gRPC, Admin
    /// or metrics listener.
    pub max_connections_per_ip: Option<usize>,
    /// Seconds a gRPC, Admin or metrics client may take to send its first byte.
    pub first_byte_timeout: Option<u64>,
    /// TURN over TCP listening addresses (default: the UDP ones, same ports).
    pub listen_tcp: Option<Vec<String>>,
    /// TURN over TLS listening addresses (default when a certificate is configured:
    /// the UDP IPs, port 5349).
    pub listen_tls: Option<Vec<String>>,
    /// No TCP listener by default.
    pub no_tcp: Option<bool>,
    /// TCP/TLS listening addresses whose connections start with a PROXY protocol
    /// header (v1 or v2; behind an L4 load balancer).
    pub proxy_protocol: Option<Vec<String>>,
    /// TURN over TLS certificates.
    pub tls: Option<TlsFile>,
    /// Client connections (TCP and TLS).
    pub streams: Option<StreamsFile>,
    /// Seconds SIGTERM drains before the process exits (0: exit at once).
    pub drain_grace: Option<u64>,
    /// Batches of table changes queued from the control plane towards each data plane.
    pub plane_queue: Option<usize>,
    /// Network interfaces to attach the XDP fast path to.
    pub xdp: Option<Vec<String>>,
    /// XDP attach mode: "native", "generic" or "auto".
    pub xdp_mode: Option<String>,
    /// `[fleet]`: coordination with the other instances through etcd.
    pub fleet: Option<FleetFile>,
    /// `[front_door]`: the TURN listeners shared with a web server (off unless a
    /// backend is named).
    pub front_door: Option<FrontDoorFile>,
}

/// `[front_door]`: TURN and a web server on the same ports (443 and 80). With
/// `https_backend`, every TURN TLS listener routes each connection on its ClientHello:
/// ALPN `stun.turn` → TURN; SNI in `web_hosts` → web; ALPN in `web_alpn` → web;
/// anything else (no ALPN: browsers' TURNS) → TURN. With `http_backend`, every TURN TCP
/// listener routes HTTP/1.x requests to the web, STUN and ChannelData to TURN, and
/// closes the rest. Web connections are passed through without terminating TLS.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FrontDoorFile {
    /// Where HTTPS connections on the TLS listeners go (IP:PORT).
    pub https_backend: Option<String>,
    /// Where HTTP connections on the TCP listeners go (IP:PORT).
    pub http_backend: Option<String>,
    /// Send the backends a PROXY protocol v2 header with the client's address.
    pub proxy_protocol: Option<bool>,
    /// SNI names routed to the web (unless the client offers ALPN `stun.turn`).
    pub web_hosts: Option<Vec<String>>,
    /// ALPN protocols routed to the web (default `["h2", "http/1.1"]`).
    pub web_alpn: Option<Vec<String>>,
}

/// `[fleet]`: the fleet on etcd.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetFile {
    /// etcd endpoints (e.g. "http://10.0.0.1:2379").
    pub etcd: Option<Vec<String>>,
    /// The fleet's name: its key prefix in etcd.
    pub name: Option<String>,
    /// This instance's id in the fleet (default: the host name).
    pub instance_id: Option<String>,
    /// Region label: redirects stay within a region.
    pub region: Option<String>,
    /// Zone label.
    pub zone: Option<String>,
    /// The advertised name of this instance's TLS listener (the name its certificate is
    /// for, which resolves to its public address): sent as ALTERNATE-DOMAIN when another
    /// instance redirects a TLS client here.
    pub tls_domain: Option<String>,
    /// Redirect new allocations at or above this load (0 to 1).
    pub redirect_load: Option<f64>,
    /// Serve locally again at or below this load.
    pub resume_load: Option<f64>,
    /// The cell (split mode): its control planes elect a leader.
    pub cell: Option<String>,
    /// The URL data planes reach this control plane at.
    pub advertise_grpc: Option<String>,
}

/// One string or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// `[tls]`: certificate chains and keys (PEM), paired in order; with several, the one
/// whose names match the client's SNI is used, else the first.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsFile {
    /// Certificate chain file(s).
    pub cert: Option<OneOrMany>,
    /// Private key file(s).
    pub key: Option<OneOrMany>,
    /// Make a self-signed development certificate at start.
    pub self_signed: Option<bool>,
}

/// `[streams]`: limits of client connections.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamsFile {
    /// Connections open at once, all workers together.
    pub max_connections: Option<usize>,
    /// Connections open at once per client IP (0: no limit).
    pub max_per_ip: Option<usize>,
    /// Seconds a connection may stay without a live allocation.
    pub idle_timeout: Option<u64>,
    /// Seconds a TLS handshake or PROXY header may take.
    pub handshake_timeout: Option<u64>,
    /// Bytes queued towards one client at most (a slow client loses the newest
    /// relayed messages beyond it).
    pub send_buffer: Option<usize>,
}

/// The common flags (each also readable from `TURNPIKE_<NAME>`).
#[derive(Debug, Clone, Default, Args)]
pub struct Flags {
    /// Configuration file (TOML).
    #[arg(long, env = "TURNPIKE_CONFIG")]
    pub config: Option<PathBuf>,
    /// UDP listening address, repeatable (default 127.0.0.1:3478).
    #[arg(long = "listen", env = "TURNPIKE_LISTEN", value_delimiter = ',')]
    pub listen: Vec<String>,
    /// Relay IP, repeatable (default: the first listening IP). An address of this host:
    /// behind a 1:1 NAT, the private one (see --external-ip).
    #[arg(long = "relay-ip", env = "TURNPIKE_RELAY_IP", value_delimiter = ',')]
    pub relay_ip: Vec<String>,
    /// Behind a 1:1 NAT: PUBLIC/PRIVATE, the public address clients are given for the
    /// private relay IP PRIVATE (in XOR-RELAYED-ADDRESS, redirects and the fleet
    /// registry), repeatable; PUBLIC alone when there is one relay IP of its family.
    #[arg(
        long = "external-ip",
        env = "TURNPIKE_EXTERNAL_IP",
        value_delimiter = ','
    )]
    pub external_ip: Vec<String>,
    /// NAT behaviour discovery (RFC 5780): a second IP address of this host. Every UDP
    /// listening address IP:PORT of its family is joined by IP:PORT+1, ALT:PORT and
    /// ALT:PORT+1, which answer Binding requests only (as coturn's -o/--alt-listening-*).
    #[arg(long = "alt-ip", env = "TURNPIKE_ALT_IP")]
    pub alt_ip: Option<String>,
    /// Relay port range MIN-MAX (default 49152-65535).
    #[arg(long, env = "TURNPIKE_RELAY_PORTS")]
    pub relay_ports: Option<String>,
    /// Realm (default turnpike.local).
    #[arg(long, env = "TURNPIKE_REALM")]
    pub realm: Option<String>,
    /// Static user NAME:PASSWORD, repeatable.
    #[arg(long = "user", env = "TURNPIKE_USER", value_delimiter = ',')]
    pub user: Vec<String>,
    /// TURN REST API shared secret, repeatable (newest first).
    #[arg(
        long = "auth-secret",
        env = "TURNPIKE_AUTH_SECRET",
        value_delimiter = ','
    )]
    pub auth_secret: Vec<String>,
    /// Peer CIDR allowed despite the default deny list, repeatable.
    #[arg(
        long = "allow-peer",
        env = "TURNPIKE_ALLOW_PEER",
        value_delimiter = ','
    )]
    pub allow_peer: Vec<String>,
    /// Peer CIDR always denied, repeatable.
    #[arg(long = "deny-peer", env = "TURNPIKE_DENY_PEER", value_delimiter = ',')]
    pub deny_peer: Vec<String>,
    /// Worker threads (0: one per core).
    #[arg(long, env = "TURNPIKE_WORKERS")]
    pub workers: Option<usize>,
    /// I/O backend: auto, uring or mmsg.
    #[arg(long, env = "TURNPIKE_IO_BACKEND")]
    pub io_backend: Option<String>,
    /// gRPC listening address.
    #[arg(long, env = "TURNPIKE_GRPC_LISTEN")]
    pub grpc_listen: Option<String>,
    /// Prometheus metrics listening address.
    #[arg(long, env = "TURNPIKE_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Allocations per user (0: unlimited).
    #[arg(long, env = "TURNPIKE_USER_QUOTA")]
    pub user_quota: Option<u32>,
    /// Allocations in all (0: unlimited).
    #[arg(long, env = "TURNPIKE_TOTAL_QUOTA")]
    pub total_quota: Option<u32>,
    /// Bandwidth per allocation and direction, bytes/s (0: unlimited).
    #[arg(long, env = "TURNPIKE_BANDWIDTH_LIMIT")]
    pub bandwidth_limit: Option<u64>,
    /// Maximum allocation lifetime in seconds.
    #[arg(long, env = "TURNPIKE_MAX_LIFETIME")]
    pub max_lifetime: Option<u32>,
    /// Unauthenticated requests per second per client IP:port (default 20; 0: no limit
    /// at all).
    #[arg(long, env = "TURNPIKE_UNAUTH_RATE")]
    pub unauth_rate: Option<u32>,
    /// Unauthenticated requests per second per source IP over all its ports (default
    /// 200; 0: no per-IP cap).
    #[arg(long, env = "TURNPIKE_UNAUTH_IP_RATE")]
    pub unauth_ip_rate: Option<u32>,
    /// Do not pin workers to cores.
    #[arg(long, env = "TURNPIKE_NO_PIN")]
    pub no_pin: bool,
    /// Send datagrams from a client to another allocation's relayed address on the same
    /// worker out through the kernel, as before the hairpin (for comparison: the bench
    /// measures both); the XDP program's hairpin is not affected.
    #[arg(long, env = "TURNPIKE_NO_HAIRPIN")]
    pub no_hairpin: bool,
    /// Accept RFC 5766 channel numbers 0x5000-0x7FFF (older clients such as coturn's
    /// turnutils_uclient); RFC 8656 allows only 0x4000-0x4FFF.
    #[arg(long, env = "TURNPIKE_LEGACY_CHANNEL_NUMBERS")]
    pub legacy_channel_numbers: bool,
    /// Relay sockets each worker keeps bound in advance per relay IP (default 8; 0: off).
    #[arg(long, env = "TURNPIKE_RELAY_POOL")]
    pub relay_pool: Option<usize>,
    /// Fleet CA certificate (PEM) for the planes' mutual TLS (`turnpike ctl certs` makes
    /// one).
    #[arg(long, env = "TURNPIKE_GRPC_CA")]
    pub grpc_ca: Option<PathBuf>,
    /// This process's certificate (PEM) for the planes' mutual TLS.
    #[arg(long, env = "TURNPIKE_GRPC_CERT")]
    pub grpc_cert: Option<PathBuf>,
    /// This process's private key (PEM).
    #[arg(long, env = "TURNPIKE_GRPC_KEY")]
    pub grpc_key: Option<PathBuf>,
    /// The name expected in the control plane's certificate (default
    /// turnpike-controlplane).
    #[arg(long, env = "TURNPIKE_GRPC_SERVER_NAME")]
    pub grpc_server_name: Option<String>,
    /// Admin API listening address (default: the gRPC port for `controlplane`,
    /// 127.0.0.1:3479 for `serve`).
    #[arg(long, env = "TURNPIKE_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Admin API bearer token (default for `serve`: generated and printed).
    #[arg(long, env = "TURNPIKE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// File holding the Admin API bearer token.
    #[arg(long, env = "TURNPIKE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Log format: text (default) or json.
    #[arg(long, env = "TURNPIKE_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// TURN over TCP listening address, repeatable (default: every UDP listening
    /// address, same port).
    #[arg(
        long = "listen-tcp",
        env = "TURNPIKE_LISTEN_TCP",
        value_delimiter = ','
    )]
    pub listen_tcp: Vec<String>,
    /// TURN over TLS listening address, repeatable (default when a certificate is
    /// configured: every UDP listening IP, port 5349).
    #[arg(
        long = "listen-tls",
        env = "TURNPIKE_LISTEN_TLS",
        value_delimiter = ','
    )]
    pub listen_tls: Vec<String>,
    /// No TCP listener unless --listen-tcp names one.
    #[arg(long, env = "TURNPIKE_NO_TCP")]
    pub no_tcp: bool,
    /// TLS certificate chain (PEM), repeatable: paired in order with --tls-key; with
    /// several, SNI picks the one whose names match (else the first). Reloaded on SIGHUP
    /// and when the files change.
    #[arg(long = "tls-cert", env = "TURNPIKE_TLS_CERT", value_delimiter = ',')]
    pub tls_cert: Vec<PathBuf>,
    /// TLS private key (PEM), repeatable, paired with --tls-cert.
    #[arg(long = "tls-key", env = "TURNPIKE_TLS_KEY", value_delimiter = ',')]
    pub tls_key: Vec<PathBuf>,
    /// Make a self-signed TLS certificate at start (development only) and print its
    /// SHA-256 fingerprint.
    #[arg(long, env = "TURNPIKE_TLS_SELF_SIGNED")]
    pub tls_self_signed: bool,
    /// A TCP/TLS listening address whose connections start with a PROXY protocol v1/v2
    /// header (behind an L4 load balancer), repeatable.
    #[arg(
        long = "proxy-protocol",
        env = "TURNPIKE_PROXY_PROTOCOL",
        value_delimiter = ','
    )]
    pub proxy_protocol: Vec<String>,
    /// Seconds SIGTERM drains before exiting: no new allocations (redirected or 508),
    /// existing ones relay until they end or this passes (default 0: exit at once;
    /// SIGINT always exits at once).
    #[arg(long, env = "TURNPIKE_DRAIN_GRACE")]
    pub drain_grace: Option<u64>,
    /// Batches of table changes the control plane queues towards each data plane
    /// (default 8192). Beyond, a batch is dropped and the data plane gets it again (it
    /// sees the gap and asks, or the control plane sends again after 2 s of silence):
    /// nothing is lost for good. Small values are for tests.
    #[arg(long, env = "TURNPIKE_PLANE_QUEUE")]
    pub plane_queue: Option<usize>,
    /// Attach the XDP fast path to this network interface (repeatable): established
    /// UDP flows (IPv4, and IPv6) are relayed in the kernel before the socket layer. Off when
    /// the build has no program or the kernel refuses it (logged, and `ctl stats` says
    /// why).
    #[arg(long = "xdp", env = "TURNPIKE_XDP", value_delimiter = ',')]
    pub xdp: Vec<String>,
    /// How the XDP program is attached: native (in the driver), generic, or auto
    /// (native, else generic).
    #[arg(long = "xdp-mode", env = "TURNPIKE_XDP_MODE")]
    pub xdp_mode: Option<String>,
    /// Front door: HTTPS connections on the TURN TLS listeners are passed through (TLS
    /// not terminated) to this IP:PORT; TURN clients (ALPN `stun.turn`, or no ALPN) stay.
    #[arg(long = "https-backend", env = "TURNPIKE_HTTPS_BACKEND")]
    pub https_backend: Option<String>,
    /// Front door: HTTP/1.x connections on the TURN TCP listeners are passed through to
    /// this IP:PORT; STUN and ChannelData stay, anything else is closed.
    #[arg(long = "http-backend", env = "TURNPIKE_HTTP_BACKEND")]
    pub http_backend: Option<String>,
    /// Front door: send the web backends a PROXY protocol v2 header with the client's
    /// address (nginx: `listen ... proxy_protocol`).
    #[arg(
        long = "backend-proxy-protocol",
        env = "TURNPIKE_BACKEND_PROXY_PROTOCOL"
    )]
    pub backend_proxy_protocol: bool,
    /// Front door: an SNI name routed to the web (repeatable), unless the client offers
    /// ALPN `stun.turn`.
    #[arg(long = "web-host", env = "TURNPIKE_WEB_HOST", value_delimiter = ',')]
    pub web_host: Vec<String>,
    /// etcd endpoint of the fleet registry, repeatable (none: a standalone instance).
    #[arg(long = "etcd", env = "TURNPIKE_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// The fleet's name (its key prefix in etcd; default "default").
    #[arg(long, env = "TURNPIKE_FLEET")]
    pub fleet: Option<String>,
    /// This instance's id in the fleet (default: the host name).
    #[arg(long, env = "TURNPIKE_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Region label (redirects stay within a region).
    #[arg(long, env = "TURNPIKE_REGION")]
    pub region: Option<String>,
    /// Zone label.
    #[arg(long, env = "TURNPIKE_ZONE")]
    pub zone: Option<String>,
    /// The advertised name of this instance's TLS listener (its certificate's name),
    /// sent as ALTERNATE-DOMAIN when a TLS client is redirected here.
    #[arg(long, env = "TURNPIKE_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
    /// Redirect new allocations at or above this load, 0 to 1 (default 0.85).
    #[arg(long, env = "TURNPIKE_REDIRECT_LOAD")]
    pub redirect_load: Option<f64>,
    /// Split mode with etcd: the cell whose leader this control plane campaigns to be, or
    /// whose elected leader this data plane follows (default "default").
    #[arg(long, env = "TURNPIKE_CELL")]
    pub cell: Option<String>,
    /// The URL data planes reach this control plane's gRPC at (default:
    /// https://GRPC_LISTEN; required when that is a wildcard address).
    #[arg(long, env = "TURNPIKE_ADVERTISE_GRPC")]
    pub advertise_grpc: Option<String>,
}

/// The fleet settings, when etcd is configured.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// etcd endpoints.
    pub etcd: Vec<String>,
    /// Fleet name.
    pub name: String,
    /// Instance id.
    pub instance_id: String,
    /// Region.
    pub region: String,
    /// Zone.
    pub zone: String,
    /// TLS name for ALTERNATE-DOMAIN.
    pub tls_domain: Option<String>,
    /// Redirect thresholds.
    pub redirect: turnpike_controlplane::fleet::RedirectConfig,
    /// The cell (split mode): its control planes elect a leader.
    pub cell: String,
    /// The URL this control plane is reached at, if set.
    pub advertise_grpc: Option<String>,
}

/// Where the TURN-over-TLS certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// No TLS.
    None,
    /// PEM files: (certificate chain, key) pairs.
    Files(Vec<(PathBuf, PathBuf)>),
    /// A self-signed certificate made at start.
    SelfSigned,
}

/// The planes' mutual TLS material.
#[derive(Debug, Clone)]
pub struct GrpcTls {
    /// Fleet CA.
    pub ca: PathBuf,
    /// Certificate.
    pub cert: PathBuf,
    /// Key.
    pub key: PathBuf,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// UDP listening addresses.
    pub listen: Vec<SocketAddr>,
    /// Relay IPs (addresses of this host).
    pub relay_ips: Vec<IpAddr>,
    /// Those of them behind a 1:1 NAT, with their public addresses.
    pub external_ips: Vec<RelayIp>,
    /// Realm.
    pub realm: String,
    /// Static users.
    pub users: Vec<(String, String)>,
    /// REST secrets.
    pub secrets: Vec<String>,
    /// Workers.
    pub workers: usize,
    /// Backend.
    pub backend: Backend,
    /// gRPC address.
    pub grpc_listen: Option<SocketAddr>,
    /// Metrics address.
    pub metrics_listen: Option<SocketAddr>,
    /// Pin workers.
    pub pin: bool,
    /// Workers deliver between their own allocations without the kernel (the hairpin).
    pub hairpin: bool,
    /// Control-plane settings.
    pub server: ServerConfig,
    /// Data-plane id, if configured (else the name of its certificate; `local` in
    /// `serve` without certificates).
    pub data_plane_id: Option<String>,
    /// Mutual TLS between the planes (None: `serve` makes certificates in memory).
    pub grpc_tls: Option<GrpcTls>,
    /// The name expected in the control plane's certificate.
    pub grpc_server_name: String,
    /// Admin address, if set.
    pub admin_listen: Option<SocketAddr>,
    /// Admin bearer token, if configured.
    pub admin_token: Option<String>,
    /// Limits of the TCP listeners.
    pub max_connections: usize,
    /// Idle timeout of the TCP listeners.
    pub idle_timeout: std::time::Duration,
    /// Connections per source on each of those listeners.
    pub max_connections_per_ip: usize,
    /// Time to the first byte on those listeners.
    pub first_byte_timeout: std::time::Duration,
    /// TURN over TCP and TLS listening addresses.
    pub streams: Vec<StreamListen>,
    /// The TLS certificate.
    pub tls: TlsSource,
    /// Limits of client connections.
    pub stream_limits: StreamLimits,
    /// How long SIGTERM drains.
    pub drain_grace: std::time::Duration,
    /// Messages queued towards each data plane.
    pub plane_queue: usize,
    /// The XDP fast path.
    pub xdp: turnpike_dataplane::xdp::XdpConfig,
    /// NAT behaviour discovery (RFC 5780): the server's second IP.
    pub alt_ip: Option<IpAddr>,
    /// The fleet on etcd, if configured.
    pub fleet: Option<FleetConfig>,
    /// The front door (TURN listeners shared with a web server).
    pub front: FrontConfig,
}

/// The front door's validated settings.
#[derive(Debug, Clone, Default)]
pub struct FrontConfig {
    /// The web backend of the TLS listeners (none: they serve TURN alone).
    pub https_backend: Option<SocketAddr>,
    /// The web backend of the TCP listeners (none: they serve TURN alone).
    pub http_backend: Option<SocketAddr>,
    /// A PROXY protocol v2 header to the backends.
    pub backend_proxy: bool,
    /// The TLS routing rules.
    pub rules: WebRules,
}

impl Config {
    /// The TURN listeners that share their port with a web backend.
    pub fn front_listens(&self) -> Vec<FrontListen> {
        self.streams
            .iter()
            .filter_map(|s| {
                let backend = if s.tls {
                    self.front.https_backend
                } else {
                    self.front.http_backend
                }?;
                Some(FrontListen {
                    addr: s.addr,
                    tls: s.tls,
                    backend,
                    backend_proxy: self.front.backend_proxy,
                })
            })
            .collect()
    }

    /// The TURN listeners the data-plane workers bind themselves.
    pub fn worker_streams(&self) -> Vec<StreamListen> {
        let front = self.front_listens();
        self.streams
            .iter()
            .filter(|s| !front.iter().any(|f| f.addr == s.addr && f.tls == s.tls))
            .copied()
            .collect()
    }
}

/// Validates `[front_door]` and its flags against the TURN listeners.
fn front_config(
    flags: &Flags,
    file: Option<FrontDoorFile>,
    streams: &[StreamListen],
) -> Result<FrontConfig, ConfigError> {
    let file = file.unwrap_or_default();
    let https_backend = flags
        .https_backend
        .clone()
        .or(file.https_backend)
        .map(|s| parse_addr("front_door.https_backend (--https-backend)", &s))
        .transpose()?;
    let http_backend = flags
        .http_backend
        .clone()
        .or(file.http_backend)
        .map(|s| parse_addr("front_door.http_backend (--http-backend)", &s))
        .transpose()?;
    for (backend, tls, option, listener) in [
        (
            https_backend,
            true,
            "front_door.https_backend (--https-backend)",
            "TLS listener (--listen-tls)",
        ),
        (
            http_backend,
            false,
            "front_door.http_backend (--http-backend)",
            "TCP listener (--listen-tcp)",
        ),
    ] {
        let Some(b) = backend else { continue };
        let fronted: Vec<&StreamListen> = streams.iter().filter(|s| s.tls == tls).collect();
        if fronted.is_empty() {
            return Err(err(option, format!("needs a TURN {listener}")));
        }
        if b.ip().is_unspecified() || b.port() == 0 {
            return Err(err(
                option,
                format!("{b}: a backend needs an IP address and a port"),
            ));
        }
        if let Some(s) = streams.iter().find(|s| s.addr == b) {
            return Err(err(
                option,
                format!("{b} is turnpike's own listener {}", s.addr),
            ));
        }
        if let Some(s) = fronted.iter().find(|s| s.proxy_protocol) {
            return Err(err(
                option,
                format!(
                    "{} expects a PROXY header (--proxy-protocol): a front door behind a load balancer is not supported",
                    s.addr
                ),
            ));
        }
    }
    let backend_proxy = flags.backend_proxy_protocol || file.proxy_protocol.unwrap_or(false);
    let mut rules = WebRules::default();
    let hosts = pick(flags.web_host.clone(), file.web_hosts);
    for h in &hosts {
        if h.is_empty()
            || h.len() > 253
            || !h
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(err(
                "front_door.web_hosts (--web-host)",
                format!("{h:?} is not a DNS name"),
            ));
        }
    }
    rules.web_hosts = hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
    if let Some(alpn) = file.web_alpn {
        if alpn
            .iter()
            .any(|p| p.is_empty() || p.len() > 255 || p == "stun.turn")
        {
            return Err(err(
                "front_door.web_alpn",
                "protocol ids are 1 to 255 bytes, and stun.turn is TURN's",
            ));
        }
        rules.web_alpn = alpn.into_iter().map(String::into_bytes).collect();
    }
    if https_backend.is_none() && http_backend.is_none() && (!hosts.is_empty() || backend_proxy) {
        return Err(err(
            "front_door (--web-host, --backend-proxy-protocol)",
            "need https_backend or http_backend (--https-backend, --http-backend)",
        ));
    }
    Ok(FrontConfig {
        https_backend,
        http_backend,
        backend_proxy,
        rules,
    })
}

fn parse_addr(option: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.trim()
        .parse()
        .map_err(|_| err(option, format!("{s:?} is not an IP:PORT address")))
}

fn parse_cidrs(option: &str, v: &[String]) -> Result<Vec<Cidr>, ConfigError> {
    v.iter()
        .map(|s| s.parse::<Cidr>().map_err(|e| err(option, e.to_string())))
        .collect()
}

fn pick<T>(flag: Vec<T>, file: Option<Vec<T>>) -> Vec<T> {
    if flag.is_empty() {
        file.unwrap_or_default()
    } else {
        flag
    }
}

impl Config {
    /// Every relay IP with the address clients are given for it.
    pub fn relays(&self) -> Vec<RelayIp> {
        self.relay_ips
            .iter()
            .map(|ip| {
                self.external_ips
                    .iter()
                    .find(|r| r.ip == *ip)
                    .copied()
                    .unwrap_or(RelayIp::local(*ip))
            })
            .collect()
    }

    /// Merges file, environment and flags, and validates.
    pub fn load(flags: &Flags) -> Result<Config, ConfigError> {
        let mut file: FileConfig = match &flags.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| err("--config", format!("cannot read {}: {e}", path.display())))?;
                toml::from_str(&text)
                    .map_err(|e| err("--config", format!("{}: {e}", path.display())))?
            }
            None => FileConfig::default(),
        };
        let file_streams = FileStreams {
            listen_tcp: file.listen_tcp.take(),
            listen_tls: file.listen_tls.take(),
            no_tcp: file.no_tcp.take(),
            proxy: file.proxy_protocol.take(),
            tls: file.tls.take(),
            limits: file.streams.take(),
        };
        let listen_s = pick(flags.listen.clone(), file.listen);
        let listen = if listen_s.is_empty() {
            vec![SocketAddr::from(([127, 0, 0, 1], 3478))]
        } else {
            listen_s
                .iter()
                .map(|s| parse_addr("listen (--listen)", s))
                .collect::<Result<_, _>>()?
        };
        let relay_s = pick(flags.relay_ip.clone(), file.relay_ips);
        let relay_ips: Vec<IpAddr> = if relay_s.is_empty() {
            let ip = listen[0].ip();
            if ip.is_unspecified() {
                return Err(err(
                    "relay_ips (--relay-ip)",
                    "required when listening on a wildcard address",
                ));
            }
            vec![ip]
        } else {
            relay_s
                .iter()
                .map(|s| {
                    s.trim().parse().map_err(|_| {
                        err(
                            "relay_ips (--relay-ip)",
                            format!("{s:?} is not an IP address"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?
        };
        let external_ips = external_ips(
            &pick(flags.external_ip.clone(), file.external_ips.take()),
            &relay_ips,
        )?;
        let ports_s = flags
            .relay_ports
            .clone()
            .or(file.relay_ports)
            .unwrap_or_else(|| "49152-65535".to_owned());
        let relay_ports = match ports_s.split_once('-') {
            Some((a, b)) => match (a.trim().parse::<u16>(), b.trim().parse::<u16>()) {
                (Ok(a), Ok(b)) if a > 0 && a <= b => (a, b),
                _ => {
                    return Err(err(
                        "relay_ports (--relay-ports)",
                        format!("{ports_s:?}: expected MIN-MAX with 1 <= MIN <= MAX <= 65535"),
                    ));
                }
            },
            None => {
                return Err(err(
                    "relay_ports (--relay-ports)",
                    format!("{ports_s:?}: expected MIN-MAX"),
                ));
            }
        };
        let realm = flags
            .realm
            .clone()
            .or(file.realm)
            .unwrap_or_else(|| "turnpike.local".to_owned());
        if realm.is_empty() || realm.len() > 127 {
            return Err(err("realm (--realm)", "must be 1 to 127 characters"));
        }
        let users = pick(flags.user.clone(), file.users)
            .iter()
            .map(|u| match u.split_once(':') {
                Some((n, p)) if !n.is_empty() && !p.is_empty() => Ok((n.to_owned(), p.to_owned())),
                _ => Err(err(
                    "users (--user)",
                    format!("{u:?}: expected NAME:PASSWORD"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let secrets = pick(flags.auth_secret.clone(), file.auth_secrets);
        if secrets.iter().any(String::is_empty) {
            return Err(err(
                "auth_secrets (--auth-secret)",
                "a secret may not be empty",
            ));
        }
        let allow = parse_cidrs(
            "allow_peers (--allow-peer)",
            &pick(flags.allow_peer.clone(), file.allow_peers),
        )?;
        let deny = parse_cidrs(
            "deny_peers (--deny-peer)",
            &pick(flags.deny_peer.clone(), file.deny_peers),
        )?;
        let backend = match flags
            .io_backend
            .clone()
            .or(file.io_backend)
            .as_deref()
            .unwrap_or("auto")
        {
            "auto" => Backend::Auto,
            "uring" => Backend::Uring,
            "mmsg" => Backend::Mmsg,
            other => {
                return Err(err(
                    "io_backend (--io-backend)",
                    format!("{other:?}: expected auto, uring or mmsg"),
                ));
            }
        };
        let grpc_listen = flags
            .grpc_listen
            .clone()
            .or(file.grpc_listen)
            .map(|s| parse_addr("grpc_listen (--grpc-listen)", &s))
            .transpose()?;
        let metrics_listen = flags
            .metrics_listen
            .clone()
            .or(file.metrics_listen)
            .map(|s| parse_addr("metrics_listen (--metrics-listen)", &s))
            .transpose()?;
        let workers = flags.workers.or(file.workers).unwrap_or(0);
        if workers > 1024 {
            return Err(err("workers (--workers)", "at most 1024"));
        }
        let (streams, tls, stream_limits) = streams_config(flags, &file_streams, &listen)?;
        let front = front_config(flags, file.front_door.take(), &streams)?;
        let alt_ip = match flags.alt_ip.clone().or(file.alt_ip.take()) {
            Some(s) => Some(
                s.trim()
                    .parse::<IpAddr>()
                    .map_err(|e| err("alt_ip (--alt-ip)", format!("{s:?}: {e}")))?,
            ),
            None => None,
        };
        if let Some(alt) = alt_ip
            && !listen
                .iter()
                .any(|a| !a.ip().is_unspecified() && a.is_ipv4() == alt.is_ipv4() && a.ip() != alt)
        {
            return Err(err(
                "alt_ip (--alt-ip)",
                format!(
                    "{alt}: NAT behaviour discovery needs a UDP listening address (--listen) of \
                     the same family that is neither a wildcard nor {alt} itself"
                ),
            ));
        }
        let mut own: Vec<SocketAddr> = listen.clone();
        // The NAT discovery companions are our sockets too (see `--alt-ip`).
        if let Some(alt) = alt_ip {
            for a in &listen {
                if let Some(p2) = a.port().checked_add(1) {
                    own.extend([
                        SocketAddr::new(a.ip(), p2),
                        SocketAddr::new(alt, a.port()),
                        SocketAddr::new(alt, p2),
                    ]);
                }
            }
        }
        own.extend(grpc_listen);
        own.extend(metrics_listen);
        if let Some(a) = flags
            .admin_listen
            .as_deref()
            .or(file.admin_listen.as_deref())
        {
            own.extend(a.trim().parse::<SocketAddr>().ok());
        }
        // Behind a 1:1 NAT our sockets are reachable at their public addresses too: a
        // peer there would loop through the NAT back into the server.
        let public: Vec<SocketAddr> = own
            .iter()
            .map(|a| advertised_addr(&external_ips, *a))
            .filter(|a| !own.contains(a))
            .collect();
        own.extend(public);
        let mut server = ServerConfig {
            relay_ips: relay_ips.clone(),
            advertised_ips: external_ips.clone(),
            relay_ports,
            policy: PeerPolicy::new(allow, deny, own),
            ..ServerConfig::default()
        };
        if let Some(v) = file.default_lifetime {
            server.default_lifetime = v;
        }
        if let Some(v) = flags.max_lifetime.or(file.max_lifetime) {
            server.max_lifetime = v;
        }
        if server.default_lifetime == 0 || server.max_lifetime < server.default_lifetime {
            return Err(err(
                "max_lifetime (--max-lifetime)",
                "must be at least default_lifetime (600 unless set), and both above 0",
            ));
        }
        if let Some(v) = file.nonce_lifetime {
            if v < 30 {
                return Err(err("nonce_lifetime", "at least 30 seconds"));
            }
            server.nonce_lifetime = v;
        }
        if let Some(v) = flags.user_quota.or(file.user_quota) {
            server.user_quota = v;
        }
        if let Some(v) = flags.total_quota.or(file.total_quota) {
            server.total_quota = v;
        }
        if let Some(v) = flags.bandwidth_limit.or(file.bandwidth_limit) {
            server.bandwidth_limit = v;
        }
        if let Some(v) = flags.unauth_rate.or(file.unauth_rate) {
            server.unauth_rate = v;
            server.unauth_burst = v.saturating_mul(3).max(1);
            if v == 0 {
                // "No limit" means none: the per-IP cap goes too.
                server.unauth_ip_rate = 0;
            }
        }
        if let Some(v) = flags.unauth_ip_rate.or(file.unauth_ip_rate) {
            server.unauth_ip_rate = v;
            server.unauth_ip_burst = v.saturating_mul(5).max(1);
        }
        if let Some(v) = flags.relay_pool.or(file.relay_pool) {
            if v > 1024 {
                return Err(err("relay_pool (--relay-pool)", "at most 1024"));
            }
            server.relay_pool = v;
        }
        server.legacy_channel_numbers =
            flags.legacy_channel_numbers || file.legacy_channel_numbers.unwrap_or(false);
        let tls_parts = (
            flags.grpc_ca.clone().or(file.grpc_ca),
            flags.grpc_cert.clone().or(file.grpc_cert),
            flags.grpc_key.clone().or(file.grpc_key),
        );
        let grpc_tls = match tls_parts {
            (None, None, None) => None,
            (Some(ca), Some(cert), Some(key)) => {
                for (opt, p) in [
                    ("grpc_ca (--grpc-ca)", &ca),
                    ("grpc_cert (--grpc-cert)", &cert),
                    ("grpc_key (--grpc-key)", &key),
                ] {
                    if !p.is_file() {
                        return Err(err(opt, format!("{} is not a readable file", p.display())));
                    }
                }
                Some(GrpcTls { ca, cert, key })
            }
            _ => {
                return Err(err(
                    "grpc_ca, grpc_cert, grpc_key (--grpc-ca, --grpc-cert, --grpc-key)",
                    "give all three or none (turnpike ctl certs makes them)",
                ));
            }
        };
        let admin_listen = flags
            .admin_listen
            .clone()
            .or(file.admin_listen)
            .map(|s| parse_addr("admin_listen (--admin-listen)", &s))
            .transpose()?;
        let token_file = flags.admin_token_file.clone().or(file.admin_token_file);
        let admin_token = match (flags.admin_token.clone().or(file.admin_token), token_file) {
            (Some(t), _) => Some(t),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    err(
                        "admin_token_file (--admin-token-file)",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                Some(text.lines().next().unwrap_or("").trim().to_owned())
            }
            (None, None) => None,
        };
        if admin_token.as_ref().is_some_and(|t| t.len() < 16) {
            return Err(err("admin_token (--admin-token)", "at least 16 characters"));
        }
        let max_connections = file.max_connections.unwrap_or(256);
        if max_connections == 0 {
            return Err(err("max_connections", "at least 1"));
        }
        let idle_timeout = std::time::Duration::from_secs(file.idle_timeout.unwrap_or(120));
        if idle_timeout.is_zero() {
            return Err(err("idle_timeout", "at least 1 second"));
        }
        let max_connections_per_ip = file.max_connections_per_ip.unwrap_or(32);
        if max_connections_per_ip == 0 {
            return Err(err("max_connections_per_ip", "at least 1"));
        }
        let first_byte_timeout =
            std::time::Duration::from_secs(file.first_byte_timeout.unwrap_or(10));
        if first_byte_timeout.is_zero() {
            return Err(err("first_byte_timeout", "at least 1 second"));
        }
        Ok(Config {
            grpc_tls,
            grpc_server_name: flags
                .grpc_server_name
                .clone()
                .or(file.grpc_server_name)
                .unwrap_or_else(|| crate::tls::CONTROL_PLANE_NAME.to_owned()),
            admin_listen,
            admin_token,
            max_connections,
            idle_timeout,
            max_connections_per_ip,
            first_byte_timeout,
            streams,
            tls,
            stream_limits,
            drain_grace: std::time::Duration::from_secs(
                flags.drain_grace.or(file.drain_grace).unwrap_or(0),
            ),
            plane_queue: match flags.plane_queue.or(file.plane_queue) {
                None => turnpike_controlplane_runtime::DOWN_QUEUE,
                Some(0) => return Err(err("plane_queue (--plane-queue)", "at least 1")),
                Some(n) => n.min(1 << 20),
            },
            fleet: fleet_config(flags, file.fleet.take())?,
            front,
            xdp: turnpike_dataplane::xdp::XdpConfig {
                interfaces: pick(flags.xdp.clone(), file.xdp.take()),
                mode: match flags.xdp_mode.clone().or(file.xdp_mode.take()) {
                    Some(m) => m
                        .parse()
                        .map_err(|e: String| err("xdp_mode (--xdp-mode)", e))?,
                    None => turnpike_dataplane::xdp::XdpMode::Auto,
                },
                adopt: Vec::new(),
            },
            alt_ip,
            listen,
            relay_ips,
            external_ips,
            realm,
            users,
            secrets,
            workers,
            backend,
            grpc_listen,
            metrics_listen,
            pin: !flags.no_pin && file.pin_workers.unwrap_or(true),
            hairpin: !flags.no_hairpin,
            server,
            data_plane_id: file.data_plane_id,
        })
    }
}

/// The 1:1 NAT mappings of `external_ips (--external-ip)`: "PUBLIC/PRIVATE", or "PUBLIC"
/// for the one relay IP of its family.
fn external_ips(specs: &[String], relay_ips: &[IpAddr]) -> Result<Vec<RelayIp>, ConfigError> {
    const OPT: &str = "external_ips (--external-ip)";
    let ip = |s: &str| -> Result<IpAddr, ConfigError> {
        s.trim()
            .parse()
            .map_err(|_| err(OPT, format!("{s:?} is not an IP address")))
    };
    let mut out: Vec<RelayIp> = Vec::new();
    for spec in specs {
        let (public, private) = match spec.split_once('/') {
            Some((p, q)) => (ip(p)?, ip(q)?),
            None => {
                let public = ip(spec)?;
                let mut same = relay_ips.iter().filter(|r| r.is_ipv4() == public.is_ipv4());
                match (same.next(), same.next()) {
                    (Some(private), None) => (public, *private),
                    _ => {
                        return Err(err(
                            OPT,
                            format!(
                                "{spec:?}: give PUBLIC/PRIVATE, since there is not exactly one relay IP of its family"
                            ),
                        ));
                    }
                }
            }
        };
        if public.is_ipv4() != private.is_ipv4() {
            return Err(err(
                OPT,
                format!("{spec:?}: the public and private addresses must be of one family"),
            ));
        }
        if public.is_unspecified() || public.is_multicast() || public.is_loopback() {
            return Err(err(
                OPT,
                format!("{spec:?}: {public} cannot be a client-facing address"),
            ));
        }
        if !relay_ips.contains(&private) {
            return Err(err(
                OPT,
                format!("{spec:?}: {private} is not a relay IP (relay_ips, --relay-ip)"),
            ));
        }
        if out.iter().any(|r| r.ip == private) {
            return Err(err(OPT, format!("{private} is mapped twice")));
        }
        if public != private {
            out.push(RelayIp {
                ip: private,
                advertised: public,
            });
        }
    }
    Ok(out)
}

/// The stream parts of the file, taken out before the rest is consumed.
struct FileStreams {
    listen_tcp: Option<Vec<String>>,
    listen_tls: Option<Vec<String>>,
    no_tcp: Option<bool>,
    proxy: Option<Vec<String>>,
    tls: Option<TlsFile>,
    limits: Option<StreamsFile>,
}

/// The TCP and TLS listeners, the certificate source and the connection limits.
fn streams_config(
    flags: &Flags,
    file: &FileStreams,
    udp: &[SocketAddr],
) -> Result<(Vec<StreamListen>, TlsSource, StreamLimits), ConfigError> {
    let tls_file = file.tls.as_ref();
    let certs: Vec<PathBuf> = if flags.tls_cert.is_empty() {
        tls_file
            .and_then(|t| t.cert.clone())
            .map(OneOrMany::into_vec)
            .unwrap_or_default()
            .into_iter()
            .map(PathBuf::from)
            .collect()
    } else {
        flags.tls_cert.clone()
    };
    let keys: Vec<PathBuf> = if flags.tls_key.is_empty() {
        tls_file
            .and_then(|t| t.key.clone())
            .map(OneOrMany::into_vec)
            .unwrap_or_default()
            .into_iter()
            .map(PathBuf::from)
            .collect()
    } else {
        flags.tls_key.clone()
    };
    if certs.len() != keys.len() {
        return Err(err(
            "tls.cert, tls.key (--tls-cert, --tls-key)",
            format!(
                "{} certificate(s) and {} key(s): give them in pairs",
                certs.len(),
                keys.len()
            ),
        ));
    }
    for p in certs.iter().chain(&keys) {
        if !p.is_file() {
            return Err(err(
                "tls.cert, tls.key (--tls-cert, --tls-key)",
                format!("{} is not a readable file", p.display()),
            ));
        }
    }
    let self_signed =
        flags.tls_self_signed || tls_file.and_then(|t| t.self_signed).unwrap_or(false);
    let tls = match (certs.is_empty(), self_signed) {
        (false, true) => {
            return Err(err(
                "tls.self_signed (--tls-self-signed)",
                "not with a configured certificate",
            ));
        }
        (false, false) => TlsSource::Files(certs.into_iter().zip(keys).collect()),
        (true, true) => TlsSource::SelfSigned,
        (true, false) => TlsSource::None,
    };
    let parse_all = |option: &str, v: &[String]| -> Result<Vec<SocketAddr>, ConfigError> {
        v.iter().map(|s| parse_addr(option, s)).collect()
    };
    let tcp_s = pick(flags.listen_tcp.clone(), file.listen_tcp.clone());
    let no_tcp = flags.no_tcp || file.no_tcp.unwrap_or(false);
    let tcp = if tcp_s.is_empty() {
        if no_tcp { Vec::new() } else { udp.to_vec() }
    } else {
        parse_all("listen_tcp (--listen-tcp)", &tcp_s)?
    };
    let tls_s = pick(flags.listen_tls.clone(), file.listen_tls.clone());
    let tls_addrs = if tls_s.is_empty() {
        if tls == TlsSource::None {
            Vec::new()
        } else {
            let mut v: Vec<SocketAddr> = Vec::new();
            for a in udp {
                let a = SocketAddr::new(a.ip(), 5349);
                if !v.contains(&a) {
                    v.push(a);
                }
            }
            v
        }
    } else {
        if tls == TlsSource::None {
            return Err(err(
                "listen_tls (--listen-tls)",
                "needs a certificate: tls.cert and tls.key (--tls-cert, --tls-key) or --tls-self-signed",
            ));
        }
        parse_all("listen_tls (--listen-tls)", &tls_s)?
    };
    let proxy = parse_all(
        "proxy_protocol (--proxy-protocol)",
        &pick(flags.proxy_protocol.clone(), file.proxy.clone()),
    )?;
    let mut streams: Vec<StreamListen> = Vec::new();
    for (addrs, is_tls) in [(&tcp, false), (&tls_addrs, true)] {
        for &addr in addrs.iter() {
            // Port 0 (chosen at start) is a different port for each listener.
            if addr.port() != 0 && streams.iter().any(|s| s.addr == addr) {
                return Err(err(
                    "listen_tcp, listen_tls (--listen-tcp, --listen-tls)",
                    format!("{addr} is listed twice"),
                ));
            }
            streams.push(StreamListen {
                addr,
                tls: is_tls,
                proxy_protocol: proxy.contains(&addr),
            });
        }
    }
    if let Some(p) = proxy
        .iter()
        .find(|p| !streams.iter().any(|s| s.addr == **p))
    {
        return Err(err(
            "proxy_protocol (--proxy-protocol)",
            format!("{p} is not a TCP or TLS listening address"),
        ));
    }
    let mut limits = StreamLimits::default();
    if let Some(l) = &file.limits {
        if let Some(v) = l.max_connections {
            limits.max_connections = v;
        }
        if let Some(v) = l.max_per_ip {
            limits.max_per_ip = v;
        }
        if let Some(v) = l.idle_timeout {
            limits.idle_ms = v.saturating_mul(1000);
        }
        if let Some(v) = l.handshake_timeout {
            limits.handshake_ms = v.saturating_mul(1000);
        }
        if let Some(v) = l.send_buffer {
            limits.send_buffer = v;
        }
    }
    if limits.max_connections == 0 {
        return Err(err("streams.max_connections", "at least 1"));
    }
    if limits.idle_ms == 0 || limits.handshake_ms == 0 {
        return Err(err(
            "streams.idle_timeout, streams.handshake_timeout",
            "at least 1 second",
        ));
    }
    if limits.send_buffer < 16 * 1024 {
        return Err(err("streams.send_buffer", "at least 16384 bytes"));
    }
    Ok((streams, tls, limits))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("turnpike-{}", std::process::id()))
}

/// The fleet settings from flags and `[fleet]`; `None` without etcd endpoints.
fn fleet_config(
    flags: &Flags,
    file: Option<FleetFile>,
) -> Result<Option<FleetConfig>, ConfigError> {
    let file = file.unwrap_or_default();
    let etcd = pick(flags.etcd.clone(), file.etcd);
    if etcd.is_empty() {
        return Ok(None);
    }
    for e in &etcd {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            return Err(err(
                "fleet.etcd (--etcd)",
                format!("{e:?}: expected http://HOST:PORT"),
            ));
        }
    }
    let name = flags
        .fleet
        .clone()
        .or(file.name)
        .unwrap_or_else(|| "default".into());
    let instance_id = flags
        .instance_id
        .clone()
        .or(file.instance_id)
        .unwrap_or_else(host_name);
    for (opt, v) in [
        ("fleet.name (--fleet)", &name),
        ("fleet.instance_id (--instance-id)", &instance_id),
    ] {
        if v.is_empty() || v.contains('/') || v.len() > 128 {
            return Err(err(opt, format!("{v:?}: 1 to 128 characters, no '/'")));
        }
    }
    let mut redirect = turnpike_controlplane::fleet::RedirectConfig::default();
    if let Some(h) = flags.redirect_load.or(file.redirect_load) {
        redirect.high = h;
    }
    if let Some(l) = file.resume_load {
        redirect.low = l;
    } else {
        redirect.low = (redirect.high - 0.15).max(0.0);
    }
    if !(0.0..=1.0).contains(&redirect.high)
        || !(0.0..=1.0).contains(&redirect.low)
        || redirect.low >= redirect.high
    {
        return Err(err(
            "fleet.redirect_load, fleet.resume_load (--redirect-load)",
            "loads between 0 and 1, resume below redirect",
        ));
    }
    Ok(Some(FleetConfig {
        etcd,
        name,
        instance_id,
        region: flags.region.clone().or(file.region).unwrap_or_default(),
        zone: flags.zone.clone().or(file.zone).unwrap_or_default(),
        tls_domain: flags.tls_domain.clone().or(file.tls_domain),
        redirect,
        cell: flags
            .cell
            .clone()
            .or(file.cell)
            .unwrap_or_else(|| "default".into()),
        advertise_grpc: flags.advertise_grpc.clone().or(file.advertise_grpc),
    }))
}
