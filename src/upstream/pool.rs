//! The pool of upstream connections, keyed by [`Target`] (host, port, TLS, and whether
//! the route may reach private addresses, so a private-allowed connection never serves a
//! public-only route).
//!
//! Requests to one target share an HTTP/2 connection; another is opened only when none
//! can take the stream (SPEC §4a). That includes a connection still being set up: an
//! agent starts with parallel calls, and each must not pay for a handshake of its own, so
//! while one request dials, the others to the same target wait for what it becomes
//! ([`Checkout::Wait`]), as hyper-util's pool does. A target known to answer HTTP/1.1 is
//! not waited for: HTTP/1.1 connections are not shared, so each request dials its own
//! unless an idle one is ready.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::client::conn::http1;
use tokio::sync::watch;

use super::Target;
use super::h2::{H2Conn, OpenStream};
use crate::error::{ProxyBody, ProxyError};

/// How long an idle HTTP/1.1 connection is kept, and how many (in use or idle) are kept
/// per target.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
const MAX_H1_PER_TARGET: usize = 64;
/// How often the pool is swept, and after how many sweeps in a row that found it with no
/// request open an HTTP/2 connection is closed (about [`IDLE_TIMEOUT`]).
pub(super) const SWEEP_EVERY: Duration = Duration::from_secs(15);
const H2_IDLE_SWEEPS: usize = 6;

/// A connection a request can be sent on.
pub(super) enum Sender {
    H1(H1Conn),
    /// A shared connection, and the stream this request counts as on it.
    H2(H2Conn, OpenStream),
}

/// An HTTP/1.1 connection: its sender, and the task that drives it, aborted to close the
/// connection at once (a request given up on would otherwise keep it busy, say sending
/// an upload nobody reads, until the upstream closes it).
pub(super) struct H1Conn {
    pub(super) send: http1::SendRequest<ProxyBody>,
    pub(super) task: tokio::task::AbortHandle,
}

impl H1Conn {
    pub(super) fn close(&self) {
        self.task.abort();
    }
}

/// What a connection being set up became, as those waiting for it see it.
#[derive(Clone)]
pub(super) enum Setup {
    Pending,
    /// An HTTP/2 connection, in the pool now.
    Shared(H2Conn),
    /// An HTTP/1.1 connection, taken by the request that dialled it.
    NotShared,
    Failed(ProxyError),
}

/// What [`Pool::checkout`] found.
pub(super) enum Checkout {
    /// A pooled connection that can take the request now.
    Reuse(Sender),
    /// Another request is setting up a connection to the target: wait for it.
    Wait(watch::Receiver<Setup>),
    /// Dial a new connection, and tell those who wait what it became.
    Dial(Dialing),
}

#[derive(Default)]
struct Slot {
    /// HTTP/2 connections, oldest first.
    h2: Vec<H2Conn>,
    /// HTTP/1.1 connections, in use or idle, each with when it was last seen busy (taking
    /// a request, or found busy by a checkout or a sweep). One
    /// in use is not ready until its response has been read to the end, so it stays here
    /// rather than coming back from a task that waits for that.
    h1: Vec<(H1Conn, Instant)>,
    /// The connection being set up that others may wait for, by its dial's id.
    dialing: Option<(u64, watch::Receiver<Setup>)>,
    /// The target's last connection chose HTTP/1.1: nothing to share, so none is waited for.
    h1_only: bool,
}

