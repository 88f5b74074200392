//! Error types, and the one table that turns them into errno values.

use std::time::Duration;

/// What went wrong while talking to the FHIR server (or the in-memory source).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The server answered 401: the token is missing, wrong or expired.
    #[error("authentication failed (401)")]
    Unauthorized,
    /// The server answered 403: the token lacks the scope for this resource.
    #[error("forbidden (403)")]
    Forbidden,
    /// The server answered 404.
    #[error("not found (404)")]
    NotFound,
    /// The server answered 410: the resource was deleted.
    #[error("gone (410)")]
    Gone,
    /// Any other unexpected HTTP status (400, other 4xx, 5xx).
    #[error("server answered status {0}")]
    Status(u16),
    /// The body could not be understood (malformed JSON, wrong resourceType, bad base64...).
    #[error("bad response body: {0}")]
    BadBody(String),
    /// The connection failed or broke mid-way.
    #[error("network error: {0}")]
    Transport(String),
    /// The whole fetch took longer than the configured deadline.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// A fetch made ahead of a reader gave way: its content would not fit what is admitted
    /// ahead. Never a program's error: a reader that wants the file fetches it itself.
    #[error("a fetch ahead gave way (too large to hold ahead of the reader)")]
    Declined,
    /// The configuration cannot work (a base URL that cannot take a path, a CA file without
    /// certificates, a token a header cannot carry, a key that cannot sign): no request is
    /// sent.
    #[error("{0}")]
    Config(String),
    /// The Binary is larger than `--max-size`.
    #[error("larger than the limit of {limit} bytes")]
    TooLarge {
        /// The configured limit in bytes.
        limit: u64,
    },
}

impl SourceError {
    /// The error for an HTTP status that is not a success.
    pub fn from_status(status: u16) -> Self {
        match status {
            401 => Self::Unauthorized,
            403 => Self::Forbidden,
            404 => Self::NotFound,
            410 => Self::Gone,
            other => Self::Status(other),
        }
    }
}

/// An error of a filesystem operation, as the core returns it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    /// The source failed for this id.
    #[error("{id}: {source}")]
    Source {
        /// The Binary id (or `Binary?` for a search).
        id: String,
        /// What the source said.
        source: SourceError,
    },
    /// The name can never be a Binary, or the inode is unknown.
    #[error("no such file")]
    NoEntry,
    /// The operation needs a directory.
    #[error("not a directory")]
    NotDir,
    /// The operation needs a file.
    #[error("is a directory")]
    IsDir,
    /// The mount is read-only.
    #[error("read-only file system")]
    ReadOnly,
    /// The file handle is not (or no longer) open.
    #[error("bad file handle")]
    BadHandle,
    /// The extended attribute does not exist.
    #[error("no such attribute")]
    NoAttr,
    /// The caller's buffer is too small for the answer.
    #[error("buffer too small")]
    Range,
}

impl FsError {
    /// The errno a program sees. This is the only errno table in fhirfs.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Source { source, .. } => match source {
                SourceError::Unauthorized | SourceError::Forbidden => libc::EACCES,
                SourceError::NotFound | SourceError::Gone => libc::ENOENT,
                SourceError::TooLarge { .. } => libc::EFBIG,
                SourceError::Status(_)
                | SourceError::BadBody(_)
                | SourceError::Transport(_)
                | SourceError::Timeout(_)
                | SourceError::Declined
                | SourceError::Config(_) => libc::EIO,
            },
            Self::NoEntry => libc::ENOENT,
            Self::NotDir => libc::ENOTDIR,
            Self::IsDir => libc::EISDIR,
            Self::ReadOnly => libc::EROFS,
            Self::BadHandle => libc::EBADF,
            Self::NoAttr => libc::ENODATA,
            Self::Range => libc::ERANGE,
        }
    }

    /// Wraps a source error with the id it concerns.
    pub fn source(id: &str, source: SourceError) -> Self {
        Self::Source { id: id.to_owned(), source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errno_of_status(status: u16) -> i32 {
        FsError::source("x", SourceError::from_status(status)).errno()
    }

    #[test]
    fn http_statuses_map_to_the_documented_errno() {
        assert_eq!(errno_of_status(401), libc::EACCES);
        assert_eq!(errno_of_status(403), libc::EACCES);
        assert_eq!(errno_of_status(404), libc::ENOENT);
        assert_eq!(errno_of_status(410), libc::ENOENT);
        for status in [400, 405, 406, 409, 422, 429, 500, 502, 503, 504] {
            assert_eq!(errno_of_status(status), libc::EIO, "{status}");
        }
    }

    #[test]
    fn bodies_and_transport_are_eio() {
        for e in [
            SourceError::BadBody("x".into()),
            SourceError::Transport("reset".into()),
            SourceError::Timeout(Duration::from_secs(1)),
        ] {
            assert_eq!(FsError::source("x", e).errno(), libc::EIO);
        }
        assert_eq!(FsError::source("x", SourceError::TooLarge { limit: 1 }).errno(), libc::EFBIG);
        assert_eq!(FsError::ReadOnly.errno(), libc::EROFS);
        assert_eq!(FsError::NoEntry.errno(), libc::ENOENT);
    }
}
