//! The HTTP front: one axum router that dispatches the Bayeux endpoint (and everything under
//! it) to the long-polling, callback-polling or WebSocket transport, plus `/metrics`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use bayeux_protocol::ErrorKind;
use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::net::TcpListener;

use crate::broker::Broker;
use crate::transport::{BodyError, callback_polling, long_polling, websocket};

/// Read buffer of each WebSocket connection. Small: tungstenite keeps it (zero-filled) for the
/// life of the socket, so it is most of what an idle WebSocket costs. A frame larger than this
/// is read in a second read sized to the frame.
const WS_READ_BUFFER_BYTES: usize = 1024;
/// Write buffer of each WebSocket connection (allocated as frames are written).
const WS_WRITE_BUFFER_BYTES: usize = 4096;

/// The axum router serving `broker` at its configured path, plus `extra` routes (the
/// Salesforce emulator's).
pub fn router(broker: Arc<Broker>, extra: Option<Router>) -> Router {
    let path = broker.config().path.clone();
    let nested = if path == "/" {
        "/{*rest}".to_owned()
    } else {
        format!("{path}/{{*rest}}")
    };
    let mut router = Router::new()
        .route("/metrics", get(metrics))
        .route(&nested, any(endpoint));
    if path != "/" {
        router = router
            .route(&path, any(endpoint))
            .route(&format!("{path}/"), any(endpoint));
    } else {
        router = router.route("/", any(endpoint));
    }
    let router = router.with_state(broker);
    match extra {
        Some(extra) => router.merge(extra),
        None => router,
    }
}

async fn metrics(State(broker): State<Arc<Broker>>) -> Response {
    let mut response = broker.metrics().render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

fn is_websocket_upgrade(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// A deep copy of `headers` whose values own their bytes (hyper's parsed values point into the
/// connection's read buffer).
fn owned_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let mut copy = HeaderValue::from_maybe_shared(Bytes::copy_from_slice(value.as_bytes()))
            .unwrap_or_else(|_| HeaderValue::from_static(""));
        copy.set_sensitive(value.is_sensitive());
        out.append(name.clone(), copy);
    }
    out
}

/// The Bayeux endpoint. Not an `async fn`: it picks the transport at once and returns that
/// transport's future, so a held long-poll keeps only the long-polling future (an `async fn`
/// would keep the request it was given, and be as large as its largest branch, for the whole
/// hold: memory per idle client).
fn endpoint(State(broker): State<Arc<Broker>>, request: Request) -> BoxFuture<'static, Response> {
    let remote = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let (parts, body) = request.into_parts();
    if is_websocket_upgrade(&parts.headers) {
        return Box::pin(websocket_upgrade(broker, parts, remote));
    }
    if let Some(error) = salesforce_version_error(&broker, parts.uri.path()) {
        return Box::pin(long_polling::reject_all(broker, parts, body, error));
    }
    match parts.method {
        Method::POST => long_polling::handle(broker, parts, body, remote),
        Method::GET if query_has_message(parts.uri.query()) => {
            Box::pin(callback_polling::handle(broker, parts, remote))
        }
        Method::GET => {
            let response = BodyError::new(
                StatusCode::BAD_REQUEST,
                ErrorKind::UnknownTransport,
                "a GET needs a message parameter (callback-polling) or a websocket upgrade",
            )
            .response(&broker);
            Box::pin(std::future::ready(response))
        }
        _ => {
            let mut r = BodyError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorKind::MethodNotAllowed,
                "use POST (long-polling), GET (callback-polling) or a websocket upgrade",
            )
            .response(&broker);
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, POST"));
            Box::pin(std::future::ready(r))
        }
    }
}

/// Answers a WebSocket upgrade request; the connection then runs in its own task.
async fn websocket_upgrade(
    broker: Arc<Broker>,
    mut parts: axum::http::request::Parts,
    remote: Option<SocketAddr>,
) -> Response {
    if !broker
        .config()
        .offers(bayeux_protocol::connection_type::WEBSOCKET)
    {
        return BodyError::new(
            StatusCode::BAD_REQUEST,
            ErrorKind::UnknownTransport,
            "the websocket transport is disabled",
        )
        .response(&broker);
    }
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(u) => u,
        Err(rejection) => {
            return BodyError::new(
                StatusCode::BAD_REQUEST,
                ErrorKind::UnknownTransport,
                format!("bad websocket upgrade: {}", rejection.body_text()),
            )
            .response(&broker);
        }
    };
    let max = broker.config().limits.max_frame_bytes;
    // An owned copy: a clone would share the bytes of hyper's 8 KiB read buffer and keep
    // it allocated for the life of the socket.
    let headers = owned_headers(&parts.headers);
    drop(parts);
    // Small buffers: tungstenite's default 128 KiB read buffer per connection would make an
    // idle WebSocket cost ~150 KiB. Larger messages are still read, in several reads.
    upgrade
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        .write_buffer_size(WS_WRITE_BUFFER_BYTES)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| websocket::run(socket, broker, headers, remote))
}

/// Salesforce mode: the endpoint is `/cometd/<version>[/…]` with a version at least the
/// oldest supported.
fn salesforce_version_error(broker: &Broker, path: &str) -> Option<ErrorKind> {
    let sf = broker.config().salesforce.as_ref()?;
    let rest = path
        .strip_prefix(broker.config().path.as_str())
        .unwrap_or("")
        .trim_start_matches('/');
    let version = rest.split('/').next().unwrap_or("");
    let latest = sf.latest_api_version.clone();
    let Some(v) = crate::salesforce::config::parse_version(version) else {
        return Some(ErrorKind::ApiVersionMissing(latest));
    };
    let oldest = crate::salesforce::config::parse_version(&sf.min_api_version).unwrap_or(0.0);
    (v < oldest).then(|| ErrorKind::ApiVersionUnsupported(sf.min_api_version.clone(), latest))
}

fn query_has_message(query: Option<&str>) -> bool {
    query.is_some_and(|q| url::form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == "message"))
}

/// Serves `broker` on `listener` until `shutdown` resolves; then held connects are answered,
/// WebSockets closed, and open requests given `shutdown_grace_ms` to finish.
pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    extra: Option<Router>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let grace = Duration::from_millis(broker.config().timeouts.shutdown_grace_ms);
    let app = router(broker.clone(), extra).into_make_service_with_connect_info::<SocketAddr>();
    let stopper = broker.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!("shutting down");
        stopper.shutdown();
    });
    let mut stop = broker.shutdown_signal();
    let server = tokio::spawn(async move { server.await });
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result.map_err(std::io::Error::other)?,
        _ = crate::broker::stopped(&mut stop) => {}
    }
    match tokio::time::timeout(grace, &mut server).await {
        Ok(result) => result.map_err(std::io::Error::other)?,
        Err(_) => {
            tracing::warn!("open requests did not finish within the shutdown grace period");
            server.abort();
            Ok(())
        }
    }
}
