//! The bench clients: subscribers and publishers, each a Bayeux client that handshakes,
//! follows advice and re-handshakes when told to.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bayeux_protocol::{Advice, Message, Reconnect, Subscription, meta};
use parking_lot::{Mutex, RwLock};
use serde_json::json;
use tokio::sync::{Notify, Semaphore, watch};

use crate::args::BenchArgs;
use crate::link::{CookieJar, Delivery, Link, LinkError, Sink};
use crate::net::Target;
use crate::stats::{Errors, Latencies, MAX_INDEX, PubShared, SubShared, Timeline};

/// Longest advised interval the bench honours, ms.
const MAX_INTERVAL_MS: i64 = 60_000;
/// Held-connect timeout assumed when the server has not advised one, ms (Faye's default).
const DEFAULT_HOLD_MS: i64 = 60_000;
/// Handshake attempts in a row before a client gives up re-establishing its session.
const MAX_ESTABLISH_ATTEMPTS: u32 = 5;
/// Unsuccessful connects in a row (without advice) before the client re-handshakes.
const MAX_CONNECT_FAILURES: u32 = 3;
/// Attempts to re-establish a lost session (each after a backoff of up to 2 s); the stop
/// signal ends them sooner.
const MAX_REESTABLISH_ATTEMPTS: u32 = 1_000;

/// Counters updated by every client.
#[derive(Default)]
pub(crate) struct Counters {
    /// Every delivery received, whatever its phase.
    pub(crate) received: AtomicU64,
    /// Deliveries received during the measured window.
    pub(crate) received_in_window: AtomicU64,
    /// Every publish sent.
    pub(crate) published_total: AtomicU64,
    /// Publishes sent during the measured window.
    pub(crate) published_counted: AtomicU64,
    /// Every successful publish ack.
    pub(crate) acked_total: AtomicU64,
    pub(crate) subs_ready: AtomicU64,
    pub(crate) pubs_ready: AtomicU64,
    pub(crate) setup_failed: AtomicU64,
}

/// What every task of a run shares.
pub(crate) struct Ctx {
    pub(crate) args: BenchArgs,
    pub(crate) target: Arc<Target>,
    pub(crate) channels: Vec<String>,
    pub(crate) timeline: Timeline,
    pub(crate) errors: Errors,
    pub(crate) latency: Latencies,
    pub(crate) counters: Counters,
    /// True while clients may still join the run.
    pub(crate) setup_open: Mutex<bool>,
    pub(crate) setup_slots: Semaphore,
    /// The next message sequence number.
    pub(crate) seq: AtomicU64,
    /// Set when publishing may start: the start of the warm-up.
    pub(crate) start: watch::Receiver<Option<Instant>>,
    /// Set at the end of the grace period.
    pub(crate) stop: watch::Receiver<bool>,
    pub(crate) pad: String,
    pub(crate) request_timeout: Duration,
}

impl Ctx {
    /// Joins the run if setup is still open; `mark` records readiness under the same lock.
    fn join(&self, mark: impl FnOnce()) -> bool {
        let open = self.setup_open.lock();
        if *open {
            mark();
        }
        *open
    }
}

/// Waits until the stop flag is set (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn error_code(reply: &Message) -> String {
    reply
        .error
        .as_deref()
        .and_then(|e| e.split(':').next())
        .filter(|c| !c.is_empty())
        .unwrap_or("unknown")
        .to_owned()
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis((100u64 << failures.min(5)).min(2_000))
}

/// Receives a subscriber's deliveries.
struct SubSink {
    ctx: Arc<Ctx>,
    sub: Arc<SubShared>,
}

impl Sink for SubSink {
    fn deliver(&self, deliveries: &[Delivery]) {
        let ctx = &self.ctx;
        let now = ctx.timeline.now_ns();
        let (start, end) = ctx.timeline.window();
        let n = deliveries.len() as u64;
        ctx.counters.received.fetch_add(n, Ordering::Relaxed);
        if now >= start && now < end {
            ctx.counters
                .received_in_window
                .fetch_add(n, Ordering::Relaxed);
        }
        if ctx.timeline.is_closed() {
            return;
        }
        let k = ctx.channels.len() as u64;
        let mut latencies = Vec::new();
        let mut foreign = 0;
        {
            let mut st = self.sub.state.lock();
            for d in deliveries {
                let Some((seq, t)) = d.seq_and_time else {
                    foreign += 1;
                    continue;
                };
                if seq % k != self.sub.channel as u64 || seq / k >= MAX_INDEX {
                    foreign += 1;
                    continue;
                }
                if t < start || t >= end {
                    continue;
                }
                if st.seen.insert(seq / k) {
                    latencies.push(now.saturating_sub(t) / 1_000);
                } else {
                    st.duplicates += 1;
                }
            }
        }
        if foreign > 0 {
            ctx.errors.add("foreign_message", foreign);
        }
        if !latencies.is_empty() {
            ctx.latency.record(self.sub.index, &latencies);
        }
    }