#[derive(Default)]
pub(super) struct Pool {
    slots: Mutex<HashMap<Target, Slot>>,
    next_dial: AtomicU64,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Target, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn checkout(self: &Arc<Self>, target: &Target) -> Checkout {
        let mut slots = self.lock();
        // Looked up before an entry is made: `entry` wants an owned key, and cloning the
        // target (its host name) on every request costs an allocation.
        let slot = match slots.get_mut(target) {
            Some(slot) => slot,
            None => slots.entry(target.clone()).or_default(),
        };
        slot.h2.retain(|c| !c.is_closed());
        if let Some(c) = slot.h2.iter().find(|c| c.can_take()) {
            // Counted now, under the lock: no more streams are handed out than it takes.
            return Checkout::Reuse(Sender::H2(c.clone(), c.open_stream()));
        }
        // An idle connection: ready for its next request, and not idle for too long.
        // Closed ones and idle ones past their time are dropped on the way.
        let mut now = None;
        let mut i = 0;
        while i < slot.h1.len() {
            let (conn, since) = &mut slot.h1[i];
            if !conn.send.is_closed() && !conn.send.is_ready() {
                // Busy: its idle time starts when it is next seen free.
                *since = *now.get_or_insert_with(Instant::now);
                i += 1;
                continue;
            }
            let fresh = conn.send.is_ready()
                && now.get_or_insert_with(Instant::now).duration_since(*since) < IDLE_TIMEOUT;
            let (conn, _) = slot.h1.swap_remove(i);
            if fresh {
                return Checkout::Reuse(Sender::H1(conn));
            }
            conn.close();
        }
        let mut dial = self.dial(target);
        if !slot.h1_only {
            if let Some((_, rx)) = &slot.dialing {
                return Checkout::Wait(rx.clone());
            }
            let id = self.next_dial.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = watch::channel(Setup::Pending);
            slot.dialing = Some((id, rx));
            dial.waiters = Some((id, tx));
        }
        Checkout::Dial(dial)
    }

    /// The right to dial a new connection that nobody waits for (the one replay, or a
    /// request that has waited for others' dials often enough).
    pub(super) fn dial(self: &Arc<Self>, target: &Target) -> Dialing {
        Dialing {
            pool: self.clone(),
            target: target.clone(),
            waiters: None,
        }
    }

    /// Keeps an HTTP/1.1 connection that has just taken a request.
    pub(super) fn put_h1(&self, target: &Target, conn: H1Conn) {
        let mut slots = self.lock();
        let slot = slots.entry(target.clone()).or_default();
        if slot.h1.len() < MAX_H1_PER_TARGET {
            slot.h1.push((conn, Instant::now()));
        }
    }

    /// Closes one idle connection, if there is one (HTTP/1.1 first: an HTTP/2 one may
    /// serve many requests), to give its place in the upstream connection budget to a new
    /// connection.
    pub(super) fn close_an_idle_connection(&self) {
        let mut slots = self.lock();
        for slot in slots.values_mut() {
            if let Some(i) = slot.h1.iter().position(|(c, _)| c.send.is_ready()) {
                let (conn, _) = slot.h1.swap_remove(i);
                conn.close();
                return;
            }
        }
        for slot in slots.values_mut() {
            if let Some(i) = slot.h2.iter().position(|c| c.is_idle()) {
                slot.h2.swap_remove(i).close();
                return;
            }
        }
    }

    /// Drops closed connections, idle ones past their time, and slots left empty.
    pub(super) fn reap(&self) {
        let mut slots = self.lock();
        slots.retain(|_, slot| {
            let now = Instant::now();
            slot.h1.retain_mut(|(c, since)| {
                if !c.send.is_ready() {
                    *since = now;
                }
                let idle_too_long = c.send.is_ready() && now.duration_since(*since) >= IDLE_TIMEOUT;
                if idle_too_long {
                    c.close();
                }
                !(c.send.is_closed() || idle_too_long)
            });
            slot.h2.retain(|c| {
                if c.idle_sweeps() >= H2_IDLE_SWEEPS {
                    c.close();
                }
                !c.is_closed()
            });
            !slot.h2.is_empty() || !slot.h1.is_empty() || slot.dialing.is_some()
        });
    }
}

/// The right to dial a new connection for a target. Others may be waiting for what it
/// becomes: [`Dialing::finish`] tells them; dropped unfinished (the request went away
/// mid-dial), it lets them dial for themselves.
pub(super) struct Dialing {
    pool: Arc<Pool>,
    target: Target,
    /// Set when others may wait for this dial: its id and their channel.
    waiters: Option<(u64, watch::Sender<Setup>)>,
}

