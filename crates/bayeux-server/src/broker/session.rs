//! A client session: its queue of pre-serialized messages, its subscriptions, and the
//! bookkeeping for held connects and expiry.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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
            }),
            notify: Notify::new(),
            closed: AtomicBool::new(false),
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

    /// Queues a pre-serialized message and wakes whoever waits for this session.
    pub(crate) fn enqueue(&self, message: Bytes, max: usize, overflow: QueueOverflow) -> Enqueued {
        if self.is_closed() {
            return Enqueued::Closed;
        }
        let outcome = {
            let mut st = self.state.lock();
            if st.queue.len() >= max {
                match overflow {
                    QueueOverflow::DropOldest => {
                        st.queue.pop_front();
                        st.dropped += 1;
                        st.queue.push_back(message);
                        Enqueued::DroppedOldest
                    }
                    QueueOverflow::Disconnect => {
                        st.dropped += 1 + st.queue.len() as u64;
                        st.queue.clear();
                        Enqueued::Disconnected
                    }
                }
            } else {
                st.queue.push_back(message);
                Enqueued::Ok
            }
        };
        if outcome == Enqueued::Disconnected {
            self.close();
        } else {
            self.notify.notify_waiters();
        }
        outcome
    }

    /// Takes everything queued.
    pub(crate) fn drain(&self) -> Vec<Bytes> {
        self.state.lock().queue.drain(..).collect()
    }

    pub(crate) fn has_queued(&self) -> bool {
        !self.state.lock().queue.is_empty()
    }

    pub(crate) fn touch(&self) {
        self.state.lock().last_seen = Instant::now();
    }
}
