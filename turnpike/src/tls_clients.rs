//! STUB replaced on merge.
#![allow(dead_code, missing_docs, clippy::all)]
use std::path::PathBuf;
use std::sync::Arc;
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}
pub struct SelfSigned {
    pub cert_pem: String,
    pub key_pem: String,
    pub sha256_fingerprint: String,
}
pub fn load(_p: &[CertPair]) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    anyhow::bail!("stub")
}
pub fn from_pem(_c: &str, _k: &str) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    anyhow::bail!("stub")
}
pub fn self_signed(_n: &[String]) -> anyhow::Result<SelfSigned> {
    anyhow::bail!("stub")
}
pub fn spawn(
    _p: Vec<CertPair>,
    _s: Arc<arc_swap::ArcSwap<rustls::ServerConfig>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    anyhow::bail!("stub")
}
