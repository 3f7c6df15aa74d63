#!/usr/bin/env python3
"""Writes docs/benchmarks.md from docs/benchmarks.json (what bench/bench measured).
Kept apart from the measuring so the page can be re-rendered without a new run."""
import json
import os
import platform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    with open(f"{ROOT}/docs/benchmarks.json") as f:
        r = json.load(f)
    mitm = "mitm" in r["keepalive_c32"]
    rows = []

    def ratio_row(name, key, unit, goal, goal_value, fmt, scale=1.0, cpu=None):
        d = r[key]
        direct = d["direct"][unit] * scale
        egress = d["egress"][unit] * scale
        ratio = egress / direct
        cells = [name, fmt(direct), fmt(egress), f"{ratio:.2f}", goal, "yes" if ratio >= goal_value else "**no**"]
        if mitm:
            cells += [fmt(d["mitm"][unit] * scale), f"{d['mitm'][unit] * scale / direct:.2f}"]
        cells.append(cpu(d) if cpu else "")
        rows.append(cells)

    per_req = lambda d: f"{d['egress']['cpu_us']:.1f} µs" + (f" ({d['mitm']['cpu_us']:.0f} µs)" if mitm else "")
    per_gib = lambda d: (f"{d['egress']['cpu_s_per_gib']:.2f} s/GiB, RSS +{d['egress']['rss_growth_kib'] / 1024:.1f} MiB"
                         + (f" ({d['mitm']['cpu_s_per_gib']:.1f} s/GiB, +{d['mitm']['rss_growth_kib'] / 1024:.1f} MiB)" if mitm else ""))
    reqs = lambda v: f"{v:,.0f} req/s"
    mibs = lambda v: f"{v:,.0f} MiB/s"
    ratio_row("small GET, keep-alive, 32 connections", "keepalive_c32", "rps", "≥ 0.45", 0.45, reqs, cpu=per_req)
    ratio_row("new CONNECT + TLS per request (leaf cached), 8 connections", "new_connection_c8", "rps", "≥ 0.80", 0.80,
              reqs, cpu=per_req)
    ratio_row("1 GiB download", "download", "bytes_per_s", "≥ 0.55", 0.55, mibs, scale=1 / 2**20, cpu=per_gib)
    ratio_row("1 GiB upload", "upload", "bytes_per_s", "≥ 0.55", 0.55, mibs, scale=1 / 2**20, cpu=per_gib)

    header = ["workload", "direct", "egress-proxy", "ratio", "goal", "met"]
    if mitm:
        header += ["mitmproxy", "mitmproxy ratio"]
    header.append("egress-proxy CPU (mitmproxy)")
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(c) + " |" for c in rows]

    sse = r["sse"]
    added = sse["egress"]["p99_ms"] - sse["direct"]["p99_ms"]
    mint = r["mint_extra_us"]
    mint_cpu = r["mint_extra_cpu_us"]
    idle = r["idle_connections"]
    rl = r["reload"]
    rl_ratio = rl["p99_reloading_ms"] / rl["p99_quiet_ms"]
    other = [
        "| workload | egress-proxy | goal | met | mitmproxy |",
        "|---|---|---|---|---|",
        f"| first contact with a new host (leaf minted): extra handshake time seen by the client (extra proxy CPU) | "
        # round(), not :.0f, which prints a difference of -0.4 µs as "-0".
        f"{round(mint['egress'])} µs ({round(mint_cpu['egress'])} µs) | ≤ 50 µs | "
        f"{'yes' if mint['egress'] <= 50 else '**no**'} | "
        + (f"{round(mint['mitm'])} µs ({round(mint_cpu['mitm'])} µs)" if mitm else "") + " |",
        f"| SSE, one event every 100 ms: added latency p99 (p50) | {added:.2f} ms ({sse['egress']['p50_ms'] - sse['direct']['p50_ms']:.2f} ms); "
        f"most events in one read: {sse['egress']['most_events_per_read']} | ≤ 1 ms, no batching | "
        f"{'yes' if added <= 1 and sse['egress']['most_events_per_read'] == 1 else '**no**'} | "
        + (f"{sse['mitm']['p99_ms'] - sse['direct']['p99_ms']:.2f} ms ({sse['mitm']['p50_ms'] - sse['direct']['p50_ms']:.2f} ms)" if mitm else "") + " |",
        f"| {idle['egress']['connections']} idle intercepted connections: extra RSS | {idle['egress']['kib_per_connection']:.1f} KiB each | "
        f"≤ 24 KiB | {'yes' if idle['egress']['kib_per_connection'] <= 24 else '**no**'} | "
        + (f"{idle['mitm']['kib_per_connection']:.1f} KiB each" if mitm else "") + " |",
        f"| keep-alive load while routes reload every 100 ms: errors, p99 vs no reload | {rl['errors']} errors over "
        f"{rl['reloads']} reloads; p99 {rl['p99_reloading_ms']:.2f} ms vs {rl['p99_quiet_ms']:.2f} ms ({rl_ratio:.2f}×) | "
        f"0 errors, p99 ≤ 1.10× | {'yes' if rl['errors'] == 0 and rl_ratio <= 1.10 else '**no**'} | |",
    ]

    sc = r["sidecar"]
    e, m = sc["egress"], sc.get("mitm")
    mi = lambda key, f: f(m[key]) if m else ""
    sidecar = [
        "| per sidecar | egress-proxy | goal | met | mitmproxy |",
        "|---|---|---|---|---|",
        f"| idle process, routes loaded, CA present: RSS | {e['idle_rss_kib'] / 1024:.1f} MiB | ≤ 8 MiB | "
        f"{'yes' if e['idle_rss_kib'] <= 8 * 1024 else '**no**'} | {mi('idle_rss_kib', lambda v: f'{v / 1024:.1f} MiB')} |",
        f"| start to ready (`/readyz` 200) with an existing CA | {e['startup_ms']:.1f} ms | ≤ 50 ms | "
        f"{'yes' if e['startup_ms'] <= 50 else '**no**'} | {mi('startup_ms', lambda v: f'{v:.0f} ms (port open)')} |",
        f"| release binary, stripped (what the image carries) | {e['size_bytes'] / 1e6:.1f} MB | ≤ 15 MB | "
        f"{'yes' if e['size_bytes'] <= 15e6 else '**no**'} | {mi('size_bytes', lambda v: f'{v / 1e6:.0f} MB (virtualenv)')} |",
        f"| RSS after all the load above | {r['rss_after_load_kib'] / 1024:.1f} MiB | | | |",
    ]

    machine = f"{os.cpu_count()} cores, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, {platform.machine()}"
    text = f"""# Benchmarks

Command: `bench/bench` (here `BENCH_RUNS={r['runs']} BENCH_SECONDS={r['seconds']}`: request rates are
the medians of {r['runs']} runs of {r['seconds']} s each, transfers the medians of {r['runs']} runs; the reload row's
p99s the medians of {r['reload'].get('pairs', r['runs'])} alternated pairs of runs, as one run's p99 moves by about as much as its goal allows).
Machine: {machine}, shared by client, origin and proxy; loopback only. Clients: `oha` for
request load, curl for transfers, small Python clients (in `bench/bench.py`) for SSE,
leaf minting and idle connections. Origin: `examples/bench_origin.rs` (hyper + rustls,
one single-threaded runtime per core, offers h2 and http/1.1). egress-proxy: the release build, logging every request at `info`
to a file, as deployed. mitmproxy {MITM} in regular mode with `bench/bench_mitm_addon.py`
(the same allowlist and header injection, bodies streamed). Ratio = through the proxy ÷
direct, measured in the same run, with the runs of the targets alternated (direct,
egress-proxy, mitmproxy, direct, ...) so that the machine's drift falls on all of them.
CPU is the proxy process's user + system time.
The raw figures are in `docs/benchmarks.json`.

{chr(10).join(table)}

{chr(10).join(other)}

{chr(10).join(sidecar)}
"""
    notes_path = f"{ROOT}/docs/benchmarks-notes.md"
    if os.path.exists(notes_path):
        with open(notes_path) as f:
            text += "\n" + f.read()
    with open(f"{ROOT}/docs/benchmarks.md", "w") as f:
        f.write(text)


MITM = "11.0.2"

if __name__ == "__main__":
    main()
