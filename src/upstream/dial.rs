//! Reaching an upstream: the addresses a target may be dialled at (the operator's pins,
//! else DNS answers that pass the destination rules), the TCP connection (directly or
//! through the upstream proxy's CONNECT tunnel) and the verified TLS handshake, all within
//! the connect timeout. Every failure is named precisely for `Proxy-Status`.

use std::io;
use std::net::SocketAddr;

use http::{Request, Uri};
use hyper::client::conn::http1;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{Target, Upstream};
use crate::chain::ProxyUrl;
use crate::destination;
use crate::error::{ErrorKind, ProxyBody, ProxyError};
use crate::readahead::ReadAhead;
use crate::routes::Host;

impl Upstream {
    /// Reaches `target` (directly, or through the upstream proxy unless `NO_PROXY`
    /// matches) and, for TLS targets, completes a verified handshake, all within the
    /// connect timeout. Returns the stream and whether ALPN chose HTTP/2.
    pub(super) async fn dial(
        &self,
        target: &Target,
        tls: &TlsConnector,
    ) -> Result<(BoxedIo, bool), ProxyError> {
        let work = async {
            let via = self
                .settings
                .proxy
                .as_ref()
                .filter(|_| !self.settings.no_proxy.matches(&target.host, target.port));
            let io: BoxedIo = match via {
                Some(proxy) => Box::new(self.tunnel_through(proxy, target).await?),
                None => {
                    let addrs = self.resolve(target).await?;
                    Box::new(connect_any(target, &addrs).await?)
                }
            };
            if !target.tls {
                return Ok((io, false));
            }
            let stream = tls
                .connect(server_name(&target.host)?, ReadAhead::new(io))
                .await
                .map_err(|e| classify_tls_error(target, &e))?;
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            Ok((Box::new(stream) as BoxedIo, h2))
        };
        tokio::time::timeout(self.settings.connect_timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(ProxyError::new(
                    ErrorKind::UpstreamConnectTimeout,
                    format!(
                        "connecting to {}:{} took longer than {}s",
                        target.host,
                        target.port,
                        self.settings.connect_timeout.as_secs_f64()
                    ),
                ))
            })
    }

    /// Opens a CONNECT tunnel to `target` through the upstream proxy, naming the target
    /// by hostname. Any failure to get a 2xx from the proxy is `upstream_proxy_refused`.
    async fn tunnel_through(
        &self,
        proxy: &ProxyUrl,
        target: &Target,
    ) -> Result<TokioIo<Upgraded>, ProxyError> {
        let refused = |received: Option<u16>, why: String| {
            ProxyError::new(
                ErrorKind::UpstreamProxyRefused { received },
                format!(
                    "upstream proxy {proxy} for {}:{}: {why}",
                    target.host, target.port
                ),
            )
        };
        let addrs = match self.settings.resolve.get(&(proxy.host.clone(), proxy.port)) {
            Some(pinned) => pinned
                .iter()
                .map(|ip| SocketAddr::new(*ip, proxy.port))
                .collect(),
            None => match &proxy.host {
                Host::Ip(ip) => vec![SocketAddr::new(*ip, proxy.port)],
                Host::Name(name) => tokio::net::lookup_host((name.as_str(), proxy.port))
                    .await
                    .map_err(|e| refused(None, format!("cannot resolve the proxy: {e}")))?
                    .collect(),
            },
        };
        let mut tcp = None;
        let mut last_error = String::from("no address");
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    tcp = Some(s);
                    break;
                }
                Err(e) => last_error = e.to_string(),
            }
        }
        let tcp = tcp.ok_or_else(|| refused(None, format!("cannot connect: {last_error}")))?;
        let io: BoxedIo = if proxy.tls {
            let stream = self
                .tls_h1
                .connect(server_name(&proxy.host)?, tcp)
                .await
                .map_err(|e| {
                    let mut err = classify_tls_error(target, &e);
                    err.reason = format!("TLS with upstream proxy {proxy}: {e}");
                    err
                })?;
            Box::new(stream)
        } else {
            Box::new(tcp)
        };
        let (mut sender, conn) = http1::Builder::new()
            .handshake::<_, ProxyBody>(TokioIo::new(io))
            .await
            .map_err(|e| refused(None, e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let authority = format!("{}:{}", target.host.authority_form(), target.port);
        let mut connect = Request::new(crate::error::empty_body());
        *connect.method_mut() = http::Method::CONNECT;
        *connect.uri_mut() =
            Uri::try_from(authority.as_str()).map_err(|e| refused(None, e.to_string()))?;
        if let Ok(v) = http::HeaderValue::from_str(&authority) {
            connect.headers_mut().insert(http::header::HOST, v);
        }
        if let Some(auth) = &proxy.authorization {
            connect
                .headers_mut()
                .insert(http::header::PROXY_AUTHORIZATION, auth.clone());
        }
        let response = sender
            .send_request(connect)
            .await
            .map_err(|e| refused(None, format!("closed before answering the CONNECT: {e}")))?;
        let status = response.status();
        if !status.is_success() {
            return Err(refused(
                Some(status.as_u16()),
                format!("answered the CONNECT with {status}"),
            ));
        }
        hyper::upgrade::on(response)
            .await
            .map(TokioIo::new)
            .map_err(|e| refused(Some(status.as_u16()), format!("tunnel failed: {e}")))
    }

    /// The addresses to dial: the operator's pin, the IP literal, or DNS answers, each
    /// checked against the destination rules (a pin is trusted as given).
    async fn resolve(&self, target: &Target) -> Result<Vec<SocketAddr>, ProxyError> {
        let own = &self.settings.own_listeners;
        let refuse = |addr: SocketAddr, why: destination::Refused| {
            ProxyError::new(
                ErrorKind::DestinationNotAllowed,
                format!(
                    "{} resolves to {}, {}",
                    target.host,
                    addr.ip(),
                    why.describe()
                ),
            )
        };
        if let Some(pinned) = self
            .settings
            .resolve
            .get(&(target.host.clone(), target.port))
        {
            let addrs: Vec<SocketAddr> = pinned
                .iter()
                .map(|ip| SocketAddr::new(*ip, target.port))
                .collect();
            for a in &addrs {
                if destination::is_own_listener(*a, own) {
                    return Err(refuse(*a, destination::Refused::OwnListener));
                }
            }
            return Ok(addrs);
        }
        let addrs: Vec<SocketAddr> = match &target.host {
            Host::Ip(ip) => vec![SocketAddr::new(*ip, target.port)],
            Host::Name(name) => tokio::net::lookup_host((name.as_str(), target.port))
                .await
                .map_err(|e| {
                    ProxyError::new(
                        ErrorKind::UpstreamDns,
                        format!("cannot resolve {name}: {e}"),
                    )
                })?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(ProxyError::new(
                ErrorKind::UpstreamDns,
                format!("{} has no address", target.host),
            ));
        }
        // Every answer is checked: one private address among public ones is refused
        // rather than skipped, since a rebinding answer has no business in a public name.
        for a in &addrs {
            destination::check(*a, target.allow_private, own).map_err(|why| refuse(*a, why))?;
        }
        Ok(addrs)
    }
}

