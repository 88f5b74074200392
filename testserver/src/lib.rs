//! FHIR servers for fhirfs's tests and benchmarks, kept out of the product.
//!
//! - [`loopback`]: an in-process server on 127.0.0.1 that tests drive: Binaries put and
//!   deleted at will, faults per id, on searches or at random, quirk modes of real servers,
//!   gates that hold answers, and request counts to assert on.
//! - `bench_server` (a binary, `src/bin/bench_server.rs`): a fast server of thousands of
//!   generated Binaries, with latency, for `bench/`.
//! - [`fhir`]: what both render alike: content negotiation and `_elements`/`_summary`.
//! - [`noise`]: deterministic test data.

pub mod fhir;
pub mod loopback;

/// The id fhirfs reads at start-up to check the server and the token (`fhirfs::PROBE_ID`;
/// a test checks that the two agree).
pub const PROBE_ID: &str = "00000000-0000-0000-0000-000000000000";

/// Deterministic pseudo-random bytes (xorshift) for test and benchmark data: the same `seed`
/// always gives the same bytes, so failures can be reproduced.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