impl Dialing {
    pub(super) fn target(&self) -> &Target {
        &self.target
    }

    /// Records what the dial gave (an HTTP/2 connection goes into the pool, shared) and
    /// wakes those waiting for it.
    pub(super) fn finish(mut self, outcome: Result<&Sender, &ProxyError>) {
        let setup = match outcome {
            Ok(Sender::H2(conn, _)) => Setup::Shared(conn.clone()),
            Ok(Sender::H1(_)) => Setup::NotShared,
            Err(e) => Setup::Failed(e.clone()),
        };
        let waiters = self.waiters.take();
        {
            // Into the pool before anyone waiting is woken, so that a waiter that finds
            // the connection full dials the next one rather than waiting again.
            let mut slots = self.pool.lock();
            let slot = slots.entry(self.target.clone()).or_default();
            match &setup {
                Setup::Shared(conn) => {
                    slot.h1_only = false;
                    slot.h2.retain(|c| !c.is_closed());
                    slot.h2.push(conn.clone());
                }
                Setup::NotShared => slot.h1_only = true,
                Setup::Pending | Setup::Failed(_) => {}
            }
            if let Some((id, _)) = &waiters {
                slot.clear_dial(*id);
            }
        }
        if let Some((_, tx)) = waiters {
            tx.send_replace(setup);
        }
    }
}

impl Drop for Dialing {
    fn drop(&mut self) {
        if let Some((id, _tx)) = self.waiters.take()
            && let Some(slot) = self.pool.lock().get_mut(&self.target)
        {
            slot.clear_dial(id);
        }
    }
}

