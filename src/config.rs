//! The command line and environment (SPEC §2), turned into a checked [`Config`].
//!
//! Every option has a flag and a variable; clap gives the flag precedence over the
//! variable and the variable over the default. Whatever cannot be right (an address
//! that does not parse, a `--resolve` entry without a port, an unreadable upstream CA)
//! fails here, before anything listens, with one line naming the option.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::chain::{NoProxy, ProxyUrl};
use crate::policy::Mode;
use crate::routes::Host;
use crate::upstream::ResolveMap;

#[derive(Debug, Parser)]
#[command(
    name = "egress-proxy",
    version,
    about = "TLS-intercepting egress sidecar for AI agents",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default).
    Run(Box<RunArgs>),
    /// Validate a routes file and the token variables it names; exit 0 or 1.
    Check {
        /// The routes file to check.
        routes_file: PathBuf,
    },
    /// Manage the bottle CA.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Exit 0 when a running proxy's /healthz answers 200.
    Health {
        #[arg(long, env = "EGRESS_PROXY_ADMIN", default_value = "127.0.0.1:9090")]
        admin: String,
    },
    /// Work with routes files.
    #[command(subcommand)]
    Routes(RoutesCommand),
}

#[derive(Debug, Subcommand)]
pub enum RoutesCommand {
    /// Draft a routes file (YAML, on stdout) from audit logs: what their `allow` and
    /// `report` requests did.
    Suggest {
        /// Start from this routes file: its routes come first, unchanged, and only what
        /// they do not allow is added. Its token variables and files need not exist.
        #[arg(long, value_name = "FILE")]
        routes: Option<PathBuf>,
        /// A path prefix (holding a literal segment) with more distinct children than this
        /// becomes `prefix/**`.
        #[arg(long, value_name = "N", default_value_t = 8)]
        max_literal: usize,
        /// Audit logs (JSON lines); standard input when none is given, or for `-`.
        #[arg(value_name = "LOG")]
        logs: Vec<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Mint the CA if absent; print the certificate path.
    Init {
        #[arg(long, env = "EGRESS_PROXY_CA_DIR", default_value = "./egress-proxy-ca")]
        ca_dir: PathBuf,
    },
    /// Print the CA certificate (PEM).
    Show {
        #[arg(long, env = "EGRESS_PROXY_CA_DIR", default_value = "./egress-proxy-ca")]
        ca_dir: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Proxy listener address.
    #[arg(long, env = "EGRESS_PROXY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Routes file (YAML or JSON).
    #[arg(
        long,
        env = "EGRESS_PROXY_ROUTES",
        default_value = "/etc/egress-proxy/routes.yaml"
    )]
    pub routes: PathBuf,
    /// Directory of ca-key.pem and ca-cert.pem (minted when absent).
    #[arg(long, env = "EGRESS_PROXY_CA_DIR", default_value = "./egress-proxy-ca")]
    pub ca_dir: PathBuf,
    /// Also write ca-cert.pem and ca-bundle.pem here, for the agent.
    #[arg(long, env = "EGRESS_PROXY_CA_EXPORT")]
    pub ca_export: Option<PathBuf>,
    /// Admin listener address (/healthz, /readyz, /metrics, /ca.pem).
    #[arg(long, env = "EGRESS_PROXY_ADMIN", default_value = "127.0.0.1:9090")]
    pub admin: String,
    /// Chain upstream connections through this proxy (http:// or https://).
    /// Falls back to HTTPS_PROXY, then https_proxy.
    #[arg(long, env = "EGRESS_PROXY_UPSTREAM_PROXY")]
    pub upstream_proxy: Option<String>,
    /// Hosts that bypass the upstream proxy. Falls back to NO_PROXY, then no_proxy.
    #[arg(long)]
    pub no_proxy: Option<String>,
    /// Extra PEM roots trusted for upstream TLS, on top of the public roots.
    #[arg(long, env = "EGRESS_PROXY_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,
    /// Pin an upstream address, as curl --resolve does: HOST:PORT:ADDR (repeatable).
    #[arg(long, env = "EGRESS_PROXY_RESOLVE", value_delimiter = ',')]
    pub resolve: Vec<String>,
    /// Log line format.
    #[arg(
        long,
        env = "EGRESS_PROXY_LOG_FORMAT",
        value_enum,
        default_value = "json"
    )]
    pub log_format: LogFormat,
    /// Seconds SIGTERM waits for in-flight requests.
    #[arg(long, env = "EGRESS_PROXY_SHUTDOWN_GRACE", default_value_t = 10)]
    pub shutdown_grace: u64,
    /// Seconds for upstream TCP connect + TLS handshake (or the upstream proxy's CONNECT).
    #[arg(long, env = "EGRESS_PROXY_CONNECT_TIMEOUT", default_value_t = 10)]
    pub connect_timeout: u64,
    /// Seconds from request sent to response head, and the longest silence inside a body.
    #[arg(long, env = "EGRESS_PROXY_RESPONSE_TIMEOUT", default_value_t = 600)]
    pub response_timeout: u64,
    /// Seconds for the agent's CONNECT head, then its TLS handshake.
    #[arg(long, env = "EGRESS_PROXY_CLIENT_TIMEOUT", default_value_t = 10)]
    pub client_timeout: u64,
    /// Seconds an agent connection may sit with no request in flight.
    #[arg(long, env = "EGRESS_PROXY_IDLE_TIMEOUT", default_value_t = 60)]
    pub idle_timeout: u64,
    /// Open agent connections; beyond it, 503 too_many_connections.
    #[arg(long, env = "EGRESS_PROXY_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Request head size limit (431) and upstream response head limit (502).
    #[arg(long, env = "EGRESS_PROXY_MAX_HEADER_BYTES", default_value_t = 65536)]
    pub max_header_bytes: usize,
    /// What no route allows: refused (enforce), or forwarded without a token and logged
    /// as `report`, to learn the routes an agent needs.
    #[arg(long, env = "EGRESS_PROXY_MODE", value_enum, default_value = "enforce")]
    pub mode: ModeArg,
}

