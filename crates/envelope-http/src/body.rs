//! Request bodies that can be sent more than once, within a memory cap.
//!
//! A retry must send the same bytes again, so the body of a request that may be retried is buffered — but only up
//! to a cap ([`DEFAULT_REPLAY_LIMIT`], 64 KiB). A body known to be larger (by its `Content-Length`) is not buffered
//! at all; a body that turns out to be larger while it is read is forwarded once with what was already read in
//! front of the rest. Such a request is never retried: [`Prepared::attempt`] gives its body out once.
//!
//! A body that may not end before its answer comes (a gRPC stream: the client sends, reads, sends again) cannot be
//! read first. [`tee`] sends it as it comes and keeps a copy, within the same cap: once the first attempt has sent
//! all of it, later attempts can send it again ([`Replay::now`] says when).

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
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
    /// A body sent as it comes, copied as it goes ([`tee`]): the body while no attempt sends it (an attempt that
    /// sent none of it gives it back), and the copy.
    Teed(Arc<Mutex<Option<B>>>, Arc<Mutex<TeeCopy>>),
}

/// What a teed body's first attempt has sent so far.
#[derive(Debug, Default)]
pub struct TeeCopy {
    data: BytesMut,
    trailers: Option<HeaderMap>,
    /// The body ended (all of it is in `data` and `trailers`, unless `over`).
    ended: bool,
    /// It grew past the cap: the copy was dropped.
    over: bool,
    /// Not a byte of it was sent yet: the body waits for an attempt.
    unsent: bool,
    limit: usize,
}

/// Keeps `body` for sending as it comes, copying up to `limit` bytes of it for later attempts.
pub fn tee<B>(body: B, limit: usize) -> Prepared<B> {
    let copy = TeeCopy { limit, unsent: true, ..TeeCopy::default() };
    Prepared::Teed(Arc::new(Mutex::new(Some(body))), Arc::new(Mutex::new(copy)))
}

/// The first attempt's part of a teed body: the body itself, copied as it passes, given back if the attempt ends
/// before a frame of it was read.
#[derive(Debug)]
pub struct TeeBody<B> {
    rest: Option<B>,
    home: Arc<Mutex<Option<B>>>,
    copy: Arc<Mutex<TeeCopy>>,
    started: bool,
}

impl<B> Drop for TeeBody<B> {
    fn drop(&mut self) {
        if !self.started
            && let Some(body) = self.rest.take()
        {
            *self.home.lock().unwrap_or_else(PoisonError::into_inner) = Some(body);
            self.copy.lock().unwrap_or_else(PoisonError::into_inner).unsent = true;
        }
    }
}

