//! turnpike data plane.
#![allow(unsafe_code)]
