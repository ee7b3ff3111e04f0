//! Bad input against a real server (port 0, real HTTP and WebSocket): every malformed body,
//! message or frame gets its exact Bayeux error (on HTTP 200) or an HTTP 4xx with a JSON error
//! body, the server stays up, a client that was already there keeps working, a fresh client
//! works afterwards, and nothing leaks (sessions, held connects, WebSocket connections).
//!
//! At the end, proptest throws random bytes, random JSON-ish messages and random WebSocket frames
//! at a running server: never a 5xx, never a hang, never a dead socket.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bayeux_server::config::ServerConfig;
use bayeux_test_support::{LpClient, RawResponse, TestServer, WsClient, split, test_config};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(5);

static NONCE: AtomicU64 = AtomicU64::new(1);

fn nonce() -> u64 {
    NONCE.fetch_add(1, Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Asserts that the response is JSON (every response of the Bayeux endpoint is).
fn assert_json_type(r: &RawResponse) {
    assert!(
        r.content_type.starts_with("application/json"),
        "Content-Type {:?} (status {}, body {})",
        r.content_type,
        r.status,
        r.text
    );
}

/// Asserts a body-level failure: `status`, JSON, and a one-message array with `error`.
fn assert_body_error(r: &RawResponse, status: u16, error: &str) {
    assert_eq!(r.status, status, "HTTP status; body {}", r.text);
    assert_json_type(r);
    let v = r.json();
    let arr = v.as_array().unwrap_or_else(|| panic!("not an array: {v}"));
    assert_eq!(arr.len(), 1, "one error message: {v}");
    assert_eq!(arr[0]["successful"], false, "{v}");
    assert_eq!(arr[0]["error"], error, "{v}");
    assert!(arr[0]["detail"].is_string(), "a detail: {v}");
}

/// Asserts a failed Bayeux reply with exactly `error`.
#[track_caller]
fn assert_failed(reply: &Value, error: &str) {
    assert_eq!(reply["successful"], false, "{reply}");
    assert_eq!(reply["error"], error, "{reply}");
}

/// Sends one message over long-polling (asserting HTTP 200 and JSON) and returns the one reply.
async fn send_one(client: &LpClient, message: Value) -> Value {
    let replies = client.send(json!([message])).await;
    assert_eq!(replies.len(), 1, "one reply: {replies:?}");
    replies.into_iter().next().unwrap()
}

/// A handshaken long-polling client whose first (immediate) connect is done.
async fn connected(server: &TestServer) -> LpClient {
    let mut c = server.client();
    c.handshake().await;
    let (reply, _) = c.connect_split().await;
    assert_eq!(reply["successful"], true, "first connect: {reply}");
    c
}

async fn disconnect(client: &LpClient) {
    let reply = send_one(
        client,
        json!({"channel":"/meta/disconnect","clientId":client.id(),"id":"d"}),
    )
    .await;
    assert_eq!(reply["successful"], true, "disconnect: {reply}");
}

/// Connects until a delivery on `channel` with `data.n == n` arrives (a few tries).
async fn expect_delivery(client: &LpClient, channel: &str, n: u64) {
    for _ in 0..3 {
        let (reply, deliveries) = client.connect_split().await;
        assert_eq!(reply["successful"], true, "connect: {reply}");
        if deliveries
            .iter()
            .any(|d| d["channel"] == channel && d["data"]["n"] == n)
        {
            return;
        }
    }
    panic!("no delivery of {n} on {channel}");
}

/// Waits until the WebSocket frames bring a delivery on `channel` with `data.n == n`.
async fn ws_expect_delivery(ws: &mut WsClient, channel: &str, n: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        let frame = ws.recv(WAIT).await.expect("websocket frame");
        if frame
            .iter()
            .any(|d| d["channel"] == channel && d["data"]["n"] == n)
        {
            return;
        }
    }
    panic!("no websocket delivery of {n} on {channel}");
}

/// Receives WebSocket frames until one has a message with `id`, and returns that message.
async fn ws_reply_with_id(ws: &mut WsClient, id: &str) -> Value {
    loop {
        let frame = ws.recv(WAIT).await.expect("websocket reply");
        if let Some(m) = frame.into_iter().find(|m| m["id"] == id) {
            return m;
        }
    }
}

/// Polls a metric until it has `value` (metrics follow closes asynchronously).
async fn wait_metric(server: &TestServer, name: &str, value: f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = server.metric(name).await;
        if got == Some(value) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} is {got:?}, expected {value}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Proves a normal client still works: two fresh long-polling clients and a fresh WebSocket
/// client handshake; one long-polling client and the WebSocket client subscribe; the other
/// publishes; both subscribers receive the message. Everything it creates is disconnected again,
/// so the session count is what it was before.
async fn assert_server_healthy(server: &TestServer) {
    let before = server.broker.session_count();
    let channel = format!("/healthy/c{}", nonce());
    let n = nonce();

    let subscriber = connected(server).await;
    let reply = subscriber.subscribe(json!(channel)).await;
    assert_eq!(reply["successful"], true, "subscribe: {reply}");

    let mut ws = WsClient::connect(&server.ws_url).await;
    ws.handshake().await;
    ws.send(json!([{"channel":"/meta/subscribe","clientId":ws.id(),"subscription":channel,"id":"ws-s"}]))
        .await;
    let reply = ws_reply_with_id(&mut ws, "ws-s").await;
    assert_eq!(reply["successful"], true, "websocket subscribe: {reply}");

    let mut publisher = server.client();
    publisher.handshake().await;
    let ack = publisher.publish(&channel, json!({ "n": n })).await;
    assert_eq!(ack["successful"], true, "publish: {ack}");

    expect_delivery(&subscriber, &channel, n).await;
    ws_expect_delivery(&mut ws, &channel, n).await;

    let ws_id = ws.id();
    ws.send(json!([{"channel":"/meta/disconnect","clientId":ws_id,"id":"ws-d"}]))
        .await;
    let reply = ws_reply_with_id(&mut ws, "ws-d").await;
    assert_eq!(reply["successful"], true, "websocket disconnect: {reply}");
    ws.close().await;
    disconnect(&subscriber).await;
    disconnect(&publisher).await;
    assert_eq!(
        server.broker.session_count(),
        before,
        "the health check leaves no sessions behind"
    );
}

/// A client that is already subscribed and connected before the bad input arrives, to show
/// that other clients are unaffected.
struct Bystander {
    client: LpClient,
    channel: String,
}

impl Bystander {
    async fn new(server: &TestServer) -> Self {
        let client = connected(server).await;
        let channel = format!("/bystander/c{}", nonce());
        let reply = client.subscribe(json!(channel)).await;
        assert_eq!(reply["successful"], true, "bystander subscribe: {reply}");
        Bystander { client, channel }
    }

    /// Another client publishes; the bystander's connect receives it.
    async fn still_works(&self, server: &TestServer) {
        let n = nonce();
        let publisher = server.client();
        let ack = publisher.publish(&self.channel, json!({ "n": n })).await;
        assert_eq!(ack["successful"], true, "publish without clientId: {ack}");
        expect_delivery(&self.client, &self.channel, n).await;
    }
}

/// A server with a bystander. [`Fixture::finish`] checks the bystander, the health of the
/// server, and that the bad input leaked nothing.
struct Fixture {
    server: TestServer,
    bystander: Bystander,
}

impl Fixture {
    async fn new() -> Self {
        Self::with(test_config()).await
    }

    async fn with(config: ServerConfig) -> Self {
        let server = TestServer::start(config).await;
        let bystander = Bystander::new(&server).await;
        assert_eq!(server.broker.session_count(), 1);
        Fixture { server, bystander }
    }

    fn client(&self) -> LpClient {
        self.server.client()
    }

    /// The bystander still works, a normal client still works, and the server holds exactly
    /// the bystander's session, no held connects and no WebSocket connections.
    async fn finish(self) {
        self.bystander.still_works(&self.server).await;
        assert_server_healthy(&self.server).await;
        assert_eq!(
            self.server.broker.session_count(),
            1,
            "only the bystander's session is left"
        );
        wait_metric(&self.server, "bayeux_sessions", 1.0).await;
        wait_metric(&self.server, "bayeux_held_connects", 0.0).await;
        wait_metric(&self.server, "bayeux_websocket_connections", 0.0).await;
        disconnect(&self.bystander.client).await;
        assert_eq!(self.server.broker.session_count(), 0);
        self.server.stop().await;
    }
}

/// Sends a raw HTTP/1.1 request over TCP and returns (status, headers, body).
async fn raw_http(server: &TestServer, request: &[u8]) -> (u16, String, String) {
    let addr = server.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    // The server may answer (and close) before it has read everything: ignore write errors.
    let _ = stream.write_all(request).await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    if response_complete(&out) {
                        break;
                    }
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "raw HTTP response timed out");
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, head.to_ascii_lowercase(), body.to_owned())
}

