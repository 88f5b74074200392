//! The bearer token: none, fixed, a file another process rewrites, or SMART Backend Services;
//! renewed before it expires and once after a 401.
//!
//! - this module: token sources (fixed, a file re-read when it changes, SMART) and `Secret`;
//! - [`smart`]: the SMART Backend Services client (signed assertions, the token endpoint).

pub mod smart;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use reqwest::header::HeaderValue;
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::error::SourceError;
use smart::SmartClient;

/// A SMART token is renewed when less than this part of its life is left (but at most a
/// minute before it expires), so requests never race its expiry.
const RENEW_BEFORE_FRACTION: u32 = 5;
const RENEW_BEFORE_MAX: Duration = Duration::from_secs(60);

/// A bearer token. Its `Debug` never shows the value, so it cannot leak into logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a token, trimming surrounding whitespace (token files end with a newline).
    pub fn new(token: &str) -> Option<Self> {
        let token = token.trim();
        (!token.is_empty()).then(|| Self(token.to_owned()))
    }

    /// The `Authorization` header value, marked sensitive so that it is never logged.
    pub fn bearer(&self) -> Result<HeaderValue, SourceError> {
        let mut value = HeaderValue::from_str(&format!("Bearer {}", self.0)).map_err(|_| {
            SourceError::Config("the token has characters a header cannot carry".into())
        })?;
        value.set_sensitive(true);
        Ok(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Where the token comes from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// No token: no Authorization header.
    None,
    /// A token given once (from `FHIRFS_TOKEN`).
    Static(Secret),
    /// A file, read again whenever it changes and after a 401 (`--token-file`).
    File(PathBuf),
    /// SMART Backend Services (`--smart-client-id`, `--smart-key`).
    Smart(Arc<SmartClient>),
}

struct SmartState {
    token: Secret,
    renew_at: Option<Instant>,
}

#[derive(Default)]
struct FileState {
    token: Option<Secret>,
    modified: Option<SystemTime>,
}

/// Hands out the current token and renews it.
pub struct Auth {
    source: TokenSource,
    file: Mutex<FileState>,
    // Held while a token is fetched: concurrent requests wait for that one token.
    smart: Mutex<Option<SmartState>>,
    client: reqwest::Client,
    base: url::Url,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth").field("source", &self.source).finish_non_exhaustive()
    }
}

/// Why a token file gave no token.
#[derive(Debug, thiserror::Error)]
enum TokenFileError {
    /// The file could not be read.
    #[error("cannot read the token file {}: {source}", path.display())]
    Unreadable {
        /// The token file.
        path: std::path::PathBuf,
        /// What reading it said.
        source: std::io::Error,
    },
    /// The file holds nothing but whitespace.
    #[error("the token file {} is empty", path.display())]
    Empty {
        /// The token file.
        path: std::path::PathBuf,
    },
}

fn read_token_file(path: &std::path::Path) -> Result<Secret, TokenFileError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| TokenFileError::Unreadable { path: path.to_owned(), source })?;
    Secret::new(&text).ok_or_else(|| TokenFileError::Empty { path: path.to_owned() })
}

impl Auth {
    /// Tokens from `source`; SMART requests go out through `client`, discovery from `base`.
    pub fn new(source: TokenSource, client: reqwest::Client, base: url::Url) -> Self {
        Self { source, file: Mutex::default(), smart: Mutex::default(), client, base }
    }

    /// The token to send now.
    pub async fn token(&self) -> Result<Option<Secret>, SourceError> {
        match &self.source {
            TokenSource::None => Ok(None),
            TokenSource::Static(secret) => Ok(Some(secret.clone())),
            TokenSource::File(path) => {
                let mut state = self.file.lock().await;
                let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
                if state.token.is_none() || modified != state.modified {
                    self.reload(&mut state, modified);
                }
                Ok(state.token.clone())
            }
            TokenSource::Smart(client) => {
                let mut state = self.smart.lock().await;
                let current =
                    state.as_ref().filter(|s| s.renew_at.is_none_or(|at| Instant::now() < at));
                if let Some(current) = current {
                    return Ok(Some(current.token.clone()));
                }
                let issued = self.issue(client).await?;
                let token = issued.token.clone();
                *state = Some(issued);
                Ok(Some(token))
            }
        }
    }

    async fn issue(&self, client: &SmartClient) -> Result<SmartState, SourceError> {
        let issued = client.issue(&self.client, &self.base).await.inspect_err(|e| {
            warn!(error = %e, "cannot get a SMART access token");
        })?;
        let renew_at = issued.lifetime.map(|life| {
            let early = (life / RENEW_BEFORE_FRACTION).min(RENEW_BEFORE_MAX);
            Instant::now() + life.saturating_sub(early)
        });
        info!(lifetime = ?issued.lifetime, "SMART access token issued");
        Ok(SmartState { token: issued.token, renew_at })
    }

    /// After a 401 for `used`: looks for a different token. True when the request is worth
    /// one more try.
    pub async fn renew(&self, used: Option<&Secret>) -> bool {
        match &self.source {
            TokenSource::None | TokenSource::Static(_) => false,
            TokenSource::Smart(client) => {
                let mut state = self.smart.lock().await;
                if state.as_ref().is_some_and(|s| Some(&s.token) != used) {
                    return true;
                }
                match self.issue(client).await {
                    Ok(issued) => {
                        *state = Some(issued);
                        true
                    }
                    Err(_) => false,
                }
            }
            TokenSource::File(path) => {
                let mut state = self.file.lock().await;
                // Another request may have reloaded it already; else read it again whatever
                // its time says (a rewrite within the same second keeps the mtime).
                if state.token.as_ref() == used {
                    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
                    self.reload(&mut state, modified);
                }
                state.token.is_some() && state.token.as_ref() != used
            }
        }
    }

    fn reload(&self, state: &mut FileState, modified: Option<SystemTime>) {
        let TokenSource::File(path) = &self.source else { return };
        match read_token_file(path) {
            Ok(token) => {
                if state.token.is_some() && state.token.as_ref() != Some(&token) {
                    info!(file = %path.display(), "token file changed: using the new token");
                }
                state.token = Some(token);
                state.modified = modified;
            }
            // Keep the last good token: a sidecar may be halfway through rewriting the file.
            Err(e) => warn!("{e}; keeping the previous token"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_show_in_debug() {
        let s = Secret::new(" tok-123\n").unwrap();
        assert_eq!(format!("{s:?}"), "Secret(..)");
        assert_eq!(Secret::new("  \n"), None);
        let base = url::Url::parse("http://h/fhir").unwrap();
        let auth = Auth::new(TokenSource::Static(s), reqwest::Client::new(), base);
        assert!(!format!("{auth:?}").contains("tok-123"));
    }

    #[tokio::test]
    async fn a_rewritten_token_file_is_used_and_renew_finds_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "one\n").unwrap();
        let base = url::Url::parse("http://h/fhir").unwrap();
        let auth = Auth::new(TokenSource::File(path.clone()), reqwest::Client::new(), base);
        let first = auth.token().await.unwrap();
        assert_eq!(first, Secret::new("one"));
        assert!(!auth.renew(first.as_ref()).await, "same token: no point retrying");
        std::fs::write(&path, "two").unwrap();
        assert!(auth.renew(first.as_ref()).await);
        assert_eq!(auth.token().await.unwrap(), Secret::new("two"));
        std::fs::remove_file(&path).unwrap();
        let kept = auth.token().await.unwrap();
        assert_eq!(kept, Secret::new("two"), "a missing file keeps the last token");
    }
}
