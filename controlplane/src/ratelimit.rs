//! Rate limiting of unauthenticated requests and sampling of refusal log lines: the
//! implementation is [`turnpike_plane::limit`], shared with the data plane; this module
//! names it for the control plane's users.

pub use turnpike_plane::limit::{Limits, Rate, RefusalLog, TokenBucket, TwoLevelLimiter};
