//! Shared helpers for the Salesforce emulator tests: a demo org on port 0 with short timeouts,
//! OAuth and REST calls over real HTTP, and a long-polling client that sends a bearer token.
// Each test file uses a different subset of these helpers.
#![allow(dead_code)]

use std::time::Duration;

use bayeux_server::config::ServerConfig;
use bayeux_server::salesforce::SalesforceConfig;
use bayeux_test_support::{TestServer, split, test_config};
use serde_json::{Value, json};

/// The demo user's ID.
pub(crate) const USER_ID: &str = "005000000000001AAA";
/// The demo org's ID.
pub(crate) const ORG_ID: &str = "00D000000000001AAA";
/// The API version the tests use in URLs.
pub(crate) const VERSION: &str = "59.0";
/// The demo generic channel's `StreamingChannel` ID.
pub(crate) const GENERIC_ID: &str = "0M6000000000001AAA";

/// Every wait in these tests is bounded by this (per HTTP request).
pub(crate) const HTTP_TIMEOUT: Duration = Duration::from_secs(20);

/// The demo org with short timeouts: connects held 2 s, sessions swept after 10 s.
pub(crate) fn demo() -> SalesforceConfig {
    let mut sf = SalesforceConfig::demo();
    sf.connect_timeout_secs = 2;
    sf.reconnect_deadline_secs = 10;
    sf
}

/// A server configuration on port 0 playing `sf`, swept every 100 ms.
pub(crate) fn config(sf: SalesforceConfig) -> ServerConfig {
    let mut c = test_config();
    c.timeouts.sweep_interval_ms = 100;
    c.salesforce = Some(sf);
    c
}

/// A raw HTTP response.
#[derive(Debug)]
pub(crate) struct Resp {
    pub(crate) status: u16,
    pub(crate) headers: reqwest::header::HeaderMap,
    pub(crate) text: String,
}

impl Resp {
    async fn read(r: reqwest::Response) -> Resp {
        Resp {
            status: r.status().as_u16(),
            headers: r.headers().clone(),
            text: r.text().await.expect("response body"),
        }
    }

    /// The Content-Type header ("" when absent).
    pub(crate) fn content_type(&self) -> &str {
        self.headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// Every Set-Cookie header.
    pub(crate) fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all(reqwest::header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_owned)
            .collect()
    }

    /// The body as JSON (panics if it is not).
    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}), HTTP {}: {}", self.status, self.text))
    }
}

/// A running emulator.
pub(crate) struct Org {
    pub(crate) server: TestServer,
    pub(crate) http: reqwest::Client,
}

fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .expect("http client")
}

impl Org {
    /// Starts an emulator for `sf` (with [`config`]).
    pub(crate) async fn start(sf: SalesforceConfig) -> Org {
        Self::start_config(config(sf)).await
    }

    /// Starts a server with a full configuration.
    pub(crate) async fn start_config(config: ServerConfig) -> Org {
        Org {
            server: TestServer::start(config).await,
            http: http_client(HTTP_TIMEOUT),
        }
    }

    /// `http://127.0.0.1:PORT`
    pub(crate) fn base(&self) -> &str {
        &self.server.base
    }

    /// The streaming endpoint `/cometd/59.0`.
    pub(crate) fn endpoint(&self) -> String {
        format!("{}/{VERSION}", self.server.url)
    }

    /// POSTs a form-encoded body to `path`.
    pub(crate) async fn form(&self, path: &str, pairs: &[(&str, &str)]) -> Resp {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish();
        let r = self
            .http
            .post(format!("{}{path}", self.base()))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .expect("form request");
        Resp::read(r).await
    }

