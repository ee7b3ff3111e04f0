//! The protocol state machine: a plain struct, messages and timer events in, actions out. It
//! owns no socket, no task and no clock: the caller passes the time, performs the actions
//! (send, sleep, fetch a token, deliver) and feeds back what happened. That is what lets every
//! advice and error variant be unit-tested without a network (as rumqttc's `state.rs`).
//!
//! What it decides:
//! - **Advice.** `retry` → connect again after `interval`; `handshake` → handshake again, then
//!   re-subscribe everything with the replay map of the last IDs seen; `none` → re-authenticate
//!   when there is a token provider, else give up. Advice is kept until new advice replaces it,
//!   and reset before each handshake.
//! - **Auth failures.** `401`/`403` in `error` or in `ext.sfdc.failureReason` of a handshake or
//!   connect reply, and HTTP 401, → re-authenticate, handshake, re-subscribe.
//! - **Unknown sessions** (`402::session_unknown`, `403::Unknown client`: advice `handshake`)
//!   → handshake and re-subscribe.
//! - **Busy servers** (`503` in `error` or `failureReason`) and transport failures → retry
//!   after an exponential backoff with jitter.
//! - **Stalls.** A connect that misses its deadline is retried; repeated stalls escalate to a
//!   handshake ([`Watchdog`]).
//! - **Replay.** Every subscribe carries the whole replay map; a refused replay ID falls back
//!   per [`ReplayFallback`]; deliveries are de-duplicated by replay ID per channel, so the
//!   seam of a resubscription repeats nothing.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bayeux_protocol::error::error_code;
use bayeux_protocol::{
    Advice, ChannelName, Message, Reconnect, Subscription, connection_type, meta,
};
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use crate::backoff::{Backoff, BackoffPolicy};
use crate::events::Event;
use crate::ext::Extension;
use crate::ext::replay::{NEW, ReplayFallback, invalid_replay_id, replay_id_of};
use crate::watchdog::{StallAction, Watchdog};

/// The transports a client may use, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportKind {
    /// WebSocket when the handshake reply offers it, else long-polling; falls back to
    /// long-polling when a WebSocket cannot be opened.
    #[default]
    Auto,
    /// HTTP long-polling only.
    LongPolling,
    /// WebSocket only.
    WebSocket,
}

/// What the state machine needs to know of the client's options.
#[derive(Debug, Clone)]
pub struct Config {
    /// Which transports to offer and use.
    pub transport: TransportKind,
    /// A token provider is configured: auth failures re-authenticate instead of giving up.
    pub has_token_provider: bool,
    /// Ask for the replay extension in the handshake.
    pub replay: bool,
    /// What to do when the server refuses a replay ID.
    pub replay_fallback: ReplayFallback,
    /// Retry spacing.
    pub backoff: BackoffPolicy,
    /// Seed for the backoff jitter (tests); random when `None`.
    pub seed: Option<u64>,
    /// How long beyond the server's `advice.timeout` a connect may take.
    pub network_allowance: Duration,
    /// Consecutive stalled connects before a fresh handshake.
    pub max_stalls: u32,
    /// The server's connect timeout assumed until advice says otherwise.
    pub default_server_timeout: Duration,
    /// Give up after this many consecutive failures (`None`: never).
    pub give_up_after: Option<u32>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            transport: TransportKind::Auto,
            has_token_provider: false,
            replay: true,
            replay_fallback: ReplayFallback::All,
            backoff: BackoffPolicy::default(),
            seed: None,
            network_allowance: Duration::from_secs(10),
            max_stalls: 2,
            default_server_timeout: Duration::from_secs(30),
            give_up_after: None,
        }
    }
}

/// How a request failed below the Bayeux level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// HTTP 401.
    Unauthorized,
    /// Another HTTP status than 200.
    Status(u16),
    /// The body is not Bayeux JSON.
    Invalid(String),
    /// The body is larger than allowed.
    TooLarge,
    /// No answer in time.
    Timeout,
    /// Connection refused, reset or closed.
    Io(String),
    /// An answer came but held no reply to this message.
    NoReply,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Unauthorized => f.write_str("HTTP 401"),
            Failure::Status(s) => write!(f, "HTTP {s}"),
            Failure::Invalid(e) => write!(f, "invalid reply: {e}"),
            Failure::TooLarge => f.write_str("reply too large"),
            Failure::Timeout => f.write_str("timed out"),
            Failure::Io(e) => write!(f, "connection failed: {e}"),
            Failure::NoReply => f.write_str("no reply in the response"),
        }
    }
}

/// Something that happened, fed to [`State::handle`].
#[derive(Debug, Clone)]
pub enum Input {
    /// Begin: authenticate (with a token provider) or handshake.
    Start,
    /// The answer to one HTTP request that carried the messages with ids `sent`. Ids left
    /// without a reply count as failed with [`Failure::NoReply`].
    Response {
        /// Ids of the messages in the request.
        sent: Vec<String>,
        /// What came back.
        messages: Vec<Message>,
    },
    /// Messages that arrived on their own (a WebSocket frame).
    Messages(Vec<Message>),
    /// The requests carrying these message ids failed.
    SendFailed {
        /// Message ids.
        ids: Vec<String>,
        /// Why.
        failure: Failure,
    },
    /// The connect with this id missed its deadline and was aborted.
    ConnectStalled {
        /// Its message id.
        id: String,
    },
    /// The WebSocket could not be opened.
    TransportUnavailable,
    /// The timer armed by [`Action::Sleep`] with this token fired.
    Wake(u64),
    /// The token provider answered (`Err` holds its error text).
    Token(Result<(), String>),
    /// The application subscribes `channel`, starting at replay ID `replay` (`-1`, `-2`, `N`).
    Subscribe {
        /// The channel (validated).
        channel: String,
        /// Where to start.
        replay: i64,
    },
    /// The application no longer wants `channel`.
    Unsubscribe {
        /// The channel.
        channel: String,
    },
    /// The application publishes; `ticket` identifies the answer.
    Publish {
        /// Caller's ticket, echoed in [`Action::Published`].
        ticket: u64,
        /// The channel.
        channel: String,
        /// The payload.
        data: Value,
    },
    /// The application disconnects.
    Disconnect,
}

