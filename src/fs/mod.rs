//! The filesystem core: inodes, metadata, the listing and the content cache, over any `Source`.
//!
//! Methods are named after the FUSE operations and return plain structs; the FUSE adapter is
//! the only caller that knows about the kernel. Everything here can be driven from tests with a
//! `MemorySource`.
//!
//! - this module: `FhirFs` and its FUSE-named operations, inodes, attributes and pins;
//! - `cache`: the content cache (single-flight fetches, fetches ahead, failures);
//! - `listing`: the listing, the names, and size read-ahead for programs that stat in order;
//! - `folders`: folders under the root, for a source that puts its files in folders;
//! - [`readahead`]: read-ahead across files: recognising a walk, and the room for fetches
//!   ahead of it.

mod cache;
mod folders;
mod listing;
pub mod readahead;

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use tracing::{debug, warn};

use crate::buffer::body::Body;
use crate::error::{FsError, SourceError};
use crate::id::id_from_name;
use crate::source::{Ahead, Changes, Listed, Meta, Source, Streamed, refines};
use crate::stats::Stats;
pub use folders::FOLDER_INO_BASE;
use folders::{Folders, is_folder};
use readahead::{Budget, Order, Walk, Walker};

/// The inode of the mount's root folder (fixed by FUSE).
pub const ROOT_INO: u64 = 1;

/// The longest time the kernel may trust an attribute or a name before asking again. Kept short
/// so that a changed Binary shows up soon after the core learns about it.
pub const MAX_KERNEL_TTL: Duration = Duration::from_secs(1);

/// Block size reported by `stat`; `st_blocks` counts 512-byte units as POSIX says.
pub const BLOCK_SIZE: u32 = 4096;

/// How many listed files past the one being looked up get their size fetched ahead. `ls -l`,
/// `find` and `rsync` stat the entries in listing order, so a window keeps the server busy in
/// parallel instead of paying one round trip per file.
pub const SIZE_READAHEAD: usize = 64;

/// Lookups of neighbouring listed files (in listing order) before size read-ahead starts:
/// `ls -l` walks the folder, a viewer opening one file does not, and should not pay for it.
const READ_AHEAD_AFTER: u32 = 2;

/// How far apart two lookups may be in listing order and still count as a walk.
const WALK_GAP: usize = 3;

/// Fetches that size read-ahead may run at once.
pub const PREFETCH_PARALLELISM: usize = 16;

/// How long a 404 is remembered, so that programs probing for names (shells, file managers)
/// do not send a request each time. Short: the Binary may be created any moment.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(2);

/// The most nodes a listing's `Bundle.total` reserves room for at once: a server's total is
/// only a hint, and must not make the mount take gigabytes before the entries come.
const MAX_RESERVE: usize = 4_000_000;

/// Remembered 404s beyond which expired ones are swept out.
const MAX_NEGATIVE: usize = 10_000;

/// How long refreshes ask only for what changed before a full listing (`--full-relist`):
/// a server that cannot report deletions shows them after this at the latest.
pub const DEFAULT_FULL_RELIST: Duration = Duration::from_secs(3600);

/// Settings of the core.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// How long a listing (and the metadata it brought) is trusted.
    pub dir_ttl: Duration,
    /// How long fetched content is served without asking the server again.
    pub cache_ttl: Duration,
    /// The content cache's capacity in bytes.
    pub cache_bytes: u64,
    /// Owner of every file and of the folder.
    pub uid: u32,
    /// Group of every file and of the folder.
    pub gid: u32,
    /// Name files `<id>.<ext>` after their contentType.
    pub extensions: bool,
    /// Files fetched ahead of a program that walks the folder (0: none).
    pub read_ahead: usize,
    /// How long refreshes may ask only for what changed before listing everything again
    /// (zero: every refresh lists everything).
    pub full_relist: Duration,
}

impl Default for FsConfig {
    fn default() -> Self {
        Self {
            dir_ttl: Duration::from_secs(60),
            cache_ttl: Duration::from_secs(300),
            cache_bytes: 512 << 20,
            uid: 0,
            gid: 0,
            extensions: false,
            read_ahead: readahead::DEFAULT_AHEAD_FILES,
            full_relist: DEFAULT_FULL_RELIST,
        }
    }
}

/// File or folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The root folder.
    Dir,
    /// A Binary.
    File,
}

/// Attributes of one inode, as `stat` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    /// Inode number, stable for an id within a mount.
    pub ino: u64,
    /// File or folder.
    pub kind: Kind,
    /// Exact size in bytes.
    pub size: u64,
    /// 512-byte blocks.
    pub blocks: u64,
    /// `meta.lastUpdated`; also used as ctime.
    pub mtime: SystemTime,
    /// Permission bits: 0444 for files, 0555 for the folder.
    pub perm: u16,
    /// Link count.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// How long the kernel may keep these attributes without asking again.
    pub ttl: Duration,
}

/// The result of `open`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// The file handle for `read` and `release`.
    pub fh: u64,
    /// The kernel may keep its page cache: the content is the same as at the last open.
    pub keep_cache: bool,
}

/// One entry of `readdir`, borrowed from the folder's snapshot: giving one costs no copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirEntry<'a> {
    /// Its inode.
    pub ino: u64,
    /// The offset to resume after this entry.
    pub next_offset: u64,
    /// File or folder.
    pub kind: Kind,
    /// Its name.
    pub name: &'a str,
}

/// Fetched bytes of one version of a Binary.
#[derive(Debug)]
pub struct Content {
    /// The decoded bytes, complete or still arriving.
    pub body: Arc<Body>,
    /// The version they belong to, when the server names versions.
    pub version_id: Option<String>,
    /// Changes whenever the bytes may have changed; equal generations mean equal bytes.
    pub generation: u64,
    /// When the server last confirmed these bytes.
    pub validated: Instant,
}

struct Node {
    /// The id, shared with the listing snapshots (one copy per Binary; `Nodes::by_id` finds
    /// it by its hash).
    id: Arc<str>,
    meta: NodeMeta,
    /// When the server last confirmed `meta` (by a listing or a fetch).
    checked: Stamp,
    /// When a listing last confirmed `meta`.
    listed: Stamp,
    /// What the kernel's page cache holds, from the last open (boxed, as `pin`).
    kernel: Option<Box<KernelPages>>,
    /// Position in the latest listing.
    index: Pos,
    /// Position in the latest listing sorted by name.
    name_index: Pos,
    /// How many lookups the kernel remembers (each answered lookup adds one, a FORGET takes
    /// its count away): at 0 the kernel holds no reference to this inode.
    lookups: u32,
    /// A size read-ahead fetch is queued or running.
    prefetching: bool,
    /// The version held by open files, if any (boxed: few files are open, every node has one).
    pin: Option<Box<Pin>>,
    /// The server's version changed while pinned: tell the kernel when the pin goes.
    changed_while_pinned: bool,
}

/// A position in a listing, or none: 4 bytes, where an `Option<u32>` takes 8 (a folder of
/// more than 4 billion files is not listed; a million nodes have two positions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos(u32);

impl Pos {
    const NONE: Pos = Pos(u32::MAX);

    fn new(index: usize) -> Self {
        u32::try_from(index).ok().filter(|&i| i != u32::MAX).map_or(Self::NONE, Pos)
    }

    fn get(self) -> Option<usize> {
        (self != Self::NONE).then_some(self.0 as usize)
    }

    fn is_some(self) -> bool {
        self != Self::NONE
    }
}

/// A moment as a node keeps it: nanoseconds since the first one this process took, or none
/// (8 bytes, where an `Option<Instant>` takes 16: a million nodes have two).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Stamp(u64);

