//! The bytes of one version of a Binary: whole, or still arriving from the server and readable
//! as they arrive, so that a program reading a cold file gets its first bytes while the rest
//! is on the way (the kernel moves the start of a file while the source fetches its end).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;

use crate::error::SourceError;

/// Size of the pieces a streamed body is kept in. A read waits for the piece that holds its
/// last byte, so this is how far a reader may lag behind the network; a read within one piece
/// is served without a copy (the kernel asks for at most 1 MiB at page-aligned offsets, so few
/// reads straddle two pieces).
pub const SEGMENT_BYTES: usize = 1 << 20;

/// Bytes of known length, complete or filling up from the front.
#[derive(Debug)]
pub struct Body {
    len: u64,
    /// Every piece holds `segment` bytes but the last.
    segment: usize,
    state: watch::Sender<State>,
}

#[derive(Debug, Default)]
struct State {
    pieces: Vec<Bytes>,
    /// Bytes in `pieces`.
    filled: u64,
    /// Why the rest will never come.
    failed: Option<SourceError>,
}

impl Body {
    /// A complete body.
    pub fn whole(bytes: Bytes) -> Arc<Self> {
        let len = bytes.len() as u64;
        let state = State { filled: len, pieces: vec![bytes], failed: None };
        Arc::new(Self {
            len,
            segment: usize::try_from(len).unwrap_or(usize::MAX).max(1),
            state: watch::Sender::new(state),
        })
    }

    /// An empty body of `len` bytes, and the [`Filler`] that writes them in order.
    pub fn filling(len: u64) -> (Arc<Self>, Filler) {
        let body = Arc::new(Self {
            len,
            segment: SEGMENT_BYTES,
            state: watch::Sender::new(State::default()),
        });
        let filler =
            Filler { body: Arc::clone(&body), current: BytesMut::new(), written: 0, done: false };
        (body, filler)
    }

    /// Its length in bytes, complete or not.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True once every byte is in.
    pub fn is_complete(&self) -> bool {
        self.state.borrow().filled == self.len
    }

    /// The bytes from `offset`, at most `size` of them (none past the end), if they are in;
    /// `None` while they are on the way; the error if they will never come.
    pub fn read_now(&self, offset: u64, size: u32) -> Option<Result<Bytes, SourceError>> {
        let (start, end) = self.range(offset, size);
        let state = self.state.borrow();
        self.slice(&state, start, end)
    }

    /// The bytes from `offset`, at most `size` of them, waiting for them if need be.
    pub async fn read(&self, offset: u64, size: u32) -> Result<Bytes, SourceError> {
        let (start, end) = self.range(offset, size);
        let mut progress = self.state.subscribe();
        let state = progress
            .wait_for(|s| s.filled >= end || s.failed.is_some())
            .await
            .map_err(|_| abandoned())?;
        self.slice(&state, start, end).unwrap_or_else(|| Err(abandoned()))
    }

    /// Waits until every byte is in; the error when they will not all come.
    pub async fn complete(&self) -> Result<(), SourceError> {
        self.read(self.len.saturating_sub(1), 1).await.map(|_| ())
    }

    /// The whole content as one buffer (a copy when it is in pieces), once complete.
    pub async fn to_bytes(&self) -> Result<Bytes, SourceError> {
        self.complete().await?;
        let state = self.state.borrow();
        if let [one] = state.pieces.as_slice() {
            return Ok(one.clone());
        }
        let mut all = BytesMut::with_capacity(usize::try_from(self.len).unwrap_or(0));
        for piece in &state.pieces {
            all.extend_from_slice(piece);
        }
        Ok(all.freeze())
    }

    /// True when both are complete and hold the same bytes.
    pub fn same_bytes(&self, other: &Body) -> bool {
        if self.len != other.len || !self.is_complete() || !other.is_complete() {
            return false;
        }
        let (a, b) = (self.state.borrow(), other.state.borrow());
        let left = a.pieces.iter().flat_map(|p| p.chunks(SEGMENT_BYTES));
        let right = b.pieces.iter().flat_map(|p| p.chunks(SEGMENT_BYTES));
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

    /// `offset..offset + size`, clamped to the body.
    fn range(&self, offset: u64, size: u32) -> (u64, u64) {
        let start = offset.min(self.len);
        (start, start.saturating_add(u64::from(size)).min(self.len))
    }

    fn slice(&self, state: &State, start: u64, end: u64) -> Option<Result<Bytes, SourceError>> {
        if state.filled < end {
            return state.failed.clone().map(Err);
        }
        if start == end {
            return Some(Ok(Bytes::new()));
        }
        let segment = self.segment as u64;
        let (first, last) = (start / segment, (end - 1) / segment);
        let piece_at = |i: u64| &state.pieces[i as usize];
        if first == last {
            let base = first * segment;
            return Some(Ok(piece_at(first).slice((start - base) as usize..(end - base) as usize)));
        }
        let mut out = BytesMut::with_capacity((end - start) as usize);
        for i in first..=last {
            let base = i * segment;
            let piece = piece_at(i);
            let from = start.saturating_sub(base) as usize;
            let to = ((end - base) as usize).min(piece.len());
            out.extend_from_slice(&piece[from..to]);
        }
        Some(Ok(out.freeze()))
    }
}

fn abandoned() -> SourceError {
    SourceError::Transport("the fetch stopped before the end of the body".into())
}

/// Writes a [`Body`] from the front. Dropped before [`Filler::finish`], it fails the body, so
/// a reader never waits for bytes nobody is fetching.
#[derive(Debug)]
pub struct Filler {
    body: Arc<Body>,
    /// The piece being filled.
    current: BytesMut,
    /// Bytes written so far, `current` included.
    written: u64,
    done: bool,
}

impl Filler {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// True when nobody holds the body any more: the rest of it is not worth fetching.
    pub fn abandoned(&self) -> bool {
        Arc::strong_count(&self.body) == 1
    }

