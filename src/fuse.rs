//! The FUSE adapter: the only module that speaks fuser. Each callback copies its arguments,
//! hands the work to the async core on the tokio runtime, and replies from that task, so the
//! FUSE thread never waits on the network.

use std::ffi::OsStr;
use std::sync::Arc;
use std::sync::Mutex;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::error::FsError;
use crate::fs::{Attr, BLOCK_SIZE, FhirFs, Kind};
use crate::source::Source;

/// Requests the kernel may have in flight to us at once (the kernel's default is 12). Reads of
/// different files run concurrently in the core, so allow many.
const MAX_BACKGROUND: u16 = 64;

/// Longest name we report in `statfs`.
const MAX_NAME_LEN: u32 = 255;

/// Bridges fuser's synchronous callbacks to the async [`FhirFs`] core.
pub struct FuseAdapter<S: Source> {
    fs: Arc<FhirFs<S>>,
    runtime: Handle,
    unmounted: Mutex<Option<oneshot::Sender<()>>>,
}

impl<S: Source> FuseAdapter<S> {
    /// An adapter that runs the core's work on `runtime`; `unmounted` fires when the kernel
    /// ends the session (an external `umount`).
    pub fn new(fs: Arc<FhirFs<S>>, runtime: Handle, unmounted: oneshot::Sender<()>) -> Self {
        Self { fs, runtime, unmounted: Mutex::new(Some(unmounted)) }
    }
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn file_attr(attr: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(attr.ino),
        size: attr.size,
        blocks: attr.blocks,
        atime: attr.mtime,
        mtime: attr.mtime,
        ctime: attr.mtime,
        crtime: attr.mtime,
        kind: file_type(attr.kind),
        perm: attr.perm,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: 0,
        blksize: BLOCK_SIZE,
        flags: 0,
    }
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
    }
}

/// Answers an xattr request: the size when asked for it (size 0), else the bytes if they fit.
fn reply_xattr(reply: ReplyXattr, size: u32, value: &[u8]) {
    let len = u32::try_from(value.len()).unwrap_or(u32::MAX);
    if size == 0 {
        reply.size(len);
    } else if len > size {
        reply.error(errno(&FsError::Range));
    } else {
        reply.data(value);
    }
}

/// Replies to a readdir with the entries in from `offset` on.
fn fill_dir<S: Source>(fs: &FhirFs<S>, fh: u64, offset: u64, mut reply: ReplyDirectory) {
    let added = fs.readdir(fh, offset, |entry| {
        reply.add(INodeNo(entry.ino), entry.next_offset, file_type(entry.kind), entry.name)
    });
    match added {
        Ok(_) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

fn log_error(op: &str, ino: u64, e: &FsError) {
    // Misses are normal (shells probe for names); real failures are logged by the core.
    debug!(op, ino, error = %e, "failed");
}

impl<S: Source> Filesystem for FuseAdapter<S> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(nearest) = config.set_max_background(MAX_BACKGROUND) {
            let _ = config.set_max_background(nearest);
        }
        // Without this the kernel serialises lookups and readdir in the folder: one slow
        // fetch at lookup time would stall `ls` and every other name.
        if let Err(unsupported) = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS) {
            warn!(?unsupported, "the kernel cannot run lookups in parallel");
        }
        Ok(())
    }

    fn destroy(&mut self) {
        let sender = self.unmounted.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(sender) = sender {
            let _ = sender.send(());
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let fs = Arc::clone(&self.fs);
        let name = name.to_owned();
        self.runtime.spawn(async move {
            match fs.lookup(parent.0, &name).await {
                Ok(attr) => reply.entry(&attr.ttl, &file_attr(&attr), Generation(0)),
                Err(e) => {
                    log_error("lookup", parent.0, &e);
                    reply.error(errno(&e));
                }
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let fs = Arc::clone(&self.fs);
        self.runtime.spawn(async move {
            match fs.getattr(ino.0).await {
                Ok(attr) => reply.attr(&attr.ttl, &file_attr(&attr)),
                Err(e) => {
                    log_error("getattr", ino.0, &e);
                    reply.error(errno(&e));
                }
            }
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY)
            || flags.0 & (libc::O_TRUNC | libc::O_APPEND) != 0;
        let fs = Arc::clone(&self.fs);
        self.runtime.spawn(async move {
            match fs.open(ino.0, write).await {
                Ok(opened) => {
                    let flags = if opened.keep_cache {
                        FopenFlags::FOPEN_KEEP_CACHE
                    } else {
                        FopenFlags::empty()
                    };
                    reply.opened(FileHandle(opened.fh), flags);
                }
                Err(e) => {
                    log_error("open", ino.0, &e);
                    reply.error(errno(&e));
                }
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // Bytes already in memory are answered right here; bytes still on their way from the
        // server are answered by a task when they arrive.
        match self.fs.read_ready(fh.0, offset, size) {
            Some(Ok(bytes)) => reply.data(&bytes),
            Some(Err(e)) => reply.error(errno(&e)),
            None => {
                let fs = Arc::clone(&self.fs);
                self.runtime.spawn(async move {
                    match fs.read(fh.0, offset, size).await {
                        Ok(bytes) => reply.data(&bytes),
                        Err(e) => {
                            log_error("read", fh.0, &e);
                            reply.error(errno(&e));
                        }
                    }
                });
            }
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.release(fh.0);
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing is ever written, so there is nothing to flush.
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let fs = Arc::clone(&self.fs);
        self.runtime.spawn(async move {
            match fs.opendir(ino.0).await {
                Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(e) => {
                    log_error("opendir", ino.0, &e);
                    reply.error(errno(&e));
                }
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        if !self.fs.readdir_pending(fh.0, offset) {
            return fill_dir(&self.fs, fh.0, offset, reply);
        }
        // The listing is still on its way there: wait for its page in a task.
        let fs = Arc::clone(&self.fs);
        self.runtime.spawn(async move {
            match fs.readdir_ready(fh.0, offset).await {
                Ok(()) => fill_dir(&fs, fh.0, offset, reply),
                Err(e) => {
                    log_error("readdir", fh.0, &e);
                    reply.error(errno(&e));
                }
            }
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.release(fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let files = self.fs.file_count();
        reply.statfs(0, 0, 0, files, 0, BLOCK_SIZE, MAX_NAME_LEN, BLOCK_SIZE);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        // Every attribute here is `user.*`. `ls -l` asks each file for `security.selinux` and
        // `system.posix_acl_access`: answered at once, without touching the core (or, for a
        // file whose size is not known yet, the server).
        if !name.as_encoded_bytes().starts_with(b"user.") {
            return reply.error(errno(&FsError::NoAttr));
        }
        let fs = Arc::clone(&self.fs);
        let name = name.to_owned();
        self.runtime.spawn(async move {
            match fs.xattrs(ino.0).await {
                Ok(values) => {
                    let value = values.into_iter().find(|(n, _)| name == *n).map(|(_, v)| v);
                    match value {
                        Some(value) => reply_xattr(reply, size, &value),
                        None => reply.error(errno(&FsError::NoAttr)),
                    }
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let fs = Arc::clone(&self.fs);
        self.runtime.spawn(async move {
            match fs.xattrs(ino.0).await {
                Ok(values) => {
                    // Names, each NUL-terminated, as listxattr(2) returns them.
                    let mut names = Vec::new();
                    for (name, _) in values {
                        names.extend_from_slice(name.as_bytes());
                        names.push(0);
                    }
                    reply_xattr(reply, size, &names);
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    // Everything below changes the tree or a file: the mount is read-only.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }
}
