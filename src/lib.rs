//! fhirfs: a FHIR server's Binary resources as a read-only folder.
//!
//! The layers, from the kernel inwards (each calls only the ones below it):
//! - [`fuse`]: the only place that speaks fuser; forwards each operation to the core.
//! - [`fs`]: the core (`FhirFs`): inodes and pins, the content cache, the listing and names,
//!   and read-ahead across files.
//! - [`source`]: the `Source` trait the core reads through, its data types, and fetches made
//!   ahead of a reader.
//! - [`http`]: the HTTP source (`HttpSource`): requests, retries, raw or JSON, resuming cut
//!   bodies, paging, and the limit on requests in flight.
//! - [`auth`]: the bearer token: fixed, from a file that is re-read, SMART Backend Services.
//! - [`fhir`]: Binary resources and searchset Bundles, and the streaming JSON decoder.
//! - [`buffer`]: the bytes of one version (`Body`) and the pool of recycled buffers.
//! - [`id`], [`error`], [`stats`]: FHIR ids, error types and the errno table, counters.
//!
//! Around them: [`run`] (the runtime, the mount, signals and readiness), [`cli`] (options),
//! [`daemon`] (going to the background under mount(8)) and [`loopback`] (an in-process FHIR
//! server for the demo and the tests).

pub mod auth;
pub mod buffer;
pub mod cli;
pub mod daemon;
pub mod error;
pub mod fhir;
pub mod fs;
pub mod fuse;
pub mod http;
pub mod id;
pub mod loopback;
pub mod manpage;
pub mod run;
pub mod source;
pub mod stats;
