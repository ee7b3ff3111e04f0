//! The engine: the bayeux server's only door to persistence and to other nodes.
//!
//! Every broadcast message is appended to its channel's log through [`Engine::append`], which
//! assigns it a **replay ID** (a number that only grows per channel). The server does not fan
//! messages out from the publish path: it consumes [`Engine::feed`], which yields every append —
//! from this node and, for a shared engine, from every other node — in replay-ID order per
//! channel. One mechanism thus serves a single node and a cluster alike.
//!
//! The engine stores opaque payloads: the serialized message **without** its replay ID (the
//! server adds the ID when it builds the delivered bytes, once per message).
//!
//! Implementations: [`memory::MemoryEngine`] (history bounded in memory),
//! [`disk::DiskEngine`] (durable logs under a data directory, group-committed) and, with the
//! feature `redis`, `redis::RedisEngine` (logs in Redis streams shared by every node of a
//! cluster). The conformance suite in [`conformance`] is what every implementation must pass.
#![deny(unreachable_pub)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub mod conformance;
pub mod disk;
pub mod memory;
#[cfg(feature = "redis")]
pub mod redis;

/// A replay ID: grows per channel, starting at 1. Zero means "before the first message".
pub type ReplayId = u64;

/// One message as stored in a channel's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The concrete channel.
    pub channel: Arc<str>,
    /// Its replay ID in that channel.
    pub replay_id: ReplayId,
    /// When it was appended, in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// The serialized message (a JSON object) without its replay ID.
    pub payload: Bytes,
}

/// How long and how much history a channel keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Messages older than this are trimmed.
    pub max_age: Duration,
    /// At most this many messages per channel (oldest trimmed first).
    pub max_messages: usize,
    /// At most this many payload bytes per channel (oldest trimmed first).
    pub max_bytes: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age: Duration::from_secs(24 * 3600),
            max_messages: 100_000,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// The first and last retained replay IDs of a channel, and the last ever issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bounds {
    /// The oldest retained message, if any is retained.
    pub first: Option<ReplayId>,
    /// The newest ID ever issued in the channel (0 if none). IDs are never reused, even after
    /// every message was trimmed.
    pub last_issued: ReplayId,
}

/// What a session needs so that any node can adopt it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SessionRecord {
    /// The clientId.
    pub client_id: String,
    /// Subscribed channel names and patterns.
    pub subscriptions: Vec<String>,
    /// Per concrete channel, the last replay ID delivered and confirmed.
    pub cursors: BTreeMap<String, ReplayId>,
    /// Extensions negotiated at handshake (for example `ack`, `replay`).
    pub extensions: Vec<String>,
    /// Grows each time a node saves the record after serving the session. A node whose local
    /// copy has another epoch knows another node served the client since, and rebuilds its
    /// copy from this record.
    #[serde(default)]
    pub epoch: u64,
    /// The node serving the session (shared engines): its cursors committed with
    /// [`Engine::commit_cursors`] are fresher than [`cursors`](SessionRecord::cursors). `None`
    /// on engines that one node uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// What [`Engine::commit_cursors`] learned about the node's sessions since its previous call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitOutcome {
    /// Sessions another node claimed: the node's copies are stale.
    pub taken: Vec<String>,
    /// Sessions removed (disconnected) by any node: they ended everywhere.
    pub ended: Vec<String>,
}

/// The cursors of one session that a node serves, for [`Engine::commit_cursors`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CursorCommit {
    /// The clientId.
    pub client_id: String,
    /// As [`SessionRecord::cursors`]: per channel, what was sent.
    pub cursors: BTreeMap<String, ReplayId>,
    /// The node stops serving the session (its local copy expired): the cursors go into the
    /// record itself, which then has no owner, and the node's commit for it is dropped.
    pub release: bool,
}

/// What a trim removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrimStats {
    /// Messages removed.
    pub messages: u64,
    /// Payload bytes removed.
    pub bytes: u64,
}

/// Engine failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The storage backend failed (disk full, I/O error, …).
    #[error("storage failed: {0}")]
    Storage(String),
    /// The backend cannot be reached now; the operation may succeed later.
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    /// The engine was closed.
    #[error("engine closed")]
    Closed,
}

/// Receives every append, in replay-ID order per channel.
pub type FeedReceiver = tokio::sync::mpsc::UnboundedReceiver<Stored>;