fn response_complete(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let len = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    });
    len.is_some_and(|n| body.len() >= n)
}

/// Reads a reqwest response into a [`RawResponse`].
async fn raw(r: reqwest::Response) -> RawResponse {
    RawResponse {
        status: r.status().as_u16(),
        content_type: r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned(),
        text: r.text().await.expect("body"),
    }
}

/// A JSON body of exactly `size` bytes: one publish to `/big` with padded data.
fn body_of_size(size: usize) -> Vec<u8> {
    let head = br#"[{"channel":"/big","data":""#;
    let tail = br#""}]"#;
    let pad = size - head.len() - tail.len();
    let mut body = Vec::with_capacity(size);
    body.extend_from_slice(head);
    body.extend(std::iter::repeat_n(b'a', pad));
    body.extend_from_slice(tail);
    assert_eq!(body.len(), size);
    body
}

// ---------------------------------------------------------------------------------------------
// Bodies that are not Bayeux at all: HTTP 400 / 413 with a JSON error body
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn truncated_json_is_http_400_invalid_json() {
    let fx = Fixture::new().await;
    let r = fx
        .client()
        .post_raw(
            "application/json",
            r#"[{"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":["long-po"#,
        )
        .await;
    assert_body_error(&r, 400, "400::invalid_json");
    assert_eq!(
        fx.server.broker.session_count(),
        1,
        "no session was created"
    );
    fx.finish().await;
}

#[tokio::test]
async fn body_42_is_http_400_message_invalid() {
    let fx = Fixture::new().await;
    let r = fx.client().post_raw("application/json", "42").await;
    assert_body_error(&r, 400, "400::message_invalid");
    fx.finish().await;
}

