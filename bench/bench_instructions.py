#!/usr/bin/env python3
"""Instructions egress-proxy executes per small keep-alive request, counted by valgrind's
callgrind: for changes too small for a timed A/B on a shared machine to resolve (its
run-to-run noise is 7-10%; an instruction count repeats to within 0.5%). Counts user-space
instructions only, not the kernel's share of a request, and not time.

    bench/bench_instructions.py BIN [BIN ...]      (BIN+limits: see bench_ab.py)

Each binary is started twice under callgrind, answers N1 and then N2 requests from oha (4
keep-alive connections through one CONNECT each), and exits on SIGTERM; the difference of
the two totals over N2 - N1 is the per-request figure, start-up and shutdown cancelling out.
Environment: N1 (300), N2 (1500), KEEP (copy the N2 run's callgrind file there, for
callgrind_annotate; use the `profiling` build for symbols). Loopback only, bounded like
bench/bench.py. Build the origin first: cargo build --release --example bench_origin.
"""
import os
import signal
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ["BENCH_MITM"] = "0"
os.environ["BENCH_NGINX"] = "0"
import bench  # noqa: E402

N1, N2 = int(os.environ.get("N1", "300")), int(os.environ.get("N2", "1500"))


def total_instructions(setup, spec, n, out):
    binary, routes = bench.variant(setup, spec)
    port, admin = bench.free_port(), bench.free_port()
    p = setup.start_egress(port, admin, binary=binary, routes=routes,
                           prefix=["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"],
                           stderr=f"{setup.work}/valgrind.log")
    bench.wait_port(port, 120)
    r = subprocess.run(["oha", "--no-tui", "-n", str(n), "-c", "4", "-x", f"http://127.0.0.1:{port}",
                        "--cacert", setup.bottle_ca, f"https://localhost:{setup.oport}/small"],
                       capture_output=True, text=True, timeout=600)
    if f"[200] {n} responses" not in r.stdout:
        raise SystemExit(f"{binary}: not {n} answers of 200:\n{r.stdout[-800:]}")
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=120)
    with open(out) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise SystemExit(f"{out}: no instruction total")


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    work = tempfile.mkdtemp(prefix="egress-instr-")
    try:
        setup = bench.Setup(work)
        setup.egress.kill()
        setup.egress.wait()
        for binary in sys.argv[1:]:
            a = total_instructions(setup, binary, N1, f"{work}/a.out")
            b = total_instructions(setup, binary, N2, f"{work}/b.out")
            if os.environ.get("KEEP"):
                subprocess.run(["cp", f"{work}/b.out", os.environ["KEEP"]], check=True)
            print(f"{binary}: {(b - a) / (N2 - N1):,.0f} instructions/request")
    finally:
        bench.stop_all()


if __name__ == "__main__":
    main()
