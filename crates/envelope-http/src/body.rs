//! Request bodies that can be sent more than once, within a memory cap.
//!
//! A retry must send the same bytes again, so the body of a request that may be retried is buffered — but only up
//! to a cap ([`DEFAULT_REPLAY_LIMIT`], 64 KiB). A body known to be larger (by its `Content-Length`) is not buffered
//! at all; a body that turns out to be larger while it is read is forwarded once with what was already read in
//! front of the rest. Such a request is never retried: [`Prepared::attempt`] gives its body out once.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

/// Default cap on a buffered (replayable) request body.
pub const DEFAULT_REPLAY_LIMIT: usize = 64 * 1024;

/// A request body, buffered for replay or kept for one send.
#[derive(Debug)]
pub enum Prepared<B> {
    /// The whole body, small enough to send again.
    Replayable {
        /// The body's bytes.
        data: Bytes,
        /// Its trailers, if any.
        trailers: Option<HeaderMap>,
    },
    /// A body too large to buffer: what was read, then the rest, for one send only (`None` once sent).
    Once(Option<(Bytes, B)>),
}

/// Reads `body` into memory if it fits in `limit` bytes; otherwise keeps it for a single send.
pub async fn prepare<B>(mut body: B, limit: usize) -> Result<Prepared<B>, B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    if body.size_hint().lower() > limit as u64 {
        return Ok(Prepared::Once(Some((Bytes::new(), body))));
    }
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(data) if buf.len() + data.len() > limit => {
                buf.extend_from_slice(&data);
                return Ok(Prepared::Once(Some((buf.freeze(), body))));
            }
            Ok(data) => buf.extend_from_slice(&data),
            Err(frame) => {
                let trailers = frame.into_trailers().ok();
                return Ok(Prepared::Replayable { data: buf.freeze(), trailers });
            }
        }
    }
    Ok(Prepared::Replayable { data: buf.freeze(), trailers: None })
}

impl<B> Prepared<B> {
    /// Whether the body can be sent more than once.
    pub fn is_replayable(&self) -> bool {
        matches!(self, Prepared::Replayable { .. })
    }

    /// The body for the next attempt: always for a replayable body, once for the other kind.
    pub fn attempt(&mut self) -> Option<AttemptBody<B>> {
        match self {
            Prepared::Replayable { data, trailers } => {
                Some(AttemptBody::Full { data: Some(data.clone()), trailers: trailers.clone() })
            }
            Prepared::Once(once) => {
                once.take().map(|(prefix, rest)| AttemptBody::Stream { prefix: Some(prefix), rest })
            }
        }
    }
}

/// The body sent by one attempt.
#[derive(Debug)]
pub enum AttemptBody<B> {
    /// A buffered body (a clone of the replay buffer: no copy).
    Full {
        /// Not yet sent data.
        data: Option<Bytes>,
        /// Not yet sent trailers.
        trailers: Option<HeaderMap>,
    },
    /// What was read while buffering, then the rest of the original body.
    Stream {
        /// Not yet sent prefix.
        prefix: Option<Bytes>,
        /// The rest.
        rest: B,
    },
}

impl<B> Body for AttemptBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.get_mut() {
            AttemptBody::Full { data, trailers } => {
                if let Some(d) = data.take().filter(|d| !d.is_empty()) {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            AttemptBody::Stream { prefix, rest } => {
                if let Some(p) = prefix.take().filter(|p| !p.is_empty()) {
                    return Poll::Ready(Some(Ok(Frame::data(p))));
                }
                Pin::new(rest).poll_frame(cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            AttemptBody::Full { data, trailers } => data.as_ref().is_none_or(Bytes::is_empty) && trailers.is_none(),
            AttemptBody::Stream { prefix, rest } => prefix.as_ref().is_none_or(Bytes::is_empty) && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            AttemptBody::Full { data, .. } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            AttemptBody::Stream { prefix, rest } => {
                let p = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let r = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(r.lower() + p);
                if let Some(upper) = r.upper() {
                    hint.set_upper(upper + p);
                }
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use std::convert::Infallible;

    async fn collect<B: Body<Data = Bytes> + Unpin>(body: B) -> Vec<u8>
    where
        B::Error: std::fmt::Debug,
    {
        body.collect().await.unwrap().to_bytes().to_vec()
    }

    /// A body delivered in several data frames, with no declared length.
    struct Chunks(std::collections::VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    fn chunks(parts: &[&'static [u8]]) -> Chunks {
        Chunks(parts.iter().map(|p| Bytes::from_static(p)).collect())
    }

    #[tokio::test]
    async fn small_bodies_replay_identically() {
        let mut p = prepare(chunks(&[b"hello ", b"world"]), 64).await.unwrap();
        assert!(p.is_replayable());
        for _ in 0..3 {
            assert_eq!(collect(p.attempt().unwrap()).await, b"hello world");
        }
    }

    #[tokio::test]
    async fn a_body_larger_than_the_cap_is_sent_once_and_whole() {
        let mut p = prepare(chunks(&[b"0123456789", b"abcdefghij", b"KLMNOPQRST"]), 15).await.unwrap();
        assert!(!p.is_replayable());
        assert_eq!(collect(p.attempt().unwrap()).await, b"0123456789abcdefghijKLMNOPQRST", "nothing lost");
        assert!(p.attempt().is_none(), "never sent twice");
    }

    #[tokio::test]
    async fn a_declared_length_over_the_cap_is_not_buffered() {
        let body = Full::new(Bytes::from(vec![7u8; 100]));
        let mut p = prepare(body, 99).await.unwrap();
        let Prepared::Once(Some((prefix, _))) = &p else { panic!("not buffered") };
        assert!(prefix.is_empty(), "not a byte was read into memory");
        assert_eq!(collect(p.attempt().unwrap()).await.len(), 100);
    }

    #[tokio::test]
    async fn empty_bodies_and_exact_fits_replay() {
        let mut p = prepare(Full::new(Bytes::new()), 0).await.unwrap();
        assert!(p.is_replayable());
        assert!(p.attempt().unwrap().is_end_stream());
        let mut p = prepare(chunks(&[b"12345"]), 5).await.unwrap();
        assert!(p.is_replayable(), "a body of exactly the cap is buffered");
        assert_eq!(collect(p.attempt().unwrap()).await, b"12345");
    }
}
