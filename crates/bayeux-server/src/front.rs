//! The HTTP/1.1 front end: accepts connections, reads requests (parsed by `httparse`), hands
//! them to the Bayeux endpoint (straight, when the endpoint has a path of its own) or to the
//! axum router, and writes the responses. A WebSocket upgrade of the Bayeux endpoint turns its
//! connection into a WebSocket run by the WebSocket transport.
//!
//! Why not hyper's server: memory per idle client. A held long-poll is a connection whose request
//! is in the handler for up to `connect_timeout_ms`, and hyper keeps its 8 KiB read buffer (grown
//! to 16 KiB by the adaptive read strategy) and an 8 KiB header buffer allocated for the whole
//! life of every connection, with no setting to shrink them: 20 KiB or more per held client when
//! everything else a held long-poll needs takes a few KiB. Here a connection holds a read buffer
//! only while it reads a request: the buffer is released before the request goes to the
//! handler, and a connection waiting for its next request holds none.
//!
//! What it does: HTTP/1.0 and 1.1, keep-alive, pipelined requests (answered in order),
//! `Content-Length` and chunked request bodies, `Expect: 100-continue`, `HEAD`. Responses are
//! written in one write with a `Content-Length`. Limits: the request head
//! (`limits.max_header_bytes`: a longer request line gets 414, longer headers 431), the body
//! (`limits.max_body_bytes`: 413, from the Bayeux endpoint in Bayeux's error format), and the
//! time to read a request once its first byte arrived (`timeouts.request_read_timeout_ms`; the
//! connection is closed). Malformed requests get 400 and the connection is closed.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header,
};
use bayeux_protocol::ErrorKind;
use bytes::{Buf, Bytes, BytesMut};
use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tower::ServiceExt;

use crate::broker::Broker;
use crate::transport::ws_socket::WsSocket;
use crate::transport::{BodyError, websocket};

/// Most header fields in one request; more get 431.
const MAX_HEADERS: usize = 100;
/// What the read buffer grows by.
const READ_CHUNK: usize = 4096;
/// After a response that closes the connection while request bytes are still unread (a body
/// refused as too large), how much more is read and dropped, and for how long, so that the
/// client gets the response rather than a reset.
const DRAIN_BYTES: usize = 1 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(1);

/// Serves `router` (and the WebSocket endpoint of `broker`) on `listener` until `shutdown`
/// resolves or the broker stops; then the broker is stopped, the listener closed, and open
/// connections given `timeouts.shutdown_grace_ms` to finish.
pub(crate) async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    let front = Arc::new(Front::new(broker.clone(), router));
    let open = Arc::new(OpenConnections::default());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    let _ = stream.set_nodelay(true);
                    let guard = open.enter();
                    let front = front.clone();
                    tokio::spawn(async move {
                        let broker = front.broker.clone();
                        let Some((socket, headers)) = front.connection(stream, remote).await
                        else {
                            drop(guard);
                            return;
                        };
                        // A WebSocket gets a task of its own, as large as it needs: this
                        // one's size is paid by every connection. Its future is made here and
                        // mapped, not awaited in an `async` block, which would store the
                        // arguments beside the future they are moved into (memory per socket).
                        let run = websocket::run(socket, broker, headers, Some(remote));
                        tokio::spawn(futures::FutureExt::map(run, move |()| drop(guard)));
                    });
                }
                Err(e) => {
                    // Out of descriptors, most likely: wait for some to be released.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = &mut shutdown => {
                tracing::info!("shutting down");
                broker.shutdown();
                break;
            }
            _ = broker.stopped() => break,
        }
    }
    drop(listener);
    let grace = Duration::from_millis(broker.config().timeouts.shutdown_grace_ms);
    if tokio::time::timeout(grace, open.all_closed())
        .await
        .is_err()
    {
        tracing::warn!("open requests did not finish within the shutdown grace period");
    }
}

/// Counts open connections, so that shutdown can wait for them.
#[derive(Default)]
struct OpenConnections {
    count: AtomicUsize,
    closed: Notify,
}

struct OpenGuard(Arc<OpenConnections>);

impl OpenConnections {
    fn enter(self: &Arc<Self>) -> OpenGuard {
        self.count.fetch_add(1, Ordering::AcqRel);
        OpenGuard(self.clone())
    }

    async fn all_closed(&self) {
        loop {
            let notified = self.closed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.closed.notify_waiters();
        }
    }
}

