//! The client's options: [`ClientBuilder`], from [`Client::builder`](crate::Client::builder).

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use crate::auth::TokenProvider;
use crate::backoff::BackoffPolicy;
use crate::error::Error;
use crate::ext::Extension;
use crate::ext::replay::{MemoryReplayStore, Replay, ReplayFallback, ReplayStore};
use crate::state::TransportKind;

/// Options for a [`Client`](crate::Client). Every setter has a default; only the URL is
/// required.
pub struct ClientBuilder {
    pub(crate) url: String,
    pub(crate) transport: TransportKind,
    pub(crate) headers: HeaderMap,
    pub(crate) header_error: Option<String>,
    pub(crate) cookie_jar: Option<Arc<reqwest::cookie::Jar>>,
    pub(crate) request_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) network_allowance: Duration,
    pub(crate) server_timeout: Duration,
    pub(crate) operation_timeout: Duration,
    pub(crate) max_stalls: u32,
    pub(crate) backoff: BackoffPolicy,
    pub(crate) give_up_after: Option<u32>,
    pub(crate) token_provider: Option<Arc<dyn TokenProvider>>,
    pub(crate) replay_store: Arc<dyn ReplayStore>,
    pub(crate) replay: bool,
    pub(crate) replay_fallback: ReplayFallback,
    pub(crate) resume_default: Replay,
    pub(crate) extensions: Vec<Box<dyn Extension>>,
    pub(crate) ack: bool,
    pub(crate) max_response_bytes: usize,
    pub(crate) seed: Option<u64>,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("url", &self.url)
            .field("transport", &self.transport)
            .field("token_provider", &self.token_provider.is_some())
            .field("request_timeout", &self.request_timeout)
            .field("network_allowance", &self.network_allowance)
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    pub(crate) fn new(url: impl Into<String>) -> Self {
        ClientBuilder {
            url: url.into(),
            transport: TransportKind::Auto,
            headers: HeaderMap::new(),
            header_error: None,
            cookie_jar: None,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            network_allowance: Duration::from_secs(10),
            server_timeout: Duration::from_secs(30),
            operation_timeout: Duration::from_secs(60),
            max_stalls: 2,
            backoff: BackoffPolicy::default(),
            give_up_after: None,
            token_provider: None,
            replay_store: Arc::new(MemoryReplayStore::new()),
            replay: true,
            replay_fallback: ReplayFallback::All,
            resume_default: Replay::New,
            extensions: Vec::new(),
            ack: true,
            max_response_bytes: 16 * 1024 * 1024,
            seed: None,
        }
    }

    /// Which transport to use (default [`TransportKind::Auto`]: WebSocket when the server offers
    /// it, else long-polling, and long-polling when a WebSocket cannot be opened).
    ///
    /// ```
    /// use bayeux_client::{Client, TransportKind};
    /// let b = Client::builder("http://127.0.0.1:8080/cometd").transport(TransportKind::LongPolling);
    /// ```
    pub fn transport(mut self, transport: TransportKind) -> Self {
        self.transport = transport;
        self
    }

    /// Adds a header to every request (and to the WebSocket upgrade). An invalid name or value
    /// makes [`build`](Self::build) fail.
    ///
    /// ```
    /// use bayeux_client::Client;
    /// let b = Client::builder("http://127.0.0.1:8080/cometd").header("X-Tenant", "acme");
    /// ```
    pub fn header(mut self, name: &str, value: &str) -> Self {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(n), Ok(v)) => {
                self.headers.append(n, v);
            }
            _ => self.header_error = Some(format!("invalid header {name:?}")),
        }
        self
    }

    /// Uses this cookie jar instead of a new one. Each client should have its own jar: servers
    /// that bind sessions to a browser cookie refuse a jar shared by two clients.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use bayeux_client::Client;
    /// let jar = Arc::new(reqwest::cookie::Jar::default());
    /// let b = Client::builder("http://127.0.0.1:8080/cometd").cookie_jar(jar);
    /// ```
    pub fn cookie_jar(mut self, jar: Arc<reqwest::cookie::Jar>) -> Self {
        self.cookie_jar = Some(jar);
        self
    }

    /// Bounds every request but the held connect: handshake, subscribe, publish, disconnect,
    /// and opening a WebSocket (default 30 s).
    ///
    /// ```
    /// use std::time::Duration;
    /// use bayeux_client::Client;
    /// let b = Client::builder("http://127.0.0.1:8080/cometd").request_timeout(Duration::from_secs(10));
    /// ```
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Bounds opening a TCP connection (default 10 s).
    ///
    /// ```
    /// use std::time::Duration;
    /// use bayeux_client::Client;
    /// let b = Client::builder("http://127.0.0.1:8080/cometd").connect_timeout(Duration::from_secs(3));
    /// ```
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long beyond the server's `advice.timeout` a held connect may take before the
    /// watchdog aborts it (default 10 s). Salesforce holds connects 110 s, so its connects are
    /// aborted after 120 s by default.
    ///
    /// ```
    /// use std::time::Duration;
    /// use bayeux_client::Client;
    /// let b = Client::builder("http://127.0.0.1:8080/cometd").network_allowance(Duration::from_secs(5));
    /// ```
    pub fn network_allowance(mut self, allowance: Duration) -> Self {
        self.network_allowance = allowance;
        self
    }

    /// The server's connect timeout assumed until its advice says otherwise (default 30 s).
    ///
    /// ```
    /// use std::time::Duration;
    /// use bayeux_client::Client;
    /// let b = Client::builder("https://acme.my.salesforce.com/cometd/59.0")
    ///     .server_timeout(Duration::from_secs(110));
    /// ```
    pub fn server_timeout(mut self, timeout: Duration) -> Self {
        self.server_timeout = timeout;
        self
    }

    /// Bounds how long [`Client::subscribe`](crate::Client::subscribe) and
    /// [`Client::publish`](crate::Client::publish) wait for the server, including any
    /// handshake in progress (default 60 s).
    ///
    /// ```
    /// use std::time::Duration;
    /// use bayeux_client::Client;
    /// let b = Client::builder("http://127.0.0.1:8080/cometd").operation_timeout(Duration::from_secs(20));
    /// ```
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// Consecutive stalled connects before the client handshakes afresh (default 2).
    ///
    /// ```
    /// use bayeux_client::Client;
    /// let b = Client::builder("http://127.0.0.1:8080/cometd").max_stalls(3);
    /// ```
    pub fn max_stalls(mut self, stalls: u32) -> Self {
        self.max_stalls = stalls.max(1);
        self
    }

    /// Retry spacing after failures, token endpoint failures included (default 0.5 s doubling
    /// to 30 s, with jitter).
    ///
    /// ```
    /// use std::time::Duration;
    /// use bayeux_client::{BackoffPolicy, Client};
    /// let b = Client::builder("http://127.0.0.1:8080/cometd").backoff(BackoffPolicy {
    ///     initial: Duration::from_millis(100),
    ///     max: Duration::from_secs(10),
    ///     jitter: true,
    /// });
    /// ```
    pub fn backoff(mut self, backoff: BackoffPolicy) -> Self {
        self.backoff = backoff;
        self
    }

    /// Gives up (reporting [`Event::GaveUp`](crate::Event::GaveUp)) after this many
    /// consecutive failures. Default: never.
    ///
    /// ```
    /// use bayeux_client::Client;
    /// let b = Client::builder("http://127.0.0.1:8080/cometd").give_up_after(20);
    /// ```
    pub fn give_up_after(mut self, failures: u32) -> Self {
        self.give_up_after = Some(failures);
        self
    }

    /// Authenticates every request with tokens from `provider`, and re-authenticates when the
    /// server says the token is no good.
    ///
    /// ```
    /// use bayeux_client::Client;
    /// use bayeux_client::auth::StaticToken;
    /// let b = Client::builder("http://127.0.0.1:8080/cometd")
    ///     .token_provider(StaticToken::bearer("00Dxx!token"));
    /// ```
    pub fn token_provider(mut self, provider: impl TokenProvider) -> Self {
        self.token_provider = Some(Arc::new(provider));
        self
    }

    /// Records replay checkpoints in `store` (default: in memory).
    ///
    /// ```
    /// use bayeux_client::Client;
    /// use bayeux_client::ext::replay::FileReplayStore;
    /// # let dir = std::env::temp_dir();
    /// let store = FileReplayStore::open(dir.join("bayeux-doc-replay.json")).unwrap();
    /// let b = Client::builder("http://127.0.0.1:8080/cometd").replay_store(store);
    /// ```
    pub fn replay_store(mut self, store: impl ReplayStore) -> Self {
        self.replay_store = Arc::new(store);
        self
    }

    /// Records replay checkpoints in a shared store.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use bayeux_client::Client;
    /// use bayeux_client::ext::replay::MemoryReplayStore;
    /// let store = Arc::new(MemoryReplayStore::new());
    /// let b = Client::builder("http://127.0.0.1:8080/cometd").replay_store_arc(store.clone());
    /// ```
    pub fn replay_store_arc(mut self, store: Arc<dyn ReplayStore>) -> Self {
        self.replay_store = store;
        self
    }

    /// Whether to ask for the replay extension (`ext.replay: true` in the handshake; default
    /// true). Replay maps are sent only when the server echoes it.
    ///
    /// ```
    /// use bayeux_client::Client;
    /// let b = Client::builder("http://127.0.0.1:8080/cometd").replay(false);
    /// ```
    pub fn replay(mut self, enabled: bool) -> Self {
        self.replay = enabled;
        self
    }

    /// What to do when the server refuses a replay ID as invalid or outside retention (default
    /// [`ReplayFallback::All`]: `-2`, nothing missed).
    ///
    /// ```
    /// use bayeux_client::Client;
    /// use bayeux_client::ext::replay::ReplayFallback;
    /// let b = Client::builder("http://127.0.0.1:8080/cometd").replay_fallback(ReplayFallback::New);
    /// ```
    pub fn replay_fallback(mut self, fallback: ReplayFallback) -> Self {
        self.replay_fallback = fallback;
        self
    }

    /// Where [`Replay::Resume`] starts when the store has nothing for the channel (default
    /// [`Replay::New`]).
    ///
    /// ```
    /// use bayeux_client::Client;
    /// use bayeux_client::ext::replay::Replay;
    /// let b = Client::builder("http://127.0.0.1:8080/cometd").resume_default(Replay::All);
    /// ```
    pub fn resume_default(mut self, replay: Replay) -> Self {
        self.resume_default = match replay {
            Replay::Resume => Replay::New,
            r => r,
        };
        self
    }

    /// Adds an extension, run on every message in and out.
    ///
    /// ```
    /// use bayeux_client::Client;
    /// use bayeux_client::ext::ack::AckExtension;
    /// let b = Client::builder("http://127.0.0.1:8080/cometd").extension(AckExtension::new());
    /// ```
    pub fn extension(mut self, extension: impl Extension) -> Self {
        self.extensions.push(Box::new(extension));
        self
    }

    /// Whether to ask for the CometD acknowledgement extension (default true). Servers that
    /// support it re-send what a lost connect response carried, so even a response lost to a
    /// client-side abort costs nothing; servers that do not echo it are unaffected.
    ///
    /// ```
    /// use bayeux_client::Client;
    /// let b = Client::builder("http://127.0.0.1:8080/cometd").ack(false);
    /// ```
    pub fn ack(mut self, enabled: bool) -> Self {
        self.ack = enabled;
        self
    }

    /// The largest response body or WebSocket message accepted (default 16 MiB); a larger one
    /// is an error the client recovers from.
    ///
    /// ```
    /// use bayeux_client::Client;
    /// let b = Client::builder("http://127.0.0.1:8080/cometd").max_response_bytes(1 << 20);
    /// ```
    pub fn max_response_bytes(mut self, bytes: usize) -> Self {
        self.max_response_bytes = bytes;
        self
    }

    /// Seeds the backoff jitter (for reproducible tests).
    ///
    /// ```
    /// use bayeux_client::Client;
    /// let b = Client::builder("http://127.0.0.1:8080/cometd").jitter_seed(42);
    /// ```
    pub fn jitter_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Validates the options and starts the client (it handshakes in the background). Must be
    /// called inside a tokio runtime.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), bayeux_client::Error> {
    /// use bayeux_client::Client;
    /// let client = Client::builder("http://127.0.0.1:8080/cometd").build()?;
    /// # Ok(()) }
    /// ```
    pub fn build(self) -> Result<crate::Client, Error> {
        if let Some(e) = &self.header_error {
            return Err(Error::InvalidOption(e.clone()));
        }
        let url = url::Url::parse(&self.url).map_err(|e| Error::InvalidUrl(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::InvalidUrl(format!(
                "{}: the endpoint URL must be http:// or https://",
                self.url
            )));
        }
        crate::client::start(self, url)
    }
}
