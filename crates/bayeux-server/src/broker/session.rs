//! A client session: its queue of pre-serialized messages, its subscriptions, and the
//! bookkeeping for held connects and expiry.

use std::collections::{HashMap, HashSet, VecDeque};

/// History still to be read for a replaying pattern: its concrete channels, each read from the
/// session's cursor for it, a page at a time as the queue drains.
#[derive(Debug)]
pub(crate) struct Backlog {
    pub(crate) pattern: Arc<str>,
    pub(crate) channels: VecDeque<String>,
}
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::{Map, Value};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::config::QueueOverflow;

/// The result of putting a message on a session's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Queued.
    Ok,
    /// Queued after dropping the oldest message (the queue was full).
    DroppedOldest,
    /// The queue was full and the overflow policy is to disconnect: the session is now closed.
    Disconnected,
    /// The session was already closed; nothing queued.
    Closed,
    /// The message's replay ID is not newer than what this session already has for its
    /// channel: a duplicate, dropped.
    Duplicate,
    /// Held back until a replay subscribe in progress has queued its history.
    Deferred,
    /// Did not pass the subscription's filter (Salesforce PushTopic `?Field=Value`).
    Filtered,
}

/// A message on its way to a session.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The concrete channel and replay ID of a stored message; `None` for a message that
    /// never went through the log (a service reply).
    pub origin: Option<(Arc<str>, u64)>,
    /// The delivered bytes (a JSON object), shared by every subscriber.
    pub bytes: Bytes,
}

/// Ack extension state: batches sent but not yet acknowledged.
#[derive(Debug, Default)]
pub(crate) struct AckState {
    /// The last batch number handed out.
    pub(crate) batch: u64,
    /// Sent, unacknowledged batches, oldest first.
    pub(crate) unacked: VecDeque<(u64, Vec<Bytes>)>,
    /// For each unacknowledged batch, `State::delivered` as it was before that batch was taken
    /// (shared engines: the oldest is where the client's confirmed deliveries end).
    pub(crate) before: VecDeque<(u64, HashMap<Arc<str>, u64>)>,
}

pub(crate) struct State {
    pub(crate) queue: VecDeque<Bytes>,
    pub(crate) subscriptions: HashSet<Arc<str>>,
    /// A connect has been answered since the handshake (so later ones may be held).
    pub(crate) connected: bool,
    /// Connects being held right now (long-poll requests, WebSocket pending connects).
    pub(crate) holds: u32,
    /// When the last connect reply went out or the last message came in, whichever is later.
    pub(crate) last_seen: Instant,
    /// Generation of the current long-poll hold, and how to release it.
    pub(crate) hold_generation: u64,
    pub(crate) release_held: Option<oneshot::Sender<()>>,
    /// Messages dropped by the overflow policy.
    pub(crate) dropped: u64,
    /// Per concrete channel, the last replay ID queued: a message not newer is a duplicate.
    pub(crate) cursors: HashMap<Arc<str>, u64>,
    /// Per concrete channel, the replay ID up to which everything has left the queue (taken
    /// for a response) or needs no delivery (where a subscription started). This, not
    /// `cursors`, goes into the shared session record: a node adopting the session must
    /// re-read what was queued here but never sent.
    pub(crate) delivered: HashMap<Arc<str>, u64>,
    /// Bumped whenever `delivered` moves; `record_generation` is the value last committed to
    /// the shared engine (a connect that sent nothing new commits nothing).
    pub(crate) delivered_generation: u64,
    pub(crate) record_generation: u64,
    /// Patterns whose replay subscribe is reading history; live messages matching them wait in
    /// `deferred` until it is done.
    pub(crate) replaying: Vec<Arc<str>>,
    pub(crate) deferred: Vec<Delivery>,
    /// Replaying patterns some of whose deferred messages were dropped because `deferred` was
    /// full; their channels are read again from the log before the replay ends.
    pub(crate) deferred_dropped: HashSet<Arc<str>>,
    /// History not yet queued, oldest replay first.
    pub(crate) backlog: Vec<Backlog>,
    /// Per concrete channel, `Field=Value` conditions on `data.sobject` (PushTopic filters).
    pub(crate) filters: HashMap<Arc<str>, Vec<(String, String)>>,
    /// The handshake asked for the replay extension.
    pub(crate) replay_ext: bool,
    /// The handshake asked for the ack extension.
    pub(crate) ack: Option<AckState>,
}

