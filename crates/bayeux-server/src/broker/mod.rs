//! The broker: sessions, subscriptions, message processing and fan-out. It knows nothing of
//! HTTP or WebSocket; transports hand it decoded messages with a [`RequestInfo`] and write out
//! what it returns.
//!
//! Publish path: validate → security policy → serialize the message once → [`Engine::append`]
//! → ack. Fan-out runs in one task that reads [`Engine::feed`]: for each stored message it builds
//! the delivered bytes once (adding the replay ID) and pushes a handle to those bytes onto the
//! queue of every matching session.

mod session;
mod shared;
mod subscriptions;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bayeux_engine::{Engine, Stored};
use bayeux_protocol::{
    Advice, ChannelKind, ChannelName, Dialect, ErrorKind, Message, Reconnect, meta,
};
use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use serde_json::{Map, Value};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use session::AckState;
pub use session::{Delivery, Enqueued, Session};
pub(crate) use shared::Committed;
use subscriptions::SubscriptionIndex;

use crate::config::ServerConfig;
use crate::metrics::Metrics;
use crate::policy::{Denial, Operation, RequestInfo, SecurityPolicy};

/// A server-side listener on a service channel. It gets the broker, the sending session (if
/// the message carried a known clientId) and the message, and may answer with
/// [`Broker::deliver`].
pub type ServiceHandler = Arc<dyn Fn(&Arc<Broker>, Option<&Arc<Session>>, &Message) + Send + Sync>;

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent `/meta/disconnect`.
    Disconnected,
    /// No connect for `max_interval`.
    Expired,
    /// Its queue overflowed under the `disconnect` policy.
    Overflow,
    /// The server ended it and told the client to handshake again (a server-sent
    /// `/meta/disconnect`).
    ServerDisconnect,
}

/// The result of processing one request's messages.
#[derive(Debug, Default)]
pub struct Processed {
    /// Replies to every message but the connect, in order.
    pub replies: Vec<Message>,
    /// The connect, if the request had one with a known session.
    pub connect: Option<ConnectPlan>,
}

/// What to do with a `/meta/connect`.
#[derive(Debug)]
pub struct ConnectPlan {
    /// The session.
    pub session: Arc<Session>,
    /// The reply to send when the connect is answered.
    pub reply: Message,
    /// `Some(t)`: hold up to `t` for messages; `None`: answer at once.
    pub hold: Option<Duration>,
    /// The batch the connect confirms (ack extension), if it says.
    pub client_ack: Option<u64>,
}

/// How a held long-poll connect ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldEnd {
    /// Messages are waiting (after the lazy delay).
    Messages,
    /// The timeout passed.
    Timeout,
    /// A newer connect for the same session took over.
    Superseded,
    /// The session ended.
    Closed(CloseReason),
    /// The server is shutting down.
    Shutdown,
}

/// Keeps a session marked as held; on drop the hold ends and the expiry clock restarts.
pub struct Hold {
    session: Arc<Session>,
    generation: u64,
    broker_metrics: Arc<Metrics>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut st = self.session.state.lock();
        st.holds -= 1;
        st.last_seen = Instant::now();
        if st.hold_generation == self.generation {
            st.release_held = None;
        }
        self.broker_metrics.held_connects.dec();
    }
}

/// The broker. Create with [`Broker::new`], then [`Broker::start`] inside a tokio runtime.
pub struct Broker {
    config: ServerConfig,
    dialect: Dialect,
    engine: Arc<dyn Engine>,
    policy: Arc<dyn SecurityPolicy>,
    sessions: RwLock<HashMap<Arc<str>, Arc<Session>>>,
    index: RwLock<SubscriptionIndex>,
    services: RwLock<Vec<(ChannelName, ServiceHandler)>>,
    close_reasons: Mutex<HashMap<u64, CloseReason>>,
    stall_window: Mutex<Option<(Instant, Instant)>>,
    next_seq: AtomicU64,
    /// The engine is shared by several nodes: keep session records for adoption.
    shared: bool,
    /// This node's name in the shared engine (owner of the sessions it serves).
    node_id: String,
    /// Cursor commits for the shared engine, batched by one task (see `shared.rs`).
    commits: shared::Committer,
    metrics: Arc<Metrics>,
    /// Cancelled at [`Broker::shutdown`]. A token, not a `watch` channel: waiting on it is a
    /// future of about half the size, and every held connect and open WebSocket waits on it
    /// (memory per idle client).
    stopping: CancellationToken,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("engine", &self.engine.name())
            .finish_non_exhaustive()
    }
}

