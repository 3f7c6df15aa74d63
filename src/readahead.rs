//! A read-ahead buffer under a TLS connection, so that a bulk transfer costs one read
//! system call per 64 KiB instead of one per TLS record.
//!
//! rustls reads at most one record's worth (16 KiB of plaintext) per `read` it issues, so a
//! download through the proxy made one `recvfrom` per record, each with its own socket
//! lock, receive-queue walk and ACK decision (docs/decisions.md has the counts). Beneath
//! rustls, this reads whatever the kernel holds, up to 64 KiB, and hands it out from
//! memory, once a read has shown that data is flowing (it filled all it asked for); small
//! answers are read straight through, with no buffer. The buffer exists only while it
//! holds bytes: an idle pooled connection keeps none. It never reads ahead of what is
//! already there (one `read` per `poll_read` that finds the buffer empty), so it adds no
//! latency and changes nothing a peer can see.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How much one read from the socket may take.
const READ_AHEAD: usize = 64 * 1024;

/// An `AsyncRead + AsyncWrite` whose reads go through a buffer of up to [`READ_AHEAD`]
/// while a transfer is in full flow, and straight into the caller's buffer otherwise.
pub(crate) struct ReadAhead<IO> {
    inner: IO,
    /// Bytes read from `inner` and not yet handed out; no allocation while empty.
    buf: BytesMut,
    /// Whether the last read from `inner` filled all it was asked for, so more is likely
    /// waiting: only then is reading ahead worth a buffer. A small answer (a keep-alive
    /// response of a few hundred bytes) is read straight into the caller's buffer: a
    /// pooled connection's task polls its reader several times per request, and a 64 KiB
    /// buffer allocated and freed at each poll showed in the instructions a request costs.
    flowing: bool,
}

impl<IO> ReadAhead<IO> {
    pub(crate) fn new(inner: IO) -> Self {
        ReadAhead {
            inner,
            buf: BytesMut::new(),
            flowing: false,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for ReadAhead<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buf.is_empty() {
            let asked = out.remaining();
            // A caller that wants as much as we would read ahead gets it straight too.
            if !this.flowing || asked >= READ_AHEAD {
                let before = out.filled().len();
                let read = Pin::new(&mut this.inner).poll_read(cx, out);
                if let Poll::Ready(Ok(())) = read {
                    this.flowing = asked > 0 && out.filled().len() - before == asked;
                }
                return read;
            }
            this.buf.reserve(READ_AHEAD);
            let read = tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf);
            match read {
                Poll::Ready(Ok(n)) if n > 0 => this.flowing = n >= asked,
                other => {
                    // Nothing read (pending, closed or failed): hold no memory meanwhile.
                    if other.is_ready() {
                        this.flowing = false;
                    }
                    this.buf = BytesMut::new();
                    return other.map_ok(|_| ());
                }
            }
        }
        let n = out.remaining().min(this.buf.len());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        if this.buf.is_empty() {
            // Nothing held: give the memory back, so idle connections cost none.
            this.buf = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for ReadAhead<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn hands_out_every_byte_in_order_and_holds_nothing_once_drained() {
        let (mut far, near) = tokio::io::duplex(256 * 1024);
        let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        far.write_all(&sent).await.unwrap();
        drop(far);
        let mut ra = ReadAhead::new(near);
        let mut got = Vec::new();
        let mut chunk = [0u8; 1000];
        let mut reads = 0;
        loop {
            let n = ra.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
            reads += 1;
            assert!(reads < 1000, "bounded");
        }
        assert_eq!(got, sent);
        assert_eq!(ra.buf.capacity(), 0, "a drained buffer is given back");
    }

    #[tokio::test]
    async fn once_a_read_comes_back_full_one_inner_read_serves_several() {
        let (mut far, near) = tokio::io::duplex(256 * 1024);
        far.write_all(&[7u8; 3000]).await.unwrap();
        let mut ra = ReadAhead::new(near);
        let mut chunk = [0u8; 1000];
        // The first read goes straight into the caller's buffer and fills it ...
        assert_eq!(ra.read(&mut chunk).await.unwrap(), 1000);
        assert_eq!(ra.buf.capacity(), 0);
        assert!(ra.flowing);
        // ... so the next one reads ahead: the rest comes at once and waits in memory.
        assert_eq!(ra.read(&mut chunk).await.unwrap(), 1000);
        assert_eq!(ra.buf.len(), 1000);
        assert_eq!(ra.read(&mut chunk).await.unwrap(), 1000);
        assert_eq!(ra.buf.capacity(), 0);
    }

    #[tokio::test]
    async fn a_small_answer_is_read_straight_with_no_buffer() {
        let (mut far, near) = tokio::io::duplex(256 * 1024);
        let mut ra = ReadAhead::new(near);
        let mut chunk = [0u8; 1000];
        for round in 0..3u8 {
            far.write_all(&[round; 300]).await.unwrap();
            assert_eq!(ra.read(&mut chunk).await.unwrap(), 300);
            assert_eq!(&chunk[..300], &[round; 300][..]);
            assert!(!ra.flowing, "a short read is no transfer in flow");
            assert_eq!(ra.buf.capacity(), 0, "nothing allocated for it");
        }
        // A read that comes back short ends a flow too.
        far.write_all(&[9u8; 1500]).await.unwrap();
        assert_eq!(ra.read(&mut chunk).await.unwrap(), 1000);
        assert!(ra.flowing);
        assert_eq!(ra.read(&mut chunk).await.unwrap(), 500);
        assert!(!ra.flowing);
        assert_eq!(ra.buf.capacity(), 0);
    }

    #[tokio::test]
    async fn waiting_for_data_holds_no_buffer() {
        let (mut far, near) = tokio::io::duplex(1024);
        let mut ra = ReadAhead::new(near);
        let mut chunk = [0u8; 100];
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(20), ra.read(&mut chunk)).await;
        assert!(waited.is_err(), "nothing was sent yet");
        assert_eq!(
            ra.buf.capacity(),
            0,
            "an idle connection keeps no read-ahead memory"
        );
        far.write_all(b"hello").await.unwrap();
        assert_eq!(ra.read(&mut chunk).await.unwrap(), 5);
        assert_eq!(&chunk[..5], b"hello");
    }

    #[tokio::test]
    async fn writes_pass_straight_through() {
        let (mut far, near) = tokio::io::duplex(1024);
        let mut ra = ReadAhead::new(near);
        ra.write_all(b"request").await.unwrap();
        ra.flush().await.unwrap();
        let mut got = [0u8; 7];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"request");
    }
}
