//! The turnpike binary.
#![forbid(unsafe_code)]
fn main() {}