fn new_client_id() -> String {
    // 128 random bits, base 36: 25 lowercase alphanumerics.
    let mut n: u128 = rand::random();
    let mut out = [b'0'; 25];
    for slot in out.iter_mut().rev() {
        *slot = b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8(out.to_vec()).expect("ascii")
}

impl Broker {
    /// A broker over `engine`, asking `policy`, answering in `dialect`.
    pub fn new(
        config: ServerConfig,
        engine: Arc<dyn Engine>,
        policy: Arc<dyn SecurityPolicy>,
        dialect: Dialect,
    ) -> Arc<Self> {
        let shared = engine.shared();
        Arc::new(Broker {
            shared,
            node_id: format!("{:032x}", rand::random::<u128>()),
            commits: shared::Committer::new(),
            config,
            dialect,
            engine,
            policy,
            sessions: RwLock::new(HashMap::new()),
            index: RwLock::new(SubscriptionIndex::default()),
            services: RwLock::new(Vec::new()),
            close_reasons: Mutex::new(HashMap::new()),
            stall_window: Mutex::new(None),
            next_seq: AtomicU64::new(1),
            metrics: Arc::new(Metrics::new()),
            stopping: CancellationToken::new(),
        })
    }

    /// Starts the fan-out, sweeper and retention tasks. They end at [`Broker::shutdown`].
    pub fn start(self: &Arc<Self>) {
        if self.shared {
            self.start_committer();
        }
        let mut feed = self.engine.feed();
        let broker = Arc::downgrade(self);
        let stop = self.stopping.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    stored = feed.recv() => {
                        let (Some(stored), Some(broker)) = (stored, broker.upgrade()) else { break };
                        broker.fan_out(&stored);
                    }
                    _ = stop.cancelled() => break,
                }
            }
        });
        let broker = Arc::downgrade(self);
        let stop = self.stopping.clone();
        let period = Duration::from_millis(self.config.timeouts.sweep_interval_ms);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut ticks: u64 = 0;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let Some(broker) = broker.upgrade() else { break };
                        broker.sweep();
                        ticks += 1;
                        // Retention by age: about once a minute is plenty.
                        if ticks.is_multiple_of((60_000 / period.as_millis().max(1) as u64).max(1)) {
                            let retention = broker.config.retention();
                            if let Err(e) = broker.engine.trim(&retention, std::time::SystemTime::now()).await {
                                tracing::warn!(error = %e, "retention trim failed");
                            }
                        }
                    }
                    _ = stop.cancelled() => break,
                }
            }
        });
    }

    /// Asks held connects to return and background tasks to stop.
    pub fn shutdown(&self) {
        self.stopping.cancel();
    }

    /// True once [`Broker::shutdown`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.stopping.is_cancelled()
    }

    /// Resolves at shutdown (at once if it has begun).
    pub fn stopped(&self) -> WaitForCancellationFuture<'_> {
        self.stopping.cancelled()
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The error dialect.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    /// A live session by clientId.
    pub fn session(&self, client_id: &str) -> Option<Arc<Session>> {
        self.sessions.read().get(client_id).cloned()
    }

    /// The clientIds of every live session.
    pub fn session_ids(&self) -> Vec<String> {
        self.sessions.read().keys().map(|k| k.to_string()).collect()
    }

    /// Number of live sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.read().len()
    }

    /// Number of distinct channels and patterns with at least one subscriber.
    pub fn subscribed_patterns(&self) -> usize {
        self.index.read().patterns()
    }

    /// Benchmarks only: the sessions a message on `channel` would reach.
    #[doc(hidden)]
    pub fn bench_matching(&self, channel: &str) -> usize {
        self.index.read().matching(channel).len()
    }

    /// Benchmarks only: fans `stored` out now, on the calling thread.
    #[doc(hidden)]
    pub fn bench_fan_out(&self, stored: &Stored) {
        self.fan_out(stored);
    }

    /// Registers a listener for messages published to service channels matching `pattern`
    /// (for example `/service/echo` or `/service/**`).
    pub fn add_service(&self, pattern: ChannelName, handler: ServiceHandler) {
        self.services.write().push((pattern, handler));
    }

    /// Sends `message` to one session only (for service replies). The message is serialized
    /// here; returns what the queue did.
    pub fn deliver(&self, session: &Session, message: &Message) -> Enqueued {
        let bytes = Bytes::from(bayeux_protocol::encode_message(message));
        self.enqueue(
            session,
            Delivery {
                origin: None,
                bytes,
            },
            false,
        )
    }

    /// Publishes from the server itself (no session, no policy). Returns the replay ID.
    pub async fn publish_from_server(
        &self,
        channel: &ChannelName,
        data: Value,
    ) -> Result<u64, ErrorKind> {
        if channel.kind() != ChannelKind::Broadcast || channel.is_wildcard() {
            return Err(ErrorKind::ChannelInvalid);
        }
        let mut message = Message::new(channel.as_str());
        message.data = Some(data);
        self.store(channel, &message).await
    }

    /// Publishes from the server to some sessions only: the message is stored (it gets a replay
    /// ID and can be replayed) but delivered, live and in replays, only to sessions whose
    /// attribute `attribute` (see [`Session::attributes`]) is a string in `values`.
    pub async fn publish_from_server_to(
        &self,
        channel: &ChannelName,
        data: Value,
        attribute: &str,
        values: &[String],
    ) -> Result<u64, ErrorKind> {
        if channel.kind() != ChannelKind::Broadcast || channel.is_wildcard() {
            return Err(ErrorKind::ChannelInvalid);
        }
        let mut message = Message::new(channel.as_str());
        message.data = Some(data);
        let audience = serde_json::json!({"attribute": attribute, "values": values});
        self.store_with(channel, &message, Some(audience)).await
    }

    fn error_reply(&self, reply: Message, error: ErrorKind) -> Message {
        reply.failed(error.wire(self.dialect))
    }

    fn denied(&self, reply: Message, denial: Denial, default_advice: Option<Advice>) -> Message {
        let mut reply = self.error_reply(reply, denial.error);
        reply.advice = denial.advice.or(default_advice);
        if let Some(Value::Object(ext)) = denial.ext {
            for (k, v) in ext {
                reply.ext_insert(k, v);
            }
        }
        reply
    }

    fn unknown_session(&self, reply: Message, with_advice: bool) -> Message {
        let mut reply = self.error_reply(reply, ErrorKind::SessionUnknown);
        if with_advice {
            reply.advice = Some(Advice::handshake());
        }
        reply
    }

    /// Processes one request's messages in order.
    pub async fn process(
        self: &Arc<Self>,
        request: &RequestInfo<'_>,
        messages: Vec<Message>,
    ) -> Processed {
        let alone = messages.len() == 1;
        let mut out = Processed::default();
        for message in messages {
            self.metrics.messages_in.inc();
            if self.shared
                && message.channel != meta::HANDSHAKE
                && let Some(id) = message.client_id.as_deref()
            {
                // A connect says which batch the client has (ack extension): a node adopting
                // the session re-sends a batch the client never got.
                let client_ack = (message.channel == meta::CONNECT)
                    .then(|| message.ext_get("ack").and_then(Value::as_u64))
                    .flatten();
                // Publishes and disconnects need the session to exist, not its queue or its
                // cursors: any local copy will do, stale or not (a publisher whose requests
                // spread over nodes does not move its session around).
                let needs_state = matches!(
                    message.channel.as_str(),
                    meta::CONNECT | meta::SUBSCRIBE | meta::UNSUBSCRIBE
                );
                if needs_state {
                    self.sync_session(id, client_ack).await;
                } else if self.session(id).is_none() {
                    self.sync_session(id, None).await;
                }
            }
            if message.channel == meta::CONNECT {
                match self.connect(request, &message, alone) {
                    Ok(plan) => {
                        // A second connect in one batch: answer the first at once.
                        if let Some(previous) = out.connect.replace(plan) {
                            out.replies.push(previous.reply);
                        }
                    }
                    Err(reply) => out.replies.push(reply),
                }
                continue;
            }
            let reply = match message.channel.as_str() {
                meta::HANDSHAKE => {
                    let reply = self.handshake(request, &message);
                    if let Some(session) = reply.client_id.as_deref().and_then(|c| self.session(c))
                    {
                        self.save_record(&session).await;
                    }
                    reply
                }
                meta::SUBSCRIBE => {
                    let reply = self.subscribe(request, &message).await;
                    self.save_record_of(&message, &reply, true).await;
                    reply
                }
                meta::UNSUBSCRIBE => {
                    let reply = self.unsubscribe(&message);
                    self.save_record_of(&message, &reply, false).await;
                    reply
                }
                meta::DISCONNECT => {
                    let reply = self.disconnect(&message);
                    if self.shared
                        && let Some(id) = message.client_id.as_deref()
                        && let Err(e) = self.engine.remove_session(id).await
                    {
                        tracing::warn!(client_id = id, error = %e, "removing session failed");
                    }
                    reply
                }
                _ => self.publish(request, &message).await,
            };
            out.replies.push(reply);
        }
        for reply in out
            .replies
            .iter()
            .chain(out.connect.as_ref().map(|c| &c.reply))
        {
            if reply.successful == Some(false) {
                let code = reply
                    .error
                    .as_deref()
                    .and_then(bayeux_protocol::error::error_code)
                    .unwrap_or(500);
                self.metrics.error(code);
            }
        }
        out
    }

    /// After a successful subscribe (`added`) or unsubscribe: the session's shared record.
    async fn save_record_of(&self, message: &Message, reply: &Message, added: bool) {
        if !self.shared || reply.successful != Some(true) {
            return;
        }
        let Some(session) = message.client_id.as_deref().and_then(|c| self.session(c)) else {
            return;
        };
        let names = message
            .subscription
            .as_ref()
            .map(|s| s.names())
            .unwrap_or_default();
        let channels: Vec<String> = {
            let st = session.state.lock();
            names
                .iter()
                .map(|n| n.split_once('?').map_or(n.as_str(), |(base, _)| base))
                .filter(|n| st.subscriptions.contains(*n) == added)
                .map(str::to_owned)
                .collect()
        };
        self.save_subscriptions(&session, &channels, added).await;
    }

    fn server_advice(&self) -> Advice {
        Advice::retry(
            self.config.timeouts.interval_ms as i64,
            self.config.timeouts.connect_timeout_ms as i64,
        )
    }

    fn handshake(&self, request: &RequestInfo<'_>, message: &Message) -> Message {
        let reply = message.reply();
        if let Some(types) = &message.supported_connection_types
            && !types.is_empty()
            && !types.iter().any(|t| self.config.offers(t))
        {
            let mut reply = self.error_reply(
                reply,
                ErrorKind::ConnectionTypesUnsupported(types.join(",")),
            );
            reply.supported_connection_types = Some(self.config.transports.clone());
            reply.advice = Some(Advice::none());
            return reply;
        }
        if self.session_count() >= self.config.limits.max_sessions {
            let mut reply = self.error_reply(reply, ErrorKind::SessionLimit);
            reply.advice = Some(Advice {
                reconnect: Some(Reconnect::Handshake),
                interval: Some(self.config.timeouts.max_interval_ms as i64),
                ..Advice::default()
            });
            return reply;
        }
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let session = Arc::new(Session::new(new_client_id(), seq));
        if let Err(denial) =
            self.policy
                .authorize(request, Some(&session), Operation::Handshake, message)
        {
            return self.denied(reply, denial, Some(Advice::none()));
        }
        let wants_replay = message.ext_get("replay") == Some(&Value::Bool(true));
        let wants_ack = message.ext_get("ack") == Some(&Value::Bool(true));
        {
            let mut st = session.state.lock();
            st.replay_ext = wants_replay;
            if wants_ack {
                st.ack = Some(AckState::default());
            }
        }
        let id: Arc<str> = Arc::from(session.id());
        self.sessions.write().insert(id, session.clone());
        self.metrics.sessions.inc();
        self.metrics.handshakes.inc();
        let mut reply = reply.ok();
        reply.client_id = Some(session.id().to_owned());
        reply.version = Some(bayeux_protocol::VERSION.into());
        reply.minimum_version = Some(bayeux_protocol::VERSION.into());
        reply.supported_connection_types = Some(self.config.transports.clone());
        if self.dialect == Dialect::Salesforce {
            // Salesforce's handshake reply has no advice and always announces replay.
            reply.ext_insert("replay", Value::Bool(true));
            reply.ext_insert("payload.format", Value::Bool(true));
        } else {
            reply.advice = Some(self.server_advice());
        }
        if wants_replay {
            reply.ext_insert("replay", Value::Bool(true));
        }
        if wants_ack {
            reply.ext_insert("ack", Value::Bool(true));
        }
        reply
    }

    // The error is a whole reply; connects are not a hot enough path for boxing to matter.
    #[allow(clippy::result_large_err)]
    fn connect(
        &self,
        request: &RequestInfo<'_>,
        message: &Message,
        alone: bool,
    ) -> Result<ConnectPlan, Message> {
        let mut reply = message.reply();
        let Some(session) = message.client_id.as_deref().and_then(|c| self.session(c)) else {
            return Err(self.unknown_session(reply, true));
        };
        session.touch();
        // Every connect reply for a known session names it, failures included (as Salesforce).
        reply.client_id = Some(session.id().to_owned());
        if let Some(t) = message.connection_type.as_deref()
            && !self.config.offers(t)
        {
            let mut reply =
                self.error_reply(reply, ErrorKind::ConnectionTypeUnsupported(t.to_owned()));
            reply.advice = Some(Advice::handshake());
            return Err(reply);
        }
        if let Err(denial) =
            self.policy
                .authorize(request, Some(&session), Operation::Connect, message)
        {
            return Err(self.denied(reply, denial, Some(Advice::none())));
        }
        let client_timeout = message.advice.as_ref().and_then(|a| a.timeout);
        let (first, unacked) = {
            let mut st = session.state.lock();
            let first = !std::mem::replace(&mut st.connected, true);
            // Ack extension: the client confirms every batch up to the number it sends.
            let confirmed = message.ext_get("ack").and_then(Value::as_u64);
            let unacked = match (&mut st.ack, confirmed) {
                (Some(ack), Some(n)) => {
                    // A batch number this copy never issued: another node served the client
                    // (shared engines). Count on from there, so that our batches are new to it.
                    ack.batch = ack.batch.max(n);
                    ack.unacked.retain(|(batch, _)| *batch > n);
                    ack.before.retain(|(batch, _)| *batch > n);
                    !ack.unacked.is_empty()
                }
                (Some(ack), None) => !ack.unacked.is_empty(),
                (None, _) => false,
            };
            (first, unacked)
        };
        let server_timeout = self.config.timeouts.connect_timeout();
        let timeout = match client_timeout {
            Some(t) if t >= 0 => server_timeout.min(Duration::from_millis(t as u64)),
            _ => server_timeout,
        };
        // Advice goes out on the first connect and whenever the client sent advice of its own
        // (it wants to be re-advised), as CometD does.
        if first || message.advice.is_some() {
            reply.advice = Some(self.server_advice());
        }
        // Unacknowledged messages go out again at once, ahead of newer ones.
        let hold = (!first && alone && !timeout.is_zero() && !unacked).then_some(timeout);
        Ok(ConnectPlan {
            session,
            reply: reply.ok(),
            hold,
            client_ack: message.ext_get("ack").and_then(Value::as_u64),
        })
    }

    fn parse_subscription(&self, message: &Message) -> Result<Vec<ChannelName>, ErrorKind> {
        Ok(self
            .parse_filtered_subscription(message)?
            .into_iter()
            .map(|(c, _)| c)
            .collect())
    }

    /// The subscribed channels, each with its `?Field=Value&…` filter (Salesforce PushTopic
    /// only; the plain endpoint rejects `?` as an invalid character).
    fn parse_filtered_subscription(&self, message: &Message) -> Result<Filtered, ErrorKind> {
        let Some(subscription) = &message.subscription else {
            return Err(ErrorKind::SubscriptionMissing);
        };
        if !subscription.is_valid() {
            return Err(ErrorKind::SubscriptionInvalid);
        }
        let names = subscription.names();
        if names.is_empty() {
            return Err(ErrorKind::SubscriptionMissing);
        }
        names
            .iter()
            .map(|n| {
                let (base, filter) = match n.split_once('?') {
                    Some((base, query))
                        if self.dialect == Dialect::Salesforce && base.starts_with("/topic/") =>
                    {
                        let conditions = url::form_urlencoded::parse(query.as_bytes())
                            .map(|(k, v)| (k.into_owned(), v.into_owned()))
                            .collect();
                        (base, conditions)
                    }
                    _ => (n.as_str(), Vec::new()),
                };
                let channel = ChannelName::new(base).map_err(|_| ErrorKind::SubscriptionInvalid)?;
                Ok((channel, filter))
            })
            .collect()
    }

    /// The reply skeleton of a subscribe or unsubscribe, and its session (or the unknown-session
    /// reply).
    #[allow(clippy::result_large_err)]
    fn subscription_request(&self, message: &Message) -> Result<(Message, Arc<Session>), Message> {
        let mut reply = message.reply();
        reply.subscription = message.subscription.clone();
        let Some(session) = message.client_id.as_deref().and_then(|c| self.session(c)) else {
            return Err(self.unknown_session(reply, false));
        };
        session.touch();
        if self.dialect == Dialect::Salesforce {
            // Salesforce names the client in subscribe replies, failures included.
            reply.client_id = Some(session.id().to_owned());
        }
        Ok((reply, session))
    }

    async fn subscribe(&self, request: &RequestInfo<'_>, message: &Message) -> Message {
        let (reply, session) = match self.subscription_request(message) {
            Ok(r) => r,
            Err(reply) => return reply,
        };
        let filtered = match self.parse_filtered_subscription(message) {
            Ok(c) => c,
            Err(e) => return self.error_reply(reply, e),
        };
        let channels: Vec<ChannelName> = filtered.iter().map(|(c, _)| c.clone()).collect();
        let mut wanted = Vec::new();
        for channel in &channels {
            match channel.kind() {
                ChannelKind::Meta => return self.error_reply(reply, ErrorKind::SubscribeFailed),
                // Service channels are never broadcast: subscribing is a successful no-op.
                ChannelKind::Service => continue,
                ChannelKind::Broadcast => {}
            }
            if let Err(denial) = self.policy.authorize(
                request,
                Some(&session),
                Operation::Subscribe(channel),
                message,
            ) {
                return self.denied(reply, denial, None);
            }
            wanted.push(channel.clone());
        }
        // Replay extension: where each channel starts. Validated before anything changes.
        let mut starts = Vec::new();
        for channel in &wanted {
            match self.replay_start(message, channel).await {
                Ok(ReplayFrom::Live) => {}
                Ok(from) => starts.push((channel.clone(), from)),
                Err(e) => return self.error_reply(reply, e),
            }
        }
        {
            let mut st = session.state.lock();
            let new = wanted
                .iter()
                .filter(|w| !st.subscriptions.contains(w.as_str()))
                .count();
            if st.subscriptions.len() + new > self.config.limits.max_subscriptions_per_session {
                drop(st);
                return self.error_reply(reply, ErrorKind::SubscriptionLimit);
            }
            st.subscriptions
                .extend(wanted.iter().map(|w| Arc::<str>::from(w.as_str())));
            for (channel, conditions) in &filtered {
                if conditions.is_empty() {
                    st.filters.remove(channel.as_str());
                } else {
                    st.filters
                        .insert(Arc::from(channel.as_str()), conditions.clone());
                }
            }
            // Live first: until its history is queued, live messages for a replayed pattern
            // wait aside, so the seam has no gap and no repeat.
            for (channel, _) in &starts {
                st.replaying.push(Arc::from(channel.as_str()));
            }
        }
        if session.is_closed() {
            return self.unknown_session(reply, false);
        }
        // Read before the session joins the index, so every event it misses is newer.
        let positions = self.live_positions(message, &wanted, &starts).await;
        {
            let mut index = self.index.write();
            for channel in &wanted {
                index.add(&Arc::from(channel.as_str()), &session);
            }
        }
        if self.shared {
            // So that another node adopting the session knows where it stood.
            for channel in &wanted {
                let live = !starts.iter().any(|(c, _)| c == channel);
                if live
                    && !channel.is_wildcard()
                    && let Ok(bounds) = self.engine.bounds(channel.as_str()).await
                {
                    let mut st = session.state.lock();
                    let cursor = st.cursors.entry(Arc::from(channel.as_str())).or_insert(0);
                    *cursor = (*cursor).max(bounds.last_issued);
                    let start = st.delivered.entry(Arc::from(channel.as_str())).or_insert(0);
                    *start = (*start).max(bounds.last_issued);
                    st.note_start(channel.as_str(), bounds.last_issued);
                }
            }
        }
        for (channel, from) in &starts {
            if let Err(e) = self.queue_history(&session, channel, *from).await {
                self.abandon_replay(&session, channel.as_str());
                return self.error_reply(reply, e);
            }
        }
        let mut reply = reply.ok();
        if let Some(positions) = positions {
            reply.ext_insert("replay", positions);
        }
        reply
    }

    /// Replay extension, Bayeux dialect: for each concrete channel a subscribe with a replay
    /// map starts live (`-1`), the last replay ID issued on it, answered as
    /// `ext.replay: {channel: id}`. A client that loses its session before its first event
    /// resumes from there instead of from `-1`, so the events of the outage are not missed.
    /// Not in the Salesforce dialect, whose replies the emulator keeps as Salesforce's.
    async fn live_positions(
        &self,
        message: &Message,
        wanted: &[ChannelName],
        starts: &[(ChannelName, ReplayFrom)],
    ) -> Option<Value> {
        if self.dialect == Dialect::Salesforce || message.ext_get("replay").is_none() {
            return None;
        }
        let mut positions = Map::new();
        for channel in wanted {
            if channel.is_wildcard() || starts.iter().any(|(c, _)| c == channel) {
                continue;
            }
            if let Ok(bounds) = self.engine.bounds(channel.as_str()).await {
                positions.insert(channel.to_string(), Value::from(bounds.last_issued));
            }
        }
        (!positions.is_empty()).then_some(Value::Object(positions))
    }

    /// Where a subscribe to `channel` starts, from the replay extension of `message`.
    async fn replay_start(
        &self,
        message: &Message,
        channel: &ChannelName,
    ) -> Result<ReplayFrom, ErrorKind> {
        let Some(map) = message.ext_get("replay") else {
            return Ok(ReplayFrom::Live);
        };
        let not_found = || ErrorKind::ReplayChannelNotFound {
            channel: channel.to_string(),
            map: java_map(map),
        };
        let Value::Object(map) = map else {
            return Err(not_found());
        };
        let Some(value) = map.get(channel.as_str()) else {
            return Err(not_found());
        };
        let invalid = || ErrorKind::ReplayIdInvalid(value.to_string().trim_matches('"').to_owned());
        let Some(n) = value.as_i64() else {
            return Err(invalid());
        };
        match n {
            -1 => Ok(ReplayFrom::Live),
            -2 => Ok(ReplayFrom::After(0)),
            n if n < 0 => Err(invalid()),
            // Replay IDs are per channel: for a pattern, N means "after N" in each matching
            // channel, and no single channel can make it invalid.
            n if channel.is_wildcard() => Ok(ReplayFrom::After(n as u64)),
            n => {
                let n = n as u64;
                let bounds = self.engine.bounds(channel.as_str()).await.map_err(|e| {
                    tracing::error!(error = %e, "engine bounds failed");
                    ErrorKind::StorageFailed
                })?;
                // Valid: issued, and everything after it still retained.
                let retained_from = bounds.first.unwrap_or(bounds.last_issued + 1);
                if n > bounds.last_issued || n + 1 < retained_from {
                    return Err(invalid());
                }
                Ok(ReplayFrom::After(n))
            }
        }
    }

    /// Starts replaying the retained history of `channel` (a name or a pattern) after `from`:
    /// records where each matching channel starts and queues a first page. Live messages for
    /// the pattern stay gated until [`Broker::refill`] has read every channel to its end.
    async fn queue_history(
        &self,
        session: &Arc<Session>,
        channel: &ChannelName,
        from: ReplayFrom,
    ) -> Result<(), ErrorKind> {
        if from == ReplayFrom::Live {
            session
                .state
                .lock()
                .replaying
                .retain(|p| &**p != channel.as_str());
            return Ok(());
        }
        let concrete = self.concrete_channels(channel).await?;
        {
            let mut st = session.state.lock();
            let mut channels = std::collections::VecDeque::new();
            for name in concrete {
                match from {
                    ReplayFrom::After(after) => {
                        let key: Arc<str> = Arc::from(name.as_str());
                        let cursor = st.cursors.entry(key.clone()).or_insert(0);
                        *cursor = (*cursor).max(after);
                        // Where another node adopting the session resumes this replay.
                        st.note_start(&key, after);
                        st.delivered.entry(key).or_insert(after);
                        channels.push_back(name);
                    }
                    // An adopted session resumes each channel after its own cursor.
                    _ => {
                        if st.cursors.contains_key(name.as_str()) {
                            channels.push_back(name);
                        }
                    }
                }
            }
            st.backlog.push(session::Backlog {
                pattern: Arc::from(channel.as_str()),
                channels,
            });
        }
        self.refill(session).await
    }

    /// Stops replaying `pattern` (the history could not be read, or the subscription ended):
    /// its backlog is dropped and its gate opens.
    fn abandon_replay(&self, session: &Session, pattern: &str) {
        session
            .state
            .lock()
            .backlog
            .retain(|b| &*b.pattern != pattern);
        self.record_outcomes(
            session,
            session.finish_replay(
                pattern,
                self.config.limits.max_queue,
                self.config.limits.queue_overflow,
            ),
        );
    }

    /// The channels with a log that `channel` (a name or a pattern) covers, in name order.
    async fn concrete_channels(&self, channel: &ChannelName) -> Result<Vec<String>, ErrorKind> {
        if !channel.is_wildcard() {
            return Ok(vec![channel.to_string()]);
        }
        Ok(self
            .engine
            .channels()
            .await
            .map_err(storage_error)?
            .into_iter()
            .filter(|c| channel.matches(c))
            .collect())
    }

    /// Moves replayed history into the session's queue, a page at a time, as far as the queue
    /// has room. Called when a replay starts and whenever a connect drains the queue, so a
    /// replay of any length flows through a queue of `max_queue` without overflowing. When every
    /// channel of a replaying pattern has been read to its end (and no live message for it was
    /// dropped meanwhile), the pattern's gate opens and its deferred live messages follow.
    pub async fn refill(&self, session: &Arc<Session>) -> Result<(), ErrorKind> {
        if !session.has_backlog() {
            return Ok(());
        }
        // Boxed: callers await this in futures that live as long as a connection (a held
        // long-poll, an open WebSocket), and most calls find no backlog.
        Box::pin(self.refill_backlog(session)).await
    }

    async fn refill_backlog(&self, session: &Arc<Session>) -> Result<(), ErrorKind> {
        const PAGE: usize = 1024;
        let max = self.config.limits.max_queue;
        loop {
            let (pattern, next, budget) = {
                let st = session.state.lock();
                let Some(backlog) = st.backlog.first() else {
                    return Ok(());
                };
                let budget = max.saturating_sub(st.queue.len());
                let next = backlog.channels.front().map(|c| {
                    let after = st.cursors.get(c.as_str()).copied().unwrap_or(0);
                    (c.clone(), after)
                });
                (backlog.pattern.clone(), next, budget)
            };
            match next {
                Some((channel, after)) => {
                    if budget == 0 {
                        return Ok(());
                    }
                    let want = budget.min(PAGE);
                    let page = self
                        .engine
                        .read(&channel, after, want)
                        .await
                        .map_err(storage_error)?;
                    for stored in &page {
                        if !in_audience(session, audience(stored).as_ref()) {
                            // Not for this session; the cursor still moves past it.
                            let mut st = session.state.lock();
                            let cursor = st.cursors.entry(stored.channel.clone()).or_insert(0);
                            *cursor = (*cursor).max(stored.replay_id);
                            continue;
                        }
                        let delivery = Delivery {
                            origin: Some((stored.channel.clone(), stored.replay_id)),
                            bytes: delivery_bytes(stored),
                        };
                        self.enqueue(session, delivery, true);
                    }
                    if page.len() < want {
                        // This channel is read to its end.
                        let mut st = session.state.lock();
                        if let Some(b) = st.backlog.first_mut()
                            && b.pattern == pattern
                        {
                            b.channels.pop_front();
                        }
                    }
                }
                None => {
                    let dropped = session.state.lock().deferred_dropped.remove(&pattern);
                    if dropped {
                        // Live messages were dropped while the gate was closed: read the
                        // pattern's channels again, from where the session stands.
                        let channel =
                            ChannelName::new(&pattern).map_err(|_| ErrorKind::ChannelInvalid)?;
                        let concrete = self.concrete_channels(&channel).await?;
                        let mut st = session.state.lock();
                        if let Some(b) = st.backlog.first_mut() {
                            b.channels = concrete.into();
                        }
                        continue;
                    }
                    {
                        let mut st = session.state.lock();
                        if st.queue.len() + st.deferred.len() > max {
                            // Wait for room: the deferred messages must fit.
                            return Ok(());
                        }
                        st.backlog.remove(0);
                    }
                    self.record_outcomes(
                        session,
                        session.finish_replay(&pattern, max, self.config.limits.queue_overflow),
                    );
                }
            }
        }
    }

    fn unsubscribe(&self, message: &Message) -> Message {
        let (reply, session) = match self.subscription_request(message) {
            Ok(r) => r,
            Err(reply) => return reply,
        };
        let channels = match self.parse_subscription(message) {
            Ok(c) => c,
            Err(e) => return self.error_reply(reply, e),
        };
        let replaying: Vec<String> = {
            let mut st = session.state.lock();
            let mut index = self.index.write();
            for channel in &channels {
                if st.subscriptions.remove(channel.as_str()) {
                    index.remove(channel.as_str(), session.seq);
                }
            }
            channels
                .iter()
                .filter(|c| st.replaying.iter().any(|p| &**p == c.as_str()))
                .map(|c| c.to_string())
                .collect()
        };
        // A replay still reading history for an unsubscribed pattern stops.
        for pattern in replaying {
            self.abandon_replay(&session, &pattern);
        }
        reply.ok()
    }

    fn disconnect(&self, message: &Message) -> Message {
        let reply = message.reply();
        let Some(session) = message.client_id.as_deref().and_then(|c| self.session(c)) else {
            return self.unknown_session(reply, false);
        };
        self.remove_session(&session, CloseReason::Disconnected);
        reply.ok()
    }

    async fn publish(self: &Arc<Self>, request: &RequestInfo<'_>, message: &Message) -> Message {
        let reply = message.reply();
        if message.channel.is_empty() {
            return self.error_reply(reply, ErrorKind::ChannelMissing);
        }
        let Ok(channel) = ChannelName::new(&message.channel) else {
            return self.error_reply(reply, ErrorKind::ChannelInvalid);
        };
        if channel.kind() == ChannelKind::Meta {
            return self.error_reply(reply, ErrorKind::MetaChannelDenied);
        }
        if channel.is_wildcard() {
            return self.error_reply(reply, ErrorKind::ChannelInvalid);
        }
        // The clientId may be omitted on a publish (Bayeux 1.0); a wrong one is an error.
        let session = match message.client_id.as_deref() {
            Some(id) => match self.session(id) {
                Some(s) => {
                    s.touch();
                    Some(s)
                }
                None => return self.unknown_session(reply, false),
            },
            None => None,
        };
        if message.data.is_none() {
            return self.error_reply(reply, ErrorKind::DataMissing);
        }
        if let Err(denial) = self.policy.authorize(
            request,
            session.as_deref(),
            Operation::Publish(&channel),
            message,
        ) {
            return self.denied(reply, denial, None);
        }
        if channel.kind() == ChannelKind::Service {
            self.dispatch_service(&channel, session.as_ref(), message);
            return reply.ok();
        }
        match self.store(&channel, message).await {
            Ok(_) => reply.ok(),
            Err(e) => self.error_reply(reply, e),
        }
    }

    fn dispatch_service(
        self: &Arc<Self>,
        channel: &ChannelName,
        session: Option<&Arc<Session>>,
        message: &Message,
    ) {
        let handlers: Vec<ServiceHandler> = self
            .services
            .read()
            .iter()
            .filter(|(pattern, _)| pattern.matches(channel.as_str()))
            .map(|(_, h)| h.clone())
            .collect();
        for handler in handlers {
            handler(self, session, message);
        }
    }

    /// Serializes `message` once (without a replay ID) and appends it to its channel's log.
    async fn store(&self, channel: &ChannelName, message: &Message) -> Result<u64, ErrorKind> {
        self.store_with(channel, message, None).await
    }

    /// [`Broker::store`], limiting delivery to an audience (see [`AUDIENCE`]).
    async fn store_with(
        &self,
        channel: &ChannelName,
        message: &Message,
        audience: Option<Value>,
    ) -> Result<u64, ErrorKind> {
        let payload = Bytes::from(stored_bytes(channel.as_str(), message, audience.as_ref()));
        match self.engine.append(channel.as_str(), payload).await {
            Ok(stored) => {
                self.metrics.published.inc();
                Ok(stored.replay_id)
            }
            Err(e) => {
                tracing::error!(channel = %channel, error = %e, "append failed");
                Err(ErrorKind::StorageFailed)
            }
        }
    }

    /// Builds the delivered bytes of a stored message (once) and queues them for every
    /// matching session.
    fn fan_out(&self, stored: &Stored) {
        let targets = self.index.read().matching(&stored.channel);
        if targets.is_empty() {
            return;
        }
        let delivery = Delivery {
            origin: Some((stored.channel.clone(), stored.replay_id)),
            bytes: delivery_bytes(stored),
        };
        let audience = audience(stored);
        for session in targets {
            if in_audience(&session, audience.as_ref()) {
                self.enqueue(&session, delivery.clone(), false);
            }
        }
    }

    fn enqueue(&self, session: &Session, delivery: Delivery, bypass_gate: bool) -> Enqueued {
        let outcome = session.enqueue(
            delivery,
            self.config.limits.max_queue,
            self.config.limits.queue_overflow,
            bypass_gate,
        );
        self.record_outcomes(session, [outcome]);
        outcome
    }

    /// Counts overflows and ends sessions that overflowed under the `disconnect` policy.
    fn record_outcomes(&self, session: &Session, outcomes: impl IntoIterator<Item = Enqueued>) {
        for outcome in outcomes {
            match outcome {
                Enqueued::DroppedOldest => {
                    self.metrics.overflow_drop_oldest.inc();
                }
                Enqueued::Disconnected => {
                    self.metrics.overflow_disconnect.inc();
                    tracing::warn!(client_id = session.id(), "queue overflow: session ended");
                    if let Some(s) = self.session(session.id()) {
                        self.remove_session(&s, CloseReason::Overflow);
                    }
                }
                Enqueued::Ok
                | Enqueued::Closed
                | Enqueued::Duplicate
                | Enqueued::Deferred
                | Enqueued::Filtered => {}
            }
        }
    }

    /// Removes a session and everything it holds.
    pub fn remove_session(&self, session: &Arc<Session>, reason: CloseReason) {
        let removed = self.sessions.write().remove(session.id()).is_some();
        if !removed {
            return;
        }
        self.close_reasons.lock().insert(session.seq, reason);
        {
            let st = session.state.lock();
            let mut index = self.index.write();
            for pattern in &st.subscriptions {
                index.remove(pattern, session.seq);
            }
        }
        session.close();
        self.metrics.sessions.dec();
        if reason == CloseReason::Expired {
            self.metrics.sessions_expired.inc();
        }
    }

    /// Ends every session as if it had expired (their next request is told to handshake).
    pub fn expire_all(&self) -> usize {
        let all: Vec<Arc<Session>> = self.sessions.read().values().cloned().collect();
        for session in &all {
            self.remove_session(session, CloseReason::Expired);
        }
        all.len()
    }

    /// Ends every session with a server-sent `/meta/disconnect`: a held connect is answered with
    /// that message and advice to handshake again.
    pub fn disconnect_all(&self) -> usize {
        let all: Vec<Arc<Session>> = self.sessions.read().values().cloned().collect();
        for session in &all {
            let mut notice = Message::new(meta::DISCONNECT);
            notice.client_id = Some(session.id().to_owned());
            notice.successful = Some(true);
            notice.advice = Some(Advice::handshake());
            let bytes = Bytes::from(bayeux_protocol::encode_message(&notice));
            session.state.lock().queue.push_back(bytes);
            self.remove_session(session, CloseReason::ServerDisconnect);
        }
        all.len()
    }

    /// Fault injection: every connect held now or arriving within `duration` is never
    /// answered (its request stays open and silent); later connects work again.
    pub fn stall(&self, duration: Duration) {
        let now = Instant::now();
        *self.stall_window.lock() = Some((now, now + duration));
    }

    /// Did a stall overlap a connect held from `start` to now?
    pub fn stalled_since(&self, start: Instant) -> bool {
        match *self.stall_window.lock() {
            Some((from, until)) => start <= until && Instant::now() >= from,
            None => false,
        }
    }

    /// Why `session` closed, if it did.
    pub fn close_reason(&self, session: &Session) -> Option<CloseReason> {
        if !session.is_closed() {
            return None;
        }
        self.close_reasons.lock().get(&session.seq).copied()
    }

    fn sweep(&self) {
        let max_interval = self.config.timeouts.max_interval();
        let now = Instant::now();
        let expired: Vec<Arc<Session>> = self
            .sessions
            .read()
            .values()
            .filter(|s| {
                let st = s.state.lock();
                st.holds == 0 && now.saturating_duration_since(st.last_seen) > max_interval
            })
            .cloned()
            .collect();
        for session in expired {
            tracing::debug!(client_id = session.id(), "session expired");
            if self.shared {
                // Only this node's copy: the client may be served elsewhere now, or come back
                // within the record's life. Its cursors go into the record.
                self.release(&session);
            }
            self.remove_session(&session, CloseReason::Expired);
        }
        // Close reasons are needed only while a request may still look at the session.
        let live: std::collections::HashSet<u64> =
            self.sessions.read().values().map(|s| s.seq).collect();
        let mut reasons = self.close_reasons.lock();
        if reasons.len() > 1024 {
            reasons.retain(|seq, _| live.contains(seq));
        }
    }

    /// Marks `session` as held. With `supersede`, a long-poll connect already held for it is
    /// released (it gets [`HoldEnd::Superseded`]), and the returned receiver fires when a newer
    /// connect supersedes this one.
    pub fn begin_hold(
        &self,
        session: &Arc<Session>,
        supersede: bool,
    ) -> (Hold, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let generation = {
            let mut st = session.state.lock();
            st.holds += 1;
            st.hold_generation += 1;
            if supersede && let Some(older) = st.release_held.replace(tx) {
                let _ = older.send(());
            }
            st.hold_generation
        };
        self.metrics.held_connects.inc();
        (
            Hold {
                session: session.clone(),
                generation,
                broker_metrics: self.metrics.clone(),
            },
            rx,
        )
    }

    /// Holds a long-poll connect until messages arrive (plus the lazy delay), `timeout` passes,
    /// a newer connect supersedes it, the session ends or the server shuts down.
    pub async fn hold_connect(&self, session: &Arc<Session>, timeout: Duration) -> HoldEnd {
        let (_hold, mut released) = self.begin_hold(session, true);
        let deadline = Instant::now() + timeout;
        loop {
            let notified = session.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if session.is_closed() {
                return HoldEnd::Closed(self.close_reason(session).unwrap_or(CloseReason::Expired));
            }
            if session.has_queued() {
                break;
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline) => return HoldEnd::Timeout,
                _ = &mut released => return HoldEnd::Superseded,
                _ = self.stopped() => return HoldEnd::Shutdown,
            }
        }
        let lazy = self
            .config
            .timeouts
            .lazy_delay()
            .min(deadline.saturating_duration_since(Instant::now()));
        if !lazy.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(lazy) => {}
                _ = &mut released => return HoldEnd::Superseded,
            }
        }
        HoldEnd::Messages
    }

    /// Takes the session's queued messages to push outside a connect reply (WebSocket),
    /// counting them. With the ack extension messages go out only in connect replies, so this
    /// returns nothing.
    pub fn take_deliveries(&self, session: &Session) -> Vec<Bytes> {
        if session.ack_enabled() {
            return Vec::new();
        }
        let out: Vec<Bytes> = {
            let mut st = session.state.lock();
            if self.shared {
                st.mark_taken();
            }
            st.queue.drain(..).collect()
        };
        self.metrics.messages_out.inc_by(out.len() as u64);
        out
    }

    /// Takes what goes out with a connect reply. With the ack extension: every batch not yet
    /// acknowledged (oldest first), then the newly queued messages as a new batch, and
    /// `ext.ack` set to that batch's number on `reply`.
    pub fn take_for_connect(&self, session: &Session, reply: &mut Message) -> Vec<Bytes> {
        let mut st = session.state.lock();
        let before =
            (self.shared && st.ack.is_some() && !st.queue.is_empty()).then(|| st.delivered.clone());
        if self.shared {
            st.mark_taken();
        }
        let fresh: Vec<Bytes> = st.queue.drain(..).collect();
        let Some(ack) = st.ack.as_mut() else {
            drop(st);
            self.metrics.messages_out.inc_by(fresh.len() as u64);
            return fresh;
        };
        if !fresh.is_empty() {
            ack.batch += 1;
            let batch = ack.batch;
            ack.unacked.push_back((batch, fresh));
            if let Some(before) = before {
                ack.before.push_back((batch, before));
            }
        }
        reply.ext_insert("ack", Value::from(ack.batch));
        let out: Vec<Bytes> = ack
            .unacked
            .iter()
            .flat_map(|(_, messages)| messages.iter().cloned())
            .collect();
        drop(st);
        self.metrics.messages_out.inc_by(out.len() as u64);
        out
    }

    /// The reply for a connect whose session ended while it was held.
    pub fn closed_connect_reply(&self, mut reply: Message, reason: CloseReason) -> Message {
        match reason {
            CloseReason::Disconnected => {
                reply.advice = Some(Advice::none());
                reply
            }
            CloseReason::Expired | CloseReason::Overflow => {
                reply.client_id = None;
                self.unknown_session(reply, true)
            }
            CloseReason::ServerDisconnect => {
                reply.advice = Some(Advice::handshake());
                reply
            }
        }
    }
}

