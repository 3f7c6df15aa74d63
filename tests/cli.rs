//! The command line: `check`, `ca init`/`ca show`, and start-up failures that must stop
//! the proxy before it listens, with one line naming the file, field or variable.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::*;

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_the_orchestrators_json_and_the_example_file() {
    let dir = tempfile::tempdir().unwrap();
    let json = write_file(
        dir.path(),
        "routes.yaml",
        r#"{"routes": [{"host": "api.github.com", "path_allowlist": ["/repos/acme/widgets"], "auth_scheme": "Bearer", "token_env": "EGRESS_PROXY_TOKEN_0"}, {"host": "pypi.org"}]}"#,
    );
    let (code, out, err) = run(
        &["check", json.to_str().unwrap()],
        &[("EGRESS_PROXY_TOKEN_0", "t")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 routes"), "{out}");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/routes.example.yaml");
    let env: Vec<(String, String)> = (0..8)
        .map(|i| (format!("EGRESS_PROXY_TOKEN_{i}"), format!("tok{i}")))
        .collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let secret = write_file(dir.path(), "secret", "from-a-file\n");
    let mut env = env;
    env.push(("EXAMPLE_TOKEN_FILE", secret.to_str().unwrap()));
    let text = std::fs::read_to_string(example)
        .unwrap()
        .replace("/run/secrets/gitlab-token", secret.to_str().unwrap());
    let copy = write_file(dir.path(), "example.yaml", &text);
    let (code, _, err) = run(&["check", copy.to_str().unwrap()], &env);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn check_names_the_route_field_and_variable() {
    let dir = tempfile::tempdir().unwrap();
    for (text, env, expect) in [
        (
            "routes:\n  - host: a.test\n    hots: b\n",
            vec![],
            "unknown field",
        ),
        (
            "routes:\n  - host: a.test\n  - host: \"*.com\"\n",
            vec![],
            "routes[1].host",
        ),
        (
            "routes:\n  - host: a.test\n    auth_scheme: Bearer\n    token_env: MISSING_VAR\n",
            vec![],
            "MISSING_VAR is not set",
        ),
        (
            "routes:\n  - host: a.test\n    auth_scheme: Bearer\n    token_env: EMPTY_VAR\n",
            vec![("EMPTY_VAR", "")],
            "EMPTY_VAR is empty",
        ),
        ("routes: [\n", vec![], "routes.yaml"),
    ] {
        let p = write_file(dir.path(), "routes.yaml", text);
        let (code, _, err) = run(&["check", p.to_str().unwrap()], &env);
        assert_eq!(code, 1, "{text}");
        assert!(err.contains(expect), "{text:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(p.to_str().unwrap()), "names the file: {err}");
    }
}

#[test]
fn start_up_fails_before_listening_and_never_prints_a_token() {
    let routes = "routes:\n  - host: a.test\n    auth_scheme: Bearer\n    token_env: TOKEN_A\n  - host: b.test\n    auth_scheme: Bearer\n    token_env: TOKEN_B\n";
    let err = ProxyBuilder::new(routes)
        .env("TOKEN_A", "supersecret-a")
        .try_start()
        .err()
        .unwrap();
    assert!(err.contains("TOKEN_B"), "{err}");
    assert!(!err.contains("supersecret-a"), "{err}");
    let err = ProxyBuilder::new("routes:\n  - host: a.test\n")
        .arg("--listen")
        .arg("not-an-address")
        .try_start()
        .err()
        .unwrap();
    assert!(err.contains("--listen"), "{err}");
    let err = ProxyBuilder::new("routes:\n  - host: a.test\n")
        .arg("--upstream-ca")
        .arg("/nonexistent/ca.pem")
        .try_start()
        .err()
        .unwrap();
    assert!(err.contains("/nonexistent/ca.pem"), "{err}");
}

/// Runs the proxy with `args` and `env`, expecting it to refuse to start: its exit code
/// and stderr. One that starts after all is killed and reported.
fn refused_at_start(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let routes = write_file(dir.path(), "routes.yaml", "routes:\n  - host: a.test\n");
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--routes",
        ])
        .arg(&routes)
        .arg("--ca-dir")
        .arg(dir.path().join("ca"))
        .args(args)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("EGRESS_PROXY_UPSTREAM_PROXY")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} {env:?}: the proxy started instead of refusing");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status.code().unwrap_or(-1), err)
}

