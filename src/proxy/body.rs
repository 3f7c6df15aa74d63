//! Bodies as they stream through: frame by frame, never buffered, with the silence
//! timeout of SPEC §2 (`--response-timeout` is also the longest pause inside a body) and
//! a byte count for the audit log. Whatever the body carries along (the request's log
//! record, the connection's in-flight mark) is dropped with it, which is how the proxy
//! knows a streamed request has really finished.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::error::{BodyError, BodyTooLarge, BoxError};

/// What one request's bodies moved each way, for its log record and the metrics, and why
/// one was cut short, if it was (the agent already has its status line by then; written
/// once, by whatever cut it). One allocation shared by the record and both bodies.
#[derive(Debug, Default)]
pub(crate) struct Moved {
    pub(crate) up: AtomicU64,
    pub(crate) down: AtomicU64,
    pub(crate) cut: OnceLock<String>,
    /// The agent's body passed its route's `max_body_bytes` ([`Tracked::capped`]): the request is
    /// refused as `body_too_large` even when the refusal can only be a cut.
    pub(crate) over_cap: AtomicBool,
}

/// Which of a request's bodies a [`Tracked`] is.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Way {
    /// The agent's request body, on its way up.
    Up,
    /// The upstream's response body, on its way down.
    Down,
}

impl Way {
    fn whose(self) -> &'static str {
        match self {
            Way::Up => "the agent",
            Way::Down => "the upstream",
        }
    }
}

pin_project! {
    /// Wraps a body: counts its bytes into `moved` (its way's count), fails it after
    /// `idle` without a frame (noting why in `moved`), holds it to a cap if it has one
    /// ([`Tracked::capped`]), and holds `_keep` until the body is dropped.
    pub struct Tracked<B, K> {
        #[pin]
        inner: B,
        #[pin]
        silence: Sleep,
        idle: Duration,
        moved: Arc<Moved>,
        way: Way,
        cap: Option<u64>,
        _keep: K,
    }
}

impl<B, K> Tracked<B, K> {
    pub(crate) fn new(inner: B, idle: Duration, moved: Arc<Moved>, way: Way, keep: K) -> Self {
        Tracked {
            inner,
            silence: tokio::time::sleep(idle),
            idle,
            moved,
            way,
            cap: None,
            _keep: keep,
        }
    }

    /// Holds the body to `cap` bytes (an agent's request body to its route's
    /// `max_body_bytes`): the frame that would take it past the cap is never handed on;
    /// the body fails with [`BodyTooLarge`] instead and `moved` notes it, so the upstream
    /// gets at most the cap's bytes and then a reset request. A body of exactly the cap
    /// passes.
    pub(crate) fn capped(mut self, cap: Option<u64>) -> Self {
        self.cap = cap;
        self
    }
}

