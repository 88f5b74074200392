//! Read-ahead across files: recognising a program that walks the folder, and the byte budget
//! of what is fetched ahead of it.
//!
//! Backup tools read a folder one file at a time: `cp -r`, `tar` and `find -exec cat` open
//! the files in listing order; rsync stats them all, sorts the names, then opens them in name
//! order. A [`Walker`] is told the position of every open in both orders; once a few opens in
//! a row step the same way through one of them (forward or backward, skipping at most
//! [`WALK_GAP`] - 1 files), it names the [`Walk`], and the core fetches the next files while
//! the current one is copied. A viewer that opens one file, or files out of order, is no walk.

use std::collections::HashMap;

use super::*;

/// How far apart two opens may be in an order and still step through it.
pub const WALK_GAP: usize = 3;

/// Steps in a row in one direction that make a walk: three opens.
pub const WALK_STEPS: u32 = 2;

/// Files fetched ahead of a walking reader by default (`--read-ahead`).
pub const DEFAULT_AHEAD_FILES: usize = 32;

/// The share of `--cache-size` that files fetched ahead, and not opened yet, may hold.
pub const CACHE_SHARE: u64 = 4;

/// What a file of unknown size is expected to take before any size of the walk is known.
const MIN_EXPECTED_BYTES: u64 = 64 << 10;

/// An order of the folder's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// The order of the server's listing (readdir order).
    Listing,
    /// Byte order of the names (rsync's order).
    Name,
}

/// Opens seen in one order.
#[derive(Debug, Default, Clone, Copy)]
struct Trend {
    last: Option<usize>,
    forward: bool,
    steps: u32,
}

impl Trend {
    fn step(&mut self, pos: usize) {
        self.steps = match self.last {
            Some(last) if pos != last && pos.abs_diff(last) <= WALK_GAP => {
                let forward = pos > last;
                let steps =
                    if self.steps > 0 && forward == self.forward { self.steps + 1 } else { 1 };
                self.forward = forward;
                steps
            }
            _ => 0,
        };
        self.last = Some(pos);
    }
}

/// A reader walking through an order: where it is, and which way it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Walk {
    /// The order it follows.
    pub order: Order,
    /// The position of its latest open.
    pub pos: usize,
    /// Towards the end (true) or the start.
    pub forward: bool,
}

impl Walk {
    /// The next `n` positions the walk will reach, in an order of `len` files.
    pub fn ahead(&self, n: usize, len: usize) -> Vec<usize> {
        if self.forward {
            (self.pos + 1..len.min(self.pos.saturating_add(n + 1))).collect()
        } else {
            (self.pos.saturating_sub(n)..self.pos.min(len)).rev().collect()
        }
    }
}

/// Recognises walks from the positions of opens.
#[derive(Debug, Default)]
pub struct Walker {
    listing: Trend,
    name: Trend,
}

impl Walker {
    /// Notes an open of a file at these positions (None: no listing names it); returns the
    /// walks it continues: none, the one of the order with the longer run of steps, or both
    /// while the opens fit both equally (a few files that neighbour in both orders).
    pub fn opened(&mut self, listing: Option<usize>, name: Option<usize>) -> Vec<Walk> {
        let (Some(listing), Some(name)) = (listing, name) else {
            *self = Self::default();
            return Vec::new();
        };
        self.listing.step(listing);
        self.name.step(name);
        let walk = |trend: &Trend, order, pos| {
            (trend.steps >= WALK_STEPS).then_some(Walk { order, pos, forward: trend.forward })
        };
        let by_listing = walk(&self.listing, Order::Listing, listing);
        let by_name = walk(&self.name, Order::Name, name);
        match self.listing.steps.cmp(&self.name.steps) {
            std::cmp::Ordering::Greater => by_listing.into_iter().collect(),
            std::cmp::Ordering::Less => by_name.into_iter().collect(),
            std::cmp::Ordering::Equal => by_listing.into_iter().chain(by_name).collect(),
        }
    }

    /// True when the latest open stepped through neither order: a walk under way stopped.
    pub fn broken(&self) -> bool {
        self.listing.steps == 0 && self.name.steps == 0
    }
}