impl Stamp {
    const NONE: Stamp = Stamp(0);

    fn base() -> Instant {
        static BASE: OnceLock<Instant> = OnceLock::new();
        *BASE.get_or_init(Instant::now)
    }

    fn now() -> Self {
        let base = Self::base();
        // 1 and up: 0 is none (584 years of nanoseconds fit).
        Stamp(u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1))
    }

    fn instant(self) -> Option<Instant> {
        (self.0 != 0).then(|| Self::base() + Duration::from_nanos(self.0))
    }
}

/// [`Meta`] as a node keeps it, for a million of them: the content type and the security
/// context (a handful of pairs across a server) held once for all nodes that share them, and
/// a version that is a number (as most servers count them) without an allocation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct NodeMeta {
    version_id: Option<Version>,
    last_updated: Option<SystemTime>,
    labels: Option<Arc<Labels>>,
    size: Option<u64>,
}

/// A content type and a security context, held once for every node that has both.
#[derive(Debug, PartialEq, Eq)]
struct Labels {
    content_type: Option<Box<str>>,
    security_context: Option<Box<str>>,
}

/// A `meta.versionId`: a number in its plain decimal form, or any other text.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Version {
    Number(u64),
    // Boxed twice, so that a version is 16 bytes (most are numbers).
    Text(Box<Box<str>>),
}

impl Version {
    fn new(text: &str) -> Self {
        match Self::number(text) {
            Some(n) => Self::Number(n),
            None => Self::Text(Box::new(Box::from(text))),
        }
    }

    /// The number `text` is in its canonical form: "01" or "+1" must come back as written.
    fn number(text: &str) -> Option<u64> {
        let canonical =
            text.bytes().all(|b| b.is_ascii_digit()) && (text == "0" || !text.starts_with('0'));
        if canonical { text.parse().ok() } else { None }
    }

    fn is(&self, text: &str) -> bool {
        match self {
            Self::Number(n) => Self::number(text) == Some(*n),
            Self::Text(own) => ***own == *text,
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::Text(text) => f.write_str(text),
        }
    }
}

impl NodeMeta {
    fn pack(meta: Meta, labels: &mut LabelSet) -> Self {
        Self {
            version_id: meta.version_id.as_deref().map(Version::new),
            last_updated: meta.last_updated,
            labels: labels.get(meta.content_type.as_deref(), meta.security_context.as_deref()),
            size: meta.size,
        }
    }

    fn unpack(&self) -> Meta {
        Meta {
            version_id: self.version_id.as_ref().map(Version::to_string),
            last_updated: self.last_updated,
            content_type: self.content_type().map(str::to_owned),
            security_context: self.security_context().map(str::to_owned),
            size: self.size,
        }
    }

    fn content_type(&self) -> Option<&str> {
        self.labels.as_ref()?.content_type.as_deref()
    }

    fn security_context(&self) -> Option<&str> {
        self.labels.as_ref()?.security_context.as_deref()
    }

    /// Whether this is `version` (both unknown counts as not the same).
    fn is_version(&self, version: Option<&str>) -> bool {
        matches!((&self.version_id, version), (Some(own), Some(v)) if own.is(v))
    }
}

/// The [`Labels`] of the nodes, each pair held once.
#[derive(Default)]
struct LabelSet {
    set: hashbrown::HashTable<Arc<Labels>>,
    hasher: hashbrown::DefaultHashBuilder,
}

impl LabelSet {
    fn hash(&self, content_type: Option<&str>, security_context: Option<&str>) -> u64 {
        std::hash::BuildHasher::hash_one(&self.hasher, (content_type, security_context))
    }

    /// The one copy of this pair (none for neither).
    fn get(
        &mut self,
        content_type: Option<&str>,
        security_context: Option<&str>,
    ) -> Option<Arc<Labels>> {
        if content_type.is_none() && security_context.is_none() {
            return None;
        }
        let hash = self.hash(content_type, security_context);
        let same = |held: &Arc<Labels>| {
            held.content_type.as_deref() == content_type
                && held.security_context.as_deref() == security_context
        };
        if let Some(held) = self.set.find(hash, same) {
            return Some(Arc::clone(held));
        }
        let labels = Arc::new(Labels {
            content_type: content_type.map(Box::from),
            security_context: security_context.map(Box::from),
        });
        let hasher = &self.hasher;
        self.set.insert_unique(hash, Arc::clone(&labels), |held| {
            let pair = (held.content_type.as_deref(), held.security_context.as_deref());
            std::hash::BuildHasher::hash_one(hasher, pair)
        });
        Some(labels)
    }
}

/// While a file is open anywhere, every program sees the version it was opened at: the kernel
/// keeps one page cache and one size per inode, not per open file, so serving a newer version
/// beside an older one would mix their bytes. The newer one shows from the first open after
/// the last close (close-to-open consistency, as NFS has).
struct Pin {
    content: Arc<Content>,
    meta: Meta,
    handles: u32,
}

/// The nodes, indexed by inode number. Inodes are handed out densely from 2 (a slot freed
/// by a FORGET is reused), so a vector holds them: a hash map of a million nodes would keep
/// about twice as many slots as nodes.
#[derive(Default)]
struct NodeTable(Vec<Node>);

impl NodeTable {
    fn slot(ino: u64) -> Option<usize> {
        usize::try_from(ino.checked_sub(ROOT_INO + 1)?).ok()
    }

    fn get(&self, ino: &u64) -> Option<&Node> {
        self.0.get(Self::slot(*ino)?)
    }

    fn get_mut(&mut self, ino: &u64) -> Option<&mut Node> {
        self.0.get_mut(Self::slot(*ino)?)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    /// Puts `node` in a free slot (reused) or a new one; returns its inode.
    fn put(&mut self, free: &mut Vec<u32>, node: Node) -> (u64, u32) {
        if let Some(slot) = free.pop() {
            self.0[slot as usize] = node;
            return (u64::from(slot) + ROOT_INO + 1, slot);
        }
        let slot = u32::try_from(self.0.len()).expect("fewer than 4 billion inodes");
        self.0.push(node);
        (u64::from(slot) + ROOT_INO + 1, slot)
    }

    fn values(&self) -> impl Iterator<Item = &Node> {
        self.0.iter()
    }
}

/// A set of file inodes, one bit each: inodes are dense, so a listing of a million files
/// checks its repeats in 125 KB, without hashing.
#[derive(Default)]
struct InoSet(Vec<u64>);

impl InoSet {
    /// Adds `ino`; false when it was in already.
    fn insert(&mut self, ino: u64) -> bool {
        let Some(slot) = NodeTable::slot(ino) else { return true };
        let (word, bit) = (slot / 64, 1u64 << (slot % 64));
        if word >= self.0.len() {
            self.0.resize(word + 1, 0);
        }
        let fresh = self.0[word] & bit == 0;
        self.0[word] |= bit;
        fresh
    }

    fn contains(&self, ino: u64) -> bool {
        let Some(slot) = NodeTable::slot(ino) else { return false };
        self.0.get(slot / 64).is_some_and(|word| word & (1u64 << (slot % 64)) != 0)
    }
}

/// The inode of each id: slots of [`NodeTable`], found by the hash of the node's own id, so
/// that a million ids cost 4 bytes a slot here instead of another pointer and inode each.
#[derive(Default)]
struct IdIndex {
    slots: hashbrown::HashTable<u32>,
    // foldhash, seeded per process: SipHash was a tenth of a cold listing's time.
    hasher: hashbrown::DefaultHashBuilder,
}

impl IdIndex {
    fn hash(&self, id: &str) -> u64 {
        std::hash::BuildHasher::hash_one(&self.hasher, id)
    }