impl<B> Body for TeeBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let Some(rest) = this.rest.as_mut() else { return Poll::Ready(None) };
        let frame = std::task::ready!(Pin::new(&mut *rest).poll_frame(cx));
        this.started = true;
        let mut c = this.copy.lock().unwrap_or_else(PoisonError::into_inner);
        match &frame {
            Some(Ok(f)) => {
                if let Some(data) = f.data_ref() {
                    if c.data.len() + data.len() > c.limit {
                        c.over = true;
                        c.data = BytesMut::new();
                    } else if !c.over {
                        c.data.extend_from_slice(data);
                    }
                } else if let Some(t) = f.trailers_ref() {
                    c.trailers = Some(t.clone());
                    c.ended = true;
                }
            }
            None => c.ended = true,
            Some(Err(_)) => c.over = true,
        }
        // A sender that sees the end here polls no more.
        if rest.is_end_stream() {
            c.ended = true;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.rest.as_ref().map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// Whether a prepared body can be sent again now.
#[derive(Debug, Clone)]
pub enum Replay {
    /// Always (buffered).
    Always,
    /// Never (streamed once).
    Never,
    /// Once the first attempt has sent all of it within the cap (teed).
    WhenSent(Arc<Mutex<TeeCopy>>),
}

impl Replay {
    /// Whether the body can be sent again now.
    pub fn now(&self) -> bool {
        match self {
            Replay::Always => true,
            Replay::Never => false,
            Replay::WhenSent(copy) => {
                let copy = copy.lock().unwrap_or_else(PoisonError::into_inner);
                copy.unsent || (copy.ended && !copy.over)
            }
        }
    }
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
    /// Whether the body can be sent more than once, whatever the first attempt does (buffered).
    pub fn is_replayable(&self) -> bool {
        matches!(self, Prepared::Replayable { .. })
    }

    /// When the body can be sent again.
    pub fn replay(&self) -> Replay {
        match self {
            Prepared::Replayable { .. } => Replay::Always,
            Prepared::Once(_) => Replay::Never,
            Prepared::Teed(_, copy) => Replay::WhenSent(copy.clone()),
        }
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
            Prepared::Teed(home, copy) => {
                let waiting = home.lock().unwrap_or_else(PoisonError::into_inner).take();
                let mut c = copy.lock().unwrap_or_else(PoisonError::into_inner);
                match waiting {
                    Some(rest) => {
                        c.unsent = false;
                        let (home, copy) = (home.clone(), copy.clone());
                        Some(AttemptBody::Tee(TeeBody { rest: Some(rest), home, copy, started: false }))
                    }
                    None => (c.ended && !c.over).then(|| AttemptBody::Full {
                        data: Some(Bytes::copy_from_slice(&c.data)),
                        trailers: c.trailers.clone(),
                    }),
                }
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
    /// The original body as it comes, copied (within the cap) for later attempts.
    Tee(TeeBody<B>),
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
            AttemptBody::Tee(tee) => Pin::new(tee).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            AttemptBody::Full { data, trailers } => data.as_ref().is_none_or(Bytes::is_empty) && trailers.is_none(),
            AttemptBody::Stream { prefix, rest } => prefix.as_ref().is_none_or(Bytes::is_empty) && rest.is_end_stream(),
            AttemptBody::Tee(tee) => tee.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            AttemptBody::Full { data, .. } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            AttemptBody::Tee(tee) => tee.size_hint(),
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

    /// A body whose frames come one per poll, with a pause (`Pending`, woken at once) before each.
    struct Trickle {
        frames: std::collections::VecDeque<Frame<Bytes>>,
        paused: bool,
    }

    impl Body for Trickle {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            if !self.paused && !self.frames.is_empty() {
                self.paused = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.paused = false;
            Poll::Ready(self.frames.pop_front().map(Ok))
        }
    }

    fn trickle(parts: &[&'static [u8]], trailers: bool) -> Trickle {
        let mut frames: std::collections::VecDeque<_> =
            parts.iter().map(|p| Frame::data(Bytes::from_static(p))).collect();
        if trailers {
            let mut t = HeaderMap::new();
            t.insert("grpc-status", http::HeaderValue::from_static("0"));
            frames.push_back(Frame::trailers(t));
        }
        Trickle { frames, paused: false }
    }

    #[tokio::test]
    async fn a_teed_body_is_sent_as_it_comes_and_again_once_the_first_attempt_sent_it_all() {
        let mut p = tee(trickle(&[b"first ", b"second"], true), 64);
        let replay = p.replay();
        assert!(!p.is_replayable() && replay.now(), "nothing sent yet");
        let mut first = p.attempt().unwrap();
        assert!(p.attempt().is_none(), "the first attempt is still sending it");
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "first ");
        assert!(!replay.now());
        let rest = first.collect().await.unwrap();
        assert_eq!(rest.trailers().unwrap()["grpc-status"], "0");
        assert!(replay.now());
        for _ in 0..2 {
            let again = p.attempt().unwrap().collect().await.unwrap();
            assert_eq!(again.trailers().unwrap()["grpc-status"], "0");
            assert_eq!(again.to_bytes(), "first second");
        }
    }

    #[tokio::test]
    async fn a_teed_body_past_the_cap_is_sent_once_whole() {
        let mut p = tee(trickle(&[b"0123456789", b"abcdefghij"], false), 15);
        let replay = p.replay();
        assert_eq!(collect(p.attempt().unwrap()).await, b"0123456789abcdefghij", "nothing lost");
        assert!(!replay.now());
        assert!(p.attempt().is_none(), "never sent twice");
    }

    #[tokio::test]
    async fn a_teed_body_an_attempt_never_read_waits_for_the_next() {
        let mut p = tee(trickle(&[b"a", b"b"], false), 64);
        drop(p.attempt().unwrap());
        assert!(p.replay().now(), "not a byte was sent: it may be sent by another attempt");
        assert_eq!(collect(p.attempt().unwrap()).await, b"ab");
        assert_eq!(collect(p.attempt().unwrap()).await, b"ab", "and copied as it went");
    }

    #[tokio::test]
    async fn a_teed_body_whose_first_attempt_stopped_early_is_not_sent_again() {
        let mut p = tee(trickle(&[b"a", b"b"], false), 64);
        let mut first = p.attempt().unwrap();
        let _ = first.frame().await;
        drop(first);
        assert!(!p.replay().now());
        assert!(p.attempt().is_none());
    }
}