/// Bytes held ahead of the reader, by id, within a limit.
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    held: HashMap<String, u64>,
    total: u64,
    /// The largest file seen in this walk: what a file of unknown size is expected to take.
    largest: u64,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Self {
        Self { limit, held: HashMap::new(), total: 0, largest: 0 }
    }

    /// The most bytes it holds.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes held now.
    #[cfg(test)]
    fn total(&self) -> u64 {
        self.total
    }

    /// Notes the size of a file of this walk.
    pub fn saw(&mut self, bytes: u64) {
        self.largest = self.largest.max(bytes);
    }

    /// What a file of unknown size is expected to take: the largest seen in this walk.
    pub fn expected(&self) -> u64 {
        self.largest.max(MIN_EXPECTED_BYTES)
    }

    /// Lets `id` hold `bytes` in all, if that fits; false (and only the size is noted) if not.
    pub fn admit(&mut self, id: &str, bytes: u64) -> bool {
        self.saw(bytes);
        let held = self.held.get(id).copied().unwrap_or(0);
        if bytes <= held {
            return true;
        }
        let total = self.total - held + bytes;
        if total > self.limit {
            return false;
        }
        self.total = total;
        self.held.insert(id.to_owned(), bytes);
        true
    }

    /// Lets go of what `id` holds (the reader got to it).
    pub fn release(&mut self, id: &str) {
        if let Some(bytes) = self.held.remove(id) {
            self.total -= bytes;
        }
    }

    /// Lets go of everything, and forgets the sizes seen (the walk is over).
    pub fn clear(&mut self) {
        *self = Self::new(self.limit);
    }

    /// Keeps only what the ids `keep` accepts hold.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.held.retain(|id, _| keep(id));
        self.total = self.held.values().sum();
    }
}

impl<S: Source> FhirFs<S> {
    /// Notes that a reader opened `ino`: it is no longer ahead of the reader, and the open may
    /// continue a walk, whose next files are then fetched.
    pub(super) fn opened_for_walk(self: &Arc<Self>, ino: u64, id: &str) {
        lock(&self.ahead_budget).release(id);
        if self.config.read_ahead == 0 {
            return;
        }
        // Positions in name order are set once that order is sorted.
        self.name_order();
        let (listing, name) = {
            let mut nodes = lock(&self.nodes);
            let Some(node) = nodes.by_ino.get(&ino) else { return };
            let positions = (node.index.get(), node.name_index.get());
            if let Some(size) = node.meta.size {
                lock(&self.ahead_budget).saw(size);
            }
            if nodes.walk.is_some_and(|(index, _)| Some(index) == positions.0) {
                nodes.walk_opened = true;
            }
            positions
        };
        let walks = {
            let mut ahead = lock(&self.ahead);
            let walks = ahead.walker.opened(listing, name);
            if walks.is_empty() && ahead.walker.broken() && std::mem::take(&mut ahead.walking) {
                // The walk stopped: what was fetched ahead stays cached, but holds no room.
                debug!("the walk through the folder stopped");
                ahead.tried.clear();
                lock(&self.ahead_budget).clear();
            }
            walks
        };
        self.read_ahead(&walks);
    }

    /// The next files of `walk`: inode, id and size (when known), within `--read-ahead`.
    pub(super) fn window(&self, walk: Walk) -> Vec<(u64, Arc<str>, Option<u64>)> {
        let inos: Vec<u64> = match walk.order {
            Order::Listing => {
                let order = Arc::clone(&lock(&self.order));
                let ahead = walk.ahead(self.config.read_ahead, order.len());
                ahead.into_iter().filter_map(|pos| order.ino_at(pos)).collect()
            }
            Order::Name => {
                let order = self.name_order();
                let ahead = walk.ahead(self.config.read_ahead, order.len());
                ahead.into_iter().map(|pos| order[pos]).collect()
            }
        };
        let nodes = lock(&self.nodes);
        let nodes = inos.into_iter().filter_map(|ino| Some((ino, nodes.by_ino.get(&ino)?)));
        nodes.map(|(ino, node)| (ino, node.id.clone(), node.meta.size)).collect()
    }

    /// Fetches ahead of `walks`; room held by files outside their windows (passed, or of a
    /// walk that turned) is let go first.
    pub(super) fn read_ahead(self: &Arc<Self>, walks: &[Walk]) {
        if walks.is_empty() {
            return;
        }
        let windows: Vec<_> = walks.iter().map(|walk| self.window(*walk)).collect();
        {
            let held: HashSet<&str> = windows.iter().flatten().map(|(_, id, _)| &**id).collect();
            lock(&self.ahead_budget).retain(|id| held.contains(id));
        }
        for (walk, window) in walks.iter().zip(windows) {
            self.read_ahead_files(walk.order, window);
        }
    }