/// What every connection shares.
struct Front {
    broker: Arc<Broker>,
    router: Router,
    /// Requests to the Bayeux endpoint go straight to it, not through the router: the router's
    /// matching and its layers of boxed futures cost more than the rest of a small request (CPU
    /// per delivery). Not when the endpoint is at `/`: it shares its path with the other
    /// routes then, and the router picks.
    direct: bool,
    max_head: usize,
    max_body: usize,
    read_timeout: Duration,
}

/// Why a request could not be read.
enum ReadError {
    /// The connection closed or failed: nothing to answer.
    Closed,
    /// Answer this status (empty body) and close.
    Status(StatusCode),
}

impl From<std::io::Error> for ReadError {
    fn from(_: std::io::Error) -> Self {
        ReadError::Closed
    }
}

/// How the request body is delimited.
enum Framing {
    Empty,
    Length(u64),
    /// `close`: the request also had a Content-Length, so the connection is not reused.
    Chunked {
        close: bool,
    },
}

/// What a connection does with a request it read.
enum Job {
    /// Hand it to the router and write the response.
    Http {
        handler: BoxFuture<'static, Response<Body>>,
        version: Version,
        head_only: bool,
        keep_alive: bool,
        truncated: bool,
    },
    /// Turn the connection into a WebSocket.
    Upgrade(Box<Request<Body>>),
    /// Answer this status (empty body) and close.
    Refuse(StatusCode),
}

/// A request read off the connection.
struct Incoming {
    request: Request<Body>,
    /// The body was not read in full (larger than the limit): close after answering.
    truncated: bool,
    /// It is for the Bayeux endpoint.
    endpoint: bool,
}

impl Front {
    fn new(broker: Arc<Broker>, router: Router) -> Self {
        let config = broker.config();
        Front {
            max_head: config.limits.max_header_bytes,
            max_body: config.limits.max_body_bytes,
            read_timeout: Duration::from_millis(config.timeouts.request_read_timeout_ms),
            router,
            direct: config.path != "/",
            broker,
        }
    }

    /// Serves one connection until it closes or becomes a WebSocket (returned, to be run).
    ///
    /// This future lives as long as its connection (a held long-poll waits in it), so it is kept
    /// small: every step is boxed, and whatever a step needs (the request, the response) lives
    /// only inside that step's box or in a block that ends before the next wait.
    async fn connection(
        self: Arc<Self>,
        mut stream: TcpStream,
        remote: SocketAddr,
    ) -> Option<(WsSocket, HeaderMap)> {
        let mut buf = BytesMut::new();
        loop {
            if buf.is_empty() {
                // Between requests: no read buffer held until the next one arrives.
                let wait = Box::pin(async {
                    tokio::select! {
                        first = first_bytes(&stream, &mut buf) => first,
                        _ = self.broker.stopped() => false,
                    }
                });
                if !wait.await {
                    return None;
                }
            }
            // In a block, so that what was read is not kept while the handler runs.
            let job = {
                let read = Box::pin(tokio::time::timeout(
                    self.read_timeout,
                    self.read_request(&mut stream, &mut buf),
                ))
                .await;
                match read {
                    Ok(Ok(incoming)) => self.job(incoming, &mut buf, remote),
                    Ok(Err(ReadError::Status(status))) => Job::Refuse(status),
                    Ok(Err(ReadError::Closed)) | Err(_) => return None,
                }
            };
            let (handler, version, head_only, keep_alive, truncated) = match job {
                Job::Http {
                    handler,
                    version,
                    head_only,
                    keep_alive,
                    truncated,
                } => (handler, version, head_only, keep_alive, truncated),
                Job::Upgrade(request) => {
                    let handshake = Box::pin(self.websocket_handshake(stream, buf, request));
                    return handshake.await;
                }
                Job::Refuse(status) => {
                    Box::pin(async move {
                        let _ = stream.write_all(&error_head(status)).await;
                        close(stream, true).await;
                    })
                    .await;
                    return None;
                }
            };
            let keep_alive = {
                let response = handler.await;
                let keep_alive = keep_alive
                    && !self.broker.is_shutting_down()
                    && !has_token(response.headers(), header::CONNECTION, "close");
                let written = Box::pin(write_response(
                    &mut stream,
                    response,
                    version,
                    head_only,
                    keep_alive,
                ));
                if written.await.is_err() {
                    return None;
                }
                keep_alive
            };
            if !keep_alive {
                Box::pin(close(stream, truncated)).await;
                return None;
            }
        }
    }

