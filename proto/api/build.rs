//! Generates the gRPC API from `proto/turnpike/v1/*.proto`, and the etcd v3
//! client from the vendored `proto/etcd/**/*.proto`.
//!
//! The .proto files are parsed by protox (pure Rust), so building needs no
//! `protoc`; tonic-prost-build turns the descriptors into messages, clients and
//! servers. The two sets are compiled in separate passes because they differ in
//! what is generated (turnpike's servers, etcd's clients only). Each package
//! becomes its own file in `OUT_DIR` (`turnpike.v1.rs`, `etcdserverpb.rs`,
//! `mvccpb.rs`, `v3electionpb.rs`), so the passes cannot overwrite each other.

use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};

/// The include root: `import` paths and package paths start here.
const INCLUDE_DIR: &str = "proto";
/// The files of package turnpike.v1, below the include root.
const PACKAGE_DIR: &str = "proto/turnpike/v1";
/// The vendored etcd files, below the include root (their imports pull in
/// `etcd/mvccpb/kv.proto`).
const ETCD_FILES: [&str; 2] = [
    "proto/etcd/etcdserverpb/rpc.proto",
    "proto/etcd/v3electionpb/v3election.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={INCLUDE_DIR}");

    let files = proto_files(Path::new(PACKAGE_DIR))?;
    let fds = protox::compile(&files, [INCLUDE_DIR])?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // No `connect` constructors: this crate does no I/O. Callers build a
        // `tonic::transport::Channel` and pass it to `*Client::new`.
        .build_transport(false)
        // Datagrams decode as `Bytes` slices of the receive buffer, not copies.
        .bytes(".turnpike.v1.PuntedRequest.datagram")
        .bytes(".turnpike.v1.SendDatagram.datagram")
        .compile_fds(fds)?;

    // etcd's services are only ever called: no server traits.
    let etcd = protox::compile(ETCD_FILES, [INCLUDE_DIR])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .build_transport(false)
        .compile_fds(etcd)?;
    Ok(())
}

/// The `.proto` files in `dir`, sorted so the output does not depend on the
/// order the file system lists them in.
fn proto_files(dir: &Path) -> Result<Vec<PathBuf>, Box<dyn Error>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "proto") {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(format!("no .proto files in {}", dir.display()).into());
    }
    Ok(files)
}
