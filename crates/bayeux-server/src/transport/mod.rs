//! Transports: how messages get in and out. Each decodes requests into [`Message`]s, hands them
//! to the [`Broker`], and writes out replies and pre-serialized deliveries.

pub mod callback_polling;
pub mod long_polling;
pub mod websocket;
pub(crate) mod ws_socket;

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use bayeux_protocol::codec::ArrayBuilder;
use bayeux_protocol::{DecodeError, ErrorKind, Message, decode_batch};
use bytes::Bytes;

use crate::broker::{Broker, Committed, HoldEnd, Processed};

/// The JSON content type of every Bayeux response.
pub const JSON: &str = "application/json;charset=UTF-8";

/// A body-level failure: not Bayeux at all, or too large.
#[derive(Debug)]
pub struct BodyError {
    /// HTTP status (400 or 413).
    pub status: StatusCode,
    /// The error.
    pub kind: ErrorKind,
    /// Human-readable detail.
    pub detail: String,
}

impl BodyError {
    pub(crate) fn new(status: StatusCode, kind: ErrorKind, detail: impl Into<String>) -> Self {
        BodyError {
            status,
            kind,
            detail: detail.into(),
        }
    }

    /// The JSON body: one message with the error and a `detail` field.
    pub fn body(&self, broker: &Broker) -> Vec<u8> {
        let mut m = Message::default().failed(self.kind.wire(broker.dialect()));
        m.other.insert(
            "detail".into(),
            serde_json::Value::String(self.detail.clone()),
        );
        bayeux_protocol::encode_batch(&[m])
    }

    /// As an HTTP response, counted in the error metrics.
    pub fn response(&self, broker: &Broker) -> Response {
        broker.metrics().error(self.kind.code(broker.dialect()));
        json_response(self.status, self.body(broker))
    }
}

impl From<DecodeError> for BodyError {
    fn from(e: DecodeError) -> Self {
        let kind = match &e {
            DecodeError::Json(j) if j.is_syntax() || j.is_eof() => ErrorKind::InvalidJson,
            _ => ErrorKind::MessageInvalid,
        };
        BodyError::new(StatusCode::BAD_REQUEST, kind, e.to_string())
    }
}

/// Decodes a body and applies the per-request message limit.
pub(crate) fn decode(broker: &Broker, body: &[u8]) -> Result<Vec<Message>, BodyError> {
    let messages = decode_batch(body)?;
    check_count(broker, messages.len())?;
    Ok(messages)
}

pub(crate) fn check_count(broker: &Broker, n: usize) -> Result<(), BodyError> {
    let max = broker.config().limits.max_messages_per_request;
    if n > max {
        return Err(BodyError::new(
            StatusCode::BAD_REQUEST,
            ErrorKind::TooManyMessages,
            format!("{n} messages in one request; the limit is {max}"),
        ));
    }
    Ok(())
}

/// Why [`body_bytes`] gave up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyRead {
    /// The body is longer than the limit.
    #[error("body larger than the limit")]
    TooLarge,
    /// The body could not be read.
    #[error("cannot read body: {0}")]
    Failed(axum::Error),
}

/// A body's bytes, at most `limit` of them. A body of one frame (every body the front end
/// makes, and every response body of this crate) comes back as that frame's bytes, without the
/// frame queue and the copy of `http_body_util`'s `collect` (one allocation less per request
/// and per response).
pub(crate) async fn body_bytes(
    mut body: axum::body::Body,
    limit: usize,
) -> Result<Bytes, BodyRead> {
    use http_body_util::BodyExt;
    // The first frame, kept as it is until a second one comes; then everything so far.
    let mut first = Bytes::new();
    let mut whole: Option<bytes::BytesMut> = None;
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(BodyRead::Failed)?.into_data() else {
            continue; // trailers: not part of the body
        };
        if data.is_empty() {
            continue;
        }
        total += data.len();
        if total > limit {
            return Err(BodyRead::TooLarge);
        }
        match whole.as_mut() {
            Some(w) => w.extend_from_slice(&data),
            None if first.is_empty() => first = data,
            None => {
                let mut w = bytes::BytesMut::with_capacity(total);
                w.extend_from_slice(&first);
                w.extend_from_slice(&data);
                whole = Some(w);
            }
        }
    }
    Ok(whole.map_or(first, bytes::BytesMut::freeze))
}