    fn error(&self, kind: &str) {
        self.ctx.errors.inc(kind);
    }
}

/// A publisher receives nothing; anything pushed to it is counted.
struct PubSink {
    ctx: Arc<Ctx>,
}

impl Sink for PubSink {
    fn deliver(&self, deliveries: &[Delivery]) {
        self.ctx
            .errors
            .add("publisher_delivery", deliveries.len() as u64);
    }

    fn error(&self, kind: &str) {
        self.ctx.errors.inc(kind);
    }
}

/// What the connect loop does next.
enum Next {
    Continue,
    Rehandshake,
    Reopen,
    Stop,
}

/// One Bayeux session over one link.
struct Client {
    ctx: Arc<Ctx>,
    link: Link,
    jar: Arc<CookieJar>,
    sink: Arc<dyn Sink>,
    client_id: String,
    advice: Advice,
    failures: u32,
}

impl Client {
    async fn open(ctx: &Arc<Ctx>, sink: Arc<dyn Sink>) -> Result<Client, String> {
        let jar = Arc::new(CookieJar::default());
        let link = Link::open(&ctx.target, ctx.args.transport, sink.clone(), jar.clone())
            .await
            .map_err(|e| format!("open:{}", e.kind()))?;
        Ok(Client {
            ctx: ctx.clone(),
            link,
            jar,
            sink,
            client_id: String::new(),
            advice: Advice::default(),
            failures: 0,
        })
    }

    async fn reopen(&mut self) -> Result<(), String> {
        let link = Link::open(
            &self.ctx.target,
            self.ctx.args.transport,
            self.sink.clone(),
            self.jar.clone(),
        )
        .await
        .map_err(|e| format!("open:{}", e.kind()))?;
        let old = std::mem::replace(&mut self.link, link);
        old.close().await;
        Ok(())
    }

    fn absorb(&mut self, advice: Option<&Advice>) {
        if let Some(a) = advice {
            if a.reconnect.is_some() {
                self.advice.reconnect = a.reconnect;
            }
            if a.interval.is_some() {
                self.advice.interval = a.interval;
            }
            if a.timeout.is_some() {
                self.advice.timeout = a.timeout;
            }
        }
    }

    async fn call(&mut self, op: &str, msg: Message) -> Result<Message, String> {
        self.link
            .call(msg, self.ctx.request_timeout)
            .await
            .map_err(|e| format!("{op}:{}", e.kind()))
    }

    async fn handshake(&mut self) -> Result<(), String> {
        // Advice and cookies belong to the old session.
        self.advice = Advice::default();
        self.jar.clear();
        let mut m = Message::new(meta::HANDSHAKE);
        m.version = Some(bayeux_protocol::VERSION.into());
        m.minimum_version = Some(bayeux_protocol::VERSION.into());
        m.supported_connection_types = Some(vec![self.ctx.args.transport.connection_type().into()]);
        let reply = self.call("handshake", m).await?;
        if reply.successful != Some(true) {
            return Err(format!("handshake_failed:{}", error_code(&reply)));
        }
        self.client_id = reply.client_id.clone().ok_or("handshake:no_client_id")?;
        self.absorb(reply.advice.as_ref());
        Ok(())
    }

    async fn subscribe(&mut self, channel: &str) -> Result<(), String> {
        let mut m = Message::new(meta::SUBSCRIBE);
        m.client_id = Some(self.client_id.clone());
        m.subscription = Some(Subscription::One(channel.to_owned()));
        let reply = self.call("subscribe", m).await?;
        if reply.successful != Some(true) {
            return Err(format!("subscribe_failed:{}", error_code(&reply)));
        }
        Ok(())
    }

