//! HTTP/2 connections to upstreams, driven by `h2` directly rather than through hyper's
//! client: hyper's spawns a task per request (a future the size of its largest variant,
//! the whole connection) and passes each request and response through a channel and two
//! one-shot channels; here the request's own task sends it and is woken by the response
//! (docs/decisions.md has what that saved).
//!
//! One connection carries the requests of every agent connection to its host, so no
//! stream may starve the others (SPEC §4a). Flow control is where that could happen: data
//! a stream's reader has not taken yet holds the connection's receive window as well as
//! the stream's, and `h2` gives the connection's share back only when the stream's is
//! given back. A few agents that stop reading large downloads could hold the whole
//! connection window, and every other stream on the connection would stall. So the
//! connection window is sized to hold every stream's full window at once
//! ([`CONNECTION_WINDOW`]), and a connection takes at most [`MAX_STREAMS`] streams (the
//! pool opens another beyond that): what one stream holds unread is bounded by its own
//! window, and never comes out of another stream's. A reader that stays stalled is cut
//! by the silence timeout, which releases the stream. Until then its window's worth of
//! data sits in the proxy's memory, so the streams open at once, all connections
//! together, are bounded too ([`Upstream`](super::Upstream)'s stream budget, of
//! [`STREAMS_AT_ONCE`]): what stalled readers can make the proxy hold is bounded whatever
//! the agents do.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};

use super::SendError;
use super::body::{UploadState, UpstreamBody, await_head};
use super::dial::BoxedIo;
use crate::error::{ErrorKind, ProxyBody, ProxyError};
use crate::upstream::Target;

/// The receive window of each stream: what one response may have in flight to the proxy
/// before its reader takes it.
pub(super) const STREAM_WINDOW: u32 = 512 * 1024;
/// The most streams the proxy opens on one upstream connection (fewer if the upstream
/// allows fewer).
pub(super) const MAX_STREAMS: usize = 64;
/// The connection's receive window: room for every stream's whole window, so that streams
/// whose readers stalled cannot hold the window the others need.
pub(super) const CONNECTION_WINDOW: u32 = STREAM_WINDOW * MAX_STREAMS as u32;
const _: () = assert!(CONNECTION_WINDOW as usize >= STREAM_WINDOW as usize * MAX_STREAMS);
/// Upstream HTTP/2 streams open at once, all connections together: a request over it
/// waits for one to end (within its response timeout).
pub(super) const STREAMS_AT_ONCE: usize = 256;

/// Keep-alive pings on a connection with requests open: how often, and how long an answer
/// may take.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// The largest DATA frame an upstream may send us (SETTINGS_MAX_FRAME_SIZE): each frame is
/// one body chunk relayed to the agent, so larger frames mean less work per byte.
const MAX_FRAME_SIZE: u32 = 64 * 1024;

/// A shared HTTP/2 connection to one upstream.
#[derive(Clone)]
pub(super) struct H2Conn {
    send: h2::client::SendRequest<Bytes>,
    shared: Arc<H2Shared>,
    /// The stream budget of every upstream HTTP/2 connection ([`STREAMS_AT_ONCE`]).
    streams: Arc<StreamBudget>,
    /// The task that drives the connection, aborted to close it at once.
    task: tokio::task::AbortHandle,
}

#[derive(Default)]
struct H2Shared {
    /// Set when the connection's driver has ended, or when it refused a new stream (a
    /// GOAWAY): either way it takes no more requests.
    closed: AtomicBool,
    /// Requests sent and not yet finished (response body read or dropped): how many more
    /// the connection may take, and whether the keep-alive pings run.
    open_streams: AtomicUsize,
    /// How many pool sweeps in a row found no request open on it.
    idle_sweeps: AtomicUsize,
}

