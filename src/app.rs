//! Start-up and shutdown: everything that must succeed before the proxy listens (routes,
//! CA, listeners), then serving (SIGHUP reloads the routes) until SIGTERM/SIGINT, then
//! draining in-flight requests for up to the grace period.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio::net::TcpListener;

use crate::ca::{BottleCa, CaOrigin, LeafCache};
use crate::chain::ProxyUrl;
use crate::config::Config;
use crate::proxy::{ClientLimits, ProxyState};
use crate::reload::{RoutesWatch, Trigger};
use crate::routes::Host;
use crate::upstream::{Upstream, UpstreamSettings};

/// Leaf configurations kept at once (one per intercepted host).
const LEAF_CACHE_CAPACITY: usize = 1024;

/// Runs the proxy until a shutdown signal; an `Err` is a start-up failure, one line.
pub async fn run(config: Config) -> Result<(), String> {
    // Handlers first: a SIGHUP that arrived before them would end the process.
    let mut signals = Signals::new([SIGHUP, SIGTERM, SIGINT])
        .map_err(|e| format!("installing signal handlers: {e}"))?;
    // Raised before the routes, the CA and the listeners; the cap below is fitted to it.
    let open_files_limit = match crate::sys::raise_open_files_limit() {
        Ok((limit, None)) => Some(limit),
        Ok((limit, Some(why))) => {
            tracing::warn!(error = %why, open_files_limit = limit, "could not raise the open-files limit to its hard limit");
            Some(limit)
        }
        Err(why) => {
            tracing::warn!(error = %why, "could not read the open-files limit");
            None
        }
    };
    // The watch before the first read: a change made while the rest starts is not lost.
    let watch = RoutesWatch::start(config.routes.clone())?;
    let (routes, routes_bytes) = watch.load()?;
    let (ca, origin) = BottleCa::load_or_mint(&config.ca_dir).map_err(|e| e.to_string())?;
    if let Some(dir) = &config.ca_export {
        ca.export(dir).map_err(|e| format!("--ca-export: {e}"))?;
    }
    // Checked against the configured addresses before binding: a refused start must not
    // have listened, even for a moment.
    if let Some(proxy) = &config.upstream_proxy {
        refuse_proxy_loop(
            proxy,
            &own_addresses(&[config.listen, config.admin]),
            &config,
        )
        .await?;
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("--listen {}: {e}", config.listen))?;
    let admin = TcpListener::bind(config.admin)
        .await
        .map_err(|e| format!("--admin {}: {e}", config.admin))?;
    // What the listeners are bound to, which differs from the configuration for port 0.
    let bound_listen = listener
        .local_addr()
        .map_err(|e| format!("--listen {}: {e}", config.listen))?;
    let bound_admin = admin
        .local_addr()
        .map_err(|e| format!("--admin {}: {e}", config.admin))?;
    let own_listeners = own_addresses(&[bound_listen, bound_admin]);
    // Counted now, with the listeners, the routes watch and the log open.
    let max_connections = match (open_files_limit, crate::sys::open_descriptors()) {
        (Some(limit), Some(open)) => {
            let cap = connection_cap(config.max_connections, limit, open);
            if cap < config.max_connections {
                tracing::warn!(
                    event = "connection_cap",
                    open_files_limit = limit,
                    max_connections = config.max_connections,
                    capped_at = cap,
                    "the open-files limit leaves room for fewer agent connections than --max-connections; capping them (raise the container's nofile limit to serve more)"
                );
            }
            cap
        }
        _ => config.max_connections,
    };
    let upstream = Arc::new(
        Upstream::new(UpstreamSettings {
            connect_timeout: config.connect_timeout,
            response_timeout: config.response_timeout,
            max_header_bytes: config.max_header_bytes,
            extra_roots: config.upstream_roots.clone(),
            resolve: config.resolve.clone(),
            own_listeners: own_listeners.clone(),
            proxy: config.upstream_proxy.clone(),
            no_proxy: config.no_proxy.clone(),
            max_connections,
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
        max_connections,
        max_concurrent_streams: 256,
    };
    let route_count = routes.routes().len();
    let state = ProxyState::new(routes, leaves, upstream, limits, own_listeners, config.mode);
    let via = config.upstream_proxy.as_ref().map(|p| p.to_string());
    tracing::info!(
        event = "start",
        mode = config.mode.as_str(),
        upstream_proxy = via.as_deref(),
        listen = %bound_listen,
        admin = %bound_admin,
        routes = route_count,
        max_connections,
        open_files_limit,
        routes_file = %config.routes.display(),
        ca = if origin == CaOrigin::Minted { "minted" } else { "loaded" },
        ca_dir = %config.ca_dir.display(),
        "egress-proxy serving"
    );
    tokio::spawn(crate::admin::serve(admin, state.clone()));
    let reloader = watch.serve(state.clone(), routes_bytes);
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

/// Descriptors an agent connection may need: its own, and an upstream connection's (the
/// upstream side holds as many connections as the cap at most, however the agents'
/// requests fan out: `upstream::Upstream` keeps that budget).
const DESCRIPTORS_PER_CONNECTION: u64 = 2;

/// Descriptors kept out of the agent connections' share, beyond those open at start
/// (standard streams, the runtime, the listeners, the routes watch): the admin listener's
/// connections, the refusals waiting for a request, and room for the rest (routes and
/// token files read on reload, name lookups, upstream connections the pool keeps idle
/// after their agent left).
const RESERVED_DESCRIPTORS: u64 =
    crate::admin::ADMIN_CONNECTIONS as u64 + crate::proxy::listener::REFUSALS_AT_ONCE as u64 + 64;

/// How many agent connections fit in `open_files_limit` descriptors with `open_now`
/// already open: the connection cap is met (503) before descriptors run out, whatever
/// `--max-connections` asked for. At least one.
fn connection_cap(requested: usize, open_files_limit: u64, open_now: usize) -> usize {
    let spare = open_files_limit.saturating_sub(open_now as u64 + RESERVED_DESCRIPTORS);
    let fit = usize::try_from(spare / DESCRIPTORS_PER_CONNECTION).unwrap_or(usize::MAX);
    requested.min(fit).max(1)
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

/// Every address the proxy's listeners answer on: each bound address, and for one bound
/// to an unspecified address (`0.0.0.0`, `::`), every local interface address too.
fn own_addresses(listeners: &[SocketAddr]) -> Vec<SocketAddr> {
    let local = crate::sys::local_addresses();
    let mut out = Vec::new();
    for &addr in listeners {
        out.push(addr);
        if addr.ip().is_unspecified() {
            out.extend(
                local
                    .iter()
                    .filter(|ip| addr.is_ipv6() || ip.is_ipv4())
                    .map(|ip| SocketAddr::new(*ip, addr.port())),
            );
        }
    }
    out
}

/// An upstream proxy that is this proxy (a sidecar that inherited the bottle's
/// `HTTPS_PROXY`) would loop forever: refuse to start instead.
async fn refuse_proxy_loop(
    proxy: &ProxyUrl,
    own: &[SocketAddr],
    config: &Config,
) -> Result<(), String> {
    let addrs: Vec<SocketAddr> = match (
        &proxy.host,
        config.resolve.get(&(proxy.host.clone(), proxy.port)),
    ) {
        (_, Some(pinned)) => pinned
            .iter()
            .map(|ip| SocketAddr::new(*ip, proxy.port))
            .collect(),
        (Host::Ip(ip), None) => vec![SocketAddr::new(*ip, proxy.port)],
        // A name that does not resolve now may later: only a loop we can see is refused.
        (Host::Name(name), None) => tokio::net::lookup_host((name.as_str(), proxy.port))
            .await
            .map(|it| it.collect())
            .unwrap_or_default(),
    };
    match addrs
        .iter()
        .find(|a| crate::destination::is_own_listener(**a, own))
    {
        Some(a) => Err(format!(
            "upstream proxy {proxy} (from --upstream-proxy or HTTPS_PROXY) is this proxy's own listener {a}; unset HTTPS_PROXY for the sidecar or name the real upstream proxy"
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::{RESERVED_DESCRIPTORS, connection_cap};

    #[test]
    fn the_cap_fits_two_descriptors_a_connection_in_what_is_left() {
        // 256 open files, 12 open at start: what is left after the reserve, halved.
        let left = 256 - 12 - RESERVED_DESCRIPTORS as usize;
        assert_eq!(connection_cap(4096, 256, 12), left / 2);
        // A limit with room to spare leaves --max-connections as asked.
        assert_eq!(connection_cap(4096, 1 << 20, 12), 4096);
        assert_eq!(connection_cap(100, 256, 12), 100.min(left / 2));
        // A limit below the reserve still serves one connection rather than none.
        assert_eq!(connection_cap(4096, 64, 12), 1);
        // RLIM_INFINITY does not overflow.
        assert_eq!(connection_cap(4096, u64::MAX, 12), 4096);
    }
}
