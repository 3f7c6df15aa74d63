#!/usr/bin/env python3
"""Writes docs/benchmarks.md from docs/benchmarks.json (what bench/bench measured).
Kept apart from the measuring so the page can be re-rendered without a new run
(`bench/bench_report.py [JSON [PAGE]]`). A figure the JSON does not hold (a peer left
out, a row added after that run) reads "not measured"."""
import json
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MITM = "11.0.2"
PEERS = (("mitm", "mitmproxy"), ("nginx", "nginx"))
NOT_MEASURED = "not measured"


def get(d, *keys):
    """d[k1][k2]..., or None where any is missing."""
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def met(ok):
    return "—" if ok is None else ("yes" if ok else "**no**")


def main():
    # Optional arguments, for looking at another run's figures: the JSON to read and the
    # page to write.
    source = sys.argv[1] if len(sys.argv) > 1 else f"{ROOT}/docs/benchmarks.json"
    target = sys.argv[2] if len(sys.argv) > 2 else f"{ROOT}/docs/benchmarks.md"
    with open(source) as f:
        r = json.load(f)
    peers = [(key, name) for key, name in PEERS if get(r, "keepalive_c32", key) is not None
             or get(r, "sidecar", key) is not None]
    rows = []

    def ratio_row(name, key, unit, goal, goal_value, fmt, scale=1.0, cpu=None):
        d = r[key]
        direct = d["direct"][unit] * scale
        egress = d["egress"][unit] * scale
        ratio = egress / direct
        cells = [name, fmt(direct), fmt(egress), f"{ratio:.2f}", goal, met(ratio >= goal_value)]
        for peer, _ in peers:
            v = get(d, peer, unit)
            cells += [fmt(v * scale), f"{v * scale / direct:.2f}"] if v is not None else [NOT_MEASURED, ""]
        cells.append(cpu(d) if cpu else "")
        rows.append(cells)

    def peer_cpu(d, f):
        shown = [f(d[p]) for p, _ in peers if get(d, p) is not None]
        return f" ({', '.join(shown)})" if shown else ""

    per_req = lambda d: f"{d['egress']['cpu_us']:.1f} µs" + peer_cpu(d, lambda x: f"{x['cpu_us']:.0f} µs")
    per_gib = lambda d: (f"{d['egress']['cpu_s_per_gib']:.2f} s/GiB, +{d['egress']['rss_growth_kib'] / 1024:.1f} MiB"
                         + peer_cpu(d, lambda x: f"{x['cpu_s_per_gib']:.1f} s/GiB, +{x['rss_growth_kib'] / 1024:.1f} MiB"))
    reqs = lambda v: f"{v:,.0f} req/s"
    mibs = lambda v: f"{v:,.0f} MiB/s"
    ratio_row("small GET, keep-alive, 32 connections", "keepalive_c32", "rps", "≥ 0.45", 0.45, reqs, cpu=per_req)
    ratio_row("new connection + TLS per request (a CONNECT each through a forward proxy; leaf cached), 8 connections",
              "new_connection_c8", "rps", "≥ 0.80", 0.80, reqs, cpu=per_req)
    ratio_row("1 GiB download", "download", "bytes_per_s", "≥ 0.55", 0.55, mibs, scale=1 / 2**20, cpu=per_gib)
    ratio_row("1 GiB upload", "upload", "bytes_per_s", "≥ 0.55", 0.55, mibs, scale=1 / 2**20, cpu=per_gib)

    header = ["workload", "direct", "egress-proxy", "ratio", "goal", "met"]
    for _, name in peers:
        header += [name, f"{name} ratio"]
    header.append("egress-proxy CPU, private memory growth (" + ", ".join(n for _, n in peers) + ")"
                  if peers else "egress-proxy CPU, private memory growth")
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(c) + " |" for c in rows]

    def other_row(name, egress, goal, ok, peer_cell):
        cells = [name, egress, goal, met(ok)] + [peer_cell(p) for p, _ in peers]
        return "| " + " | ".join(cells) + " |"

    sse = r["sse"]
    added = sse["egress"]["p99_ms"] - sse["direct"]["p99_ms"]
    mint, mint_cpu = r["mint_extra_us"], r["mint_extra_cpu_us"]
    idle = r["idle_connections"]
    rl = r["reload"]
    rl_ratio = rl["p99_reloading_ms"] / rl["p99_quiet_ms"]
    lat = r.get("latency_1000rps_c8")

    def idle_cell(x):
        anon = x.get("anon_kib_per_connection")
        rss = x.get("rss_kib_per_connection", x.get("kib_per_connection"))
        return (f"{anon:.1f} KiB each (VmRSS {rss:.1f})" if anon is not None
                else f"{NOT_MEASURED} (VmRSS {rss:.1f} KiB each)")

    def added_latency(name):
        if not lat or name not in lat:
            return NOT_MEASURED

        def added(q):
            through, direct = lat[name][q], lat["direct"][q]
            if through >= direct:
                return f"+{through - direct:.2f} ms"
            # A direct run's stall can make its percentile the larger: no figure to
            # subtract, so both are shown.
            return f"none measurable ({through:.2f} ms through it, {direct:.2f} ms direct)"
        return f"{added('p50_ms')} / {added('p99_ms')}"

    egress_idle_anon = idle["egress"].get("anon_kib_per_connection")
    other = [
        "| workload | egress-proxy | goal | met | " + " | ".join(n for _, n in peers) + " |",
        "|---|---|---|---|" + "---|" * len(peers),
        other_row("first contact with a new host (leaf minted): extra handshake time seen by the client "
                  "(extra proxy CPU)",
                  # round(), not :.0f, which prints a difference of -0.4 µs as "-0".
                  f"{round(mint['egress'])} µs ({round(mint_cpu['egress'])} µs)", "≤ 50 µs", mint["egress"] <= 50,
                  lambda p: f"{round(mint[p])} µs ({round(mint_cpu[p])} µs)" if p in mint
                  else ("one certificate of its own" if p == "nginx" else NOT_MEASURED)),
        other_row(f"added latency at {1000:,} req/s over 8 keep-alive connections: p50 / p99",
                  added_latency("egress"), "", None,
                  lambda p: added_latency(p) if p != "mitm" else "cannot sustain the rate"),
        other_row("SSE, one event every 100 ms: added latency p99 (p50)",
                  f"{added:.2f} ms ({sse['egress']['p50_ms'] - sse['direct']['p50_ms']:.2f} ms); most events in "
                  f"one read: {sse['egress']['most_events_per_read']}", "≤ 1 ms, no batching",
                  added <= 1 and sse["egress"]["most_events_per_read"] == 1,
                  lambda p: (f"{sse[p]['p99_ms'] - sse['direct']['p99_ms']:.2f} ms "
                             f"({sse[p]['p50_ms'] - sse['direct']['p50_ms']:.2f} ms)") if p in sse else NOT_MEASURED),
        other_row(f"{idle['egress']['connections']} idle connections through the proxy (TLS, one request each): "
                  "private memory (RssAnon) each", idle_cell(idle["egress"]), "≤ 24 KiB",
                  None if egress_idle_anon is None else egress_idle_anon <= 24,
                  lambda p: idle_cell(idle[p]) if p in idle else NOT_MEASURED),
        other_row("keep-alive load while routes reload every 100 ms: errors, p99 vs no reload",
                  f"{rl['errors']} errors over {rl['reloads']} reloads; p99 {rl['p99_reloading_ms']:.2f} ms vs "
                  f"{rl['p99_quiet_ms']:.2f} ms ({rl_ratio:.2f}×)", "0 errors, p99 ≤ 1.10×",
                  rl["errors"] == 0 and rl_ratio <= 1.10, lambda p: ""),
    ]

    sc = r["sidecar"]
    e = sc["egress"]
    mib = lambda v: f"{v / 1024:.1f} MiB" if v is not None else NOT_MEASURED

    def sidecar_row(name, egress, goal, ok, peer_cell):
        return other_row(name, egress, goal, ok, lambda p: peer_cell(sc[p]) if p in sc else NOT_MEASURED)

    anon = e.get("rss_anon_kib")
    # A run from before the warm-up measured a process that had served nothing.
    vm_rss = lambda x: mib(x["vm_rss_kib"]) if "vm_rss_kib" in x else f"{mib(x.get('idle_rss_kib'))} (cold, no warm-up)"
    sizes = {"mitm": lambda v: f"{v / 1e6:.0f} MB (virtualenv)", "nginx": lambda v: f"{v / 1e6:.1f} MB (binary, "
             "without its shared libraries)"}
    sidecar = [
        "| per sidecar | egress-proxy | goal | met | " + " | ".join(n for _, n in peers) + " |",
        "|---|---|---|---|" + "---|" * len(peers),
        sidecar_row("warm idle process (routes loaded, CA present, 100 requests over 10 hosts served, then 2 s "
                    "idle): private memory, RssAnon", mib(anon), "≤ 4 MiB", None if anon is None else anon <= 4096,
                    lambda x: mib(x.get("rss_anon_kib"))),
        sidecar_row("the same: Pss (shared pages divided among the processes that map them)", mib(e.get("pss_kib")),
                    "", None, lambda x: mib(x.get("pss_kib"))),
        sidecar_row("the same: VmRSS, for reference (mostly program text that every sidecar of one image shares)",
                    vm_rss(e), "", None, vm_rss),
        sidecar_row("start to ready (`/readyz` 200) with an existing CA", f"{e['startup_ms']:.1f} ms", "≤ 50 ms",
                    e["startup_ms"] <= 50, lambda x: f"{x['startup_ms']:.0f} ms (port open)"),
        other_row("release binary, stripped (what the image carries)", f"{e['size_bytes'] / 1e6:.1f} MB", "≤ 15 MB",
                  e["size_bytes"] <= 15e6, lambda p: sizes[p](sc[p]["size_bytes"]) if p in sc else NOT_MEASURED),
        other_row("private memory (RssAnon) after all the load above",
                  mib(r.get("anon_after_load_kib")) + f" (VmRSS {mib(r['rss_after_load_kib'])})", "", None,
                  lambda p: ""),
    ]
    machine = (f"{os.cpu_count()} cores, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} "
               f"GiB, {platform.machine()}")
    reload_pairs = r["reload"].get("pairs", r["runs"])
    text = f"""# Benchmarks

Command: `bench/bench` (here `BENCH_RUNS={r['runs']} BENCH_SECONDS={r['seconds']}`: request rates are
the medians of {r['runs']} runs of {r['seconds']} s each, transfers the medians of {r['runs']} runs; the reload row's
p99s the medians of {reload_pairs} alternated pairs of runs, as one run's p99 moves by about as much as its goal
allows). Machine: {machine}, shared by client, origin and proxy; loopback only. Clients: `oha` for
request load, curl for transfers, small Python clients (in `bench/bench.py`) for SSE,
leaf minting, idle connections and the warm-up. Origin: `examples/bench_origin.rs` (hyper + rustls,
one single-threaded runtime per core, offers h2 and http/1.1). egress-proxy: the release build, logging every
request at `info` to a file, as deployed. Ratio = through the proxy ÷ direct, measured in the same run, with the
runs of the targets alternated (direct, egress-proxy, its peers, direct, ...) so that the machine's drift falls on
all of them. CPU is the proxy's processes' user + system time. Memory is private memory (`RssAnon` of
`/proc/PID/status`), which is what each more sidecar costs a host; `Pss` (`/proc/PID/smaps_rollup`) and `VmRSS`
are beside it for reference: most of `VmRSS` is program text that the page cache shares between every sidecar
started from one image. The raw figures are in `docs/benchmarks.json`; what was changed or dropped because of
these figures, and the figure that decided it, is in [`decisions.md`](decisions.md).

Peers, doing the same work per request:
- mitmproxy {MITM} in regular mode with `bench/bench_mitm_addon.py`: the same allowlist and header injection,
  bodies streamed. A forward proxy taking CONNECT, like egress-proxy.
- nginx (Debian's `nginx-light`), one worker process: TLS from the client (TLS 1.3, AES-128-GCM preferred, as
  egress-proxy prefers it), `proxy_set_header Authorization`, verified TLS to the origin
  (`proxy_ssl_verify on` with the bench's origin CA) over a keep-alive pool of HTTP/1.1 connections, bodies
  unbuffered both ways in reads of up to 64 KiB (egress-proxy's read-ahead size), one access-log line per request written in 16 KiB batches, as egress-proxy batches its
  audit lines (the configuration is `nginx_conf` in `bench/bench.py`). nginx cannot take CONNECT, so the
  clients talk TLS to it directly, as to a reverse proxy: no CONNECT exchange, one certificate of its own (no leaf
  minted per host, no first-contact row), no routes (no host, path or method check), and HTTP/1.1 to the origin
  where egress-proxy multiplexes HTTP/2. It is the floor of what a TLS-terminating hop costs, not a drop-in
  alternative. Its size is the `nginx` binary alone; it also loads OpenSSL, PCRE and zlib.

{chr(10).join(table)}

{chr(10).join(other)}

{chr(10).join(sidecar)}
"""
    with open(target, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