/// Subscribed channels, each with its PushTopic `Field=Value` conditions.
type Filtered = Vec<(ChannelName, Vec<(String, String)>)>;

fn storage_error(e: bayeux_engine::EngineError) -> ErrorKind {
    tracing::error!(error = %e, "history read failed");
    ErrorKind::StorageFailed
}

/// Where a subscribe starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplayFrom {
    /// New messages only (`-1`, or no replay extension).
    Live,
    /// Everything retained after this replay ID (`-2` is `After(0)`).
    After(u64),
    /// For an adopted session: each channel after the session's own cursor (channels without
    /// one are not replayed).
    Cursors,
}

/// Renders a replay map as Salesforce does in its error texts (a Java `Map.toString()`):
/// `{/a=1, /b=-1}`.
fn java_map(map: &Value) -> String {
    match map {
        Value::Object(m) => {
            let entries: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{k}={}", v.to_string().trim_matches('"')))
                .collect();
            format!("{{{}}}", entries.join(", "))
        }
        other => other.to_string(),
    }
}

/// The top-level field of a stored message that limits who receives it: `{"attribute": <session
/// attribute>, "values": [<strings>]}`. Only the server sets it
/// ([`Broker::publish_from_server_to`]); it is never delivered.
const AUDIENCE: &str = "__audience";

