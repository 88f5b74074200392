//! The bytes of one version of a Binary: whole, or still arriving from the server and readable
//! as they arrive, so that a program reading a cold file gets its first bytes while the rest
//! is on the way (the kernel moves the start of a file while the source fetches its end).
//!
//! A streamed body is one buffer of its full length (from the [`pool`](crate::buffer::pool) when one
//! fits), filled as chunks arrive and published in aligned pieces of it (a read within one
//! piece is a slice, a read across pieces the only copy). One buffer, not the network's own
//! chunks: hundreds of 400 KiB chunks would stay in the allocator's arenas after the body is
//! dropped and grow the daemon well past its cache.

use std::future::Future;
use std::sync::{Arc, Weak};

use bytes::{Bytes, BytesMut};

use crate::buffer::pool;
use tokio::sync::watch;

use crate::error::SourceError;

/// Pieces of a streamed body end at multiples of this (but the last): the kernel reads a file
/// in aligned blocks of up to 128 KiB (its read-ahead), so none of its reads straddles two
/// pieces and each is answered with a slice, not a copy. A reader waits at most this much
/// longer than the bytes it needs.
const PIECE_ALIGN: usize = 256 << 10;

/// Bytes of known length, complete or filling up from the front.
#[derive(Debug)]
pub struct Body {
    len: u64,
    state: watch::Sender<State>,
    /// Its bytes are fetched only once a reader needs them ([`Body::on_demand`]).
    on_demand: bool,
}

#[derive(Debug, Default)]
struct State {
    pieces: Vec<Bytes>,
    /// Where each piece starts in the body.
    starts: Vec<u64>,
    /// Bytes in `pieces`.
    filled: u64,
    /// Why the rest will never come.
    failed: Option<SourceError>,
    /// A reader waited for bytes not in yet (what an on-demand body waits for to fetch).
    asked: bool,
}

impl Body {
    /// A complete body.
    pub fn whole(bytes: Bytes) -> Arc<Self> {
        let len = bytes.len() as u64;
        let state = State { filled: len, pieces: vec![bytes], starts: vec![0], ..State::default() };
        Arc::new(Self { len, state: watch::Sender::new(state), on_demand: false })
    }

    /// An empty body of `len` bytes, and the [`Filler`] that writes them in order.
    pub fn filling(len: u64) -> (Arc<Self>, Filler) {
        let body =
            Arc::new(Self { len, state: watch::Sender::new(State::default()), on_demand: false });
        let slab = Arc::new(Slab::new(pool::take(usize::try_from(len).unwrap_or(usize::MAX))));
        let filler = Filler {
            end: End { body: Arc::clone(&body), done: false },
            slab,
            written: 0,
            published: 0,
        };
        (body, filler)
    }

    /// An empty body of `len` bytes whose bytes nobody fetches until a reader waits for some:
    /// [`OnDemand::requested`] tells when, and gives the [`Relay`] that brings them.
    pub fn on_demand(len: u64) -> (Arc<Self>, OnDemand) {
        let state = watch::Sender::new(State::default());
        let progress = state.subscribe();
        let body = Arc::new(Self { len, state, on_demand: true });
        (body.clone(), OnDemand { body: Arc::downgrade(&body), progress })
    }

    /// Its length in bytes, complete or not.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True for a body made by [`Body::on_demand`]: the kernel's pages, read again through a
    /// relay.
    pub fn is_on_demand(&self) -> bool {
        self.on_demand
    }

    /// True once every byte is in.
    pub fn is_complete(&self) -> bool {
        self.state.borrow().filled == self.len
    }

    /// The bytes from `offset`, at most `size` of them (none past the end), if they are in;
    /// `None` while they are on the way; the error once the body failed.
    pub fn read_now(&self, offset: u64, size: u32) -> Option<Result<Bytes, SourceError>> {
        let (start, end) = self.range(offset, size);
        let state = self.state.borrow();
        self.slice(&state, start, end)
    }

    /// The bytes from `offset`, at most `size` of them, waiting for them if need be.
    pub async fn read(&self, offset: u64, size: u32) -> Result<Bytes, SourceError> {
        let (start, end) = self.range(offset, size);
        if start == end {
            // Nothing to read (at or past the end): nothing to wait for or ask for.
            return Ok(Bytes::new());
        }
        if self.on_demand {
            self.state.send_if_modified(|s| {
                let ask = !s.asked && s.filled < end;
                s.asked |= ask;
                ask
            });
        }
        let mut progress = self.state.subscribe();
        let state = progress
            .wait_for(|s| s.filled >= end || s.failed.is_some())
            .await
            .map_err(|_| abandoned())?;
        self.slice(&state, start, end).unwrap_or_else(|| Err(abandoned()))
    }

