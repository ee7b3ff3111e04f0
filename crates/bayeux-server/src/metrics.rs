//! Prometheus metrics, one registry per server (so several servers in one process, as in tests,
//! keep separate numbers).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label for errors by code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// The error code (`402`, …) as a string.
    pub code: String,
}

/// Label for queue overflows by action.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    /// `drop-oldest` or `disconnect`.
    pub action: String,
}

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    /// Live sessions.
    pub sessions: Gauge,
    /// Connects currently held.
    pub held_connects: Gauge,
    /// Open WebSocket connections.
    pub websockets: Gauge,
    /// Messages received from clients (all channels).
    pub messages_in: Counter,
    /// Messages published to broadcast channels (stored and fanned out).
    pub published: Counter,
    /// Messages written to clients (deliveries, not replies).
    pub messages_out: Counter,
    /// Queue overflows by action.
    pub queue_overflows: Family<ActionLabel, Counter>,
    /// `queue_overflows{action="drop-oldest"}`, resolved once (the fan-out path counts here).
    pub overflow_drop_oldest: Counter,
    /// `queue_overflows{action="disconnect"}`, resolved once.
    pub overflow_disconnect: Counter,
    /// Error replies by code.
    pub errors: Family<CodeLabel, Counter>,
    /// Sessions removed because no connect came for max_interval.
    pub sessions_expired: Counter,
    /// Successful handshakes.
    pub handshakes: Counter,
}

impl Metrics {
    /// A fresh registry with every metric at zero.
    pub fn new() -> Self {
        let mut m = Metrics {
            registry: Registry::with_prefix("bayeux"),
            sessions: Gauge::default(),
            held_connects: Gauge::default(),
            websockets: Gauge::default(),
            messages_in: Counter::default(),
            published: Counter::default(),
            messages_out: Counter::default(),
            queue_overflows: Family::default(),
            overflow_drop_oldest: Counter::default(),
            overflow_disconnect: Counter::default(),
            errors: Family::default(),
            sessions_expired: Counter::default(),
            handshakes: Counter::default(),
        };
        m.registry
            .register("sessions", "Live sessions", m.sessions.clone());
        m.registry.register(
            "held_connects",
            "Connects currently held",
            m.held_connects.clone(),
        );
        m.registry.register(
            "websocket_connections",
            "Open WebSocket connections",
            m.websockets.clone(),
        );
        m.registry.register(
            "messages_in",
            "Messages received from clients",
            m.messages_in.clone(),
        );
        m.registry.register(
            "messages_published",
            "Messages published to broadcast channels",
            m.published.clone(),
        );
        m.registry.register(
            "messages_out",
            "Messages delivered to clients",
            m.messages_out.clone(),
        );
        m.overflow_drop_oldest = m
            .queue_overflows
            .get_or_create(&ActionLabel {
                action: "drop-oldest".into(),
            })
            .clone();
        m.overflow_disconnect = m
            .queue_overflows
            .get_or_create(&ActionLabel {
                action: "disconnect".into(),
            })
            .clone();
        m.registry.register(
            "queue_overflows",
            "Session queue overflows by action",
            m.queue_overflows.clone(),
        );
        m.registry
            .register("errors", "Error replies by code", m.errors.clone());
        m.registry.register(
            "sessions_expired",
            "Sessions expired for lack of connects",
            m.sessions_expired.clone(),
        );
        m.registry
            .register("handshakes", "Successful handshakes", m.handshakes.clone());
        m
    }

    /// Counts an error reply.
    pub fn error(&self, code: u16) {
        self.errors
            .get_or_create(&CodeLabel {
                code: code.to_string(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("metrics encode");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