/// One client's session.
pub struct Session {
    id: Arc<str>,
    /// Dense per-process number, used as the key in subscriber sets.
    pub(crate) seq: u64,
    pub(crate) state: Mutex<State>,
    /// Woken when a message is queued or the session closes.
    pub(crate) notify: Notify,
    closed: AtomicBool,
    /// The epoch of the engine's session record this copy matches (shared engines only).
    pub(crate) epoch: AtomicU64,
    /// Free-form state for security policies and extensions (for example the principal a
    /// token named at handshake).
    pub attributes: Mutex<Map<String, Value>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("id", &self.id).finish()
    }
}

impl Session {
    pub(crate) fn new(id: String, seq: u64) -> Self {
        Session {
            id: Arc::from(id),
            seq,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                subscriptions: HashSet::new(),
                connected: false,
                holds: 0,
                last_seen: Instant::now(),
                hold_generation: 0,
                release_held: None,
                dropped: 0,
                cursors: HashMap::new(),
                delivered: HashMap::new(),
                delivered_generation: 0,
                record_generation: 0,
                replaying: Vec::new(),
                deferred: Vec::new(),
                deferred_dropped: HashSet::new(),
                backlog: Vec::new(),
                filters: HashMap::new(),
                replay_ext: false,
                ack: None,
            }),
            notify: Notify::new(),
            closed: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            attributes: Mutex::new(Map::new()),
        }
    }

    /// The clientId.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// True once disconnected or expired.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// The channels and patterns this session is subscribed to.
    pub fn subscriptions(&self) -> Vec<String> {
        self.state
            .lock()
            .subscriptions
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    /// How many messages wait in the queue.
    pub fn queued(&self) -> usize {
        self.state.lock().queue.len()
    }

    /// Messages dropped by the overflow policy so far.
    pub fn dropped(&self) -> u64 {
        self.state.lock().dropped
    }

    /// Queues a message and wakes whoever waits for this session. A stored message whose
    /// replay ID is not newer than the session's cursor for its channel is dropped as a
    /// duplicate; one matching a pattern whose replay is in progress is deferred. With
    /// `bypass_gate` (history read by a replay subscribe) the deferral is skipped.
    pub(crate) fn enqueue(
        &self,
        delivery: Delivery,
        max: usize,
        overflow: QueueOverflow,
        bypass_gate: bool,
    ) -> Enqueued {
        if self.is_closed() {
            return Enqueued::Closed;
        }
        let outcome = {
            let mut st = self.state.lock();
            enqueue_locked(&mut st, delivery, max, overflow, bypass_gate)
        };
        match outcome {
            Enqueued::Disconnected => self.close(),
            Enqueued::Ok | Enqueued::DroppedOldest => self.notify.notify_waiters(),
            Enqueued::Closed | Enqueued::Duplicate | Enqueued::Deferred | Enqueued::Filtered => {}
        }
        outcome
    }

    /// Ends the replay of `pattern`: deferred messages no longer gated are queued (newer than
    /// the history just queued, or dropped as duplicates). Returns what each enqueue did.
    pub(crate) fn finish_replay(
        &self,
        pattern: &str,
        max: usize,
        overflow: QueueOverflow,
    ) -> Vec<Enqueued> {
        let outcomes = {
            let mut st = self.state.lock();
            if let Some(i) = st.replaying.iter().position(|p| &**p == pattern) {
                st.replaying.swap_remove(i);
            }
            let deferred = std::mem::take(&mut st.deferred);
            deferred
                .into_iter()
                .map(|d| enqueue_locked(&mut st, d, max, overflow, false))
                .collect::<Vec<_>>()
        };
        if outcomes.contains(&Enqueued::Disconnected) {
            self.close();
        } else {
            self.notify.notify_waiters();
        }
        outcomes
    }

    /// Takes everything queued.
    pub(crate) fn drain(&self) -> Vec<Bytes> {
        self.state.lock().queue.drain(..).collect()
    }

    pub(crate) fn has_queued(&self) -> bool {
        !self.state.lock().queue.is_empty()
    }

    /// True while replayed history waits for room in the queue (see [`Broker::refill`]).
    ///
    /// [`Broker::refill`]: crate::broker::Broker::refill
    pub(crate) fn has_backlog(&self) -> bool {
        !self.state.lock().backlog.is_empty()
    }

    /// True when the handshake enabled the ack extension.
    pub fn ack_enabled(&self) -> bool {
        self.state.lock().ack.is_some()
    }

    pub(crate) fn touch(&self) {
        self.state.lock().last_seen = Instant::now();
    }
}

