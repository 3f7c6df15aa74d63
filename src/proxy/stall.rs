//! An agent that stops reading is cut like an upstream that stops sending (SPEC §4a).
//!
//! A response body's own silence timer (`body::Tracked`) runs only while hyper polls the
//! body, and hyper stops polling it when it cannot send: the agent's socket is full, or,
//! over HTTP/2, the agent's flow-control window is. Nothing would ever cut such a
//! request, and whatever it holds upstream (a stream on a shared HTTP/2 connection, with
//! its share of the window; a whole HTTP/1.1 connection) would stay held for as long as
//! the agent liked. Two watchers, each measuring bytes actually moved, close the gap:
//!
//! - [`WriteStall`], under an agent connection's TLS and HTTP: a write that cannot make
//!   progress for the timeout fails, and the connection is closed. This covers an agent
//!   whose socket is full, on either HTTP version. An upgraded WebSocket has no silence
//!   timeout (SPEC §2), so relaying one turns it off ([`StallSwitch`]).
//! - [`Cuttable`], around an HTTP/2 response body: one stream's window can be full while
//!   the connection moves, so a task of its own watches when the body last gave hyper a
//!   frame and, after the timeout, drops the body, which releases the upstream stream or
//!   connection and ends the request's log record; the stream is reset when hyper next
//!   asks it for data.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::body::Moved;
use crate::error::BodyError;
use crate::upstream::LastMoved;

/// A connection's [`WriteStall`], as the rest of the proxy sees it: turned off for good
/// once the connection carries a WebSocket (which may leave its writes blocked for as long
/// as the agent likes), and saying why it cut the connection, if it did, for the log
/// record of the request that was in flight.
#[derive(Debug, Clone, Default)]
pub(crate) struct StallSwitch(Arc<SwitchState>);

#[derive(Debug, Default)]
struct SwitchState {
    off: AtomicBool,
    cut: OnceLock<String>,
}

impl StallSwitch {
    pub(crate) fn turn_off(&self) {
        self.0.off.store(true, Ordering::Relaxed);
    }

    fn is_off(&self) -> bool {
        self.0.off.load(Ordering::Relaxed)
    }

    /// Why the connection was cut, once it was.
    pub(crate) fn cut(&self) -> Option<&str> {
        self.0.cut.get().map(String::as_str)
    }
}

/// An agent's stream whose writes fail once none has made progress for `timeout`.
#[derive(Debug)]
pub(crate) struct WriteStall<IO> {
    inner: IO,
    timeout: Duration,
    switch: StallSwitch,
    /// Armed when a write could not proceed; allocated on the first such write only, so
    /// a connection that never stalls carries no timer.
    timer: Option<Pin<Box<Sleep>>>,
    stalled: bool,
}

impl<IO> WriteStall<IO> {
    pub(crate) fn new(inner: IO, timeout: Duration, switch: StallSwitch) -> Self {
        WriteStall {
            inner,
            timeout,
            switch,
            timer: None,
            stalled: false,
        }
    }

    /// Notes how a write went; a write that has been blocked for the timeout becomes an
    /// error.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() || self.switch.is_off() {
            self.stalled = false;
            self.timer = None;
            return polled;
        }
        let deadline = Instant::now() + self.timeout;
        let timer = match &mut self.timer {
            Some(timer) => {
                if !self.stalled {
                    timer.as_mut().reset(deadline);
                }
                timer
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.stalled = true;
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                let why = format!("the agent read nothing for {}s", self.timeout.as_secs_f64());
                let _ = self.switch.0.cut.set(format!("cut: {why}"));
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for WriteStall<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for WriteStall<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.watch(cx, polled)
    }
}

/// What a [`Cuttable`] body and its watcher share.
struct Shared<B> {
    /// `None` once the watcher cut the body.
    body: Mutex<Option<Pin<Box<B>>>>,
    /// When the body last gave hyper a frame.
    moved: LastMoved,
    /// hyper's last poll found no frame ready: it is waiting on the upstream, whose
    /// silence the body's own timer cuts; the agent is not the one holding it up.
    waiting_on_upstream: AtomicBool,
    note: Arc<Moved>,
}

/// An HTTP/2 response body that a watcher task drops once hyper has taken no frame of it
/// for the timeout (see the module doc). The watcher ends with the body.
pub(crate) struct Cuttable<B> {
    shared: Arc<Shared<B>>,
    timeout: Duration,
    /// Dropped with the body, which ends the watcher.
    _alive: tokio::sync::oneshot::Sender<()>,
}

impl<B: Send + 'static> Cuttable<B> {
    /// Watches `body`; a cut is noted in `note` for the request's log record.
    pub(crate) fn new(body: B, timeout: Duration, note: Arc<Moved>) -> Self {
        let shared = Arc::new(Shared {
            body: Mutex::new(Some(Box::pin(body))),
            moved: LastMoved::now(),
            waiting_on_upstream: AtomicBool::new(false),
            note,
        });
        let (alive, gone) = tokio::sync::oneshot::channel();
        tokio::spawn(watch(shared.clone(), gone, timeout));
        Cuttable {
            shared,
            timeout,
            _alive: alive,
        }
    }
}