    fn get(&self, table: &NodeTable, id: &str) -> Option<u64> {
        self.get_hashed(table, self.hash(id), id)
    }

    /// [`IdIndex::get`] with the id's hash.
    fn get_hashed(&self, table: &NodeTable, hash: u64, id: &str) -> Option<u64> {
        let found = self.slots.find(hash, |&slot| *table.0[slot as usize].id == *id)?;
        Some(u64::from(*found) + ROOT_INO + 1)
    }

    /// Takes the id of the node in `slot` of `table` out of the index.
    fn remove(&mut self, table: &NodeTable, slot: u32) {
        let id = &table.0[slot as usize].id;
        if let Ok(entry) = self.slots.find_entry(self.hash(id), |&s| s == slot) {
            entry.remove();
        }
    }

    /// Adds the node in `slot` of `table` (its id, of hash `hash`, not indexed yet).
    fn insert_hashed(&mut self, table: &NodeTable, hash: u64, slot: u32) {
        let hasher = &self.hasher;
        self.slots.insert_unique(hash, slot, |&s| {
            std::hash::BuildHasher::hash_one(hasher, &*table.0[s as usize].id)
        });
    }
}

#[derive(Default)]
struct Nodes {
    by_ino: NodeTable,
    by_id: IdIndex,
    /// Listed names that are not bare ids (`<id>.<ext>` with --extensions, or names the
    /// source gave).
    by_name: HashMap<String, u64>,
    /// Content types and security contexts of the nodes.
    labels: LabelSet,
    /// Slots of nodes dropped after the kernel forgot them, for new ids.
    free: Vec<u32>,
    /// Listing position of the last lookup that needed a size, and how many such lookups in
    /// a row walked forward through the listing.
    walk: Option<(usize, u32)>,
    /// The file of that lookup was opened since: the walker copies what it stats.
    walk_opened: bool,
}

/// The pages of a file the kernel's page cache holds: a content generation, and its version.
struct KernelPages {
    generation: u64,
    version: Option<String>,
}

impl Node {
    /// A slot whose node was dropped (see [`FhirFs::forget`]).
    fn vacant() -> Self {
        static EMPTY: OnceLock<Arc<str>> = OnceLock::new();
        Self::new(Arc::clone(EMPTY.get_or_init(|| Arc::from(""))))
    }

    /// The node of `id`, of which nothing is known yet.
    fn new(id: Arc<str>) -> Self {
        Node {
            id,
            meta: NodeMeta::default(),
            checked: Stamp::NONE,
            listed: Stamp::NONE,
            kernel: None,
            index: Pos::NONE,
            name_index: Pos::NONE,
            lookups: 0,
            prefetching: false,
            pin: None,
            changed_while_pinned: false,
        }
    }

    fn is_vacant(&self) -> bool {
        self.id.is_empty()
    }

    /// Joins the version open elsewhere (one more handle on its pin), unless its body failed
    /// and it is not `fetched` (this open's own fetch, shared with the open that pinned it).
    fn join_pin(&mut self, fetched: Option<&Arc<Content>>) -> Option<Arc<Content>> {
        let pin = self.pin.as_mut().filter(|pin| {
            !pin.content.body.failed() || fetched.is_some_and(|f| Arc::ptr_eq(&pin.content, f))
        })?;
        pin.handles += 1;
        Some(Arc::clone(&pin.content))
    }

    /// Whether the kernel may keep its pages for an open of `content` (they are its
    /// generation), and records that they are from now on.
    fn keeps_kernel_pages(&mut self, content: &Content) -> bool {
        let keep = self.kernel.as_ref().is_some_and(|k| k.generation == content.generation);
        let version = content.version_id.clone();
        self.kernel = Some(Box::new(KernelPages { generation: content.generation, version }));
        keep
    }
}

impl Nodes {
    /// Makes room for `more` nodes.
    fn reserve(&mut self, more: usize) {
        self.by_ino.0.reserve(more);
        let Self { by_ino, by_id, .. } = self;
        let hasher = &by_id.hasher;
        by_id.slots.reserve(more, |&s| {
            std::hash::BuildHasher::hash_one(hasher, &*by_ino.0[s as usize].id)
        });
    }

    /// The inode of `id`, if it has one.
    fn ino(&self, id: &str) -> Option<u64> {
        self.by_id.get(&self.by_ino, id)
    }

    /// The node of `id`, if it has one.
    fn node(&self, id: &str) -> Option<&Node> {
        self.by_ino.get(&self.ino(id)?)
    }

    fn ino_of(&mut self, id: &str) -> u64 {
        // Hashed once, for the search and the insertion: a listing does this a million times.
        let hash = self.by_id.hash(id);
        if let Some(ino) = self.by_id.get_hashed(&self.by_ino, hash, id) {
            return ino;
        }
        // Inodes count up from 2; one is reused only after the kernel forgot it (FORGET) and
        // nothing of it is left here (see `FhirFs::forget`).
        let (ino, slot) = self.by_ino.put(&mut self.free, Node::new(Arc::from(id)));
        self.by_id.insert_hashed(&self.by_ino, hash, slot);
        ino
    }

    /// Records what the server said about `id` at `now`: its inode, and whether the version
    /// changed (`Some(pinned)`: whether open files hold the old one).
    fn apply(&mut self, id: &str, meta: Meta, origin: Origin, now: Stamp) -> (u64, Option<bool>) {
        let ino = self.ino_of(id);
        let Self { by_ino, labels, .. } = self;
        let Some(node) = by_ino.get_mut(&ino) else {
            return (ino, None);
        };
        // Compared as kept, without unpacking: a listing does this a million times.
        let old = &node.meta;
        let version_changed = match (&old.version_id, meta.version_id.as_deref()) {
            (Some(a), Some(b)) => !a.is(b),
            _ => false,
        };
        let size_changed = matches!((old.size, meta.size), (Some(a), Some(b)) if a != b);
        // Without versions, a newer time is the only sign of a change. Whole seconds, since
        // `Last-Modified` drops the milliseconds that `meta.lastUpdated` has.
        let time_changed = old.version_id.is_none()
            && meta.version_id.is_none()
            && matches!((old.last_updated, meta.last_updated), (Some(a), Some(b))
                if a.duration_since(b).unwrap_or_else(|e| e.duration()) >= Duration::from_secs(1));
        let was_known = old.size.is_some() || old.version_id.is_some();
        if version_changed || size_changed || time_changed {
            node.meta = NodeMeta::pack(meta, labels);
            node.kernel = None;
        } else {
            let size = meta.size.or(old.size);
            let security_context = meta.security_context.as_deref().or(old.security_context());
            // The same version keeps its time: a listing's `meta.lastUpdated` has milliseconds,
            // a raw response's `Last-Modified` only seconds, and mtime must not flap. Only a
            // more precise time for the same second replaces it.
            let last_updated = match (old.last_updated, meta.last_updated) {
                (Some(o), Some(n)) if refines(o, n) => Some(n),
                (o, n) => o.or(n),
            };
            let labels = labels.get(meta.content_type.as_deref(), security_context);
            let version_id = meta.version_id.as_deref().map(Version::new);
            node.meta = NodeMeta { version_id, last_updated, labels, size };
        }
        node.checked = now;
        if origin == Origin::Listing {
            node.listed = now;
        }
        let changed = was_known && (version_changed || size_changed || time_changed);
        let pinned = node.pin.is_some();
        if changed && pinned {
            node.changed_while_pinned = true;
        }
        (ino, changed.then_some(pinned))
    }
}

/// A listing as readdir gives it: inode and name, in the server's order, growing while the
/// pages of its search arrive. A name that is the bare id shares the node's copy of it.
type Snapshot = Arc<Entries>;

/// The entries of one listing, and how far its search has come.
struct Entries {
    /// Inode and name of each entry (a leaf lock: readdir holds it while filling a reply).
    list: Mutex<Vec<(u64, Arc<str>)>>,
    /// Changes with every page, and when the search ends.
    fill: tokio::sync::watch::Sender<Fill>,
}

/// How far the search behind a listing has come.
#[derive(Debug, Clone)]
enum Fill {
    /// More pages may come.
    Filling,
    /// Every page is in.
    Done,
    /// The search failed after the entries in: reading past them fails.
    Failed(FsError),
}

impl Default for Entries {
    /// No entries, and no more to come.
    fn default() -> Self {
        Self { list: Mutex::default(), fill: tokio::sync::watch::Sender::new(Fill::Done) }
    }
}

impl Entries {
    fn filling() -> Arc<Self> {
        Arc::new(Self {
            list: Mutex::default(),
            fill: tokio::sync::watch::Sender::new(Fill::Filling),
        })
    }

