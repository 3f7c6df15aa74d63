//! Prometheus metrics (SPEC §6), encoded by `prometheus-client`.
//!
//! Labels carry only fixed vocabulary (decision, error code, result, direction): never a
//! host, path or header value, so a metric can neither leak a secret nor grow without
//! bound when an agent sprays names.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `allow`, `deny` or `error`.
    pub decision: &'static str,
    /// The error code of SPEC §4 (`path_not_allowed`, …), or `ok`.
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// The RFC 9209 error type (`dns_error`, `tls_certificate_error`, …).
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `up` (agent to upstream) or `down`.
    pub direction: &'static str,
}

/// Every metric the proxy keeps.
#[derive(Debug)]
pub struct Metrics {
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
    pub fn new(leaf_hits: Counter, leaf_misses: Counter) -> Metrics {
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
        let m = Metrics {
            requests_allowed,
            bytes_up,
            bytes_down,
            requests,
            bytes,
            connects: Family::default(),
            reloads: Family::default(),
            upstream_errors: Family::default(),
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
        registry.register("leaf_cache_hits", "Leaf certificate cache hits", leaf_hits);
        registry.register(
            "leaf_cache_misses",
            "Leaf certificate cache misses (leaves minted)",
            leaf_misses,
        );
        Metrics { registry, ..m }
    }

    pub fn count_request(&self, decision: &'static str, reason: &'static str) {
        if (decision, reason) == ("allow", "ok") {
            self.requests_allowed.inc();
            return;
        }
        self.requests
            .get_or_create(&DecisionLabels { decision, reason })
            .inc();
    }

    pub fn count_connect(&self, decision: &'static str, reason: &'static str) {
        self.connects
            .get_or_create(&DecisionLabels { decision, reason })
            .inc();
    }

    pub fn count_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn count_upstream_error(&self, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    pub fn count_bytes(&self, up: u64, down: u64) {
        self.bytes_up.inc_by(up);
        self.bytes_down.inc_by(down);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
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
    fn renders_counters_with_fixed_labels() {
        let hits = Counter::default();
        let m = Metrics::new(hits.clone(), Counter::default());
        m.count_request("deny", "path_not_allowed");
        m.count_request("deny", "path_not_allowed");
        m.count_request("allow", "ok");
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
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
