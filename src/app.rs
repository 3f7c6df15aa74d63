//! Start-up and shutdown: everything that must succeed before the proxy listens (routes,
//! CA, listeners), then serving (SIGHUP reloads the routes) until SIGTERM/SIGINT, then
//! draining in-flight requests for up to the grace period.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio::net::TcpListener;

use crate::ca::{BottleCa, CaOrigin, LeafCache};
use crate::config::Config;
use crate::proxy::{ClientLimits, ProxyState};
use crate::reload::{Reloader, Trigger};
use crate::upstream::{Upstream, UpstreamSettings};

/// Leaf configurations kept at once (one per intercepted host).
const LEAF_CACHE_CAPACITY: usize = 1024;

/// Runs the proxy until a shutdown signal; an `Err` is a start-up failure, one line.
pub async fn run(config: Config) -> Result<(), String> {
    // Handlers first: a SIGHUP that arrived before them would end the process.
    let mut signals = Signals::new([SIGHUP, SIGTERM, SIGINT])
        .map_err(|e| format!("installing signal handlers: {e}"))?;
    let routes = crate::reload::load_routes(&config.routes)?;
    if let Some(proxy) = &config.upstream_proxy {
        return Err(format!(
            "upstream proxy {:?} (from --upstream-proxy or HTTPS_PROXY): chaining is not supported by this build yet; unset it to connect directly",
            redact_userinfo(proxy)
        ));
    }
    let (ca, origin) = BottleCa::load_or_mint(&config.ca_dir).map_err(|e| e.to_string())?;
    let bundle = Bytes::from(ca.bundle_pem());
    if let Some(dir) = &config.ca_export {
        ca.export(dir).map_err(|e| format!("--ca-export: {e}"))?;
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("--listen {}: {e}", config.listen))?;
    let admin = TcpListener::bind(config.admin)
        .await
        .map_err(|e| format!("--admin {}: {e}", config.admin))?;
    let own_listeners = [&listener, &admin]
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect::<Vec<_>>();
    let upstream = Arc::new(
        Upstream::new(UpstreamSettings {
            connect_timeout: config.connect_timeout,
            response_timeout: config.response_timeout,
            max_header_bytes: config.max_header_bytes,
            extra_roots: config.upstream_roots.clone(),
            resolve: config.resolve.clone(),
            own_listeners: own_listeners.clone(),
        })
        .map_err(|e| format!("--upstream-ca: {e}"))?,
    );
    upstream.spawn_reaper();
    let leaves = LeafCache::new(ca, LEAF_CACHE_CAPACITY).map_err(|e| e.to_string())?;
    let limits = ClientLimits {
        client_timeout: config.client_timeout,
        idle_timeout: config.idle_timeout,
        body_idle_timeout: config.response_timeout,
        max_header_bytes: config.max_header_bytes,
        max_connections: config.max_connections,
        max_concurrent_streams: 256,
    };
    let route_count = routes.routes().len();
    let state = ProxyState::new(routes, leaves, upstream, limits, own_listeners);
    tracing::info!(
        event = "start",
        listen = %config.listen,
        admin = %config.admin,
        routes = route_count,
        routes_file = %config.routes.display(),
        ca = if origin == CaOrigin::Minted { "minted" } else { "loaded" },
        ca_dir = %config.ca_dir.display(),
        "egress-proxy serving"
    );
    tokio::spawn(crate::admin::serve(admin, state.clone(), bundle));
    let reloader = Reloader::start(state.clone(), config.routes.clone())?;
    let until_stop = async {
        while let Some(signal) = signals.next().await {
            if signal == SIGHUP {
                reloader.trigger(Trigger::Signal);
            } else {
                return;
            }
        }
    };
    crate::proxy::listener::serve(listener, state.clone(), until_stop).await;
    drain(&state, config.shutdown_grace, &mut signals).await;
    Ok(())
}

/// Lets in-flight requests finish for up to `grace`; a second SIGTERM/SIGINT ends it at once.
async fn drain(state: &ProxyState, grace: Duration, signals: &mut Signals) {
    tracing::info!(
        event = "shutdown",
        open_connections = state.open_connections(),
        grace_s = grace.as_secs(),
        "stopped accepting; draining"
    );
    state.begin_shutdown();
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        if state.open_connections() == 0 {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            _ = tokio::time::sleep(Duration::from_millis(25)) => {}
            s = signals.next() => if s != Some(SIGHUP) { break },
        }
    }
    tracing::info!(
        event = "exit",
        open_connections = state.open_connections(),
        "egress-proxy stopped"
    );
}

/// `http://user:pass@host` → `http://***@host`, for messages.
pub fn redact_userinfo(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_owned(),
    }
}