    fn done(list: Vec<(u64, Arc<str>)>) -> Arc<Self> {
        Arc::new(Self { list: Mutex::new(list), fill: tokio::sync::watch::Sender::new(Fill::Done) })
    }

    fn len(&self) -> usize {
        lock(&self.list).len()
    }

    fn fill(&self) -> Fill {
        self.fill.borrow().clone()
    }

    fn is_done(&self) -> bool {
        matches!(*self.fill.borrow(), Fill::Done)
    }

    fn ino_at(&self, index: usize) -> Option<u64> {
        lock(&self.list).get(index).map(|(ino, _)| *ino)
    }

    /// Appends the entries of a page, and wakes those waiting for them.
    fn push(&self, entries: impl IntoIterator<Item = (u64, Arc<str>)>) {
        lock(&self.list).extend(entries);
        self.fill.send_modify(|_| {});
    }

    /// Makes `list` the entries (a listing that stopped streaming, published whole), and
    /// wakes those waiting for them.
    fn replace(&self, list: Vec<(u64, Arc<str>)>) {
        *lock(&self.list) = list;
        self.fill.send_modify(|_| {});
    }

    /// The search ended: every entry is in, or (`Err`) no more will come.
    fn end(&self, result: Result<(), FsError>) {
        lock(&self.list).shrink_to_fit();
        self.fill.send_replace(match result {
            Ok(()) => Fill::Done,
            Err(e) => Fill::Failed(e),
        });
    }

    /// Whether the entry at `index` is still on its way.
    fn pending(&self, index: usize) -> bool {
        matches!(*self.fill.borrow(), Fill::Filling) && self.len() <= index
    }

    /// Waits until the entry at `index` is in, or the search has ended (`Err`: it failed
    /// before reaching it). With `usize::MAX`, until the search has ended.
    async fn ready(&self, index: usize) -> Result<(), FsError> {
        let mut fill = self.fill.subscribe();
        loop {
            // Checked after subscribing, so a page that arrives in between is not missed.
            let state = fill.borrow_and_update().clone();
            if self.len() > index {
                return Ok(());
            }
            match state {
                Fill::Filling => {}
                Fill::Done => return Ok(()),
                Fill::Failed(e) => return Err(e),
            }
            // The sender lives in `self`, so the channel cannot close while we wait.
            if fill.changed().await.is_err() {
                return Ok(());
            }
        }
    }
}

/// A content cache entry: the bytes, which eviction takes out at once.
#[derive(Clone)]
struct Slot {
    content: Arc<Mutex<Option<Arc<Content>>>>,
    weight: u32,
}

impl Slot {
    fn new(content: Arc<Content>) -> Self {
        let weight = u32::try_from(content.body.len()).unwrap_or(u32::MAX);
        Self { content: Arc::new(Mutex::new(Some(content))), weight }
    }

    /// Room for content on its way.
    fn reserved(weight: u32) -> Self {
        Self { content: Arc::new(Mutex::new(None)), weight }
    }

    fn get(&self) -> Option<Arc<Content>> {
        lock(&self.content).clone()
    }

    fn empty(&self) {
        lock(&self.content).take();
    }
}

/// Where news about a Binary came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// A search page.
    Listing,
    /// A HEAD: metadata without content.
    Stat,
    /// A GET that brought the content.
    Fetch,
}

struct Listing {
    /// When the server last confirmed it (a full listing or a refresh).
    at: Instant,
    /// When it was last listed in full.
    full_at: Instant,
    entries: Snapshot,
}

enum Handle {
    File { ino: u64, content: Arc<Content> },
    Dir(Snapshot),
}

type SharedFetch = Shared<BoxFuture<'static, Result<Arc<Content>, SourceError>>>;

/// A fetch under way, and whether it was made ahead of a reader.
struct Inflight {
    fetch: SharedFetch,
    ahead: Option<Arc<Ahead>>,
}

/// Read-ahead across files (see [`crate::fs::readahead`]).
struct ReadAhead {
    walker: Walker,
    /// Files fetched ahead in this walk, each once (even when that failed or gave way).
    tried: HashSet<u64>,
    /// A walk is under way.
    walking: bool,
}

/// Called with an inode whose attributes or bytes changed, so the kernel can drop its caches.
pub type Invalidator = Box<dyn Fn(u64) + Send + Sync>;

/// The filesystem core.
///
/// # Locks
///
/// Every lock is held briefly and never across an `.await`, except `listing`. When two are held
/// at once they are taken in this order, and never the other way round:
///
/// 1. `listing` (async; held while a refresh asks what changed, so concurrent callers wait for
///    one request; a full listing fills its `Entries` from a task of its own, without it);
/// 2. `inflight` (the fetch map: checked and filled under one lock, for single-flight);
/// 3. `handles`;
/// 4. `ahead`, then `ahead_budget`;
/// 5. `nodes`;
/// 6. the leaves, which take no other lock while held: `ahead_budget` (also taken under
///    `nodes`), `oversize`, `missing`, `order`, `by_name_order`, `folders`, and the entries
///    of a listing (`Entries::list`, taken under `nodes`, or alone by readdir while it fills
///    a reply).
///
/// The moka cache (`content`) has its own locking; its eviction listener only empties a slot.
pub struct FhirFs<S: Source> {
    source: Arc<S>,
    config: FsConfig,
    nodes: Mutex<Nodes>,
    // A tokio mutex, held across a refresh: concurrent callers wait for one request.
    listing: tokio::sync::Mutex<Option<Listing>>,
    content: moka::sync::Cache<String, Slot>,
    inflight: Mutex<HashMap<String, Inflight>>,
    /// Walks seen, and what was fetched ahead of them.
    ahead: Mutex<ReadAhead>,
    /// Bytes held by files fetched ahead and not opened yet (shared with their fetches).
    ahead_budget: Arc<Mutex<Budget>>,
    /// The latest listing's inodes in name order, for walks in name order.
    by_name_order: Mutex<Option<Arc<Vec<u64>>>>,
    /// Ids the server answered 404 for, and when.
    missing: Mutex<HashMap<String, Instant>>,
    /// The last file fetched that is larger than the whole cache: kept (one at a time) so that
    /// the `open` after the `stat` that fetched it does not fetch it again.
    oversize: Mutex<Option<(String, Arc<Content>)>>,
    handles: Mutex<HashMap<u64, Handle>>,
    /// The latest listing, in order, for size read-ahead.
    order: Mutex<Snapshot>,
    /// The folders under the root, for a source that has folders.
    folders: Mutex<Folders>,
    prefetch_permits: Arc<tokio::sync::Semaphore>,
    next_fh: AtomicU64,
    next_generation: AtomicU64,
    invalidator: OnceLock<Invalidator>,
    stats: Arc<Stats>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the whole mount down with a poisoned lock.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn is_fresh(at: Option<Instant>, ttl: Duration) -> bool {
    at.is_some_and(|at| at.elapsed() < ttl)
}

impl<S: Source> FhirFs<S> {
    /// A core over `source`, with its own counters.
    pub fn new(source: S, config: FsConfig) -> Arc<Self> {
        Self::with_stats(source, config, Arc::default())
    }

