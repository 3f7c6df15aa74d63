//! Bodies as they stream through: frame by frame, never buffered, with the silence
//! timeout of SPEC §2 (`--response-timeout` is also the longest pause inside a body) and
//! a byte count for the audit log. Whatever the body carries along (the request's log
//! record, the connection's in-flight mark) is dropped with it, which is how the proxy
//! knows a streamed request has really finished.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::error::{BodyError, BoxError};

pin_project! {
    /// Wraps a body: counts its bytes into `bytes`, fails it after `idle` without a
    /// frame, and holds `_keep` until the body is dropped.
    pub struct Tracked<B, K> {
        #[pin]
        inner: B,
        #[pin]
        silence: Sleep,
        idle: Duration,
        bytes: Arc<AtomicU64>,
        _keep: K,
    }
}

impl<B, K> Tracked<B, K> {
    pub fn new(inner: B, idle: Duration, bytes: Arc<AtomicU64>, keep: K) -> Self {
        Tracked {
            inner,
            silence: tokio::time::sleep(idle),
            idle,
            bytes,
            _keep: keep,
        }
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
                    this.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                this.silence.as_mut().reset(Instant::now() + *this.idle);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(BodyError(e.into())))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.silence.poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(BodyError(
                    format!("no body data for {}s", this.idle.as_secs_f64()).into(),
                )))),
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
        let bytes = Arc::new(AtomicU64::new(0));
        let mut body = Box::pin(Tracked::new(
            StreamBody::new(stream),
            Duration::from_secs(5),
            bytes.clone(),
            (),
        ));
        tx.send(Ok(Frame::data(Bytes::from_static(b"hello"))))
            .await
            .unwrap();
        let f = body.as_mut().frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "hello");
        assert_eq!(bytes.load(Ordering::Relaxed), 5);
        // Silence longer than the idle timeout fails the body instead of hanging.
        let e = body.as_mut().frame().await.unwrap().unwrap_err();
        assert!(e.to_string().contains("no body data"), "{e}");
        drop(tx);
    }
}