/// What a publish stores: the message's channel, id, data and ext, and the audience if any,
/// encoded as a [`Message`] holding only those would be, straight from the published message
/// (no copy of its values into a second message, and no drop of that copy, per publish).
fn stored_bytes(channel: &str, message: &Message, audience: Option<&Value>) -> Vec<u8> {
    struct View<'a> {
        channel: &'a str,
        message: &'a Message,
        audience: Option<&'a Value>,
    }
    impl serde::Serialize for View<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeMap;
            // The fields in the order of `Message`'s own serialization.
            let m = self.message;
            let mut map = s.serialize_map(None)?;
            map.serialize_entry("channel", self.channel)?;
            if let Some(id) = &m.id {
                map.serialize_entry("id", id)?;
            }
            if let Some(data) = &m.data {
                map.serialize_entry("data", data)?;
            }
            if let Some(ext) = &m.ext {
                map.serialize_entry("ext", ext)?;
            }
            if let Some(audience) = self.audience {
                map.serialize_entry(AUDIENCE, audience)?;
            }
            map.end()
        }
    }
    let view = View {
        channel,
        message,
        audience,
    };
    // Serializing JSON values into a Vec cannot fail.
    serde_json::to_vec(&view).expect("messages always serialize")
}

/// Who may receive a stored message: `None` for everyone.
fn audience(stored: &Stored) -> Option<(String, Vec<String>)> {
    let p = &stored.payload;
    if !p.windows(AUDIENCE.len()).any(|w| w == AUDIENCE.as_bytes()) {
        return None;
    }
    let message: Map<String, Value> = serde_json::from_slice(p).ok()?;
    let audience = message.get(AUDIENCE)?;
    let attribute = audience.get("attribute")?.as_str()?.to_owned();
    let values = audience
        .get("values")?
        .as_array()?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    Some((attribute, values))
}