    /// What to do with a request just read.
    fn job(&self, incoming: Incoming, buf: &mut BytesMut, remote: SocketAddr) -> Job {
        let Incoming {
            request,
            truncated,
            endpoint,
        } = incoming;
        if endpoint && is_websocket_upgrade(request.headers()) {
            return Job::Upgrade(Box::new(request));
        }
        let version = request.version();
        let head_only = request.method() == Method::HEAD;
        let keep_alive = wants_keep_alive(version, request.headers()) && !truncated;
        if buf.is_empty() {
            // Not kept while the handler runs (a long-poll is held there).
            *buf = BytesMut::new();
        }
        let handler = if endpoint && self.direct {
            crate::http::serve_endpoint(self.broker.clone(), request, Some(remote))
        } else {
            let mut request = request;
            request.extensions_mut().insert(ConnectInfo(remote));
            let routed = self.router.clone().oneshot(request);
            Box::pin(async move {
                match routed.await {
                    Ok(response) => response,
                    Err(never) => match never {},
                }
            })
        };
        Job::Http {
            handler,
            version,
            head_only,
            keep_alive,
            truncated,
        }
    }

    fn is_endpoint(&self, path: &str) -> bool {
        let base = self.broker.config().path.as_str();
        if base == "/" {
            return true;
        }
        match path.strip_prefix(base) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }

    /// Reads one request: its head, then its body.
    async fn read_request(
        &self,
        stream: &mut TcpStream,
        buf: &mut BytesMut,
    ) -> Result<Incoming, ReadError> {
        let (parts, framing) = loop {
            if !buf.is_empty()
                && let Some(head) = parse_head(buf, self.max_head)?
            {
                break head;
            }
            if read_more(stream, buf).await? == 0 {
                return Err(ReadError::Closed);
            }
        };
        let continue_expected = parts.version == Version::HTTP_11
            && parts
                .headers
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let endpoint = self.is_endpoint(parts.uri.path());
        let (body, truncated) = match framing {
            Framing::Empty => (Bytes::new(), false),
            Framing::Length(n) if n > self.max_body as u64 => {
                if !endpoint {
                    return Err(ReadError::Status(StatusCode::PAYLOAD_TOO_LARGE));
                }
                // The Bayeux endpoint answers 413 in its own format from the header alone.
                (Bytes::new(), true)
            }
            Framing::Length(n) => {
                let n = n as usize;
                if buf.len() < n {
                    if continue_expected {
                        stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
                    }
                    buf.reserve(n - buf.len());
                    while buf.len() < n {
                        if read_more(stream, buf).await? == 0 {
                            return Err(ReadError::Closed);
                        }
                    }
                }
                (buf.split_to(n).freeze(), false)
            }
            Framing::Chunked { close } => {
                if continue_expected && buf.is_empty() {
                    stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
                }
                let (body, truncated) = read_chunked(stream, buf, self.max_body).await?;
                if truncated && !endpoint {
                    return Err(ReadError::Status(StatusCode::PAYLOAD_TOO_LARGE));
                }
                (body, truncated || close)
            }
        };
        Ok(Incoming {
            request: Request::from_parts(parts, Body::from(body)),
            truncated,
            endpoint,
        })
    }

