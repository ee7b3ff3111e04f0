//! A client's connection to the server, over HTTP long-polling or WebSocket: send one message,
//! get its reply; deliveries that arrive on the way go to a [`Sink`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bayeux_protocol::{Message, decode_batch, encode_batch};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::header;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::args::Transport;
use crate::net::Target;

/// Why a request got no usable reply.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkError {
    #[error("tcp connect: {0}")]
    Connect(std::io::Error),
    #[error("tcp connect timed out")]
    ConnectTimeout,
    #[error("websocket upgrade: {0}")]
    Upgrade(String),
    #[error("no reply in time")]
    Timeout,
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("connection closed")]
    Closed,
    #[error("bad reply: {0}")]
    BadReply(String),
    #[error("no reply to the message")]
    NoReply,
}

impl LinkError {
    /// A short name for the error counts.
    pub(crate) fn kind(&self) -> String {
        match self {
            LinkError::Connect(_) => "tcp_connect".into(),
            LinkError::ConnectTimeout => "tcp_connect_timeout".into(),
            LinkError::Upgrade(_) => "ws_upgrade".into(),
            LinkError::Timeout => "timeout".into(),
            LinkError::Status(s) => format!("http_{s}"),
            LinkError::Http(_) => "http_error".into(),
            LinkError::Closed => "closed".into(),
            LinkError::BadReply(_) => "bad_reply".into(),
            LinkError::NoReply => "no_reply".into(),
        }
    }
}

/// Where a link hands the deliveries it receives, and the errors it cannot return.
pub(crate) trait Sink: Send + Sync {
    /// Deliveries received in one HTTP response or one WebSocket frame.
    fn deliver(&self, deliveries: &[Delivery]);
    /// An error no caller sees (a bad frame, a reply nobody waits for).
    fn error(&self, kind: &str);
}

/// A message the server pushes to a subscriber (not a reply): what the bench needs of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Delivery {
    /// `data.seq` and `data.t` when `data` is an object holding both as unsigned integers
    /// (messages of this bench); `None` for any other message.
    pub(crate) seq_and_time: Option<(u64, u64)>,
}

/// The fields that tell a delivery from a reply (and a delivery's `seq` and `t`), read without
/// decoding the rest: a delivery is never decoded into a [`Message`], whose `data` would be a
/// tree of maps and strings to build and free for each of the hundreds of thousands the bench
/// receives per second.
#[derive(serde::Deserialize)]
struct Probe<'a> {
    #[serde(default, borrow)]
    channel: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    successful: Option<serde::de::IgnoredAny>,
    #[serde(default, borrow)]
    data: Option<&'a serde_json::value::RawValue>,
}

/// `data` of a bench message: `{"seq": N, "t": N, ...}`.
#[derive(serde::Deserialize)]
struct SeqTime {
    seq: u64,
    t: u64,
}

/// Decodes a batch (an array of messages or one message): deliveries apart, as
/// [`Delivery`]s, everything else (replies, errors) as [`Message`]s. A delivery is a message
/// with `data`, without `successful`, on a channel outside `/meta/`.
pub(crate) fn decode_incoming(body: &[u8]) -> Result<(Vec<Message>, Vec<Delivery>), String> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let raws: Vec<&serde_json::value::RawValue> = match first {
        Some(b'[') => serde_json::from_slice(body).map_err(|e| e.to_string())?,
        _ => vec![serde_json::from_slice(body).map_err(|e| e.to_string())?],
    };
    if raws.is_empty() {
        return Err("empty batch".into());
    }
    let mut others = Vec::new();
    let mut deliveries = Vec::new();
    for raw in raws {
        let probe: Probe<'_> = serde_json::from_str(raw.get()).map_err(|e| e.to_string())?;
        let is_delivery = probe.successful.is_none()
            && probe.data.is_some()
            && !probe.channel.as_deref().unwrap_or("").starts_with("/meta/");
        if is_delivery {
            let seq_and_time = probe
                .data
                .and_then(|d| serde_json::from_str::<SeqTime>(d.get()).ok())
                .map(|d| (d.seq, d.t));
            deliveries.push(Delivery { seq_and_time });
        } else {
            others.extend(decode_batch(raw.get().as_bytes()).map_err(|e| e.to_string())?);
        }
    }
    Ok((others, deliveries))
}

