//! How many requests may be in flight at once (`--max-requests`), with readers first.
//!
//! Every request to the server holds a [`Permit`] from when it is sent until its body is read
//! (or given up). Fetches made ahead of a reader ([`Ahead`]) may hold only part of the
//! permits, so that a reader's own request always finds one free soon; and a fetch ahead that
//! a reader starts to wait for stops queueing behind other fetches ahead at once.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::source::Ahead;

/// Requests in flight by default. A backup that stats every file before it opens any (rsync)
/// makes two requests per file; at 50 ms a request, 16 in flight left it slower than eight
/// curls at a time, 32 did not (docs/benchmarks.md). HTTP/2 servers usually allow 100 streams
/// per connection; over HTTP/1.1 each request in flight is a keep-alive connection.
pub const DEFAULT_MAX_REQUESTS: usize = 32;

/// The share of the permits kept for readers: fetches ahead hold at most the rest.
const READER_SHARE: usize = 4;

/// How many of `max` places fetches ahead may hold.
fn ahead_share(max: usize) -> usize {
    (max - max / READER_SHARE).max(1)
}

/// The limit on requests in flight.
#[derive(Debug)]
pub struct Limiter {
    all: Arc<Semaphore>,
    ahead: Arc<Semaphore>,
}

/// One request's place; freed on drop.
#[derive(Debug)]
pub struct Permit {
    _all: Option<OwnedSemaphorePermit>,
    _ahead: Option<OwnedSemaphorePermit>,
}

impl Permit {
    /// A place outside any limit, for answers that unit tests make up.
    #[cfg(test)]
    pub(crate) fn unlimited() -> Self {
        Self { _all: None, _ahead: None }
    }
}

impl Limiter {
    /// At most `max` requests at once (at least one); fetches ahead get three quarters.
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        let ahead = ahead_share(max);
        Self { all: Arc::new(Semaphore::new(max)), ahead: Arc::new(Semaphore::new(ahead)) }
    }

    /// Waits for a place. A fetch ahead ([`Ahead::current`]) first waits for one of the places
    /// ahead, unless or until a reader waits for it.
    pub async fn acquire(&self) -> Permit {
        let mut ahead_permit = None;
        if let Some(ahead) = Ahead::current().filter(|a| !a.is_urgent()) {
            tokio::select! {
                permit = Arc::clone(&self.ahead).acquire_owned() => ahead_permit = permit.ok(),
                () = ahead.urgent() => {}
            }
        }
        // The semaphores are never closed: `ok()` only keeps this free of a panic path.
        let all = Arc::clone(&self.all).acquire_owned().await.ok();
        Permit { _all: all, _ahead: ahead_permit }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn fetches_ahead_leave_a_quarter_of_the_places_to_readers() {
        let limiter = Arc::new(Limiter::new(8));
        let ahead = Ahead::unbounded();
        let mut held = Vec::new();
        for _ in 0..6 {
            held.push(Arc::clone(&ahead).run(limiter.acquire()).await);
        }
        // A seventh fetch ahead waits...
        let waiting = tokio::spawn({
            let limiter = Arc::clone(&limiter);
            let ahead = Arc::clone(&ahead);
            async move { ahead.run(limiter.acquire()).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        // ...while two readers get theirs at once.
        let r1 = tokio::time::timeout(Duration::from_secs(5), limiter.acquire()).await;
        let r2 = tokio::time::timeout(Duration::from_secs(5), limiter.acquire()).await;
        assert!(r1.is_ok() && r2.is_ok(), "readers were held back by fetches ahead");
        drop((r1, r2));
        // Once a reader waits for it, the fetch ahead stops waiting for a place ahead.
        ahead.make_urgent();
        let urgent = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert!(urgent.is_ok(), "an urgent fetch still waited for a place ahead");
        assert_eq!(held.len(), 6);
    }

    #[test]
    fn fetches_ahead_hold_three_quarters_and_at_least_one_place() {
        assert_eq!(ahead_share(1), 1);
        assert_eq!(ahead_share(16), 12);
        assert_eq!(ahead_share(32), 24);
    }
}
