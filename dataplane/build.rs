//! Builds the XDP relay program (`bpf/relay.c`) and the test tools (`bpf/tools.c`) for the BPF target with clang, when
//! clang is there. Without it (or when it fails, or with `TURNPIKE_NO_XDP` set) the crate
//! builds without the fast path and says why at run time (`TURNPIKE_XDP_OFF`). No object
//! is committed: the program is always built from its source.
//!
//! Always (clang or not) generates the Rust side of `bpf/relay.h`, the maps' keys and
//! values and the constants the program shares with the loader, into
//! `OUT_DIR/relay_abi.rs` (included by `src/xdp/abi.rs`; the generator and the header
//! syntax it reads are in `src/xdp/abi_gen.rs`). With clang, a generated C file checks
//! that clang lays the structs out as the generator told Rust: a mismatch fails the
//! build.

use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "src/xdp/abi_gen.rs"]
mod abi_gen;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(turnpike_xdp)");
    println!("cargo::rerun-if-changed=bpf/relay.c");
    println!("cargo::rerun-if-changed=bpf/relay.h");
    println!("cargo::rerun-if-changed=src/xdp/abi_gen.rs");
    println!("cargo::rerun-if-changed=bpf/tools.c");
    println!("cargo::rerun-if-env-changed=TURNPIKE_CLANG");
    println!("cargo::rerun-if-env-changed=TURNPIKE_NO_XDP");
    println!("cargo::rerun-if-env-changed=PATH");
    // Installing clang later builds the program then: a missing file counts as changed.
    println!("cargo::rerun-if-changed={}", clang_path().display());
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let header = std::fs::read_to_string("bpf/relay.h").expect("bpf/relay.h is readable");
    let abi = abi_gen::Abi::parse(&header).unwrap_or_else(|e| panic!("bpf/relay.h: {e}"));
    std::fs::write(out_dir.join("relay_abi.rs"), abi.rust()).expect("OUT_DIR is writable");
    match build() {
        Ok(clang) => {
            check_abi(&clang, &abi, &out_dir);
            println!("cargo::rustc-cfg=turnpike_xdp");
            println!("cargo::rustc-env=TURNPIKE_XDP_OFF=");
        }
        Err(why) => {
            println!("cargo::warning=the XDP fast path is not built: {why}");
            println!("cargo::rustc-env=TURNPIKE_XDP_OFF={why}");
        }
    }
}

/// Where clang is (or would be): `TURNPIKE_CLANG`, else `clang` on the PATH.
fn clang_path() -> PathBuf {
    if let Ok(c) = std::env::var("TURNPIKE_CLANG") {
        return PathBuf::from(c);
    }
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("clang"))
                .find(|c| c.exists())
        })
        .unwrap_or_else(|| PathBuf::from("/usr/bin/clang"))
}

/// `-I` for `<asm/types.h>`, which lives under the target's multiarch directory on
/// Debian.
fn multiarch_include() -> String {
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = match arch.as_str() {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        other => other,
    };
    format!("-I/usr/include/{multiarch}")
}

/// Compiles the generated `_Static_assert`s of the layout Rust was given with the clang
/// that built the program, for its target. Clang built relay.c from the same header:
/// a failure here is a disagreement between the generator and clang, never a missing
/// tool, so it fails the build.
fn check_abi(clang: &str, abi: &abi_gen::Abi, out_dir: &Path) {
    let header =
        Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it")).join("bpf/relay.h");
    let check = out_dir.join("relay_abi_check.c");
    std::fs::write(&check, abi.c_check(&header.display().to_string()))
        .expect("OUT_DIR is writable");
    let output = Command::new(clang)
        .args(["-fsyntax-only", "-target", "bpf"])
        .arg(multiarch_include())
        .arg(&check)
        .output()
        .unwrap_or_else(|e| panic!("{clang} could not be run again: {e}"));
    if !output.status.success() {
        panic!(
            "clang does not lay out bpf/relay.h as the generated Rust does ({}):\n{}",
            check.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Builds the objects; `Ok` is the clang that did.
fn build() -> Result<String, String> {
    if std::env::var_os("TURNPIKE_NO_XDP").is_some() {
        return Err("TURNPIKE_NO_XDP was set at build time".into());
    }
    let clang = std::env::var("TURNPIKE_CLANG").unwrap_or_else(|_| "clang".into());
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| e.to_string())?);
    for name in ["relay", "tools"] {
        let output = Command::new(&clang)
            .args(["-O2", "-g", "-Wall", "-target", "bpf"])
            .arg(multiarch_include())
            .args(["-c", &format!("bpf/{name}.c"), "-o"])
            .arg(out_dir.join(format!("{name}.o")))
            .output()
            .map_err(|e| format!("{clang} could not be run ({e}); install clang and libbpf-dev"))?;
        if !output.status.success() {
            let err = String::from_utf8_lossy(&output.stderr);
            let first = err
                .lines()
                .find(|l| l.contains("error"))
                .unwrap_or("failed");
            return Err(format!("{clang} failed on bpf/{name}.c: {first}"));
        }
        for l in String::from_utf8_lossy(&output.stderr).lines() {
            if l.contains("warning") {
                println!("cargo::warning=bpf/{name}.c: {l}");
            }
        }
    }
    Ok(clang)
}
