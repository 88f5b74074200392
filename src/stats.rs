//! Counters for operations: cache hits and misses, bytes served, GETs by status, errors.
//! Logged on SIGUSR1 and at exit.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared by the core and the HTTP source.
#[derive(Debug, Default)]
pub struct Stats {
    /// Opens and lookups answered from cached content.
    pub cache_hits: AtomicU64,
    /// Content fetches (each one a request or more).
    pub cache_misses: AtomicU64,
    /// Bytes returned to programs by `read`.
    pub bytes_served: AtomicU64,
    /// Fetches and listings that failed (after retries).
    pub errors: AtomicU64,
    /// Files fetched ahead of a program walking the folder.
    pub read_ahead: AtomicU64,
    /// Listings in full.
    pub listings: AtomicU64,
    /// Refreshes of the listing by what changed.
    pub refreshes: AtomicU64,
    /// Nodes dropped after the kernel forgot them (neither listed, open nor cached).
    pub dropped: AtomicU64,
    /// HTTP answers by status (every try, retries included; 0 = no answer).
    statuses: Mutex<BTreeMap<u16, u64>>,
}

impl Stats {
    /// Counts one HTTP answer.
    pub fn count_status(&self, status: u16) {
        let mut statuses = self.statuses.lock().unwrap_or_else(|e| e.into_inner());
        *statuses.entry(status).or_default() += 1;
    }

    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// HTTP answers by status so far.
    pub fn statuses(&self) -> BTreeMap<u16, u64> {
        self.statuses.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        write!(
            f,
            "cache_hits={} cache_misses={} bytes_served={} errors={} read_ahead={} \
             listings={} refreshes={} dropped={} gets_by_status={{",
            get(&self.cache_hits),
            get(&self.cache_misses),
            get(&self.bytes_served),
            get(&self.errors),
            get(&self.read_ahead),
            get(&self.listings),
            get(&self.refreshes),
            get(&self.dropped)
        )?;
        for (i, (status, n)) in self.statuses().iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            write!(f, "{sep}{status}:{n}")?;
        }
        f.write_str("}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_lists_every_counter() {
        let stats = Stats::default();
        Stats::add(&stats.cache_hits, 2);
        Stats::add(&stats.bytes_served, 10);
        stats.count_status(200);
        stats.count_status(200);
        stats.count_status(404);
        assert_eq!(
            stats.to_string(),
            "cache_hits=2 cache_misses=0 bytes_served=10 errors=0 read_ahead=0 \
             listings=0 refreshes=0 dropped=0 gets_by_status={200:2,404:1}"
        );
    }
}
