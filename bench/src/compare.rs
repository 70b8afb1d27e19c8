//! stub
use anyhow::Result;
use clap::Args;
#[derive(Debug, Args)]
pub struct CompareArgs {}
pub fn run(_a: &CompareArgs) -> Result<()> { Ok(()) }