/// `--mode` as the command line spells it; the policy's [`Mode`] knows nothing of clap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    Enforce,
    Report,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Enforce => Mode::Enforce,
            ModeArg::Report => Mode::Report,
        }
    }
}

/// A checked run configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub routes: PathBuf,
    pub ca_dir: PathBuf,
    pub ca_export: Option<PathBuf>,
    pub upstream_proxy: Option<ProxyUrl>,
    pub no_proxy: NoProxy,
    pub upstream_roots: Vec<CertificateDer<'static>>,
    pub resolve: ResolveMap,
    pub log_format: LogFormat,
    pub shutdown_grace: Duration,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub client_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub mode: Mode,
}

/// Reads a variable, treating an empty value as unset.
fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl Config {
    /// Checks `args` (with the variables clap does not read itself) into a `Config`.
    pub fn from_args(args: RunArgs) -> Result<Config, String> {
        let addr = |flag: &str, v: &str| -> Result<SocketAddr, String> {
            v.parse()
                .map_err(|_| format!("--{flag} {v:?}: not an address like 127.0.0.1:8080"))
        };
        let secs = |flag: &str, v: u64| -> Result<Duration, String> {
            if v == 0 {
                Err(format!("--{flag} must be at least 1 second"))
            } else {
                Ok(Duration::from_secs(v))
            }
        };
        if args.max_connections == 0 {
            return Err("--max-connections must be at least 1".into());
        }
        if args.max_header_bytes < 1024 {
            return Err("--max-header-bytes must be at least 1024".into());
        }
        let upstream_proxy = [
            (
                "--upstream-proxy",
                args.upstream_proxy.filter(|v| !v.trim().is_empty()),
            ),
            ("HTTPS_PROXY", env_nonempty("HTTPS_PROXY")),
            ("https_proxy", env_nonempty("https_proxy")),
        ]
        .into_iter()
        .find_map(|(source, v)| v.map(|v| (source, v)))
        .map(|(source, v)| {
            ProxyUrl::parse(&v)
                .map_err(|e| format!("{source} {:?}: {e}", crate::chain::redact_userinfo(&v)))
        })
        .transpose()?;
        let no_proxy = args
            .no_proxy
            .or_else(|| env_nonempty("NO_PROXY"))
            .or_else(|| env_nonempty("no_proxy"))
            .map(|list| NoProxy::parse(&list).map_err(|e| format!("--no-proxy: {e}")))
            .transpose()?
            .unwrap_or_default();
        let upstream_roots = match &args.upstream_ca {
            None => Vec::new(),
            Some(path) => {
                let roots = CertificateDer::pem_file_iter(path)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("--upstream-ca {}: {e}", path.display()))?;
                if roots.is_empty() {
                    return Err(format!(
                        "--upstream-ca {}: no PEM certificate in it",
                        path.display()
                    ));
                }
                // Checked here, before anything listens, rather than when the TLS client
                // configuration is built.
                let mut store = rustls::RootCertStore::empty();
                for (i, der) in roots.iter().enumerate() {
                    store.add(der.clone()).map_err(|e| {
                        format!(
                            "--upstream-ca {}: certificate #{} is not a usable root: {e}",
                            path.display(),
                            i + 1
                        )
                    })?;
                }
                roots
            }
        };
        let mut resolve = ResolveMap::new();
        for entry in args.resolve.iter().filter(|e| !e.trim().is_empty()) {
            let (host, port, ip) = parse_resolve(entry.trim())
                .ok_or_else(|| format!("--resolve {entry:?}: expected HOST:PORT:ADDR"))?;
            resolve.entry((host, port)).or_default().push(ip);
        }
        Ok(Config {
            listen: addr("listen", &args.listen)?,
            admin: addr("admin", &args.admin)?,
            routes: args.routes,
            ca_dir: args.ca_dir,
            ca_export: args.ca_export,
            upstream_proxy,
            no_proxy,
            upstream_roots,
            resolve,
            log_format: args.log_format,
            shutdown_grace: Duration::from_secs(args.shutdown_grace),
            connect_timeout: secs("connect-timeout", args.connect_timeout)?,
            response_timeout: secs("response-timeout", args.response_timeout)?,
            client_timeout: secs("client-timeout", args.client_timeout)?,
            idle_timeout: secs("idle-timeout", args.idle_timeout)?,
            max_connections: args.max_connections,
            max_header_bytes: args.max_header_bytes,
            mode: args.mode.into(),
        })
    }
}

