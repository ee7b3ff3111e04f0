//! The client handle and the driver task that runs the [`State`] machine over the transports.
//!
//! The driver owns everything with I/O: the HTTP clients, the WebSocket, the timers, the
//! token requests. It turns what happens into [`Input`]s and carries out the [`Action`]s the
//! state machine returns. Every wait is bounded: requests by the request timeout, held
//! connects by the watchdog deadline, API calls by the operation timeout.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bayeux_protocol::{ChannelName, Message};
use futures::Stream;
use futures::stream::BoxStream;
use reqwest::cookie::CookieStore;
use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::Value;
use tokio::sync::{Notify, broadcast, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::auth::{AuthError, Token, TokenProvider};
use crate::error::Error;
use crate::events::Event;
use crate::ext::replay::{Replay, ReplayStore, replay_id_of};
use crate::options::ClientBuilder;
use crate::state::{Action, Config, Failure, Input, State, TransportKind};
use crate::transport::long_polling::LongPolling;
use crate::transport::websocket;

/// A snapshot of the client's condition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Status {
    /// A connect has succeeded and no failure has been seen since.
    pub connected: bool,
    /// The current session.
    pub client_id: Option<String>,
    /// The connection type in use.
    pub transport: String,
    /// The client has stopped for good.
    pub closed: bool,
}

enum Command {
    Subscribe {
        channel: String,
        replay: i64,
        listener: u64,
        tx: mpsc::UnboundedSender<Message>,
        done: oneshot::Sender<Result<(), Error>>,
    },
    RemoveListener(u64),
    Unsubscribe(String),
    Publish {
        channel: String,
        data: Value,
        done: oneshot::Sender<Result<Message, Error>>,
    },
    Disconnect(oneshot::Sender<()>),
}

enum WsEvent {
    Messages(Vec<Message>),
    OpenFailed(Failure),
    Closed(Failure),
}

enum Incoming {
    Http {
        sent: Vec<String>,
        result: Result<Vec<Message>, Failure>,
    },
    Stalled(String),
    Ws {
        generation: u64,
        event: WsEvent,
    },
    Token(Result<Token, AuthError>),
}

/// The replay checkpoints the application has received, written to the store off the async
/// runtime and coalesced: under load only the latest ID per channel is written.
pub(crate) struct Checkpoints {
    store: Arc<dyn ReplayStore>,
    pending: Mutex<HashMap<String, i64>>,
    notify: Notify,
    writing: Mutex<()>,
}

impl Checkpoints {
    fn record(&self, channel: &str, replay_id: i64) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.insert(channel.to_owned(), replay_id);
        drop(pending);
        self.notify.notify_one();
    }

    /// Writes what is pending. The batch is taken inside the blocking task, under the write
    /// lock, so a later flush can never be overtaken by an earlier, staler one (even when the
    /// awaiting future is cancelled).
    async fn flush(self: &Arc<Self>) {
        let this = self.clone();
        let saved = tokio::task::spawn_blocking(move || {
            let _writing = this.writing.lock().unwrap_or_else(|e| e.into_inner());
            let batch =
                std::mem::take(&mut *this.pending.lock().unwrap_or_else(|e| e.into_inner()));
            for (channel, id) in batch {
                if let Err(e) = this.store.save(&channel, id) {
                    tracing::error!(%channel, replay_id = id, error = %e, "replay checkpoint not saved");
                }
            }
        });
        let _ = saved.await;
    }
}

struct ClientInner {
    commands: mpsc::UnboundedSender<Command>,
    events: broadcast::Sender<Event>,
    status: watch::Receiver<Status>,
    checkpoints: Arc<Checkpoints>,
    store: Arc<dyn ReplayStore>,
    resume_default: Replay,
    operation_timeout: Duration,
    next_listener: AtomicU64,
    driver: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        // Dropping the last handle disconnects (the driver sends /meta/disconnect and stops).
        let (tx, _) = oneshot::channel();
        let _ = self.commands.send(Command::Disconnect(tx));
    }
}

