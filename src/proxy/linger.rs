//! Closing an agent's connection without destroying what it has not read yet.
//!
//! Why: when the proxy closes a connection first (graceful shutdown, idle close, a
//! `Connection: close` answer) while the agent is still sending, say HTTP/2
//! `WINDOW_UPDATE`s as it reads a download slowly, the kernel answers the next segment
//! with a reset, and a reset makes the agent's kernel discard every byte the agent had
//! not read yet: the tail of a response the proxy sent completely. Web servers "linger"
//! (nginx's `lingering_close`); so does this: on drop, the write side is shut (FIN), and
//! what still arrives is read and discarded until the agent closes too or [`LINGER`]
//! passes. The connection counts as open until then, so a draining shutdown waits for it;
//! once the proxy is shutting down a linger lasts at most [`SHUTDOWN_LINGER`], so that
//! with nothing in flight the process exits within 3 s of SIGTERM (SPEC §5).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::OpenConnection;

/// How long a closed connection keeps reading what the agent still sends.
const LINGER: Duration = Duration::from_secs(3);

/// How long a linger may still last once the proxy is shutting down (from the moment the
/// shutdown began or the linger started, whichever is later). An idle connection is closed
/// at most [`super::IDLE_CLOSE_ON_SHUTDOWN`] after SIGTERM; this keeps its close within
/// the 3 s the process has to exit.
pub(super) const SHUTDOWN_LINGER: Duration = Duration::from_secs(1);

/// An agent's TCP connection that lingers when dropped (see the module doc).
#[derive(Debug)]
pub(super) struct LingeringTcp {
    /// Always `Some` until dropped.
    stream: Option<TcpStream>,
    open: Option<Arc<OpenConnection>>,
}

impl LingeringTcp {
    pub(super) fn new(stream: TcpStream, open: Arc<OpenConnection>) -> LingeringTcp {
        LingeringTcp {
            stream: Some(stream),
            open: Some(open),
        }
    }

    /// Runs one poll of the inner stream (there is always one until drop).
    fn poll_io<T>(
        self: Pin<&mut Self>,
        poll: impl FnOnce(Pin<&mut TcpStream>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match self.get_mut().stream.as_mut() {
            Some(stream) => poll(Pin::new(stream)),
            None => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }
}

impl Drop for LingeringTcp {
    fn drop(&mut self) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        // The agent closed first and nothing is unread: no reset can follow.
        let mut probe = [0u8; 1];
        if matches!(stream.try_read(&mut probe), Ok(0)) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let open = self.open.take();
        runtime.spawn(async move {
            match &open {
                Some(o) => {
                    let cut_short = async {
                        o.state.shutdown_begun().await;
                        tokio::time::sleep(SHUTDOWN_LINGER).await;
                    };
                    tokio::select! {
                        _ = linger(stream) => {}
                        _ = cut_short => {}
                    }
                }
                None => linger(stream).await,
            }
            drop(open);
        });
    }
}

async fn linger(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let mut discard = [0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n) = stream.read(&mut discard).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

impl AsyncRead for LingeringTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.poll_io(|io| io.poll_read(cx, buf))
    }
}

impl AsyncWrite for LingeringTcp {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_io(|io| io.poll_write(cx, b))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_io(|io| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_io(|io| io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_io(|io| io.poll_shutdown(cx))
    }
}