    /// A core over `source` that counts into `stats` (shared with the source).
    pub fn with_stats(source: S, config: FsConfig, stats: Arc<Stats>) -> Arc<Self> {
        crate::buffer::pool::limit_to(usize::try_from(config.cache_bytes).unwrap_or(usize::MAX));
        let content = moka::sync::Cache::builder()
            .max_capacity(config.cache_bytes)
            // Plain LRU: TinyLFU's admission would turn away a file just fetched for `stat`
            // when the cache is full, and the `open` right after would fetch it again.
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .weigher(|_id: &String, slot: &Slot| slot.weight)
            // moka frees a removed entry only once its concurrent map's epoch moves on; the
            // bytes must go at once, or the cache quietly holds more than its size.
            .eviction_listener(|_id, slot: Slot, _cause| slot.empty())
            .build();
        let ahead_budget = Budget::new(config.cache_bytes / readahead::CACHE_SHARE);
        Arc::new(Self {
            source: Arc::new(source),
            config,
            nodes: Mutex::default(),
            listing: tokio::sync::Mutex::new(None),
            content,
            inflight: Mutex::default(),
            ahead: Mutex::new(ReadAhead {
                walker: Walker::default(),
                tried: HashSet::new(),
                walking: false,
            }),
            ahead_budget: Arc::new(Mutex::new(ahead_budget)),
            by_name_order: Mutex::default(),
            missing: Mutex::default(),
            oversize: Mutex::default(),
            handles: Mutex::default(),
            order: Mutex::default(),
            folders: Mutex::default(),
            prefetch_permits: Arc::new(tokio::sync::Semaphore::new(PREFETCH_PARALLELISM)),
            next_fh: AtomicU64::new(1),
            next_generation: AtomicU64::new(1),
            invalidator: OnceLock::new(),
            stats,
        })
    }

    /// The source behind this core.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Sets the hook that tells the kernel to drop cached attributes and pages of an inode.
    pub fn set_invalidator(&self, invalidator: Invalidator) {
        let _ = self.invalidator.set(invalidator);
    }

    /// How long the kernel may cache attributes and names.
    pub fn kernel_ttl(&self) -> Duration {
        self.config.dir_ttl.min(MAX_KERNEL_TTL)
    }

    fn invalidate_kernel(&self, ino: u64) {
        if let Some(invalidate) = self.invalidator.get() {
            invalidate(ino);
        }
    }

    fn root_attr(&self) -> Attr {
        Attr {
            ino: ROOT_INO,
            kind: Kind::Dir,
            size: 0,
            blocks: 0,
            mtime: UNIX_EPOCH,
            perm: 0o555,
            nlink: 2,
            uid: self.config.uid,
            gid: self.config.gid,
            ttl: self.kernel_ttl(),
        }
    }

    fn file_attr(&self, ino: u64, last_updated: Option<SystemTime>, size: u64) -> Attr {
        Attr {
            ino,
            kind: Kind::File,
            size,
            blocks: size.div_ceil(512),
            // Without lastUpdated or Last-Modified, the epoch at least stays stable.
            mtime: last_updated.unwrap_or(UNIX_EPOCH),
            perm: 0o444,
            nlink: 1,
            uid: self.config.uid,
            gid: self.config.gid,
            ttl: self.kernel_ttl(),
        }
    }

    /// Attributes of `id` when its size is known and its metadata is fresh.
    fn fresh_attr(&self, id: &str) -> Option<Attr> {
        let nodes = lock(&self.nodes);
        let ino = nodes.ino(id)?;
        let node = nodes.by_ino.get(&ino)?;
        if let Some(pin) = &node.pin {
            // Not cached by the kernel: the pin may go any moment (the kernel closes files
            // without waiting for us), and then a newer version may show.
            let attr = self.file_attr(ino, pin.meta.last_updated, pin.content.body.len());
            return Some(Attr { ttl: Duration::ZERO, ..attr });
        }
        let size = node.meta.size?;
        is_fresh(node.checked.instant(), self.config.dir_ttl)
            .then(|| self.file_attr(ino, node.meta.last_updated, size))
    }

    /// Records what the server said about `id`; returns its inode. A new version drops the
    /// cached bytes and tells the kernel to drop its caches.
    fn apply_meta(&self, id: &str, meta: Meta, origin: Origin) -> u64 {
        let mut nodes = lock(&self.nodes);
        let (ino, change) = nodes.apply(id, meta, origin, Stamp::now());
        drop(nodes);
        if let Some(pinned) = change {
            self.changed(id, ino, pinned, origin);
        }
        ino
    }

    /// [`FhirFs::apply_meta`] for a page of a listing, under one lock: the inode of each file,
    /// in order. Takes each file's `meta`, leaving its id, name and folder.
    fn apply_listed(&self, page: &mut [Listed]) -> Vec<u64> {
        let now = Stamp::now();
        let mut inos = Vec::with_capacity(page.len());
        let mut changed = Vec::new();
        let mut nodes = lock(&self.nodes);
        for (position, listed) in page.iter_mut().enumerate() {
            let meta = std::mem::take(&mut listed.meta);
            let (ino, change) = nodes.apply(&listed.id, meta, Origin::Listing, now);
            inos.push(ino);
            if let Some(pinned) = change {
                changed.push((position, pinned));
            }
        }
        drop(nodes);
        for (position, pinned) in changed {
            self.changed(&page[position].id, inos[position], pinned, Origin::Listing);
        }
        inos
    }

    /// What follows a new version of `id` (`pinned`: open files hold the old one), outside the
    /// nodes' lock.
    fn changed(&self, id: &str, ino: u64, pinned: bool, origin: Origin) {
        debug!(id, "binary changed on the server");
        // A fetch brings the new bytes itself; news of a version from elsewhere makes the
        // cached bytes stale.
        if origin != Origin::Fetch {
            self.content.invalidate(id);
        }
        if !pinned {
            self.invalidate_kernel(ino);
        }
    }

