//! HTTP long-polling: `POST` with a JSON body (an array of messages or one message) or a
//! form-encoded body with `message=` parameters.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::Response;
use bayeux_protocol::{ErrorKind, Message, connection_type};
use futures::future::BoxFuture;

use bytes::Bytes;

use super::{BodyError, BodyRead, answer_http, body_bytes, check_count, decode, json_response};
use crate::broker::{Broker, Processed};
use crate::policy::RequestInfo;

/// Reads a body of at most the configured size.
pub(crate) async fn read_body(
    broker: &Broker,
    parts: &Parts,
    body: Body,
) -> Result<Bytes, BodyError> {
    let max = broker.config().limits.max_body_bytes;
    let too_large = || {
        BodyError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::MessageTooLarge,
            format!("request body larger than {max} bytes"),
        )
    };
    if let Some(len) = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > max as u64
    {
        return Err(too_large());
    }
    match body_bytes(body, max).await {
        Ok(bytes) => Ok(bytes),
        Err(BodyRead::TooLarge) => Err(too_large()),
        Err(e @ BodyRead::Failed(_)) => Err(BodyError::new(
            StatusCode::BAD_REQUEST,
            ErrorKind::MessageInvalid,
            e.to_string(),
        )),
    }
}

/// Decodes `message=` parameters (each a message or an array of messages).
pub(crate) fn decode_form(broker: &Broker, query: &[u8]) -> Result<Vec<Message>, BodyError> {
    let mut messages = Vec::new();
    let mut found = false;
    for (key, value) in url::form_urlencoded::parse(query) {
        if key == "message" {
            found = true;
            messages.extend(bayeux_protocol::decode_batch(value.as_bytes())?);
            check_count(broker, messages.len())?;
        }
    }
    if !found {
        return Err(BodyError::new(
            StatusCode::BAD_REQUEST,
            ErrorKind::MessageInvalid,
            "no message parameter",
        ));
    }
    Ok(messages)
}

/// Serves one long-polling request.
///
/// Not an `async fn`, and everything before the hold is boxed apart: an `async fn` keeps its
/// arguments (the request's parts and body) for its whole life, and a future is as large as its
/// largest state. The future returned here lives as long as the hold, one per idle long-poll
/// client, so it holds only what the hold needs (memory per idle client).
pub(crate) fn handle(
    broker: Arc<Broker>,
    parts: Parts,
    body: Body,
    remote: Option<SocketAddr>,
) -> BoxFuture<'static, Response> {
    let cookies = (broker.dialect() == bayeux_protocol::Dialect::Salesforce)
        .then(|| MissingCookies::of(&parts));
    let prepared = Box::pin(prepare(broker.clone(), parts, body, remote));
    Box::pin(async move {
        let mut response = match prepared.await {
            Ok(processed) => {
                let (status, body) = answer_http(&broker, processed).await;
                json_response(status, body)
            }
            Err(e) => e.response(&broker),
        };
        if let Some(missing) = cookies {
            set_salesforce_cookies(missing, &mut response);
        }
        response
    })
}

/// Which of Salesforce's streaming cookies a request did not carry.
#[derive(Debug, Clone, Copy)]
struct MissingCookies {
    browser: bool,
    stream: bool,
}

impl MissingCookies {
    fn of(parts: &Parts) -> Self {
        let sent = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(";");
        MissingCookies {
            browser: !sent.contains("BAYEUX_BROWSER="),
            stream: !sent.contains("sfdc-stream="),
        }
    }
}

/// Salesforce sets `BAYEUX_BROWSER` and `sfdc-stream` on its streaming responses; clients are
/// expected to keep and return them. Set when the request does not carry them already.
fn set_salesforce_cookies(missing: MissingCookies, response: &mut Response) {
    let mut rng = rand::rng();
    if missing.browser {
        let id: String = (0..16)
            .map(|_| {
                let n = rand::Rng::random_range(&mut rng, 0..36u32);
                char::from_digit(n, 36).unwrap_or('0')
            })
            .collect();
        if let Ok(v) = format!("BAYEUX_BROWSER={id}; Path=/; HttpOnly").parse() {
            response.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    if missing.stream {
        let id: u128 = rand::Rng::random(&mut rng);
        if let Ok(v) = format!("sfdc-stream=!{id:032x}; Path=/; SameSite=Lax").parse() {
            response.headers_mut().append(header::SET_COOKIE, v);
        }
    }
}

/// Answers every message of a request with `error` (HTTP 400), echoing each message's channel
/// and id: Salesforce's answer to a bad `/cometd/<version>`.
pub(crate) async fn reject_all(
    broker: Arc<Broker>,
    parts: Parts,
    body: Body,
    error: ErrorKind,
) -> Response {
    let wire = error.wire(broker.dialect());
    let messages = match read_body(&broker, &parts, body).await {
        Ok(bytes) => bayeux_protocol::decode_batch(&bytes).unwrap_or_default(),
        Err(e) => return e.response(&broker),
    };
    let replies: Vec<Message> = if messages.is_empty() {
        vec![Message::default().failed(wire)]
    } else {
        messages
            .iter()
            .map(|m| m.reply().failed(wire.clone()))
            .collect()
    };
    broker.metrics().error(error.code(broker.dialect()));
    json_response(
        StatusCode::BAD_REQUEST,
        bayeux_protocol::encode_batch(&replies),
    )
}

/// Reads, decodes and processes a request: everything up to the hold.
async fn prepare(
    broker: Arc<Broker>,
    parts: Parts,
    body: Body,
    remote: Option<SocketAddr>,
) -> Result<Box<Processed>, BodyError> {
    if !broker.config().offers(connection_type::LONG_POLLING) {
        return Err(BodyError::new(
            StatusCode::BAD_REQUEST,
            ErrorKind::UnknownTransport,
            "the long-polling transport is disabled",
        ));
    }
    let body = read_body(&broker, &parts, body).await?;
    let form = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let messages = if form {
        decode_form(&broker, &body)?
    } else {
        decode(&broker, &body)?
    };
    drop(body);
    let info = RequestInfo {
        headers: &parts.headers,
        remote,
        connection_type: connection_type::LONG_POLLING,
    };
    // Boxed: a few hundred bytes that would otherwise be copied into the hold's future.
    Ok(Box::new(broker.process(&info, messages).await))
}
