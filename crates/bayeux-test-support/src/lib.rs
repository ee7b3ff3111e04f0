//! Test helpers: a real bayeux server on port 0 (stopped on drop), small wire-level clients
//! for long-polling and WebSocket, and a `redis-server` of the test's own ([`RedisServer`]).
//! Tests talk real HTTP and WebSocket to a real server.
#![deny(unreachable_pub)]

pub mod redis;
pub use redis::RedisServer;

use std::time::Duration;

use bayeux_server::config::ServerConfig;
use bayeux_server::{Broker, Server, ServerBuilder};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A configuration for tests: port 0, the memory engine, short timeouts.
pub fn test_config() -> ServerConfig {
    let mut c = ServerConfig {
        bind: "127.0.0.1:0".into(),
        engine: bayeux_server::config::EngineKind::Memory,
        ..ServerConfig::default()
    };
    c.timeouts.connect_timeout_ms = 2_000;
    c.timeouts.shutdown_grace_ms = 1_000;
    c
}

/// A running server. Dropping it shuts it down.
pub struct TestServer {
    /// `http://127.0.0.1:PORT/cometd`
    pub url: String,
    /// `ws://127.0.0.1:PORT/cometd`
    pub ws_url: String,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    /// The broker, for server-side publishing and inspection.
    pub broker: Arc<Broker>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// Starts a server with `config` (its `bind` should use port 0).
    pub async fn start(config: ServerConfig) -> Self {
        Self::start_with(Server::builder(config)).await
    }