    async fn connect(&mut self, first: bool) -> Result<Message, LinkError> {
        let mut m = Message::new(meta::CONNECT);
        m.client_id = Some(self.client_id.clone());
        m.connection_type = Some(self.ctx.args.transport.connection_type().into());
        let wait = if first {
            // As the CometD client: the first connect asks not to be held.
            m.advice = Some(Advice {
                timeout: Some(0),
                ..Advice::default()
            });
            self.ctx.request_timeout
        } else {
            let hold = self
                .advice
                .timeout
                .unwrap_or(DEFAULT_HOLD_MS)
                .clamp(0, 3_600_000);
            Duration::from_millis(hold as u64) + self.ctx.request_timeout
        };
        self.link.call(m, wait).await
    }

    async fn disconnect(&mut self) {
        let mut m = Message::new(meta::DISCONNECT);
        m.client_id = Some(self.client_id.clone());
        // Bounds the burst of disconnects (and of new connections, over long-polling, whose
        // held connect was dropped with its connection).
        let _slot = self.ctx.setup_slots.acquire().await;
        if let Err(e) = self.link.call(m, self.ctx.request_timeout).await {
            self.ctx.errors.inc(&format!("disconnect:{}", e.kind()));
        }
    }

    /// Handshake, subscribe (when `channel` is given) and a first connect that returns at
    /// once. A first connect advising a handshake is followed (and counted).
    async fn establish(&mut self, channel: Option<&str>) -> Result<(), String> {
        for _ in 0..MAX_ESTABLISH_ATTEMPTS {
            self.handshake().await?;
            if let Some(ch) = channel {
                self.subscribe(ch).await?;
            }
            let reply = self
                .connect(true)
                .await
                .map_err(|e| format!("connect:{}", e.kind()))?;
            self.absorb(reply.advice.as_ref());
            let reconnect = reply.advice.as_ref().and_then(|a| a.reconnect);
            if reconnect == Some(Reconnect::Handshake) {
                if reply.successful != Some(true) {
                    self.ctx
                        .errors
                        .inc(&format!("connect_failed:{}", error_code(&reply)));
                }
                self.ctx.errors.inc("rehandshake");
                continue;
            }
            if reconnect == Some(Reconnect::None) {
                return Err("reconnect_none".into());
            }
            if reply.successful != Some(true) {
                return Err(format!("connect_failed:{}", error_code(&reply)));
            }
            self.failures = 0;
            return Ok(());
        }
        Err("too_many_rehandshakes".into())
    }

    /// Re-establishes the session until it works (the caller bounds it by the stop signal).
    async fn reestablish(&mut self, channel: Option<&str>, reopen: bool) -> bool {
        let mut need_open = reopen;
        for attempt in 0..MAX_REESTABLISH_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(backoff(attempt)).await;
            }
            if need_open || self.link.is_dead() {
                if let Err(kind) = self.reopen().await {
                    self.ctx.errors.inc(&kind);
                    continue;
                }
                need_open = false;
            }
            match self.establish(channel).await {
                Ok(()) => return true,
                Err(kind) if kind == "reconnect_none" => {
                    self.ctx.errors.inc(&kind);
                    return false;
                }
                Err(kind) => self.ctx.errors.inc(&kind),
            }
        }
        false
    }

    /// One held connect and what the reply advises.
    async fn connect_step(&mut self) -> Next {
        match self.connect(false).await {
            Ok(reply) => {
                self.absorb(reply.advice.as_ref());
                let reconnect = reply.advice.as_ref().and_then(|a| a.reconnect);
                if reconnect == Some(Reconnect::Handshake) {
                    if reply.successful != Some(true) {
                        self.ctx
                            .errors
                            .inc(&format!("connect_failed:{}", error_code(&reply)));
                    }
                    self.ctx.errors.inc("rehandshake");
                    return Next::Rehandshake;
                }
                if reconnect == Some(Reconnect::None) {
                    self.ctx.errors.inc("reconnect_none");
                    return Next::Stop;
                }
                if reply.successful != Some(true) {
                    self.ctx
                        .errors
                        .inc(&format!("connect_failed:{}", error_code(&reply)));
                    self.failures += 1;
                    if self.failures >= MAX_CONNECT_FAILURES {
                        self.ctx.errors.inc("rehandshake_after_failures");
                        return Next::Rehandshake;
                    }
                    tokio::time::sleep(backoff(self.failures)).await;
                    return Next::Continue;
                }
                self.failures = 0;
                let interval = self.advice.interval.unwrap_or(0).clamp(0, MAX_INTERVAL_MS);
                if interval > 0 {
                    tokio::time::sleep(Duration::from_millis(interval as u64)).await;
                }
                Next::Continue
            }
            Err(e) => {
                self.ctx.errors.inc(&format!("connect:{}", e.kind()));
                if self.link.is_dead() {
                    return Next::Reopen;
                }
                self.failures += 1;
                tokio::time::sleep(backoff(self.failures)).await;
                Next::Continue
            }
        }
    }
}

