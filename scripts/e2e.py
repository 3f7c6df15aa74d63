#!/usr/bin/env python3
"""A real bottle, simulated with network namespaces (run by scripts/e2e).

    agent ns (10.200.1.2) ── proxy ns (10.200.1.1 | 10.200.2.1) ── internet ns (10.200.2.2)

The agent's only route is to the proxy; the proxy does not forward packets; the
"internet" holds local TLS origins: an API (JSON echo, SSE) and a git smart-HTTP server
that demands Basic auth. Real clients in the agent namespace (curl, Python requests, Node
through undici's ProxyAgent, git clone and push with no credentials) go through
egress-proxy, and each check asserts what the origin received.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "debug", "egress-proxy")
TAG = f"ep{os.getpid() % 100000}"
NS_AGENT, NS_PROXY, NS_NET = f"{TAG}a", f"{TAG}p", f"{TAG}n"
AGENT_IP, PROXY_IN, PROXY_OUT, NET_IP = "10.200.1.2", "10.200.1.1", "10.200.2.1", "10.200.2.2"
API_TOKEN = "e2e-api-token-31337"
GIT_CRED = "gituser:e2e-git-password"

procs = []
cleanup_dirs = []
passed = 0


def sh(*cmd, ns=None, check=True, env=None, **kw):
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    return subprocess.run(full, check=check, env=env, **kw)


def spawn(*cmd, ns=None, env=None, log=None):
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    p = subprocess.Popen(full, env=env, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT if log else subprocess.DEVNULL)
    procs.append(p)
    return p


def ok(name):
    global passed
    passed += 1
    print(f"ok {passed}: {name}", flush=True)


def wait_port(ns, host, port, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = sh("bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}", ns=ns, check=False, stderr=subprocess.DEVNULL)
        if r.returncode == 0:
            return
        time.sleep(0.1)
    raise SystemExit(f"{host}:{port} in {ns} never opened")


def setup_network():
    for ns in (NS_AGENT, NS_PROXY, NS_NET):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "link", "add", f"{TAG}A", "type", "veth", "peer", "name", f"{TAG}Pa")
    sh("ip", "link", "set", f"{TAG}A", "netns", NS_AGENT)
    sh("ip", "link", "set", f"{TAG}Pa", "netns", NS_PROXY)
    sh("ip", "link", "add", f"{TAG}N", "type", "veth", "peer", "name", f"{TAG}Pn")
    sh("ip", "link", "set", f"{TAG}N", "netns", NS_NET)
    sh("ip", "link", "set", f"{TAG}Pn", "netns", NS_PROXY)
    for ns, dev, addr in [
        (NS_AGENT, f"{TAG}A", f"{AGENT_IP}/24"),
        (NS_PROXY, f"{TAG}Pa", f"{PROXY_IN}/24"),
        (NS_PROXY, f"{TAG}Pn", f"{PROXY_OUT}/24"),
        (NS_NET, f"{TAG}N", f"{NET_IP}/24"),
    ]:
        sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
    sh("sysctl", "-q", "-w", "net.ipv4.ip_forward=0", ns=NS_PROXY)


def teardown():
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()
    for d in cleanup_dirs:
        shutil.rmtree(d, ignore_errors=True)
    for ns in (NS_AGENT, NS_PROXY, NS_NET):
        subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)


ORIGIN = r'''
import base64, http.server, json, os, ssl, subprocess, sys, time
CRED = base64.b64encode(sys.argv[3].encode()).decode()
GIT_ROOT = sys.argv[4]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def reply(self, status, body, ctype="application/json", extra=()):
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        for k, v in extra: self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
    def handle_any(self):
        host = self.headers.get("host", "").split(":")[0]
        if host == "git.e2e":
            return self.git()
        if host == "pypi.e2e":
            name = "e2e_hello-0.1-py3-none-any.whl"
            if self.path.rstrip("/") == "/simple/e2e-hello":
                page = f'<html><body><a href="/files/{name}">{name}</a></body></html>'.encode()
                return self.reply(200, page, "text/html")
            if self.path == "/files/" + name:
                return self.reply(200, open(os.path.join(GIT_ROOT, "..", name), "rb").read(), "application/octet-stream")
            return self.reply(404, b"", "text/plain")
        if self.path.startswith("/v1/ws") and self.headers.get("upgrade", "").lower() == "websocket":
            return self.websocket()
        if self.path.startswith("/v1/sse"):
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for i in range(5):
                chunk = f"data: event {i} at {time.time()}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk)); self.wfile.flush()
                time.sleep(0.3)
            self.wfile.write(b"0\r\n\r\n"); self.wfile.flush()
            return
        n = int(self.headers.get("content-length", 0))
        body = self.rfile.read(n) if n else b""
        self.reply(200, json.dumps({"host": host, "path": self.path, "method": self.command,
            "authorization": self.headers.get("authorization"), "body_len": len(body)}).encode())
    def websocket(self):
        import hashlib
        key = self.headers["sec-websocket-key"]
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        self.send_response(101)
        self.send_header("upgrade", "websocket"); self.send_header("connection", "Upgrade")
        self.send_header("sec-websocket-accept", accept)
        self.end_headers(); self.wfile.flush()
        def send(op, data):
            n = len(data)
            head = bytes([0x80 | op]) + (bytes([n]) if n < 126 else bytes([126]) + n.to_bytes(2, "big"))
            self.wfile.write(head + data); self.wfile.flush()
        # First message: the credential the upgrade request carried.
        send(1, ("auth " + str(self.headers.get("authorization"))).encode())
        while True:
            b = self.rfile.read(2)
            if len(b) < 2: return
            op, n = b[0] & 0x0F, b[1] & 0x7F
            if n == 126: n = int.from_bytes(self.rfile.read(2), "big")
            elif n == 127: n = int.from_bytes(self.rfile.read(8), "big")
            mask = self.rfile.read(4) if b[1] & 0x80 else b"\0\0\0\0"
            data = bytes(x ^ mask[i % 4] for i, x in enumerate(self.rfile.read(n)))
            if op == 8:
                send(8, data); return
            send(op, data)
    def git(self):
        # /open/ holds a public repository (clone and push without credentials), for the
        # report-mode loop, whose first run has no route and so no token.
        if not self.path.startswith("/open/") and self.headers.get("authorization") != "Basic " + CRED:
            return self.reply(401, b"auth", "text/plain", [("www-authenticate", 'Basic realm="git"')])
        path, _, query = self.path.partition("?")
        env = dict(os.environ, GIT_PROJECT_ROOT=GIT_ROOT, GIT_HTTP_EXPORT_ALL="1", REQUEST_METHOD=self.command,
                   PATH_INFO=path, QUERY_STRING=query, CONTENT_TYPE=self.headers.get("content-type", ""),
                   REMOTE_USER="gituser", REMOTE_ADDR="10.200.2.1")
        n = int(self.headers.get("content-length", 0) or 0)
        if self.headers.get("transfer-encoding") == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0: self.rfile.readline(); break
                data += self.rfile.read(size); self.rfile.readline()
        else:
            data = self.rfile.read(n)
        env["CONTENT_LENGTH"] = str(len(data))
        out = subprocess.run(["git", "http-backend"], input=data, env=env, capture_output=True).stdout
        head, _, body = out.partition(b"\r\n\r\n")
        status, headers = 200, []
        for line in head.split(b"\r\n"):
            k, _, v = line.decode().partition(":")
            if k.lower() == "status": status = int(v.strip().split()[0])
            elif k: headers.append((k, v.strip()))
        self.send_response(status)
        for k, v in headers: self.send_header(k, v)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_PUT = handle_any
s = http.server.ThreadingHTTPServer((sys.argv[1], 443), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[2] + ".pem", sys.argv[2] + ".key")
s.socket = ctx.wrap_socket(s.socket, server_side=True)
s.serve_forever()
'''


def make_wheel(d):
    """A minimal pure-Python wheel, written by hand (no build tools needed)."""
    import base64, hashlib, zipfile
    files = {
        "e2e_hello/__init__.py": b"GREETING = 'hello from the e2e index'\n",
        "e2e_hello-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: e2e-hello\nVersion: 0.1\n",
        "e2e_hello-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: e2e\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = ""
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record += f"{name},sha256={digest},{len(data)}\n"
    record += "e2e_hello-0.1.dist-info/RECORD,,\n"
    with zipfile.ZipFile(f"{d}/e2e_hello-0.1-py3-none-any.whl", "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("e2e_hello-0.1.dist-info/RECORD", record)


def make_certs(d):
    def run(*a):
        subprocess.run(a, check=True, capture_output=True)
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
        "-keyout", f"{d}/origin-ca.key", "-out", f"{d}/origin-ca.pem", "-subj", "/CN=e2e internet CA",
        "-addext", "basicConstraints=critical,CA:true", "-addext", "keyUsage=critical,keyCertSign")
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{d}/origin.key", "-out", f"{d}/origin.csr", "-subj", "/CN=api.e2e")
    with open(f"{d}/ext", "w") as f:
        f.write("subjectAltName=DNS:api.e2e,DNS:git.e2e,DNS:pypi.e2e\nextendedKeyUsage=serverAuth\n")
    run("openssl", "x509", "-req", "-in", f"{d}/origin.csr", "-CA", f"{d}/origin-ca.pem", "-CAkey", f"{d}/origin-ca.key",
        "-CAcreateserial", "-out", f"{d}/origin.pem", "-days", "1", "-extfile", f"{d}/ext")


AGENT_SESSION = r'''
import json, os, subprocess, sys, time
import requests
work, node_dir, venv, clone = sys.argv[1:5]
def run(*cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])
    return r.stdout
out = run("curl", "-sS", "--fail-with-body", "-H", "Authorization: Bearer agent-fake", "https://api.e2e/v1/messages?beta=1")
assert json.loads(out)["authorization"] is None, out
r = requests.post("https://api.e2e/v1/chat/completions", json={"model": "m"}, headers={"x-api-key": "agent-fake"})
assert r.status_code == 200 and r.json()["authorization"] is None, r.text
for i in (101, 202, 303):
    r = requests.get(f"https://api.e2e/v1/files/{i}/content")
    assert r.status_code == 200, r.text
run("node", f"{work}/report-fetch.mjs")
run(sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-cache-dir", "--index-url",
    "https://pypi.e2e/simple", "--target", f"{work}/home/site-{os.getpid()}", "e2e-hello")
run("git", "clone", "-q", "https://git.e2e/open/repo.git", clone)
with open(f"{clone}/NOTES", "a") as f:
    f.write(f"session {time.time()}\n")
run("git", "-C", clone, "add", "NOTES")
run("git", "-C", clone, "-c", "user.name=agent", "-c", "user.email=a@e2e", "commit", "-qm", "from the bottle")
run("git", "-C", clone, "push", "-q", "origin", "HEAD:refs/heads/main")
print("session ok")
'''


def report_suggest_enforce(work, agent_env, node_dir, venv):
    """The way to write routes for a new agent (README): run it in report mode with routes
    that allow nothing, draft the routes from its log, run it again in enforce mode with the
    draft. The same session is refused nothing; what it never did is refused."""
    with open(f"{work}/report-fetch.mjs", "w") as f:
        f.write(f"""
