//! turnpike wire formats.
#![forbid(unsafe_code)]
