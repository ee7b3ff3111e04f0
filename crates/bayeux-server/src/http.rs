//! The HTTP routes: one axum router that dispatches the Bayeux endpoint (and everything under
//! it) to the long-polling or callback-polling transport, plus `/metrics`. The connections
//! themselves, and WebSocket upgrades, are the front end's ([`crate::front`]), which calls
//! `serve_endpoint` without the router when the endpoint's path is not `/`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use bayeux_protocol::ErrorKind;
use futures::future::BoxFuture;
use tokio::net::TcpListener;

use crate::broker::Broker;
use crate::transport::{BodyError, callback_polling, long_polling};

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

/// The Bayeux endpoint as an axum handler (the front end calls [`serve_endpoint`] without
/// going through the router).
fn endpoint(State(broker): State<Arc<Broker>>, request: Request) -> BoxFuture<'static, Response> {
    let remote = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    serve_endpoint(broker, request, remote)
}

/// Serves one request to the Bayeux endpoint. Not an `async fn`: it picks the transport at
/// once and returns that transport's future, so a held long-poll keeps only the long-polling
/// future (an `async fn` would keep the request it was given, and be as large as its largest
/// branch, for the whole hold: memory per idle client).
pub(crate) fn serve_endpoint(
    broker: Arc<Broker>,
    request: Request,
    remote: Option<SocketAddr>,
) -> BoxFuture<'static, Response> {
    // WebSocket upgrades of the endpoint never get here: the front end answers them.
    let (parts, body) = request.into_parts();
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

/// Serves `broker` on `listener` until `shutdown` resolves or the broker stops; then held
/// connects are answered, WebSockets closed, and open requests given `shutdown_grace_ms` to
/// finish. The HTTP/1.1 front end is [`crate::front`].
pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    extra: Option<Router>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(broker.clone(), extra);
    crate::front::serve(listener, broker, app, shutdown).await;
    Ok(())
}
