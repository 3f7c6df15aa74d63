#!/usr/bin/env python3
"""Benchmarks: each workload direct (client -> origin) and through egress-proxy, in one
run, on loopback; writes docs/benchmarks.md. Run by scripts/bench.

Uses oha (installed from crates.io if missing) for request load and the repo's own
examples/bench_origin.rs as the origin. Every loop is bounded in count and time.
"""
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = f"{ROOT}/target/release/egress-proxy"
ORIGIN = f"{ROOT}/target/release/examples/bench_origin"
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
procs = []


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, timeout=15.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.01)
    raise SystemExit(f"port {port} never opened")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def readyz_ok(port):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=0.5)
        s.sendall(b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        ok = s.recv(12).endswith(b"200")
        s.close()
        return ok
    except OSError:
        return False


def start_proxy(work, routes, env_extra, port, admin):
    env = dict(os.environ, EGRESS_PROXY_TOKEN_0="bench-token", **env_extra)
    for k in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        env.pop(k, None)
    p = subprocess.Popen([BIN, "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}", "--routes", routes,
                          "--ca-dir", f"{work}/ca", "--upstream-ca", f"{work}/origin-ca.pem"],
                         env=env, stdout=subprocess.DEVNULL, stderr=open(f"{work}/proxy.log", "a"))
    procs.append(p)
    return p


def oha(args):
    out = subprocess.run(["oha", "--no-tui", "--output-format", "json", "-z", f"{SECONDS}s"] + args,
                         capture_output=True, text=True, timeout=SECONDS + 60)
    if out.returncode != 0:
        raise SystemExit(f"oha failed: {out.stderr}")
    d = json.loads(out.stdout)
    summary = d["summary"]
    codes = d.get("statusCodeDistribution", {})
    return summary["requestsPerSec"], sum(codes.values()), codes, d.get("latencyPercentiles", {})


def main():
    if not shutil.which("oha"):
        subprocess.run(["cargo", "install", "--locked", "oha"], check=True)
    for target in (["--bin", "egress-proxy"], ["--example", "bench_origin"]):
        subprocess.run(["cargo", "build", "--release", "--locked"] + target, cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="egress-bench-")
    results = {}
    try:
        oport = free_port()
        procs.append(subprocess.Popen([ORIGIN, str(oport), f"{work}/origin-ca.pem"]))
        wait_port(oport)
        hosts = [f"h{i}.bench.test" for i in range(200)]
        routes = f"{work}/routes.yaml"
        with open(routes, "w") as f:
            # oha resolves the target name even through a proxy, so the proxied URL
            # names `localhost` (pinned by --resolve, as an operator would pin it).
            f.write(f"routes:\n  - host: localhost\n    ports: [{oport}]\n    auth_scheme: Bearer\n    token_env: EGRESS_PROXY_TOKEN_0\n"
                    f"  - host: \"*.bench.test\"\n    ports: [{oport}]\n")
        resolve = ",".join([f"localhost:{oport}:127.0.0.1"] + [f"{h}:{oport}:127.0.0.1" for h in hosts])
        env = {"EGRESS_PROXY_RESOLVE": resolve}

        # Start to ready with an existing CA (the first start mints it).
        first = start_proxy(work, routes, env, free_port(), free_port())
        time.sleep(0.5)
        first.kill(); first.wait()
        startups = []
        for _ in range(10):
            port, admin = free_port(), free_port()
            t0 = time.perf_counter()
            p = start_proxy(work, routes, env, port, admin)
            deadline = t0 + 10
            while not readyz_ok(admin) and time.perf_counter() < deadline:
                time.sleep(0.001)
            startups.append((time.perf_counter() - t0) * 1000)
            p.kill(); p.wait()
        results["startup_ms"] = statistics.median(startups)

        pport, padmin = free_port(), free_port()
        proxy = start_proxy(work, routes, env, pport, padmin)
        wait_port(pport)
        time.sleep(1.0)
        results["idle_rss_kib"] = rss_kib(proxy.pid)
        bottle_ca = f"{work}/ca/ca-cert.pem"

        # First contact with a new host (leaf minted) vs the same host again (cached):
        # CONNECT + TLS handshake time, medians over 200 hosts.
        ctx = ssl.create_default_context(cafile=bottle_ca)

        def handshake(host):
            s = socket.create_connection(("127.0.0.1", pport))
            t0 = time.perf_counter()
            s.sendall(f"CONNECT {host}:{oport} HTTP/1.1\r\nHost: {host}:{oport}\r\n\r\n".encode())
            s.recv(100)
            t = ctx.wrap_socket(s, server_hostname=host)
            dt = time.perf_counter() - t0
            t.close()
            return dt

        new = [handshake(h) for h in hosts]
        cached = [handshake(h) for h in hosts]
        results["mint_extra_us"] = (statistics.median(new) - statistics.median(cached)) * 1e6

        def measure(label, direct_args, proxy_args):
            direct, through, cpu_per_req = [], [], []
            for _ in range(RUNS):
                direct.append(oha(direct_args)[0])
                c0 = cpu_seconds(proxy.pid)
                rps, n, codes, _ = oha(proxy_args)
                c1 = cpu_seconds(proxy.pid)
                bad = {k: v for k, v in codes.items() if k != "200"}
                if bad:
                    raise SystemExit(f"{label}: non-200 answers {bad}")
                through.append(rps)
                cpu_per_req.append((c1 - c0) / max(n, 1) * 1e6)
            results[label] = {
                "direct_rps": statistics.median(direct),
                "proxy_rps": statistics.median(through),
                "ratio": statistics.median(through) / statistics.median(direct),
                "proxy_cpu_us_per_req": statistics.median(cpu_per_req),
            }

        direct_url = f"https://127.0.0.1:{oport}/small"
        proxy_url = f"https://localhost:{oport}/small"
        via = ["-x", f"http://127.0.0.1:{pport}", "--cacert", bottle_ca]
        measure("keepalive_c32", ["-c", "32", "--cacert", f"{work}/origin-ca.pem", direct_url],
                ["-c", "32"] + via + [proxy_url])
        measure("new_connection_c8", ["-c", "8", "--disable-keepalive", "--cacert", f"{work}/origin-ca.pem", direct_url],
                ["-c", "8", "--disable-keepalive"] + via + [proxy_url])
        results["rss_after_load_kib"] = rss_kib(proxy.pid)
        results["binary_bytes"] = os.path.getsize(BIN)
        with open(f"{work}/proxy.log") as f:
            assert "bench-token" not in f.read()
    finally:
        for p in procs:
            p.kill()
        shutil.rmtree(work, ignore_errors=True)
    write_report(results)
    print(json.dumps(results, indent=2))


def write_report(r):
    machine = f"{os.cpu_count()} cores, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB"
    k, n = r["keepalive_c32"], r["new_connection_c8"]
    text = f"""# Benchmarks

Command: `scripts/bench` (`BENCH_RUNS={RUNS} BENCH_SECONDS={SECONDS}`: each figure is the median of
{RUNS} runs of {SECONDS} s). Machine: {machine}, loopback only; client `oha`, origin
`examples/bench_origin.rs` (hyper + rustls), egress-proxy release build, logging at `info`
to a file (as deployed). Ratio = through egress-proxy ÷ direct, measured in the same run.

| workload | direct | through egress-proxy | ratio | goal | proxy CPU per request |
|---|---|---|---|---|---|
| small GET, keep-alive, 32 connections | {k['direct_rps']:.0f} req/s | {k['proxy_rps']:.0f} req/s | {k['ratio']:.2f} | ≥ 0.45 | {k['proxy_cpu_us_per_req']:.1f} µs |
| new CONNECT + TLS per request (leaf cached), 8 connections | {n['direct_rps']:.0f} req/s | {n['proxy_rps']:.0f} req/s | {n['ratio']:.2f} | ≥ 0.80 | {n['proxy_cpu_us_per_req']:.1f} µs |
| first contact with a new host (leaf minted): extra time | | {r['mint_extra_us']:.0f} µs | | ≤ 50 µs | |

| per sidecar | measured | goal |
|---|---|---|
| idle process, routes loaded, CA present: RSS | {r['idle_rss_kib'] / 1024:.1f} MiB | ≤ 8 MiB |
| start to ready (`/readyz` 200) with an existing CA | {r['startup_ms']:.1f} ms | ≤ 50 ms |
| release binary, stripped | {r['binary_bytes'] / 1e6:.1f} MB | ≤ 15 MB |
| RSS after the load above | {r['rss_after_load_kib'] / 1024:.1f} MiB | |

Not yet measured (issue #8 continues): the mitmproxy column, 1 GiB transfers, SSE added
latency, idle-connection memory, load during reloads, and a profile of where the remaining
gap goes. The "new CONNECT per request" row through the proxy pays for two TLS handshakes
(agent and, on pool misses, upstream) where the direct client pays one.
"""
    with open(f"{ROOT}/docs/benchmarks.md", "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
