//! Folders under the root, for sources that put their files in folders (the documents view:
//! one folder per subject), and lookups by name for sources that name their files. A source
//! without folders (the Binary view) leaves the root as it is: every file in it.
//!
//! Folder inodes come from their own range ([`FOLDER_INO_BASE`] up), far above the files'
//! dense inodes, one per folder name for the life of the mount. A folder's entries are a
//! snapshot of the listing, like the root's.

use super::*;

/// The first folder inode: files count up from 2 and never get near it.
pub const FOLDER_INO_BASE: u64 = 1 << 48;

/// The folders of the latest listing.
#[derive(Default)]
pub(super) struct Folders {
    /// Folder names ever seen, by inode (less [`FOLDER_INO_BASE`]); never reused.
    names: Vec<Arc<str>>,
    inos: HashMap<Arc<str>, u64>,
    /// The source has folders: the root lists them, not the files.
    active: bool,
    /// The root's entries: the folders, by name.
    root: Snapshot,
    /// Each folder's entries, in listing order, and its names.
    contents: HashMap<u64, (Snapshot, HashMap<Arc<str>, u64>)>,
}

/// True when `ino` is a folder's.
pub fn is_folder(ino: u64) -> bool {
    ino >= FOLDER_INO_BASE
}

impl<S: Source> FhirFs<S> {
    /// Sorts the files of a new listing (`snapshot`, as published) into the folders the source
    /// named (`folder_of`, by file inode). A source without folders has none.
    pub(super) fn publish_folders(&self, snapshot: &Snapshot, folder_of: HashMap<u64, String>) {
        let mut folders = lock(&self.folders);
        folders.active = self.source.folders();
        folders.contents.clear();
        if !folders.active {
            folders.root = Arc::default();
            return;
        }
        let mut contents: HashMap<u64, Vec<(u64, Arc<str>)>> = HashMap::new();
        for (ino, name) in lock(&snapshot.list).iter() {
            let Some(folder) = folder_of.get(ino) else { continue };
            let folder_ino = match folders.inos.get(folder.as_str()) {
                Some(&folder_ino) => folder_ino,
                None => {
                    let folder_ino = FOLDER_INO_BASE + folders.names.len() as u64;
                    let folder: Arc<str> = Arc::from(folder.as_str());
                    folders.names.push(Arc::clone(&folder));
                    folders.inos.insert(folder, folder_ino);
                    folder_ino
                }
            };
            contents.entry(folder_ino).or_default().push((*ino, Arc::clone(name)));
        }
        let mut root: Vec<(u64, Arc<str>)> = contents
            .keys()
            .filter_map(|&ino| Some((ino, Arc::clone(folders.name_of(ino)?))))
            .collect();
        root.sort_unstable_by(|a, b| a.1.as_bytes().cmp(b.1.as_bytes()));
        folders.root = Entries::done(root);
        for (ino, entries) in contents {
            let names = entries.iter().map(|(file, name)| (Arc::clone(name), *file)).collect();
            folders.contents.insert(ino, (Entries::done(entries), names));
        }
    }

    /// The root's entries: the folders when the source names any, else `files`.
    pub(super) fn root_entries(&self, files: Snapshot) -> Snapshot {
        let folders = lock(&self.folders);
        if folders.active { Arc::clone(&folders.root) } else { files }
    }

    /// The attributes of a folder.
    pub(super) fn folder_attr(&self, ino: u64) -> Result<Attr, FsError> {
        if lock(&self.folders).name_of(ino).is_none() {
            return Err(FsError::NoEntry);
        }
        Ok(Attr { ino, ..self.root_attr() })
    }

    /// Looks up `name` in the root when it holds folders: a folder.
    pub(super) async fn lookup_folder(self: &Arc<Self>, name: &OsStr) -> Result<Attr, FsError> {
        // Folders are sorted out at the end of a listing: wait for all of it.
        self.listing().await?.ready(usize::MAX).await?;
        let ino = {
            let folders = lock(&self.folders);
            let found = name.to_str().and_then(|n| folders.inos.get(n).copied());
            found.filter(|ino| folders.contents.contains_key(ino))
        };
        self.folder_attr(ino.ok_or(FsError::NoEntry)?)
    }

    /// Looks up `name` in the folder `parent`: the file's id.
    pub(super) async fn lookup_in_folder(
        self: &Arc<Self>,
        parent: u64,
        name: &OsStr,
    ) -> Result<String, FsError> {
        // Folders are sorted out at the end of a listing: wait for all of it.
        self.listing().await?.ready(usize::MAX).await?;
        let ino = {
            let folders = lock(&self.folders);
            let (_, names) = folders.contents.get(&parent).ok_or(FsError::NoEntry)?;
            name.to_str().and_then(|n| names.get(n).copied()).ok_or(FsError::NoEntry)?
        };
        self.id_of(ino)
    }

    /// Looks up `name` in the root of a source that names its files (no folders): the file's
    /// id, from the listing (made first when there is none, or it is older than `--dir-ttl`).
    pub(super) async fn lookup_named(self: &Arc<Self>, name: &OsStr) -> Result<String, FsError> {
        // Names are settled at the end of a listing: wait for all of it.
        self.listing().await?.ready(usize::MAX).await?;
        let name = name.to_str().ok_or(FsError::NoEntry)?;
        let nodes = lock(&self.nodes);
        let ino = nodes.by_name.get(name).ok_or(FsError::NoEntry)?;
        nodes.by_ino.get(ino).map(|node| node.id.to_string()).ok_or(FsError::NoEntry)
    }

    /// The entries of folder `ino`, listing again after `--dir-ttl`.
    pub(super) async fn folder_entries(self: &Arc<Self>, ino: u64) -> Result<Snapshot, FsError> {
        // Folders are sorted out at the end of a listing: wait for all of it.
        self.listing().await?.ready(usize::MAX).await?;
        let folders = lock(&self.folders);
        let (entries, _) = folders.contents.get(&ino).ok_or(FsError::NoEntry)?;
        Ok(Arc::clone(entries))
    }
}

impl Folders {
    fn name_of(&self, ino: u64) -> Option<&Arc<str>> {
        self.names.get(usize::try_from(ino.checked_sub(FOLDER_INO_BASE)?).ok()?)
    }
}
