//! Bodies on the upstream side: the response body from either client
//! ([`UpstreamBody`]), and the request body on its way up ([`Upload`]).
//!
//! The upload is watched for two reasons. The response timeout runs from the moment the
//! request body last moved, not from the request's start (SPEC §4a): an upload that keeps
//! moving is never cut however long it takes, and one the upstream stops taking is cut
//! like an upstream that stops answering ([`await_head`]). And when the agent's own body
//! fails (a bad chunk size, fewer bytes than its `Content-Length`), the send fails too,
//! and that failure is the agent's, not the upstream's (SPEC §4.3: `400`, never `502`).

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;

use super::h2::OpenStream;
use crate::error::{BodyError, BodyTooLarge, BoxError, ErrorKind, ProxyError};

/// A response body from either client.
pub(crate) enum UpstreamBody {
    Hyper(Incoming),
    /// The stream, whether its data has ended (trailers may follow), and the request's
    /// count in the connection's open streams (and the stream budget), held until the
    /// body is dropped.
    H2 {
        recv: h2::RecvStream,
        data_done: bool,
        _open: OpenStream,
    },
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            UpstreamBody::Hyper(b) => Pin::new(b)
                .poll_frame(cx)
                .map_err(|e| Box::new(e) as BoxError),
            UpstreamBody::H2 {
                recv, data_done, ..
            } => {
                if !*data_done {
                    match recv.poll_data(cx) {
                        Poll::Ready(Some(Ok(data))) => {
                            let _ = recv.flow_control().release_capacity(data.len());
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(Box::new(e)))),
                        Poll::Ready(None) => *data_done = true,
                        Poll::Pending => return Poll::Pending,
                    }
                }
                match recv.poll_trailers(cx) {
                    Poll::Ready(Ok(Some(t))) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
                    Poll::Ready(Ok(None)) => Poll::Ready(None),
                    Poll::Ready(Err(e)) => Poll::Ready(Some(Err(Box::new(e)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Hyper(b) => b.is_end_stream(),
            UpstreamBody::H2 { recv, .. } => recv.is_end_stream(),
        }
    }
}

/// When a body last moved (the other side took a frame of it), as one atomic that the
/// body stores to and a timer reads: the body's path pays no timer reset per frame.
#[derive(Debug)]
pub(crate) struct LastMoved {
    epoch: Instant,
    /// Milliseconds since `epoch`.
    ms: AtomicU64,
}

impl LastMoved {
    /// Moved last now.
    pub(crate) fn now() -> LastMoved {
        LastMoved {
            epoch: Instant::now(),
            ms: AtomicU64::new(0),
        }
    }

    pub(crate) fn moved(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.ms.store(ms, Ordering::Relaxed);
    }

    pub(crate) fn at(&self) -> Instant {
        self.epoch + Duration::from_millis(self.ms.load(Ordering::Relaxed))
    }

    /// Returns once `timeout` has passed with nothing moved since `since` (or since the
    /// last move, if later). A silence while `excused()` holds is another timer's to cut
    /// (the other side's), so it buys another `timeout`. No timer is reset per move: the
    /// wait sleeps to its deadline and looks at when the body last moved.
    pub(crate) async fn stilled(
        &self,
        since: Instant,
        timeout: Duration,
        excused: impl Fn() -> bool,
    ) {
        let mut deadline = since.max(self.at()) + timeout;
        loop {
            tokio::time::sleep_until(deadline).await;
            let now = Instant::now();
            let moved = since.max(self.at()) + timeout;
            if moved > now {
                deadline = moved;
            } else if excused() {
                deadline = now + timeout;
            } else {
                return;
            }
        }
    }
}

/// What a request's upload has done so far, shared between the body the upstream client
/// reads and the request waiting for its response head.
#[derive(Debug)]
pub(super) struct UploadState {
    /// When the client last took a frame of the body (or found its end): the client
    /// takes a frame only when the upstream has room for it, so this is when the upload
    /// last moved.
    moved: LastMoved,
    /// The client is waiting for the agent's next frame: a silence that is the agent's,
    /// which its body's own timer reports (`proxy::body::Tracked`).
    awaiting_agent: AtomicBool,
    /// How the agent's body failed, if it did: the request's answer.
    agent_error: OnceLock<ProxyError>,
}

impl UploadState {
    pub(super) fn new() -> UploadState {
        UploadState {
            moved: LastMoved::now(),
            awaiting_agent: AtomicBool::new(false),
            agent_error: OnceLock::new(),
        }
    }

    /// The answer for an agent's body that failed, if it did: `413 body_too_large` for
    /// one over its route's cap, else `400 bad_request` (it broke its own framing).
    pub(super) fn agent_error(&self) -> Option<&ProxyError> {
        self.agent_error.get()
    }
}

pin_project! {
    /// A request body on its way up, reporting to an [`UploadState`].
    pub(super) struct Upload<B> {
        #[pin]
        inner: B,
        state: std::sync::Arc<UploadState>,
    }
}

impl<B> Upload<B> {
    pub(super) fn new(inner: B, state: std::sync::Arc<UploadState>) -> Self {
        Upload { inner, state }
    }
}

impl<B: Body<Data = Bytes, Error = BodyError>> Body for Upload<B> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        let state = &**this.state;
        state
            .awaiting_agent
            .store(polled.is_pending(), Ordering::Relaxed);
        match &polled {
            Poll::Ready(Some(Err(e))) => {
                let _ = state.agent_error.set(agent_body_error(e));
            }
            Poll::Ready(_) => state.moved.moved(),
            Poll::Pending => {}
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

fn agent_body_error(e: &BodyError) -> ProxyError {
    match e.0.downcast_ref::<BodyTooLarge>() {
        Some(too_large) => ProxyError::new(ErrorKind::BodyTooLarge, too_large.to_string()),
        None => ProxyError::new(
            ErrorKind::BadRequest,
            format!("the request body failed: {e}"),
        ),
    }
}

/// Waits for `response` (a request being sent, then its response head) for as long as
/// the request keeps moving: it fails once `timeout` has passed since the upload last
/// moved, or since the wait began for a request without a body. A silence that is the
/// agent's (the client is waiting for its next frame) is not the upstream's: the agent's
/// body times out by itself, and the send fails with it.
pub(super) async fn await_head<F: Future>(
    response: F,
    upload: Option<&UploadState>,
    timeout: Duration,
) -> Result<F::Output, ()> {
    let since = Instant::now();
    let stilled = async {
        match upload {
            Some(upload) => {
                let awaiting_agent = || upload.awaiting_agent.load(Ordering::Relaxed);
                upload.moved.stilled(since, timeout, awaiting_agent).await
            }
            None => tokio::time::sleep_until(since + timeout).await,
        }
    };
    tokio::select! {
        biased;
        r = response => Ok(r),
        () = stilled => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use std::sync::Arc;

    type Frames = tokio::sync::mpsc::Sender<Result<Frame<Bytes>, BodyError>>;

    fn channel_body() -> (Frames, impl Body<Data = Bytes, Error = BodyError>) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        (tx, StreamBody::new(stream))
    }

    #[tokio::test(start_paused = true)]
    async fn a_moving_upload_is_never_cut_and_the_timeout_runs_from_its_end() {
        let state = Arc::new(UploadState::new());
        let (tx, body) = channel_body();
        let mut body = Box::pin(Upload::new(body, state.clone()));
        // The "upstream" takes a frame every 4 s for 20 s, then the body ends; the response
        // comes 9 s after that. With a 5 s timeout, only the time since the last move counts.
        let reader = tokio::spawn(async move {
            while let Some(frame) = body.as_mut().frame().await {
                frame.unwrap();
            }
        });
        let feeder = tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
                    .await
                    .unwrap();
            }
        });
        let response = async {
            feeder.await.unwrap();
            reader.await.unwrap();
            tokio::time::sleep(Duration::from_millis(4900)).await;
            "head"
        };
        let got = await_head(response, Some(&state), Duration::from_secs(5)).await;
        assert_eq!(got, Ok("head"));

        // The same wait with a head that comes 5.1 s after the end is cut.
        let state = Arc::new(UploadState::new());
        state.moved.moved();
        let late = tokio::time::sleep(Duration::from_millis(5100));
        assert_eq!(
            await_head(late, Some(&state), Duration::from_secs(5)).await,
            Err(())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_upload_the_upstream_stops_taking_is_cut_after_the_timeout() {
        let state = Arc::new(UploadState::new());
        let (tx, body) = channel_body();
        let mut body = Box::pin(Upload::new(body, state.clone()));
        tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
            .await
            .unwrap();
        body.as_mut().frame().await.unwrap().unwrap();
        // Nobody reads the body any more: the upstream is not taking it.
        let started = Instant::now();
        let never = std::future::pending::<()>();
        assert_eq!(
            await_head(never, Some(&state), Duration::from_secs(5)).await,
            Err(())
        );
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn the_agents_silence_and_failure_are_the_agents() {
        let state = Arc::new(UploadState::new());
        let (tx, body) = channel_body();
        let mut body = Box::pin(Upload::new(body, state.clone()));
        // The client waits for the agent's next frame: the head wait does not give up.
        let waiting = tokio::spawn(async move {
            let frame = body.as_mut().frame().await.unwrap();
            (frame.is_err(), body)
        });
        let waited = await_head(
            tokio::time::sleep(Duration::from_secs(12)),
            Some(&state),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(waited, Ok(()));
        tx.send(Err(BodyError("invalid chunk size".into())))
            .await
            .unwrap();
        let (failed, _body) = waiting.await.unwrap();
        assert!(failed);
        let e = state.agent_error().unwrap();
        assert_eq!(e.kind, ErrorKind::BadRequest);
        assert_eq!(e.reason, "the request body failed: invalid chunk size");
        assert_eq!(
            agent_body_error(&BodyError(Box::new(BodyTooLarge(10)))).kind,
            ErrorKind::BodyTooLarge
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_without_a_body_waits_the_timeout_from_the_start() {
        let started = Instant::now();
        let never = std::future::pending::<()>();
        assert_eq!(
            await_head(never, None, Duration::from_secs(3)).await,
            Err(())
        );
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }
}