/// Is `session` in `audience` (`None`: everyone)?
fn in_audience(session: &Session, audience: Option<&(String, Vec<String>)>) -> bool {
    let Some((attribute, values)) = audience else {
        return true;
    };
    session
        .attributes
        .lock()
        .get(attribute)
        .and_then(Value::as_str)
        .is_some_and(|v| values.iter().any(|x| x == v))
}

/// The delivered form of a stored message, built once per message and shared by every
/// subscriber. The replay ID goes into `data.event.replayId` when `data.event` is an object
/// (the shape of Salesforce events), and into `ext.replay` otherwise.
pub fn delivery_bytes(stored: &Stored) -> Bytes {
    let p = &stored.payload;
    let maybe_special = p
        .windows(5)
        .any(|w| w == b"\"ext\"" || w == b"event" || w == b"__aud");
    if !maybe_special && p.len() >= 2 && p.last() == Some(&b'}') {
        // Fast path: splice `"ext":{"replay":N}` before the closing brace.
        let mut out = Vec::with_capacity(p.len() + 32);
        out.extend_from_slice(&p[..p.len() - 1]);
        if p.len() > 2 {
            out.push(b',');
        }
        out.extend_from_slice(b"\"ext\":{\"replay\":");
        out.extend_from_slice(stored.replay_id.to_string().as_bytes());
        out.extend_from_slice(b"}}");
        return Bytes::from(out);
    }
    match serde_json::from_slice::<Map<String, Value>>(p) {
        Ok(mut object) => {
            // The audience is for the broker only.
            object.remove(AUDIENCE);
            if let Some(Value::Object(event)) = object
                .get_mut("data")
                .and_then(|d| d.as_object_mut())
                .and_then(|d| d.get_mut("event"))
            {
                event.insert("replayId".into(), Value::from(stored.replay_id));
                return Bytes::from(serde_json::to_vec(&object).expect("json"));
            }
            let ext = object
                .entry("ext")
                .or_insert_with(|| Value::Object(Map::new()));
            if !ext.is_object() {
                *ext = Value::Object(Map::new());
            }
            if let Value::Object(ext) = ext {
                ext.insert("replay".into(), Value::from(stored.replay_id));
            }
            Bytes::from(serde_json::to_vec(&object).expect("json"))
        }
        Err(_) => p.clone(),
    }
}

