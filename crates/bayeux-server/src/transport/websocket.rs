//! WebSocket: one JSON array per frame in both directions. The session is bound to the
//! connection by its handshake or connect; messages are pushed as they arrive (batched by the
//! lazy delay) without waking the held `/meta/connect`, which is answered at its timeout as the
//! heartbeat, exactly as on HTTP.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use axum::http::HeaderMap;
use bayeux_protocol::{ErrorKind, Message, connection_type, meta};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use tokio::time::Instant;

use super::ws_socket::{Failure, Incoming, WsSocket};
use super::{BodyError, build_body, decode};
use crate::broker::{Broker, Hold, Session};
use crate::policy::RequestInfo;

/// Close code for a message larger than the limit.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code at server shutdown.
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code for a protocol error.
pub const CLOSE_PROTOCOL: u16 = 1002;
/// Close code for a text message that is not UTF-8.
pub const CLOSE_INVALID_PAYLOAD: u16 = 1007;

struct Pending {
    reply: Message,
    deadline: Instant,
    _hold: Hold,
}

struct Conn {
    broker: Arc<Broker>,
    bound: Option<Arc<Session>>,
    /// Boxed: moved around in the connection's loop, it would take its size several times
    /// over in the future of every idle connection.
    pending: Option<Box<Pending>>,
}

impl Conn {
    fn bind(&mut self, session: Arc<Session>) {
        if self
            .bound
            .as_ref()
            .is_some_and(|b| Arc::ptr_eq(b, &session))
        {
            return;
        }
        self.pending = None;
        self.bound = Some(session);
    }

    /// What to send because the bound session has messages or has closed.
    fn flush(&mut self) -> Option<Vec<u8>> {
        let session = self.bound.clone()?;
        if session.is_closed() {
            self.bound = None;
            let pending = self.pending.take()?;
            let reason = self.broker.close_reason(&session)?;
            let reply = self.broker.closed_connect_reply(pending.reply, reason);
            return Some(build_body(&[], &[], Some(&reply)));
        }
        if session.ack_enabled() {
            // With the ack extension messages travel only in connect replies, each reply a
            // batch the client confirms: answer the held connect (or wait for the next one).
            let pending = self.pending.take()?;
            let mut reply = pending.reply;
            let deliveries = self.broker.take_for_connect(&session, &mut reply);
            return Some(build_body(&[], &deliveries, Some(&reply)));
        }
        let deliveries = self.broker.take_deliveries(&session);
        if deliveries.is_empty() {
            return None;
        }
        Some(build_body(&[], &deliveries, None))
    }

    /// After a frame went out: record what was delivered (shared engines) and let replayed
    /// history waiting for room into the queue.
    async fn commit(&self) {
        if let Some(session) = &self.bound {
            // Taken by another node: the copy is stale now and the next frame claims it back.
            let _ = self.broker.commit_delivery(session).await;
            if let Err(e) = self.broker.refill(session).await {
                tracing::warn!(client_id = session.id(), error = %e, "replay refill failed");
            }
        }
    }

    /// Would [`Conn::flush`] send something now?
    fn can_flush(&self) -> bool {
        self.bound.as_ref().is_some_and(|s| {
            s.is_closed() || (s.has_queued() && (self.pending.is_some() || !s.ack_enabled()))
        })
    }

    /// Processes the messages of one text frame and returns the frame to send back.
    async fn on_messages(&mut self, info: &RequestInfo<'_>, messages: Vec<Message>) -> Vec<u8> {
        let broker = self.broker.clone();
        let processed = broker.process(info, messages).await;
        for reply in &processed.replies {
            if reply.channel == meta::HANDSHAKE
                && reply.successful == Some(true)
                && let Some(session) = reply.client_id.as_deref().and_then(|c| broker.session(c))
            {
                self.bind(session);
            }
        }
        let mut replies = processed.replies;
        let Some(plan) = processed.connect else {
            return build_body(&replies, &[], None);
        };
        self.bind(plan.session.clone());
        if let Some(older) = self.pending.take() {
            replies.push(older.reply);
        }
        match plan.hold {
            None => {
                let mut reply = plan.reply;
                let deliveries: Vec<Bytes> = broker.take_for_connect(&plan.session, &mut reply);
                build_body(&replies, &deliveries, Some(&reply))
            }
            Some(timeout) => {
                let (hold, _) = broker.begin_hold(&plan.session, false);
                self.pending = Some(Box::new(Pending {
                    reply: plan.reply,
                    deadline: Instant::now() + timeout,
                    _hold: hold,
                }));
                build_body(&replies, &[], None)
            }
        }
    }
}

/// Publishes answered concurrently on one connection, at most.
const PIPELINE: usize = 64;

