//! The HTTP/1.1 front end over raw TCP against a real server on port 0: keep-alive and
//! pipelining, HTTP/1.0, `Expect: 100-continue`, chunked bodies, the head and read-time limits,
//! malformed framing, WebSocket upgrade refusals, and idle connections at shutdown.

use std::time::Duration;

use bayeux_server::config::ServerConfig;
use bayeux_test_support::{TestServer, test_config};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);

/// One response off a connection: status, lower-cased head, body.
struct Reply {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("JSON body: {e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// A raw connection that keeps what it read past the current response.
struct Conn {
    stream: TcpStream,
    pending: Vec<u8>,
}

impl Conn {
    async fn open(server: &TestServer) -> Self {
        let addr = server.base.trim_start_matches("http://");
        let stream = TcpStream::connect(addr).await.expect("tcp connect");
        Conn {
            stream,
            pending: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Reads more bytes; false at end of stream.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
            .await
            .expect("the server answered in time")
            .unwrap_or(0);
        self.pending.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// Reads one response (head, then `content-length` bytes of body).
    async fn reply(&mut self) -> Reply {
        let end = loop {
            if let Some(i) = self.pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(
                self.fill().await,
                "connection closed mid-response: {:?}",
                String::from_utf8_lossy(&self.pending)
            );
        };
        let head = String::from_utf8_lossy(&self.pending[..end]).to_ascii_lowercase();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status code");
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse::<usize>().expect("content-length"));
        while self.pending.len() < end + length {
            assert!(self.fill().await, "connection closed mid-body");
        }
        let body = self.pending[end..end + length].to_vec();
        self.pending.drain(..end + length);
        Reply { status, head, body }
    }

    /// True when the server closes the connection (nothing more to read) within `wait`.
    async fn closed_within(&mut self, wait: Duration) -> bool {
        let mut chunk = [0u8; 1024];
        matches!(
            tokio::time::timeout(wait, self.stream.read(&mut chunk)).await,
            Ok(Ok(0) | Err(_))
        )
    }
}

fn handshake_body(id: &str) -> Vec<u8> {
    format!(
        r#"[{{"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":["long-polling"],"id":"{id}"}}]"#
    )
    .into_bytes()
}

fn handshake_request(id: &str) -> Vec<u8> {
    let body = handshake_body(id);
    let mut request = format!(
        "POST /cometd HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    request
}

fn assert_handshake(reply: &Reply, id: &str) {
    assert_eq!(reply.status, 200, "{}", reply.head);
    let v = reply.json();
    assert_eq!(v[0]["channel"], "/meta/handshake", "{v}");
    assert_eq!(v[0]["successful"], true, "{v}");
    assert_eq!(v[0]["id"], id, "{v}");
}

#[tokio::test]
async fn pipelined_requests_on_one_connection_are_answered_in_order() {
    let server = TestServer::start(test_config()).await;
    let mut conn = Conn::open(&server).await;
    let mut both = handshake_request("first");
    both.extend_from_slice(&handshake_request("second"));
    conn.send(&both).await;
    let first = conn.reply().await;
    let second = conn.reply().await;
    assert_handshake(&first, "first");
    assert_handshake(&second, "second");
    assert_ne!(first.json()[0]["clientId"], second.json()[0]["clientId"]);
    assert!(!first.head.contains("connection: close"), "{}", first.head);
    // Still open for a third.
    conn.send(&handshake_request("third")).await;
    assert_handshake(&conn.reply().await, "third");
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_half_closes_after_its_request_gets_the_response_and_the_close() {
    let server = TestServer::start(test_config()).await;
    let mut conn = Conn::open(&server).await;
    conn.send(&handshake_request("half")).await;
    conn.stream.shutdown().await.expect("half-close");
    assert_handshake(&conn.reply().await, "half");
    assert!(
        conn.closed_within(WAIT).await,
        "the server sees the end of the stream after answering"
    );
    server.stop().await;
}

#[tokio::test]
async fn http10_closes_after_the_response_unless_keep_alive_is_asked_for() {
    let server = TestServer::start(test_config()).await;
    let mut conn = Conn::open(&server).await;
    let mut request = handshake_request("a");
    request.splice(0..b"POST /cometd HTTP/1.1".len(), *b"POST /cometd HTTP/1.0");
    conn.send(&request).await;
    let reply = conn.reply().await;
    assert!(reply.head.starts_with("http/1.0 200"), "{}", reply.head);
    assert!(reply.head.contains("connection: close"), "{}", reply.head);
    assert!(conn.closed_within(WAIT).await, "HTTP/1.0 connection closed");

    let mut conn = Conn::open(&server).await;
    let keep = String::from_utf8(request).unwrap().replacen(
        "Host: x\r\n",
        "Host: x\r\nConnection: keep-alive\r\n",
        1,
    );
    conn.send(keep.as_bytes()).await;
    let reply = conn.reply().await;
    assert!(
        reply.head.contains("connection: keep-alive"),
        "{}",
        reply.head
    );
    conn.send(keep.as_bytes()).await;
    assert_handshake(&conn.reply().await, "a");
    server.stop().await;
}

#[tokio::test]
async fn expect_100_continue_gets_continue_before_the_body_is_sent() {
    let server = TestServer::start(test_config()).await;
    let mut conn = Conn::open(&server).await;
    let request = handshake_request("c");
    let split = request.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 2;
    let mut head = request[..split].to_vec();
    head.extend_from_slice(b"Expect: 100-continue\r\n\r\n");
    conn.send(&head).await;
    let interim = conn.reply().await;
    assert_eq!(interim.status, 100, "{}", interim.head);
    conn.send(&request[split + 2..]).await;
    assert_handshake(&conn.reply().await, "c");
    server.stop().await;
}

#[tokio::test]
async fn chunked_body_with_extensions_and_trailers_is_read() {
    let server = TestServer::start(test_config()).await;
    let mut conn = Conn::open(&server).await;
    let body = handshake_body("k");
    let (a, b) = body.split_at(20);
    let mut request = b"POST /cometd HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
        Transfer-Encoding: chunked\r\n\r\n"
        .to_vec();
    request.extend_from_slice(format!("{:x};name=value\r\n", a.len()).as_bytes());
    request.extend_from_slice(a);
    request.extend_from_slice(format!("\r\n{:X}\r\n", b.len()).as_bytes());
    request.extend_from_slice(b);
    request.extend_from_slice(b"\r\n0\r\nX-Trailer: yes\r\n\r\n");
    // In small pieces, so the parser sees every boundary split.
    for piece in request.chunks(7) {
        conn.send(piece).await;
        tokio::task::yield_now().await;
    }
    assert_handshake(&conn.reply().await, "k");
    // The connection is still in step: the next request is read from the right place.
    conn.send(&handshake_request("after")).await;
    assert_handshake(&conn.reply().await, "after");
    server.stop().await;
}

#[tokio::test]
async fn chunked_with_a_content_length_too_is_read_as_chunked_and_closes() {
    // What a proxy that copies the client's headers and adds a Content-Length sends.
    let server = TestServer::start(test_config()).await;
    let mut conn = Conn::open(&server).await;
    let body = handshake_body("both");
    let mut request = format!(
        "POST /cometd HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
         Content-Length: {}\r\n\r\n{:x}\r\n",
        body.len(),
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    request.extend_from_slice(b"\r\n0\r\n\r\n");
    conn.send(&request).await;
    let reply = conn.reply().await;
    assert_handshake(&reply, "both");
    assert!(reply.head.contains("connection: close"), "{}", reply.head);
    assert!(conn.closed_within(WAIT).await);
    server.stop().await;
}

#[tokio::test]
async fn malformed_framing_is_http_400_and_closes() {
    let server = TestServer::start(test_config()).await;
    let cases: [&[u8]; 5] = [
        b"POST /cometd HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n[]",
        b"POST /cometd HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"POST /cometd HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST /cometd HTTP/1.1\r\nContent-Length: 2x\r\n\r\n[]",
        b"POST /cometd HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n[]\r\n0\r\n\r\n",
    ];
    for case in cases {
        let mut conn = Conn::open(&server).await;
        conn.send(case).await;
        let reply = conn.reply().await;
        assert_eq!(
            reply.status,
            400,
            "{:?}: {}",
            String::from_utf8_lossy(case),
            reply.head
        );
        assert!(conn.closed_within(WAIT).await);
    }
    // The server is fine.
    let mut conn = Conn::open(&server).await;
    conn.send(&handshake_request("ok")).await;
    assert_handshake(&conn.reply().await, "ok");
    server.stop().await;
}

#[tokio::test]
async fn a_stalled_request_is_dropped_after_the_read_timeout() {
    let mut config = test_config();
    config.timeouts.request_read_timeout_ms = 300;
    let server = TestServer::start(config).await;
    let mut conn = Conn::open(&server).await;
    conn.send(b"POST /cometd HTTP/1.1\r\nHost: x\r\nContent-Le")
        .await;
    assert!(
        conn.closed_within(Duration::from_secs(3)).await,
        "a half-sent head is dropped"
    );
    let mut conn = Conn::open(&server).await;
    conn.send(b"POST /cometd HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n[")
        .await;
    assert!(
        conn.closed_within(Duration::from_secs(3)).await,
        "a half-sent body is dropped"
    );
    // An idle keep-alive connection is not timed.
    let mut idle = Conn::open(&server).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    idle.send(&handshake_request("idle")).await;
    assert_handshake(&idle.reply().await, "idle");
    server.stop().await;
}

#[tokio::test]
async fn max_header_bytes_is_configurable() {
    let mut config = test_config();
    config.limits.max_header_bytes = 2048;
    let server = TestServer::start(config).await;
    let with_header = |size: usize| {
        let request = String::from_utf8(handshake_request("h")).unwrap();
        request.replacen(
            "Host: x\r\n",
            &format!("Host: x\r\nX-Pad: {}\r\n", "p".repeat(size)),
            1,
        )
    };
    let mut conn = Conn::open(&server).await;
    conn.send(with_header(1500).as_bytes()).await;
    assert_handshake(&conn.reply().await, "h");
    let mut conn = Conn::open(&server).await;
    conn.send(with_header(3000).as_bytes()).await;
    assert_eq!(conn.reply().await.status, 431);
    let mut conn = Conn::open(&server).await;
    conn.send(format!("GET /cometd?{} HTTP/1.1\r\n\r\n", "q".repeat(3000)).as_bytes())
        .await;
    assert_eq!(conn.reply().await.status, 414);
    // More than 100 header fields, however short.
    let mut conn = Conn::open(&server).await;
    let many: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
    conn.send(format!("GET /cometd HTTP/1.1\r\n{many}\r\n").as_bytes())
        .await;
    assert_eq!(conn.reply().await.status, 431);
    // ServerConfig refuses a uselessly small head limit.
    let mut bad = ServerConfig::default();
    bad.limits.max_header_bytes = 10;
    assert!(bad.validate().is_err());
    server.stop().await;
}

#[tokio::test]
async fn oversized_body_to_another_route_is_http_413() {
    let server = TestServer::start(test_config()).await;
    let mut conn = Conn::open(&server).await;
    conn.send(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
        .await;
    let reply = conn.reply().await;
    assert_eq!(reply.status, 413, "{}", reply.head);
    assert!(reply.head.contains("connection: close"), "{}", reply.head);
    server.stop().await;
}

#[tokio::test]
async fn bad_websocket_upgrades_get_http_400_with_a_bayeux_error() {
    let server = TestServer::start(test_config()).await;
    let base = "GET /cometd HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n";
    let cases = [
        (
            format!("{base}Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"),
            "Sec-WebSocket-Version",
        ),
        (
            format!("{base}Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"),
            "Sec-WebSocket-Version",
        ),
        (
            format!("{base}Sec-WebSocket-Version: 13\r\n\r\n"),
            "Sec-WebSocket-Key",
        ),
        (
            "GET /cometd HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                .to_owned(),
            "Connection",
        ),
    ];
    for (request, named) in cases {
        let mut conn = Conn::open(&server).await;
        conn.send(request.as_bytes()).await;
        let reply = conn.reply().await;
        assert_eq!(reply.status, 400, "{request}: {}", reply.head);
        let v = reply.json();
        assert_eq!(v[0]["error"], "400::unknown_transport", "{v}");
        let detail = v[0]["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("bad websocket upgrade"), "{v}");
        assert!(detail.contains(named), "{named} in {v}");
    }
    // A good one switches protocols, with the accept key of RFC 6455's example.
    let mut conn = Conn::open(&server).await;
    conn.send(
        format!(
            "{base}Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let reply = conn.reply().await;
    assert_eq!(reply.status, 101, "{}", reply.head);
    assert!(
        reply
            .head
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{}",
        reply.head
    );
    server.stop().await;
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_at_shutdown() {
    let server = TestServer::start(test_config()).await;
    let mut conn = Conn::open(&server).await;
    conn.send(&handshake_request("s")).await;
    assert_handshake(&conn.reply().await, "s");
    let stopping = tokio::spawn(server.stop());
    assert!(conn.closed_within(WAIT).await, "idle connection closed");
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("the server stopped without waiting for the grace period")
        .unwrap();
}