/// A Bayeux client. Cheap to clone; the last clone dropped disconnects it.
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("status", &*self.inner.status.borrow())
            .finish_non_exhaustive()
    }
}

/// The messages of one subscription, in order, each once. Dropping it unsubscribes (when no
/// other stream of the client wants the channel).
pub struct Subscription {
    channel: String,
    rx: mpsc::UnboundedReceiver<Message>,
    checkpoints: Arc<Checkpoints>,
    listener: u64,
    commands: mpsc::UnboundedSender<Command>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// The channel (or pattern) subscribed.
    pub fn channel(&self) -> &str {
        &self.channel
    }
}

impl Stream for Subscription {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        let polled = self.rx.poll_recv(cx);
        if let Poll::Ready(Some(message)) = &polled
            && let Some(id) = replay_id_of(message)
        {
            // The application has the event now: this is the checkpoint to resume after.
            self.checkpoints.record(&self.channel, id);
        }
        polled
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::RemoveListener(self.listener));
    }
}

/// The stream of [`Event`]s from [`Client::events`]. Events that a slow reader lags behind on
/// are skipped rather than buffered without bound.
pub struct Events(BoxStream<'static, Event>);

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Events")
    }
}

impl Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.0.as_mut().poll_next(cx)
    }
}

impl Client {
    /// Options for a client of the Bayeux endpoint at `url` (`http://…/cometd` or, for
    /// Salesforce, `https://<instance>/cometd/<version>`).
    ///
    /// ```
    /// let builder = bayeux_client::Client::builder("http://127.0.0.1:8080/cometd");
    /// ```
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder::new(url)
    }

    /// Subscribes to `channel` (a name or a `/a/*`, `/a/**` pattern) starting from `replay`,
    /// and waits for the server to confirm. The stream yields the channel's messages in order,
    /// each once, across reconnects; it ends when the client stops or the subscription is
    /// refused on a re-subscribe.
    pub async fn subscribe(&self, channel: &str, replay: Replay) -> Result<Subscription, Error> {
        ChannelName::new(channel).map_err(|e| Error::InvalidChannel {
            channel: channel.to_owned(),
            reason: e.to_string(),
        })?;
        let replay = match replay.wire() {
            Some(id) => id,
            None => {
                let store = self.inner.store.clone();
                let name = channel.to_owned();
                let stored = tokio::task::spawn_blocking(move || store.load(&name))
                    .await
                    .map_err(|_| Error::Closed)??;
                stored.unwrap_or_else(|| self.inner.resume_default.wire().unwrap_or(-1))
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let (done, answer) = oneshot::channel();
        let listener = self.inner.next_listener.fetch_add(1, Ordering::Relaxed);
        self.inner
            .commands
            .send(Command::Subscribe {
                channel: channel.to_owned(),
                replay,
                listener,
                tx,
                done,
            })
            .map_err(|_| Error::Closed)?;
        let subscription = Subscription {
            channel: channel.to_owned(),
            rx,
            checkpoints: self.inner.checkpoints.clone(),
            listener,
            commands: self.inner.commands.clone(),
        };
        let timeout = self.inner.operation_timeout;
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(Ok(()))) => Ok(subscription),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout(timeout)),
        }
    }

    /// Stops wanting `channel`: every stream of this client on it ends.
    pub fn unsubscribe(&self, channel: &str) -> Result<(), Error> {
        self.inner
            .commands
            .send(Command::Unsubscribe(channel.to_owned()))
            .map_err(|_| Error::Closed)
    }

    /// Publishes `data` to `channel` and returns the server's acknowledgement.
    pub async fn publish(&self, channel: &str, data: Value) -> Result<Message, Error> {
        let name = ChannelName::new(channel).map_err(|e| Error::InvalidChannel {
            channel: channel.to_owned(),
            reason: e.to_string(),
        })?;
        if name.is_wildcard() || channel.starts_with("/meta/") {
            return Err(Error::InvalidChannel {
                channel: channel.to_owned(),
                reason: "cannot publish to a wildcard or a meta channel".into(),
            });
        }
        let (done, answer) = oneshot::channel();
        self.inner
            .commands
            .send(Command::Publish {
                channel: channel.to_owned(),
                data,
                done,
            })
            .map_err(|_| Error::Closed)?;
        let timeout = self.inner.operation_timeout;
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout(timeout)),
        }
    }

    /// State changes from now on: connected, reconnecting, re-authenticated, resumed, stalled,
    /// gave up…
    pub fn events(&self) -> Events {
        let rx = self.inner.events.subscribe();
        Events(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(event) => return Some((event, rx)),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(skipped = n, "events reader lagged");
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })))
    }

    /// The client's condition now.
    pub fn status(&self) -> Status {
        self.inner.status.borrow().clone()
    }

    /// Waits until the client is connected (true) or has stopped or `timeout` passed (false).
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut status = self.inner.status.clone();
        let result = tokio::time::timeout(timeout, status.wait_for(|s| s.connected || s.closed))
            .await
            .ok()
            .and_then(|r| r.ok().map(|s| s.connected));
        result.unwrap_or(false)
    }

    /// Writes the replay checkpoints recorded so far to the store now.
    pub async fn flush_checkpoints(&self) {
        self.inner.checkpoints.flush().await;
    }

    /// Sends `/meta/disconnect`, waits (bounded by the request timeout) for the answer and
    /// stops the client; the checkpoints are flushed.
    pub async fn disconnect(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.commands.send(Command::Disconnect(tx)).is_ok() {
            let _ = tokio::time::timeout(self.inner.operation_timeout, rx).await;
        }
        let driver = self
            .inner
            .driver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(driver) = driver {
            let _ = tokio::time::timeout(self.inner.operation_timeout, driver).await;
        }
        self.inner.checkpoints.flush().await;
    }
}