    /// Checks a WebSocket upgrade request: the accept key and an owned copy of its headers, or
    /// the response refusing it.
    #[allow(clippy::result_large_err)] // built once per WebSocket, never stored
    fn check_upgrade(&self, request: Request<Body>) -> Result<(String, HeaderMap), Response<Body>> {
        let broker = &self.broker;
        let refuse = |detail: &str| {
            BodyError::new(StatusCode::BAD_REQUEST, ErrorKind::UnknownTransport, detail)
                .response(broker)
        };
        let headers = request.headers();
        if !broker
            .config()
            .offers(bayeux_protocol::connection_type::WEBSOCKET)
        {
            return Err(refuse("the websocket transport is disabled"));
        }
        if request.method() != Method::GET {
            return Err(refuse("bad websocket upgrade: the method must be GET"));
        }
        if !has_token(headers, header::CONNECTION, "upgrade") {
            return Err(refuse(
                "bad websocket upgrade: the Connection header must contain upgrade",
            ));
        }
        if headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v.as_bytes() != b"13")
        {
            let mut r = refuse("bad websocket upgrade: Sec-WebSocket-Version must be 13");
            r.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
            return Err(r);
        }
        let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
            return Err(refuse(
                "bad websocket upgrade: Sec-WebSocket-Key is missing",
            ));
        };
        // An owned copy: the parsed values share the bytes of the read buffer, which would
        // stay allocated for the life of the socket. It is what the security policy sees with
        // each message on the socket, so the headers that only negotiate the upgrade are left
        // out (memory per idle client).
        Ok((
            derive_accept_key(key.as_bytes()),
            owned_headers(headers, UPGRADE_ONLY),
        ))
    }

    /// Answers a WebSocket upgrade of the Bayeux endpoint; the WebSocket and the request's
    /// headers when it was accepted.
    async fn websocket_handshake(
        &self,
        mut stream: TcpStream,
        buf: BytesMut,
        request: Box<Request<Body>>,
    ) -> Option<(WsSocket, HeaderMap)> {
        let version = request.version();
        let (key, headers) = match self.check_upgrade(*request) {
            Ok(accepted) => accepted,
            Err(response) => {
                if write_response(&mut stream, response, version, false, false)
                    .await
                    .is_ok()
                {
                    close(stream, false).await;
                }
                return None;
            }
        };
        let mut head = Vec::with_capacity(160);
        head.extend_from_slice(
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
              sec-websocket-accept: ",
        );
        head.extend_from_slice(key.as_bytes());
        head.extend_from_slice(b"\r\n\r\n");
        stream.write_all(&head).await.ok()?;
        let max = self.broker.config().limits.max_frame_bytes;
        // Frames the client sent right behind its upgrade request are in `buf`.
        Some((WsSocket::new(stream, buf, max), headers))
    }
}

/// Waits for the first bytes of a request and reads them into the empty `buf`, which gets
/// memory only once they are there. False at end of stream or on an error.
async fn first_bytes(stream: &TcpStream, buf: &mut BytesMut) -> bool {
    loop {
        if stream.readable().await.is_err() {
            return false;
        }
        buf.reserve(READ_CHUNK);
        match read_ready(stream, buf) {
            Ok(0) => return false,
            Ok(_) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => *buf = BytesMut::new(),
            Err(_) => return false,
        }
    }
}

/// Reads what the socket has into `buf` (growing it when full). 0 at end of stream.
async fn read_more(stream: &TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
    loop {
        stream.readable().await?;
        match read_ready(stream, buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            done => return done,
        }
    }
}

/// One read into the spare capacity of `buf`. A read that did not fill it drained the socket,
/// so the readiness is cleared here instead of by a further read that would fail with
/// `WouldBlock`: one system call less per request. Bytes that arrive later raise a new event
/// (tokio only clears the readiness it saw, and never the end-of-stream flag).
pub(crate) fn read_ready(stream: &TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    let spare = buf.capacity() - buf.len();
    let n = stream.try_read_buf(buf)?;
    if n > 0 && n < spare {
        let _ = stream.try_io(tokio::io::Interest::READABLE, || {
            Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
        });
    }
    Ok(n)
}

/// Parses the request head at the start of `buf`; `None` while it is incomplete. On success
/// the head is taken out of `buf` (the header values keep sharing its bytes).
fn parse_head(
    buf: &mut BytesMut,
    max_head: usize,
) -> Result<Option<(axum::http::request::Parts, Framing)>, ReadError> {
    let too_long = |buf: &[u8]| {
        let line_done = buf.windows(2).any(|w| w == b"\r\n") || buf.contains(&b'\n');
        ReadError::Status(if line_done {
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        } else {
            StatusCode::URI_TOO_LONG
        })
    };
    let bad = || ReadError::Status(StatusCode::BAD_REQUEST);
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            if buf.len() > max_head {
                return Err(too_long(&buf[..max_head]));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ReadError::Status(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ));
        }
        Err(_) => return Err(bad()),
    };
    if len > max_head {
        return Err(too_long(&buf[..max_head]));
    }
    let base = buf.as_ptr() as usize;
    let span = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        start..start + s.len()
    };
    let method = Method::from_bytes(req.method.ok_or_else(bad)?.as_bytes()).map_err(|_| bad())?;
    let target = span(req.path.ok_or_else(bad)?.as_bytes());
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut fields = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad())?;
        fields.push((name, span(h.value)));
    }
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target)).map_err(|_| bad())?;
    let mut headers = HeaderMap::with_capacity(fields.len());
    for (name, value) in fields {
        let value = HeaderValue::from_maybe_shared(head.slice(value)).map_err(|_| bad())?;
        headers.append(name, value);
    }
    let framing = framing(&headers)?;
    let mut parts = Request::new(()).into_parts().0;
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    Ok(Some((parts, framing)))
}