/// What the caller must do, returned by [`State::handle`] in order.
#[derive(Debug, Clone)]
pub enum Action {
    /// Send the handshake (alone in its request).
    SendHandshake(Message),
    /// Send a connect; abort it if it has not answered within `deadline`
    /// (then feed [`Input::ConnectStalled`]).
    SendConnect {
        /// The message.
        message: Message,
        /// The watchdog deadline: the advised timeout plus the network allowance.
        deadline: Duration,
    },
    /// Send a subscribe (it carries the replay map of every subscription).
    Subscribe(Message),
    /// Send another message (unsubscribe, publish, disconnect).
    Send(Message),
    /// Arm a timer; feed [`Input::Wake`] with `token` when it fires.
    Sleep {
        /// How long.
        duration: Duration,
        /// Which timer.
        token: u64,
    },
    /// Ask the token provider for a fresh token; feed [`Input::Token`].
    Reauthenticate,
    /// Use this connection type from now on.
    UseTransport(&'static str),
    /// Hand a message to the application's subscriptions (already de-duplicated).
    Deliver(Message),
    /// A subscribe the application asked for is settled.
    Subscribed {
        /// The channel.
        channel: String,
        /// `Err` holds the server's error.
        result: Result<(), String>,
    },
    /// A subscription ended (refused on re-subscribe): close the application's streams.
    SubscriptionEnded {
        /// The channel.
        channel: String,
    },
    /// A publish is settled.
    Published {
        /// The caller's ticket.
        ticket: u64,
        /// The ack, or the error.
        result: Result<Message, String>,
    },
    /// Report a state change.
    Event(Event),
    /// Stop: the client is done (disconnected or gave up).
    Close,
}

/// Where the state machine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not started.
    Idle,
    /// Waiting for a token.
    Authenticating,
    /// Handshake sent, or about to be after a delay.
    Handshaking,
    /// Handshaken: the connect loop runs.
    Connected,
    /// Disconnect sent.
    Disconnecting,
    /// Finished.
    Closed,
}

/// What a message id in flight was.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    Handshake,
    Connect,
    Subscribe(String),
    Unsubscribe,
    Publish(u64),
    Disconnect,
}

/// What a timer does when it fires.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Authenticate,
    Handshake,
    Connect,
    Subscribe(String),
}

impl Step {
    /// The steps of the main loop (only one may be armed at a time).
    fn is_main(&self) -> bool {
        !matches!(self, Step::Subscribe(_))
    }
}

#[derive(Debug, Clone)]
struct Sub {
    /// Where to start while nothing has been delivered: what the application asked for, or,
    /// for a live (`-1`) start, the last replay ID the server said the channel had then.
    initial: i64,
    /// Replaces the computed position once (after a refused replay ID).
    fallback: Option<i64>,
    /// The server confirmed it in the current session.
    confirmed: bool,
    /// The application is waiting for [`Action::Subscribed`].
    awaited: bool,
    /// Sent in a session that replaced an earlier one: report [`Event::Resumed`].
    resuming: bool,
    /// Confirmed in some session.
    ever_confirmed: bool,
}