impl H2Conn {
    /// The HTTP/2 handshake over an established (TLS) stream; spawns the connection's
    /// driver.
    /// `slot` is the connection's place in the upstream connection budget, held for as
    /// long as it lives.
    pub(super) async fn handshake(
        io: BoxedIo,
        max_header_bytes: usize,
        slot: tokio::sync::OwnedSemaphorePermit,
        streams: Arc<StreamBudget>,
    ) -> Result<H2Conn, h2::Error> {
        let mut b = h2::client::Builder::new();
        b.initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX))
            .max_send_buffer_size(1024 * 1024)
            .initial_max_send_streams(MAX_STREAMS)
            .enable_push(false);
        let (send, conn) = b.handshake::<_, Bytes>(io).await?;
        let shared = Arc::new(H2Shared::default());
        let shared_for_driver = shared.clone();
        let task = tokio::spawn(async move {
            let _slot = slot;
            drive(conn, shared_for_driver).await;
        });
        Ok(H2Conn {
            send,
            shared,
            streams,
            task: task.abort_handle(),
        })
    }

    /// Closes the connection at once (it has no request open: see [`H2Conn::is_idle`]).
    pub(super) fn close(&self) {
        self.shared.closed.store(true, Ordering::Relaxed);
        self.task.abort();
    }

    /// Whether no request is open on the connection.
    pub(super) fn is_idle(&self) -> bool {
        self.shared.open_streams.load(Ordering::Relaxed) == 0
    }

    /// Counts one more pool sweep that found the connection idle (or starts over when it
    /// was not); how many in a row.
    pub(super) fn idle_sweeps(&self) -> usize {
        if self.is_idle() {
            self.shared.idle_sweeps.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.shared.idle_sweeps.store(0, Ordering::Relaxed);
            0
        }
    }

    pub(super) fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Relaxed)
    }

    /// Whether the connection can take one more stream now, without queueing it behind
    /// the upstream's concurrency limit.
    pub(super) fn can_take(&self) -> bool {
        let limit = MAX_STREAMS.min(self.send.current_max_send_streams());
        !self.is_closed() && self.shared.open_streams.load(Ordering::Relaxed) < limit
    }

    /// Counts a request as open until the returned guard is dropped.
    pub(super) fn open_stream(&self) -> OpenStream {
        self.shared.open_streams.fetch_add(1, Ordering::Relaxed);
        OpenStream {
            shared: self.shared.clone(),
            upload_alive: None,
            budget: None,
        }
    }

    /// [`H2Conn::send_counted`] on a stream counted now.
    #[cfg(test)]
    pub(super) async fn send(
        &self,
        target: &Target,
        req: Request<ProxyBody>,
        upload: Option<&Arc<UploadState>>,
        timeout: Duration,
    ) -> Result<Response<UpstreamBody>, SendError> {
        self.send_counted(self.open_stream(), target, req, upload, timeout)
            .await
    }

    /// Sends `req` on a new stream, counted in `open` (taken when the connection was
    /// checked out, so that no more streams are handed out than it takes), and waits for
    /// the response head, within the response timeout as [`await_head`] counts it (a wait
    /// for a stream slot included). A request the connection refused before anything of
    /// it went out comes back in [`SendError::Unsent`]; a connection that refused it
    /// because it is going away or gone is marked closed.
    pub(super) async fn send_counted(
        &self,
        mut open: OpenStream,
        target: &Target,
        mut req: Request<ProxyBody>,
        upload: Option<&Arc<UploadState>>,
        timeout: Duration,
    ) -> Result<Response<UpstreamBody>, SendError> {
        set_uri(target, &mut req)?;
        let unavailable = |e: h2::Error| {
            ProxyError::new(
                ErrorKind::UpstreamUnavailable,
                format!("HTTP/2 connection to {}: {e}", target.host),
            )
        };
        let work = async {
            // A place in the stream budget first; the wait for it is within the timeout.
            let budget = self.streams.take().await;
            let mut send = match self.send.clone().ready().await {
                Ok(send) => send,
                Err(e) => return Err((unavailable(e), Refused::Whole(Box::new(req)))),
            };
            let (parts, body) = req.into_parts();
            let eos = hyper::body::Body::is_end_stream(&body);
            // A refusal here is a race with the connection ending; the request's head is
            // gone with it, so only a replayable request is tried again (by the caller).
            let (response, stream) = send
                .send_request(Request::from_parts(parts, ()), eos)
                .map_err(|e| {
                    let gone = e.is_go_away() || e.is_io();
                    (unavailable(e), Refused::HeadLost { gone })
                })?;
            // The upload's copier stops (and resets the stream) once the request is
            // abandoned: its response timed out or failed, or was dropped unread.
            let mut upload_alive = None;
            if !eos {
                let (alive, abandoned) = tokio::sync::oneshot::channel();
                tokio::spawn(pipe_body(body, stream, abandoned));
                upload_alive = Some(alive);
            }
            match response.await {
                Ok(r) => Ok((r, upload_alive, budget)),
                Err(e) => Err((unavailable(e), Refused::No)),
            }
        };
        match await_head(work, upload.map(|u| &**u), timeout).await {
            Err(()) => Err(SendError::Final(super::response_timeout(target))),
            Ok(Err((e, Refused::No))) => Err(SendError::NoResponse(e)),
            Ok(Err((e, Refused::Whole(req)))) => {
                // Not ready for a new stream: a GOAWAY, or the connection ended. It takes
                // no more.
                self.shared.closed.store(true, Ordering::Relaxed);
                Err(SendError::Unsent(e, Some(req)))
            }
            Ok(Err((e, Refused::HeadLost { gone }))) => {
                if gone {
                    self.shared.closed.store(true, Ordering::Relaxed);
                }
                Err(SendError::Unsent(e, None))
            }
            Ok(Ok((r, upload_alive, budget))) => {
                let (parts, recv) = r.into_parts();
                open.upload_alive = upload_alive;
                open.budget = Some(budget);
                Ok(Response::from_parts(
                    parts,
                    UpstreamBody::H2 {
                        recv,
                        data_done: false,
                        _open: open,
                    },
                ))
            }
        }
    }
}