#[tokio::test]
async fn body_string_is_http_400_message_invalid() {
    let fx = Fixture::new().await;
    let r = fx.client().post_raw("application/json", r#""hello""#).await;
    assert_body_error(&r, 400, "400::message_invalid");
    fx.finish().await;
}

#[tokio::test]
async fn empty_body_is_http_400_message_invalid() {
    let fx = Fixture::new().await;
    let r = fx.client().post_raw("application/json", "").await;
    assert_body_error(&r, 400, "400::message_invalid");
    let r = fx.client().post_raw("application/json", " \r\n\t").await;
    assert_body_error(&r, 400, "400::message_invalid");
    fx.finish().await;
}

#[tokio::test]
async fn empty_array_and_non_object_elements_are_http_400_message_invalid() {
    let fx = Fixture::new().await;
    for body in [
        "[]",
        "[42]",
        r#"["hello"]"#,
        "[null]",
        r#"[{"channel":"/meta/handshake","version":"1.0"},42]"#,
        "null",
        "true",
    ] {
        let r = fx.client().post_raw("application/json", body).await;
        assert_body_error(&r, 400, "400::message_invalid");
    }
    assert_eq!(
        fx.server.broker.session_count(),
        1,
        "no session was created"
    );
    fx.finish().await;
}

#[tokio::test]
async fn invalid_utf8_and_trailing_garbage_are_http_400_invalid_json() {
    let fx = Fixture::new().await;
    let bodies: [&[u8]; 5] = [
        b"[{\"channel\":\"/a\xff\xfe\",\"data\":1}]",
        br#"[{"channel":"/a","data":1}] trailing"#,
        br#"{"channel":"/a","data":1}}"#,
        br#"[{"channel":"/a","data":"\ud800"}]"#,
        b"\xef\xbb\xbf[{\"channel\":\"/a\",\"data\":1}]",
    ];
    // Truncated where a wrong type comes first: still invalid JSON, not message_invalid.
    for body in [
        r#"[{"channel":"/a","data":1},42,{"chan"#,
        r#"{"channel":42,"da"#,
        r#"[{"channel":"/meta/subscribe","subscription":5"#,
    ] {
        let r = fx.client().post_raw("application/json", body).await;
        assert_body_error(&r, 400, "400::invalid_json");
    }
    for body in bodies {
        let r = fx
            .client()
            .post_raw("application/json", body.to_vec())
            .await;
        assert_body_error(&r, 400, "400::invalid_json");
    }
    fx.finish().await;
}

#[tokio::test]
async fn deeply_nested_json_is_http_400_invalid_json() {
    let fx = Fixture::new().await;
    // Nesting far beyond the JSON parser's recursion limit must not overflow the stack.
    let depth = 30_000;
    let mut body = String::from(r#"[{"channel":"/a","data":"#);
    body.push_str(&"[".repeat(depth));
    body.push_str(&"]".repeat(depth));
    body.push_str("}]");
    let r = fx.client().post_raw("application/json", body).await;
    assert_body_error(&r, 400, "400::invalid_json");
    // Unterminated: a syntax error, even though `[[` is also the wrong type for a message.
    for body in ["[".repeat(60_000), "[[".into(), "[[{}]".into()] {
        let r = fx.client().post_raw("application/json", body).await;
        assert_body_error(&r, 400, "400::invalid_json");
    }
    fx.finish().await;
}

#[tokio::test]
async fn wrongly_typed_fields_are_http_400_message_invalid() {
    // Well-formed JSON whose fields have impossible types cannot be decoded into messages.
    let fx = Fixture::new().await;
    for body in [
        json!([{"channel": 42, "data": 1}]),
        json!([{"channel": "/meta/connect", "clientId": 7, "connectionType": "long-polling"}]),
        json!([{"channel": "/meta/handshake", "supportedConnectionTypes": "long-polling"}]),
        json!([{"channel": "/meta/connect", "clientId": "x", "advice": {"timeout": "soon"}}]),
    ] {
        let r = fx
            .client()
            .post_raw("application/json", body.to_string())
            .await;
        assert_body_error(&r, 400, "400::message_invalid");
    }
    assert_eq!(
        fx.server.broker.session_count(),
        1,
        "no session was created"
    );
    fx.finish().await;
}

#[tokio::test]
async fn oversized_body_is_http_413() {
    let fx = Fixture::new().await;
    let published = fx.server.metric("bayeux_messages_published_total").await;
    // Exactly the default limit (64 KiB) is accepted...
    let r = fx
        .client()
        .post_raw("application/json", body_of_size(64 * 1024))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_json_type(&r);
    assert_eq!(r.json()[0]["successful"], true, "{}", r.text);
    // ...one byte more is not, nor is a much larger body.
    for size in [64 * 1024 + 1, 1024 * 1024] {
        let r = fx
            .client()
            .post_raw("application/json", body_of_size(size))
            .await;
        assert_body_error(&r, 413, "413::message_too_large");
    }
    let after = fx.server.metric("bayeux_messages_published_total").await;
    assert_eq!(
        after.unwrap_or(0.0),
        published.unwrap_or(0.0) + 1.0,
        "only the body within the limit was published"
    );
    fx.finish().await;
}

#[tokio::test]
async fn oversized_chunked_body_is_http_413() {
    // Without Content-Length the limit is enforced while reading.
    let fx = Fixture::new().await;
    let body = body_of_size(64 * 1024 + 100);
    let mut request =
        b"POST /cometd HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
        Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            .to_vec();
    for chunk in body.chunks(4096) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let (status, head, body) = raw_http(&fx.server, &request).await;
    assert_eq!(status, 413, "{head}\n{body}");
    assert!(
        head.contains("content-type: application/json"),
        "JSON error body: {head}"
    );
    let v: Value = serde_json::from_str(&body).expect("JSON body");
    assert_failed(&v[0], "413::message_too_large");
    fx.finish().await;
}

#[tokio::test]
async fn body_limit_is_configurable() {
    let mut config = test_config();
    config.limits.max_body_bytes = 1024;
    let fx = Fixture::with(config).await;
    let r = fx
        .client()
        .post_raw("application/json", body_of_size(1024))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = fx
        .client()
        .post_raw("application/json", body_of_size(1025))
        .await;
    assert_body_error(&r, 413, "413::message_too_large");
    fx.finish().await;
}

#[tokio::test]
async fn too_many_messages_in_one_request_is_http_400() {
    let mut config = test_config();
    config.limits.max_messages_per_request = 5;
    let fx = Fixture::with(config).await;
    let handshake = json!({"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":["long-polling"]});
    let six: Vec<Value> = (0..6).map(|_| handshake.clone()).collect();
    let r = fx
        .client()
        .post_raw("application/json", Value::Array(six).to_string())
        .await;
    assert_body_error(&r, 400, "400::too_many_messages");
    assert_eq!(
        fx.server.broker.session_count(),
        1,
        "none of the six handshakes ran"
    );
    // At the limit, all are processed.
    let five: Vec<Value> = (0..5)
        .map(|i| json!({"channel":"/five","data":i,"id":i.to_string()}))
        .collect();
    let replies = fx.client().send(Value::Array(five)).await;
    assert_eq!(replies.len(), 5);
    assert!(
        replies.iter().all(|r| r["successful"] == true),
        "{replies:?}"
    );
    fx.finish().await;
}

#[tokio::test]
async fn form_encoded_garbage_is_http_400() {
    let fx = Fixture::new().await;
    let form = "application/x-www-form-urlencoded";
    let r = fx
        .client()
        .post_raw(form, "message=%5B%7B%22channel%22%3A")
        .await;
    assert_body_error(&r, 400, "400::invalid_json");
    let r = fx.client().post_raw(form, "message=42").await;
    assert_body_error(&r, 400, "400::message_invalid");
    let r = fx.client().post_raw(form, "message=").await;
    assert_body_error(&r, 400, "400::message_invalid");
    let r = fx.client().post_raw(form, "foo=bar&baz").await;
    assert_body_error(&r, 400, "400::message_invalid");
    let r = fx.client().post_raw(form, "").await;
    assert_body_error(&r, 400, "400::message_invalid");
    // A good message followed by a bad one: the whole request is refused, nothing is processed.
    let handshake = r#"{"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":["long-polling"]}"#;
    let body = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("message", handshake)
        .append_pair("message", "{oops")
        .finish();
    let r = fx.client().post_raw(form, body).await;
    assert_body_error(&r, 400, "400::invalid_json");
    assert_eq!(
        fx.server.broker.session_count(),
        1,
        "no session was created"
    );
    // A well-formed form body works.
    let body = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("message", r#"[{"channel":"/form","data":1,"id":"f"}]"#)
        .finish();
    let r = fx.client().post_raw(form, body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_json_type(&r);
    assert_eq!(
        r.json(),
        json!([{"channel":"/form","id":"f","successful":true}])
    );
    fx.finish().await;
}

#[tokio::test]
async fn jsonp_with_invalid_callback_is_http_400() {
    let fx = Fixture::new().await;
    let message = url::form_urlencoded::byte_serialize(
        br#"[{"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":["callback-polling"]}]"#,
    )
    .collect::<String>();
    let http = reqwest::Client::new();
    let long = "a".repeat(65);
    for callback in [
        "alert(1)//",
        "a%20b",
        "x%3Cscript%3E",
        "",
        long.as_str(),
        "%E2%80%A8",
    ] {
        let r = http
            .get(format!(
                "{}?jsonp={callback}&message={message}",
                fx.server.url
            ))
            .send()
            .await
            .expect("request");
        assert_body_error(&raw(r).await, 400, "400::callback_invalid");
    }
    assert_eq!(
        fx.server.broker.session_count(),
        1,
        "no session was created"
    );
    // A 64-character callback is fine.
    let ok = "b".repeat(64);
    let r = http
        .get(format!("{}?jsonp={ok}&message={message}", fx.server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.starts_with(&format!("{ok}([")), "{text}");
    let v: Value = serde_json::from_str(&text[ok.len() + 1..text.len() - 2]).unwrap();
    let id = v[0]["clientId"].as_str().unwrap().to_owned();
    let mut c = fx.client();
    c.client_id = Some(id);
    disconnect(&c).await;
    fx.finish().await;
}

#[tokio::test]
async fn jsonp_with_garbage_message_or_oversized_query_is_http_4xx() {
    let mut config = test_config();
    // The query counts against the body limit; keep it below what a URI can hold.
    config.limits.max_body_bytes = 4096;
    let fx = Fixture::with(config).await;
    let http = reqwest::Client::new();
    let get = |q: String| {
        let http = http.clone();
        let url = format!("{}?{q}", fx.server.url);
        async move { raw(http.get(url).send().await.expect("request")).await }
    };
    assert_body_error(
        &get("jsonp=cb&message=%5B%7B".into()).await,
        400,
        "400::invalid_json",
    );
    assert_body_error(
        &get("jsonp=cb&message=42".into()).await,
        400,
        "400::message_invalid",
    );
    let big = format!("jsonp=cb&message={}", "a".repeat(4096));
    assert_body_error(&get(big).await, 413, "413::message_too_large");
    fx.finish().await;
}

#[tokio::test]
async fn get_without_message_is_http_400() {
    let fx = Fixture::new().await;
    for url in [
        fx.server.url.clone(),
        format!("{}/connect", fx.server.url),
        format!("{}?jsonp=cb", fx.server.url),
    ] {
        let r = raw(reqwest::get(url).await.expect("request")).await;
        assert_body_error(&r, 400, "400::unknown_transport");
    }
    fx.finish().await;
}

#[tokio::test]
async fn other_methods_are_http_405() {
    let fx = Fixture::new().await;
    let http = reqwest::Client::new();
    for method in [reqwest::Method::PUT, reqwest::Method::DELETE] {
        let r = http
            .request(method, &fx.server.url)
            .body("[]")
            .send()
            .await
            .expect("request");
        assert_eq!(
            r.headers().get("allow").and_then(|v| v.to_str().ok()),
            Some("GET, POST")
        );
        assert_body_error(&raw(r).await, 405, "405::method_not_allowed");
    }
    fx.finish().await;
}

#[tokio::test]
async fn malformed_http_gets_4xx_and_the_server_stays_up() {
    // These never reach the Bayeux endpoint: the HTTP layer (hyper) answers them itself, with an
    // empty body, before any handler runs.
    let fx = Fixture::new().await;
    let long_uri = format!(
        "GET /cometd?jsonp=cb&message={} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "a".repeat(70_000)
    );
    let (status, head, _) = raw_http(&fx.server, long_uri.as_bytes()).await;
    assert_eq!(status, 414, "{head}");
    let big_header = format!(
        "POST /cometd HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nContent-Length: 2\r\n\
         Connection: close\r\n\r\n[]",
        "a".repeat(500_000)
    );
    let (status, head, _) = raw_http(&fx.server, big_header.as_bytes()).await;
    assert_eq!(status, 431, "{head}");
    let (status, head, _) = raw_http(&fx.server, b"BLAH\r\n\r\n").await;
    assert_eq!(status, 400, "{head}");
    fx.finish().await;
}

// ---------------------------------------------------------------------------------------------
// Bayeux-level errors: HTTP 200, `successful: false` and the exact error
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn message_without_channel_is_channel_missing() {
    let fx = Fixture::new().await;
    let c = connected(&fx.server).await;
    let reply = send_one(&c, json!({"clientId":c.id(),"data":{"x":1},"id":"m1"})).await;
    assert_eq!(
        reply,
        json!({"id":"m1","successful":false,"error":"400::channel_missing"})
    );
    let reply = send_one(&c, json!({"channel":"","data":1,"id":"m2"})).await;
    assert_failed(&reply, "400::channel_missing");
    let reply = send_one(&c, json!({"id":"m3"})).await;
    assert_failed(&reply, "400::channel_missing");
    disconnect(&c).await;
    fx.finish().await;
}

#[tokio::test]
async fn subscribe_to_meta_channel_is_subscribe_failed() {
    let fx = Fixture::new().await;
    let c = connected(&fx.server).await;
    for sub in [
        json!("/meta/connect"),
        json!("/meta/**"),
        json!("/meta/*"),
        json!("/meta"),
        json!(["/ok/one", "/meta/handshake"]),
    ] {
        let reply = c.subscribe(sub.clone()).await;
        assert_eq!(
            reply,
            json!({"channel":"/meta/subscribe","id":"s","subscription":sub,"successful":false,"error":"403::subscribe_failed"})
        );
    }
    let session = fx.server.broker.session(c.id()).unwrap();
    assert!(
        session.subscriptions().is_empty(),
        "nothing was subscribed: {:?}",
        session.subscriptions()
    );
    disconnect(&c).await;
    fx.finish().await;
}

#[tokio::test]
async fn publish_to_meta_channel_is_meta_channel_denied() {
    let fx = Fixture::new().await;
    let c = connected(&fx.server).await;
    for channel in [
        "/meta/foo",
        "/meta/**",
        "/meta/*",
        "/meta",
        "/meta/connect/x",
    ] {
        let reply = c.publish(channel, json!({"x":1})).await;
        assert_eq!(
            reply,
            json!({"channel":channel,"id":"p","successful":false,"error":"403::meta_channel_denied"})
        );
    }
    // Without data and without clientId it is the same.
    let reply = send_one(&c, json!({"channel":"/meta/nope","id":"n"})).await;
    assert_failed(&reply, "403::meta_channel_denied");
    disconnect(&c).await;
    fx.finish().await;
}

#[tokio::test]
async fn publish_to_wildcard_is_channel_invalid() {
    let fx = Fixture::new().await;
    let c = connected(&fx.server).await;
    // A subscriber to everything must not see the refused publishes.
    let watcher = connected(&fx.server).await;
    assert_eq!(watcher.subscribe(json!("/**")).await["successful"], true);
    let published = fx.server.metric("bayeux_messages_published_total").await;
    for channel in ["/foo/*", "/foo/**", "/*", "/**", "/service/*"] {
        let reply = c.publish(channel, json!({"x":1})).await;
        assert_eq!(
            reply,
            json!({"channel":channel,"id":"p","successful":false,"error":"405::channel_invalid"})
        );
    }
    assert_eq!(
        fx.server.metric("bayeux_messages_published_total").await,
        published,
        "nothing was published"
    );
    let n = nonce();
    assert_eq!(
        c.publish("/foo/real", json!({ "n": n })).await["successful"],
        true
    );
    let (_, deliveries) = watcher.connect_split().await;
    assert_eq!(deliveries.len(), 1, "only the real publish: {deliveries:?}");
    assert_eq!(deliveries[0]["data"]["n"], n);
    disconnect(&c).await;
    disconnect(&watcher).await;
    fx.finish().await;
}

#[tokio::test]
async fn channel_without_leading_slash_is_channel_invalid() {
    let fx = Fixture::new().await;
    let c = connected(&fx.server).await;
    for channel in [
        "foo",
        "foo/bar",
        "meta/connect",
        " /foo",
        "/foo//bar",
        "/foo/",
    ] {
        let reply = c.publish(channel, json!(1)).await;
        assert_eq!(
            reply,
            json!({"channel":channel,"id":"p","successful":false,"error":"405::channel_invalid"})
        );
    }
    for channel in ["/a/*/b", "/a/b*", "/caf\u{e9}", "/a\u{0}b", "/a\"b"] {
        let reply = c.publish(channel, json!(1)).await;
        assert_failed(&reply, "405::channel_invalid");
    }
    let too_long = format!("/{}", "x".repeat(2000));
    assert_failed(
        &c.publish(&too_long, json!(1)).await,
        "405::channel_invalid",
    );
    // As a subscription, an invalid name is subscription_invalid.
    for sub in ["foo", "foo/bar", "/a/*/b", too_long.as_str()] {
        let reply = c.subscribe(json!(sub)).await;
        assert_failed(&reply, "403::subscription_invalid");
    }
    disconnect(&c).await;
    fx.finish().await;
}

#[tokio::test]
async fn subscribe_without_subscription_is_subscription_missing() {
    let fx = Fixture::new().await;
    let c = connected(&fx.server).await;
    let reply = send_one(
        &c,
        json!({"channel":"/meta/subscribe","clientId":c.id(),"id":"s1"}),
    )
    .await;
    assert_eq!(
        reply,
        json!({"channel":"/meta/subscribe","id":"s1","successful":false,"error":"403::subscription_missing"})
    );
    for empty in [json!(null), json!([])] {
        let reply = send_one(
            &c,
            json!({"channel":"/meta/subscribe","clientId":c.id(),"subscription":empty,"id":"s2"}),
        )
        .await;
        assert_failed(&reply, "403::subscription_missing");
    }
    let reply = send_one(
        &c,
        json!({"channel":"/meta/unsubscribe","clientId":c.id(),"id":"u1"}),
    )
    .await;
    assert_failed(&reply, "403::subscription_missing");
    disconnect(&c).await;
    fx.finish().await;
}

#[tokio::test]
async fn subscription_of_wrong_type_is_subscription_invalid() {
    let fx = Fixture::new().await;
    let c = connected(&fx.server).await;
    for sub in [
        json!(42),
        json!(true),
        json!({"channel":"/a"}),
        json!(["/a", 5]),
        json!([["/a"]]),
    ] {
        let reply = send_one(
            &c,
            json!({"channel":"/meta/subscribe","clientId":c.id(),"subscription":sub,"id":"s"}),
        )
        .await;
        assert_eq!(reply["channel"], "/meta/subscribe", "{reply}");
        assert_eq!(reply["id"], "s", "{reply}");
        assert_failed(&reply, "403::subscription_invalid");
        let reply = send_one(
            &c,
            json!({"channel":"/meta/unsubscribe","clientId":c.id(),"subscription":sub,"id":"u"}),
        )
        .await;
        assert_failed(&reply, "403::subscription_invalid");
    }
    let session = fx.server.broker.session(c.id()).unwrap();
    assert!(session.subscriptions().is_empty());
    disconnect(&c).await;
    fx.finish().await;
}

#[tokio::test]
async fn unsupported_connection_type_is_301() {
    let fx = Fixture::new().await;
    let c = connected(&fx.server).await;
    let reply = send_one(
        &c,
        json!({"channel":"/meta/connect","clientId":c.id(),"connectionType":"carrier-pigeon","id":"c1"}),
    )
    .await;
    assert_eq!(
        reply,
        json!({
            "channel":"/meta/connect","id":"c1","clientId":c.id(),"successful":false,
            "error":"301:carrier-pigeon:Connection types not supported",
            "advice":{"reconnect":"handshake","interval":0}
        })
    );
    assert_eq!(fx.server.metric("bayeux_held_connects").await, Some(0.0));
    disconnect(&c).await;
    // A transport the server knows but has turned off is unsupported too.
    let mut config = test_config();
    config.transports = vec!["long-polling".into()];
    let server = TestServer::start(config).await;
    let c = connected(&server).await;
    let reply = send_one(
        &c,
        json!({"channel":"/meta/connect","clientId":c.id(),"connectionType":"websocket","id":"c2"}),
    )
    .await;
    assert_failed(&reply, "301:websocket:Connection types not supported");
    server.stop().await;
    fx.finish().await;
}

#[tokio::test]
async fn unknown_client_id_is_session_unknown() {
    let fx = Fixture::new().await;
    let c = fx.client();
    let reply = send_one(
        &c,
        json!({"channel":"/meta/connect","clientId":"nosuchclient","connectionType":"long-polling","id":"c"}),
    )
    .await;
    assert_eq!(
        reply,
        json!({
            "channel":"/meta/connect","id":"c","successful":false,
            "error":"402::session_unknown","advice":{"reconnect":"handshake","interval":0}
        })
    );
    // A connect with no clientId at all: the same.
    let reply = send_one(
        &c,
        json!({"channel":"/meta/connect","connectionType":"long-polling","id":"c"}),
    )
    .await;
    assert_failed(&reply, "402::session_unknown");
    assert_eq!(
        reply["advice"],
        json!({"reconnect":"handshake","interval":0})
    );
    // Subscribe, unsubscribe, publish and disconnect get the bare error, without advice.
    for m in [
        json!({"channel":"/meta/subscribe","clientId":"nosuchclient","subscription":"/a","id":"x"}),
        json!({"channel":"/meta/unsubscribe","clientId":"nosuchclient","subscription":"/a","id":"x"}),
        json!({"channel":"/a","clientId":"nosuchclient","data":1,"id":"x"}),
        json!({"channel":"/meta/disconnect","clientId":"nosuchclient","id":"x"}),
    ] {
        let reply = send_one(&c, m.clone()).await;
        assert_failed(&reply, "402::session_unknown");
        assert!(reply.get("advice").is_none(), "no advice: {reply}");
    }
    // A disconnected session is unknown too.
    let gone = connected(&fx.server).await;
    disconnect(&gone).await;
    let (reply, _) = split(gone.connect().await);
    assert_failed(&reply, "402::session_unknown");
    assert_eq!(
        reply["advice"],
        json!({"reconnect":"handshake","interval":0})
    );
    assert_eq!(
        fx.server.broker.session_count(),
        1,
        "no session was created"
    );
    fx.finish().await;
}

#[tokio::test]
async fn publish_without_data_is_data_missing() {
    let fx = Fixture::new().await;
    let c = connected(&fx.server).await;
    let reply = send_one(
        &c,
        json!({"channel":"/some/channel","clientId":c.id(),"id":"p"}),
    )
    .await;
    assert_eq!(
        reply,
        json!({"channel":"/some/channel","id":"p","successful":false,"error":"400::data_missing"})
    );
    let reply = send_one(&c, json!({"channel":"/service/echo","id":"p"})).await;
    assert_failed(&reply, "400::data_missing");
    // `data: null` is data.
    let reply = send_one(&c, json!({"channel":"/some/channel","data":null,"id":"p"})).await;
    assert_eq!(reply["successful"], true, "{reply}");
    disconnect(&c).await;
    fx.finish().await;
}

#[tokio::test]
async fn handshake_without_common_connection_type_is_301() {
    let fx = Fixture::new().await;
    let reply = send_one(
        &fx.client(),
        json!({"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":["carrier-pigeon","smoke-signals"],"id":"h"}),
    )
    .await;
    assert_eq!(
        reply,
        json!({
            "channel":"/meta/handshake","id":"h","successful":false,
            "error":"301:carrier-pigeon,smoke-signals:Connection types not supported",
            "supportedConnectionTypes":["websocket","long-polling","callback-polling"],
            "advice":{"reconnect":"none","interval":0}
        })
    );
    assert_eq!(
        fx.server.broker.session_count(),
        1,
        "no session was created"
    );
    assert_eq!(fx.server.metric("bayeux_handshakes_total").await, Some(1.0));
    fx.finish().await;
}

#[tokio::test]
async fn subscribe_list_with_one_invalid_name_rejects_the_whole_subscribe() {
    let fx = Fixture::new().await;
    let c = connected(&fx.server).await;
    let sub = json!(["/ok/a", "not-a-channel", "/ok/b"]);
    let reply = c.subscribe(sub.clone()).await;
    assert_eq!(
        reply,
        json!({"channel":"/meta/subscribe","id":"s","subscription":sub,"successful":false,"error":"403::subscription_invalid"})
    );
    let session = fx.server.broker.session(c.id()).unwrap();
    assert!(session.subscriptions().is_empty(), "no partial subscribe");
    assert_eq!(fx.server.broker.subscribed_patterns(), 1, "the bystander's");
    // A publish to one of the valid names does not reach this client.
    let n = nonce();
    assert_eq!(
        fx.client().publish("/ok/a", json!({ "n": n })).await["successful"],
        true
    );
    assert_eq!(session.queued(), 0);
    disconnect(&c).await;
    fx.finish().await;
}

#[tokio::test]
async fn subscription_limit_per_session() {
    let mut config = test_config();
    config.limits.max_subscriptions_per_session = 3;
    let fx = Fixture::with(config).await;
    let c = connected(&fx.server).await;
    assert_eq!(
        c.subscribe(json!(["/l/1", "/l/2"])).await["successful"],
        true
    );
    // Two new ones would make four: refused as a whole.
    let reply = c.subscribe(json!(["/l/3", "/l/4"])).await;
    assert_failed(&reply, "403::subscription_limit_exceeded");
    assert_eq!(
        fx.server
            .broker
            .session(c.id())
            .unwrap()
            .subscriptions()
            .len(),
        2
    );
    assert_eq!(c.subscribe(json!("/l/3")).await["successful"], true);
    let reply = c.subscribe(json!("/l/4")).await;
    assert_eq!(
        reply,
        json!({"channel":"/meta/subscribe","id":"s","subscription":"/l/4","successful":false,"error":"403::subscription_limit_exceeded"})
    );
    // Subscribing again to a channel already held does not count.
    assert_eq!(c.subscribe(json!("/l/1")).await["successful"], true);
    // Service subscriptions are not recorded, so they do not count either.
    assert_eq!(c.subscribe(json!("/service/x")).await["successful"], true);
    // After an unsubscribe there is room again.
    assert_eq!(c.unsubscribe(json!("/l/1")).await["successful"], true);
    assert_eq!(c.subscribe(json!("/l/4")).await["successful"], true);
    // Another session has its own budget.
    let other = connected(&fx.server).await;
    assert_eq!(
        other.subscribe(json!(["/l/1", "/l/2", "/l/3"])).await["successful"],
        true
    );
    disconnect(&c).await;
    disconnect(&other).await;
    assert_eq!(fx.server.broker.subscribed_patterns(), 1, "the bystander's");
    fx.finish().await;
}

#[tokio::test]
async fn service_subscribe_is_a_successful_no_op() {
    let fx = Fixture::new().await;
    let c = connected(&fx.server).await;
    for sub in [
        json!("/service/**"),
        json!("/service/echo"),
        json!("/service"),
    ] {
        let reply = c.subscribe(sub.clone()).await;
        assert_eq!(
            reply,
            json!({"channel":"/meta/subscribe","id":"s","subscription":sub,"successful":true})
        );
    }
    let session = fx.server.broker.session(c.id()).unwrap();
    assert!(session.subscriptions().is_empty(), "nothing recorded");
    assert_eq!(fx.server.broker.subscribed_patterns(), 1, "the bystander's");
    let reply = c.unsubscribe(json!("/service/**")).await;
    assert_eq!(reply["successful"], true, "{reply}");
    disconnect(&c).await;
    fx.finish().await;
}

#[tokio::test]
async fn bad_messages_do_not_spoil_good_ones_in_the_same_batch() {
    let fx = Fixture::new().await;
    let c = connected(&fx.server).await;
    let n = nonce();
    let replies = c
        .send(json!([
            {"id":"1","data":1},
            {"channel":"/meta/subscribe","clientId":c.id(),"subscription":"/mix/**","id":"2"},
            {"channel":"/mix/*","clientId":c.id(),"data":1,"id":"3"},
            {"channel":"/mix/a","clientId":c.id(),"data":{"n":n},"id":"4"},
            {"channel":"/meta/subscribe","clientId":c.id(),"id":"5"},
        ]))
        .await;
    let by_id = |id: &str| {
        replies
            .iter()
            .find(|r| r["id"] == id && r.get("successful").is_some())
            .unwrap_or_else(|| panic!("reply {id}: {replies:?}"))
            .clone()
    };
    assert_failed(&by_id("1"), "400::channel_missing");
    assert_eq!(by_id("2")["successful"], true);
    assert_failed(&by_id("3"), "405::channel_invalid");
    assert_eq!(by_id("4")["successful"], true);
    assert_failed(&by_id("5"), "403::subscription_missing");
    expect_delivery(&c, "/mix/a", n).await;
    disconnect(&c).await;
    fx.finish().await;
}

// ---------------------------------------------------------------------------------------------
// WebSocket
// ---------------------------------------------------------------------------------------------

/// A WebSocket error reply frame: exactly one failed message with `error`.
#[track_caller]
fn assert_ws_error_frame(frame: &[Value], error: &str) {
    assert_eq!(frame.len(), 1, "one error message: {frame:?}");
    assert_failed(&frame[0], error);
    assert!(frame[0]["detail"].is_string(), "{frame:?}");
}

#[tokio::test]
async fn websocket_garbage_json_gets_an_error_frame_and_the_socket_stays_usable() {
    let fx = Fixture::new().await;
    let mut ws = WsClient::connect(&fx.server.ws_url).await;
    for (text, error) in [
        ("[{\"channel\":", "400::invalid_json"),
        ("not json at all", "400::invalid_json"),
        ("42", "400::message_invalid"),
        ("\"hello\"", "400::message_invalid"),
        ("", "400::message_invalid"),
        ("[]", "400::message_invalid"),
        ("[1,2,3]", "400::message_invalid"),
    ] {
        ws.send_text(text.to_owned()).await;
        let frame = ws.recv(WAIT).await.expect("an error frame");
        assert_ws_error_frame(&frame, error);
    }
    // The same socket still works.
    ws.handshake().await;
    ws.send_text("{oops".into()).await;
    assert_ws_error_frame(&ws.recv(WAIT).await.unwrap(), "400::invalid_json");
    let id = ws.id();
    ws.send(json!([{"channel":"/meta/disconnect","clientId":id,"id":"d"}]))
        .await;
    assert_eq!(ws_reply_with_id(&mut ws, "d").await["successful"], true);
    ws.close().await;
    fx.finish().await;
}

#[tokio::test]
async fn websocket_binary_frame_gets_an_error_frame() {
    let fx = Fixture::new().await;
    let mut ws = WsClient::connect(&fx.server.ws_url).await;
    ws.send_binary(
        br#"[{"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":["websocket"]}]"#
            .to_vec(),
    )
    .await;
    let frame = ws.recv(WAIT).await.expect("an error frame");
    assert_ws_error_frame(&frame, "400::message_invalid");
    assert_eq!(
        fx.server.broker.session_count(),
        1,
        "no session was created"
    );
    ws.send_binary(vec![0, 159, 146, 150]).await;
    assert_ws_error_frame(&ws.recv(WAIT).await.unwrap(), "400::message_invalid");
    // Still usable.
    ws.handshake().await;
    let id = ws.id();
    ws.send(json!([{"channel":"/meta/disconnect","clientId":id,"id":"d"}]))
        .await;
    assert_eq!(ws_reply_with_id(&mut ws, "d").await["successful"], true);
    ws.close().await;
    fx.finish().await;
}

#[tokio::test]
async fn websocket_bayeux_errors_are_replies_on_the_socket() {
    let fx = Fixture::new().await;
    let mut ws = WsClient::connect(&fx.server.ws_url).await;
    ws.handshake().await;
    let id = ws.id();
    ws.send(json!([
        {"clientId":id,"data":1,"id":"a"},
        {"channel":"/meta/subscribe","clientId":id,"subscription":"/meta/**","id":"b"},
        {"channel":"/meta/foo","clientId":id,"data":1,"id":"c"},
        {"channel":"/x/**","clientId":id,"data":1,"id":"d"},
        {"channel":"nope","clientId":id,"data":1,"id":"e"},
        {"channel":"/meta/subscribe","clientId":id,"id":"f"},
        {"channel":"/x","clientId":id,"id":"g"},
        {"channel":"/meta/subscribe","clientId":"nosuchclient","subscription":"/x","id":"h"},
    ]))
    .await;
    let frame = ws.recv(WAIT).await.expect("replies");
    let errors: Vec<(String, String)> = frame
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap_or("").to_owned(),
                m["error"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("a", "400::channel_missing"),
        ("b", "403::subscribe_failed"),
        ("c", "403::meta_channel_denied"),
        ("d", "405::channel_invalid"),
        ("e", "405::channel_invalid"),
        ("f", "403::subscription_missing"),
        ("g", "400::data_missing"),
        ("h", "402::session_unknown"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(errors, expected);
    ws.send(json!([{"channel":"/meta/connect","clientId":id,"connectionType":"carrier-pigeon","id":"i"}]))
        .await;
    let reply = ws_reply_with_id(&mut ws, "i").await;
    assert_failed(&reply, "301:carrier-pigeon:Connection types not supported");
    ws.send(json!([{"channel":"/meta/disconnect","clientId":id,"id":"z"}]))
        .await;
    assert_eq!(ws_reply_with_id(&mut ws, "z").await["successful"], true);
    ws.close().await;
    fx.finish().await;
}

#[tokio::test]
async fn websocket_too_many_messages_gets_an_error_frame() {
    let mut config = test_config();
    config.limits.max_messages_per_request = 3;
    let fx = Fixture::with(config).await;
    let mut ws = WsClient::connect(&fx.server.ws_url).await;
    let handshake = json!({"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":["websocket"]});
    ws.send(json!([handshake, handshake, handshake, handshake]))
        .await;
    let frame = ws.recv(WAIT).await.expect("an error frame");
    assert_ws_error_frame(&frame, "400::too_many_messages");
    assert_eq!(
        fx.server.broker.session_count(),
        1,
        "no session was created"
    );
    ws.handshake().await;
    let id = ws.id();
    ws.send(json!([{"channel":"/meta/disconnect","clientId":id,"id":"d"}]))
        .await;
    assert_eq!(ws_reply_with_id(&mut ws, "d").await["successful"], true);
    ws.close().await;
    fx.finish().await;
}

#[tokio::test]
async fn websocket_oversized_frame_closes_with_1009_and_is_not_leaked() {
    let fx = Fixture::new().await;
    // Another WebSocket client, connected throughout.
    let mut other = WsClient::connect(&fx.server.ws_url).await;
    other.handshake().await;
    let channel = format!("/wsother/c{}", nonce());
    let other_id = other.id();
    other
        .send(json!([{"channel":"/meta/subscribe","clientId":other_id,"subscription":channel,"id":"s"}]))
        .await;
    assert_eq!(ws_reply_with_id(&mut other, "s").await["successful"], true);
    wait_metric(&fx.server, "bayeux_websocket_connections", 1.0).await;

    // A frame of exactly the limit (64 KiB) is accepted.
    let mut big = WsClient::connect(&fx.server.ws_url).await;
    big.send_text(String::from_utf8(body_of_size(64 * 1024)).unwrap())
        .await;
    let frame = big.recv(WAIT).await.expect("publish ack");
    assert_eq!(frame[0]["successful"], true, "{frame:?}");
    wait_metric(&fx.server, "bayeux_websocket_connections", 2.0).await;

    // One byte more closes the socket with 1009.
    big.send_text(String::from_utf8(body_of_size(64 * 1024 + 1)).unwrap())
        .await;
    assert_eq!(big.close_code(WAIT).await, Some(1009));
    wait_metric(&fx.server, "bayeux_websocket_connections", 1.0).await;
    assert_eq!(
        fx.server.metric(r#"bayeux_errors_total{code="413"}"#).await,
        Some(1.0),
        "the oversized frame is counted"
    );

    // The session that was bound to it (none here) and the other client are unaffected.
    let n = nonce();
    assert_eq!(
        fx.client().publish(&channel, json!({ "n": n })).await["successful"],
        true
    );
    ws_expect_delivery(&mut other, &channel, n).await;
    other
        .send(json!([{"channel":"/meta/disconnect","clientId":other_id,"id":"d"}]))
        .await;
    assert_eq!(ws_reply_with_id(&mut other, "d").await["successful"], true);
    other.close().await;
    fx.finish().await;
}

#[tokio::test]
async fn websocket_frame_limit_is_configurable_and_a_bound_session_survives() {
    let mut config = test_config();
    config.limits.max_frame_bytes = 2048;
    let fx = Fixture::with(config).await;
    let mut ws = WsClient::connect(&fx.server.ws_url).await;
    ws.handshake().await;
    let id = ws.id();
    // The first connect returns at once; the second is held by this socket.
    let connect =
        json!([{"channel":"/meta/connect","clientId":id,"connectionType":"websocket","id":"c"}]);
    ws.send(connect.clone()).await;
    assert_eq!(ws_reply_with_id(&mut ws, "c").await["successful"], true);
    ws.send(connect).await;
    wait_metric(&fx.server, "bayeux_held_connects", 1.0).await;
    ws.send_text(String::from_utf8(body_of_size(2049)).unwrap())
        .await;
    assert_eq!(ws.close_code(WAIT).await, Some(1009));
    // Neither the socket nor its held connect is left behind.
    wait_metric(&fx.server, "bayeux_websocket_connections", 0.0).await;
    wait_metric(&fx.server, "bayeux_held_connects", 0.0).await;
    // The session outlives the socket (it expires normally); a new socket picks it up.
    let mut again = WsClient::connect(&fx.server.ws_url).await;
    again
        .send(json!([{"channel":"/meta/disconnect","clientId":id,"id":"d"}]))
        .await;
    assert_eq!(ws_reply_with_id(&mut again, "d").await["successful"], true);
    again.close().await;
    fx.finish().await;
}

/// A WebSocket spoken byte by byte, for frames a well-behaved client library will not send.
struct RawWs {
    stream: tokio::net::TcpStream,
}

impl RawWs {
    async fn connect(server: &TestServer) -> Self {
        let addr = server.base.trim_start_matches("http://");
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("tcp");
        let upgrade = format!(
            "GET /cometd HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(upgrade.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            let n = tokio::time::timeout(WAIT, stream.read(&mut b))
                .await
                .expect("upgrade response")
                .unwrap();
            assert_eq!(n, 1, "connection closed during upgrade");
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        RawWs { stream }
    }

    /// Sends one client frame (masked with a zero key, so the payload goes as is).
    async fn frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(payload);
        // The server may close before it has read everything.
        let _ = self.stream.write_all(&out).await;
    }

    /// Reads one server frame: `Some((opcode, payload))`, or `None` on EOF or timeout.
    async fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut h = [0u8; 2];
        tokio::time::timeout(WAIT, self.stream.read_exact(&mut h))
            .await
            .ok()?
            .ok()?;
        let mut len = u64::from(h[1] & 0x7F);
        if len == 126 {
            let mut b = [0u8; 2];
            self.stream.read_exact(&mut b).await.ok()?;
            len = u64::from(u16::from_be_bytes(b));
        } else if len == 127 {
            let mut b = [0u8; 8];
            self.stream.read_exact(&mut b).await.ok()?;
            len = u64::from_be_bytes(b);
        }
        let mut payload = vec![0u8; len as usize];
        self.stream.read_exact(&mut payload).await.ok()?;
        Some((h[0] & 0x0F, payload))
    }

    /// The next text frame, as a JSON array.
    async fn text(&mut self) -> Option<Vec<Value>> {
        loop {
            let (opcode, payload) = self.read_frame().await?;
            if opcode == 0x1 {
                let v: Value = serde_json::from_slice(&payload).expect("JSON frame");
                return Some(v.as_array().expect("array frame").clone());
            }
        }
    }

    /// Reads server frames until a close frame, and returns its code.
    async fn close_code(&mut self) -> Option<u16> {
        loop {
            let (opcode, payload) = self.read_frame().await?;
            if opcode == 0x8 {
                return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
            }
        }
    }
}

#[tokio::test]
async fn websocket_invalid_utf8_text_frame_closes_the_socket() {
    let fx = Fixture::new().await;
    let mut ws = RawWs::connect(&fx.server).await;
    wait_metric(&fx.server, "bayeux_websocket_connections", 1.0).await;
    ws.frame(true, 0x1, b"[{\"channel\":\"/a\xff\"}]").await;
    assert_eq!(ws.close_code().await, Some(1007));
    wait_metric(&fx.server, "bayeux_websocket_connections", 0.0).await;
    fx.finish().await;
}

#[tokio::test]
async fn websocket_close_from_the_client_is_answered() {
    // A clean close: the server answers the client's close frame before dropping the socket
    // (without it, clients see an abnormal closure, 1006).
    let fx = Fixture::new().await;
    let mut raw = RawWs::connect(&fx.server).await;
    raw.frame(true, 0x1, b"[{\"id\":\"x\"}]").await;
    let frame = raw.text().await.expect("a reply");
    assert_failed(&frame[0], "400::channel_missing");
    raw.frame(true, 0x8, &1000u16.to_be_bytes()).await;
    assert_eq!(raw.close_code().await, Some(1000));
    wait_metric(&fx.server, "bayeux_websocket_connections", 0.0).await;
    fx.finish().await;
}

#[tokio::test]
async fn websocket_fragmented_message_over_the_limit_closes_with_1009() {
    // The limit is per message: fragments that are each small but add up to more are refused.
    let mut config = test_config();
    config.limits.max_frame_bytes = 4096;
    let fx = Fixture::with(config).await;
    let mut ws = RawWs::connect(&fx.server).await;
    let body = body_of_size(5000);
    let (first, rest) = body.split_at(2500);
    ws.frame(false, 0x1, first).await;
    ws.frame(true, 0x0, rest).await;
    assert_eq!(ws.close_code().await, Some(1009));
    wait_metric(&fx.server, "bayeux_websocket_connections", 0.0).await;
    // Within the limit, a fragmented message is fine.
    let mut raw = RawWs::connect(&fx.server).await;
    let body = body_of_size(4000);
    let (first, rest) = body.split_at(2000);
    raw.frame(false, 0x1, first).await;
    raw.frame(true, 0x0, rest).await;
    let frame = raw.text().await.expect("publish ack");
    assert_eq!(frame[0]["successful"], true, "{frame:?}");
    raw.frame(true, 0x8, &1000u16.to_be_bytes()).await;
    assert_eq!(raw.close_code().await, Some(1000));
    fx.finish().await;
}

// ---------------------------------------------------------------------------------------------
// Fuzz: random input never yields a 5xx, never hangs, never kills a socket
// ---------------------------------------------------------------------------------------------

fn fuzz_config() -> ServerConfig {
    let mut c = test_config();
    // A held connect may come up in random input: keep it short.
    c.timeouts.connect_timeout_ms = 200;
    c.limits.max_body_bytes = 4096;
    c.limits.max_frame_bytes = 4096;
    c.limits.max_messages_per_request = 8;
    c
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        "[ -~\u{e9}\u{2028}\u{1F600}]{0,12}".prop_map(Value::String),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn channel_name() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "/meta/handshake",
            "/meta/connect",
            "/meta/subscribe",
            "/meta/unsubscribe",
            "/meta/disconnect",
            "/meta/x",
            "/meta/**",
            "/a",
            "/a/b",
            "/a/*",
            "/a/**",
            "/**",
            "/service/x",
            "/service/**",
            "",
            "a",
            "/a//b",
        ])
        .prop_map(|s| json!(s)),
        1 => "(/[ -~]{0,6}){0,3}".prop_map(Value::String),
    ]
}

/// Mostly `good`, sometimes any JSON value (the wrong type).
fn mostly<S: Strategy<Value = Value> + 'static>(good: S) -> BoxedStrategy<Value> {
    prop_oneof![8 => good, 1 => json_leaf()].boxed()
}

fn connection_type() -> impl Strategy<Value = Value> {
    prop::sample::select(vec!["long-polling", "websocket", "callback-polling", "x"])
        .prop_map(|s| json!(s))
}

fn field_value(key: &'static str) -> BoxedStrategy<Value> {
    match key {
        "channel" => mostly(channel_name()),
        "clientId" => mostly(prop_oneof![
            3 => Just(json!("$CID")),
            1 => Just(json!("nosuchclient")),
        ]),
        "subscription" => mostly(prop_oneof![
            channel_name(),
            prop::collection::vec(channel_name(), 0..4).prop_map(Value::Array),
        ]),
        "connectionType" => mostly(connection_type()),
        "supportedConnectionTypes" => {
            mostly(prop::collection::vec(connection_type(), 0..4).prop_map(Value::Array))
        }
        "version" => mostly(Just(json!("1.0"))),
        "successful" => mostly(any::<bool>().prop_map(Value::Bool)),
        "advice" => mostly(
            (prop::option::of(-10i64..500), prop::option::of(-10i64..500)).prop_map(|(t, i)| {
                let mut a = serde_json::Map::new();
                if let Some(t) = t {
                    a.insert("timeout".into(), json!(t));
                }
                if let Some(i) = i {
                    a.insert("interval".into(), json!(i));
                }
                Value::Object(a)
            }),
        ),
        _ => json_value().boxed(),
    }
}

const FIELDS: [&str; 12] = [
    "channel",
    "clientId",
    "id",
    "data",
    "ext",
    "advice",
    "subscription",
    "connectionType",
    "supportedConnectionTypes",
    "version",
    "successful",
    "other",
];

fn message_value() -> impl Strategy<Value = Value> {
    let fields: Vec<BoxedStrategy<(String, Value)>> = FIELDS
        .iter()
        .map(|k| field_value(k).prop_map(move |v| (k.to_string(), v)).boxed())
        .collect();
    prop::sample::subsequence(fields, 0..=FIELDS.len())
        .prop_flat_map(|chosen| chosen)
        .prop_map(|pairs| Value::Object(pairs.into_iter().collect()))
}

fn body_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => message_value(),
        5 => prop::collection::vec(message_value(), 1..5).prop_map(Value::Array),
        1 => prop::collection::vec(prop_oneof![message_value(), json_value()], 0..5)
            .prop_map(Value::Array),
        1 => json_value(),
    ]
}

/// Mutations of a JSON text: truncation, a flipped byte, an inserted byte (or none).
fn mutate(text: String, how: u8, at: usize, byte: u8) -> Vec<u8> {
    let mut bytes = text.into_bytes();
    if bytes.is_empty() {
        return bytes;
    }
    let at = at % bytes.len();
    match how % 8 {
        0 => bytes.truncate(at),
        1 => bytes[at] = byte,
        2 => bytes.insert(at, byte),
        _ => {}
    }
    bytes
}

fn fuzz_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => prop::collection::vec(any::<u8>(), 0..512),
        2 => "[\\[\\]{}\",:0-9a-z/\\\\ ]{0,96}".prop_map(String::into_bytes),
        6 => (body_value(), any::<u8>(), any::<usize>(), any::<u8>())
            .prop_map(|(v, how, at, byte)| mutate(v.to_string(), how, at, byte)),
    ]
}

