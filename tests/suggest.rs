//! `egress-proxy routes suggest` against the binary: logs from stdin and files, bad lines
//! on stderr with exit 0, a `--routes` file merged, `check` accepting the draft, and the
//! same bytes for the same input.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

fn fixture(name: &str) -> String {
    format!(
        "{}/tests/fixtures/suggest/{name}.jsonl",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// Runs the binary with `stdin` fed in; (exit code, stdout, stderr).
fn run(args: &[&str], stdin: &[u8], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn check(dir: &Path, yaml: &str, env: &[(&str, &str)]) {
    let file = write_file(dir, "suggested.yaml", yaml);
    let (code, out, err) = run(&["check", file.to_str().unwrap()], b"", env);
    assert_eq!(code, 0, "check refused the draft: {err}\n{yaml}");
    assert!(out.contains(": ok, "), "{out}");
}

/// What `docker logs egress-proxy 2>&1` gives: the start event, warnings, a text line,
/// refusals, and the requests.
fn docker_logs() -> String {
    let mut log = String::new();
    log.push_str(r#"{"timestamp":"2026-12-06T07:00:00.000000Z","level":"INFO","message":"egress-proxy serving","event":"start","listen":"0.0.0.0:8080","routes":0,"mode":"report","target":"egress_proxy::app"}"#);
    log.push('\n');
    log.push_str(r#"{"timestamp":"2026-12-06T07:00:00.100000Z","level":"WARN","message":"open files limit caps connections","target":"egress_proxy::app"}"#);
    log.push('\n');
    log.push_str("2026-12-06T07:00:01Z WARN some text line from elsewhere\n");
    for name in ["github", "git", "pypi"] {
        log.push_str(&std::fs::read_to_string(fixture(name)).unwrap());
    }
    log.push_str(r#"{"event":"request","host":"evil.example","port":443,"method":"GET","path":"/exfil","decision":"deny","reason":"host_not_allowed","status":403}"#);
    log.push('\n');
    log.push_str(r#"{"event":"request","host":"api.github.com","port":443,"method":"GET","path":"/a/../etc/passwd","decision":"report","status":400}"#);
    log.push('\n');
    log
}

#[test]
fn stdin_and_files_give_the_same_draft_and_check_accepts_it() {
    let dir = tempfile::tempdir().unwrap();
    let log = docker_logs();
    let (code, from_stdin, err) = run(&["routes", "suggest"], log.as_bytes(), &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        from_stdin.contains("host: \"api.github.com\""),
        "{from_stdin}"
    );
    assert!(
        from_stdin.contains("\"/repos/acme/widgets/issues/*/comments\""),
        "{from_stdin}"
    );
    assert!(
        !from_stdin.contains("evil.example"),
        "a denied request was suggested"
    );
    assert!(
        !from_stdin.contains("/etc/passwd"),
        "an invalid path was suggested"
    );
    assert!(!from_stdin.contains("\"/**\""), "{from_stdin}");
    // The text line, and the invalid path, are reported with their line numbers.
    assert!(err.contains("line 3: not JSON"), "{err}");
    assert!(
        err.lines()
            .any(|l| l.starts_with("line ") && l.contains("path the proxy would refuse")),
        "{err}"
    );
    assert!(
        !err.contains("passwd"),
        "a value from the log was echoed: {err}"
    );
    check(dir.path(), &from_stdin, &[]);

    let file = write_file(dir.path(), "proxy.log", &log);
    let (code, from_file, _) = run(&["routes", "suggest", file.to_str().unwrap()], b"", &[]);
    assert_eq!(code, 0);
    assert_eq!(from_file, from_stdin);
    let (_, from_dash, _) = run(&["routes", "suggest", "-"], log.as_bytes(), &[]);
    assert_eq!(from_dash, from_stdin);
    // Same input, same bytes, run after run.
    let (_, again, _) = run(&["routes", "suggest", file.to_str().unwrap()], b"", &[]);
    assert_eq!(again, from_file);
}

#[test]
fn several_logs_are_read_together_and_name_their_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write_file(
        dir.path(),
        "bad.log",
        "{\"event\":\"request\"\nnot json either\n",
    );
    let github = fixture("github");
    let (code, out, err) = run(
        &[
            "routes",
            "suggest",
            &github,
            bad.to_str().unwrap(),
            "-",
            "--max-literal",
            "1",
        ],
        std::fs::read_to_string(fixture("docs")).unwrap().as_bytes(),
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!("{}: line 1: not JSON", bad.display())),
        "{err}"
    );
    assert!(
        err.contains(&format!("{}: line 2: not JSON", bad.display())),
        "{err}"
    );
    assert!(
        out.contains("\"/user\"") && out.contains("docs.python.org"),
        "{out}"
    );
    // --max-literal 1: the docs site's two-child prefix collapses.
    assert!(out.contains("\"/*/_static/**\""), "{out}");
    check(dir.path(), &out, &[]);
    let (code, _, err) = run(&["routes", "suggest", "/nonexistent/log"], b"", &[]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/log"), "{err}");
}

#[test]
fn a_routes_file_is_kept_first_and_only_what_it_misses_is_added() {
    let dir = tempfile::tempdir().unwrap();
    let routes = write_file(
        dir.path(),
        "routes.yaml",
        "routes:\n  - host: api.github.com\n    path_allowlist: [\"/repos/acme/widgets/issues\"]\n    auth_scheme: Bearer\n    token_env: EGRESS_PROXY_TOKEN_0\n  - host: github.com\n    header: x-token\n    token_file: /run/secrets/not-here\n",
    );
    let log = docker_logs();
    // The token variable and file are not there: read for the routes only.
    let (code, out, err) = run(
        &["routes", "suggest", "--routes", routes.to_str().unwrap()],
        log.as_bytes(),
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let expect_head = "routes:\n  # From ";
    assert!(out.contains(expect_head), "{out}");
    assert!(out.contains("  - host: \"api.github.com\"\n    path_allowlist: [\"/repos/acme/widgets/issues\"]\n    auth_scheme: \"Bearer\"\n    token_env: \"EGRESS_PROXY_TOKEN_0\"\n"), "{out}");
    assert!(out.contains("  - host: \"github.com\"\n    header: \"x-token\"\n    token_file: \"/run/secrets/not-here\"\n"), "{out}");
    assert!(
        out.contains("# No token: routes[0] above injects one for api.github.com"),
        "{out}"
    );
    assert_eq!(
        out.matches("host: \"github.com\"").count(),
        1,
        "git was already allowed: {out}"
    );
    assert!(
        !out.contains("issues/*/comments"),
        "already allowed by routes[0]: {out}"
    );
    let secret = write_file(dir.path(), "secret", "t\n");
    let with_file = out.replace("/run/secrets/not-here", secret.to_str().unwrap());
    check(dir.path(), &with_file, &[("EGRESS_PROXY_TOKEN_0", "t")]);

    let invalid = write_file(dir.path(), "invalid.yaml", "routes:\n  - host: \"*.com\"\n");
    let (code, out, err) = run(
        &["routes", "suggest", "--routes", invalid.to_str().unwrap()],
        log.as_bytes(),
        &[],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("invalid.yaml") && err.contains("routes[0].host"),
        "{err}"
    );
}

#[test]
fn the_routes_option_has_no_variable() {
    let dir = tempfile::tempdir().unwrap();
    let routes = write_file(
        dir.path(),
        "routes.yaml",
        "routes:\n  - host: only-in-the-file.example\n",
    );
    let (code, out, err) = run(
        &["routes", "suggest"],
        std::fs::read_to_string(fixture("git")).unwrap().as_bytes(),
        &[("EGRESS_PROXY_ROUTES", routes.to_str().unwrap())],
    );
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("only-in-the-file"), "{out}");
}

#[test]
fn a_huge_line_is_skipped_not_held() {
    let mut log = Vec::new();
    log.extend_from_slice(b"{\"event\":\"request\",\"path\":\"/");
    log.extend(std::iter::repeat_n(b'a', 3 << 20));
    log.extend_from_slice(b"\"}\n");
    log.extend_from_slice(std::fs::read_to_string(fixture("git")).unwrap().as_bytes());
    let (code, out, err) = run(&["routes", "suggest"], &log, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("line 1: longer than"), "{err}");
    assert!(out.contains("git-upload-pack"), "{out}");
}

/// A path as deep as a request head allows (an agent in report mode can send one) is
/// named on stderr and skipped; it neither crashes the draft nor widens it.
#[test]
fn a_path_deeper_than_any_api_is_skipped() {
    let mut log = format!(
        "{{\"event\":\"request\",\"host\":\"api.example.com\",\"port\":443,\"method\":\"GET\",\"path\":\"{}\",\"decision\":\"report\"}}\n",
        "/a".repeat(30_000)
    )
    .into_bytes();
    log.extend_from_slice(std::fs::read_to_string(fixture("git")).unwrap().as_bytes());
    let (code, out, err) = run(&["routes", "suggest"], &log, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("line 1: ") && err.contains("segments"),
        "{err}"
    );
    assert!(
        out.contains("git-upload-pack") && !out.contains("api.example.com"),
        "{out}"
    );
}

/// One session's requests through `proxy`, each on its own HTTP/1.1 tunnel; the statuses.
async fn replay(proxy: &Proxy, port: u16, session: &[(&str, &str, &str)]) -> Vec<u16> {
    let mut statuses = Vec::new();
    for (host, method, path) in session {
        let mut c = h1(proxy.tunnel(host, port, &[b"http/1.1"]).await).await;
        let req = http::Request::builder()
            .method(*method)
            .uri(*path)
            .header("host", format!("{host}:{port}"))
            .body(empty())
            .unwrap();
        let (status, _, _) = collect(c.send_request(req).await.unwrap()).await;
        statuses.push(status.as_u16());
    }
    statuses
}

/// The loop of SPEC §3a against the real proxy: a session's log, drafted into routes, lets
/// the same session through again and refuses what it did not do. The first run is in
/// report mode with routes that allow nothing.
#[tokio::test]
async fn a_session_drafted_into_routes_runs_again_and_nothing_more() {
    let ca = TestCa::new("upstream test CA");
    let names = ["api.suggest.test", "git.suggest.test"];
    let up = Upstream::start(&ca, &names, &[b"http/1.1"]).await;
    let port = up.port();
    let pins = [(names[0], port), (names[1], port)];
    let session = [
        (
            "api.suggest.test",
            "GET",
            "/repos/acme/widgets/issues/123/comments?per_page=100",
        ),
        (
            "api.suggest.test",
            "GET",
            "/repos/acme/widgets/issues/4567/comments",
        ),
        (
            "api.suggest.test",
            "POST",
            "/repos/acme/widgets/issues/123/comments",
        ),
        (
            "api.suggest.test",
            "GET",
            "/repos/acme/widgets/commits/9fceb02d0ae598e95dc970b74767f19372d61af8",
        ),
        (
            "api.suggest.test",
            "GET",
            "/v1/files/file-XjGxS3KTG0uNmNOK362iJua3",
        ),
        (
            "git.suggest.test",
            "GET",
            "/acme/widgets.git/info/refs?service=git-upload-pack",
        ),
        (
            "git.suggest.test",
            "POST",
            "/acme/widgets.git/git-upload-pack",
        ),
        ("git.suggest.test", "GET", "/@scope%2fname"),
    ];
    let first = ProxyBuilder::new("routes: []\n")
        .upstream(&ca, &pins)
        .arg("--mode")
        .arg("report")
        .start();
    assert!(
        replay(&first, port, &session)
            .await
            .iter()
            .all(|s| *s == 200)
    );
    let reported = first
        .await_lines(session.len(), |l| {
            l.contains("\"event\":\"request\"") && l.contains("\"decision\":\"report\"")
        })
        .await;
    assert_eq!(reported.len(), session.len(), "{}", first.logs());
    let logs = first.logs();
    drop(first);

    let (code, draft, err) = run(&["routes", "suggest"], logs.as_bytes(), &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        !draft.contains("per_page") && !draft.contains("service="),
        "{draft}"
    );
    assert!(!draft.contains("XjGxS3KTG0uNmNOK362iJua3"), "{draft}");
    assert!(draft.contains(&format!("ports: [{port}]")), "{draft}");

    let second = ProxyBuilder::new(&draft).upstream(&ca, &pins).start();
    assert_eq!(
        replay(&second, port, &session).await,
        vec![200; session.len()],
        "the same session was refused something under\n{draft}"
    );
    let outside = [
        (
            "api.suggest.test",
            "GET",
            "/repos/other/repo/issues/1/comments",
        ),
        (
            "api.suggest.test",
            "DELETE",
            "/repos/acme/widgets/issues/123/comments",
        ),
        ("git.suggest.test", "GET", "/other/repo.git/info/refs"),
        ("git.suggest.test", "GET", "/"),
    ];
    assert_eq!(
        replay(&second, port, &outside).await,
        vec![403; outside.len()],
        "what the session did not do is still refused under\n{draft}"
    );
}
