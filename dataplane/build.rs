//! Builds the XDP relay program (`bpf/relay.c`) and the test tools (`bpf/tools.c`) for the BPF target with clang, when
//! clang is there. Without it (or when it fails, or with `TURNPIKE_NO_XDP` set) the crate
//! builds without the fast path and says why at run time (`TURNPIKE_XDP_OFF`). No object
//! is committed: the program is always built from its source.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(turnpike_xdp)");
    println!("cargo::rerun-if-changed=bpf/relay.c");
    println!("cargo::rerun-if-changed=bpf/relay.h");
    println!("cargo::rerun-if-changed=bpf/tools.c");
    println!("cargo::rerun-if-env-changed=TURNPIKE_CLANG");
    println!("cargo::rerun-if-env-changed=TURNPIKE_NO_XDP");
    println!("cargo::rerun-if-env-changed=PATH");
    // Installing clang later builds the program then: a missing file counts as changed.
    println!("cargo::rerun-if-changed={}", clang_path().display());
    match build() {
        Ok(()) => {
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

fn build() -> Result<(), String> {
    if std::env::var_os("TURNPIKE_NO_XDP").is_some() {
        return Err("TURNPIKE_NO_XDP was set at build time".into());
    }
    let clang = std::env::var("TURNPIKE_CLANG").unwrap_or_else(|_| "clang".into());
    // <asm/types.h> lives under the target's multiarch directory on Debian.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = match arch.as_str() {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        other => other,
    };
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| e.to_string())?);
    for name in ["relay", "tools"] {
        let output = Command::new(&clang)
            .args(["-O2", "-g", "-Wall", "-target", "bpf"])
            .arg(format!("-I/usr/include/{multiarch}"))
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
    Ok(())
}