async fn watch<B>(
    shared: Arc<Shared<B>>,
    mut gone: tokio::sync::oneshot::Receiver<()>,
    timeout: Duration,
) {
    // While hyper waits on the upstream, the body's own silence timer is the one running.
    let waiting_on_upstream = || shared.waiting_on_upstream.load(Ordering::Relaxed);
    let stilled = shared
        .moved
        .stilled(Instant::now(), timeout, waiting_on_upstream);
    tokio::select! {
        _ = &mut gone => return,
        () = stilled => {}
    }
    let body = shared.body.lock().unwrap_or_else(|p| p.into_inner()).take();
    if body.is_some() {
        let secs = timeout.as_secs_f64();
        let _ = shared
            .note
            .cut
            .set(format!("cut: the agent read nothing for {secs}s"));
    }
    // Dropped outside the lock: the body's drop logs the request and releases its
    // upstream stream or connection.
    drop(body);
}

impl<B> Body for Cuttable<B>
where
    B: Body<Data = Bytes, Error = BodyError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let mut guard = this.shared.body.lock().unwrap_or_else(|p| p.into_inner());
        let Some(body) = guard.as_mut() else {
            return Poll::Ready(Some(Err(BodyError(
                format!("the agent read nothing for {}s", this.timeout.as_secs_f64()).into(),
            ))));
        };
        let polled = body.as_mut().poll_frame(cx);
        this.shared
            .waiting_on_upstream
            .store(polled.is_pending(), Ordering::Relaxed);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            this.shared.moved.moved();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let guard = self.shared.body.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().is_some_and(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let guard = self.shared.body.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().map(|b| b.size_hint()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    struct DropFlag(Arc<std::sync::atomic::AtomicBool>);
    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_unread_body_is_dropped_after_the_timeout_and_a_read_one_is_not() {
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = DropFlag(dropped.clone());
        let frames = futures_util::stream::iter(
            (0..3).map(|_| Ok::<_, BodyError>(Frame::data(Bytes::from_static(b"x")))),
        );
        let body = StreamBody::new(frames).map_frame(move |f| {
            let _ = &flag;
            f
        });
        let note = Arc::<Moved>::default();
        let mut body = Box::pin(Cuttable::new(body, Duration::from_secs(5), note.clone()));
        // Read for a while, a frame every 4 s: never cut.
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_secs(4)).await;
            body.as_mut().frame().await.unwrap().unwrap();
        }
        assert!(!dropped.load(Ordering::SeqCst));
        // Then nothing is read: the inner body (what it holds upstream) goes at 5 s.
        tokio::time::sleep(Duration::from_millis(4900)).await;
        assert!(!dropped.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(dropped.load(Ordering::SeqCst));
        assert_eq!(
            note.cut.get().map(String::as_str),
            Some("cut: the agent read nothing for 5s")
        );
        // What hyper reads next is an error, so the stream is reset.
        let e = body.as_mut().frame().await.unwrap().unwrap_err();
        assert!(e.to_string().contains("read nothing"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_waiting_on_a_silent_upstream_is_left_to_its_own_timer() {
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = DropFlag(dropped.clone());
        let silent = StreamBody::new(futures_util::stream::pending::<
            Result<Frame<Bytes>, BodyError>,
        >())
        .map_frame(move |f| {
            let _ = &flag;
            f
        });
        let note = Arc::<Moved>::default();
        let mut body = Box::pin(Cuttable::new(silent, Duration::from_secs(5), note.clone()));
        // hyper asks, and nothing is there: the upstream is the silent one.
        let asked = tokio::time::timeout(Duration::from_millis(10), body.as_mut().frame()).await;
        assert!(asked.is_err());
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(
            !dropped.load(Ordering::SeqCst),
            "the agent was blamed for the upstream's silence"
        );
        assert!(note.cut.get().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_blocked_write_fails_after_the_timeout() {
        // A duplex pipe whose reader never reads: writes block once its buffer is full.
        let (a, _b) = tokio::io::duplex(16);
        let mut w = WriteStall::new(a, Duration::from_secs(5), StallSwitch::default());
        use tokio::io::AsyncWriteExt;
        w.write_all(&[0u8; 16]).await.unwrap();
        let started = Instant::now();
        let e = w.write_all(&[0u8; 1]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(5));

        // Turned off (a WebSocket), a blocked write just waits.
        let (a, _b) = tokio::io::duplex(16);
        let switch = StallSwitch::default();
        let mut w = WriteStall::new(a, Duration::from_secs(5), switch.clone());
        w.write_all(&[0u8; 16]).await.unwrap();
        switch.turn_off();
        let blocked = tokio::time::timeout(Duration::from_secs(60), w.write_all(&[0u8; 1])).await;
        assert!(blocked.is_err(), "the write failed or went through");
    }
}
