"""mitmproxy addon for bench/bench: what egress-proxy does, done the mitmproxy way, so the
two are compared doing the same work. Allowlist of host:port (CONNECT and each request),
the agent's Authorization replaced by the route's token, bodies streamed both ways.

Configuration through the environment: BENCH_ALLOW ("host:port,host:port"), BENCH_TOKEN,
BENCH_PINNED (a prefix: hosts whose first label starts with it are sent to 127.0.0.1, as
egress-proxy's --resolve pins them; the bench's names are in no DNS).
"""
import os

from mitmproxy import http

ALLOW = {entry.strip() for entry in os.environ.get("BENCH_ALLOW", "").split(",") if entry.strip()}
TOKEN = os.environ.get("BENCH_TOKEN", "")
PINNED = os.environ.get("BENCH_PINNED", "")


def _allowed(host, port):
    if f"{host}:{port}" in ALLOW:
        return True
    # "*.example.test:443" allows the subdomains of example.test on that port.
    return any(entry.startswith("*.") and f"{host}:{port}".endswith(entry[1:]) for entry in ALLOW)


def http_connect(flow: http.HTTPFlow):
    if not _allowed(flow.request.host, flow.request.port):
        flow.response = http.Response.make(403, b'{"error":"host_not_allowed"}', {"content-type": "application/json"})


def requestheaders(flow: http.HTTPFlow):
    # Stream the request body instead of buffering it.
    flow.request.stream = True


def request(flow: http.HTTPFlow):
    if not _allowed(flow.request.pretty_host, flow.request.port):
        flow.response = http.Response.make(403, b'{"error":"host_not_allowed"}', {"content-type": "application/json"})
        return
    flow.request.headers.pop("proxy-authorization", None)
    flow.request.headers["authorization"] = f"Bearer {TOKEN}"
    if PINNED and flow.request.pretty_host.startswith(PINNED):
        # The origin's certificate names 127.0.0.1 too, so the upstream TLS is still verified.
        flow.request.host = "127.0.0.1"


def responseheaders(flow: http.HTTPFlow):
    flow.response.stream = True
