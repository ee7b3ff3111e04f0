//! HTTP long-polling: each batch is one `POST` of a JSON array; the reply body is a JSON
//! array. The held `/meta/connect` has a connection of its own, so a subscribe or publish never
//! waits behind a long poll; both HTTP clients share the client's one cookie jar.

use std::sync::Arc;
use std::time::Duration;

use bayeux_protocol::Message;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};

use super::decode;
use crate::state::Failure;

#[derive(Clone)]
pub(crate) struct LongPolling {
    url: url::Url,
    http: reqwest::Client,
    held: reqwest::Client,
    max_bytes: usize,
}

impl LongPolling {
    pub(crate) fn new(
        url: url::Url,
        headers: HeaderMap,
        jar: Arc<reqwest::cookie::Jar>,
        connect_timeout: Duration,
        max_bytes: usize,
    ) -> Result<Self, reqwest::Error> {
        let build = |idle: usize| {
            reqwest::Client::builder()
                .default_headers(headers.clone())
                .cookie_provider(jar.clone())
                .connect_timeout(connect_timeout)
                .pool_max_idle_per_host(idle)
                .user_agent(concat!("bayeux-client/", env!("CARGO_PKG_VERSION")))
                .build()
        };
        Ok(LongPolling {
            url,
            http: build(4)?,
            held: build(1)?,
            max_bytes,
        })
    }

    /// POSTs `messages` and returns the reply messages. `held` picks the connect's connection.
    pub(crate) async fn send(
        &self,
        messages: &[Message],
        authorization: Option<HeaderValue>,
        held: bool,
    ) -> Result<Vec<Message>, Failure> {
        let http = if held { &self.held } else { &self.http };
        let mut request = http
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/json;charset=UTF-8")
            .body(bayeux_protocol::encode_batch(messages));
        if let Some(auth) = authorization {
            request = request.header(AUTHORIZATION, auth);
        }
        let mut response = request.send().await.map_err(io)?;
        let status = response.status().as_u16();
        if status == 401 {
            return Err(Failure::Unauthorized);
        }
        if response
            .content_length()
            .is_some_and(|n| n > self.max_bytes as u64)
        {
            return Err(Failure::TooLarge);
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(io)? {
            if body.len() + chunk.len() > self.max_bytes {
                return Err(Failure::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        if status != 200 {
            tracing::debug!(status, body = %String::from_utf8_lossy(&body[..body.len().min(200)]), "HTTP error");
            return Err(Failure::Status(status));
        }
        decode(&body)
    }
}

fn io(e: reqwest::Error) -> Failure {
    Failure::Io(e.to_string())
}