impl<B, K> Body for Tracked<B, K>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let count = match this.way {
                        Way::Up => &this.moved.up,
                        Way::Down => &this.moved.down,
                    };
                    let len = data.len() as u64;
                    // This body is its way's only counter: what it counted is what passed.
                    if let Some(max) = *this.cap
                        && count.load(Ordering::Relaxed).saturating_add(len) > max
                    {
                        this.moved.over_cap.store(true, Ordering::Relaxed);
                        let e: BoxError = Box::new(BodyTooLarge(max));
                        let whose = this.way.whose();
                        let _ = this
                            .moved
                            .cut
                            .set(format!("cut: {whose}'s body failed: {e}"));
                        return Poll::Ready(Some(Err(BodyError(e))));
                    }
                    count.fetch_add(len, Ordering::Relaxed);
                }
                this.silence.as_mut().reset(Instant::now() + *this.idle);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let e: BoxError = e.into();
                let whose = this.way.whose();
                let _ = this
                    .moved
                    .cut
                    .set(format!("cut: {whose}'s body failed: {e}"));
                Poll::Ready(Some(Err(BodyError(e))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.silence.poll(cx) {
                Poll::Ready(()) => {
                    let secs = this.idle.as_secs_f64();
                    let whose = this.way.whose();
                    let _ = this
                        .moved
                        .cut
                        .set(format!("cut: {whose} sent nothing for {secs}s"));
                    let e = format!("no body data for {secs}s");
                    Poll::Ready(Some(Err(BodyError(e.into()))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The most body bytes a DATA frame can carry and still fit, with its 9-byte head, in one
/// TLS record (16,384 bytes of plaintext). A frame of the usual 16,384-byte limit needs a
/// second record for its last 9 bytes, and the agent then decrypts two records per frame,
/// one of them nearly empty: a download through the proxy cost the agent more than one
/// straight from an origin sending the same frames.
const DATA_IN_ONE_RECORD: usize = 16_384 - 9;

/// The smallest frame size an HTTP/2 peer may allow, and what agents allow in practice.
const SMALLEST_MAX_FRAME: usize = 16_384;

pin_project! {
    /// Splits a body's data frames larger than a frame into pieces of at most
    /// [`DATA_IN_ONE_RECORD`] bytes (without copying: each piece shares the frame's
    /// buffer), for an HTTP/2 agent. A chunk that fits one frame is left whole: cutting
    /// it would only add a frame (and a system call) for the same two records.
    pub struct RecordSized<B> {
        #[pin]
        inner: B,
        rest: Bytes,
    }
}

impl<B> RecordSized<B> {
    pub(crate) fn new(inner: B) -> Self {
        RecordSized {
            inner,
            rest: Bytes::new(),
        }
    }
}

impl<B: Body<Data = Bytes>> Body for RecordSized<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        if this.rest.is_empty() {
            match std::task::ready!(this.inner.poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if data.len() <= SMALLEST_MAX_FRAME => {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Ok(data) => *this.rest = data,
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                other => return Poll::Ready(other),
            }
        }
        let n = this.rest.len().min(DATA_IN_ONE_RECORD);
        Poll::Ready(Some(Ok(Frame::data(this.rest.split_to(n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + rest);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    #[tokio::test(start_paused = true)]
    async fn counts_bytes_and_times_out_on_silence() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let moved = Arc::new(Moved::default());
        let mut body = Box::pin(Tracked::new(
            StreamBody::new(stream),
            Duration::from_secs(5),
            moved.clone(),
            Way::Down,
            (),
        ));
        tx.send(Ok(Frame::data(Bytes::from_static(b"hello"))))
            .await
            .unwrap();
        let f = body.as_mut().frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "hello");
        assert_eq!(moved.down.load(Ordering::Relaxed), 5);
        // Silence longer than the idle timeout fails the body instead of hanging.
        let e = body.as_mut().frame().await.unwrap().unwrap_err();
        assert!(e.to_string().contains("no body data"), "{e}");
        assert_eq!(
            moved.cut.get().map(String::as_str),
            Some("cut: the upstream sent nothing for 5s")
        );
        drop(tx);
    }

    #[tokio::test]
    async fn capped_passes_the_cap_exactly_and_never_a_byte_more() {
        let frames = |sizes: &[usize]| {
            let frames: Vec<Result<Frame<Bytes>, BoxError>> = sizes
                .iter()
                .map(|n| Ok(Frame::data(Bytes::from(vec![b'x'; *n]))))
                .chain([Ok(Frame::trailers(http::HeaderMap::new()))])
                .collect();
            StreamBody::new(futures_util::stream::iter(frames))
        };
        // Exactly the cap, over several frames, trailers included: all of it.
        let capped = |sizes: &[usize], moved: &Arc<Moved>| {
            let idle = Duration::from_secs(60);
            Tracked::new(frames(sizes), idle, moved.clone(), Way::Up, ()).capped(Some(10))
        };
        let moved = Arc::new(Moved::default());
        let whole = capped(&[4, 0, 6], &moved).collect().await.unwrap();
        assert_eq!(whole.to_bytes().len(), 10);
        assert!(!moved.over_cap.load(Ordering::Relaxed));
        // One byte over, in the last frame: what came before it, then the error.
        let moved = Arc::new(Moved::default());
        let mut body = Box::pin(capped(&[4, 7], &moved));
        let first = body.as_mut().frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap().len(), 4);
        let e = body.as_mut().frame().await.unwrap().unwrap_err();
        assert!(e.0.downcast_ref::<BodyTooLarge>().is_some(), "{e}");
        assert!(moved.over_cap.load(Ordering::Relaxed));
        assert_eq!(
            e.to_string(),
            "the request body is over the route's max_body_bytes (10)"
        );
        // One frame over the cap on its own: nothing of it.
        let moved = Arc::new(Moved::default());
        let mut body = Box::pin(capped(&[11], &moved));
        assert!(body.as_mut().frame().await.unwrap().is_err());
        assert_eq!(moved.up.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn record_sized_splits_large_frames_and_keeps_the_rest_whole() {
        let big = Bytes::from(vec![7u8; 3 * DATA_IN_ONE_RECORD + 100]);
        let one_frame = Bytes::from(vec![8u8; SMALLEST_MAX_FRAME]);
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"small"))),
            Ok(Frame::data(big.clone())),
            Ok(Frame::data(one_frame.clone())),
            Ok(Frame::trailers(http::HeaderMap::new())),
        ];
        let body = RecordSized::new(StreamBody::new(futures_util::stream::iter(frames)));
        assert_eq!(body.size_hint().lower(), 0);
        let mut body = Box::pin(body);
        let mut sizes = Vec::new();
        let mut joined = Vec::new();
        let mut trailers = 0;
        while let Some(frame) = body.as_mut().frame().await {
            match frame.unwrap().into_data() {
                Ok(d) => {
                    sizes.push(d.len());
                    joined.extend_from_slice(&d);
                }
                Err(_) => trailers += 1,
            }
        }
        // A chunk of one frame or less stays whole.
        let piece = DATA_IN_ONE_RECORD;
        assert_eq!(sizes, [5, piece, piece, piece, 100, SMALLEST_MAX_FRAME]);
        assert_eq!(&joined[5..5 + big.len()], &big[..]);
        assert_eq!(&joined[5 + big.len()..], &one_frame[..]);
        assert_eq!(trailers, 1);

        // The end is reported only once the last piece is out.
        let len = SMALLEST_MAX_FRAME + 1;
        let whole = http_body_util::Full::new(Bytes::from(vec![1u8; len]));
        let mut body = Box::pin(RecordSized::new(whole));
        assert_eq!(body.size_hint().exact(), Some(len as u64));
        let first = body.as_mut().frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap().len(), piece);
        assert!(!body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some((len - piece) as u64));
        let last = body.as_mut().frame().await.unwrap().unwrap();
        assert_eq!(last.into_data().unwrap().len(), len - piece);
        assert!(body.is_end_stream());
    }
}