/// A frame that can be processed while earlier ones still wait for their append: one publish
/// to a broadcast channel, on an engine that is not shared. Its append is issued when its
/// future is first polled, and futures are first polled in the order frames arrived, so the
/// log keeps the client's order; its reply goes out in that order too. Anything else (meta
/// messages, service channels, several messages in a frame) waits until the pipeline is empty.
fn pipelinable(broker: &Broker, messages: &[Message]) -> bool {
    match messages {
        [m] => {
            !broker.engine().shared()
                && !m.channel.is_empty()
                && !m.channel.starts_with("/meta/")
                && !m.channel.starts_with("/service/")
        }
        _ => false,
    }
}

/// Decodes a text frame, or returns the error frame to send back.
fn decode_frame(broker: &Broker, text: &[u8]) -> Result<Vec<Message>, Vec<u8>> {
    decode(broker, text).map_err(|e| {
        broker.metrics().error(e.kind.code(broker.dialect()));
        e.body(broker)
    })
}

fn is_empty_array(body: &[u8]) -> bool {
    body == b"[]"
}

/// How a connection's loop ended.
enum End {
    /// The socket is gone (end of stream, or a write failed).
    Gone,
    /// Close it with this code (`None`: the answer to an empty close) and reason.
    Close(Option<u16>, String),
}

/// Runs one WebSocket connection until it closes or the server shuts down.
///
/// Not an `async fn`: an `async fn` keeps its arguments for its whole life beside the locals
/// they are moved into, and this future lives as long as the socket (memory per idle client).
pub(crate) fn run(
    ws: WsSocket,
    broker: Arc<Broker>,
    headers: HeaderMap,
    remote: Option<SocketAddr>,
) -> impl Future<Output = ()> + Send {
    let mut ws = ws;
    async move {
        broker.metrics().websockets.inc();
        let info = RequestInfo {
            headers: &headers,
            remote,
            connection_type: connection_type::WEBSOCKET,
        };
        let mut conn = Conn {
            broker: broker.clone(),
            bound: None,
            pending: None,
        };
        // Publishes in flight (see `pipelinable`): their replies, in the order the frames came.
        // Made at the first one (it allocates), so that sockets that never publish pay nothing.
        let mut publishes: Option<Pipeline<'_>> = None;
        let end = loop {
            let session = conn.bound.clone();
            // Pinned in place, not boxed: it is made anew after every frame sent.
            let mut notified = std::pin::pin!(session.as_ref().map(|s| s.notify.notified()));
            if let Some(n) = notified.as_mut().as_pin_mut() {
                n.enable();
            }
            if conn.can_flush() {
                if let Some(out) = conn.flush()
                    && ws.send_text(&out).await.is_err()
                {
                    break End::Gone;
                }
                conn.commit().await;
                continue;
            }
            let deadline = conn.pending.as_ref().map(|p| p.deadline);
            // Only waiting here; what an event needs is done in `on_event`, boxed, so that this
            // future, which lives as long as the socket, holds none of it between events
            // (memory per idle client).
            let event = tokio::select! {
                Some(out) = next_reply(&mut publishes), if in_flight(&publishes) > 0 => {
                    Event::Reply(out)
                }
                incoming = ws.next(), if in_flight(&publishes) < PIPELINE => Event::Frame(incoming),
                _ = async {
                    match notified.as_mut().as_pin_mut() {
                        Some(n) => n.await,
                        None => std::future::pending().await,
                    }
                } => Event::Notified,
                _ = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                } => Event::Deadline,
                _ = broker.stopped() => Event::Stopped,
            };
            if let Event::Notified = event {
                // Messages (or a close) for the bound session: sent at the top of the loop,
                // after the lazy delay has let more of them gather.
                let lazy = broker.config().timeouts.lazy_delay();
                if !lazy.is_zero() {
                    tokio::time::sleep(lazy).await;
                }
                continue;
            }
            if let Some(end) =
                Box::pin(on_event(&mut conn, &mut ws, &mut publishes, &info, event)).await
            {
                break end;
            }
        };
        drop(publishes);
        drop(conn);
        if let End::Close(code, reason) = end {
            // Boxed: it runs once, at the end.
            Box::pin(ws.close(code, &reason)).await;
        }
        broker.metrics().websockets.dec();
    }
}

/// What woke a connection's loop.
enum Event {
    /// A pipelined publish is done: its reply frame.
    Reply(Vec<u8>),
    /// A frame came in (`None`: the stream ended).
    Frame(Option<Result<Incoming, Failure>>),
    /// The bound session has messages, or closed.
    Notified,
    /// The held connect's timeout passed.
    Deadline,
    /// The server is shutting down.
    Stopped,
}

