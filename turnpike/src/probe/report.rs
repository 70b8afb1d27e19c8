//! The probe's report: checks with their status, what was learnt about each target,
//! the table for people and the JSON for machines.
//!
//! # JSON schema (`turnpike probe --json`, `schema: 1`)
//!
//! ```text
//! {
//!   "schema": 1,
//!   "ok": bool,                      // every check of every target passed (warnings allowed)
//!   "failed": ["step (url)", ...],   // the failed checks
//!   "targets": [{
//!     "url": "turn:host:3478?transport=udp",
//!     "transport": "udp" | "tcp" | "tls",
//!     "instance": "id" | null,       // the fleet instance (--etcd)
//!     "address": "ip:port" | null,   // where the host name resolved to
//!     "software": str | null,        // SOFTWARE the server sent
//!     "realm": str | null,
//!     "mapped": "ip:port" | null,    // the probe's address as the server saw it
//!     "relayed": ["ip:port", ...],   // the two allocations' relayed addresses
//!     "tls": null | { "version": str|null, "alpn": str|null, "trust": str,
//!                     "certificate": null | { "subject", "issuer", "names": [str],
//!                       "not_after", "days_to_expiry": int, "chain_len": int } },
//!     "echo": null | { "sent", "received", "loss_percent", "rtt_p50_ms", "rtt_p99_ms",
//!                      "rtt_min_ms", "rtt_max_ms", "jitter_ms" },   // ms values may be null
//!     "max_datagram": int | null,    // the largest payload that came back, bytes
//!     "checks": [{ "step": str, "status": "pass" | "warn" | "fail",
//!                  "detail": str, "hint": str | null, "ms": float | null }],
//!     "ok": bool
//!   }]
//! }
//! ```
//!
//! Steps, in order: `resolve`, `reachability`, `tls-handshake`, `tls-chain`, `tls-name`,
//! `tls-expiry`, `tls-alpn`, `binding`, `authentication`, `allocate`,
//! `create-permission`, `channel-bind`, `echo`, `max-datagram`. A target stops at its
//! first failed check.

use std::fmt::Write as _;
use std::io::IsTerminal as _;

use super::stats::EchoStats;
use super::tls::CertInfo;
use super::url::Transport;

/// The version of the JSON layout.
pub const SCHEMA: u32 = 1;

/// How a check went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// It passed.
    Pass,
    /// It passed with something to look at.
    Warn,
    /// It failed: the probe exits non-zero.
    Fail,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Pass => "ok",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

/// One check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    /// Its step name (see the module docs).
    pub step: &'static str,
    /// How it went.
    pub status: Status,
    /// What was seen.
    pub detail: String,
    /// What to do about a failure or a warning.
    pub hint: Option<String>,
    /// How long it took, milliseconds.
    pub ms: Option<f64>,
}

/// The TLS session's facts.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TlsReport {
    /// The TLS version.
    pub version: Option<String>,
    /// The ALPN protocol the server chose.
    pub alpn: Option<String>,
    /// Where the trusted roots came from.
    pub trust: String,
    /// The leaf certificate.
    pub certificate: Option<CertInfo>,
}

/// Everything about one target.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TargetReport {
    /// The URL probed.
    pub url: String,
    /// Its transport.
    pub transport: Transport,
    /// The fleet instance it belongs to.
    pub instance: Option<String>,
    /// The address the host resolved to.
    pub address: Option<String>,
    /// SOFTWARE from the server.
    pub software: Option<String>,
    /// REALM from the server.
    pub realm: Option<String>,
    /// XOR-MAPPED-ADDRESS.
    pub mapped: Option<String>,
    /// The relayed addresses of the probe's allocations.
    pub relayed: Vec<String>,
    /// TLS facts (TLS targets).
    pub tls: Option<TlsReport>,
    /// NAT behaviour between the probe and the server (RFC 5780), when the server
    /// offers its discovery (UDP targets).
    pub nat: Option<super::nat::NatReport>,
    /// The relayed echo.
    pub echo: Option<EchoStats>,
    /// The largest payload that came back through the relay, bytes.
    pub max_datagram: Option<usize>,
    /// The checks, in order.
    pub checks: Vec<Check>,
    /// No check failed.
    pub ok: bool,
}

/// The whole report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// [`SCHEMA`].
    pub schema: u32,
    /// No check failed anywhere.
    pub ok: bool,
    /// The failed checks, "step (url)".
    pub failed: Vec<String>,
    /// Per target.
    pub targets: Vec<TargetReport>,
}

impl Report {
    /// The report over `targets`.
    pub fn new(targets: Vec<TargetReport>) -> Report {
        let failed: Vec<String> = targets
            .iter()
            .flat_map(|t| {
                t.checks
                    .iter()
                    .filter(|c| c.status == Status::Fail)
                    .map(move |c| format!("{} ({})", c.step, t.url))
            })
            .collect();
        Report {
            schema: SCHEMA,
            ok: failed.is_empty() && !targets.is_empty(),
            failed,
            targets,
        }
    }

    /// The table for people.
    pub fn table(&self) -> String {
        let mut s = String::new();
        for t in &self.targets {
            let _ = write!(s, "{}", t.url);
            if let Some(i) = &t.instance {
                let _ = write!(s, "  instance {i}");
            }
            if let Some(a) = &t.address {
                let _ = write!(s, "  ({a})");
            }
            s.push('\n');
            let mut facts = Vec::new();
            if let Some(v) = &t.software {
                facts.push(format!("software {v:?}"));
            }
            if let Some(v) = &t.realm {
                facts.push(format!("realm {v:?}"));
            }
            if let Some(v) = &t.mapped {
                facts.push(format!("mapped {v}"));
            }
            if !t.relayed.is_empty() {
                facts.push(format!("relayed {}", t.relayed.join(" ")));
            }
            if !facts.is_empty() {
                let _ = writeln!(s, "  {}", facts.join(", "));
            }
            let _ = writeln!(s, "  {:<18} {:<6} {:>9}  DETAIL", "STEP", "RESULT", "TIME");
            for c in &t.checks {
                let ms = c.ms.map_or(String::new(), |m| format!("{m:.1} ms"));
                let _ = writeln!(
                    s,
                    "  {:<18} {:<6} {:>9}  {}",
                    c.step,
                    c.status.word(),
                    ms,
                    c.detail
                );
                if let Some(h) = &c.hint
                    && c.status != Status::Pass
                {
                    let _ = writeln!(s, "  {:<18} {:<6} {:>9}  hint: {h}", "", "", "");
                }
            }
            s.push('\n');
        }
        if self.ok {
            let _ = writeln!(
                s,
                "all checks passed ({} target{})",
                self.targets.len(),
                if self.targets.len() == 1 { "" } else { "s" }
            );
        } else if self.targets.is_empty() {
            s.push_str("nothing probed\n");
        } else {
            let _ = writeln!(s, "FAILED: {}", self.failed.join(", "));
        }
        s
    }
}

/// Progress lines on stderr, when stderr is a terminal.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    on: bool,
}

impl Progress {
    /// On if stderr is a terminal and the output is not JSON.
    pub fn new(json: bool) -> Progress {
        Progress {
            on: !json && std::io::stderr().is_terminal(),
        }
    }

    /// Says that `check` of `url` is done.
    pub fn check(&self, url: &str, check: &Check) {
        if self.on {
            eprintln!(
                "{url}: {} {} {}",
                check.step,
                check.status.word(),
                check.detail
            );
        }
    }
}
