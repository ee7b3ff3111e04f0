//! Callback-polling (JSONP) for old browsers: `GET` with `message=<url-encoded JSON>` (possibly
//! repeated) and `jsonp=<callback>` (default `jsonpcallback`). The answer is JavaScript:
//! `callback([...])`, with `Content-Type: text/javascript`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bayeux_protocol::{ErrorKind, connection_type};

use super::long_polling::decode_form;
use super::{BodyError, answer_http};
use crate::broker::Broker;
use crate::policy::RequestInfo;

/// The callback used when the request names none (Bayeux 1.0).
pub const DEFAULT_CALLBACK: &str = "jsonpcallback";

fn callback_name(broker: &Broker, query: &str) -> Result<String, BodyError> {
    let name = url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "jsonp")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| DEFAULT_CALLBACK.to_owned());
    let max = broker.config().limits.jsonp_callback_max_len;
    let valid = !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !valid {
        return Err(BodyError::new(
            StatusCode::BAD_REQUEST,
            ErrorKind::CallbackInvalid,
            format!("the jsonp callback must be 1 to {max} characters of [A-Za-z0-9._-]"),
        ));
    }
    Ok(name)
}

/// Serves one callback-polling request (the query has a `message` parameter).
pub(crate) async fn handle(
    broker: Arc<Broker>,
    parts: Parts,
    remote: Option<SocketAddr>,
) -> Response {
    let query = parts.uri.query().unwrap_or("");
    let result = async {
        if !broker.config().offers(connection_type::CALLBACK_POLLING) {
            return Err(BodyError::new(
                StatusCode::BAD_REQUEST,
                ErrorKind::UnknownTransport,
                "the callback-polling transport is disabled",
            ));
        }
        let max = broker.config().limits.max_body_bytes;
        if query.len() > max {
            return Err(BodyError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorKind::MessageTooLarge,
                format!("query larger than {max} bytes"),
            ));
        }
        let callback = callback_name(&broker, query)?;
        let messages = decode_form(&broker, query.as_bytes())?;
        let info = RequestInfo {
            headers: &parts.headers,
            remote,
            connection_type: connection_type::CALLBACK_POLLING,
        };
        let processed = broker.process(&info, messages).await;
        Ok((callback, answer_http(&broker, Box::new(processed)).await))
    }
    .await;
    match result {
        Ok((callback, (status, body))) => {
            let mut script = Vec::with_capacity(body.len() + callback.len() + 2);
            script.extend_from_slice(callback.as_bytes());
            script.push(b'(');
            script.extend_from_slice(&body);
            script.extend_from_slice(b");");
            let mut response = (status, script).into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/javascript;charset=UTF-8"),
            );
            response.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("no-cache, no-store"),
            );
            response
        }
        Err(e) => e.response(&broker),
    }
}