    /// True when the rest of the body will never come.
    pub fn failed(&self) -> bool {
        self.state.borrow().failed.is_some()
    }

    /// Resolves when every byte is in, or with the error when they will not all come; holds
    /// the body's progress, not the body (so a watcher does not keep it alive).
    pub fn outcome(&self) -> impl Future<Output = Result<(), SourceError>> + Send + 'static {
        let mut progress = self.state.subscribe();
        let len = self.len;
        async move {
            let state = progress
                .wait_for(|s| s.filled >= len || s.failed.is_some())
                .await
                .map_err(|_| abandoned())?;
            match &state.failed {
                Some(e) if state.filled < len => Err(e.clone()),
                _ => Ok(()),
            }
        }
    }

    /// True when both are complete and hold the same bytes.
    pub fn same_bytes(&self, other: &Body) -> bool {
        if self.len != other.len || !self.is_complete() || !other.is_complete() {
            return false;
        }
        let (a, b) = (self.state.borrow(), other.state.borrow());
        let left = a.pieces.iter().map(|p| &p[..]);
        let right = b.pieces.iter().map(|p| &p[..]);
        // Piece boundaries may differ: compare as two streams of bytes.
        let mut right = right.peekable();
        let mut right_at = 0;
        for mut chunk in left {
            while !chunk.is_empty() {
                let Some(other) = right.peek() else { return false };
                let n = chunk.len().min(other.len() - right_at);
                if chunk[..n] != other[right_at..right_at + n] {
                    return false;
                }
                chunk = &chunk[n..];
                right_at += n;
                if right_at == other.len() {
                    right.next();
                    right_at = 0;
                }
            }
        }
        true
    }

    /// Publishes `piece` after the bytes already in.
    fn append(&self, piece: Bytes) {
        self.state.send_modify(|s| {
            s.starts.push(s.filled);
            s.filled += piece.len() as u64;
            s.pieces.push(piece);
        });
    }

    /// Readers waiting for the rest get `error` (the first one given). A body with every byte
    /// in cannot fail any more (as [`Body::outcome`] says): a deadline or a broken connection
    /// after the last byte loses nothing.
    fn fail_with(&self, error: SourceError) {
        let len = self.len;
        self.state.send_if_modified(|s| {
            if s.filled == len {
                return false;
            }
            s.failed.get_or_insert(error);
            true
        });
    }

    /// `offset..offset + size`, clamped to the body.
    fn range(&self, offset: u64, size: u32) -> (u64, u64) {
        let start = offset.min(self.len);
        (start, start.saturating_add(u64::from(size)).min(self.len))
    }

    fn slice(&self, state: &State, start: u64, end: u64) -> Option<Result<Bytes, SourceError>> {
        if start == end {
            return Some(Ok(Bytes::new()));
        }
        // A body that failed serves none of its bytes, not even those already in: a newer
        // version may be in the kernel's page cache by now (opened after the failure), and
        // this version's bytes must not join it there.
        if let Some(failed) = &state.failed {
            return Some(Err(failed.clone()));
        }
        if state.filled < end {
            return None;
        }
        // The piece holding `start`: the last one starting at or before it.
        let first = state.starts.partition_point(|&s| s <= start) - 1;
        let piece = &state.pieces[first];
        let base = state.starts[first];
        if end - base <= piece.len() as u64 {
            return Some(Ok(piece.slice((start - base) as usize..(end - base) as usize)));
        }
        let mut out = BytesMut::with_capacity((end - start) as usize);
        for (piece, &base) in state.pieces[first..].iter().zip(&state.starts[first..]) {
            if base >= end {
                break;
            }
            let from = start.saturating_sub(base) as usize;
            let to = ((end - base) as usize).min(piece.len());
            out.extend_from_slice(&piece[from..to]);
        }
        Some(Ok(out.freeze()))
    }
}

/// The fetch side of an [`on_demand`](Body::on_demand) body.
#[derive(Debug)]
pub struct OnDemand {
    body: Weak<Body>,
    progress: watch::Receiver<State>,
}

impl OnDemand {
    /// Resolves with the [`Relay`] to fill the body once a reader waits for bytes of it, or
    /// with `None` once nobody holds the body any more (its channel closes with it).
    pub async fn requested(mut self) -> Option<Relay> {
        self.progress.wait_for(|s| s.asked).await.ok()?;
        let body = self.body.upgrade()?;
        Some(Relay { end: End { body, done: false } })
    }
}