    /// Appends `bytes`; an error if they run past the body's length.
    pub fn push(&mut self, mut bytes: &[u8]) -> Result<(), SourceError> {
        if self.written + bytes.len() as u64 > self.body.len {
            return Err(SourceError::BadBody(format!(
                "body runs past its Content-Length of {} bytes",
                self.body.len
            )));
        }
        while !bytes.is_empty() {
            if self.current.capacity() == 0 {
                let left = self.body.len - self.written;
                self.current = BytesMut::with_capacity(
                    usize::try_from(left).unwrap_or(usize::MAX).min(SEGMENT_BYTES),
                );
            }
            let room = self.piece_len() - self.current.len();
            let n = room.min(bytes.len());
            self.current.extend_from_slice(&bytes[..n]);
            self.written += n as u64;
            bytes = &bytes[n..];
            if self.current.len() == self.piece_len() {
                self.publish();
            }
        }
        Ok(())
    }

    /// True when `bytes` equal the body's bytes from `offset` (all of them written already):
    /// a second answer for the same version must repeat what the first one sent.
    pub fn matches(&self, offset: u64, bytes: &[u8]) -> bool {
        let end = offset + bytes.len() as u64;
        if end > self.written {
            return false;
        }
        let published = self.body.state.borrow().filled;
        let mut at = offset;
        let mut rest = bytes;
        while !rest.is_empty() {
            let (have, n) = if at < published {
                let n = rest.len().min((published - at) as usize).min(u32::MAX as usize);
                match self.body.read_now(at, n as u32) {
                    Some(Ok(have)) => (have, n),
                    _ => return false,
                }
            } else {
                let from = (at - published) as usize;
                (Bytes::copy_from_slice(&self.current[from..from + rest.len()]), rest.len())
            };
            if have[..] != rest[..n] {
                return false;
            }
            at += n as u64;
            rest = &rest[n..];
        }
        true
    }

    /// Ends the body; an error (which fails it) when bytes are missing.
    pub fn finish(mut self) -> Result<(), SourceError> {
        if self.written != self.body.len {
            let error = SourceError::BadBody(format!(
                "body has {} bytes, Content-Length said {}",
                self.written, self.body.len
            ));
            self.fail(error.clone());
            return Err(error);
        }
        if !self.current.is_empty() {
            self.publish();
        }
        self.done = true;
        Ok(())
    }

    /// Gives up: readers waiting for the rest get `error`.
    pub fn fail(&mut self, error: SourceError) {
        self.done = true;
        self.body.state.send_modify(|s| {
            s.failed.get_or_insert(error);
        });
    }

    /// How long the piece being filled will be.
    fn piece_len(&self) -> usize {
        let published = self.written - self.current.len() as u64;
        usize::try_from(self.body.len - published).unwrap_or(usize::MAX).min(SEGMENT_BYTES)
    }

    fn publish(&mut self) {
        let piece = std::mem::take(&mut self.current).freeze();
        self.body.state.send_modify(|s| {
            s.filled += piece.len() as u64;
            s.pieces.push(piece);
        });
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        if !self.done {
            self.fail(abandoned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
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
    fn filling_body_serves_whole_pieces_only_and_reads_across_pieces() {
        let data = pattern(SEGMENT_BYTES * 2 + 100);
        let (body, mut filler) = Body::filling(data.len() as u64);
        filler.push(&data[..SEGMENT_BYTES - 1]).unwrap();
        assert!(body.read_now(0, 1).is_none(), "a piece is served only once it is whole");
        filler.push(&data[SEGMENT_BYTES - 1..SEGMENT_BYTES + 10]).unwrap();
        assert_eq!(&body.read_now(0, 4096).unwrap().unwrap()[..], &data[..4096]);
        assert!(body.read_now(SEGMENT_BYTES as u64 - 5, 10).is_none());
        filler.push(&data[SEGMENT_BYTES + 10..]).unwrap();
        assert!(filler.matches(3, &data[3..SEGMENT_BYTES + 50]));
        assert!(!filler.matches(3, &data[4..SEGMENT_BYTES + 51]));
        filler.finish().unwrap();
        let across = body.read_now(SEGMENT_BYTES as u64 - 5, 10).unwrap().unwrap();
        assert_eq!(&across[..], &data[SEGMENT_BYTES - 5..SEGMENT_BYTES + 5]);
        let tail = body.read_now(2 * SEGMENT_BYTES as u64, 1000).unwrap().unwrap();
        assert_eq!(&tail[..], &data[2 * SEGMENT_BYTES..]);
        assert!(body.same_bytes(&Body::whole(Bytes::from(data.clone()))));
        let mut other = data.clone();
        other[SEGMENT_BYTES + 3] ^= 1;
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
        assert!(body.complete().await.is_err());
    }

    #[tokio::test]
    async fn a_finished_body_reads_whole() {
        let data = pattern(SEGMENT_BYTES + 7);
        let (body, mut filler) = Body::filling(data.len() as u64);
        for chunk in data.chunks(4093) {
            filler.push(chunk).unwrap();
        }
        filler.finish().unwrap();
        assert_eq!(&body.to_bytes().await.unwrap()[..], &data[..]);
        let empty = Body::whole(Bytes::new());
        assert!(empty.complete().await.is_ok());
    }
}