#[test]
fn no_shape_of_upstream_proxy_url_prints_its_password() {
    let shapes = [
        "user:S3cretPw@proxy.corp:3128/x",
        "ftp://user:S3cretPw@proxy.corp:3128",
        "http://user:S3cretPw@proxy.corp:99999",
        "http://user:S3c%72etPw@proxy.corp:3128/x",
        "http://user:S3cr@tPw@proxy.corp:3128/x",
        "user:S3c://retPw@proxy.corp:3128",
        "user:S3c/retPw@proxy.corp:3128",
    ];
    let secrets = ["S3c", "retPw", "tPw"];
    for url in shapes {
        for (flag, var) in [
            (Some("--upstream-proxy"), None),
            (None, Some("HTTPS_PROXY")),
            (None, Some("https_proxy")),
            (None, Some("EGRESS_PROXY_UPSTREAM_PROXY")),
        ] {
            let args: Vec<&str> = flag
                .into_iter()
                .chain([url].into_iter().filter(|_| flag.is_some()))
                .collect();
            let env: Vec<(&str, &str)> = var.map(|v| (v, url)).into_iter().collect();
            let (code, err) = refused_at_start(&args, &env);
            let from = flag.or(var).unwrap();
            assert_ne!(code, 0, "{from}={url} started: {err}");
            assert!(
                err.contains("proxy.corp"),
                "{from}={url}: the URL is named: {err}"
            );
            for secret in secrets {
                assert!(
                    !err.contains(secret),
                    "{from}={url} printed {secret:?}: {err}"
                );
            }
        }
    }
}