/// Fills an [`on_demand`](Body::on_demand) body with pieces of bytes held elsewhere (the
/// same version's bytes fetched again), in order and without copying them. Dropped before
/// [`Relay::finish`], it fails the body.
#[derive(Debug)]
pub struct Relay {
    end: End,
}

impl Relay {
    /// Bytes relayed so far.
    fn written(&self) -> u64 {
        self.end.body.state.borrow().filled
    }

    /// Appends `piece`; an error if it runs past the body's length.
    fn push(&mut self, piece: Bytes) -> Result<(), SourceError> {
        self.end.check_room(self.written(), piece.len())?;
        if !piece.is_empty() {
            self.end.body.append(piece);
        }
        Ok(())
    }

    /// Relays the bytes of `source` (the same version, fetched again) as they arrive, in steps
    /// of its pieces, so that each is a slice of them and not a copy; stops early once nobody
    /// holds the body any more.
    pub async fn copy_from(&mut self, source: &Body) -> Result<(), SourceError> {
        const STEP: u32 = PIECE_ALIGN as u32;
        while self.written() < source.len() && !self.end.abandoned() {
            let piece = source.read(self.written(), STEP).await?;
            self.push(piece)?;
        }
        Ok(())
    }

    /// Ends the body; an error (which fails it) when bytes are missing.
    pub fn finish(mut self) -> Result<(), SourceError> {
        let written = self.written();
        self.end.finish(written)
    }

    /// Gives up: readers waiting for the rest get `error`.
    pub fn fail(&mut self, error: SourceError) {
        self.end.fail(error);
    }
}

/// The writing end of a body, for [`Filler`] and [`Relay`]: dropped before it is finished, it
/// fails the body, so a reader never waits for bytes nobody is bringing.
#[derive(Debug)]
struct End {
    body: Arc<Body>,
    done: bool,
}

impl End {
    /// True when nobody else holds the body any more: the rest is not worth fetching.
    fn abandoned(&self) -> bool {
        Arc::strong_count(&self.body) == 1
    }

    /// An error when `more` bytes after `written` run past the body's length.
    fn check_room(&self, written: u64, more: usize) -> Result<(), SourceError> {
        if written + more as u64 > self.body.len {
            return Err(SourceError::BadBody(format!(
                "body runs past its length of {} bytes",
                self.body.len
            )));
        }
        Ok(())
    }

    fn finish(&mut self, written: u64) -> Result<(), SourceError> {
        if written != self.body.len {
            let error = SourceError::BadBody(format!(
                "body has {written} bytes, Content-Length said {}",
                self.body.len
            ));
            self.fail(error.clone());
            return Err(error);
        }
        self.done = true;
        Ok(())
    }

    fn fail(&mut self, error: SourceError) {
        self.done = true;
        self.body.fail_with(error);
    }
}

impl Drop for End {
    fn drop(&mut self) {
        if !self.done {
            self.fail(abandoned());
        }
    }
}

fn abandoned() -> SourceError {
    SourceError::Transport("the fetch stopped before the end of the body".into())
}

/// A body's buffer, shared by its writer and the pieces readers hold; given back to the pool
/// when the last of them is dropped. The writer writes each byte once, front to back, and
/// readers only ever see bytes published before them (through the body's watch channel, which
/// orders the writes before the reads), so no byte is read while it is written.
#[derive(Debug)]
struct Slab {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain bytes owned by the slab; concurrent access is confined as the
// type's documentation says: one writer on bytes no reader can reach yet, readers on bytes no
// longer written.
unsafe impl Send for Slab {}
// SAFETY: as above.
unsafe impl Sync for Slab {}

impl Slab {
    fn new(buf: Box<[u8]>) -> Self {
        let len = buf.len();
        Self { ptr: Box::into_raw(buf).cast::<u8>(), len }
    }

    /// Copies `bytes` to `at` (the writer only, at or after everything published).
    fn write(&self, at: usize, bytes: &[u8]) {
        assert!(at.checked_add(bytes.len()).is_some_and(|end| end <= self.len));
        // SAFETY: in bounds (checked above); the range is not published yet, so no reader holds
        // it, and the single writer is the caller; `bytes` cannot overlap the slab, which
        // nothing else writes to or lends out mutably.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(at), bytes.len()) }
    }

    /// The bytes at `at..at + len`, written before and never written again.
    fn written(&self, at: usize, len: usize) -> &[u8] {
        assert!(at.checked_add(len).is_some_and(|end| end <= self.len));
        // SAFETY: in bounds (checked above), initialized (the buffer came initialized), and,
        // by the callers' contract, no longer written while borrowed.
        unsafe { std::slice::from_raw_parts(self.ptr.add(at), len) }
    }
}

impl Drop for Slab {
    fn drop(&mut self) {
        // SAFETY: `ptr` and `len` came from `Box::into_raw` of a `Box<[u8]>` in `new`, and
        // this is the only place that turns them back into it.
        let buf = unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr, self.len)) };
        pool::give_back(buf);
    }
}

