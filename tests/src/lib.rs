//! End-to-end tests of the `turnpike` binary live in `tests/` (Rust, against the real
//! process) and `e2e/` (third-party clients). This library only finds the binary.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The `turnpike` binary under test: `$TURNPIKE_BIN` if set, else the one cargo builds
/// beside this test executable, brought up to date with `cargo build -p turnpike`.
pub fn turnpike_bin() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("TURNPIKE_BIN") {
            return PathBuf::from(p);
        }
        // target/<profile>/deps/<test> -> target/<profile>/turnpike
        let exe = std::env::current_exe().unwrap_or_default();
        let dir = exe
            .parent()
            .and_then(|d| d.parent())
            .map(PathBuf::from)
            .unwrap_or_default();
        let bin = dir.join("turnpike");
        // Under `cargo test` the binary is not rebuilt by cargo itself (it belongs to
        // another package): build it once, so that a test never runs a stale binary.
        if let Some(cargo) = std::env::var_os("CARGO") {
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "--quiet", "-p", "turnpike"]);
            if dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            let ok = cmd.status().is_ok_and(|s| s.success());
            assert!(
                ok,
                "cannot build the turnpike binary (cargo build -p turnpike)"
            );
        }
        assert!(bin.exists(), "no turnpike binary at {}", bin.display());
        bin
    })
}