/// The protocol state machine. See the module documentation.
pub struct State {
    config: Config,
    extensions: Vec<Box<dyn Extension>>,
    phase: Phase,
    client_id: Option<String>,
    advice: Advice,
    /// The advice of the failed reply being handled.
    reply_advice: Option<Advice>,
    connection_type: &'static str,
    websocket_broken: bool,
    server_replay: bool,
    next_id: u64,
    pending: HashMap<String, Pending>,
    connect_id: Option<String>,
    /// The connect in flight may be held by the server (it did not ask for `timeout: 0`).
    connect_held: bool,
    /// Not yet connected since the handshake or a failure: the next connect asks the server to
    /// answer at once (`advice.timeout: 0`).
    unconnected: bool,
    /// Successful handshakes so far.
    sessions: u32,
    /// No connect has succeeded yet in the current session.
    fresh_session: bool,
    reauthenticating: bool,
    subs: BTreeMap<String, Sub>,
    /// The last replay ID delivered, per concrete channel.
    seen: HashMap<String, i64>,
    outbox: Vec<(u64, Message)>,
    backoff: Backoff,
    failures: u32,
    auth_failures: u32,
    watchdog: Watchdog,
    timers: HashMap<u64, Step>,
    next_timer: u64,
    last_connected: Option<Instant>,
    out: Vec<Action>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("phase", &self.phase)
            .field("client_id", &self.client_id)
            .field("connection_type", &self.connection_type)
            .field("subscriptions", &self.subs.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn error_of(message: &Message) -> String {
    message
        .error
        .clone()
        .unwrap_or_else(|| "no error given".into())
}

/// `ext.sfdc.failureReason`, if any.
fn failure_reason(message: &Message) -> Option<&str> {
    message.ext_get("sfdc")?.get("failureReason")?.as_str()
}

fn is_busy(message: &Message) -> bool {
    let code = |s: Option<&str>| s.and_then(error_code);
    code(message.error.as_deref()) == Some(503) || code(failure_reason(message)) == Some(503)
}

fn is_auth_error(message: &Message) -> bool {
    let auth = |s: Option<&str>| matches!(s.and_then(error_code), Some(401 | 403));
    auth(message.error.as_deref()) || auth(failure_reason(message))
}

/// The unknown-session texts of CometD 5+, CometD 4, CometD 2–3, Faye and Salesforce. Used only
/// where a reply carries no advice (subscribe, publish); meta replies are decided on advice.
fn is_unknown_session(message: &Message) -> bool {
    message.error.as_deref().is_some_and(|e| {
        e.ends_with("session_unknown")
            || e.ends_with("unknown_session")
            || e.ends_with("Unknown client")
    })
}

impl State {
    /// A state machine with `config` and these extensions (run in order on every message).
    pub fn new(config: Config, extensions: Vec<Box<dyn Extension>>) -> Self {
        let connection_type = match config.transport {
            TransportKind::WebSocket => connection_type::WEBSOCKET,
            _ => connection_type::LONG_POLLING,
        };
        State {
            backoff: Backoff::new(config.backoff, config.seed),
            watchdog: Watchdog::new(config.network_allowance, config.max_stalls),
            config,
            extensions,
            phase: Phase::Idle,
            client_id: None,
            advice: Advice::default(),
            reply_advice: None,
            connection_type,
            websocket_broken: false,
            server_replay: false,
            next_id: 0,
            pending: HashMap::new(),
            connect_id: None,
            connect_held: false,
            unconnected: true,
            sessions: 0,
            fresh_session: false,
            reauthenticating: false,
            subs: BTreeMap::new(),
            seen: HashMap::new(),
            outbox: Vec::new(),
            failures: 0,
            auth_failures: 0,
            timers: HashMap::new(),
            next_timer: 0,
            last_connected: None,
            out: Vec::new(),
        }
    }

    /// Where the machine is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The session, once handshaken.
    pub fn client_id(&self) -> Option<&str> {
        self.client_id.as_deref()
    }

    /// The connection type in use.
    pub fn connection_type(&self) -> &'static str {
        self.connection_type
    }

    /// The advice in force.
    pub fn advice(&self) -> &Advice {
        &self.advice
    }

    /// The channels subscribed (or being subscribed).
    pub fn subscriptions(&self) -> impl Iterator<Item = &str> {
        self.subs.keys().map(String::as_str)
    }

    /// The last replay ID delivered on `channel`.
    pub fn last_seen(&self, channel: &str) -> Option<i64> {
        self.seen.get(channel).copied()
    }

    /// Where a subscribe to `channel` would start now.
    pub fn replay_position(&self, channel: &str) -> Option<i64> {
        let sub = self.subs.get(channel)?;
        if let Some(f) = sub.fallback {
            return Some(f);
        }
        let seen = match ChannelName::new(channel) {
            Ok(name) if name.is_wildcard() => self
                .seen
                .iter()
                .filter(|(c, _)| name.matches(c))
                .map(|(_, id)| *id)
                .min(),
            _ => self.seen.get(channel).copied(),
        };
        Some(seen.unwrap_or(sub.initial))
    }

    /// Feeds one input at time `now` and returns what to do, in order.
    pub fn handle(&mut self, input: Input, now: Instant) -> Vec<Action> {
        if self.phase == Phase::Closed {
            // Settle what the application may still wait for, nothing else.
            match input {
                Input::Publish { ticket, .. } => self.out.push(Action::Published {
                    ticket,
                    result: Err("client closed".into()),
                }),
                Input::Subscribe { channel, .. } => self.out.push(Action::Subscribed {
                    channel,
                    result: Err("client closed".into()),
                }),
                _ => {}
            }
            return std::mem::take(&mut self.out);
        }
        match input {
            Input::Start => {
                if self.phase == Phase::Idle {
                    if self.config.has_token_provider {
                        self.phase = Phase::Authenticating;
                        self.out.push(Action::Reauthenticate);
                    } else {
                        self.send_handshake();
                    }
                }
            }
            Input::Response { sent, messages } => {
                self.on_messages(messages, now);
                for id in sent {
                    if self.pending.contains_key(&id) {
                        self.on_failed(&id, Failure::NoReply, now);
                    }
                }
            }
            Input::Messages(messages) => self.on_messages(messages, now),
            Input::SendFailed { ids, failure } => {
                for id in ids {
                    self.on_failed(&id, failure.clone(), now);
                }
            }
            Input::ConnectStalled { id } => self.on_stalled(&id),
            Input::TransportUnavailable => {
                if self.config.transport == TransportKind::Auto
                    && self.connection_type == connection_type::WEBSOCKET
                {
                    self.websocket_broken = true;
                    self.use_transport(connection_type::LONG_POLLING);
                }
            }
            Input::Wake(token) => {
                if let Some(step) = self.timers.remove(&token) {
                    self.run_step(step);
                }
            }
            Input::Token(result) => self.on_token(result),
            Input::Subscribe { channel, replay } => self.on_subscribe(channel, replay),
            Input::Unsubscribe { channel } => self.on_unsubscribe(channel),
            Input::Publish {
                ticket,
                channel,
                data,
            } => {
                let mut m = Message::new(channel);
                m.data = Some(data);
                if self.phase == Phase::Connected && self.client_id.is_some() {
                    self.send_publish(ticket, m);
                } else {
                    self.outbox.push((ticket, m));
                }
            }
            Input::Disconnect => self.on_disconnect(),
        }
        std::mem::take(&mut self.out)
    }

    fn id(&mut self) -> String {
        self.next_id += 1;
        self.next_id.to_string()
    }

    fn outgoing(&mut self, message: &mut Message) {
        for ext in &mut self.extensions {
            ext.outgoing(message);
        }
    }

    fn event(&mut self, event: Event) {
        self.out.push(Action::Event(event));
    }

    fn use_transport(&mut self, t: &'static str) {
        if self.connection_type != t {
            self.connection_type = t;
            self.out.push(Action::UseTransport(t));
            self.event(Event::TransportChanged {
                transport: t.to_owned(),
            });
        }
    }

    /// Arms a timer for `step`; a main-loop step replaces any other main-loop step.
    fn schedule(&mut self, step: Step, delay: Duration) {
        if step.is_main() {
            self.timers.retain(|_, s| !s.is_main());
        }
        if delay.is_zero() {
            self.run_step(step);
            return;
        }
        self.next_timer += 1;
        let token = self.next_timer;
        self.timers.insert(token, step);
        self.out.push(Action::Sleep {
            duration: delay,
            token,
        });
    }

    fn run_step(&mut self, step: Step) {
        match step {
            Step::Authenticate => {
                self.phase = Phase::Authenticating;
                self.out.push(Action::Reauthenticate);
            }
            Step::Handshake => self.send_handshake(),
            Step::Connect => {
                if self.phase == Phase::Connected {
                    self.send_connect();
                }
            }
            Step::Subscribe(channel) => {
                if self.phase == Phase::Connected
                    && self.subs.get(&channel).is_some_and(|s| !s.confirmed)
                    && !self
                        .pending
                        .values()
                        .any(|p| *p == Pending::Subscribe(channel.clone()))
                {
                    self.send_subscribe(&channel);
                }
            }
        }
    }

    /// Counts a failure; `None` when the client gives up.
    fn failure_delay(&mut self, advised: Duration, force_backoff: bool) -> Option<Duration> {
        self.failures += 1;
        if let Some(max) = self.config.give_up_after
            && self.failures > max
        {
            self.give_up(format!("{} consecutive failures", self.failures - 1));
            return None;
        }
        // The first failure retries as advised; repeated ones back off.
        let backoff = if force_backoff || self.failures > 1 {
            self.backoff.next_delay()
        } else {
            Duration::ZERO
        };
        Some(advised.max(backoff))
    }

    /// The interval to wait: the advice of the failed reply at hand when it has one (advice on
    /// a failure steers that retry only and is not kept), else the advice in force.
    fn advised_interval(&self) -> Duration {
        let interval = self
            .reply_advice
            .as_ref()
            .and_then(|a| a.interval)
            .or(self.advice.interval);
        Duration::from_millis(interval.unwrap_or(0).max(0) as u64)
    }

    fn give_up(&mut self, reason: String) {
        tracing::warn!(%reason, "bayeux client gives up");
        self.phase = Phase::Closed;
        self.timers.clear();
        self.event(Event::GaveUp { reason });
        self.fail_waiting("client gave up");
        self.out.push(Action::Close);
    }

    /// Settles everything the application is waiting for.
    fn fail_waiting(&mut self, why: &str) {
        for (ticket, _) in std::mem::take(&mut self.outbox) {
            self.out.push(Action::Published {
                ticket,
                result: Err(why.into()),
            });
        }
        let publishes: Vec<u64> = self
            .pending
            .values()
            .filter_map(|p| match p {
                Pending::Publish(t) => Some(*t),
                _ => None,
            })
            .collect();
        for ticket in publishes {
            self.out.push(Action::Published {
                ticket,
                result: Err(why.into()),
            });
        }
        self.pending.clear();
        let awaited: Vec<String> = self
            .subs
            .iter()
            .filter(|(_, s)| s.awaited)
            .map(|(c, _)| c.clone())
            .collect();
        for channel in awaited {
            self.out.push(Action::Subscribed {
                channel,
                result: Err(why.into()),
            });
        }
    }

    // ----- handshake -----

    fn send_handshake(&mut self) {
        // Old advice must not steer the new session (cometd/cometd#722).
        self.advice = Advice::default();
        self.client_id = None;
        self.connect_id = None;
        self.unconnected = true;
        self.pending
            .retain(|_, p| matches!(p, Pending::Publish(_) | Pending::Disconnect));
        for sub in self.subs.values_mut() {
            sub.confirmed = false;
        }
        if self.connection_type == connection_type::WEBSOCKET
            && self.config.transport == TransportKind::Auto
        {
            // Handshakes go over HTTP; the reply says whether WebSocket is on offer.
            self.connection_type = connection_type::LONG_POLLING;
            self.out
                .push(Action::UseTransport(connection_type::LONG_POLLING));
        }
        let mut m = Message::new(meta::HANDSHAKE);
        let id = self.id();
        m.id = Some(Value::String(id.clone()));
        m.version = Some(bayeux_protocol::VERSION.into());
        m.minimum_version = Some(bayeux_protocol::VERSION.into());
        m.supported_connection_types = Some(match self.config.transport {
            TransportKind::Auto => vec![
                connection_type::WEBSOCKET.into(),
                connection_type::LONG_POLLING.into(),
            ],
            TransportKind::LongPolling => vec![connection_type::LONG_POLLING.into()],
            TransportKind::WebSocket => vec![connection_type::WEBSOCKET.into()],
        });
        if self.config.replay {
            m.ext_insert("replay", Value::Bool(true));
        }
        self.outgoing(&mut m);
        self.pending.insert(id, Pending::Handshake);
        self.phase = Phase::Handshaking;
        self.out.push(Action::SendHandshake(m));
    }

    fn on_handshake_reply(&mut self, reply: Message) {
        let expected = match reply.id.as_ref().and_then(id_string) {
            Some(id) if self.pending.get(&id) == Some(&Pending::Handshake) => {
                self.pending.remove(&id);
                true
            }
            Some(_) => false,
            // A server that does not echo ids: any handshake in flight is the one.
            None => {
                let before = self.pending.len();
                self.pending.retain(|_, p| *p != Pending::Handshake);
                before != self.pending.len()
            }
        };
        if !expected {
            tracing::debug!("ignoring a handshake reply nobody waits for");
            return;
        }
        if reply.successful == Some(true)
            && let Some(advice) = &reply.advice
        {
            merge_advice(&mut self.advice, advice);
        }
        self.reply_advice = reply
            .advice
            .clone()
            .filter(|_| reply.successful != Some(true));
        match (reply.successful, reply.client_id.clone()) {
            (Some(true), Some(client_id)) if !client_id.is_empty() => {
                self.handshake_succeeded(reply, client_id)
            }
            (Some(true), _) => {
                self.handshake_failed_transiently("handshake reply without clientId".into(), false)
            }
            (Some(false), _) => {
                let error = error_of(&reply);
                let reason = match failure_reason(&reply) {
                    Some(r) => format!("{error} ({r})"),
                    None => error,
                };
                if is_busy(&reply) {
                    self.handshake_failed_transiently(reason, true);
                } else if reply.advice.as_ref().and_then(|a| a.reconnect) == Some(Reconnect::None)
                    || is_auth_error(&reply)
                {
                    self.auth_failure(reason);
                } else {
                    self.handshake_failed_transiently(reason, false);
                }
            }
            (None, _) => self
                .handshake_failed_transiently("handshake reply without `successful`".into(), false),
        }
    }

    fn handshake_succeeded(&mut self, reply: Message, client_id: String) {
        self.client_id = Some(client_id);
        self.sessions += 1;
        self.fresh_session = true;
        self.phase = Phase::Connected;
        self.server_replay =
            self.config.replay && reply.ext_get("replay") == Some(&Value::Bool(true));
        let offered = reply.supported_connection_types.clone().unwrap_or_default();
        let wanted = match self.config.transport {
            TransportKind::Auto
                if !self.websocket_broken
                    && offered.iter().any(|t| t == connection_type::WEBSOCKET) =>
            {
                connection_type::WEBSOCKET
            }
            TransportKind::WebSocket => connection_type::WEBSOCKET,
            _ => connection_type::LONG_POLLING,
        };
        if self.connection_type != wanted {
            self.connection_type = wanted;
            self.out.push(Action::UseTransport(wanted));
        }
        // The first connect, then every subscription, then what the application published
        // meanwhile.
        self.send_connect();
        let channels: Vec<String> = self.subs.keys().cloned().collect();
        for channel in channels {
            if let Some(sub) = self.subs.get_mut(&channel) {
                sub.resuming = sub.ever_confirmed;
            }
            self.send_subscribe(&channel);
        }
        for (ticket, m) in std::mem::take(&mut self.outbox) {
            self.send_publish(ticket, m);
        }
    }

    fn handshake_failed_transiently(&mut self, reason: String, busy: bool) {
        self.phase = Phase::Handshaking;
        let advised = self.advised_interval();
        if let Some(delay) = self.failure_delay(advised, busy) {
            self.event(Event::Reconnecting {
                reason,
                handshake: true,
                attempt: self.failures,
                delay,
            });
            self.schedule(Step::Handshake, delay);
        }
    }

    /// The server refused our credentials: get a fresh token and start over, or give up.
    fn auth_failure(&mut self, reason: String) {
        self.client_id = None;
        self.connect_id = None;
        self.pending
            .retain(|_, p| matches!(p, Pending::Publish(_) | Pending::Disconnect));
        if !self.config.has_token_provider {
            self.give_up(format!("{reason}; no token provider to re-authenticate"));
            return;
        }
        self.reauthenticating = true;
        self.phase = Phase::Authenticating;
        // Re-authenticate at once the first time; if the fresh token fails too, back off.
        self.auth_failures += 1;
        let delay = if self.auth_failures > 1 {
            match self.failure_delay(Duration::ZERO, true) {
                Some(d) => d,
                None => return,
            }
        } else {
            Duration::ZERO
        };
        self.event(Event::Reconnecting {
            reason,
            handshake: true,
            attempt: self.auth_failures,
            delay,
        });
        self.schedule(Step::Authenticate, delay);
    }

    fn on_token(&mut self, result: Result<(), String>) {
        if self.phase != Phase::Authenticating {
            return;
        }
        match result {
            Ok(()) => {
                if std::mem::take(&mut self.reauthenticating) {
                    self.event(Event::Reauthenticated);
                }
                self.send_handshake();
            }
            Err(error) => {
                let Some(delay) = self.failure_delay(Duration::ZERO, true) else {
                    return;
                };
                self.event(Event::AuthFailed {
                    error,
                    attempt: self.failures,
                    retry_in: delay,
                });
                self.schedule(Step::Authenticate, delay);
            }
        }
    }

    /// The session is gone: handshake again (after `delay`) and re-subscribe.
    fn rehandshake(&mut self, reason: String, delay: Duration) {
        self.client_id = None;
        self.connect_id = None;
        self.phase = Phase::Handshaking;
        self.pending
            .retain(|_, p| matches!(p, Pending::Publish(_) | Pending::Disconnect));
        self.event(Event::Reconnecting {
            reason,
            handshake: true,
            attempt: self.failures,
            delay,
        });
        self.schedule(Step::Handshake, delay);
    }

    // ----- connect -----

    fn send_connect(&mut self) {
        let Some(client_id) = self.client_id.clone() else {
            return;
        };
        if self.connect_id.is_some() {
            return;
        }
        let mut m = Message::new(meta::CONNECT);
        let id = self.id();
        m.id = Some(Value::String(id.clone()));
        m.client_id = Some(client_id);
        m.connection_type = Some(self.connection_type.into());
        let held = if self.unconnected {
            // Answer at once: the first connect, and the first after a failure.
            m.advice = Some(Advice {
                timeout: Some(0),
                ..Advice::default()
            });
            Duration::ZERO
        } else {
            self.advice
                .timeout
                .filter(|t| *t >= 0)
                .map(|t| Duration::from_millis(t as u64))
                .unwrap_or(self.config.default_server_timeout)
        };
        self.outgoing(&mut m);
        self.pending.insert(id.clone(), Pending::Connect);
        self.connect_held = !held.is_zero();
        self.connect_id = Some(id);
        self.out.push(Action::SendConnect {
            message: m,
            deadline: self.watchdog.deadline(held),
        });
    }

    /// Takes the pending connect matching a reply's id (or the only one, when the server did
    /// not echo ids). False for a stale reply.
    fn take_connect(&mut self, reply_id: Option<String>) -> bool {
        let Some(current) = self.connect_id.clone() else {
            return false;
        };
        match reply_id {
            Some(id) if id != current => false,
            _ => {
                self.pending.remove(&current);
                self.connect_id = None;
                true
            }
        }
    }

    fn on_connect_reply(&mut self, reply: Message, now: Instant) {
        if !self.take_connect(reply.id.as_ref().and_then(id_string)) {
            tracing::debug!("ignoring a stale connect reply");
            return;
        }
        if self.phase != Phase::Connected {
            return;
        }
        if reply.successful == Some(true)
            && let Some(advice) = &reply.advice
        {
            merge_advice(&mut self.advice, advice);
        }
        self.reply_advice = reply
            .advice
            .clone()
            .filter(|_| reply.successful != Some(true));
        let reconnect = reply.advice.as_ref().and_then(|a| a.reconnect);
        match reply.successful {
            Some(true) => {
                // Only a held connect that answered proves the session healthy: a server that
                // answers quick polls but never a held one must still escalate.
                if std::mem::take(&mut self.connect_held) {
                    self.watchdog.on_answer();
                }
                self.failures = 0;
                self.auth_failures = 0;
                self.backoff.reset();
                self.last_connected = Some(now);
                if std::mem::replace(&mut self.unconnected, false) {
                    let fresh = std::mem::take(&mut self.fresh_session);
                    self.event(Event::Connected {
                        client_id: self.client_id.clone().unwrap_or_default(),
                        transport: self.connection_type.to_owned(),
                        rehandshake: fresh && self.sessions > 1,
                    });
                }
                // Subscriptions that failed for a transient reason go out again now.
                let retry: Vec<String> = self
                    .subs
                    .iter()
                    .filter(|(_, s)| !s.confirmed)
                    .map(|(c, _)| c.clone())
                    .collect();
                for channel in retry {
                    self.run_step(Step::Subscribe(channel));
                }
                match self.advice.reconnect.unwrap_or(Reconnect::Retry) {
                    Reconnect::Retry => {
                        if self.advice.interval.is_some_and(|i| i < 0) {
                            self.give_up("advice interval is negative: do not retry".into());
                        } else {
                            let interval = self.advised_interval();
                            self.schedule(Step::Connect, interval);
                        }
                    }
                    Reconnect::Handshake => {
                        let delay = self.advised_interval();
                        self.rehandshake("advice: handshake".into(), delay);
                    }
                    Reconnect::None => self.auth_failure("advice: none".into()),
                }
            }
            _ => {
                let reason = match (&reply.successful, failure_reason(&reply)) {
                    (None, _) => "connect reply without `successful`".to_owned(),
                    (_, Some(r)) => format!("{} ({r})", error_of(&reply)),
                    (_, None) => error_of(&reply),
                };
                self.unconnected = true;
                if is_busy(&reply) {
                    let step = if reconnect == Some(Reconnect::Handshake) {
                        Step::Handshake
                    } else {
                        Step::Connect
                    };
                    self.retry_later(reason, step, true);
                    return;
                }
                match reconnect {
                    Some(Reconnect::Handshake) => {
                        let advised = self.advised_interval();
                        if let Some(delay) = self.failure_delay(advised, false) {
                            self.rehandshake(reason, delay);
                        }
                    }
                    Some(Reconnect::None) => self.auth_failure(reason),
                    _ if reply.successful.is_some() && is_unknown_session(&reply) => {
                        if let Some(delay) = self.failure_delay(Duration::ZERO, false) {
                            self.rehandshake(reason, delay);
                        }
                    }
                    _ if is_auth_error(&reply) => self.auth_failure(reason),
                    _ => self.retry_later(reason, Step::Connect, false),
                }
            }
        }
    }

    /// A transient failure: wait (advice interval, then backoff) and do `step` again.
    fn retry_later(&mut self, reason: String, step: Step, busy: bool) {
        let advised = self.advised_interval();
        let Some(delay) = self.failure_delay(advised, busy) else {
            return;
        };
        let handshake = step == Step::Handshake;
        if handshake {
            self.rehandshake(reason, delay);
            return;
        }
        self.event(Event::Reconnecting {
            reason,
            handshake,
            attempt: self.failures,
            delay,
        });
        self.schedule(step, delay);
    }

    fn on_stalled(&mut self, id: &str) {
        if self.connect_id.as_deref() != Some(id) {
            return;
        }
        self.pending.remove(id);
        self.connect_id = None;
        self.unconnected = true;
        let action = self.watchdog.on_stall();
        let rehandshake = action == StallAction::Rehandshake;
        self.event(Event::Stalled {
            count: if rehandshake {
                self.config.max_stalls.max(1)
            } else {
                self.watchdog.stalls()
            },
            rehandshake,
        });
        match action {
            StallAction::Reconnect => self.schedule(Step::Connect, Duration::ZERO),
            StallAction::Rehandshake => {
                if let Some(delay) = self.failure_delay(Duration::ZERO, false) {
                    self.rehandshake("connect stalled repeatedly".into(), delay);
                }
            }
        }
    }

    // ----- failures below Bayeux -----

    fn on_failed(&mut self, id: &str, failure: Failure, now: Instant) {
        self.reply_advice = None;
        let Some(pending) = self.pending.remove(id) else {
            return;
        };
        let reason = failure.to_string();
        match pending {
            Pending::Handshake => {
                if failure == Failure::Unauthorized {
                    self.auth_failure(reason);
                } else {
                    self.handshake_failed_transiently(reason, false);
                }
            }
            Pending::Connect => {
                if self.connect_id.as_deref() == Some(id) {
                    self.connect_id = None;
                }
                self.unconnected = true;
                if failure == Failure::Unauthorized {
                    self.auth_failure(reason);
                    return;
                }
                // No connect answered for longer than the server keeps a session: it is gone.
                let expired = self
                    .advice
                    .max_interval
                    .filter(|m| *m > 0)
                    .is_some_and(|m| {
                        let timeout = self.advice.timeout.unwrap_or(0).max(0) as u64;
                        let limit = Duration::from_millis(
                            timeout + self.advice.interval.unwrap_or(0).max(0) as u64 + m as u64,
                        );
                        self.last_connected
                            .is_some_and(|t| now.saturating_duration_since(t) > limit)
                    });
                let step = if expired {
                    Step::Handshake
                } else {
                    Step::Connect
                };
                self.retry_later(reason, step, false);
            }
            Pending::Subscribe(channel) => {
                if failure == Failure::Unauthorized {
                    self.auth_failure(reason);
                } else if self.subs.contains_key(&channel) {
                    let delay = self.backoff.next_delay();
                    self.schedule(Step::Subscribe(channel), delay);
                }
            }
            Pending::Publish(ticket) => {
                self.out.push(Action::Published {
                    ticket,
                    result: Err(reason),
                });
                if failure == Failure::Unauthorized {
                    self.auth_failure("HTTP 401".into());
                }
            }
            Pending::Unsubscribe => {}
            Pending::Disconnect => self.close(),
        }
    }

    // ----- messages in -----

    fn on_messages(&mut self, messages: Vec<Message>, now: Instant) {
        for mut m in messages {
            self.reply_advice = None;
            let keep = self.extensions.iter_mut().all(|e| e.incoming(&mut m));
            if !keep {
                continue;
            }
            if m.channel.starts_with("/meta/") {
                match m.channel.as_str() {
                    meta::HANDSHAKE => self.on_handshake_reply(m),
                    meta::CONNECT => self.on_connect_reply(m, now),
                    meta::SUBSCRIBE => self.on_subscribe_reply(m),
                    meta::UNSUBSCRIBE => {
                        if let Some(id) = m.id.as_ref().and_then(id_string) {
                            self.pending.remove(&id);
                        }
                    }
                    meta::DISCONNECT => self.on_disconnect_message(m),
                    _ => {}
                }
            } else if m.data.is_some() {
                self.deliver(m);
            } else if m.successful.is_some() {
                self.on_publish_reply(m);
            }
        }
    }

    fn deliver(&mut self, m: Message) {
        if let Some(id) = replay_id_of(&m) {
            match self.seen.get(&m.channel) {
                Some(last) if id <= *last => {
                    tracing::debug!(channel = %m.channel, replay_id = id, "dropping a duplicate");
                    return;
                }
                _ => {
                    self.seen.insert(m.channel.clone(), id);
                }
            }
        }
        self.out.push(Action::Deliver(m));
    }

    fn on_publish_reply(&mut self, reply: Message) {
        let Some(id) = reply.id.as_ref().and_then(id_string) else {
            return;
        };
        let Some(Pending::Publish(ticket)) = self.pending.get(&id).cloned() else {
            return;
        };
        self.pending.remove(&id);
        let result = match reply.successful {
            Some(true) => Ok(reply.clone()),
            _ => Err(error_of(&reply)),
        };
        // An unknown session here is found out by the connect loop too, which handshakes.
        self.out.push(Action::Published { ticket, result });
    }

    fn on_disconnect_message(&mut self, m: Message) {
        let ours =
            m.id.as_ref()
                .and_then(id_string)
                .and_then(|id| self.pending.remove(&id))
                == Some(Pending::Disconnect);
        if ours || self.phase == Phase::Disconnecting {
            self.close();
            return;
        }
        // The server ended the session (Salesforce does this since API 64.0): start over.
        self.event(Event::ServerDisconnected);
        self.unconnected = true;
        self.rehandshake("server sent /meta/disconnect".into(), Duration::ZERO);
    }

    // ----- subscriptions -----

    fn replay_map(&self) -> Value {
        let map: Map<String, Value> = self
            .subs
            .keys()
            .filter_map(|c| Some((c.clone(), json!(self.replay_position(c)?))))
            .collect();
        Value::Object(map)
    }

    fn send_subscribe(&mut self, channel: &str) {
        let Some(client_id) = self.client_id.clone() else {
            return;
        };
        let mut m = Message::new(meta::SUBSCRIBE);
        let id = self.id();
        m.id = Some(Value::String(id.clone()));
        m.client_id = Some(client_id);
        m.subscription = Some(Subscription::One(channel.to_owned()));
        if self.server_replay {
            m.ext_insert("replay", self.replay_map());
        }
        self.outgoing(&mut m);
        self.pending
            .insert(id, Pending::Subscribe(channel.to_owned()));
        self.out.push(Action::Subscribe(m));
    }

    fn on_subscribe(&mut self, channel: String, replay: i64) {
        if let Some(sub) = self.subs.get_mut(&channel) {
            if sub.confirmed {
                self.out.push(Action::Subscribed {
                    channel,
                    result: Ok(()),
                });
            } else {
                sub.awaited = true;
            }
            return;
        }
        // Replay after N: everything up to N is already had.
        if replay >= 0 && !ChannelName::new(&channel).is_ok_and(|c| c.is_wildcard()) {
            self.seen.entry(channel.clone()).or_insert(replay);
        }
        self.subs.insert(
            channel.clone(),
            Sub {
                initial: replay,
                fallback: None,
                confirmed: false,
                awaited: true,
                resuming: false,
                ever_confirmed: false,
            },
        );
        if self.phase == Phase::Connected {
            self.send_subscribe(&channel);
        }
    }

    fn on_subscribe_reply(&mut self, reply: Message) {
        let Some(id) = reply.id.as_ref().and_then(id_string) else {
            return;
        };
        let Some(Pending::Subscribe(channel)) = self.pending.get(&id).cloned() else {
            return;
        };
        self.pending.remove(&id);
        let Some(position) = self.replay_position(&channel) else {
            return; // unsubscribed meanwhile
        };
        if reply.successful == Some(true) {
            // The bayeux server names where a live (`-1`) start stands: the last replay ID
            // issued on the channel. Until an event arrives, a re-subscription starts after it
            // rather than at `-1`, so events published during an outage are not missed.
            let live_position = reply
                .ext_get("replay")
                .and_then(|r| r.get(&channel))
                .and_then(Value::as_i64)
                .filter(|id| *id >= 0);
            let unseen = !self.seen.contains_key(&channel);
            let Some(sub) = self.subs.get_mut(&channel) else {
                return;
            };
            if let Some(id) = live_position
                && sub.initial == NEW
                && unseen
            {
                sub.initial = id;
            }
            sub.confirmed = true;
            sub.ever_confirmed = true;
            sub.fallback = None;
            let resuming = std::mem::take(&mut sub.resuming);
            if std::mem::take(&mut sub.awaited) {
                self.out.push(Action::Subscribed {
                    channel: channel.clone(),
                    result: Ok(()),
                });
            }
            if resuming && self.server_replay {
                self.event(Event::Resumed {
                    channel,
                    from: position,
                });
            }
            return;
        }
        let error = error_of(&reply);
        if let Some(invalid) = invalid_replay_id(&error) {
            let already = self
                .subs
                .get(&channel)
                .is_some_and(|s| s.fallback.is_some());
            if let (Some(fallback), false) = (self.config.replay_fallback.wire(), already) {
                let invalid = invalid.parse().unwrap_or(position);
                // The refused position says nothing about which IDs exist now: forget it, so
                // nothing the server replays is mistaken for a duplicate.
                self.seen.remove(&channel);
                if let Some(sub) = self.subs.get_mut(&channel) {
                    sub.fallback = Some(fallback);
                }
                self.event(Event::ReplayFallback {
                    channel: channel.clone(),
                    invalid,
                    fallback,
                });
                self.send_subscribe(&channel);
                return;
            }
        }
        if is_unknown_session(&reply) {
            // Re-subscribed after the connect loop re-handshakes.
            return;
        }
        if error_code(&error) == Some(401)
            || failure_reason(&reply).and_then(error_code) == Some(401)
        {
            self.auth_failure(error);
            return;
        }
        if is_busy(&reply) {
            let delay = self.backoff.next_delay();
            self.schedule(Step::Subscribe(channel), delay);
            return;
        }
        // Refused for good.
        let sub = self.subs.remove(&channel);
        if sub.as_ref().is_some_and(|s| s.awaited) {
            self.out.push(Action::Subscribed {
                channel: channel.clone(),
                result: Err(error.clone()),
            });
        }
        self.event(Event::SubscriptionFailed {
            channel: channel.clone(),
            error,
        });
        self.out.push(Action::SubscriptionEnded { channel });
    }

    fn on_unsubscribe(&mut self, channel: String) {
        if self.subs.remove(&channel).is_none() {
            return;
        }
        self.timers
            .retain(|_, s| *s != Step::Subscribe(channel.clone()));
        let Some(client_id) = self.client_id.clone() else {
            return;
        };
        if self.phase != Phase::Connected {
            return;
        }
        let mut m = Message::new(meta::UNSUBSCRIBE);
        let id = self.id();
        m.id = Some(Value::String(id.clone()));
        m.client_id = Some(client_id);
        m.subscription = Some(Subscription::One(channel));
        self.outgoing(&mut m);
        self.pending.insert(id, Pending::Unsubscribe);
        self.out.push(Action::Send(m));
    }

    fn send_publish(&mut self, ticket: u64, mut m: Message) {
        let id = self.id();
        m.id = Some(Value::String(id.clone()));
        m.client_id = self.client_id.clone();
        self.outgoing(&mut m);
        self.pending.insert(id, Pending::Publish(ticket));
        self.out.push(Action::Send(m));
    }

    // ----- disconnect -----

    fn on_disconnect(&mut self) {
        self.timers.clear();
        match (self.phase, self.client_id.clone()) {
            (Phase::Connected, Some(client_id)) => {
                self.phase = Phase::Disconnecting;
                let mut m = Message::new(meta::DISCONNECT);
                let id = self.id();
                m.id = Some(Value::String(id.clone()));
                m.client_id = Some(client_id);
                self.outgoing(&mut m);
                self.pending.insert(id, Pending::Disconnect);
                self.out.push(Action::Send(m));
            }
            (Phase::Disconnecting, _) => {}
            _ => self.close(),
        }
    }

    fn close(&mut self) {
        if self.phase == Phase::Closed {
            return;
        }
        self.phase = Phase::Closed;
        self.timers.clear();
        self.fail_waiting("client disconnected");
        self.event(Event::Disconnected);
        self.out.push(Action::Close);
    }
}

/// A message id as a string (ids may come back as numbers).
fn id_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// New advice supersedes the old field by field (servers send only what changed).
fn merge_advice(current: &mut Advice, new: &Advice) {
    if new.reconnect.is_some() {
        current.reconnect = new.reconnect;
    }
    if new.interval.is_some() {
        current.interval = new.interval;
    }
    if new.timeout.is_some() {
        current.timeout = new.timeout;
    }
    if new.max_interval.is_some() {
        current.max_interval = new.max_interval;
    }
    if new.multiple_clients.is_some() {
        current.multiple_clients = new.multiple_clients;
    }
    if new.hosts.is_some() {
        current.hosts = new.hosts.clone();
    }
}

#[cfg(test)]
mod tests;