/// A published piece of a slab, as the owner of a `Bytes`.
struct Piece {
    slab: Arc<Slab>,
    start: usize,
    len: usize,
}

impl AsRef<[u8]> for Piece {
    fn as_ref(&self) -> &[u8] {
        self.slab.written(self.start, self.len)
    }
}

/// Writes a [`Body`] from the front. Dropped before [`Filler::finish`], it fails the body, so
/// a reader never waits for bytes nobody is fetching.
#[derive(Debug)]
pub struct Filler {
    end: End,
    /// The body's buffer.
    slab: Arc<Slab>,
    /// Bytes written so far, published or not.
    written: u64,
    /// Bytes readers may see: `slab[..published]`, never written again.
    published: u64,
}

impl Filler {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// True when nobody holds the body any more: the rest of it is not worth fetching.
    pub fn abandoned(&self) -> bool {
        self.end.abandoned()
    }

    /// Appends `bytes` and makes them readable; an error if they run past the body's length.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), SourceError> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.end.check_room(self.written, bytes.len())?;
        self.slab.write(self.written as usize, bytes);
        self.written += bytes.len() as u64;
        let unpublished = (self.written - self.published) as usize;
        if self.written == self.end.body.len {
            self.publish(unpublished);
        } else {
            self.publish(unpublished / PIECE_ALIGN * PIECE_ALIGN);
        }
        Ok(())
    }

    /// Makes the first `n` unpublished bytes readable as one piece.
    fn publish(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let start = self.published as usize;
        let piece = Bytes::from_owner(Piece { slab: Arc::clone(&self.slab), start, len: n });
        self.published += n as u64;
        self.end.body.append(piece);
    }

    /// True when `bytes` equal the body's bytes from `offset` (all of them written already):
    /// a second answer for the same version must repeat what the first one sent.
    pub fn matches(&self, offset: u64, bytes: &[u8]) -> bool {
        if offset + bytes.len() as u64 > self.written {
            return false;
        }
        // This filler is the buffer's only writer: what it wrote does not change under it.
        self.slab.written(offset as usize, bytes.len()) == bytes
    }

    /// Ends the body; an error (which fails it) when bytes are missing.
    pub fn finish(mut self) -> Result<(), SourceError> {
        let written = self.written;
        self.end.finish(written)
    }

    /// Gives up: readers waiting for the rest get `error`.
    pub fn fail(&mut self, error: SourceError) {
        self.end.fail(error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[tokio::test]
    async fn an_on_demand_body_is_requested_by_its_first_waiting_reader_only() {
        let data = Bytes::from(pattern(3 * PIECE_ALIGN));
        let (body, demand) = Body::on_demand(data.len() as u64);
        let requested = tokio::spawn(demand.requested());
        assert!(body.read_now(0, 10).is_none(), "a look at the bytes asks for nothing");
        tokio::task::yield_now().await;
        assert!(!requested.is_finished());
        let reader = {
            let body = Arc::clone(&body);
            tokio::spawn(async move { body.read(PIECE_ALIGN as u64, 100).await })
        };
        let mut relay = requested.await.unwrap().expect("a reader waits");
        relay.push(data.slice(..2 * PIECE_ALIGN)).unwrap();
        let read = reader.await.unwrap().unwrap();
        assert_eq!(read, data.slice(PIECE_ALIGN..PIECE_ALIGN + 100), "relayed pieces are sliced");
        assert!(relay.push(data.slice(..2 * PIECE_ALIGN)).is_err(), "past the end");
        relay.push(data.slice(2 * PIECE_ALIGN..)).unwrap();
        relay.finish().unwrap();
        assert!(body.same_bytes(&Body::whole(data)));

        // Relayed from a streamed body of the same bytes: whole.
        let data = Bytes::from(pattern(2 * PIECE_ALIGN + 7));
        let (source, mut filler) = Body::filling(data.len() as u64);
        filler.push(&data).unwrap();
        filler.finish().unwrap();
        let (body, demand) = Body::on_demand(data.len() as u64);
        let reader = {
            let body = Arc::clone(&body);
            tokio::spawn(async move { body.read(0, 1).await })
        };
        let mut relay = demand.requested().await.unwrap();
        relay.copy_from(&source).await.unwrap();
        relay.finish().unwrap();
        assert_eq!(reader.await.unwrap().unwrap(), data.slice(..1));
        assert!(body.same_bytes(&source));

        // Nobody reads and the body goes: the fetch side learns it, and stops waiting.
        let (body, demand) = Body::on_demand(10);
        let requested = tokio::spawn(demand.requested());
        tokio::task::yield_now().await;
        drop(body);
        assert!(requested.await.unwrap().is_none());

        // A relay dropped early fails the readers.
        let (body, demand) = Body::on_demand(10);
        let reader = {
            let body = Arc::clone(&body);
            tokio::spawn(async move { body.read(0, 10).await })
        };
        let mut relay = demand.requested().await.unwrap();
        relay.push(Bytes::from_static(b"abc")).unwrap();
        drop(relay);
        assert!(reader.await.unwrap().is_err());
        assert!(body.failed());
    }

    #[test]
    fn whole_body_reads_slice_without_copy_and_clamp_at_the_end() {
        let body = Body::whole(Bytes::from_static(b"abcdef"));
        assert_eq!(&body.read_now(1, 3).unwrap().unwrap()[..], b"bcd");
        assert_eq!(&body.read_now(4, 100).unwrap().unwrap()[..], b"ef");
        assert!(body.read_now(6, 10).unwrap().unwrap().is_empty());
        assert!(body.read_now(u64::MAX, u32::MAX).unwrap().unwrap().is_empty());
        assert!(body.is_complete());
    }

    #[test]
    fn filling_body_serves_what_arrived_and_reads_across_pieces() {
        let align = PIECE_ALIGN;
        let data = Bytes::from(pattern(3 * align + 100));
        let (body, mut filler) = Body::filling(data.len() as u64);
        filler.push(&data[..align - 1]).unwrap();
        assert!(body.read_now(0, 1).is_none(), "a piece is readable once whole");
        assert!(filler.matches(3, &data[3..align - 1]), "unpublished bytes compare too");
        filler.push(&data[align - 1..align + 10]).unwrap();
        assert_eq!(&body.read_now(0, 4096).unwrap().unwrap()[..], &data[..4096]);
        assert!(body.read_now(align as u64 - 5, 10).is_none(), "bytes not in yet are waited for");
        filler.push(&data[align + 10..3 * align]).unwrap();
        assert!(filler.matches(3, &data[3..2 * align]));
        assert!(!filler.matches(3, &data[4..2 * align + 1]));
        filler.push(&data[3 * align..]).unwrap();
        filler.finish().unwrap();
        let across = body.read_now(align as u64 - 5, 10).unwrap().unwrap();
        assert_eq!(&across[..], &data[align - 5..align + 5]);
        let tail = body.read_now(3 * align as u64 + 50, 1000).unwrap().unwrap();
        assert_eq!(&tail[..], &data[3 * align + 50..]);
        assert!(body.same_bytes(&Body::whole(data.clone())));
        let mut other = data.to_vec();
        other[align + 1500] ^= 1;
        assert!(!body.same_bytes(&Body::whole(Bytes::from(other))));
    }

    #[test]
    fn pushing_past_the_length_is_an_error() {
        let (_body, mut filler) = Body::filling(4);
        filler.push(b"abc").unwrap();
        assert!(filler.push(b"de").is_err());
    }

    #[tokio::test]
    async fn readers_wait_for_their_bytes_and_see_the_failure_of_a_short_body() {
        let (body, mut filler) = Body::filling(10);
        let waiting = tokio::spawn({
            let body = Arc::clone(&body);
            async move { body.read(0, 10).await }
        });
        filler.push(b"01234").unwrap();
        assert!(filler.finish().is_err());
        let error = waiting.await.unwrap().unwrap_err();
        assert!(matches!(error, SourceError::BadBody(_)), "{error:?}");
    }

    #[tokio::test]
    async fn a_dropped_filler_fails_the_body_instead_of_leaving_readers_waiting() {
        let (body, filler) = Body::filling(3);
        drop(filler);
        assert!(body.read(0, 3).await.is_err());
        assert!(body.outcome().await.is_err());
    }

    #[tokio::test]
    async fn a_finished_body_reads_whole() {
        let data = Bytes::from(pattern(100_007));
        let (body, mut filler) = Body::filling(data.len() as u64);
        for at in (0..data.len()).step_by(4093) {
            filler.push(&data[at..(at + 4093).min(data.len())]).unwrap();
        }
        filler.finish().unwrap();
        assert!(body.outcome().await.is_ok());
        assert_eq!(&body.read_now(0, u32::MAX).unwrap().unwrap()[..], &data[..]);
        let empty = Body::whole(Bytes::new());
        assert!(empty.outcome().await.is_ok());
    }
}