/// Posts `body`; returns (status, content type) or an error after the per-request timeout.
async fn fuzz_post(
    http: &reqwest::Client,
    url: &str,
    content_type: &str,
    body: Vec<u8>,
) -> Result<(u16, String), String> {
    let send = http
        .post(url)
        .header("content-type", content_type)
        .body(body)
        .send();
    let r = tokio::time::timeout(WAIT, send)
        .await
        .map_err(|_| "request timed out".to_owned())?
        .map_err(|e| format!("request failed: {e}"))?;
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    tokio::time::timeout(WAIT, r.bytes())
        .await
        .map_err(|_| "body timed out".to_owned())?
        .map_err(|e| format!("body failed: {e}"))?;
    Ok((status, ct))
}

#[test]
fn fuzz_http_bodies_never_5xx_or_hang() {
    let rt = runtime();
    let server = rt.block_on(TestServer::start(fuzz_config()));
    let mut client = server.client();
    rt.block_on(client.handshake());
    let cid = client.id().to_owned();
    let http = reqwest::Client::new();
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let content_types = prop::sample::select(vec![
        "application/json",
        "application/json;charset=UTF-8",
        "text/plain",
        "application/x-www-form-urlencoded",
        "",
    ]);
    runner
        .run(&(fuzz_body(), content_types), |(body, ct)| {
            let body = String::from_utf8(body.clone())
                .map(|s| s.replace("$CID", &cid).into_bytes())
                .unwrap_or(body);
            let body = if ct.starts_with("application/x-www-form") {
                let mut form = b"message=".to_vec();
                form.extend(url::form_urlencoded::byte_serialize(&body).flat_map(str::bytes));
                form
            } else {
                body
            };
            let (status, got_ct) = rt
                .block_on(fuzz_post(&http, &server.url, ct, body.clone()))
                .map_err(TestCaseError::fail)?;
            prop_assert!(
                status < 500,
                "HTTP {} for {:?}",
                status,
                String::from_utf8_lossy(&body)
            );
            prop_assert!(
                got_ct.starts_with("application/json"),
                "Content-Type {:?} for {:?}",
                got_ct,
                String::from_utf8_lossy(&body)
            );
            Ok(())
        })
        .unwrap();
    rt.block_on(async {
        assert_server_healthy(&server).await;
        server.stop().await;
    });
}