    /// Attributes of the Binary `id`, fetching it when its size is not known yet.
    async fn attr_of_id(self: &Arc<Self>, id: &str) -> Result<Attr, FsError> {
        if let Some(attr) = self.fresh_attr(id) {
            return Ok(attr);
        }
        if self.known_missing(id) {
            return Err(FsError::source(id, SourceError::NotFound));
        }
        let listed = {
            let nodes = lock(&self.nodes);
            nodes.node(id).and_then(|n| n.listed.instant())
        };
        let listed_before = listed.is_some();
        // One search revalidates every listed file whose listing is stale; cheaper than a
        // fetch per file. (A fresh listing without sizes has nothing more to tell; a search
        // that fails leaves the file to a fetch of its own: a listed file keeps working.)
        if listed_before && !is_fresh(listed, self.config.dir_ttl) && !self.config.dir_ttl.is_zero()
        {
            let listed = match self.listing().await {
                Ok(entries) => entries.ready(usize::MAX).await,
                Err(e) => Err(e),
            };
            if listed.is_ok()
                && let Some(attr) = self.fresh_attr(id)
            {
                return Ok(attr);
            }
        }
        if listed_before && let Some((ino, index, copying)) = self.walking(id) {
            if copying && self.config.read_ahead > 0 {
                // The walker opens what it stats (cp -r, tar): fetch the content ahead, not
                // sizes first and the content after (a HEAD and a GET per file).
                self.read_ahead(&[Walk { order: Order::Listing, pos: index, forward: true }]);
            } else {
                self.read_ahead_sizes(ino);
            }
        }
        // Bytes the cache evicted but the kernel still holds, of a version trusted as cached
        // bytes are: the size is known without fetching them (a file no listing names, after
        // --dir-ttl).
        let held = {
            let nodes = lock(&self.nodes);
            nodes.ino(id).and_then(|ino| {
                let node = nodes.by_ino.get(&ino)?;
                let (_, _, len) = self.kernel_holds(node)?;
                Some(self.file_attr(ino, node.meta.last_updated, len))
            })
        };
        if let Some(attr) = held {
            return Ok(attr);
        }
        let content = self.content(id).await?;
        let nodes = lock(&self.nodes);
        let ino = nodes.ino(id).ok_or(FsError::NoEntry)?;
        let node = nodes.by_ino.get(&ino).ok_or(FsError::NoEntry)?;
        Ok(self.file_attr(ino, node.meta.last_updated, content.body.len()))
    }

    fn id_of(&self, ino: u64) -> Result<String, FsError> {
        let nodes = lock(&self.nodes);
        nodes.by_ino.get(&ino).map(|n| n.id.to_string()).ok_or(FsError::NoEntry)
    }

    /// Looks up `name` in the folder `parent`. Any valid FHIR id can be looked up, listed or not;
    /// any other name is ENOENT without a request.
    ///
    /// Each lookup answered counts as one the kernel remembers, until [`FhirFs::forget`].
    pub async fn lookup(self: &Arc<Self>, parent: u64, name: &OsStr) -> Result<Attr, FsError> {
        // A FORGET may drop the node between finding it and counting the lookup (only one
        // not listed, open or cached): then it is found again, as a new node.
        for _ in 0..2 {
            let attr = self.find(parent, name).await?;
            if self.remember(&attr) {
                return Ok(attr);
            }
        }
        Err(FsError::source(&name.to_string_lossy(), SourceError::BadBody("dropped".into())))
    }

    /// Counts a lookup of `attr`'s inode that the kernel will remember; false when its node
    /// was dropped meanwhile.
    fn remember(&self, attr: &Attr) -> bool {
        if attr.kind == Kind::Dir {
            return true;
        }
        let mut nodes = lock(&self.nodes);
        match nodes.by_ino.get_mut(&attr.ino) {
            Some(node) if !node.is_vacant() => {
                node.lookups = node.lookups.saturating_add(1);
                true
            }
            _ => false,
        }
    }

    /// The kernel forgot `count` lookups of `ino`. A node the kernel no longer knows, that no
    /// listing names, no file has open, and whose bytes are neither cached nor on their way,
    /// is dropped: its id, metadata and index entry go, and its slot serves the next new id.
    /// (Its inode can be reused then: the kernel has no reference to it left. A Binary dropped
    /// and looked up again gets a new inode; a listed one keeps its inode for the mount.)
    pub fn forget(&self, ino: u64, count: u64) {
        self.drop_if_unused(ino, count);
    }

    /// Takes `forgotten` lookups from `ino`'s count, and drops its node if nothing holds it
    /// (see [`FhirFs::forget`]); also called at the last close of a file the kernel forgot.
    fn drop_if_unused(&self, ino: u64, forgotten: u64) {
        let inflight = lock(&self.inflight);
        let mut nodes = lock(&self.nodes);
        let Some(slot) = NodeTable::slot(ino) else { return };
        let Some(node) = nodes.by_ino.get_mut(&ino) else { return };
        let forgotten = u32::try_from(forgotten).unwrap_or(u32::MAX);
        node.lookups = node.lookups.saturating_sub(forgotten);
        // A node a listing under way has taken in has no position until the listing shows
        // it (at once when it streams, at its end otherwise): `listed` keeps it meanwhile.
        let keep = node.is_vacant()
            || node.lookups > 0
            || node.index.is_some()
            || is_fresh(node.listed.instant(), self.config.dir_ttl)
            || node.pin.is_some()
            || node.prefetching
            || inflight.contains_key(&*node.id)
            || self.content.contains_key(&*node.id)
            || lock(&self.oversize).as_ref().is_some_and(|(id, _)| **id == *node.id);
        if keep {
            return;
        }
        let slot = slot as u32;
        let Nodes { by_ino, by_id, free, .. } = &mut *nodes;
        by_id.remove(by_ino, slot);
        if let Some(node) = by_ino.get_mut(&ino) {
            *node = Node::vacant();
        }
        free.push(slot);
        Stats::add(&self.stats.dropped, 1);
        debug!(ino, "dropped a node the kernel forgot");
    }

    /// Looks up `name` in `parent` (see [`FhirFs::lookup`]).
    async fn find(self: &Arc<Self>, parent: u64, name: &OsStr) -> Result<Attr, FsError> {
        if is_folder(parent) {
            let id = self.lookup_in_folder(parent, name).await?;
            return self.attr_of_id(&id).await;
        }
        if parent != ROOT_INO {
            return Err(FsError::NotDir);
        }
        if self.source.folders() {
            return self.lookup_folder(name).await;
        }
        if self.source.names_files() {
            let id = self.lookup_named(name).await?;
            return self.attr_of_id(&id).await;
        }
        let named = name.to_str().and_then(|n| {
            let nodes = lock(&self.nodes);
            let ino = nodes.by_name.get(n)?;
            nodes.by_ino.get(ino).map(|node| node.id.clone())
        });
        if let Some(id) = named {
            return self.attr_of_id(&id).await;
        }
        let id = id_from_name(name).ok_or(FsError::NoEntry)?;
        match self.attr_of_id(id).await {
            // `<id>.<ext>` of a Binary not listed (yet): the id without the extension, if its
            // contentType gives that extension.
            Err(e) if self.config.extensions && e.errno() == libc::ENOENT => {
                let Some((bare, ext)) = id.rsplit_once('.') else {
                    return Err(e);
                };
                if bare.is_empty() {
                    return Err(e);
                }
                let attr = self.attr_of_id(bare).await.map_err(|_| e.clone())?;
                let matches = self.node_meta(attr.ino).is_some_and(|meta| {
                    self.listed_name(bare, meta.content_type.as_deref())
                        .is_some_and(|n| n.rsplit_once('.').is_some_and(|(_, e)| e == ext))
                });
                if matches { Ok(attr) } else { Err(e) }
            }
            other => other,
        }
    }

    fn node_meta(&self, ino: u64) -> Option<Meta> {
        lock(&self.nodes).by_ino.get(&ino).map(|n| n.meta.unpack())
    }

    /// Attributes of an inode.
    pub async fn getattr(self: &Arc<Self>, ino: u64) -> Result<Attr, FsError> {
        if ino == ROOT_INO {
            return Ok(self.root_attr());
        }
        if is_folder(ino) {
            return self.folder_attr(ino);
        }
        let id = self.id_of(ino)?;
        self.attr_of_id(&id).await
    }