fn id_key(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The session cookies of one Bayeux client (CometD ties a session to `BAYEUX_BROWSER`).
#[derive(Default)]
pub(crate) struct CookieJar {
    cookies: Mutex<Vec<(String, String)>>,
}

impl CookieJar {
    fn store(&self, headers: &header::HeaderMap) {
        for v in headers.get_all(header::SET_COOKIE) {
            let Ok(v) = v.to_str() else { continue };
            let pair = v.split(';').next().unwrap_or("");
            let Some((name, value)) = pair.split_once('=') else {
                continue;
            };
            let (name, value) = (name.trim().to_owned(), value.trim().to_owned());
            let mut jar = self.cookies.lock();
            match jar.iter_mut().find(|(n, _)| *n == name) {
                Some(slot) => slot.1 = value,
                None => jar.push((name, value)),
            }
        }
    }

    fn header(&self) -> Option<String> {
        let jar = self.cookies.lock();
        if jar.is_empty() {
            return None;
        }
        Some(
            jar.iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect::<Vec<_>>()
                .join("; "),
        )
    }

    /// Forgets every cookie (before a new handshake).
    pub(crate) fn clear(&self) {
        self.cookies.lock().clear();
    }
}

/// A client's connection.
pub(crate) enum Link {
    Http(HttpLink),
    Ws(WsLink),
}

impl Link {
    /// Opens a connection for a client.
    pub(crate) async fn open(
        target: &Arc<Target>,
        transport: Transport,
        sink: Arc<dyn Sink>,
        jar: Arc<CookieJar>,
    ) -> Result<Link, LinkError> {
        match transport {
            Transport::LongPolling => {
                let mut link = HttpLink {
                    target: target.clone(),
                    jar,
                    sink,
                    conn: None,
                    next_id: 0,
                };
                link.conn = Some(link.open_conn().await?);
                Ok(Link::Http(link))
            }
            Transport::Websocket => Ok(Link::Ws(WsLink::open(target, sink).await?)),
        }
    }

    /// Another link for the same client: a new HTTP connection with the same cookies, or the
    /// same WebSocket.
    pub(crate) async fn fork(&self) -> Result<Link, LinkError> {
        match self {
            Link::Http(h) => {
                let mut link = HttpLink {
                    target: h.target.clone(),
                    jar: h.jar.clone(),
                    sink: h.sink.clone(),
                    conn: None,
                    next_id: 0,
                };
                link.conn = Some(link.open_conn().await?);
                Ok(Link::Http(link))
            }
            Link::Ws(w) => Ok(Link::Ws(w.clone())),
        }
    }

    /// Sends one message (its id is set here) and returns the reply with the same id.
    pub(crate) async fn call(
        &mut self,
        msg: Message,
        timeout: Duration,
    ) -> Result<Message, LinkError> {
        match self {
            Link::Http(h) => h.call(msg, timeout).await,
            Link::Ws(w) => w.call(msg, timeout).await,
        }
    }

    /// Is the underlying socket gone for good (a WebSocket that closed)?
    pub(crate) fn is_dead(&self) -> bool {
        match self {
            Link::Http(_) => false,
            Link::Ws(w) => w.shared.closed.load(Ordering::Acquire),
        }
    }

    /// Closes a WebSocket with a close frame; drops an HTTP connection.
    pub(crate) async fn close(self) {
        if let Link::Ws(w) = self {
            w.close().await;
        }
    }
}

struct HttpConn {
    sender: http1::SendRequest<Full<Bytes>>,
    task: JoinHandle<()>,
}

impl Drop for HttpConn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One HTTP/1.1 keep-alive connection (reopened when it breaks), bound to a source address.
pub(crate) struct HttpLink {
    target: Arc<Target>,
    jar: Arc<CookieJar>,
    sink: Arc<dyn Sink>,
    conn: Option<HttpConn>,
    next_id: u64,
}

impl HttpLink {
    async fn open_conn(&self) -> Result<HttpConn, LinkError> {
        let stream = self.target.connect().await?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| LinkError::Http(e.to_string()))?;
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(HttpConn { sender, task })
    }

    async fn post(&mut self, body: Vec<u8>) -> Result<(Vec<Message>, Vec<Delivery>), LinkError> {
        // Taken out while in use: if this future is dropped mid-request, the connection goes
        // with it and the next request opens a fresh one.
        let mut conn = match self.conn.take() {
            Some(c) if !c.sender.is_closed() => c,
            _ => self.open_conn().await?,
        };
        if conn.sender.ready().await.is_err() {
            conn = self.open_conn().await?;
            conn.sender
                .ready()
                .await
                .map_err(|e| LinkError::Http(e.to_string()))?;
        }
        let mut req = hyper::Request::post(self.target.path.as_str())
            .header(header::HOST, self.target.host_header.as_str())
            .header(header::CONTENT_TYPE, "application/json;charset=UTF-8");
        if let Some(cookie) = self.jar.header() {
            req = req.header(header::COOKIE, cookie);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| LinkError::Http(e.to_string()))?;
        let resp = conn
            .sender
            .send_request(req)
            .await
            .map_err(|e| LinkError::Http(e.to_string()))?;
        let status = resp.status().as_u16();
        self.jar.store(resp.headers());
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| LinkError::Http(e.to_string()))?
            .to_bytes();
        self.conn = Some(conn);
        if status != 200 {
            return Err(LinkError::Status(status));
        }
        decode_incoming(&body).map_err(LinkError::BadReply)
    }

    async fn call(&mut self, mut msg: Message, timeout: Duration) -> Result<Message, LinkError> {
        self.next_id += 1;
        let id = Value::String(self.next_id.to_string());
        msg.id = Some(id.clone());
        let channel = msg.channel.clone();
        let body = encode_batch(std::slice::from_ref(&msg));
        let (replies, deliveries) = match tokio::time::timeout(timeout, self.post(body)).await {
            Ok(r) => r?,
            Err(_) => return Err(LinkError::Timeout),
        };
        let found = replies
            .into_iter()
            .find(|m| m.id.as_ref() == Some(&id) || (m.id.is_none() && m.channel == channel));
        if !deliveries.is_empty() {
            self.sink.deliver(&deliveries);
        }
        found.ok_or(LinkError::NoReply)
    }
}