#[test]
fn fuzz_jsonp_queries_never_5xx_or_hang() {
    let rt = runtime();
    let server = rt.block_on(TestServer::start(fuzz_config()));
    let http = reqwest::Client::new();
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(
            &(fuzz_body(), "[ -~]{0,16}", any::<bool>()),
            |(body, callback, with_cb)| {
                let mut query = String::new();
                if with_cb {
                    query.push_str("jsonp=");
                    query.extend(url::form_urlencoded::byte_serialize(callback.as_bytes()));
                    query.push('&');
                }
                query.push_str("message=");
                query.extend(url::form_urlencoded::byte_serialize(&body));
                let url = format!("{}?{query}", server.url);
                let (status, ct) = rt
                    .block_on(async {
                        tokio::time::timeout(WAIT, async {
                            let r = http.get(url).send().await.map_err(|e| e.to_string())?;
                            let r = raw(r).await;
                            Ok::<_, String>((r.status, r.content_type))
                        })
                        .await
                    })
                    .map_err(|_| TestCaseError::fail(format!("timed out: {query:?}")))?
                    .map_err(TestCaseError::fail)?;
                prop_assert!(status < 500, "HTTP {} for {:?}", status, query);
                // A JSONP answer is script; anything refused is a JSON error.
                let expected = if status == 200 {
                    "text/javascript"
                } else {
                    "application/json"
                };
                prop_assert!(
                    ct.starts_with(expected),
                    "{} {:?} for {:?}",
                    status,
                    ct,
                    query
                );
                Ok(())
            },
        )
        .unwrap();
    rt.block_on(async {
        assert_server_healthy(&server).await;
        server.stop().await;
    });
}