import {{ ProxyAgent, fetch }} from '{node_dir}/node_modules/undici/index.js';
const dispatcher = new ProxyAgent(process.env.HTTPS_PROXY);
const r = await fetch('https://api.e2e/v1/models', {{ dispatcher }});
if (r.status !== 200) {{ console.error(r.status, await r.text()); process.exit(1); }}
""")
    with open(f"{work}/session.py", "w") as f:
        f.write(AGENT_SESSION)
    os.makedirs(f"{work}/loop", exist_ok=True)
    os.chown(f"{work}/loop", 65532, 65532)
    with open(f"{work}/loop/nothing.yaml", "w") as f:
        f.write("routes: []\n")
    resolve = f"api.e2e:443:{NET_IP},git.e2e:443:{NET_IP},pypi.e2e:443:{NET_IP},other.e2e:443:{NET_IP}"

    def start(routes, mode, log, port):
        env = dict(os.environ, EGRESS_PROXY_TOKEN_0=API_TOKEN)
        for k in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
            env.pop(k, None)
        p = spawn("setpriv", "--reuid=65532", "--regid=65532", "--clear-groups", BIN, "--listen", f"{PROXY_IN}:{port}",
                  "--admin", f"127.0.0.1:{port + 1000}", "--routes", routes, "--ca-dir", f"{work}/state",
                  "--upstream-ca", f"{work}/state/upstream-ca.pem", "--resolve", resolve, "--mode", mode,
                  ns=NS_PROXY, env=env, log=open(log, "w"))
        wait_port(NS_PROXY, PROXY_IN, port)
        return p, dict(agent_env, HTTPS_PROXY=f"http://{PROXY_IN}:{port}", https_proxy=f"http://{PROXY_IN}:{port}")

    def session(env, clone):
        return sh(sys.executable, f"{work}/session.py", work, node_dir, venv, clone, ns=NS_AGENT, env=env,
                  capture_output=True, text=True, check=False)

    def events(log):
        out = []
        for line in open(log):
            try:
                e = json.loads(line)
            except ValueError:
                continue
            fields = e.get("fields", e)
            if fields.get("event") in ("request", "connect"):
                out.append(fields)
        return out

    # 1. Report mode, nothing allowed: everything goes through and is logged as `report`.
    p, env = start(f"{work}/loop/nothing.yaml", "report", f"{work}/loop/report.log", 8081)
    r = session(env, f"{work}/home/loop-1")
    p.terminate(); p.wait(timeout=10)
    assert r.returncode == 0, r.stdout + r.stderr
    seen = events(f"{work}/loop/report.log")
    reported = [e for e in seen if e.get("event") == "request" and e.get("decision") == "report"]
    assert reported and all(e.get("decision") in ("report", None) or e.get("event") == "connect" for e in seen), seen
    assert not [e for e in seen if e.get("decision") == "deny"], seen
    ok(f"report mode with no routes: a session of curl, requests, node, pip and git ran; {len(reported)} requests reported")

    # 2. Draft the routes from that log; `check` accepts them.
    r = sh(BIN, "routes", "suggest", f"{work}/loop/report.log", capture_output=True, text=True)
    draft = r.stdout
    with open(f"{work}/loop/suggested.yaml", "w") as f:
        f.write(draft)
    os.chmod(f"{work}/loop/suggested.yaml", 0o644)
    sh(BIN, "check", f"{work}/loop/suggested.yaml", capture_output=True)
    assert not re.search(r"""["' \[]/\*\*["' ,\]]|^\s*-\s*/\*\*\s*$""", draft, re.M), draft
    for secret in ("beta=1", "agent-fake", API_TOKEN):
        assert secret not in draft, draft
    ok("routes suggest drafts a routes file from the log that check accepts (no query, no credential)")

    # 3. Enforce mode with the draft: the same session is refused nothing.
    p, env = start(f"{work}/loop/suggested.yaml", "enforce", f"{work}/loop/enforce.log", 8082)
    try:
        r = session(env, f"{work}/home/loop-2")
        assert r.returncode == 0, draft + r.stdout + r.stderr
        refused = [e for e in events(f"{work}/loop/enforce.log") if e.get("decision") == "deny"]
        assert not refused, (draft, refused)
        ok("enforce mode with the drafted routes: the same session is refused nothing")

        # 4. What the session never did is refused: another repository, another host.
        r = sh("git", "clone", "-q", "https://git.e2e/open/other.git", f"{work}/home/other", ns=NS_AGENT, env=env,
               capture_output=True, text=True, check=False)
        assert r.returncode != 0 and "403" in r.stderr, r.stderr
        r = sh("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "https://other.e2e/simple/", ns=NS_AGENT,
               env=env, capture_output=True, text=True, check=False)
        assert r.returncode != 0, r.stdout
        reasons = {(e.get("host"), e.get("reason")) for e in events(f"{work}/loop/enforce.log") if e.get("decision") == "deny"}
        assert ("git.e2e", "path_not_allowed") in reasons and ("other.e2e", "host_not_allowed") in reasons, reasons
        ok("enforce mode with the drafted routes: another repository and another host are refused")
    finally:
        p.terminate()
        p.wait(timeout=10)


def main():
    if os.geteuid() != 0 or not shutil.which("ip"):
        print("e2e: needs root and iproute2 (network namespaces)")
        sys.exit(1)
    work = tempfile.mkdtemp(prefix="egress-e2e-")
    os.chmod(work, 0o755)
    try:
        setup_network()
        make_certs(work)
        make_wheel(work)
        # A bare repository the agent will clone and push to.
        git_root = f"{work}/git"
        os.makedirs(git_root)
        sh("git", "init", "-q", "--bare", f"{git_root}/repo.git")
        sh("git", "-C", f"{git_root}/repo.git", "config", "http.receivepack", "true")
        for name in ("repo", "other"):
            sh("git", "init", "-q", "--bare", "-b", "main", f"{git_root}/open/{name}.git")
            sh("git", "-C", f"{git_root}/open/{name}.git", "config", "http.receivepack", "true")
            # Not empty: every session's clone then fetches (git-upload-pack), as a real one does.
            seed = f"{work}/seed-{name}"
            sh("git", "clone", "-q", f"{git_root}/open/{name}.git", seed, stderr=subprocess.DEVNULL)
            with open(f"{seed}/README", "w") as f:
                f.write(f"{name}\n")
            sh("git", "-C", seed, "add", "README")
            sh("git", "-C", seed, "-c", "user.name=seed", "-c", "user.email=s@e2e", "commit", "-qm", "seed")
            sh("git", "-C", seed, "push", "-q", "origin", "HEAD:refs/heads/main")
        with open(f"{work}/origin.py", "w") as f:
            f.write(ORIGIN)
        spawn(sys.executable, f"{work}/origin.py", NET_IP, f"{work}/origin", GIT_CRED, git_root, ns=NS_NET,
              log=open(f"{work}/origin.log", "w"))
        wait_port(NS_NET, NET_IP, 443)

        with open(f"{work}/routes.yaml", "w") as f:
            f.write(f"""routes:
  - host: api.e2e
    path_allowlist: ["/v1"]
    auth_scheme: Bearer
    token_env: EGRESS_PROXY_TOKEN_0
  - host: git.e2e
    path_allowlist: ["/repo.git"]
    auth_scheme: Basic
    token_env: EGRESS_PROXY_TOKEN_1
  - host: pypi.e2e
    methods: [GET, HEAD]
""")
        env = dict(os.environ, EGRESS_PROXY_TOKEN_0=API_TOKEN, EGRESS_PROXY_TOKEN_1=GIT_CRED)
        for k in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
            env.pop(k, None)
        # Run it the way the image does: uid/gid 65532, the image's environment and paths
        # (bind-mounted in a private mount namespace), configured by variables only.
        export = f"{work}/agent-ca"
        for d in ("routes", "state", export):
            path = d if d.startswith("/") else f"{work}/{d}"
            os.makedirs(path, exist_ok=True)
            os.chown(path, 65532, 65532)
        shutil.move(f"{work}/routes.yaml", f"{work}/routes/routes.yaml")
        os.chmod(f"{work}/routes/routes.yaml", 0o644)
        shutil.copy(f"{work}/origin-ca.pem", f"{work}/state/upstream-ca.pem")
        made = [d for d in ("/etc/egress-proxy", "/var/lib/egress-proxy", "/ca-export") if not os.path.exists(d)]
        for d in made:
            os.makedirs(d)
        cleanup_dirs.extend(made)
        env.update(EGRESS_PROXY_LISTEN="0.0.0.0:8080", EGRESS_PROXY_ADMIN="0.0.0.0:9090",
                   EGRESS_PROXY_ROUTES="/etc/egress-proxy/routes.yaml", EGRESS_PROXY_CA_DIR="/var/lib/egress-proxy",
                   EGRESS_PROXY_CA_EXPORT="/ca-export", EGRESS_PROXY_UPSTREAM_CA="/var/lib/egress-proxy/upstream-ca.pem",
                   EGRESS_PROXY_RESOLVE=f"api.e2e:443:{NET_IP},git.e2e:443:{NET_IP},pypi.e2e:443:{NET_IP}")
        image_like = (f"mount --bind {work}/routes /etc/egress-proxy && mount --bind {work}/state /var/lib/egress-proxy"
                      f" && mount --bind {export} /ca-export && exec setpriv --reuid=65532 --regid=65532 --clear-groups {BIN}")
        spawn("unshare", "--mount", "--propagation", "private", "sh", "-c", image_like,
              ns=NS_PROXY, env=env, log=open(f"{work}/proxy.log", "w"))
        wait_port(NS_PROXY, PROXY_IN, 8080)
        # The image's HEALTHCHECK.
        r = sh("setpriv", "--reuid=65532", "--regid=65532", "--clear-groups", BIN, "health", "--admin", "127.0.0.1:9090",
               ns=NS_PROXY, check=False)
        assert r.returncode == 0, "egress-proxy health failed"
        ok("runs as uid 65532 with the image's variables and paths; HEALTHCHECK passes")

        proxy = f"http://{PROXY_IN}:8080"
        agent_env = dict(os.environ, HTTPS_PROXY=proxy, https_proxy=proxy,
                         SSL_CERT_FILE=f"{export}/ca-bundle.pem", REQUESTS_CA_BUNDLE=f"{export}/ca-bundle.pem",
                         CURL_CA_BUNDLE=f"{export}/ca-bundle.pem", GIT_SSL_CAINFO=f"{export}/ca-bundle.pem",
                         NODE_EXTRA_CA_CERTS=f"{export}/ca-cert.pem", GIT_TERMINAL_PROMPT="0",
                         HOME=f"{work}/home")
        os.makedirs(f"{work}/home")

        # 1. The agent cannot reach the internet directly.
        r = sh("curl", "-sS", "--max-time", "3", "--noproxy", "*", "--cacert", f"{work}/origin-ca.pem",
               "--resolve", f"api.e2e:443:{NET_IP}", "https://api.e2e/v1/x", ns=NS_AGENT, check=False,
               capture_output=True, env=agent_env)
        assert r.returncode != 0, "the agent reached the origin directly"
        ok("the agent has no route to the internet but through the proxy")

        # 2. curl through the proxy: the origin gets the real token, not the agent's.
        r = sh("curl", "-sS", "--fail-with-body", "-H", "Authorization: Bearer agent-fake", "https://api.e2e/v1/curl?q=1",
               ns=NS_AGENT, env=agent_env, capture_output=True, text=True)
        seen = json.loads(r.stdout)
        assert seen["authorization"] == f"Bearer {API_TOKEN}" and seen["path"] == "/v1/curl?q=1", seen
        ok("curl: token injected, agent's credential replaced")
        r = sh("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "https://api.e2e/admin", ns=NS_AGENT,
               env=agent_env, capture_output=True, text=True, check=False)
        assert r.stdout == "403", r.stdout
        ok("curl: a path outside the allowlist is 403")

        # 3. Python requests, and an SSE stream read incrementally.
        script = f"""
import requests, time
r = requests.post("https://api.e2e/v1/py", data=b"x" * 200000)
d = r.json(); assert r.status_code == 200 and d["authorization"] == "Bearer {API_TOKEN}" and d["body_len"] == 200000, d
t0 = time.time(); stamps = []
with requests.get("https://api.e2e/v1/sse", stream=True) as s:
    for line in s.iter_lines():
        if line.startswith(b"data:"):
            stamps.append(time.time() - t0)
assert len(stamps) == 5, stamps
assert stamps[0] < 0.25 and stamps[-1] > 1.0, stamps
print("sse", [round(x, 2) for x in stamps])
"""
        r = sh(sys.executable, "-c", script, ns=NS_AGENT, env=agent_env, capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stderr
        ok(f"python requests: POST 200 kB with the token; SSE events arrive as sent {r.stdout.strip()}")

        # A WebSocket (RFC 6455 client over the CONNECT tunnel, bundle-verified TLS): the
        # upgrade carries the injected token, and frames are relayed both ways.
        ws_client = f"""
import socket, ssl, os
s = socket.create_connection(("{PROXY_IN}", 8080), timeout=5)
s.sendall(b"CONNECT api.e2e:443 HTTP/1.1\\r\\nHost: api.e2e:443\\r\\n\\r\\n")
assert s.recv(1000).startswith(b"HTTP/1.1 200")
t = ssl.create_default_context(cafile="{export}/ca-bundle.pem").wrap_socket(s, server_hostname="api.e2e")
t.sendall(b"GET /v1/ws HTTP/1.1\\r\\nHost: api.e2e\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\n"
          b"Authorization: Bearer agent-fake\\r\\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\\r\\nSec-WebSocket-Version: 13\\r\\n\\r\\n")
buf = b""
while b"\\r\\n\\r\\n" not in buf:
    buf += t.recv(4096)
head, _, rest = buf.partition(b"\\r\\n\\r\\n")
assert head.startswith(b"HTTP/1.1 101") and b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head, head
def frame():
    global rest
    while len(rest) < 2: rest += t.recv(4096)
    n = rest[1] & 0x7F
    while len(rest) < 2 + n: rest += t.recv(4096)
    data, rest = rest[2:2 + n], rest[2 + n:]
    return data
assert frame() == b"auth Bearer {API_TOKEN}"
mask = os.urandom(4); payload = b"echo me"
t.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
assert frame() == payload
print("websocket ok")
"""
        r = sh(sys.executable, "-c", ws_client, ns=NS_AGENT, env=agent_env, capture_output=True, text=True, check=False)
        assert r.returncode == 0 and "websocket ok" in r.stdout, r.stderr + r.stdout
        ok("WebSocket: the upgrade carries the injected token; frames relayed both ways")

        # 4. Node 20 fetch through undici's ProxyAgent, trusting NODE_EXTRA_CA_CERTS.
        node_dir = os.environ.get("EGRESS_PROXY_TEST_CACHE", os.path.expanduser("~/.cache/egress-proxy-test")) + "/node-undici"
        if not os.path.exists(f"{node_dir}/node_modules/undici"):
            os.makedirs(node_dir, exist_ok=True)
            subprocess.run(["npm", "install", "--silent", "--prefix", node_dir, "undici@6.21.3"], check=True,
                           stdout=subprocess.DEVNULL)
        with open(f"{work}/fetch.mjs", "w") as f:
            f.write(f"""
import {{ ProxyAgent, fetch }} from '{node_dir}/node_modules/undici/index.js';
const dispatcher = new ProxyAgent(process.env.HTTPS_PROXY);
const r = await fetch('https://api.e2e/v1/node', {{ dispatcher, headers: {{ authorization: 'Bearer agent-fake' }} }});
const d = await r.json();
if (r.status !== 200 || d.authorization !== 'Bearer {API_TOKEN}') {{ console.error(d); process.exit(1); }}
""")
        r = sh("node", f"{work}/fetch.mjs", ns=NS_AGENT, env=agent_env, capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stderr + r.stdout
        ok("node fetch (undici ProxyAgent, NODE_EXTRA_CA_CERTS): token injected")

        # pip install from a (local) index through the proxy, trusting the bundle.
        r = sh(sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-cache-dir",
               "--index-url", "https://pypi.e2e/simple", "--target", f"{work}/home/site", "e2e-hello",
               ns=NS_AGENT, env=dict(agent_env, PIP_CERT=f"{export}/ca-bundle.pem"), capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stderr
        r = subprocess.run([sys.executable, "-c", "import e2e_hello; print(e2e_hello.GREETING)"],
                           env=dict(os.environ, PYTHONPATH=f"{work}/home/site"), capture_output=True, text=True)
        assert r.stdout.strip() == "hello from the e2e index", r.stdout + r.stderr
        ok("pip install from an index through the proxy (PIP_CERT = the bundle)")

        # httpx (from PyPI, pinned, in a cached virtualenv) with SSL_CERT_FILE and HTTPS_PROXY.
        cache = os.environ.get("EGRESS_PROXY_TEST_CACHE", os.path.expanduser("~/.cache/egress-proxy-test"))
        venv = f"{cache}/httpx-0.28.1"
        if not os.path.exists(f"{venv}/bin/python"):
            subprocess.run([sys.executable, "-m", "venv", venv], check=True)
            subprocess.run([f"{venv}/bin/pip", "install", "-q", "httpx==0.28.1"], check=True)
        script = f"""
import httpx
r = httpx.get("https://api.e2e/v1/httpx", headers={{"authorization": "Bearer agent-fake"}})
assert r.status_code == 200 and r.json()["authorization"] == "Bearer {API_TOKEN}", r.text
"""
        r = sh(f"{venv}/bin/python", "-c", script, ns=NS_AGENT, env=agent_env, capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stderr
        ok("python httpx (SSL_CERT_FILE, HTTPS_PROXY): token injected")

        # 5. git clone and push with no credentials on the agent side.
        clone = f"{work}/home/repo"
        r = sh("git", "clone", "-q", "https://git.e2e/repo.git", clone, ns=NS_AGENT, env=agent_env,
               capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stderr
        with open(f"{clone}/README", "w") as f:
            f.write("written by the agent\n")
        for cmd in (["add", "README"], ["-c", "user.name=agent", "-c", "user.email=a@e2e", "commit", "-qm", "from the bottle"],
                    ["push", "-q", "origin", "HEAD:refs/heads/main"]):
            r = sh("git", "-C", clone, *cmd, ns=NS_AGENT, env=agent_env, capture_output=True, text=True, check=False)
            assert r.returncode == 0, (cmd, r.stderr)
        log = subprocess.run(["git", "-C", f"{git_root}/repo.git", "log", "--format=%s", "main"], capture_output=True, text=True)
        assert log.stdout.strip() == "from the bottle", log.stdout
        ok("git clone and push over HTTPS: Basic credentials injected, never held by the agent")

        logs = open(f"{work}/proxy.log").read()
        for secret in (API_TOKEN, GIT_CRED, "q=1"):
            assert secret not in logs, f"{secret} in the proxy log"
        ok("the proxy log holds no token and no query")

        report_suggest_enforce(work, agent_env, node_dir, venv)
        print(f"e2e: {passed} passed, 0 failed")
    finally:
        teardown()
        if os.environ.get("E2E_KEEP"):
            print("kept", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
