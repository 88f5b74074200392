//! Buffers for content: the bytes of one version ([`body`]), readable while they still arrive,
//! and the pool of recycled buffers with its fault-ahead helper ([`pool`]). The `unsafe` code
//! of fhirfs that touches memory is here.

pub mod body;
pub mod pool;