    /// Starts a server from a builder (custom policy, engine, dialect).
    pub async fn start_with(builder: ServerBuilder) -> Self {
        let server = builder.bind().await.expect("bind test server");
        let url = server.url();
        let base = format!("http://{}", server.local_addr());
        let ws_url = url.replacen("http://", "ws://", 1);
        let broker = server.broker().clone();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        TestServer {
            url,
            ws_url,
            base,
            broker,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Starts a server with [`test_config`].
    pub async fn default_config() -> Self {
        Self::start(test_config()).await
    }

    /// Shuts down and waits for the server to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }

    /// A long-polling client for this server.
    pub fn client(&self) -> LpClient {
        LpClient::new(&self.url)
    }

    /// Reads `/metrics` and returns the value of the sample line starting with `name`.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = reqwest::get(format!("{}/metrics", self.base))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A raw HTTP response: status, content type and parsed JSON (if it parsed).
#[derive(Debug)]
pub struct RawResponse {
    /// HTTP status.
    pub status: u16,
    /// The Content-Type header.
    pub content_type: String,
    /// The body.
    pub text: String,
}

impl RawResponse {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
}

/// A long-polling client speaking raw Bayeux JSON.
#[derive(Clone)]
pub struct LpClient {
    /// Endpoint URL.
    pub url: String,
    http: reqwest::Client,
    /// The clientId after [`LpClient::handshake`].
    pub client_id: Option<String>,
}

impl LpClient {
    /// A client for `url`.
    pub fn new(url: &str) -> Self {
        LpClient {
            url: url.to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("http client"),
            client_id: None,
        }
    }

    /// POSTs a raw body with a content type.
    pub async fn post_raw(
        &self,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> RawResponse {
        let r = self
            .http
            .post(&self.url)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        let content_type = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        RawResponse {
            status,
            content_type,
            text: r.text().await.expect("body"),
        }
    }

    /// POSTs JSON and returns the reply array (panics unless HTTP 200 with JSON).
    pub async fn send(&self, body: Value) -> Vec<Value> {
        let r = self
            .post_raw("application/json", serde_json::to_vec(&body).unwrap())
            .await;
        assert_eq!(r.status, 200, "HTTP status for {body}: {}", r.text);
        assert!(
            r.content_type.starts_with("application/json"),
            "content type {}",
            r.content_type
        );
        match r.json() {
            Value::Array(a) => a,
            other => panic!("reply is not an array: {other}"),
        }
    }

    /// Handshakes (long-polling) and remembers the clientId.
    pub async fn handshake(&mut self) -> Value {
        let replies = self
            .send(json!([{"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":["long-polling"],"id":"h"}]))
            .await;
        let reply = replies[0].clone();
        assert_eq!(reply["successful"], true, "handshake: {reply}");
        self.client_id = Some(reply["clientId"].as_str().unwrap().to_owned());
        reply
    }

    /// The clientId (panics before a handshake).
    pub fn id(&self) -> &str {
        self.client_id.as_deref().expect("handshake first")
    }

    /// Subscribes to one channel or a list and returns the reply.
    pub async fn subscribe(&self, subscription: Value) -> Value {
        let replies = self
            .send(json!([{"channel":"/meta/subscribe","clientId":self.id(),"subscription":subscription,"id":"s"}]))
            .await;
        replies[0].clone()
    }

    /// Unsubscribes and returns the reply.
    pub async fn unsubscribe(&self, subscription: Value) -> Value {
        let replies = self
            .send(json!([{"channel":"/meta/unsubscribe","clientId":self.id(),"subscription":subscription,"id":"u"}]))
            .await;
        replies[0].clone()
    }

    /// Publishes and returns the ack.
    pub async fn publish(&self, channel: &str, data: Value) -> Value {
        let mut m = json!({"channel":channel,"data":data,"id":"p"});
        if let Some(id) = &self.client_id {
            m["clientId"] = json!(id);
        }
        self.send(json!([m])).await[0].clone()
    }

    /// Sends a connect and returns the whole reply array.
    pub async fn connect(&self) -> Vec<Value> {
        self.send(json!([{"channel":"/meta/connect","clientId":self.id(),"connectionType":"long-polling","id":"c"}]))
            .await
    }

    /// Sends a connect and splits the reply into (connect reply, deliveries).
    pub async fn connect_split(&self) -> (Value, Vec<Value>) {
        split(self.connect().await)
    }
}

/// Splits a reply array into the `/meta/connect` reply and the other messages.
pub fn split(replies: Vec<Value>) -> (Value, Vec<Value>) {
    let mut connect = Value::Null;
    let mut rest = Vec::new();
    for r in replies {
        if r["channel"] == "/meta/connect" {
            connect = r;
        } else {
            rest.push(r);
        }
    }
    (connect, rest)
}

/// A WebSocket client speaking raw Bayeux JSON.
pub struct WsClient {
    stream: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    /// The clientId after [`WsClient::handshake`].
    pub client_id: Option<String>,
}

impl WsClient {
    /// Connects to `ws_url`.
    pub async fn connect(ws_url: &str) -> Self {
        let (stream, _) = tokio_tungstenite::connect_async(ws_url)
            .await
            .expect("websocket connect");
        WsClient {
            stream,
            client_id: None,
        }
    }

    /// Sends one text frame.
    pub async fn send(&mut self, body: Value) {
        self.send_text(body.to_string()).await;
    }

    /// Sends one raw text frame.
    pub async fn send_text(&mut self, text: String) {
        self.stream
            .send(tokio_tungstenite::tungstenite::Message::Text(text.into()))
            .await
            .expect("ws send");
    }

    /// Sends one binary frame.
    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.stream
            .send(tokio_tungstenite::tungstenite::Message::Binary(
                bytes.into(),
            ))
            .await
            .expect("ws send");
    }

    /// Sends a close frame and waits (up to five seconds) for the server to close.
    pub async fn close(mut self) {
        let _ = self.stream.close(None).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(Ok(_)) = self.stream.next().await {}
        })
        .await;
    }

    /// The next text frame as a JSON array, or `None` if the socket closed (or nothing came
    /// within `wait`).
    pub async fn recv(&mut self, wait: Duration) -> Option<Vec<Value>> {
        loop {
            let frame = tokio::time::timeout(wait, self.stream.next())
                .await
                .ok()??;
            match frame {
                Ok(tokio_tungstenite::tungstenite::Message::Text(t)) => {
                    let v: Value = serde_json::from_str(&t).expect("ws frame is JSON");
                    return Some(v.as_array().expect("ws frame is an array").clone());
                }
                Ok(tokio_tungstenite::tungstenite::Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    /// The close frame's code, reading until the socket closes.
    pub async fn close_code(&mut self, wait: Duration) -> Option<u16> {
        loop {
            let frame = tokio::time::timeout(wait, self.stream.next())
                .await
                .ok()??;
            match frame {
                Ok(tokio_tungstenite::tungstenite::Message::Close(Some(c))) => {
                    return Some(c.code.into());
                }
                Ok(tokio_tungstenite::tungstenite::Message::Close(None)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    /// Handshakes over WebSocket and remembers the clientId.
    pub async fn handshake(&mut self) -> Value {
        self.send(json!([{"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":["websocket"],"id":"h"}]))
            .await;
        let reply = self
            .recv(Duration::from_secs(5))
            .await
            .expect("handshake reply")[0]
            .clone();
        assert_eq!(reply["successful"], true, "handshake: {reply}");
        self.client_id = Some(reply["clientId"].as_str().unwrap().to_owned());
        reply
    }

    /// The clientId.
    pub fn id(&self) -> String {
        self.client_id.clone().expect("handshake first")
    }
}