/// Settles a [`Client::subscribe`] call.
type SubscribeWaiter = oneshot::Sender<Result<(), Error>>;

struct Listener {
    pattern: ChannelName,
    channel: String,
    tx: mpsc::UnboundedSender<Message>,
}

struct WsConn {
    generation: u64,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    /// Message ids sent on this socket and not yet answered: (deadline, is a connect).
    in_flight: HashMap<String, (Instant, bool)>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WsConn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Driver {
    state: State,
    transport: TransportKind,
    current: &'static str,
    lp: LongPolling,
    ws_url: url::Url,
    http_url: url::Url,
    headers: HeaderMap,
    jar: Arc<reqwest::cookie::Jar>,
    max_bytes: usize,
    request_timeout: Duration,
    token_provider: Option<Arc<dyn TokenProvider>>,
    authorization: Option<HeaderValue>,
    commands: mpsc::UnboundedReceiver<Command>,
    incoming_tx: mpsc::UnboundedSender<Incoming>,
    incoming: mpsc::UnboundedReceiver<Incoming>,
    tasks: JoinSet<()>,
    timers: Vec<(Instant, u64)>,
    ws: Option<WsConn>,
    ws_generation: u64,
    listeners: HashMap<u64, Listener>,
    subscribe_waiters: HashMap<String, Vec<(u64, SubscribeWaiter)>>,
    publish_waiters: HashMap<u64, oneshot::Sender<Result<Message, Error>>>,
    next_ticket: u64,
    disconnect_waiters: Vec<oneshot::Sender<()>>,
    events: broadcast::Sender<Event>,
    status: watch::Sender<Status>,
    checkpoints: Arc<Checkpoints>,
    closed: bool,
}

pub(crate) fn start(options: ClientBuilder, url: url::Url) -> Result<Client, Error> {
    let jar = options
        .cookie_jar
        .clone()
        .unwrap_or_else(|| Arc::new(reqwest::cookie::Jar::default()));
    let lp = LongPolling::new(
        url.clone(),
        options.headers.clone(),
        jar.clone(),
        options.connect_timeout,
        options.max_response_bytes,
    )
    .map_err(|e| Error::Http(e.to_string()))?;
    let config = Config {
        transport: options.transport,
        has_token_provider: options.token_provider.is_some(),
        replay: options.replay,
        replay_fallback: options.replay_fallback,
        backoff: options.backoff,
        seed: options.seed,
        network_allowance: options.network_allowance,
        max_stalls: options.max_stalls,
        default_server_timeout: options.server_timeout,
        give_up_after: options.give_up_after,
    };
    let mut extensions = options.extensions;
    if options.ack {
        extensions.insert(0, Box::new(crate::ext::ack::AckExtension::new()));
    }
    let state = State::new(config, extensions);
    let (commands_tx, commands) = mpsc::unbounded_channel();
    let (incoming_tx, incoming) = mpsc::unbounded_channel();
    let (events, _) = broadcast::channel(1024);
    let (status_tx, status_rx) = watch::channel(Status {
        transport: state.connection_type().to_owned(),
        ..Status::default()
    });
    let checkpoints = Arc::new(Checkpoints {
        store: options.replay_store.clone(),
        pending: Mutex::new(HashMap::new()),
        notify: Notify::new(),
        writing: Mutex::new(()),
    });
    let driver = Driver {
        current: state.connection_type(),
        state,
        transport: options.transport,
        lp,
        ws_url: websocket::ws_url(&url),
        http_url: url,
        headers: options.headers,
        jar,
        max_bytes: options.max_response_bytes,
        request_timeout: options.request_timeout,
        token_provider: options.token_provider,
        authorization: None,
        commands,
        incoming_tx,
        incoming,
        tasks: JoinSet::new(),
        timers: Vec::new(),
        ws: None,
        ws_generation: 0,
        listeners: HashMap::new(),
        subscribe_waiters: HashMap::new(),
        publish_waiters: HashMap::new(),
        next_ticket: 0,
        disconnect_waiters: Vec::new(),
        events: events.clone(),
        status: status_tx,
        checkpoints: checkpoints.clone(),
        closed: false,
    };
    let handle = tokio::spawn(driver.run());
    Ok(Client {
        inner: Arc::new(ClientInner {
            commands: commands_tx,
            events,
            status: status_rx,
            checkpoints,
            store: options.replay_store,
            resume_default: options.resume_default,
            operation_timeout: options.operation_timeout,
            next_listener: AtomicU64::new(1),
            driver: Mutex::new(Some(handle)),
        }),
    })
}

impl Driver {
    async fn run(mut self) {
        // Checkpoints are written by a task of their own, so a slow disk never holds up the
        // protocol.
        let checkpoints = self.checkpoints.clone();
        let flusher = tokio::spawn(async move {
            loop {
                checkpoints.notify.notified().await;
                checkpoints.flush().await;
            }
        });
        self.input(Input::Start);
        while !self.closed {
            let next = self.next_deadline();
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => {
                        // Every handle and stream is gone: nobody to deliver to.
                        self.input(Input::Disconnect);
                        if !self.closed {
                            self.finish_disconnect().await;
                        }
                    }
                },
                Some(incoming) = self.incoming.recv() => self.on_incoming(incoming),
                _ = sleep_until(next) => self.on_deadlines(),
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
            }
        }
        flusher.abort();
        self.shutdown().await;
    }

    /// The commands channel closed: the state sent a disconnect; wait (bounded) for it.
    async fn finish_disconnect(&mut self) {
        let deadline = Instant::now() + self.request_timeout;
        while !self.closed {
            tokio::select! {
                Some(incoming) = self.incoming.recv() => self.on_incoming(incoming),
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        self.closed = true;
    }

    async fn shutdown(&mut self) {
        self.ws = None;
        self.tasks.abort_all();
        self.listeners.clear();
        for (_, waiters) in self.subscribe_waiters.drain() {
            for (_, w) in waiters {
                let _ = w.send(Err(Error::Closed));
            }
        }
        for (_, w) in self.publish_waiters.drain() {
            let _ = w.send(Err(Error::Closed));
        }
        self.checkpoints.flush().await;
        self.status.send_modify(|s| {
            s.connected = false;
            s.closed = true;
        });
        for w in self.disconnect_waiters.drain(..) {
            let _ = w.send(());
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let timers = self.timers.iter().map(|(t, _)| *t);
        let ws = self
            .ws
            .iter()
            .flat_map(|w| w.in_flight.values().map(|(t, _)| *t));
        timers.chain(ws).min()
    }

    fn input(&mut self, input: Input) {
        let actions = self.state.handle(input, Instant::now());
        for action in actions {
            self.act(action);
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Subscribe {
                channel,
                replay,
                listener,
                tx,
                done,
            } => {
                let Ok(pattern) = ChannelName::new(&channel) else {
                    let _ = done.send(Err(Error::InvalidChannel {
                        channel,
                        reason: "invalid".into(),
                    }));
                    return;
                };
                self.listeners.insert(
                    listener,
                    Listener {
                        pattern,
                        channel: channel.clone(),
                        tx,
                    },
                );
                self.subscribe_waiters
                    .entry(channel.clone())
                    .or_default()
                    .push((listener, done));
                self.input(Input::Subscribe { channel, replay });
            }
            Command::RemoveListener(id) => {
                if let Some(listener) = self.listeners.remove(&id) {
                    let still_wanted = self
                        .listeners
                        .values()
                        .any(|l| l.channel == listener.channel);
                    if !still_wanted {
                        self.input(Input::Unsubscribe {
                            channel: listener.channel,
                        });
                    }
                }
            }
            Command::Unsubscribe(channel) => {
                self.listeners.retain(|_, l| l.channel != channel);
                self.input(Input::Unsubscribe { channel });
            }
            Command::Publish {
                channel,
                data,
                done,
            } => {
                self.next_ticket += 1;
                let ticket = self.next_ticket;
                self.publish_waiters.insert(ticket, done);
                self.input(Input::Publish {
                    ticket,
                    channel,
                    data,
                });
            }
            Command::Disconnect(done) => {
                self.disconnect_waiters.push(done);
                self.input(Input::Disconnect);
            }
        }
    }

    fn on_incoming(&mut self, incoming: Incoming) {
        match incoming {
            Incoming::Http { sent, result } => match result {
                Ok(messages) => self.input(Input::Response { sent, messages }),
                Err(failure) => self.input(Input::SendFailed { ids: sent, failure }),
            },
            Incoming::Stalled(id) => self.input(Input::ConnectStalled { id }),
            Incoming::Ws { generation, event } => self.on_ws(generation, event),
            Incoming::Token(result) => {
                let result = result.and_then(|token| {
                    HeaderValue::from_str(&token.authorization()).map_err(|_| {
                        AuthError::InvalidResponse("token is not a header value".into())
                    })
                });
                match result {
                    Ok(mut value) => {
                        value.set_sensitive(true);
                        self.authorization = Some(value);
                        // A socket opened with the old token goes; the next one carries the new.
                        self.drop_ws(Failure::Io("re-authenticated".into()));
                        self.input(Input::Token(Ok(())));
                    }
                    Err(e) => self.input(Input::Token(Err(e.to_string()))),
                }
            }
        }
    }

    fn on_ws(&mut self, generation: u64, event: WsEvent) {
        let current = self.ws.as_ref().is_some_and(|w| w.generation == generation);
        match event {
            WsEvent::Messages(messages) => {
                if current && let Some(ws) = self.ws.as_mut() {
                    for m in &messages {
                        if m.data.is_none()
                            && let Some(id) = m.id.as_ref().and_then(|v| match v {
                                Value::String(s) => Some(s.clone()),
                                Value::Number(n) => Some(n.to_string()),
                                _ => None,
                            })
                        {
                            ws.in_flight.remove(&id);
                        }
                    }
                }
                // Deliveries from an older socket still count: de-duplication drops repeats.
                self.input(Input::Messages(messages));
            }
            WsEvent::OpenFailed(failure) if current => {
                let ws = self.ws.take();
                if self.transport == TransportKind::Auto && failure != Failure::Unauthorized {
                    tracing::info!(error = %failure, "WebSocket unavailable; falling back to long-polling");
                    self.input(Input::TransportUnavailable);
                }
                if let Some(mut ws) = ws {
                    let ids: Vec<String> = ws.in_flight.drain().map(|(id, _)| id).collect();
                    self.input(Input::SendFailed { ids, failure });
                }
            }
            WsEvent::Closed(failure) if current => self.drop_ws(failure),
            _ => {}
        }
    }

    /// Closes the WebSocket; what was in flight on it failed.
    fn drop_ws(&mut self, failure: Failure) {
        if let Some(mut ws) = self.ws.take() {
            let ids: Vec<String> = ws.in_flight.drain().map(|(id, _)| id).collect();
            drop(ws);
            if !ids.is_empty() {
                self.input(Input::SendFailed { ids, failure });
            }
        }
    }

    fn on_deadlines(&mut self) {
        let now = Instant::now();
        let (due, rest): (Vec<_>, Vec<_>) = self.timers.drain(..).partition(|(t, _)| *t <= now);
        self.timers = rest;
        for (_, token) in due {
            self.input(Input::Wake(token));
        }
        let Some(ws) = self.ws.as_mut() else {
            return;
        };
        let expired: Vec<(String, bool)> = ws
            .in_flight
            .iter()
            .filter(|(_, (t, _))| *t <= now)
            .map(|(id, (_, connect))| (id.clone(), *connect))
            .collect();
        for (id, _) in &expired {
            ws.in_flight.remove(id);
        }
        for (id, connect) in expired {
            if connect {
                // A silent socket is likely half-open: start a new one.
                self.drop_ws(Failure::Io(
                    "WebSocket reset after a stalled connect".into(),
                ));
                self.input(Input::ConnectStalled { id });
            } else {
                self.input(Input::SendFailed {
                    ids: vec![id],
                    failure: Failure::Timeout,
                });
            }
        }
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::SendHandshake(m) | Action::Subscribe(m) | Action::Send(m) => {
                let timeout = self.request_timeout;
                self.send(m, timeout, false);
            }
            Action::SendConnect { message, deadline } => self.send(message, deadline, true),
            Action::Sleep { duration, token } => {
                self.timers.push((Instant::now() + duration, token));
            }
            Action::Reauthenticate => self.fetch_token(),
            Action::UseTransport(t) => {
                self.current = t;
                if t != bayeux_protocol::connection_type::WEBSOCKET {
                    self.drop_ws(Failure::Io("transport changed".into()));
                }
                self.status.send_modify(|s| s.transport = t.to_owned());
            }
            Action::Deliver(message) => {
                for listener in self.listeners.values() {
                    if listener.pattern.matches(&message.channel) {
                        let _ = listener.tx.send(message.clone());
                    }
                }
            }
            Action::Subscribed { channel, result } => {
                for (listener, done) in self.subscribe_waiters.remove(&channel).unwrap_or_default()
                {
                    let r = result.clone().map_err(|error| Error::SubscribeRefused {
                        channel: channel.clone(),
                        error,
                    });
                    if r.is_err() {
                        self.listeners.remove(&listener);
                    }
                    let _ = done.send(r);
                }
            }
            Action::SubscriptionEnded { channel } => {
                self.listeners.retain(|_, l| l.channel != channel);
            }
            Action::Published { ticket, result } => {
                if let Some(done) = self.publish_waiters.remove(&ticket) {
                    let _ = done.send(result.map_err(Error::PublishRefused));
                }
            }
            Action::Event(event) => self.report(event),
            Action::Close => self.closed = true,
        }
    }

    fn report(&mut self, event: Event) {
        tracing::info!(?event, "bayeux client");
        match &event {
            Event::Connected {
                client_id,
                transport,
                ..
            } => {
                let (id, t) = (client_id.clone(), transport.clone());
                self.status.send_modify(|s| {
                    s.connected = true;
                    s.client_id = Some(id);
                    s.transport = t;
                });
            }
            Event::Reconnecting { .. } | Event::Stalled { .. } | Event::ServerDisconnected => {
                self.status.send_modify(|s| s.connected = false)
            }
            // Closed before the event is seen, so a reader of the event sees a closed status.
            Event::GaveUp { .. } | Event::Disconnected => self.status.send_modify(|s| {
                s.connected = false;
                s.closed = true;
            }),
            _ => {}
        }
        let _ = self.events.send(event);
    }

    fn fetch_token(&mut self) {
        let Some(provider) = self.token_provider.clone() else {
            let _ = self.incoming_tx.send(Incoming::Token(Err(AuthError::Other(
                "no token provider".into(),
            ))));
            return;
        };
        let tx = self.incoming_tx.clone();
        let timeout = self.request_timeout;
        self.tasks.spawn(async move {
            let result = match tokio::time::timeout(timeout, provider.token()).await {
                Ok(r) => r,
                Err(_) => Err(AuthError::Unreachable(format!(
                    "token provider gave no answer within {timeout:?}"
                ))),
            };
            let _ = tx.send(Incoming::Token(result));
        });
    }

    fn send(&mut self, message: Message, deadline: Duration, connect: bool) {
        let id = match &message.id {
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => String::new(),
        };
        if self.current == bayeux_protocol::connection_type::WEBSOCKET {
            self.send_ws(message, id, deadline, connect);
            return;
        }
        let lp = self.lp.clone();
        let auth = self.authorization.clone();
        let tx = self.incoming_tx.clone();
        self.tasks.spawn(async move {
            let sent = vec![id.clone()];
            let incoming = match tokio::time::timeout(
                deadline,
                lp.send(std::slice::from_ref(&message), auth, connect),
            )
            .await
            {
                Ok(result) => Incoming::Http { sent, result },
                Err(_) if connect => Incoming::Stalled(id),
                Err(_) => Incoming::Http {
                    sent,
                    result: Err(Failure::Timeout),
                },
            };
            let _ = tx.send(incoming);
        });
    }

    fn send_ws(&mut self, message: Message, id: String, deadline: Duration, connect: bool) {
        if self.ws.is_none() {
            self.open_ws();
        }
        let Some(ws) = self.ws.as_mut() else {
            return;
        };
        ws.in_flight
            .insert(id, (Instant::now() + deadline, connect));
        let _ = ws
            .tx
            .send(bayeux_protocol::encode_batch(std::slice::from_ref(
                &message,
            )));
    }

    fn open_ws(&mut self) {
        self.ws_generation += 1;
        let generation = self.ws_generation;
        let (tx, rx) = mpsc::unbounded_channel();
        let url = self.ws_url.clone();
        let headers = self.headers.clone();
        let auth = self.authorization.clone();
        let cookies = self.jar.cookies(&self.http_url);
        let max = self.max_bytes;
        let timeout = self.request_timeout;
        let events = self.incoming_tx.clone();
        let task = tokio::spawn(async move {
            let socket = match websocket::open(&url, &headers, auth, cookies, max, timeout).await {
                Ok(s) => s,
                Err(failure) => {
                    let _ = events.send(Incoming::Ws {
                        generation,
                        event: WsEvent::OpenFailed(failure),
                    });
                    return;
                }
            };
            let frames = events.clone();
            let failure = websocket::run(socket, rx, move |messages| {
                let _ = frames.send(Incoming::Ws {
                    generation,
                    event: WsEvent::Messages(messages),
                });
            })
            .await;
            let _ = events.send(Incoming::Ws {
                generation,
                event: WsEvent::Closed(failure),
            });
        });
        self.ws = Some(WsConn {
            generation,
            tx,
            in_flight: HashMap::new(),
            task,
        });
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