    /// POSTs JSON to `path`, with `Authorization: Bearer <token>` when given.
    pub(crate) async fn post_json(&self, path: &str, token: Option<&str>, body: Value) -> Resp {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base()))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        Resp::read(req.send().await.expect("json request")).await
    }

    /// GETs `path` with a bearer token.
    pub(crate) async fn get(&self, path: &str, token: &str) -> Resp {
        let r = self
            .http
            .get(format!("{}{path}", self.base()))
            .header("authorization", format!("Bearer {token}"))
            .send()
            .await
            .expect("get request");
        Resp::read(r).await
    }

    /// POSTs (no body) to an `/_emulator/...` route and returns its JSON.
    pub(crate) async fn fault(&self, path_and_query: &str) -> Value {
        let r = self
            .http
            .post(format!("{}{path_and_query}", self.base()))
            .send()
            .await
            .expect("fault request");
        let r = Resp::read(r).await;
        assert_eq!(r.status, 200, "{path_and_query}: {}", r.text);
        r.json()
    }

    /// A password-grant access token for the demo user.
    pub(crate) async fn token(&self) -> String {
        let r = self
            .form(
                "/services/oauth2/token",
                &[
                    ("grant_type", "password"),
                    ("client_id", "demo"),
                    ("client_secret", "demo"),
                    ("username", "demo@example.com"),
                    ("password", "demo"),
                ],
            )
            .await;
        assert_eq!(r.status, 200, "token: {}", r.text);
        r.json()["access_token"]
            .as_str()
            .expect("access_token")
            .to_owned()
    }

    /// A streaming client sending `Authorization: Bearer <token>`.
    pub(crate) fn client(&self, token: &str) -> Client {
        Client::new(&self.endpoint(), Some(format!("Bearer {token}")))
    }

    /// A streaming client for the demo user with a fresh token, handshaken, subscribed to
    /// `channels` and past its first connect.
    pub(crate) async fn subscriber(&self, channels: &[&str]) -> Client {
        let mut c = self.client(&self.token().await);
        c.ready(channels).await;
        c
    }

    /// Publishes a platform event through REST and returns the 201 body.
    pub(crate) async fn publish_event(&self, token: &str, object: &str, fields: Value) -> Value {
        let r = self
            .post_json(
                &format!("/services/data/v{VERSION}/sobjects/{object}/"),
                Some(token),
                fields,
            )
            .await;
        assert_eq!(r.status, 201, "publish: {}", r.text);
        r.json()
    }

    /// Publishes a record through `/_emulator/publish` and returns its replay ID.
    pub(crate) async fn emulate(&self, query: &str, record: Value) -> u64 {
        let r = self
            .post_json(&format!("/_emulator/publish?{query}"), None, record)
            .await;
        assert_eq!(r.status, 200, "emulator publish: {}", r.text);
        let body = r.json();
        assert_eq!(body["ok"], true, "{body}");
        body["replayId"].as_u64().expect("replayId")
    }
}

/// A long-polling Bayeux client that sends an `Authorization` header.
#[derive(Clone)]
pub(crate) struct Client {
    pub(crate) http: reqwest::Client,
    pub(crate) url: String,
    /// The whole `Authorization` header value, if any.
    pub(crate) auth: Option<String>,
    pub(crate) client_id: Option<String>,
}

impl Client {
    /// A client for `url` sending `auth` as the Authorization header.
    pub(crate) fn new(url: &str, auth: Option<String>) -> Client {
        Client {
            http: http_client(HTTP_TIMEOUT),
            url: url.to_owned(),
            auth,
            client_id: None,
        }
    }

    /// The same client with a shorter per-request timeout.
    pub(crate) fn with_timeout(mut self, timeout: Duration) -> Client {
        self.http = http_client(timeout);
        self
    }