#[test]
fn fuzz_websocket_frames_never_kill_the_socket() {
    let rt = runtime();
    let mut config = fuzz_config();
    // Every generated frame fits (the oversized frame has its own test).
    config.limits.max_frame_bytes = 1024 * 1024;
    let server = rt.block_on(TestServer::start(config));
    let ws = std::cell::RefCell::new(rt.block_on(WsClient::connect(&server.ws_url)));
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 96,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&fuzz_body(), |body| {
            let text = String::from_utf8_lossy(&body).into_owned();
            let mut ws = ws.borrow_mut();
            rt.block_on(async {
                ws.send_text(text.clone()).await;
                // A message without a channel always gets a reply: the socket is alive.
                ws.send(json!([{"id":"probe"}])).await;
                let reply = tokio::time::timeout(WAIT, ws_reply_with_id(&mut ws, "probe"))
                    .await
                    .map_err(|_| TestCaseError::fail(format!("no probe reply after {text:?}")))?;
                prop_assert_eq!(&reply["error"], "400::channel_missing");
                Ok(())
            })
        })
        .unwrap();
    rt.block_on(async {
        ws.into_inner().close().await;
        assert_server_healthy(&server).await;
        wait_metric(&server, "bayeux_websocket_connections", 0.0).await;
        server.stop().await;
    });
}
