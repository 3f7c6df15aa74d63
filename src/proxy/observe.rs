//! One IO wrapper for everything that watches a connection's bytes go by (the tunnel's
//! byte counts for the audit log, the framing check's reading of request heads), so the
//! `AsyncRead`/`AsyncWrite` delegation is written once. An observer may also cap how
//! much one read returns ([`IoObserver::read_limit`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Told about the bytes that pass through an [`Observed`] stream.
pub(crate) trait IoObserver {
    /// `bytes` were just read from the stream.
    fn on_read(&self, bytes: &[u8]);
    /// `n` bytes were just written to the stream.
    fn on_write(&self, _n: usize) {}

    /// The most one read may return, if less than the reader's buffer has room for.
    fn read_limit(&self) -> Option<usize> {
        None
    }
}

/// A stream whose reads and writes are reported to `observer`.
pub(crate) struct Observed<IO, O> {
    inner: IO,
    observer: O,
}

impl<IO, O> Observed<IO, O> {
    pub(crate) fn new(inner: IO, observer: O) -> Self {
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
        let r = match this.observer.read_limit() {
            Some(limit) if buf.remaining() > limit => {
                let mut limited = buf.take(limit);
                let start = limited.filled().as_ptr();
                let r = Pin::new(&mut this.inner).poll_read(cx, &mut limited);
                // A reader may swap the buffer out; then nothing was read into `buf`.
                let n = if limited.filled().as_ptr() == start {
                    limited.filled().len()
                } else {
                    0
                };
                // SAFETY: the `n` bytes at the start of `buf`'s unfilled part were
                // filled (so initialised) through `limited`, which is a view of exactly
                // that part (`ReadBuf::take`); the pointer check above rules out a reader
                // that filled another buffer.
                unsafe { buf.assume_init(n) };
                buf.advance(n);
                r
            }
            _ => Pin::new(&mut this.inner).poll_read(cx, buf),
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt;

    #[derive(Default)]
    struct Limited {
        seen: AtomicUsize,
    }

    impl IoObserver for &Limited {
        fn on_read(&self, bytes: &[u8]) {
            self.seen.fetch_add(bytes.len(), Ordering::Relaxed);
        }

        fn read_limit(&self) -> Option<usize> {
            Some(8192)
        }
    }

    #[tokio::test]
    async fn a_read_limit_caps_each_read_and_loses_nothing() {
        let data: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
        let observer = Limited::default();
        let mut io = Observed::new(&data[..], &observer);
        let mut buf = vec![0u8; 64 * 1024];
        assert_eq!(io.read(&mut buf).await.unwrap(), 8192);
        assert_eq!(&buf[..8192], &data[..8192]);
        let mut rest = Vec::new();
        io.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, &data[8192..]);
        assert_eq!(observer.seen.load(Ordering::Relaxed), data.len());
    }
}
