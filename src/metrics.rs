//! Prometheus metrics (SPEC §6), encoded by `prometheus-client`.
//!
//! Labels carry only fixed vocabulary (decision, error code, result, direction): never a
//! host, path or header value, so a metric can neither leak a secret nor grow without
//! bound when an agent sprays names.
//!
//! That vocabulary is written down once, below, and every series of it is exported from
//! the start at 0: an alert such as `increase(egress_proxy_reloads_total{result="error"}[5m])
//! > 0` has a series to evaluate before the first failed reload.

use crate::error::ErrorKind::{self, *};
use crate::policy::Mode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The reason a decision is counted under: `ok`, an error code of SPEC §4, or a name of
/// its own for what is not an error answer.
#[derive(Clone, Copy)]
enum Reason {
    Ok,
    Code(ErrorKind),
    Named(&'static str),
}

impl Reason {
    fn label(self) -> &'static str {
        match self {
            Reason::Ok => "ok",
            Reason::Code(kind) => kind.code(),
            Reason::Named(name) => name,
        }
    }
}

/// An allowed CONNECT whose TLS handshake with the agent then failed.
pub(crate) const TLS_HANDSHAKE_FAILED: &str = "tls_handshake_failed";

/// Every (decision, reason) a request can be counted under (SPEC §4 steps 2-4). A feature
/// that adds a decision or a refusal (`rate_limited`, `body_too_large`) adds its line here.
const REQUEST_SERIES: &[(&str, Reason)] = &[
    ("allow", Reason::Ok),
    // Report mode: forwarded, with what enforce mode would have refused it with.
    ("report", Reason::Code(HostNotAllowed)),
    ("report", Reason::Code(PathNotAllowed)),
    ("report", Reason::Code(MethodNotAllowed)),
    ("deny", Reason::Code(HostNotAllowed)),
    ("deny", Reason::Code(PathNotAllowed)),
    ("deny", Reason::Code(MethodNotAllowed)),
    ("deny", Reason::Code(DestinationNotAllowed)),
    ("deny", Reason::Code(CleartextCredentials)),
    ("deny", Reason::Code(Misdirected)),
    ("deny", Reason::Code(BadRequest)),
    ("deny", Reason::Code(HeadersTooLarge)),
    // The upstream connection budget spent (SPEC §4a).
    ("deny", Reason::Code(TooManyConnections)),
    // The matched route's own limits (SPEC §4.2, last step).
    ("deny", Reason::Code(RateLimited { retry_after: 0 })),
    ("deny", Reason::Code(BodyTooLarge)),
    // Failures on the way out, each also counted as an upstream error of its RFC 9209 kind:
    // a DNS answer refused, a request the upstream side cannot carry, and the upstream's own.
    ("error", Reason::Code(DestinationNotAllowed)),
    ("error", Reason::Code(BadRequest)),
    ("error", Reason::Code(UpstreamDns)),
    ("error", Reason::Code(UpstreamRefused)),
    ("error", Reason::Code(UpstreamUnavailable)),
    ("error", Reason::Code(UpstreamTlsCertificate)),
    ("error", Reason::Code(UpstreamTlsProtocol)),
    (
        "error",
        Reason::Code(UpstreamProxyRefused { received: None }),
    ),
    ("error", Reason::Code(UpstreamConnectTimeout)),
    ("error", Reason::Code(UpstreamResponseTimeout)),
    ("error", Reason::Code(UpstreamBadResponse)),
    ("error", Reason::Code(UpstreamResponseHeadTooLarge)),
];

/// Every (decision, reason) a CONNECT can be counted under (SPEC §4 step 1).
const CONNECT_SERIES: &[(&str, Reason)] = &[
    ("allow", Reason::Ok),
    ("allow", Reason::Named(TLS_HANDSHAKE_FAILED)),
    // Report mode: a tunnel opened to a host no route covers.
    ("report", Reason::Code(HostNotAllowed)),
    ("deny", Reason::Code(HostNotAllowed)),
    ("deny", Reason::Code(DestinationNotAllowed)),
    ("deny", Reason::Code(BadRequest)),
    ("deny", Reason::Code(Misdirected)),
    ("deny", Reason::Code(TooManyConnections)),
];

/// The results of a routes reload.
const RELOAD_RESULTS: [&str; 2] = ["ok", "error"];

