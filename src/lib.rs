//! fhirfs: a FHIR server's Binary resources as a read-only folder.
//!
//! The modules, from the kernel inwards:
//! - [`fuse`]: the only place that speaks fuser; forwards each operation to the core.
//! - [`fs`]: the core (`FhirFs`): inodes, metadata, listing and content caches.
//! - [`body`]: the bytes of one version, readable while they still arrive.
//! - [`pool`]: recycled content buffers.
//! - [`readahead`]: recognising a walk through the folder, and what may be fetched ahead.
//! - [`source`]: the `Source` trait and the in-memory source.
//! - [`http`]: the HTTP source (`HttpSource`) that talks to a FHIR server.
//! - [`auth`]: the bearer token: fixed, from a file that is re-read, renewed after a 401.
//! - [`fhir`]: parsing of Binary resources and searchset Bundles.
//! - [`json_body`]: decoding a Binary's JSON while it streams in.
//! - [`limit`]: how many requests may be in flight at once, readers first.
//! - [`id`]: which names are FHIR ids.
//! - [`error`]: error types and the errno table.
//! - [`smart`]: SMART Backend Services client (signed assertions, token endpoint).
//! - [`stats`]: counters, logged on SIGUSR1.
//! - [`run`]: the runtime, the mount, signals and readiness.
//! - [`cli`]: command-line options, and mount-style `-o` options.
//! - [`daemon`]: going to the background when mount(8) starts fhirfs.
//! - [`loopback`]: an in-process FHIR server for the demo and the tests.

pub mod auth;
pub mod body;
pub mod cli;
pub mod daemon;
pub mod error;
pub mod fhir;
pub mod fs;
pub mod fuse;
pub mod http;
pub mod id;
pub mod json_body;
pub mod limit;
pub mod loopback;
pub mod pool;
pub mod readahead;
pub mod run;
pub mod smart;
pub mod source;
pub mod stats;