/// The storage and fan-out seam. Object-safe: the server holds an `Arc<dyn Engine>`.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// A short name for logs and metrics (`memory`, `disk`, `redis`).
    fn name(&self) -> &'static str;

    /// True when several server nodes share this engine (Redis). The server then keeps
    /// session records in it so that any node can adopt any client. False by default.
    fn shared(&self) -> bool {
        false
    }

    /// Appends `payload` to `channel`'s log and returns it with its new replay ID.
    ///
    /// When this returns `Ok`, the message is as durable as the engine promises (the disk
    /// engine: on disk; memory: in memory) and it has been, or will be, yielded by every
    /// [`feed`](Engine::feed) in replay-ID order. A publisher's success reply waits for this.
    async fn append(&self, channel: &str, payload: Bytes) -> Result<Stored, EngineError>;

    /// Up to `limit` retained messages of `channel` with a replay ID greater than `after`,
    /// oldest first.
    async fn read(
        &self,
        channel: &str,
        after: ReplayId,
        limit: usize,
    ) -> Result<Vec<Stored>, EngineError>;

    /// The retained range of `channel` and the last ID issued in it.
    async fn bounds(&self, channel: &str) -> Result<Bounds, EngineError>;

    /// Every concrete channel that has a log, in name order (for wildcard replay).
    async fn channels(&self) -> Result<Vec<String>, EngineError>;

    /// A new receiver of every append from now on. A server calls this once at start and fans
    /// the messages out to its own sessions. The feed never drops a message; a receiver that is
    /// dropped is forgotten.
    fn feed(&self) -> FeedReceiver;

    /// Removes what `retention` no longer keeps, as of `now`.
    async fn trim(&self, retention: &Retention, now: SystemTime) -> Result<TrimStats, EngineError>;

    /// Stores (or replaces) a session record that lives for `ttl` unless touched. A shared
    /// engine keeps a record that has an owner (see [`claim_session`](Engine::claim_session))
    /// for as long as that node commits (see [`commit_cursors`](Engine::commit_cursors)); the
    /// TTL applies once it has none.
    async fn save_session(&self, record: &SessionRecord, ttl: Duration) -> Result<(), EngineError>;

    /// Loads a session record that has not expired.
    async fn load_session(&self, client_id: &str) -> Result<Option<SessionRecord>, EngineError>;

    /// Compare-and-set: replaces session record `record.client_id` (as
    /// [`save_session`](Engine::save_session)) only if the stored record exists and has epoch
    /// `expected`; returns whether it did. Nodes sharing an engine update records with it, so
    /// that one node's change (a subscribe, say) is never overwritten by another node that read
    /// the record just before. The default loads, compares and saves: atomic only for an
    /// engine that one process uses; shared engines override it.
    async fn replace_session(
        &self,
        record: &SessionRecord,
        expected: u64,
        ttl: Duration,
    ) -> Result<bool, EngineError> {
        match self.load_session(&record.client_id).await? {
            Some(current) if current.epoch == expected => {
                self.save_session(record, ttl).await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Extends a session record's life by `ttl` from now. Unknown ids are ignored.
    async fn touch_session(&self, client_id: &str, ttl: Duration) -> Result<(), EngineError>;

    /// Removes a session record. Unknown ids are ignored. A shared engine also tells the
    /// record's owner (its next [`commit_cursors`](Engine::commit_cursors) lists the id as
    /// ended).
    async fn remove_session(&self, client_id: &str) -> Result<(), EngineError>;

    /// Makes node `node` the owner of session `client_id` and returns its record, or `None` if
    /// it does not exist (ended or expired). The returned record has epoch `epoch` (also
    /// stored) and the freshest cursors: those its previous owner last committed with
    /// [`commit_cursors`](Engine::commit_cursors), completed by the record's own for channels
    /// the owner committed nothing for. That owner, if another node, finds `client_id` among
    /// the sessions its next `commit_cursors` reports as taken. On a shared engine the record
    /// then lives as long as `node` commits; `ttl` is for engines without owners.
    ///
    /// The default (for engines one node uses) loads, sets owner and epoch, and saves.
    async fn claim_session(
        &self,
        client_id: &str,
        node: &str,
        epoch: u64,
        ttl: Duration,
    ) -> Result<Option<SessionRecord>, EngineError> {
        let Some(mut record) = self.load_session(client_id).await? else {
            return Ok(None);
        };
        record.owner = Some(node.to_owned());
        record.epoch = epoch;
        self.save_session(&record, ttl).await?;
        Ok(Some(record))
    }

    /// Records what node `node` sent to the sessions it owns: one operation for the whole
    /// batch on a shared engine, so that the cost per published message does not grow with
    /// the number of subscribers. Returns the sessions taken from `node` (claimed by another
    /// node) and those removed since its previous call; their commits in this batch are not
    /// recorded. Each call is also `node`'s heartbeat: a shared engine treats a node silent
    /// for longer than `ttl` as dead and releases its sessions (their records get their
    /// committed cursors, no owner, and the TTL `ttl`), so a node calls this at least every few
    /// seconds, with an empty batch if need be.
    ///
    /// The default (for engines one node uses) writes each record's cursors and reports
    /// nothing taken.
    async fn commit_cursors(
        &self,
        node: &str,
        commits: &[CursorCommit],
        ttl: Duration,
    ) -> Result<CommitOutcome, EngineError> {
        let _ = node;
        for commit in commits {
            if let Some(mut record) = self.load_session(&commit.client_id).await? {
                record.cursors = commit.cursors.clone();
                if commit.release {
                    record.owner = None;
                }
                self.save_session(&record, ttl).await?;
            }
        }
        Ok(CommitOutcome::default())
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    system_time_ms(SystemTime::now())
}

/// `t` in milliseconds since the Unix epoch (0 before it).
pub fn system_time_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
