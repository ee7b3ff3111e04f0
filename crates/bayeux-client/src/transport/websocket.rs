//! WebSocket: one JSON array per text frame, both ways. The connection is opened with the
//! client's headers, its `Authorization` and the cookies of its jar; the driver sends frames
//! through a channel and gets every received batch back, and a [`Failure`] when the socket
//! ends. [`run`] is generic over the socket so it can be driven by anything that is a `Sink`
//! and a `Stream` of WebSocket messages.

use std::time::Duration;

use bayeux_protocol::Message;
use futures::{Sink, SinkExt, Stream, StreamExt};
use reqwest::header::{AUTHORIZATION, COOKIE, HeaderMap, HeaderValue};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

use super::decode;
use crate::state::Failure;

/// The `ws://` or `wss://` URL of an `http://` or `https://` endpoint.
pub(crate) fn ws_url(http: &url::Url) -> url::Url {
    let mut url = http.clone();
    let scheme = if http.scheme() == "https" {
        "wss"
    } else {
        "ws"
    };
    // Only the scheme changes; http(s) → ws(s) is always a valid scheme change.
    let _ = url.set_scheme(scheme);
    url
}

/// Opens a WebSocket to `url` within `timeout`.
pub(crate) async fn open(
    url: &url::Url,
    headers: &HeaderMap,
    authorization: Option<HeaderValue>,
    cookies: Option<HeaderValue>,
    max_bytes: usize,
    timeout: Duration,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    Failure,
> {
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| Failure::Io(e.to_string()))?;
    for (name, value) in headers {
        request.headers_mut().append(name, value.clone());
    }
    if let Some(auth) = authorization {
        request.headers_mut().insert(AUTHORIZATION, auth);
    }
    if let Some(cookies) = cookies {
        request.headers_mut().insert(COOKIE, cookies);
    }
    let config = WebSocketConfig::default()
        .max_message_size(Some(max_bytes))
        .max_frame_size(Some(max_bytes));
    let connect = tokio_tungstenite::connect_async_with_config(request, Some(config), false);
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok((stream, _))) => Ok(stream),
        Ok(Err(tungstenite::Error::Http(response))) if response.status().as_u16() == 401 => {
            Err(Failure::Unauthorized)
        }
        Ok(Err(tungstenite::Error::Http(response))) => {
            Err(Failure::Status(response.status().as_u16()))
        }
        Ok(Err(e)) => Err(Failure::Io(e.to_string())),
        Err(_) => Err(Failure::Timeout),
    }
}

/// Pumps frames until the socket ends or `outgoing` closes: each outgoing item is sent as one
/// text frame, each received text frame decoded and handed to `incoming`. Returns why it
/// ended.
pub(crate) async fn run<S>(
    socket: S,
    mut outgoing: mpsc::UnboundedReceiver<Vec<u8>>,
    mut incoming: impl FnMut(Vec<Message>),
) -> Failure
where
    S: Stream<Item = Result<WsMessage, tungstenite::Error>>
        + Sink<WsMessage, Error = tungstenite::Error>
        + Unpin,
{
    let (mut sink, mut stream) = socket.split();
    loop {
        tokio::select! {
            frame = outgoing.recv() => {
                let Some(frame) = frame else {
                    let _ = sink.close().await;
                    return Failure::Io("closed by the client".into());
                };
                let text = match String::from_utf8(frame) {
                    Ok(t) => t,
                    Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
                };
                if let Err(e) = sink.send(WsMessage::Text(text.into())).await {
                    return Failure::Io(e.to_string());
                }
            }
            frame = stream.next() => match frame {
                Some(Ok(WsMessage::Text(text))) => match decode(text.as_bytes()) {
                    Ok(messages) => incoming(messages),
                    Err(e) => tracing::warn!(error = %e, "ignoring a WebSocket frame that is not Bayeux"),
                },
                Some(Ok(WsMessage::Binary(_))) => {
                    tracing::warn!("ignoring a binary WebSocket frame");
                }
                Some(Ok(WsMessage::Close(frame))) => {
                    return Failure::Io(format!(
                        "closed by the server{}",
                        frame.map(|f| format!(" ({} {})", f.code, f.reason)).unwrap_or_default()
                    ));
                }
                Some(Ok(_)) => {}
                Some(Err(tungstenite::Error::Capacity(e))) => {
                    tracing::warn!(error = %e, "WebSocket message too large");
                    return Failure::TooLarge;
                }
                Some(Err(e)) => return Failure::Io(e.to_string()),
                None => return Failure::Io("connection closed".into()),
            }
        }
    }
}
