//! The request path as authorized: normalized by [`crate::path`], a leaf module that the
//! config's rule checks use too, so neither `config` nor `auth` depends on the other.

pub use crate::path::{as_decoded, normalize, readings, PathError};