    /// Opens a file for reading; writing is refused.
    pub async fn open(self: &Arc<Self>, ino: u64, write: bool) -> Result<Opened, FsError> {
        if ino == ROOT_INO || is_folder(ino) {
            return Err(FsError::IsDir);
        }
        if write {
            return Err(FsError::ReadOnly);
        }
        let id = self.id_of(ino)?;
        self.opened_for_walk(ino, &id);
        let cached = self.fresh_content(&id);
        let opened = {
            let mut nodes = lock(&self.nodes);
            let node = nodes.by_ino.get_mut(&ino).ok_or(FsError::NoEntry)?;
            self.open_without_fetching(&id, node, cached.is_some())
        };
        let (content, keep_cache) = match opened {
            Some(opened) => opened,
            None => {
                let fetched = match cached {
                    Some(cached) => {
                        Stats::add(&self.stats.cache_hits, 1);
                        cached
                    }
                    None => self.content(&id).await?,
                };
                let mut nodes = lock(&self.nodes);
                let node = nodes.by_ino.get_mut(&ino).ok_or(FsError::NoEntry)?;
                // Pinned meanwhile by another open that shared this fetch, or by one that
                // fetched another version: join it, one version at a time. Otherwise (no pin,
                // or one whose body failed) this version replaces it: the handles of the
                // failed one keep it, and their release does not count against this pin.
                let content = node.join_pin(Some(&fetched)).unwrap_or_else(|| {
                    let meta = node.meta.unpack();
                    node.pin =
                        Some(Box::new(Pin { content: Arc::clone(&fetched), meta, handles: 1 }));
                    fetched
                });
                let keep_cache = node.keeps_kernel_pages(&content);
                (content, keep_cache)
            }
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, Handle::File { ino, content });
        Ok(Opened { fh, keep_cache })
    }

    /// Opens `node` with what the daemon has, under its lock: the version open elsewhere (a
    /// body that failed is not joined), or, for bytes that left the cache (`cached` false)
    /// while the kernel's page cache still holds them, content that fetches nothing until a
    /// read reaches the daemon, which happens only for pages the kernel dropped. Re-reading
    /// more files than `--cache-size` holds then costs no request. `None`: fetch.
    fn open_without_fetching(
        self: &Arc<Self>,
        id: &str,
        node: &mut Node,
        cached: bool,
    ) -> Option<(Arc<Content>, bool)> {
        if let Some(content) = node.join_pin(None) {
            let keep_cache = node.keeps_kernel_pages(&content);
            return Some((content, keep_cache));
        }
        if cached {
            return None;
        }
        let (generation, version, len) = self.kernel_holds(node)?;
        Stats::add(&self.stats.cache_hits, 1);
        let (body, demand) = Body::on_demand(len);
        let this = Arc::clone(self);
        let owned = id.to_owned();
        let expected = version.clone();
        tokio::spawn(async move {
            let Some(mut relay) = demand.requested().await else { return };
            debug!(id = owned, "the kernel dropped pages of a file no longer cached: fetching it");
            let result = this.relay(&owned, &expected, &mut relay).await;
            match result {
                Ok(()) => {
                    let _ = relay.finish();
                }
                Err(e) => relay.fail(e),
            }
        });
        let content =
            Content { body, version_id: Some(version), generation, validated: Instant::now() };
        let content = Arc::new(content);
        let meta = node.meta.unpack();
        node.pin = Some(Box::new(Pin { content: Arc::clone(&content), meta, handles: 1 }));
        Some((content, true))
    }

    /// The kernel's generation, version and size of `node`'s pages, when the server named that
    /// version within the TTLs (as cached bytes are trusted) and no open holds another.
    fn kernel_holds(&self, node: &Node) -> Option<(u64, String, u64)> {
        // A pin here is a version whose body failed: the server may not have it any more.
        if node.pin.is_some() {
            return None;
        }
        let kernel = node.kernel.as_ref()?;
        let version = kernel.version.clone()?;
        let confirmed = node.meta.is_version(Some(&version))
            && (is_fresh(node.checked.instant(), self.config.cache_ttl)
                || is_fresh(node.listed.instant(), self.config.dir_ttl));
        let len = node.meta.size.filter(|&len| len > 0 && confirmed)?;
        Some((kernel.generation, version, len))
    }

    /// Reads from an open file if the bytes are in (`None`: they are on the way, call
    /// [`FhirFs::read`]); offsets past the end give no bytes.
    pub fn read_ready(&self, fh: u64, offset: u64, size: u32) -> Option<Result<Bytes, FsError>> {
        let (ino, body) = match self.open_body(fh) {
            Ok(open) => open,
            Err(e) => return Some(Err(e)),
        };
        let read = body.read_now(offset, size)?;
        Some(self.served(ino, read))
    }

    /// Reads from an open file, waiting for bytes still on the way; offsets past the end give
    /// no bytes.
    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Bytes, FsError> {
        let (ino, body) = self.open_body(fh)?;
        let read = body.read(offset, size).await;
        self.served(ino, read)
    }

    fn open_body(&self, fh: u64) -> Result<(u64, Arc<Body>), FsError> {
        match lock(&self.handles).get(&fh) {
            Some(Handle::File { ino, content }) => Ok((*ino, Arc::clone(&content.body))),
            _ => Err(FsError::BadHandle),
        }
    }

    fn served(&self, ino: u64, read: Result<Bytes, SourceError>) -> Result<Bytes, FsError> {
        let bytes = read.map_err(|e| FsError::source(&self.id_of(ino).unwrap_or_default(), e))?;
        Stats::add(&self.stats.bytes_served, bytes.len() as u64);
        Ok(bytes)
    }

    /// Closes a file or folder handle.
    pub fn release(&self, fh: u64) {
        let Some(Handle::File { ino, content }) = lock(&self.handles).remove(&fh) else { return };
        let mut nodes = lock(&self.nodes);
        let Some(node) = nodes.by_ino.get_mut(&ino) else { return };
        let Some(pin) = node.pin.as_mut().filter(|pin| Arc::ptr_eq(&pin.content, &content)) else {
            return;
        };
        pin.handles = pin.handles.saturating_sub(1);
        if pin.handles > 0 {
            return;
        }
        node.pin = None;
        if content.body.failed()
            && node.kernel.as_ref().is_some_and(|k| k.generation == content.generation)
        {
            // The kernel's pages of a version that could not be read whole are not worth
            // keeping across opens: the next open fetches.
            node.kernel = None;
        }
        let changed = std::mem::take(&mut node.changed_while_pinned);
        let forgotten = node.lookups == 0;
        drop(nodes);
        if changed {
            self.invalidate_kernel(ino);
        }
        if forgotten {
            // The kernel forgot it while it was open.
            self.drop_if_unused(ino, 0);
        }
    }

    /// Opens the folder: takes a snapshot of the listing for the following `readdir` calls.
    pub async fn opendir(self: &Arc<Self>, ino: u64) -> Result<u64, FsError> {
        let entries = if is_folder(ino) {
            self.folder_entries(ino).await?
        } else if ino == ROOT_INO {
            let files = self.listing().await?;
            // The first page, or the end of an empty listing: a search that fails at once
            // fails the opendir, as it did before listings streamed. Folders show once the
            // whole listing is in (it is sorted into them at its end).
            files.ready(if self.source.folders() { usize::MAX } else { 0 }).await?;
            self.root_entries(files)
        } else {
            return Err(FsError::NotDir);
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, Handle::Dir(entries));
        Ok(fh)
    }

    fn dir_entries(&self, fh: u64) -> Result<Snapshot, FsError> {
        match lock(&self.handles).get(&fh) {
            Some(Handle::Dir(entries)) => Ok(Arc::clone(entries)),
            _ => Err(FsError::BadHandle),
        }
    }