/// `HOST:PORT:ADDR`, where HOST may be a bracketed IPv6 literal and ADDR an IPv4 or IPv6
/// address (brackets optional).
fn parse_resolve(entry: &str) -> Option<(Host, u16, IpAddr)> {
    let (host, rest) = if entry.starts_with('[') {
        let end = entry.find(']')?;
        (&entry[..=end], entry[end + 1..].strip_prefix(':')?)
    } else {
        entry.split_once(':')?
    };
    let (port, addr) = rest.split_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let addr = addr.trim_start_matches('[').trim_end_matches(']');
    Some((Host::parse(host).ok()?, port, addr.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_entries() {
        let (h, p, a) = parse_resolve("api.example.com:443:127.0.0.1").unwrap();
        assert_eq!(
            (h.to_string().as_str(), p, a.to_string().as_str()),
            ("api.example.com", 443, "127.0.0.1")
        );
        let (_, _, a) = parse_resolve("API.example.com:443:[::1]").unwrap();
        assert_eq!(a.to_string(), "::1");
        let (_, _, a) = parse_resolve("x.example:8443:::1").unwrap();
        assert_eq!(a.to_string(), "::1");
        let (h, _, _) = parse_resolve("[::1]:443:127.0.0.1").unwrap();
        assert_eq!(h.to_string(), "::1");
        for bad in [
            "x.example:443",
            "x.example:0:1.2.3.4",
            "x.example:443:nope",
            ":443:1.2.3.4",
        ] {
            assert!(parse_resolve(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn flag_beats_default() {
        let cli = Cli::try_parse_from([
            "egress-proxy",
            "--listen",
            "0.0.0.0:1",
            "--idle-timeout",
            "5",
        ])
        .unwrap();
        let c = Config::from_args(cli.run).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:1");
        assert_eq!(c.idle_timeout, Duration::from_secs(5));
        assert_eq!(c.response_timeout, Duration::from_secs(600));
        assert_eq!(c.mode, Mode::Enforce);
        let cli = Cli::try_parse_from(["egress-proxy", "--mode", "report"]).unwrap();
        assert_eq!(Config::from_args(cli.run).unwrap().mode, Mode::Report);
        let e = Cli::try_parse_from(["egress-proxy", "--mode", "audit"]).unwrap_err();
        let e = e.to_string();
        assert!(e.contains("--mode") && e.contains("audit"), "{e}");
        let cli = Cli::try_parse_from(["egress-proxy", "run", "--listen", "nope"]).unwrap();
        let e = Config::from_args(match cli.command {
            Some(Command::Run(r)) => *r,
            _ => unreachable!(),
        })
        .unwrap_err();
        assert!(e.contains("--listen"), "{e}");
    }
}
