//! The audit log's schema (SPEC §6): one `connect` event per CONNECT and one `request`
//! event per request, written from here only, so every path writes the same fields in
//! the same order and a log reader never meets an event shaped differently. A field that
//! does not apply (no route matched, no reason for an allowed request) is left out.
//!
//! The events hold what the proxy decided and measured: names, numbers and fixed codes,
//! never a header value, a token or a query (the path comes without its query).

/// The `target` of audit events: `RUST_LOG=egress_proxy::audit=info` selects them.
pub(crate) const TARGET: &str = "egress_proxy::audit";

/// One CONNECT: logged when its tunnel closes, with what it carried, or at once when it
/// is refused.
#[derive(Debug)]
pub(crate) struct ConnectEvent<'a> {
    pub(crate) conn: u64,
    pub(crate) client: &'a str,
    /// As the agent named it (printable, bounded, without userinfo); empty when the
    /// CONNECT was never read (refused at the connection cap).
    pub(crate) host: &'a str,
    pub(crate) port: u16,
    pub(crate) decision: &'static str,
    pub(crate) reason: Option<&'static str>,
    /// Why, for people.
    pub(crate) detail: Option<&'a str>,
    /// The SNI of a misdirected handshake.
    pub(crate) sni: Option<&'a str>,
    pub(crate) status: u16,
    pub(crate) bytes_up: u64,
    pub(crate) bytes_down: u64,
    pub(crate) duration_ms: u64,
}

impl ConnectEvent<'_> {
    pub(crate) fn log(&self) {
        tracing::info!(
            target: TARGET,
            event = "connect",
            conn = self.conn,
            client = self.client,
            host = self.host,
            port = self.port,
            decision = self.decision,
            reason = self.reason,
            detail = self.detail,
            sni = self.sni,
            status = self.status,
            bytes_up = self.bytes_up,
            bytes_down = self.bytes_down,
            duration_ms = self.duration_ms,
        );
    }
}

/// One request: logged when its response has been sent (or the request ended).
#[derive(Debug)]
pub(crate) struct RequestEvent<'a> {
    pub(crate) conn: u64,
    pub(crate) client: &'a str,
    pub(crate) host: &'a str,
    pub(crate) port: u16,
    pub(crate) method: &'a str,
    /// Without its query: a query is never logged.
    pub(crate) path: &'a str,
    /// The route's index in the routes file, when one matched.
    pub(crate) route: Option<usize>,
    pub(crate) decision: &'static str,
    pub(crate) reason: Option<&'static str>,
    /// Why it was refused or failed, or why its response was cut short.
    pub(crate) detail: Option<&'a str>,
    pub(crate) status: u16,
    pub(crate) bytes_up: u64,
    pub(crate) bytes_down: u64,
    pub(crate) duration_ms: u64,
}

impl RequestEvent<'_> {
    pub(crate) fn log(&self) {
        tracing::info!(
            target: TARGET,
            event = "request",
            conn = self.conn,
            client = self.client,
            host = self.host,
            port = self.port,
            method = self.method,
            path = self.path,
            route = self.route,
            decision = self.decision,
            reason = self.reason,
            detail = self.detail,
            status = self.status,
            bytes_up = self.bytes_up,
            bytes_down = self.bytes_down,
            duration_ms = self.duration_ms,
        );
    }
}