/// Handles one event of a connection's loop; `Some` ends the loop.
async fn on_event<'a>(
    conn: &mut Conn,
    ws: &mut WsSocket,
    publishes: &mut Option<Pipeline<'a>>,
    info: &'a RequestInfo<'_>,
    event: Event,
) -> Option<End> {
    let broker = conn.broker.clone();
    match event {
        Event::Reply(out) => {
            if ws.send_text(&out).await.is_err() {
                return Some(End::Gone);
            }
        }
        Event::Frame(incoming) => match incoming {
            Some(Ok(Incoming::Text(t))) => {
                let messages = match decode_frame(&broker, &t) {
                    Ok(m) => m,
                    Err(out) => {
                        // Answered in order, after the publishes before it.
                        if !drain(publishes, ws).await || ws.send_text(&out).await.is_err() {
                            return Some(End::Gone);
                        }
                        conn.commit().await;
                        return None;
                    }
                };
                drop(t);
                if pipelinable(&broker, &messages) {
                    let pipeline = publishes.get_or_insert_with(FuturesOrdered::new);
                    pipeline.push_back(Box::pin(async move {
                        let processed = broker.process(info, messages).await;
                        build_body(&processed.replies, &[], None)
                    }));
                    return None;
                }
                // Everything else waits for the publishes before it, answered in order.
                if !drain(publishes, ws).await {
                    return Some(End::Gone);
                }
                // Boxed: processing a frame needs a large future.
                let out = Box::pin(conn.on_messages(info, messages)).await;
                if !is_empty_array(&out) && ws.send_text(&out).await.is_err() {
                    return Some(End::Gone);
                }
                conn.commit().await;
            }
            Some(Ok(Incoming::Binary)) => {
                let e = BodyError::new(
                    axum::http::StatusCode::BAD_REQUEST,
                    ErrorKind::MessageInvalid,
                    "binary frames are not supported; send JSON text",
                );
                broker.metrics().error(400);
                if ws.send_text(&e.body(&broker)).await.is_err() {
                    return Some(End::Gone);
                }
            }
            Some(Ok(Incoming::Ping(payload))) => {
                if ws.send_pong(&payload).await.is_err() {
                    return Some(End::Gone);
                }
            }
            Some(Ok(Incoming::Close(code))) => {
                // Publishes already read are answered; then the close is answered before the
                // socket is dropped, so the client sees a clean close, not 1006.
                if !drain(publishes, ws).await {
                    return Some(End::Gone);
                }
                return Some(End::Close(code, String::new()));
            }
            None => return Some(End::Gone),
            Some(Err(failure)) => {
                let reason = match failure {
                    Failure::TooBig => {
                        broker.metrics().error(413);
                        format!(
                            "message larger than {} bytes",
                            broker.config().limits.max_frame_bytes
                        )
                    }
                    Failure::Utf8 => "text frame is not UTF-8".to_owned(),
                    Failure::Protocol(what) => {
                        tracing::debug!(error = what, "websocket protocol error");
                        "protocol error".to_owned()
                    }
                };
                return Some(End::Close(Some(failure.close_code()), reason));
            }
        },
        // Handled by the loop, which sends what the session has.
        Event::Notified => {}
        Event::Deadline => {
            if let Some(pending) = conn.pending.take() {
                let out = {
                    let mut reply = pending.reply;
                    let deliveries = conn
                        .bound
                        .as_ref()
                        .map(|s| broker.take_for_connect(s, &mut reply))
                        .unwrap_or_default();
                    build_body(&[], &deliveries, Some(&reply))
                };
                if ws.send_text(&out).await.is_err() {
                    return Some(End::Gone);
                }
                conn.commit().await;
            }
        }
        Event::Stopped => {
            if !drain(publishes, ws).await {
                return Some(End::Gone);
            }
            if let Some(pending) = conn.pending.take() {
                let _ = ws
                    .send_text(&build_body(&[], &[], Some(&pending.reply)))
                    .await;
            }
            return Some(End::Close(
                Some(CLOSE_GOING_AWAY),
                "server shutting down".to_owned(),
            ));
        }
    }
    None
}

/// Publishes in flight on one socket, each a future of its reply frame.
type Pipeline<'a> = FuturesOrdered<Pin<Box<dyn Future<Output = Vec<u8>> + Send + 'a>>>;

fn in_flight(publishes: &Option<Pipeline<'_>>) -> usize {
    publishes.as_ref().map_or(0, |p| p.len())
}

/// The next reply of the publishes in flight (pending forever when there are none).
async fn next_reply(publishes: &mut Option<Pipeline<'_>>) -> Option<Vec<u8>> {
    match publishes {
        Some(p) => p.next().await,
        None => std::future::pending().await,
    }
}

/// Waits for every publish in flight and sends their replies, in order. False when the socket
/// is gone.
async fn drain(publishes: &mut Option<Pipeline<'_>>, ws: &mut WsSocket) -> bool {
    let Some(pipeline) = publishes.as_mut() else {
        return true;
    };
    while let Some(out) = pipeline.next().await {
        if ws.send_text(&out).await.is_err() {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The future of a WebSocket's task lives as long as the socket: memory per idle client.
    /// This catches a change that makes it grow again.
    #[tokio::test]
    async fn a_websocket_future_stays_small() {
        let broker = crate::broker::test_broker();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let ws = WsSocket::new(stream, bytes::BytesMut::new(), 1024);
        let future = run(ws, broker, HeaderMap::new(), None);
        let size = std::mem::size_of_val(&future);
        assert!(size <= 850, "websocket future is {size} bytes");
    }
}
