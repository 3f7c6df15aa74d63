#!/usr/bin/env python3
"""A/B of egress-proxy builds: several binaries against one origin, their runs alternated
(A, B, A, B, ...) so that the machine's drift falls on each alike; prints medians. For
measuring one change at a time, which `bench/bench` (every workload, once) cannot
resolve on a shared machine. Loopback only, bounded like bench/bench.py.

    bench/bench_ab.py BIN_A,BIN_B [keepalive|newconn|download|upload|idle|mint]

A BIN named `direct` is the client talking to the origin itself (keepalive, newconn,
download, upload), for the ratio the issue's goals are stated in. `BIN+limits` is BIN with
the benchmarked route given a `rate_limit` and a `max_body_bytes` that the load never
reaches: what checking a route's limits costs.

Environment: AB_ROUNDS (4), AB_SECONDS (6) per oha run, AB_MIB (1024) per transfer,
BENCH_IDLE_CONNECTIONS (1000). Build the origin first: cargo build --release --example
bench_origin.
"""
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ["BENCH_MITM"] = "0"
os.environ["BENCH_NGINX"] = "0"
import bench  # noqa: E402


def main():
    bins = sys.argv[1].split(",")
    mode = sys.argv[2] if len(sys.argv) > 2 else "keepalive"
    rounds = int(os.environ.get("AB_ROUNDS", "4"))
    seconds = int(os.environ.get("AB_SECONDS", "6"))
    size = int(os.environ.get("AB_MIB", "1024")) * 2**20
    if "direct" in bins and mode in ("idle", "mint"):
        raise SystemExit(f"`direct` has no proxy to measure in {mode} mode")
    work = tempfile.mkdtemp(prefix="egress-ab-")
    try:
        setup = bench.Setup(work)
        proxies = []
        for b in bins:
            if b == "direct":
                proxies.append((b, None, None))
                continue
            binary, routes = bench.variant(setup, b)
            bench.BIN = binary
            port = bench.free_port()
            p = setup.start_egress(port, bench.free_port(), routes=routes)
            bench.wait_port(port)
            proxies.append((b, port, p))
        time.sleep(0.5)
        figures = {b: [] for b in bins}
        load = ["-c", "32"] if mode == "keepalive" else ["-c", "8", "--disable-keepalive"]
        for _ in range(rounds):
            for b, port, p in proxies:
                cpu = (lambda: bench.cpu_seconds(p.pid)) if p else (lambda: 0.0)
                c0 = cpu()
                if port:
                    via, ca, host = ["-x", f"http://127.0.0.1:{port}"], setup.bottle_ca, "localhost"
                else:
                    via, ca, host = [], setup.origin_ca, "127.0.0.1"
                if mode in ("keepalive", "newconn"):
                    r = bench.oha(load + via + ["--cacert", ca, f"https://{host}:{setup.oport}/small"],
                                  seconds=seconds)
                    figures[b].append((r["rps"], (cpu() - c0) / max(r["n"], 1) * 1e6))
                elif mode in ("download", "upload"):
                    kw = {"download_bytes": size} if mode == "download" else {"upload_bytes": size}
                    speed = bench.curl_transfer(port, ca, host, setup.oport, **kw)
                    figures[b].append((speed / 2**20, (cpu() - c0) / (size / 2**30)))
                elif mode in ("idle", "mint"):
                    setup.targets = lambda port=port, p=p: [bench.Target("egress", port, setup.bottle_ca,
                                                                         "localhost", [p.pid])]
                    out = {}
                    if mode == "idle":
                        bench.measure_idle_connections(setup, out)
                        figures[b].append((out["idle_connections"]["egress"]["anon_kib_per_connection"], 0.0))
                    else:
                        # Host names of their own per round, so every round mints anew.
                        setup.hosts = [f"h{i}-r{len(figures[b])}.bench.test" for i in range(200)]
                        bench.measure_mint(setup, out)
                        figures[b].append((out["mint_extra_us"]["egress"], out["mint_extra_cpu_us"]["egress"]))
                else:
                    raise SystemExit(f"unknown mode {mode}")
        unit = {"keepalive": ("req/s", "µs CPU/request"), "newconn": ("req/s", "µs CPU/request"),
                "download": ("MiB/s", "s CPU/GiB"), "upload": ("MiB/s", "s CPU/GiB"),
                "idle": ("KiB RssAnon/connection", ""),
                "mint": ("µs extra handshake time for a new host", "µs extra CPU")}[mode]
        for b in bins:
            a = [x for x, _ in figures[b]]
            c = [y for _, y in figures[b]]
            line = f"{b}: median {statistics.median(a):,.1f} {unit[0]}"
            if unit[1] and b != "direct":
                line += f", {statistics.median(c):.2f} {unit[1]}"
            print(line + f"  (runs: {[round(x, 1) for x in a]})")
    finally:
        bench.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
