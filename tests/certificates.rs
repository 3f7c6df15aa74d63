//! The bottle CA and its leaves pass strict X.509 verification: OpenSSL's `-x509_strict`
//! and Python's `VERIFY_X509_STRICT` (on by default in Python 3.13's default context, so
//! for httpx and the model SDKs).

mod common;

use std::process::Stdio;

use common::*;
use rustls_pki_types::CertificateDer;

fn pem(der: &CertificateDer<'_>) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

async fn openssl(args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new("openssl")
        .args(args)
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn leaves_pass_openssl_x509_strict() {
    let ca = TestCa::new("upstream");
    let up = Upstream::start(&ca, &["api.test", "127.0.0.1"], &[b"http/1.1"]).await;
    let port = up.port();
    let routes = format!(
        "routes:\n  - host: api.test\n    ports: [{port}]\n  - host: 127.0.0.1\n    ports: [{port}]\n  - host: other.test\n    ports: [{port}]\n"
    );
    let proxy = ProxyBuilder::new(&routes)
        .upstream(&ca, &[("api.test", port), ("other.test", port)])
        .start();
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &proxy.ca_pem).unwrap();
    let ca_path = ca_path.to_str().unwrap().to_owned();

    let (ok, text) = openssl(&["x509", "-in", &ca_path, "-noout", "-text"]).await;
    assert!(ok, "{text}");
    assert!(text.contains("CA:TRUE, pathlen:0"), "{text}");
    assert!(
        text.contains("X509v3 Basic Constraints: critical"),
        "{text}"
    );
    assert!(
        text.contains("X509v3 Key Usage: critical\n                Certificate Sign\n"),
        "{text}"
    );
    assert!(text.contains("X509v3 Subject Key Identifier"), "{text}");
    assert!(text.contains("ASN1 OID: prime256v1"), "{text}");

    let mut serials = Vec::new();
    for (name, check) in [
        ("api.test", "-verify_hostname"),
        ("other.test", "-verify_hostname"),
        ("127.0.0.1", "-verify_ip"),
    ] {
        let tls = proxy.tunnel(name, port, &[b"http/1.1"]).await;
        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        let leaf_path = dir.path().join(format!("{name}.pem"));
        std::fs::write(&leaf_path, pem(&leaf)).unwrap();
        let leaf_path = leaf_path.to_str().unwrap();
        let (ok, text) = openssl(&[
            "verify",
            "-x509_strict",
            "-purpose",
            "sslserver",
            check,
            name,
            "-CAfile",
            &ca_path,
            leaf_path,
        ])
        .await;
        assert!(ok, "{name}: {text}");
        let (_, text) = openssl(&["x509", "-in", leaf_path, "-noout", "-text"]).await;
        assert!(text.contains("X509v3 Authority Key Identifier"), "{text}");
        assert!(text.contains("TLS Web Server Authentication"), "{text}");
        assert!(!text.contains("CA:TRUE"), "{text}");
        if name == "127.0.0.1" {
            assert!(text.contains("IP Address:127.0.0.1"), "{text}");
        } else {
            assert!(text.contains(&format!("DNS:{name}")), "{text}");
            assert!(!text.contains("DNS:*"), "never a wildcard: {text}");
        }
        let (_, serial) = openssl(&["x509", "-in", leaf_path, "-noout", "-serial"]).await;
        serials.push(serial);
    }
    serials.sort();
    serials.dedup();
    assert_eq!(serials.len(), 3, "every leaf has its own serial");
}

#[tokio::test]
async fn python_with_verify_x509_strict_talks_through_the_proxy() {
    let ca = TestCa::new("upstream");
    let up = Upstream::start(&ca, &["api.test"], &[b"http/1.1"]).await;
    let port = up.port();
    let routes = format!(
        "routes:\n  - host: api.test\n    ports: [{port}]\n    auth_scheme: Bearer\n    token_env: T\n"
    );
    let proxy = ProxyBuilder::new(&routes)
        .upstream(&ca, &[("api.test", port)])
        .env("T", "py-token")
        .start();
    let script = r#"
import http.client, ssl, sys, json
proxy_host, proxy_port, port, cafile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ctx = ssl.create_default_context(cafile=cafile)
ctx.verify_flags |= ssl.VERIFY_X509_STRICT
c = http.client.HTTPSConnection(proxy_host, proxy_port, context=ctx, timeout=10)
c.set_tunnel("api.test", port)
c.request("GET", "/v1/python", headers={"Authorization": "Bearer nope"})
r = c.getresponse()
body = json.loads(r.read())
print(r.status, body["headers"]["authorization"])
"#;
    let out = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg("127.0.0.1")
        .arg(proxy.addr.port().to_string())
        .arg(port.to_string())
        .arg(proxy.ca_cert_path())
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "200 Bearer py-token"
    );
}
