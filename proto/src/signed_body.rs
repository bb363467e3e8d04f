//! The hash of a call's first message as its bytes arrived, for signature checks.
//!
//! A request's signature covers `blake2b-256` of its (first) message's encoding. Hashing a
//! re-encoding of the decoded message would be wrong: a protobuf map has no fixed order (the
//! client's `HashMap` and the server's differ), unknown fields are dropped by the decoder, and
//! another implementation may encode the same message differently. So a tower layer in front
//! of every server watches the request body's gRPC frames go by and hashes the first
//! message's bytes exactly as sent; the handler finds the hash in the request's extensions.
//! Nothing is buffered: the bytes are hashed as they stream through.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use blake2::Digest;
use bytes::{Buf, Bytes};
use http_body::{Frame, SizeHint};
use tonic::body::Body;

type Blake2b256 = blake2::Blake2b<blake2::digest::consts::U32>;

/// What the layer found: the hash, or why there is none.
pub type FirstMessage = Result<[u8; 32], &'static str>;

/// Set once the first message of the call has passed (in the request's extensions).
#[derive(Clone, Default, Debug)]
pub struct FirstMessageHash(Arc<OnceLock<FirstMessage>>);

impl FirstMessageHash {
    /// The hash of the first message's bytes, if they have all arrived.
    pub fn get(&self) -> Option<FirstMessage> {
        self.0.get().copied()
    }
}

/// The layer: put it in front of every server that verifies signed requests.
#[derive(Clone, Copy, Debug, Default)]
pub struct HashFirstMessage;

impl<S> tower_layer::Layer<S> for HashFirstMessage {
    type Service = HashFirstMessageService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HashFirstMessageService { inner }
    }
}

/// The layer's service.
#[derive(Clone, Debug)]
pub struct HashFirstMessageService<S> {
    inner: S,
}

impl<S> tower_service::Service<http::Request<Body>> for HashFirstMessageService<S>
where
    S: tower_service::Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let slot = FirstMessageHash::default();
        let (mut parts, body) = req.into_parts();
        parts.extensions.insert(slot.clone());
        let body = Body::new(Hashing { inner: body, frame: FrameHasher::new(), slot });
        self.inner.call(http::Request::from_parts(parts, body))
    }
}

struct Hashing {
    inner: Body,
    frame: FrameHasher,
    slot: FirstMessageHash,
}

impl http_body::Body for Hashing {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
            && let Some(done) = this.frame.feed(data.clone())
        {
            let _ = this.slot.0.set(done);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Reads the 5-byte gRPC message prefix (compressed flag, big-endian length), then hashes
/// that many bytes.
struct FrameHasher {
    prefix: Vec<u8>,
    left: Option<usize>,
    hash: Blake2b256,
    done: bool,
}

impl FrameHasher {
    fn new() -> Self {
        FrameHasher {
            prefix: Vec::with_capacity(5),
            left: None,
            hash: Blake2b256::new(),
            done: false,
        }
    }

    /// Feeds bytes of the body; returns the result once the first message is complete.
    fn feed(&mut self, mut data: Bytes) -> Option<FirstMessage> {
        if self.done {
            return None;
        }
        while data.has_remaining() {
            let Some(left) = self.left else {
                let take = (5 - self.prefix.len()).min(data.len());
                self.prefix.extend_from_slice(&data.split_to(take));
                if self.prefix.len() == 5 {
                    if self.prefix[0] != 0 {
                        self.done = true;
                        return Some(Err("compressed requests are not accepted"));
                    }
                    let len = u32::from_be_bytes(self.prefix[1..5].try_into().expect("4 bytes"));
                    self.left = Some(len as usize);
                    if len == 0 {
                        return self.finish();
                    }
                }
                continue;
            };
            let take = left.min(data.len());
            self.hash.update(data.split_to(take));
            self.left = Some(left - take);
            if left == take {
                return self.finish();
            }
        }
        None
    }

    fn finish(&mut self) -> Option<FirstMessage> {
        self.done = true;
        let h = std::mem::replace(&mut self.hash, Blake2b256::new());
        Some(Ok(h.finalize().into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(msg: &[u8]) -> Vec<u8> {
        let mut b = vec![0];
        b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        b.extend_from_slice(msg);
        b
    }

    #[test]
    fn the_first_message_is_hashed_however_the_body_is_split() {
        let first = b"the first message".to_vec();
        let mut body = framed(&first);
        body.extend(framed(b"a second one"));
        let want = shardfarm_core::identity::blake2b256(&[&first]);
        for cut in [1, 2, 5, 6, 9, 22, body.len()] {
            let mut h = FrameHasher::new();
            let mut got = None;
            for piece in body.chunks(cut) {
                if let Some(r) = h.feed(Bytes::copy_from_slice(piece)) {
                    assert!(got.is_none(), "reported twice");
                    got = Some(r);
                }
            }
            assert_eq!(got, Some(Ok(want)), "split every {cut} bytes");
        }
    }

    #[test]
    fn empty_compressed_and_truncated_messages() {
        let mut h = FrameHasher::new();
        assert_eq!(
            h.feed(Bytes::from(framed(b""))),
            Some(Ok(shardfarm_core::identity::blake2b256(&[])))
        );
        let mut h = FrameHasher::new();
        let mut c = framed(b"x");
        c[0] = 1;
        assert!(h.feed(Bytes::from(c)).unwrap().is_err());
        let mut h = FrameHasher::new();
        assert_eq!(h.feed(Bytes::from(framed(b"whole")[..7].to_vec())), None);
    }
}