/// One subscriber: set up, then hold connects until the stop signal, then disconnect.
pub(crate) async fn subscriber(ctx: Arc<Ctx>, sub: Arc<SubShared>) {
    let mut stop = ctx.stop.clone();
    let sink: Arc<dyn Sink> = Arc::new(SubSink {
        ctx: ctx.clone(),
        sub: sub.clone(),
    });
    let channel = ctx.channels[sub.channel].clone();
    let setup = async {
        let _slot = ctx.setup_slots.acquire().await;
        if !*ctx.setup_open.lock() {
            return Err("setup_late".to_owned());
        }
        let mut client = Client::open(&ctx, sink).await?;
        client.establish(Some(&channel)).await?;
        Ok(client)
    };
    let mut client = tokio::select! {
        r = setup => match r {
            Ok(c) => c,
            Err(kind) => {
                ctx.errors.inc(&format!("setup:{kind}"));
                ctx.counters.setup_failed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        },
        _ = stopped(&mut stop) => return,
    };
    let joined = ctx.join(|| {
        sub.state.lock().ready = true;
        ctx.counters.subs_ready.fetch_add(1, Ordering::Relaxed);
    });
    if !joined {
        ctx.errors.inc("setup:setup_late");
        client.link.close().await;
        return;
    }
    run_connect_loop(&mut client, Some(&channel), &mut stop, None).await;
    finish(client).await;
}

/// Holds connects until stop and follows advice. For a publisher, its workers may ask for a
/// new session, and each new session is published to them.
async fn run_connect_loop(
    client: &mut Client,
    channel: Option<&str>,
    stop: &mut watch::Receiver<bool>,
    publisher: Option<&PubSession>,
) {
    loop {
        let next = tokio::select! {
            n = client.connect_step() => n,
            _ = async {
                match publisher {
                    Some(p) => p.rehandshake.notified().await,
                    None => std::future::pending().await,
                }
            } => Next::Rehandshake,
            _ = stopped(stop) => return,
        };
        let reopen = match next {
            Next::Continue => continue,
            Next::Stop => {
                // Told to stop: wait for the end without a session.
                stopped(stop).await;
                return;
            }
            Next::Rehandshake => false,
            Next::Reopen => true,
        };
        let ok = tokio::select! {
            ok = client.reestablish(channel, reopen) => ok,
            _ = stopped(stop) => return,
        };
        if !ok {
            stopped(stop).await;
            return;
        }
        if let Some(p) = publisher {
            p.update(client);
        }
    }
}

async fn finish(mut client: Client) {
    if !client.client_id.is_empty() {
        client.disconnect().await;
    }
    client.link.close().await;
}

/// The session of a publisher, shared by its heartbeat and its workers.
struct PubSession {
    client_id: RwLock<String>,
    /// The current WebSocket, for workers whose socket died.
    link: Mutex<Option<Link>>,
    rehandshake: Notify,
}

impl PubSession {
    fn update(&self, client: &Client) {
        *self.client_id.write() = client.client_id.clone();
        if let Link::Ws(w) = &client.link {
            *self.link.lock() = Some(Link::Ws(w.clone()));
        }
    }
}

/// One publisher: a heartbeat connect loop and W workers publishing during warm-up and the
/// measured window.
pub(crate) async fn publisher(ctx: Arc<Ctx>, acks: Arc<PubShared>) {
    let mut stop = ctx.stop.clone();
    let sink: Arc<dyn Sink> = Arc::new(PubSink { ctx: ctx.clone() });
    let setup = async {
        let _slot = ctx.setup_slots.acquire().await;
        if !*ctx.setup_open.lock() {
            return Err("setup_late".to_owned());
        }
        let mut client = Client::open(&ctx, sink).await?;
        client.establish(None).await?;
        let mut links = Vec::with_capacity(ctx.args.in_flight);
        for _ in 0..ctx.args.in_flight {
            links.push(
                client
                    .link
                    .fork()
                    .await
                    .map_err(|e| format!("open:{}", e.kind()))?,
            );
        }
        Ok((client, links))
    };
    let (mut client, links) = tokio::select! {
        r = setup => match r {
            Ok(c) => c,
            Err(kind) => {
                ctx.errors.inc(&format!("setup:{kind}"));
                ctx.counters.setup_failed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        },
        _ = stopped(&mut stop) => return,
    };
    if !ctx.join(|| {
        ctx.counters.pubs_ready.fetch_add(1, Ordering::Relaxed);
    }) {
        ctx.errors.inc("setup:setup_late");
        client.link.close().await;
        return;
    }
    let session = Arc::new(PubSession {
        client_id: RwLock::new(String::new()),
        link: Mutex::new(None),
        rehandshake: Notify::new(),
    });
    session.update(&client);
    let workers: Vec<_> = links
        .into_iter()
        .map(|link| {
            tokio::spawn(publish_worker(
                ctx.clone(),
                session.clone(),
                link,
                acks.clone(),
            ))
        })
        .collect();
    run_connect_loop(&mut client, None, &mut stop, Some(&session)).await;
    for w in workers {
        // Workers stop at the end of the measured window; they are long done by now.
        let _ = tokio::time::timeout(Duration::from_secs(1), w).await;
    }
    finish(client).await;
}

async fn publish_worker(
    ctx: Arc<Ctx>,
    session: Arc<PubSession>,
    mut link: Link,
    acks: Arc<PubShared>,
) {
    let mut stop = ctx.stop.clone();
    let mut start = ctx.start.clone();
    let warm_start = tokio::select! {
        r = start.wait_for(|s| s.is_some()) => match r {
            Ok(s) => s.unwrap_or_else(Instant::now),
            Err(_) => return,
        },
        _ = stopped(&mut stop) => return,
    };
    let (window_start, window_end) = ctx.timeline.window();
    let k = ctx.channels.len() as u64;
    let rate = ctx.args.rate;
    let mut failures = 0u32;
    loop {
        if *stop.borrow() {
            return;
        }
        let seq = ctx.seq.fetch_add(1, Ordering::Relaxed);
        if rate > 0.0 {
            let due = warm_start + Duration::from_secs_f64(seq as f64 / rate);
            if ctx.timeline.ns_at(due) >= window_end {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(due.into()) => {}
                _ = stopped(&mut stop) => return,
            }
        }
        let t = ctx.timeline.now_ns();
        if t >= window_end {
            return;
        }
        let counted = t >= window_start;
        let mut m = Message::new(ctx.channels[(seq % k) as usize].clone());
        m.client_id = Some(session.client_id.read().clone());
        m.data = Some(json!({"seq": seq, "t": t, "pad": ctx.pad}));
        if link.is_dead()
            && let Some(fresh) = session.link.lock().as_ref()
            && let Link::Ws(w) = fresh
        {
            link = Link::Ws(w.clone());
        }
        ctx.counters.published_total.fetch_add(1, Ordering::Relaxed);
        if counted {
            ctx.counters
                .published_counted
                .fetch_add(1, Ordering::Relaxed);
        }
        match link.call(m, ctx.request_timeout).await {
            Ok(reply) if reply.successful == Some(true) => {
                failures = 0;
                ctx.counters.acked_total.fetch_add(1, Ordering::Relaxed);
                if counted && !ctx.timeline.is_closed() {
                    acks.acked.lock().push(seq);
                }
            }
            Ok(reply) => {
                let code = error_code(&reply);
                ctx.errors.inc(&format!("publish_failed:{code}"));
                let handshake = reply
                    .advice
                    .as_ref()
                    .is_some_and(|a| a.reconnect == Some(Reconnect::Handshake));
                if handshake || code == "401" || code == "402" {
                    session.rehandshake.notify_one();
                    failures += 1;
                    tokio::time::sleep(backoff(failures)).await;
                }
            }
            Err(e) => {
                ctx.errors.inc(&format!("publish:{}", e.kind()));
                failures += 1;
                tokio::time::sleep(backoff(failures)).await;
            }
        }
    }
}