/// How the body of a request with `headers` is delimited (RFC 9112 §6.3).
fn framing(headers: &HeaderMap) -> Result<Framing, ReadError> {
    let bad = ReadError::Status(StatusCode::BAD_REQUEST);
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // Chunked must be the last coding. With a Content-Length too, the body is read as
        // chunked and the connection closed after the response (RFC 9112 §6.1).
        let last = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|c| !c.is_empty());
        if !last.is_some_and(|c| c.eq_ignore_ascii_case("chunked")) {
            return Err(bad);
        }
        return Ok(Framing::Chunked {
            close: headers.contains_key(header::CONTENT_LENGTH),
        });
    }
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for item in value
            .to_str()
            .map_err(|_| ReadError::Status(StatusCode::BAD_REQUEST))?
            .split(',')
        {
            let item = item.trim();
            if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) {
                return Err(ReadError::Status(StatusCode::BAD_REQUEST));
            }
            let n: u64 = item
                .parse()
                .map_err(|_| ReadError::Status(StatusCode::BAD_REQUEST))?;
            if length.is_some_and(|l| l != n) {
                return Err(ReadError::Status(StatusCode::BAD_REQUEST));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        None | Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
    })
}

/// Reads a chunked body; stops once more than `max` bytes arrived and returns the first
/// `max + 1` of them with `true` (the rest is left unread).
async fn read_chunked(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    max: usize,
) -> Result<(Bytes, bool), ReadError> {
    let bad = || ReadError::Status(StatusCode::BAD_REQUEST);
    let mut body = BytesMut::new();
    loop {
        let (used, size) = loop {
            match httparse::parse_chunk_size(buf) {
                Ok(httparse::Status::Complete(found)) => break found,
                Ok(httparse::Status::Partial) if buf.len() < 1024 => {
                    if read_more(stream, buf).await? == 0 {
                        return Err(ReadError::Closed);
                    }
                }
                _ => return Err(bad()),
            }
        };
        buf.advance(used);
        if size == 0 {
            // Trailer fields (ignored) up to an empty line.
            loop {
                match buf.windows(2).position(|w| w == b"\r\n") {
                    Some(0) => {
                        buf.advance(2);
                        return Ok((body.freeze(), false));
                    }
                    Some(end) => buf.advance(end + 2),
                    None if buf.len() < 8192 => {
                        if read_more(stream, buf).await? == 0 {
                            return Err(ReadError::Closed);
                        }
                    }
                    None => return Err(bad()),
                }
            }
        }
        // The chunk's data, as far as the limit lets it in.
        let mut left = usize::try_from(size).unwrap_or(usize::MAX);
        while left > 0 {
            if body.len() > max {
                return Ok((body.freeze(), true));
            }
            if buf.is_empty() && read_more(stream, buf).await? == 0 {
                return Err(ReadError::Closed);
            }
            let n = left.min(buf.len()).min(max + 1 - body.len());
            body.extend_from_slice(&buf[..n]);
            buf.advance(n);
            left -= n;
        }
        if body.len() > max {
            return Ok((body.freeze(), true));
        }
        while buf.len() < 2 {
            if read_more(stream, buf).await? == 0 {
                return Err(ReadError::Closed);
            }
        }
        if &buf[..2] != b"\r\n" {
            return Err(bad());
        }
        buf.advance(2);
    }
}

/// Does `headers` ask for a WebSocket?
fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    has_token(headers, header::UPGRADE, "websocket")
}

/// Does a comma-separated header list `name` contain `token` (case-insensitive)?
fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Keep-alive is HTTP/1.1's default and HTTP/1.0's exception.
fn wants_keep_alive(version: Version, headers: &HeaderMap) -> bool {
    if version == Version::HTTP_10 {
        has_token(headers, header::CONNECTION, "keep-alive")
    } else {
        !has_token(headers, header::CONNECTION, "close")
    }
}

/// Headers of a WebSocket upgrade request that only negotiate the upgrade.
const UPGRADE_ONLY: &[HeaderName] = &[
    header::CONNECTION,
    header::UPGRADE,
    header::SEC_WEBSOCKET_KEY,
    header::SEC_WEBSOCKET_VERSION,
    header::SEC_WEBSOCKET_EXTENSIONS,
];

