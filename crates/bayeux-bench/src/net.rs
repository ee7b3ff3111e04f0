//! The server address, and TCP connections bound to rotating source addresses.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

use crate::BenchError;
use crate::link::LinkError;

/// Where the clients connect, and from where.
pub(crate) struct Target {
    /// The resolved server address.
    pub(crate) addr: SocketAddr,
    /// `host:port` for the Host header.
    pub(crate) host_header: String,
    /// Path and query of the endpoint.
    pub(crate) path: String,
    /// `ws://host:port/path?query`.
    pub(crate) ws_url: String,
    sources: Vec<IpAddr>,
    next_source: AtomicUsize,
    connect_timeout: Duration,
}

impl Target {
    /// Parses and resolves `url`.
    pub(crate) async fn resolve(
        url: &str,
        sources: Vec<IpAddr>,
        connect_timeout: Duration,
    ) -> Result<Target, BenchError> {
        let parsed = url::Url::parse(url).map_err(|e| BenchError::Url(format!("{url}: {e}")))?;
        match parsed.scheme() {
            "http" | "ws" => {}
            other => {
                return Err(BenchError::Url(format!(
                    "{url}: scheme {other} is not supported (use http:// or ws://)"
                )));
            }
        }
        let host = parsed
            .host_str()
            .ok_or_else(|| BenchError::Url(format!("{url}: no host")))?
            .to_owned();
        let port = parsed.port().unwrap_or(80);
        let mut path = parsed.path().to_owned();
        if let Some(q) = parsed.query() {
            path.push('?');
            path.push_str(q);
        }
        let lookup = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((lookup.as_str(), port))
            .await
            .map_err(|e| BenchError::Url(format!("{url}: cannot resolve {host}: {e}")))?
            .collect();
        let addr = match sources.first() {
            Some(src) => addrs.iter().find(|a| a.is_ipv4() == src.is_ipv4()),
            None => addrs.first(),
        }
        .copied()
        .ok_or_else(|| {
            BenchError::Url(format!(
                "{url}: {host} has no address of the source addresses' family"
            ))
        })?;
        let host_header = format!("{host}:{port}");
        let ws_url = format!("ws://{host_header}{path}");
        Ok(Target {
            addr,
            host_header,
            path,
            ws_url,
            sources,
            next_source: AtomicUsize::new(0),
            connect_timeout,
        })
    }

    /// Opens a TCP connection, bound to the next source address when there are some.
    pub(crate) async fn connect(&self) -> Result<TcpStream, LinkError> {
        let attempt = async {
            let stream = if self.sources.is_empty() {
                TcpStream::connect(self.addr).await?
            } else {
                let i = self.next_source.fetch_add(1, Ordering::Relaxed) % self.sources.len();
                let src = self.sources[i];
                let socket = if src.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                socket.bind(SocketAddr::new(src, 0))?;
                socket.connect(self.addr).await?
            };
            stream.set_nodelay(true)?;
            Ok::<_, std::io::Error>(stream)
        };
        match tokio::time::timeout(self.connect_timeout, attempt).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(LinkError::Connect(e)),
            Err(_) => Err(LinkError::ConnectTimeout),
        }
    }

    /// The connect timeout (also bounds a WebSocket upgrade).
    pub(crate) fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }
}