/// Places for streams open at once ([`STREAMS_AT_ONCE`]), cheaper than a semaphore on the
/// path every request takes: taking and giving back a place are an atomic operation each
/// (a semaphore's release takes a lock); only a request that finds none free waits, and
/// is woken as places come back.
pub(super) struct StreamBudget {
    left: AtomicUsize,
    freed: tokio::sync::Notify,
}

impl StreamBudget {
    pub(super) fn new(places: usize) -> Arc<StreamBudget> {
        Arc::new(StreamBudget {
            left: AtomicUsize::new(places),
            freed: tokio::sync::Notify::new(),
        })
    }

    fn try_take(&self) -> bool {
        self.left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                left.checked_sub(1)
            })
            .is_ok()
    }

    /// A place, once one is free.
    async fn take(self: &Arc<Self>) -> StreamPlace {
        loop {
            // Registered before the check, so a place freed in between is not missed.
            let freed = self.freed.notified();
            if self.try_take() {
                return StreamPlace(self.clone());
            }
            freed.await;
        }
    }
}

/// A place in the [`StreamBudget`], given back when dropped.
pub(super) struct StreamPlace(Arc<StreamBudget>);

impl Drop for StreamPlace {
    fn drop(&mut self) {
        self.0.left.fetch_add(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

/// Whether the connection refused a request before it went out, and what is left of it.
enum Refused {
    No,
    /// Refused whole: it can go on another connection.
    Whole(Box<Request<ProxyBody>>),
    /// Refused as it was being sent: its head is gone (only a replayable request, copied
    /// beforehand, is tried again); `gone` when the connection is (a GOAWAY, an I/O error)
    /// rather than the request at fault.
    HeadLost {
        gone: bool,
    },
}

/// HTTP/2 carries the authority in the URI (`:authority`), not in `Host`: the request's
/// origin-form URI and `Host` header become an absolute URI.
fn set_uri(target: &Target, req: &mut Request<ProxyBody>) -> Result<(), SendError> {
    let host = req.headers_mut().remove(http::header::HOST);
    let authority = match host.as_ref().and_then(|h| h.to_str().ok()) {
        Some(h) => Authority::try_from(h),
        None => Authority::try_from(target.authority()),
    };
    // From parts rather than a formatted string parsed again: every request to an HTTP/2
    // upstream goes through here.
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(if target.tls {
        Scheme::HTTPS
    } else {
        Scheme::HTTP
    });
    uri.path_and_query = Some(
        req.uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    let bad_target = |e: &dyn std::fmt::Display| {
        SendError::Unsent(
            ProxyError::new(ErrorKind::BadRequest, format!("request target: {e}")),
            None,
        )
    };
    uri.authority = Some(authority.map_err(|e| bad_target(&e))?);
    *req.uri_mut() = Uri::from_parts(uri).map_err(|e| bad_target(&e))?;
    Ok(())
}

/// One open request on an [`H2Conn`], until dropped.
pub(crate) struct OpenStream {
    shared: Arc<H2Shared>,
    /// Keeps the request body's copier going; dropped, it stops it.
    upload_alive: Option<tokio::sync::oneshot::Sender<()>>,
    /// Its place in the stream budget, until the response is read or dropped.
    budget: Option<StreamPlace>,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.shared.open_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Drives an HTTP/2 connection until it ends. While requests are open on it, the
/// upstream is pinged after every [`KEEPALIVE_INTERVAL`]; no answer within
/// [`KEEPALIVE_TIMEOUT`] closes the connection, so that its streams fail and the pool
/// stops handing it out (a silent upstream is otherwise only noticed by the body silence
/// timeout, minutes later).
async fn drive(mut conn: h2::client::Connection<BoxedIo, Bytes>, shared: Arc<H2Shared>) {
    // The pings run in a task of their own, so that the connection's own wake-ups (one
    // per frame in a transfer) do not poll their timer too.
    let (gone_tx, gone_rx) = tokio::sync::oneshot::channel::<()>();
    if let Some(mut pings) = conn.ping_pong() {
        let shared = shared.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(KEEPALIVE_INTERVAL).await;
                if shared.closed.load(Ordering::Relaxed) {
                    return;
                }
                if shared.open_streams.load(Ordering::Relaxed) == 0 {
                    continue;
                }
                let pong = tokio::time::timeout(KEEPALIVE_TIMEOUT, pings.ping(h2::Ping::opaque()));
                if !matches!(pong.await, Ok(Ok(_))) {
                    tracing::debug!(
                        "HTTP/2 upstream did not answer a ping; closing the connection"
                    );
                    let _ = gone_tx.send(());
                    return;
                }
            }
        });
    }
    tokio::select! {
        biased;
        _ = conn => {}
        // Only a sent signal: a dropped sender (no pings to run) is not a reason to close.
        Ok(()) = gone_rx => {}
    }
    shared.closed.store(true, Ordering::Relaxed);
}

/// Copies a request body into its HTTP/2 stream, its trailers too, as hyper's client
/// does: each chunk is handed to h2 whole once the stream has any send window, and h2
/// frames it as the window opens (so at most about one chunk waits in memory). Stops if
/// the upstream resets the stream, and resets it if the agent's body fails or the request
/// is abandoned (`abandoned` resolves), so that a cut upload never arrives as a complete
/// one and an abandoned one holds no stream.
async fn pipe_body(
    mut body: ProxyBody,
    mut stream: h2::SendStream<Bytes>,
    mut abandoned: tokio::sync::oneshot::Receiver<()>,
) {
    let mut gone = move |cx: &mut std::task::Context<'_>| {
        std::pin::Pin::new(&mut abandoned).poll(cx).is_ready()
    };
    loop {
        // Some window first, unless the upstream resets the stream meanwhile.
        stream.reserve_capacity(1);
        while stream.capacity() == 0 {
            let capacity = std::future::poll_fn(|cx| {
                if gone(cx) {
                    return Poll::Ready(None);
                }
                stream.poll_capacity(cx)
            });
            match capacity.await {
                Some(Ok(_)) => {}
                _ => {
                    stream.send_reset(h2::Reason::CANCEL);
                    return;
                }
            }
        }
        // The next frame, unless the upstream resets the stream first (it may answer
        // before the upload ends and want no more of it), or the request is abandoned.
        let next = std::future::poll_fn(|cx| {
            if gone(cx) {
                stream.send_reset(h2::Reason::CANCEL);
                return Poll::Ready(None);
            }
            if let Poll::Ready(frame) =
                hyper::body::Body::poll_frame(std::pin::Pin::new(&mut body), cx)
            {
                return Poll::Ready(Some(frame));
            }
            match stream.poll_reset(cx) {
                Poll::Ready(_) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        let frame = match next {
            None => return,
            Some(None) => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Some(Some(Err(_))) => {
                stream.send_reset(h2::Reason::INTERNAL_ERROR);
                return;
            }
            Some(Some(Ok(frame))) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                let last = hyper::body::Body::is_end_stream(&body);
                if stream.send_data(data, last).is_err() || last {
                    return;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = stream.send_trailers(trailers);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A stream window's worth of bytes, sent as the window allows.
    async fn send_window(mut stream: h2::SendStream<Bytes>, n: usize) {
        let mut left = n;
        while left > 0 {
            stream.reserve_capacity(left);
            let Some(Ok(cap)) = std::future::poll_fn(|cx| stream.poll_capacity(cx)).await else {
                return;
            };
            let take = cap.min(left);
            if take == 0 {
                continue;
            }
            if stream
                .send_data(Bytes::from(vec![7u8; take]), take == left)
                .is_err()
            {
                return;
            }
            left -= take;
        }
    }

    /// An in-memory HTTP/2 upstream: `/big` answers [`STREAM_WINDOW`] bytes, `/never`
    /// never answers, anything else answers empty; after `goaway_after` requests it sends
    /// GOAWAY.
    pub(in crate::upstream) async fn upstream(
        max_streams: u32,
        goaway_after: Option<usize>,
    ) -> H2Conn {
        upstream_with_budget(
            max_streams,
            goaway_after,
            StreamBudget::new(STREAMS_AT_ONCE),
        )
        .await
    }

    async fn upstream_with_budget(
        max_streams: u32,
        goaway_after: Option<usize>,
        streams: Arc<StreamBudget>,
    ) -> H2Conn {
        let (client, server) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let mut conn = h2::server::Builder::new()
                .max_concurrent_streams(max_streams)
                .handshake::<_, Bytes>(server)
                .await
                .unwrap();
            let mut served = 0;
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                served += 1;
                if goaway_after == Some(served) {
                    conn.graceful_shutdown();
                }
                tokio::spawn(async move {
                    let path = req.uri().path().to_owned();
                    let _keep = req;
                    if path == "/never" {
                        std::future::pending::<()>().await;
                    }
                    let Ok(stream) = respond.send_response(Response::new(()), path != "/big")
                    else {
                        return;
                    };
                    if path == "/big" {
                        send_window(stream, STREAM_WINDOW as usize).await;
                        std::future::pending::<()>().await;
                    }
                });
            }
        });
        let slot = Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .unwrap();
        H2Conn::handshake(Box::new(client), 65536, slot, streams)
            .await
            .unwrap()
    }

    pub(in crate::upstream) fn target() -> Target {
        Target {
            host: crate::routes::Host::parse("api.test").unwrap(),
            port: 443,
            tls: true,
            allow_private: false,
        }
    }

    fn get(path: &str) -> Request<ProxyBody> {
        let mut req = Request::new(crate::error::empty_body());
        *req.uri_mut() = Uri::try_from(path).unwrap();
        req
    }

    #[tokio::test]
    async fn streams_whose_readers_stalled_cannot_hold_the_window_of_the_others() {
        let conn = upstream(100, None).await;
        // Eight responses of a whole stream window each, never read: more than any
        // connection window sized for a few streams (hyper's 5 MiB held two and a half).
        let mut stalled = Vec::new();
        for _ in 0..8 {
            let r = conn
                .send(&target(), get("/big"), None, Duration::from_secs(5))
                .await;
            stalled.push(r.ok().unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let fresh = conn
            .send(&target(), get("/big"), None, Duration::from_secs(5))
            .await;
        let body = fresh.ok().unwrap().into_body();
        let mut body = std::pin::pin!(body);
        let mut got = 0;
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            while got < STREAM_WINDOW as usize {
                let Some(Ok(frame)) = body.as_mut().frame().await else {
                    break;
                };
                got += frame.into_data().map(|d| d.len()).unwrap_or(0);
            }
        });
        assert!(
            read.await.is_ok(),
            "the fresh stream got {got} bytes and stalled"
        );
        assert_eq!(got, STREAM_WINDOW as usize);
    }

    #[tokio::test]
    async fn a_request_refused_by_a_goaway_comes_back_whole_and_the_connection_is_retired() {
        let conn = upstream(100, Some(1)).await;
        let first = conn
            .send(&target(), get("/a"), None, Duration::from_secs(5))
            .await;
        assert!(first.is_ok());
        tokio::time::sleep(Duration::from_millis(200)).await;
        match conn
            .send(&target(), get("/b"), None, Duration::from_secs(5))
            .await
        {
            Err(SendError::Unsent(_, Some(req))) => assert_eq!(req.uri().path(), "/b"),
            Err(SendError::Unsent(e, None) | SendError::NoResponse(e) | SendError::Final(e)) => {
                panic!("not given back: {e}")
            }
            Ok(_) => panic!("a connection going away took a new stream"),
        }
        assert!(conn.is_closed() && !conn.can_take());
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_for_a_stream_slot_is_within_the_response_timeout() {
        let conn = upstream(1, None).await;
        // Let the upstream's SETTINGS (one stream at a time) arrive.
        let _ = conn
            .send(&target(), get("/a"), None, Duration::from_secs(5))
            .await;
        let held = {
            let conn = conn.clone();
            tokio::spawn(async move {
                let t = target();
                let r = conn.send(&t, get("/never"), None, Duration::from_secs(60));
                r.await.is_ok()
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !conn.can_take(),
            "a full connection still offers a stream slot"
        );
        let started = tokio::time::Instant::now();
        match conn
            .send(&target(), get("/a"), None, Duration::from_secs(3))
            .await
        {
            Err(SendError::Final(e)) => assert_eq!(e.kind, ErrorKind::UpstreamResponseTimeout),
            _ => panic!("the wait for a slot was not cut by the response timeout"),
        }
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        held.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn the_stream_budget_is_shared_and_a_wait_for_it_is_within_the_response_timeout() {
        let budget = StreamBudget::new(1);
        let a = upstream_with_budget(100, None, budget.clone()).await;
        let b = upstream_with_budget(100, None, budget.clone()).await;
        // A response being read holds the one place, on connection a.
        let held = a
            .send(&target(), get("/big"), None, Duration::from_secs(5))
            .await;
        assert!(held.is_ok());
        assert_eq!(budget.left.load(Ordering::Relaxed), 0);
        let started = tokio::time::Instant::now();
        match b
            .send(&target(), get("/a"), None, Duration::from_secs(3))
            .await
        {
            Err(SendError::Final(e)) => assert_eq!(e.kind, ErrorKind::UpstreamResponseTimeout),
            _ => panic!("a request over the stream budget was not held to the response timeout"),
        }
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        // The place comes back with the response.
        drop(held);
        assert!(
            b.send(&target(), get("/a"), None, Duration::from_secs(3))
                .await
                .is_ok()
        );
    }
}