    /// POSTs a raw body; `Err` on a transport error (a timeout, for instance).
    pub(crate) async fn try_post_raw(
        &self,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> Result<Resp, reqwest::Error> {
        let mut req = self
            .http
            .post(&self.url)
            .header("content-type", content_type)
            .body(body);
        if let Some(a) = &self.auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await?;
        Ok(Resp {
            status: r.status().as_u16(),
            headers: r.headers().clone(),
            text: r.text().await?,
        })
    }

    /// POSTs JSON; `Err` on a transport error.
    pub(crate) async fn try_post(&self, body: &Value) -> Result<Resp, reqwest::Error> {
        self.try_post_raw("application/json", body.to_string())
            .await
    }

    /// POSTs JSON (panics on a transport error).
    pub(crate) async fn post(&self, body: Value) -> Resp {
        self.try_post(&body)
            .await
            .unwrap_or_else(|e| panic!("request {body} failed: {e}"))
    }

    /// POSTs JSON and returns the reply array; panics unless HTTP 200 with a JSON array.
    pub(crate) async fn send(&self, body: Value) -> Vec<Value> {
        let r = self.post(body.clone()).await;
        assert_eq!(r.status, 200, "HTTP status for {body}: {}", r.text);
        assert_eq!(r.content_type(), "application/json;charset=UTF-8");
        match r.json() {
            Value::Array(a) => a,
            other => panic!("reply is not an array: {other}"),
        }
    }

    /// The handshake EMP-Connector sends.
    pub(crate) fn handshake_message(id: &str) -> Value {
        json!([{"ext":{"replay":true},"supportedConnectionTypes":["long-polling"],"channel":"/meta/handshake","id":id,"version":"1.0"}])
    }

    /// Handshakes, asserts success and remembers the clientId.
    pub(crate) async fn handshake(&mut self) -> Value {
        let replies = self.send(Self::handshake_message("h")).await;
        assert_eq!(replies.len(), 1, "{replies:?}");
        let reply = replies[0].clone();
        assert_eq!(reply["successful"], true, "handshake: {reply}");
        self.client_id = Some(reply["clientId"].as_str().expect("clientId").to_owned());
        reply
    }

    /// The clientId (panics before a handshake).
    pub(crate) fn id(&self) -> &str {
        self.client_id.as_deref().expect("handshake first")
    }

    /// Subscribes to `subscription`, with `ext.replay` = `replay` when given.
    pub(crate) async fn subscribe(&self, subscription: &str, replay: Option<Value>) -> Value {
        let mut m = json!({"channel":"/meta/subscribe","clientId":self.id(),"subscription":subscription,"id":"s"});
        if let Some(map) = replay {
            m["ext"] = json!({ "replay": map });
        }
        let replies = self.send(json!([m])).await;
        assert_eq!(replies.len(), 1, "{replies:?}");
        replies[0].clone()
    }

    /// The connect message.
    pub(crate) fn connect_message(&self, id: &str) -> Value {
        json!([{"channel":"/meta/connect","clientId":self.id(),"connectionType":"long-polling","id":id}])
    }

    /// Sends a connect and returns the whole reply array.
    pub(crate) async fn connect(&self) -> Vec<Value> {
        self.send(self.connect_message("c")).await
    }

    /// Sends a connect and splits the reply into (connect reply, other messages).
    pub(crate) async fn connect_split(&self) -> (Value, Vec<Value>) {
        split(self.connect().await)
    }

    /// Handshakes, subscribes to each of `channels` (asserting success) and sends the first
    /// connect (answered at once).
    pub(crate) async fn ready(&mut self, channels: &[&str]) {
        self.handshake().await;
        for ch in channels {
            let r = self.subscribe(ch, None).await;
            assert_eq!(r["successful"], true, "subscribe {ch}: {r}");
        }
        let (reply, _) = self.connect_split().await;
        assert_eq!(reply["successful"], true, "first connect: {reply}");
    }

    /// Connects until `n` deliveries arrived (at most 15 s).
    pub(crate) async fn receive(&self, n: usize) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let mut got = Vec::new();
        while got.len() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of {n} deliveries arrived: {got:?}",
                got.len()
            );
            let (reply, deliveries) = self.connect_split().await;
            assert_eq!(reply["successful"], true, "{reply}");
            got.extend(deliveries);
        }
        got
    }
}

/// Is `s` an ISO-8601 UTC time with milliseconds, `2017-04-09T18:31:40.517Z`?
pub(crate) fn is_iso_millis(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 24
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b[23] == b'Z'
        && b.iter()
            .enumerate()
            .all(|(i, c)| [4, 7, 10, 13, 16, 19, 23].contains(&i) || c.is_ascii_digit())
}

/// Is `s` a lowercase hyphenated UUID?
pub(crate) fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit() && !c.is_ascii_uppercase()
            }
        })
}

/// The sorted keys of a JSON object.
pub(crate) fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect();
    k.sort();
    k
}