/// The upstream error kinds: the RFC 9209 types of the failures a request can end in.
fn upstream_error_kinds() -> impl Iterator<Item = &'static str> {
    REQUEST_SERIES
        .iter()
        .filter_map(|(decision, reason)| match reason {
            Reason::Code(kind) if *decision == "error" => Some(kind.proxy_status_error()),
            _ => None,
        })
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DecisionLabels {
    /// `allow`, `report`, `deny` or `error`.
    pub decision: &'static str,
    /// The error code of SPEC §4 (`path_not_allowed`, …), or `ok`.
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabels {
    /// The RFC 9209 error type (`dns_error`, `tls_certificate_error`, …).
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ModeLabels {
    /// `enforce` or `report`.
    pub mode: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DirectionLabels {
    /// `up` (agent to upstream) or `down`.
    pub direction: &'static str,
}

/// Every metric the proxy keeps.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    pub requests: Family<DecisionLabels, Counter>,
    pub connects: Family<DecisionLabels, Counter>,
    pub reloads: Family<ResultLabels, Counter>,
    pub upstream_errors: Family<KindLabels, Counter>,
    pub bytes: Family<DirectionLabels, Counter>,
    pub open_connections: Gauge,
    pub open_tunnels: Gauge,
    /// The series every forwarded request moves, looked up once: a family lookup takes a
    /// lock and hashes the labels, three times per request otherwise.
    requests_allowed: Counter,
    bytes_up: Counter,
    bytes_down: Counter,
}

impl Metrics {
    /// `leaf_hits`/`leaf_misses` are the leaf cache's own counters, registered as they are.
    pub(crate) fn new(leaf_hits: Counter, leaf_misses: Counter, mode: Mode) -> Metrics {
        let mut registry = Registry::with_prefix("egress_proxy");
        let requests: Family<DecisionLabels, Counter> = Family::default();
        let bytes: Family<DirectionLabels, Counter> = Family::default();
        let requests_allowed = requests
            .get_or_create(&DecisionLabels {
                decision: "allow",
                reason: "ok",
            })
            .clone();
        let bytes_up = bytes
            .get_or_create(&DirectionLabels { direction: "up" })
            .clone();
        let bytes_down = bytes
            .get_or_create(&DirectionLabels { direction: "down" })
            .clone();
        let connects: Family<DecisionLabels, Counter> = Family::default();
        let reloads: Family<ResultLabels, Counter> = Family::default();
        let upstream_errors: Family<KindLabels, Counter> = Family::default();
        // Every series of the vocabulary exists, at 0, before its first event.
        for (family, series) in [(&requests, REQUEST_SERIES), (&connects, CONNECT_SERIES)] {
            for &(decision, reason) in series {
                let _ = family.get_or_create(&DecisionLabels {
                    decision,
                    reason: reason.label(),
                });
            }
        }
        for result in RELOAD_RESULTS {
            let _ = reloads.get_or_create(&ResultLabels { result });
        }
        for kind in upstream_error_kinds() {
            let _ = upstream_errors.get_or_create(&KindLabels { kind });
        }
        let m = Metrics {
            requests_allowed,
            bytes_up,
            bytes_down,
            requests,
            bytes,
            connects,
            reloads,
            upstream_errors,
            open_connections: Gauge::default(),
            open_tunnels: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests by decision and reason",
            m.requests.clone(),
        );
        registry.register(
            "connects",
            "CONNECTs by decision and reason",
            m.connects.clone(),
        );
        registry.register("reloads", "Routes reloads by result", m.reloads.clone());
        registry.register(
            "upstream_errors",
            "Upstream failures by kind (RFC 9209 error type)",
            m.upstream_errors.clone(),
        );
        registry.register("bytes", "Body bytes relayed, by direction", m.bytes.clone());
        registry.register(
            "open_connections",
            "Open agent connections",
            m.open_connections.clone(),
        );
        registry.register(
            "open_tunnels",
            "Open intercepted tunnels (TLS established)",
            m.open_tunnels.clone(),
        );
        // One series, at 1: the mode in force, so `report` is never run unseen.
        let modes: Family<ModeLabels, Gauge> = Family::default();
        modes
            .get_or_create(&ModeLabels {
                mode: mode.as_str(),
            })
            .set(1);
        registry.register(
            "mode",
            "The --mode in force (enforce or report), at 1",
            modes,
        );
        registry.register("leaf_cache_hits", "Leaf certificate cache hits", leaf_hits);
        registry.register(
            "leaf_cache_misses",
            "Leaf certificate cache misses (leaves minted)",
            leaf_misses,
        );
        Metrics { registry, ..m }
    }

    pub(crate) fn count_request(&self, decision: &'static str, reason: &'static str) {
        if (decision, reason) == ("allow", "ok") {
            self.requests_allowed.inc();
            return;
        }
        self.requests
            .get_or_create(&DecisionLabels { decision, reason })
            .inc();
    }

    pub(crate) fn count_connect(&self, decision: &'static str, reason: &'static str) {
        self.connects
            .get_or_create(&DecisionLabels { decision, reason })
            .inc();
    }

    pub(crate) fn count_reload(&self, ok: bool) {
        let [ok_result, error_result] = RELOAD_RESULTS;
        let result = if ok { ok_result } else { error_result };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    pub(crate) fn count_upstream_error(&self, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    pub(crate) fn count_bytes(&self, up: u64, down: u64) {
        self.bytes_up.inc_by(up);
        self.bytes_down.inc_by(down);
    }

    /// The Prometheus text exposition.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_of_the_vocabulary_is_there_at_zero() {
        let text = Metrics::new(Counter::default(), Counter::default(), Mode::Enforce).render();
        for line in [
            r#"egress_proxy_reloads_total{result="ok"} 0"#,
            r#"egress_proxy_reloads_total{result="error"} 0"#,
            r#"egress_proxy_requests_total{decision="allow",reason="ok"} 0"#,
            r#"egress_proxy_requests_total{decision="deny",reason="path_not_allowed"} 0"#,
            r#"egress_proxy_requests_total{decision="error",reason="upstream_timeout"} 0"#,
            r#"egress_proxy_connects_total{decision="deny",reason="host_not_allowed"} 0"#,
            r#"egress_proxy_connects_total{decision="allow",reason="tls_handshake_failed"} 0"#,
            r#"egress_proxy_requests_total{decision="report",reason="host_not_allowed"} 0"#,
            r#"egress_proxy_requests_total{decision="report",reason="path_not_allowed"} 0"#,
            r#"egress_proxy_requests_total{decision="report",reason="method_not_allowed"} 0"#,
            r#"egress_proxy_connects_total{decision="report",reason="host_not_allowed"} 0"#,
            r#"egress_proxy_mode{mode="enforce"} 1"#,
            r#"egress_proxy_upstream_errors_total{kind="dns_error"} 0"#,
            r#"egress_proxy_upstream_errors_total{kind="http_response_timeout"} 0"#,
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
        // Each upstream-side error kind has its series, and each code its request series.
        for &(_, reason) in REQUEST_SERIES {
            let label = format!("reason=\"{}\"", reason.label());
            assert!(text.contains(&label), "{label}");
        }
        for kind in [
            UpstreamDns,
            UpstreamRefused,
            UpstreamUnavailable,
            UpstreamTlsCertificate,
            UpstreamTlsProtocol,
            UpstreamConnectTimeout,
            UpstreamResponseTimeout,
            UpstreamBadResponse,
            UpstreamResponseHeadTooLarge,
        ] {
            let series = format!(
                "egress_proxy_upstream_errors_total{{kind=\"{}\"}} 0",
                kind.proxy_status_error()
            );
            assert!(text.contains(&series), "{series}");
            assert!(kind.is_upstream());
        }
    }

    #[test]
    fn renders_counters_with_fixed_labels() {
        let hits = Counter::default();
        let m = Metrics::new(hits.clone(), Counter::default(), Mode::Report);
        m.count_request("deny", "path_not_allowed");
        m.count_request("deny", "path_not_allowed");
        m.count_request("allow", "ok");
        m.count_request("report", "method_not_allowed");
        m.count_connect("report", "host_not_allowed");
        m.count_bytes(5, 7);
        m.count_reload(false);
        hits.inc();
        m.open_connections.inc();
        let text = m.render();
        assert!(
            text.contains(
                r#"egress_proxy_requests_total{decision="deny",reason="path_not_allowed"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"egress_proxy_requests_total{decision="allow",reason="ok"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"egress_proxy_requests_total{decision="report",reason="method_not_allowed"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"egress_proxy_connects_total{decision="report",reason="host_not_allowed"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"egress_proxy_bytes_total{direction="down"} 7"#),
            "{text}"
        );
        assert!(
            text.contains(r#"egress_proxy_reloads_total{result="error"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("egress_proxy_leaf_cache_hits_total 1"),
            "{text}"
        );
        assert!(text.contains("egress_proxy_open_connections 1"), "{text}");
        assert!(
            text.contains(r#"egress_proxy_mode{mode="report"} 1"#),
            "{text}"
        );
        assert!(!text.contains(r#"mode="enforce""#), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
