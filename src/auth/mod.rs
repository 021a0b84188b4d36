//! Authentication: from a request head to a [`Decision`].
//!
//! `path` normalizes what is authorized and forwarded, `policy` is the config's rules,
//! `credential` finds the key, `decision` decides, `overrides` names what an allowed override
//! header makes the app serve, `reject` is the error table.

pub mod credential;
pub mod decision;
pub mod overrides;
pub mod path;
pub mod policy;
pub mod ratelimit;
pub mod reject;

pub use decision::{decide, AuthRequest, Decision, Principal};
pub use policy::{Policy, Route};
pub use reject::{Code, Reject};