impl Slot {
    fn clear_dial(&mut self, id: u64) {
        if self.dialing.as_ref().is_some_and(|(d, _)| *d == id) {
            self.dialing = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::h2::tests::{target, upstream};

    fn dialing(c: Checkout) -> Dialing {
        match c {
            Checkout::Dial(d) => d,
            Checkout::Reuse(_) => panic!("reused, expected a dial"),
            Checkout::Wait(_) => panic!("waits, expected a dial"),
        }
    }

    #[tokio::test]
    async fn parallel_first_requests_wait_for_one_dial_and_share_what_it_made() {
        let pool = Arc::new(Pool::default());
        let first = dialing(pool.checkout(&target()));
        let mut waiters = Vec::new();
        for _ in 0..5 {
            match pool.checkout(&target()) {
                Checkout::Wait(rx) => waiters.push(rx),
                _ => panic!("a second request did not wait for the dial in progress"),
            }
        }
        let conn = upstream(100, None).await;
        let open = conn.open_stream();
        first.finish(Ok(&Sender::H2(conn, open)));
        for mut rx in waiters {
            let setup = rx.wait_for(|s| !matches!(s, Setup::Pending)).await.unwrap();
            assert!(matches!(*setup, Setup::Shared(_)));
        }
        // The connection is pooled, and taken again.
        assert!(matches!(
            pool.checkout(&target()),
            Checkout::Reuse(Sender::H2(..))
        ));
    }

    #[tokio::test]
    async fn an_abandoned_dial_lets_the_waiters_dial_for_themselves() {
        let pool = Arc::new(Pool::default());
        let first = dialing(pool.checkout(&target()));
        let Checkout::Wait(mut rx) = pool.checkout(&target()) else {
            panic!("did not wait");
        };
        drop(first);
        assert!(rx.changed().await.is_err(), "the waiter was not told");
        let _next = dialing(pool.checkout(&target()));
    }

    #[tokio::test]
    async fn a_failed_dial_is_shared_with_those_waiting() {
        let pool = Arc::new(Pool::default());
        let first = dialing(pool.checkout(&target()));
        let Checkout::Wait(mut rx) = pool.checkout(&target()) else {
            panic!("did not wait");
        };
        let e = ProxyError::new(crate::error::ErrorKind::UpstreamRefused, "refused");
        first.finish(Err(&e));
        let setup = rx.wait_for(|s| !matches!(s, Setup::Pending)).await.unwrap();
        assert!(matches!(&*setup, Setup::Failed(e) if e.reason == "refused"));
        // The next request dials again rather than inheriting the failure.
        let _next = dialing(pool.checkout(&target()));
    }

    #[tokio::test]
    async fn a_full_or_closed_http2_connection_is_not_handed_out() {
        let pool = Arc::new(Pool::default());
        // An upstream that allows one stream: once it is taken, the next request dials.
        let conn = upstream(1, None).await;
        dialing(pool.checkout(&target())).finish(Ok(&Sender::H2(conn.clone(), conn.open_stream())));
        let t = target();
        let _ = conn
            .send(&t, empty_get(), None, Duration::from_secs(5))
            .await;
        let held = {
            let conn = conn.clone();
            tokio::spawn(async move {
                let t = target();
                let _r = conn
                    .send(&t, never_get(), None, Duration::from_secs(60))
                    .await;
                std::future::pending::<()>().await;
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = dialing(pool.checkout(&target()));
        drop(second);
        held.abort();
        // A connection that went away (a GOAWAY) is dropped from the pool.
        let pool = Arc::new(Pool::default());
        let conn = upstream(100, Some(1)).await;
        dialing(pool.checkout(&target())).finish(Ok(&Sender::H2(conn.clone(), conn.open_stream())));
        let _ = conn
            .send(&t, empty_get(), None, Duration::from_secs(5))
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = conn
            .send(&t, empty_get(), None, Duration::from_secs(5))
            .await;
        let _redial = dialing(pool.checkout(&target()));
    }

    #[tokio::test]
    async fn a_target_that_answers_http1_is_not_waited_for() {
        let pool = Arc::new(Pool::default());
        let (io, _server) = tokio::io::duplex(1024);
        let (sender, conn) = http1::handshake::<_, ProxyBody>(hyper_util::rt::TokioIo::new(io))
            .await
            .unwrap();
        let task = tokio::spawn(conn).abort_handle();
        let conn = H1Conn { send: sender, task };
        dialing(pool.checkout(&target())).finish(Ok(&Sender::H1(conn)));
        // Two requests at once each dial: nothing to share.
        let _a = dialing(pool.checkout(&target()));
        let _b = dialing(pool.checkout(&target()));
    }

    #[tokio::test]
    async fn idle_http2_connections_are_closed_by_the_sweeps_or_to_make_room() {
        let pool = Arc::new(Pool::default());
        let conn = upstream(100, None).await;
        dialing(pool.checkout(&target())).finish(Ok(&Sender::H2(conn.clone(), conn.open_stream())));
        // A request open on it keeps it, however many sweeps pass.
        let busy = conn.open_stream();
        for _ in 0..2 * H2_IDLE_SWEEPS {
            pool.reap();
        }
        assert!(!conn.is_closed());
        drop(busy);
        for _ in 0..H2_IDLE_SWEEPS - 1 {
            pool.reap();
        }
        assert!(!conn.is_closed(), "closed before its idle time");
        pool.reap();
        assert!(
            conn.is_closed(),
            "an idle HTTP/2 connection is kept for ever"
        );
        let _redial = dialing(pool.checkout(&target()));

        // The connection budget closes an idle one at once.
        let pool = Arc::new(Pool::default());
        let conn = upstream(100, None).await;
        dialing(pool.checkout(&target())).finish(Ok(&Sender::H2(conn.clone(), conn.open_stream())));
        pool.close_an_idle_connection();
        assert!(conn.is_closed());
    }

    fn empty_get() -> http::Request<ProxyBody> {
        let mut req = http::Request::new(crate::error::empty_body());
        *req.uri_mut() = http::Uri::from_static("/a");
        req
    }

    fn never_get() -> http::Request<ProxyBody> {
        let mut req = http::Request::new(crate::error::empty_body());
        *req.uri_mut() = http::Uri::from_static("/never");
        req
    }
}