async fn connect_any(target: &Target, addrs: &[SocketAddr]) -> Result<TcpStream, ProxyError> {
    let mut last: Option<io::Error> = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    let e = last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"));
    let kind = if e.kind() == io::ErrorKind::ConnectionRefused {
        ErrorKind::UpstreamRefused
    } else {
        ErrorKind::UpstreamUnavailable
    };
    Err(ProxyError::new(
        kind,
        format!("cannot connect to {}:{}: {e}", target.host, target.port),
    ))
}

fn classify_tls_error(target: &Target, e: &io::Error) -> ProxyError {
    let tls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let kind = match tls {
        Some(rustls::Error::InvalidCertificate(_))
        | Some(rustls::Error::NoCertificatesPresented) => ErrorKind::UpstreamTlsCertificate,
        _ => ErrorKind::UpstreamTlsProtocol,
    };
    ProxyError::new(kind, format!("TLS with {}: {e}", target.host))
}

/// Any upstream stream: TCP, TLS over TCP, or either inside an upstream proxy's tunnel.
pub(super) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
pub(super) type BoxedIo = Box<dyn Io>;

fn server_name(host: &Host) -> Result<ServerName<'static>, ProxyError> {
    match host {
        Host::Ip(ip) => Ok(ServerName::IpAddress((*ip).into())),
        Host::Name(n) => ServerName::try_from(n.clone()).map_err(|e| {
            ProxyError::new(
                ErrorKind::UpstreamTlsProtocol,
                format!("{n} is not a TLS server name: {e}"),
            )
        }),
    }
}
