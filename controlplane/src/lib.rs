//! turnpike control plane.
#![forbid(unsafe_code)]