    /// Whether the entries of an open folder at `offset` are still on their way (their page
    /// has not arrived): then wait with [`FhirFs::readdir_ready`] before [`FhirFs::readdir`],
    /// which would take the folder to end there.
    pub fn readdir_pending(&self, fh: u64, offset: u64) -> bool {
        let file = usize::try_from(offset).unwrap_or(usize::MAX).saturating_sub(2);
        self.dir_entries(fh).is_ok_and(|entries| offset >= 2 && entries.pending(file))
    }

    /// Waits until the entries of an open folder at `offset` have arrived, or the listing has
    /// ended; fails when the listing failed before reaching them (the entries before stay).
    pub async fn readdir_ready(&self, fh: u64, offset: u64) -> Result<(), FsError> {
        let entries = self.dir_entries(fh)?;
        let file = usize::try_from(offset).unwrap_or(usize::MAX).saturating_sub(2);
        entries.ready(file).await
    }

    /// Gives the entries of an open folder from `offset` on (`.` and `..` first) to `add`, one
    /// at a time, until `add` says the reply is full (returns true) or the folder ends; returns
    /// how many it gave. The work is in proportion to the entries given, wherever `offset` is:
    /// the kernel reads a large folder in many calls of a few dozen entries each, so work in
    /// proportion to the folder would make a walk of it quadratic. Entries whose page is still
    /// on its way are not given ([`FhirFs::readdir_pending`]); past a listing that failed,
    /// the error.
    pub fn readdir(
        &self,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(DirEntry<'_>) -> bool,
    ) -> Result<usize, FsError> {
        let snapshot = self.dir_entries(fh)?;
        let entries = lock(&snapshot.list);
        const DOTS: [&str; 2] = [".", ".."];
        let end = entries.len() + DOTS.len();
        let offset = usize::try_from(offset).unwrap_or(usize::MAX).min(end);
        if offset == end && offset >= DOTS.len() {
            // Past what arrived: the end of the folder only if no more will come.
            if let Fill::Failed(e) = snapshot.fill() {
                return Err(e);
            }
        }
        let mut given = 0;
        // Indexing, not an iterator: skipping to `offset` must not step through what is before.
        let mut index = offset;
        while index < end {
            let (ino, kind, name) = match index.checked_sub(DOTS.len()) {
                None => (ROOT_INO, Kind::Dir, DOTS[index]),
                Some(file) => {
                    let (ino, name) = &entries[file];
                    let kind = if is_folder(*ino) { Kind::Dir } else { Kind::File };
                    (*ino, kind, &**name)
                }
            };
            given += 1;
            index += 1;
            if add(DirEntry { ino, next_offset: index as u64, kind, name }) {
                break;
            }
        }
        Ok(given)
    }

    /// Extended attributes of an inode: `user.mime_type` (the freedesktop name for the
    /// contentType) and `user.fhir.*` for the version, the time and the security context.
    pub async fn xattrs(
        self: &Arc<Self>,
        ino: u64,
    ) -> Result<Vec<(&'static str, Vec<u8>)>, FsError> {
        if ino == ROOT_INO || is_folder(ino) {
            return Ok(Vec::new());
        }
        let id = self.id_of(ino)?;
        self.attr_of_id(&id).await?;
        let meta = self.node_meta(ino).ok_or(FsError::NoEntry)?;
        let values = [
            ("user.mime_type", meta.content_type),
            ("user.fhir.versionId", meta.version_id),
            ("user.fhir.lastUpdated", meta.last_updated.map(crate::fhir::format_instant)),
            ("user.fhir.securityContext", meta.security_context),
        ];
        let present = values.into_iter().filter_map(|(name, v)| v.map(|v| (name, v.into_bytes())));
        Ok(present.chain(self.source.xattrs(&id)).collect())
    }

    /// Checks right after mounting that the server answers, and says so in the log when it
    /// does not (the mount stays up; reads give EIO until the server answers).
    pub async fn warm_up(self: Arc<Self>) {
        match self.source.probe().await {
            Ok(()) => debug!("the server answers"),
            Err(e @ SourceError::Config(_)) => warn!(
                error = %e,
                "the configuration cannot work; mounted anyway: reads fail with EIO"
            ),
            Err(e) => warn!(
                error = %e,
                "the server cannot be reached; mounted anyway: reads fail with EIO until it answers"
            ),
        }
    }

    /// Bytes held by the content cache now (open files may hold more).
    pub fn cached_bytes(&self) -> u64 {
        self.content.run_pending_tasks();
        self.content.weighted_size()
    }

    /// Open files, and the bytes of the versions they hold (pinned, whether cached or not).
    pub fn open_files(&self) -> (usize, u64) {
        let handles = lock(&self.handles);
        let files = handles.values().filter(|h| matches!(h, Handle::File { .. })).count();
        let nodes = lock(&self.nodes);
        let pinned = nodes.by_ino.values().filter_map(|n| n.pin.as_ref());
        (files, pinned.map(|p| p.content.body.len()).sum())
    }

    /// How many Binaries the mount knows of.
    pub fn file_count(&self) -> u64 {
        let nodes = lock(&self.nodes);
        (nodes.by_ino.len() - nodes.free.len()) as u64
    }
}

impl Content {
    fn clone_of(other: &Content) -> Content {
        Content {
            body: Arc::clone(&other.body),
            version_id: other.version_id.clone(),
            generation: other.generation,
            validated: other.validated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ino_set_holds_each_inode_once() {
        let mut set = InoSet::default();
        assert!(set.insert(2) && set.insert(700) && set.insert(66));
        assert!(!set.insert(700) && !set.insert(2));
        assert!(set.contains(66) && set.contains(700) && !set.contains(3) && !set.contains(9999));
        assert!(!set.contains(ROOT_INO) && set.insert(ROOT_INO), "no slot: never a repeat");
    }

    #[test]
    fn a_node_stays_small() {
        // A million listed Binaries hold a million nodes: every byte here is a megabyte.
        let size = std::mem::size_of::<Node>();
        println!("Node: {size} bytes, NodeMeta: {}", std::mem::size_of::<NodeMeta>());
        assert!(size <= 120, "Node grew to {size} bytes");
    }

    #[test]
    fn versions_come_back_as_written() {
        for text in ["1", "42", "0", "01", "+1", "-1", "18446744073709551616", "W/\"3\"", "a-b"] {
            let version = Version::new(text);
            assert_eq!(version.to_string(), text);
            assert!(version.is(text), "{text}");
        }
        assert_eq!(Version::new("7"), Version::Number(7));
        assert!(!Version::new("1").is("01"));
        assert!(!Version::new("01").is("1"));
    }

    #[test]
    fn node_meta_round_trips_and_shares_labels() {
        let mut labels = LabelSet::default();
        let meta = Meta {
            version_id: Some("3".into()),
            last_updated: Some(UNIX_EPOCH + Duration::from_millis(1234)),
            content_type: Some("application/pdf".into()),
            security_context: Some("Patient/p".into()),
            size: Some(9),
        };
        let a = NodeMeta::pack(meta.clone(), &mut labels);
        let b = NodeMeta::pack(meta.clone(), &mut labels);
        assert_eq!(a.unpack(), meta);
        let (la, lb) = (a.labels.clone().unwrap(), b.labels.clone().unwrap());
        assert!(Arc::ptr_eq(&la, &lb), "one copy of the pair");
        let other = Meta { security_context: None, ..meta.clone() };
        let c = NodeMeta::pack(other.clone(), &mut labels);
        assert_eq!(c.unpack(), other);
        assert!(!Arc::ptr_eq(&la, c.labels.as_ref().unwrap()));
        let bare = Meta { content_type: None, security_context: None, ..meta };
        assert!(NodeMeta::pack(bare, &mut labels).labels.is_none());
        assert!(a.version_id.is_some() && NodeMeta::default().unpack() == Meta::default());
    }
}