/// A deep copy of `headers`, less those named in `skip`, whose values own their bytes.
fn owned_headers(headers: &HeaderMap, skip: &[HeaderName]) -> HeaderMap {
    let kept = |name: &HeaderName| !skip.contains(name);
    let mut out = HeaderMap::with_capacity(headers.keys().filter(|n| kept(n)).count().max(1));
    for (name, value) in headers.iter().filter(|(n, _)| kept(n)) {
        let mut copy = HeaderValue::from_maybe_shared(Bytes::copy_from_slice(value.as_bytes()))
            .unwrap_or_else(|_| HeaderValue::from_static(""));
        copy.set_sensitive(value.is_sensitive());
        out.append(name.clone(), copy);
    }
    out
}

/// The head of an empty response with `status` that closes the connection.
fn error_head(status: StatusCode) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    status_line(&mut out, Version::HTTP_11, status);
    out.extend_from_slice(b"content-length: 0\r\nconnection: close\r\n");
    date(&mut out);
    out.extend_from_slice(b"\r\n");
    out
}

fn status_line(out: &mut Vec<u8>, version: Version, status: StatusCode) {
    out.extend_from_slice(if version == Version::HTTP_10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// A `date` header line, formatted once a second per thread.
fn date(out: &mut Vec<u8>) {
    thread_local! {
        static CACHE: std::cell::RefCell<(u64, String)> = const {
            std::cell::RefCell::new((0, String::new()))
        };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.0 != second || cache.1.is_empty() {
            *cache = (second, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(cache.1.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
}

/// A body up to this size is copied after the head and sent with it in one write; a larger
/// one is written from its own buffer.
const INLINE_BODY: usize = 16 * 1024;

/// Writes `response` (its body collected first) in one write.
async fn write_response(
    stream: &mut TcpStream,
    response: Response<Body>,
    version: Version,
    head_only: bool,
    keep_alive: bool,
) -> std::io::Result<()> {
    let (parts, body) = response.into_parts();
    let body = crate::transport::body_bytes(body, usize::MAX)
        .await
        .map_err(std::io::Error::other)?;
    // Room for the body too: a small one is sent in the same buffer as the head.
    let inline = if body.len() <= INLINE_BODY {
        body.len()
    } else {
        0
    };
    let mut head = Vec::with_capacity(160 + 40 * parts.headers.len() + inline);
    status_line(&mut head, version, parts.status);
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::CONNECTION
        {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    let bodiless = parts.status.is_informational()
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED;
    if !bodiless {
        // Writing into a Vec cannot fail.
        let _ = write!(head, "content-length: {}\r\n", body.len());
    }
    if !keep_alive {
        head.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        head.extend_from_slice(b"connection: keep-alive\r\n");
    }
    if !parts.headers.contains_key(header::DATE) {
        date(&mut head);
    }
    head.extend_from_slice(b"\r\n");
    if head_only || bodiless || body.is_empty() {
        return stream.write_all(&head).await;
    }
    if body.len() <= INLINE_BODY {
        head.extend_from_slice(&body);
        return stream.write_all(&head).await;
    }
    let mut out = Bytes::from(head).chain(body);
    stream.write_all_buf(&mut out).await
}

/// Closes the connection after a last response. With `unread` request bytes possibly left
/// (a refused body), reads and drops what still arrives for a while first: closing a socket with
/// unread data resets it, and the client could lose the response.
pub(crate) async fn close(mut stream: TcpStream, unread: bool) {
    let _ = stream.shutdown().await;
    if unread {
        let drain = async {
            let mut scratch = vec![0u8; 16 * 1024];
            let mut total = 0;
            while total < DRAIN_BYTES {
                match stream.read(&mut scratch).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The future of a connection lives as long as the connection, held long-polls and
    /// WebSockets included: memory per idle client. It was 1.4 KB before its steps were boxed
    /// and scoped; this catches a change that makes it grow again.
    #[tokio::test]
    async fn a_connection_future_stays_small() {
        let broker = crate::broker::test_broker();
        let front = Arc::new(Front::new(broker, Router::new()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = TcpStream::connect(addr).await.unwrap();
        let connection = front.connection(stream, addr);
        let size = std::mem::size_of_val(&connection);
        assert!(size <= 512, "connection future is {size} bytes");
    }
}
