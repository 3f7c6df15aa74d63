//! What an idle keep-alive tunnel holds (SPEC §4a): at most 64 KiB of private memory,
//! also after it carried a large upload. Measured from outside, as `RssAnon` of the real
//! binary's process, over many tunnels so that what the process keeps once (pools,
//! allocator caches) does not count as a tunnel's.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

/// Tunnels measured together; the allowance is per tunnel.
const TUNNELS: usize = 160;
const UPLOAD: usize = 150_000;
const MAX_PER_TUNNEL_KIB: u64 = 64;

fn routes(port: u16) -> String {
    format!(
        r#"
routes:
  - host: api.test
    ports: [{port}]
    path_allowlist: ["/upload"]
"#
    )
}

/// Opens an HTTP/1.1 tunnel and uploads `UPLOAD` bytes on it (with a Content-Length, or
/// `chunked` in 16 KiB chunks); the client, kept open.
async fn tunnel_after_an_upload(
    proxy: &Proxy,
    port: u16,
    chunked: bool,
) -> hyper::client::conn::http1::SendRequest<ClientBody> {
    let mut c = h1(proxy.tunnel("api.test", port, &[b"http/1.1"]).await).await;
    let data: Vec<u8> = (0..UPLOAD as u64).map(pattern_byte).collect();
    let upload = if chunked {
        let chunks: Vec<Result<Frame<Bytes>, BoxError>> = data
            .chunks(16 * 1024)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        StreamBody::new(futures_util::stream::iter(chunks)).boxed()
    } else {
        body(data)
    };
    let req = Request::post("/upload")
        .header("host", format!("api.test:{port}"))
        .body(upload)
        .unwrap();
    let (status, _, b) = collect(c.send_request(req).await.unwrap()).await;
    assert_eq!(status, 200);
    let v = json(&b);
    assert_eq!(
        (v["len"].as_u64(), v["mismatches"].as_u64()),
        (Some(UPLOAD as u64), Some(0))
    );
    c
}

#[tokio::test]
async fn an_idle_tunnel_gives_back_what_an_upload_used() {
    let ca = TestCa::new("idle memory CA");
    let up = Upstream::start(&ca, &["api.test"], &[b"http/1.1"]).await;
    let port = up.port();
    let proxy = ProxyBuilder::new(&routes(port))
        .upstream(&ca, &[("api.test", port)])
        .arg("--idle-timeout")
        .arg("600")
        .start();
    let pid = proxy.pid();

    // Warm up: the leaf, the upstream connection, the allocator's pages for an upload.
    for i in 0..4 {
        drop(tunnel_after_an_upload(&proxy, port, i % 2 == 1).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = rss_anon_kib(pid);

    // One at a time, so one pooled upstream connection carries every upload and the
    // growth is the tunnels' own.
    let mut clients = Vec::with_capacity(TUNNELS);
    for i in 0..TUNNELS {
        clients.push(tunnel_after_an_upload(&proxy, port, i % 2 == 1).await);
    }
    // Idle now; give the allocator a moment to return what was freed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = rss_anon_kib(pid);
    let per_tunnel = idle.saturating_sub(baseline) / TUNNELS as u64;
    eprintln!(
        "RssAnon: {baseline} KiB before, {idle} KiB with {TUNNELS} idle tunnels: {per_tunnel} KiB each"
    );
    assert!(
        per_tunnel <= MAX_PER_TUNNEL_KIB,
        "each idle tunnel holds {per_tunnel} KiB after a {UPLOAD}-byte upload \
         (RssAnon {baseline} → {idle} KiB over {TUNNELS} tunnels)"
    );
    // Every tunnel is still open and usable.
    for c in &mut clients {
        assert!(c.ready().await.is_ok());
    }
    assert_eq!(up.connections.load(std::sync::atomic::Ordering::SeqCst), 1);
}