type Waiter = (String, oneshot::Sender<Message>);

struct WsShared {
    pending: Mutex<HashMap<String, Waiter>>,
    closed: AtomicBool,
}

impl WsShared {
    fn resolve(&self, m: Message, sink: &dyn Sink) {
        let mut pending = self.pending.lock();
        let waiter = match &m.id {
            Some(id) => pending.remove(&id_key(id)),
            None => {
                let key = pending
                    .iter()
                    .find(|(_, (ch, _))| *ch == m.channel)
                    .map(|(k, _)| k.clone());
                key.and_then(|k| pending.remove(&k))
            }
        };
        drop(pending);
        match waiter {
            Some((_, tx)) => {
                let _ = tx.send(m);
            }
            // A meta reply nobody waits for answers a request already given up and counted
            // (a held connect dropped at the end of the run, a timed-out disconnect); a
            // publish ack after its timeout is counted here.
            None if m.channel.starts_with("/meta/") => {}
            None => sink.error("late_reply"),
        }
    }
}

struct WsInner {
    out: mpsc::UnboundedSender<WsMessage>,
    next_id: AtomicU64,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Drop for WsInner {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

/// One WebSocket, shared by the tasks of one client; replies are matched by id.
#[derive(Clone)]
pub(crate) struct WsLink {
    inner: Arc<WsInner>,
    shared: Arc<WsShared>,
}

struct PendingGuard<'a> {
    shared: &'a WsShared,
    id: String,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.pending.lock().remove(&self.id);
    }
}

