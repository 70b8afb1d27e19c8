//! turnpike wire formats.
#![forbid(unsafe_code)]
pub mod api;