    /// Fetches the files of a walk's `window` that are not cached or on their way, within the
    /// byte budget. Files the budget can never hold are left to their opens.
    pub(super) fn read_ahead_files(
        self: &Arc<Self>,
        order: Order,
        window: Vec<(u64, Arc<str>, Option<u64>)>,
    ) {
        let wanted: Vec<_> = window
            .into_iter()
            .filter(|(_, id, _)| {
                !self.known_missing(id)
                    && self.fresh_content(id).is_none()
                    && !lock(&self.inflight).contains_key(&**id)
            })
            .collect();
        let mut picked = Vec::new();
        {
            let mut ahead = lock(&self.ahead);
            ahead.walking = true;
            let mut budget = lock(&self.ahead_budget);
            for (ino, id, size) in wanted {
                if ahead.tried.contains(&ino) {
                    continue;
                }
                // A file of unknown size is expected to be as large as the largest seen in
                // this walk; its Content-Length, once in, decides (and may make it give way).
                let size = size.unwrap_or_else(|| budget.expected());
                if size > budget.limit() {
                    // Never held ahead whole: its open fetches it.
                    ahead.tried.insert(ino);
                    continue;
                }
                if !budget.admit(&id, size) {
                    // No room until the reader catches up.
                    break;
                }
                ahead.tried.insert(ino);
                picked.push(id);
            }
        }
        if !picked.is_empty() {
            debug!(files = picked.len(), ?order, "fetching ahead of a walk");
        }
        for id in picked {
            self.fetch_ahead(id.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The walk of the longer run after each open (the listing's when both fit equally).
    fn walk_of(positions: &[(usize, usize)]) -> Vec<Option<Walk>> {
        let mut walker = Walker::default();
        positions.iter().map(|&(l, n)| walker.opened(Some(l), Some(n)).first().copied()).collect()
    }

    #[test]
    fn three_opens_in_listing_order_are_a_walk() {
        let walks = walk_of(&[(0, 9), (1, 4), (2, 7)]);
        assert_eq!(walks[..2], [None, None]);
        assert_eq!(walks[2], Some(Walk { order: Order::Listing, pos: 2, forward: true }));
    }

    #[test]
    fn opens_that_fit_both_orders_equally_walk_both_until_one_runs_longer() {
        let mut walker = Walker::default();
        let walks: Vec<_> = [(10, 0), (11, 1), (13, 2), (40, 3)]
            .into_iter()
            .map(|(l, n)| walker.opened(Some(l), Some(n)))
            .collect();
        assert_eq!(walks[2].len(), 2, "{walks:?}");
        assert_eq!(walks[3], [Walk { order: Order::Name, pos: 3, forward: true }]);
    }

    #[test]
    fn name_order_is_recognised_when_the_listing_order_is_not_followed() {
        let walks = walk_of(&[(40, 0), (7, 1), (93, 2), (12, 3)]);
        assert_eq!(walks[2], Some(Walk { order: Order::Name, pos: 2, forward: true }));
        assert_eq!(walks[3], Some(Walk { order: Order::Name, pos: 3, forward: true }));
    }

    #[test]
    fn backward_walks_and_small_gaps_count() {
        let walks = walk_of(&[(10, 50), (9, 20), (7, 90), (6, 1)]);
        assert_eq!(walks[2], Some(Walk { order: Order::Listing, pos: 7, forward: false }));
        assert_eq!(walks[3].map(|w| w.pos), Some(6));
    }

    #[test]
    fn one_open_or_opens_out_of_order_are_no_walk() {
        assert_eq!(walk_of(&[(5, 5)]), [None]);
        assert!(walk_of(&[(5, 5), (2, 2), (9, 9), (1, 1), (30, 30)]).iter().all(Option::is_none));
        // A turn breaks the walk: forward, back, forward.
        assert!(walk_of(&[(1, 1), (2, 2), (1, 1), (2, 2)]).iter().all(Option::is_none));
        // The same file opened again and again is no walk either.
        assert!(walk_of(&[(3, 3), (3, 3), (3, 3)]).iter().all(Option::is_none));
    }

    #[test]
    fn an_unlisted_file_ends_the_walk() {
        let mut walker = Walker::default();
        for i in 0..3 {
            walker.opened(Some(i), Some(i));
        }
        assert!(!walker.broken());
        assert_eq!(walker.opened(None, None), []);
        assert!(walker.broken());
        assert_eq!(walker.opened(Some(3), Some(3)), []);
        assert!(walker.broken(), "one open after the break is no step yet");
        walker.opened(Some(4), Some(4));
        assert!(!walker.broken());
    }

    #[test]
    fn ahead_stays_within_the_order() {
        let forward = Walk { order: Order::Listing, pos: 7, forward: true };
        assert_eq!(forward.ahead(3, 100), [8, 9, 10]);
        assert_eq!(forward.ahead(3, 9), [8]);
        let backward = Walk { forward: false, ..forward };
        assert_eq!(backward.ahead(3, 100), [6, 5, 4]);
        assert_eq!(Walk { pos: 1, ..backward }.ahead(3, 100), [0]);
    }

    #[test]
    fn the_budget_never_holds_more_than_its_limit() {
        let mut budget = Budget::new(100);
        assert!(budget.admit("a", 60));
        assert!(!budget.admit("b", 41));
        assert!(budget.admit("b", 40));
        assert_eq!(budget.total(), 100);
        // Growing within what it holds is free; past the limit it is refused.
        assert!(budget.admit("a", 50));
        assert!(!budget.admit("a", 61));
        budget.release("a");
        assert_eq!(budget.total(), 40);
        budget.retain(|id| id != "b");
        assert_eq!(budget.total(), 0);
        assert!(budget.admit("c", 100));
        assert_eq!(budget.expected(), MIN_EXPECTED_BYTES);
        budget.saw(1 << 20);
        assert_eq!(budget.expected(), 1 << 20);
        budget.clear();
        assert_eq!((budget.total(), budget.expected()), (0, MIN_EXPECTED_BYTES));
    }
}