/// A response with the JSON content type and no caching.
pub fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    // Built directly: `(status, body).into_response()` would first set an octet-stream content
    // type (a header table of the default size) for this to overwrite, on every response.
    let mut headers = HeaderMap::with_capacity(2);
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store"),
    );
    let mut response = Response::new(axum::body::Body::from(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// What the encoding of a reply usually takes (a connect reply with its advice is ~150 bytes):
/// room reserved per reply, so that a body is written without growing its buffer.
const REPLY_SIZE_HINT: usize = 192;

/// Joins replies and deliveries into one JSON array: replies to other messages, then
/// deliveries, then the connect reply last. One buffer, sized up front: replies are encoded
/// into it, deliveries (already encoded) copied.
pub(crate) fn build_body(
    replies: &[Message],
    deliveries: &[Bytes],
    connect: Option<&Message>,
) -> Vec<u8> {
    let encoded = replies.len() + usize::from(connect.is_some());
    let copied: usize = deliveries.iter().map(|d| d.len() + 1).sum();
    let mut array = ArrayBuilder::with_capacity(2 + copied + encoded * REPLY_SIZE_HINT);
    for reply in replies {
        array.message(reply);
    }
    for delivery in deliveries {
        array.raw(delivery);
    }
    if let Some(connect) = connect {
        array.message(connect);
    }
    array.finish()
}

/// Answers a processed HTTP request (long-polling or callback-polling): holds the connect if
/// the broker said so, then returns the status and JSON body.
///
/// `processed` comes boxed and stays in its box until the hold is over: an `async fn` keeps an
/// argument beside the local it is moved into, so a `Processed` by value (520 bytes, most of it
/// the connect reply) would be stored twice in this future, which lives as long as the hold
/// (memory per idle client); moving the plan out of it would store it a third time.
pub(crate) async fn answer_http(
    broker: &Arc<Broker>,
    processed: Box<Processed>,
) -> (StatusCode, Vec<u8>) {
    let Some(plan) = &processed.connect else {
        return (StatusCode::OK, build_body(&processed.replies, &[], None));
    };
    let arrived = tokio::time::Instant::now();
    // Replayed history waiting for room in the queue comes in now, ahead of any hold.
    if let Err(e) = broker.refill(&plan.session).await {
        tracing::warn!(client_id = plan.session.id(), error = %e, "replay refill failed");
    }
    let end = match plan.hold {
        Some(timeout) => broker.hold_connect(&plan.session, timeout).await,
        None => HoldEnd::Messages,
    };
    finish_http(broker, processed, arrived, end).await
}

/// How often a long-polling response is rebuilt when its session turns out to have been taken
/// by another node (shared engines), before it is sent as it is.
const MAX_RESYNCS: u32 = 3;

/// The end of [`answer_http`], once the hold is over. It works on the processed request in its
/// box (the reply is answered in place), so that its future stays a small part of
/// [`answer_http`]'s and is made without a copy or an allocation per request (CPU per
/// delivery).
async fn finish_http(
    broker: &Arc<Broker>,
    mut processed: Box<Processed>,
    arrived: tokio::time::Instant,
    end: HoldEnd,
) -> (StatusCode, Vec<u8>) {
    let Processed { replies, connect } = &mut *processed;
    let Some(plan) = connect else {
        return (StatusCode::OK, build_body(replies, &[], None));
    };
    if broker.stalled_since(arrived) && end != HoldEnd::Shutdown {
        // Fault injection: this connect is never answered. Nothing is taken from the queue,
        // so the messages wait for whatever connect comes next.
        broker.stopped().await;
        let reply = std::mem::take(&mut plan.reply);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            build_body(
                &[],
                &[],
                Some(&reply.failed(ErrorKind::ServerBusy.wire(broker.dialect()))),
            ),
        );
    }
    let deliveries = match end {
        HoldEnd::Superseded => {
            // As CometD: the older request fails with HTTP 500, so a client that really has
            // two connects outstanding backs off instead of looping.
            let reply = std::mem::take(&mut plan.reply)
                .failed(ErrorKind::ConnectSuperseded.wire(broker.dialect()));
            broker.metrics().error(500);
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                build_body(&[], &[], Some(&reply)),
            );
        }
        HoldEnd::Closed(reason) => {
            plan.reply = broker.closed_connect_reply(std::mem::take(&mut plan.reply), reason);
            if reason == crate::broker::CloseReason::ServerDisconnect {
                // The server-sent `/meta/disconnect` waits in the queue.
                plan.session.drain()
            } else {
                Vec::new()
            }
        }
        HoldEnd::Messages | HoldEnd::Timeout | HoldEnd::Shutdown => {
            let mut attempts = 1;
            loop {
                let deliveries = broker.take_for_connect(&plan.session, &mut plan.reply);
                // Shared engines: the response leaves only once what it carries is committed.
                let outcome = broker.commit_delivery(&plan.session).await;
                if outcome != Committed::Taken || attempts == MAX_RESYNCS {
                    break deliveries;
                }
                // Another node served the client since this copy was made: what was taken may
                // have been sent already. Claim the session back and take again.
                attempts += 1;
                Box::pin(broker.resync(&plan.session, plan.client_ack)).await;
            }
        }
    };
    (
        StatusCode::OK,
        build_body(replies, &deliveries, Some(&plan.reply)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streamed(frames: Vec<Result<&'static [u8], std::io::Error>>) -> axum::body::Body {
        axum::body::Body::from_stream(futures::stream::iter(
            frames.into_iter().map(|f| f.map(Bytes::from_static)),
        ))
    }

    /// One frame comes back as it is; several (an empty one among them) are joined; the limit
    /// counts across frames; a failing body is an error, not a short body.
    #[tokio::test]
    async fn body_bytes_of_one_frame_or_several() {
        let one = axum::body::Body::from(Bytes::from_static(b"[1]"));
        assert_eq!(&body_bytes(one, 3).await.unwrap()[..], b"[1]");
        let several = || streamed(vec![Ok(b""), Ok(b"[1,"), Ok(b""), Ok(b"2,"), Ok(b"3]")]);
        assert_eq!(&body_bytes(several(), 7).await.unwrap()[..], b"[1,2,3]");
        assert!(matches!(
            body_bytes(several(), 6).await,
            Err(BodyRead::TooLarge)
        ));
        let failing = streamed(vec![Ok(b"[1"), Err(std::io::Error::other("reset"))]);
        let err = body_bytes(failing, 100).await.unwrap_err();
        assert!(matches!(err, BodyRead::Failed(_)), "{err:?}");
        assert!(err.to_string().contains("reset"), "{err}");
        let empty = axum::body::Body::empty();
        assert!(body_bytes(empty, 0).await.unwrap().is_empty());
    }

    /// The future of a long-polling answer lives as long as the hold: memory per idle
    /// long-poll client. This catches a change that makes it grow again (it was 1,592 bytes
    /// when it took the processed request by value).
    #[tokio::test]
    async fn an_answer_future_stays_small() {
        let broker = crate::broker::test_broker();
        let processed = Box::new(Processed {
            replies: Vec::new(),
            connect: None,
        });
        let future = answer_http(&broker, processed);
        let size = std::mem::size_of_val(&future);
        assert!(size <= 512, "long-polling answer future is {size} bytes");
        assert_eq!(future.await.0, StatusCode::OK);
    }
}