impl WsLink {
    async fn open(target: &Arc<Target>, sink: Arc<dyn Sink>) -> Result<WsLink, LinkError> {
        let stream = target.connect().await?;
        let (ws, _) = tokio::time::timeout(
            target.connect_timeout(),
            tokio_tungstenite::client_async_with_config(
                target.ws_url.as_str(),
                stream,
                // Small eager buffers: many sockets, small messages (the default read buffer is
                // 128 KiB per socket).
                Some(
                    WebSocketConfig::default()
                        .read_buffer_size(8 * 1024)
                        .write_buffer_size(0),
                ),
            ),
        )
        .await
        .map_err(|_| LinkError::ConnectTimeout)?
        .map_err(|e| LinkError::Upgrade(e.to_string()))?;
        let (mut write, mut read) = ws.split();
        let (out, mut rx) = mpsc::unbounded_channel::<WsMessage>();
        let writer = tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                let close = matches!(m, WsMessage::Close(_));
                if write.send(m).await.is_err() || close {
                    break;
                }
            }
        });
        let shared = Arc::new(WsShared {
            pending: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        });
        let reader_shared = shared.clone();
        let reader = tokio::spawn(async move {
            let shared = reader_shared;
            while let Some(frame) = read.next().await {
                let bytes: &[u8] = match &frame {
                    Ok(WsMessage::Text(t)) => t.as_bytes(),
                    Ok(WsMessage::Binary(b)) => b,
                    Ok(WsMessage::Close(_)) | Err(_) => break,
                    Ok(_) => continue,
                };
                match decode_incoming(bytes) {
                    Ok((others, deliveries)) => {
                        for m in others {
                            shared.resolve(m, sink.as_ref());
                        }
                        if !deliveries.is_empty() {
                            sink.deliver(&deliveries);
                        }
                    }
                    Err(_) => sink.error("bad_frame"),
                }
            }
            shared.closed.store(true, Ordering::Release);
            shared.pending.lock().clear();
        });
        Ok(WsLink {
            inner: Arc::new(WsInner {
                out,
                next_id: AtomicU64::new(0),
                reader,
                writer,
            }),
            shared,
        })
    }

    async fn call(&self, mut msg: Message, timeout: Duration) -> Result<Message, LinkError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(LinkError::Closed);
        }
        let id = (self.inner.next_id.fetch_add(1, Ordering::Relaxed) + 1).to_string();
        msg.id = Some(Value::String(id.clone()));
        let (tx, rx) = oneshot::channel();
        self.shared
            .pending
            .lock()
            .insert(id.clone(), (msg.channel.clone(), tx));
        let _guard = PendingGuard {
            shared: &self.shared,
            id,
        };
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(LinkError::Closed);
        }
        let text = String::from_utf8(encode_batch(std::slice::from_ref(&msg)))
            .map_err(|e| LinkError::BadReply(e.to_string()))?;
        self.inner
            .out
            .send(WsMessage::Text(text.into()))
            .map_err(|_| LinkError::Closed)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(m)) => Ok(m),
            Ok(Err(_)) => Err(LinkError::Closed),
            Err(_) => Err(LinkError::Timeout),
        }
    }

    async fn close(&self) {
        let _ = self.inner.out.send(WsMessage::Close(None));
        // Give the close frame a moment to go out; the tasks end when the last clone drops.
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while !self.shared.closed.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_are_told_from_replies() {
        let body = br#"[
            {"channel":"/meta/connect","successful":true,"clientId":"c"},
            {"channel":"/bench/1","data":{"pad":"x","seq":7,"t":99},"ext":{"replay":3}},
            {"channel":"/chat","data":"not a bench message"},
            {"channel":"/bench/1","id":"5","successful":true},
            {"channel":"/meta/subscribe","data":{"seq":1,"t":2},"successful":false,"error":"403::x"},
            {"channel":"/x","data":{"seq":-1,"t":2}},
            {"channel":"/x","data":null}
        ]"#;
        let (others, deliveries) = decode_incoming(body).unwrap();
        assert_eq!(
            deliveries,
            [
                Delivery {
                    seq_and_time: Some((7, 99))
                },
                Delivery { seq_and_time: None },
                Delivery { seq_and_time: None },
            ]
        );
        let channels: Vec<&str> = others.iter().map(|m| m.channel.as_str()).collect();
        assert_eq!(
            channels,
            ["/meta/connect", "/bench/1", "/meta/subscribe", "/x"]
        );
        assert_eq!(others[2].error.as_deref(), Some("403::x"));
    }

    #[test]
    fn one_message_or_a_bad_batch() {
        let (others, deliveries) =
            decode_incoming(br#" {"channel":"/a","data":{"seq":1,"t":2}}"#).unwrap();
        assert!(others.is_empty());
        assert_eq!(
            deliveries,
            [Delivery {
                seq_and_time: Some((1, 2))
            }]
        );
        assert!(decode_incoming(b"[]").is_err());
        assert!(decode_incoming(b"[{\"channel\":").is_err());
        assert!(decode_incoming(b"42").is_err());
        // A reply that is not a valid message is an error, as before.
        assert!(decode_incoming(br#"[{"channel":"/meta/connect","successful":"yes"}]"#).is_err());
    }
}
