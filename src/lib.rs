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
//! - [`fhir`]: Binary resources and searchset Bundles, and the streaming JSON decoder;
//!   DocumentReference and DiagnosticReport pages.
//! - [`documents`]: the documents view: names, and `DocumentsSource` (the view as a source).
//! - [`buffer`]: the bytes of one version (`Body`) and the pool of recycled buffers.
//! - [`id`], [`error`], [`stats`]: FHIR ids, error types and the errno table, counters.
//!
//! Around them: [`run`] (the runtime, the mount, signals and readiness), [`cli`] (options),
//! [`daemon`] (going to the background under mount(8)) and [`demo`] (the `--demo` server).
//! The test servers live in the `fhirfs-testserver` crate.

mod auth;
mod buffer;
pub mod cli;
pub mod daemon;
mod demo;
mod documents;
mod error;
mod fhir;
mod fs;
mod fuse;
mod http;
mod id;
pub mod manpage;
pub mod run;
mod source;
mod stats;

// What the binary, the tests and the benchmarks use; everything else stays inside the crate.
pub use auth::smart::{SmartClient, SmartConfig};
pub use auth::{Secret, TokenSource};
pub use buffer::body::Body;
pub use documents::source::{DocumentsConfig, DocumentsSource, VerifyHash};
pub use error::{FsError, SourceError};
pub use fhir::documents::{Document, DocumentPage, parse_document_page};
pub use fhir::json::JsonBinaryDecoder;
pub use fhir::{Binary, FhirError, decode_binary, decoded_len, format_instant, parse_bundle};
pub use fs::{DEFAULT_FULL_RELIST, FOLDER_INO_BASE, FhirFs, FsConfig, Kind, ROOT_INO};
pub use http::{FetchMode, HttpConfig, HttpSource, PROBE_ID};
pub use id::{id_from_name, is_valid_id};
#[cfg(feature = "test-util")]
pub use source::MemorySource;
pub use source::{Changes, Fetched, Listed, Reserve, Source, Streamed};