/// A broker with the default configuration, the memory engine and no policy, for unit tests.
#[cfg(test)]
pub(crate) fn test_broker() -> Arc<Broker> {
    Broker::new(
        ServerConfig::default(),
        Arc::new(bayeux_engine::memory::MemoryEngine::new(Default::default())),
        Arc::new(crate::policy::AllowAll),
        Dialect::Cometd,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stored(payload: &str) -> Stored {
        Stored {
            channel: Arc::from("/a"),
            replay_id: 42,
            timestamp_ms: 0,
            payload: Bytes::from(payload.to_owned()),
        }
    }

    #[test]
    fn replay_id_is_added_once() {
        let v = |s: &str| serde_json::from_slice::<Value>(&delivery_bytes(&stored(s))).unwrap();
        assert_eq!(
            v(r#"{"channel":"/a","data":1}"#),
            json!({"channel":"/a","data":1,"ext":{"replay":42}})
        );
        assert_eq!(
            v(r#"{"channel":"/a","data":1,"ext":{"x":true}}"#),
            json!({"channel":"/a","data":1,"ext":{"x":true,"replay":42}})
        );
        assert_eq!(
            v(r#"{"channel":"/a","data":"\"ext\""}"#),
            json!({"channel":"/a","data":"\"ext\"","ext":{"replay":42}})
        );
        assert_eq!(
            v(r#"{"channel":"/a","ext":5,"data":1}"#),
            json!({"channel":"/a","data":1,"ext":{"replay":42}})
        );
    }

    /// What a publish stores is the `Message` of its channel, id, data and ext (and audience),
    /// byte for byte, without building that message.
    #[test]
    fn stored_bytes_are_the_message_of_its_fields() {
        let published: Message = serde_json::from_value(json!({
            "channel": "/a/b", "clientId": "c1", "id": "7",
            "data": {"z": 1, "a": [true, null], "s": "\"quoted\" \u{e9}"},
            "ext": {"x": {"y": 2}}, "advice": {"timeout": 0}, "other": 3
        }))
        .unwrap();
        let audience = json!({"attribute": "role", "values": ["admin"]});
        for (message, audience) in [
            (published.clone(), None),
            (published.clone(), Some(&audience)),
            (
                Message {
                    channel: "/a/b".into(),
                    ..Message::default()
                },
                None,
            ),
        ] {
            let mut expected = Message {
                channel: "/a/b".into(),
                id: message.id.clone(),
                data: message.data.clone(),
                ext: message.ext.clone(),
                ..Message::default()
            };
            if let Some(a) = audience {
                expected.other.insert(AUDIENCE.into(), a.clone());
            }
            assert_eq!(
                stored_bytes("/a/b", &message, audience),
                bayeux_protocol::encode_message(&expected)
            );
        }
    }

    #[test]
    fn client_ids_are_128_bit_base36() {
        let a = new_client_id();
        assert_eq!(a.len(), 25);
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(a, new_client_id());
    }
}
