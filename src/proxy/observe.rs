//! One IO wrapper for everything that watches a connection's bytes go by (the tunnel's
//! byte counts for the audit log, the raw-head window for the framing check), so the
//! `AsyncRead`/`AsyncWrite` delegation is written once.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Told about the bytes that pass through an [`Observed`] stream.
pub trait IoObserver {
    /// `bytes` were just read from the stream.
    fn on_read(&self, bytes: &[u8]);
    /// `n` bytes were just written to the stream.
    fn on_write(&self, _n: usize) {}
}

/// A stream whose reads and writes are reported to `observer`.
pub struct Observed<IO, O> {
    inner: IO,
    observer: O,
}

impl<IO, O> Observed<IO, O> {
    pub fn new(inner: IO, observer: O) -> Self {
        Observed { inner, observer }
    }
}

impl<IO: AsyncRead + Unpin, O: IoObserver + Unpin> AsyncRead for Observed<IO, O> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.observer.on_read(&buf.filled()[before..]);
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin, O: IoObserver + Unpin> AsyncWrite for Observed<IO, O> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.observer.on_write(n);
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            this.observer.on_write(n);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
