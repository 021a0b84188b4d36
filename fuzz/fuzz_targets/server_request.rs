//! keyward's HTTP/1.1 server (with its hand-off to hyper) against hyper's server alone, on
//! libFuzzer's client byte streams: both must answer alike
//! (`keyward::proxy::h1::server::differential`).
#![no_main]

use keyward::proxy::h1::server::differential::{check, Case};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(case) = Case::from_fuzz(data) {
        if let Err(disagreement) = check(&case) {
            panic!("{disagreement}");
        }
    }
});
