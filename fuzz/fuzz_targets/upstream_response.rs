//! The upstream fast path against hyper's client, on libFuzzer's byte streams: both must
//! read every response alike (`keyward::proxy::h1::differential`).
#![no_main]

use keyward::proxy::h1::differential::{check, Case};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(case) = Case::from_fuzz(data) {
        if let Err(disagreement) = check(&case) {
            panic!("{disagreement}");
        }
    }
});