#[test]
fn ca_init_show_and_reuse() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let ca = ca_dir.to_str().unwrap();
    let (code, out, err) = run(&["ca", "init", "--ca-dir", ca], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), ca_dir.join("ca-cert.pem").to_str().unwrap());
    let mode = std::fs::metadata(ca_dir.join("ca-key.pem"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let (code, shown, _) = run(&["ca", "show", "--ca-dir", ca], &[]);
    assert_eq!(code, 0);
    assert_eq!(
        shown,
        std::fs::read_to_string(ca_dir.join("ca-cert.pem")).unwrap()
    );
    let (_, again, _) = run(&["ca", "init"], &[("EGRESS_PROXY_CA_DIR", ca)]);
    assert_eq!(again.trim(), out.trim(), "the CA is reused, not re-minted");
    assert_eq!(run(&["ca", "show", "--ca-dir", ca], &[]).1, shown);
    // A key other users can read is refused, naming the file and its mode.
    std::fs::set_permissions(
        ca_dir.join("ca-key.pem"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (code, _, err) = run(&["ca", "show", "--ca-dir", ca], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("ca-key.pem") && err.contains("0644"), "{err}");
    let (code, _, err) = run(
        &[
            "ca",
            "show",
            "--ca-dir",
            dir.path().join("none").to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 1, "{err}");
}

#[test]
fn ca_export_writes_certificate_and_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("export");
    let proxy = ProxyBuilder::new("routes:\n  - host: a.test\n")
        .arg("--ca-export")
        .arg(export.to_str().unwrap())
        .start();
    let cert = std::fs::read_to_string(export.join("ca-cert.pem")).unwrap();
    let bundle = std::fs::read_to_string(export.join("ca-bundle.pem")).unwrap();
    assert_eq!(cert, proxy.ca_pem);
    assert!(bundle.starts_with(&cert));
    assert!(
        bundle.matches("BEGIN CERTIFICATE").count() > 100,
        "public roots follow the bottle CA"
    );
}

/// The export directory is a volume the agent can write to: links it planted at any name
/// the proxy writes (the final names, the temporary names of older builds) are never
/// followed, so the victim they point at keeps its content and mode.
#[test]
fn ca_export_never_follows_a_planted_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("export");
    std::fs::create_dir(&export).unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "the victim's own content").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    for name in [
        "ca-cert.pem",
        "ca-bundle.pem",
        "ca-cert.pem.tmp",
        "ca-bundle.pem.tmp",
    ] {
        std::os::unix::fs::symlink(&victim, export.join(name)).unwrap();
    }
    let proxy = ProxyBuilder::new("routes:\n  - host: a.test\n")
        .arg("--ca-export")
        .arg(export.to_str().unwrap())
        .start();
    let victim_now = std::fs::read_to_string(&victim).unwrap();
    assert!(
        victim_now == "the victim's own content",
        "the victim was written through a link: now {} bytes",
        victim_now.len()
    );
    let victim_mode = std::fs::metadata(&victim).unwrap().permissions().mode() & 0o777;
    assert_eq!(victim_mode, 0o600, "the victim was chmodded");
    for name in ["ca-cert.pem", "ca-bundle.pem"] {
        let meta = std::fs::symlink_metadata(export.join(name)).unwrap();
        assert!(meta.file_type().is_file(), "{name} is not a regular file");
        assert_eq!(meta.permissions().mode() & 0o777, 0o644, "{name}");
    }
    let cert = std::fs::read_to_string(export.join("ca-cert.pem")).unwrap();
    let bundle = std::fs::read_to_string(export.join("ca-bundle.pem")).unwrap();
    assert_eq!(cert, proxy.ca_pem);
    assert!(bundle.starts_with(&cert) && bundle.len() > cert.len());
}

#[test]
fn flags_beat_variables() {
    let routes = "routes:\n  - host: a.test\n";
    let err = ProxyBuilder::new(routes)
        .env("EGRESS_PROXY_MAX_HEADER_BYTES", "10")
        .try_start()
        .err()
        .unwrap();
    assert!(err.contains("--max-header-bytes"), "{err}");
    // The flag wins over the same (broken) variable.
    ProxyBuilder::new(routes)
        .env("EGRESS_PROXY_MAX_HEADER_BYTES", "10")
        .arg("--max-header-bytes")
        .arg("65536")
        .start();
}

#[test]
fn the_running_proxy_is_not_dumpable_and_writes_no_core() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // Run as an unprivileged user (as the image does): a dumpable process's /proc files
    // belong to that user; a non-dumpable one's to root.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let routes = write_file(dir.path(), "routes.yaml", "routes:\n  - host: a.test\n");
    std::fs::set_permissions(&routes, std::fs::Permissions::from_mode(0o644)).unwrap();
    let ca = dir.path().join("ca");
    std::fs::create_dir(&ca).unwrap();
    std::os::unix::fs::chown(&ca, Some(65534), Some(65534)).unwrap();
    // Port 0 (a port picked here could be taken before the proxy binds it); the start
    // line says the proxy is listening.
    let mut child = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .arg("--routes")
        .arg(&routes)
        .arg("--ca-dir")
        .arg(&ca)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (serving, started) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains("egress-proxy serving") {
                let _ = serving.send(());
            }
        }
    });
    let up = started
        .recv_timeout(std::time::Duration::from_secs(10))
        .is_ok();
    let pid = child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let environ_owner = std::fs::metadata(format!("/proc/{pid}/environ"))
        .unwrap()
        .uid();
    let _ = child.kill();
    let _ = child.wait();
    assert!(up, "proxy did not start as uid 65534");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains("65534")),
        "{status}"
    );
    assert_eq!(
        environ_owner, 0,
        "non-dumpable: /proc/PID files belong to root"
    );
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], ["0", "0"], "{core}");
}

#[test]
fn a_routes_file_the_proxy_user_cannot_read_is_named_with_owner_and_mode() {
    use std::os::unix::fs::PermissionsExt;
    // The orchestrator's mistake: a root-owned 0600 file, the proxy running as 65532.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let routes = write_file(dir.path(), "routes.yaml", "routes:\n  - host: a.test\n");
    std::fs::set_permissions(&routes, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65532",
            "--regid=65532",
            "--clear-groups",
            BIN,
            "check",
        ])
        .arg(&routes)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(routes.to_str().unwrap()), "{err}");
    assert!(
        err.contains("owner uid 0")
            && err.contains("mode 0600")
            && err.contains("runs as uid 65532"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