impl State {
    /// Shared engines, ack extension: a channel subscribed while batches are unconfirmed starts
    /// at `start` in their snapshots too (nothing before it is owed to the client).
    pub(crate) fn note_start(&mut self, channel: &str, start: u64) {
        if let Some(ack) = self.ack.as_mut() {
            for (_, before) in ack.before.iter_mut() {
                before.entry(Arc::from(channel)).or_insert(start);
            }
        }
    }

    /// The whole queue is being taken: everything queued so far is delivered. Only shared
    /// engines need this (it copies the cursors).
    pub(crate) fn mark_taken(&mut self) {
        if !self.queue.is_empty() {
            self.delivered.clone_from(&self.cursors);
            self.delivered_generation += 1;
        }
    }
}

fn enqueue_locked(
    st: &mut State,
    delivery: Delivery,
    max: usize,
    overflow: QueueOverflow,
    bypass_gate: bool,
) -> Enqueued {
    if let Some((channel, replay_id)) = &delivery.origin {
        if !bypass_gate
            && st
                .replaying
                .iter()
                .any(|p| bayeux_protocol::channel::matches(p, channel))
        {
            if st.deferred.len() >= max {
                // The log has it: the replay reads these channels again before it ends.
                let gating: Vec<Arc<str>> = st
                    .replaying
                    .iter()
                    .filter(|p| bayeux_protocol::channel::matches(p, channel))
                    .cloned()
                    .collect();
                st.deferred_dropped.extend(gating);
            } else {
                st.deferred.push(delivery);
            }
            return Enqueued::Deferred;
        }
        if !st.filters.is_empty()
            && let Some(conditions) = st.filters.get(channel)
            && !passes(conditions, &delivery.bytes)
        {
            return Enqueued::Filtered;
        }
        match st.cursors.get_mut(channel) {
            Some(cursor) if *replay_id <= *cursor => return Enqueued::Duplicate,
            Some(cursor) => *cursor = *replay_id,
            None => {
                st.cursors.insert(channel.clone(), *replay_id);
            }
        }
    }
    if st.queue.len() >= max {
        match overflow {
            QueueOverflow::DropOldest => {
                st.queue.pop_front();
                st.dropped += 1;
                st.queue.push_back(delivery.bytes);
                Enqueued::DroppedOldest
            }
            QueueOverflow::Disconnect => {
                st.dropped += 1 + st.queue.len() as u64;
                st.queue.clear();
                Enqueued::Disconnected
            }
        }
    } else {
        st.queue.push_back(delivery.bytes);
        Enqueued::Ok
    }
}

/// Does the delivered message satisfy every `Field=Value` condition on `data.sobject`?
fn passes(conditions: &[(String, String)], bytes: &[u8]) -> bool {
    let Ok(message) = serde_json::from_slice::<Value>(bytes) else {
        return false;
    };
    let sobject = &message["data"]["sobject"];
    conditions
        .iter()
        .all(|(field, want)| match &sobject[field.as_str()] {
            Value::String(s) => s == want,
            Value::Null => false,
            other => {
                // Numbers and booleans compare by their JSON text (`Amount=5`).
                let text = other.to_string();
                text == *want
            }
        })
}
