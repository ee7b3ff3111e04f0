//! The disk engine: channel logs and session records in a [fjall] keyspace under a data
//! directory, so that everything acknowledged survives a restart (including `kill -9`).
//!
//! # Design
//!
//! * **One writer.** Every mutation (appends, session writes, trims) is a request to a single
//!   writer thread. It drains whatever requests are queued (up to [`MAX_BATCH`]), assigns the
//!   replay IDs, writes them all as **one atomic fjall batch** and makes it durable with **one
//!   fsync** (group commit). Only then does it publish the new bounds, push the messages to every
//!   feed (in replay-ID order, because there is one writer) and complete the waiting appends.
//!   The more publishers wait, the bigger the batch, so durability costs little throughput.
//! * **Layout.** Three partitions: `log` (key: channel number `u32` + replay ID `u64`, both
//!   big-endian, so a channel's log is one ordered key range; value: timestamp `u64` + payload),
//!   `channels` (key: channel name; value: its number, first retained ID, last issued ID and
//!   retained payload bytes) and `sessions` (key: clientId; value: expiry in ms since the epoch +
//!   the record as JSON). The `channels` entry of a channel is rewritten in the same batch as
//!   its messages, so on open the bounds are read back exactly, and `last_issued` survives even
//!   when every message was trimmed: replay IDs are never reused.
//! * **Retention.** The count and byte caps given to [`DiskEngine::open`] are applied by the
//!   writer in the batch that exceeds them (oldest first); [`Engine::trim`] applies a retention
//!   by age too, in bounded steps between appends, and sweeps expired session records.
//! * **Torn tail.** fjall writes every batch to its journal framed by start/end markers with an
//!   xxh3 checksum and replays the journal on open; a batch whose end is missing or cut short is
//!   discarded (the journal is truncated to the last whole batch). Since a batch holds both the
//!   messages and the `channels` bounds, a torn batch vanishes whole: never served, no hole.
//!
//! Two processes must not open the same directory at once (no lock file is taken yet).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use fjall::{Batch, Keyspace, PartitionCreateOptions, PartitionHandle, PersistMode};
use parking_lot::{Mutex, RwLock};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

use crate::{
    Bounds, Engine, EngineError, FeedReceiver, ReplayId, Retention, SessionRecord, Stored,
    TrimStats, now_ms, system_time_ms,
};

/// The most requests the writer commits in one batch (one fsync).
pub const MAX_BATCH: usize = 4096;

/// The most messages one trim step deletes before letting queued appends through.
const TRIM_STEP: usize = 4096;

/// A channel's bounds as kept in memory and in the `channels` partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ChannelMeta {
    /// The channel's number: the prefix of its keys in `log`.
    id: u32,
    /// The first retained replay ID; `last_issued + 1` when nothing is retained.
    first: ReplayId,
    /// The last replay ID issued.
    last_issued: ReplayId,
    /// Payload bytes retained.
    bytes: u64,
}

impl ChannelMeta {
    fn new(id: u32) -> Self {
        ChannelMeta {
            id,
            first: 1,
            last_issued: 0,
            bytes: 0,
        }
    }

    fn retained(&self) -> u64 {
        (self.last_issued + 1).saturating_sub(self.first)
    }

    fn encode(&self) -> [u8; 28] {
        let mut v = [0u8; 28];
        v[..4].copy_from_slice(&self.id.to_be_bytes());
        v[4..12].copy_from_slice(&self.first.to_be_bytes());
        v[12..20].copy_from_slice(&self.last_issued.to_be_bytes());
        v[20..28].copy_from_slice(&self.bytes.to_be_bytes());
        v
    }

    fn decode(v: &[u8]) -> Option<Self> {
        if v.len() != 28 {
            return None;
        }
        Some(ChannelMeta {
            id: u32::from_be_bytes(v[..4].try_into().ok()?),
            first: u64::from_be_bytes(v[4..12].try_into().ok()?),
            last_issued: u64::from_be_bytes(v[12..20].try_into().ok()?),
            bytes: u64::from_be_bytes(v[20..28].try_into().ok()?),
        })
    }
}

fn log_key(channel: u32, id: ReplayId) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&channel.to_be_bytes());
    k[4..].copy_from_slice(&id.to_be_bytes());
    k
}

fn key_replay_id(key: &[u8]) -> Option<ReplayId> {
    Some(u64::from_be_bytes(key.get(4..12)?.try_into().ok()?))
}

/// `log` values: timestamp, then the payload.
const TS_LEN: usize = 8;

fn log_value(timestamp_ms: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(TS_LEN + payload.len());
    v.extend_from_slice(&timestamp_ms.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn value_timestamp(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.get(..TS_LEN)?.try_into().ok()?))
}

/// `sessions` values: expiry (ms since the epoch), then the record as JSON.
fn session_value(expires_ms: u64, json: &[u8]) -> Vec<u8> {
    log_value(expires_ms, json)
}

fn ttl_ms(ttl: Duration) -> u64 {
    now_ms().saturating_add(ttl.as_millis().min(u64::MAX as u128) as u64)
}

fn storage(e: impl std::fmt::Display) -> EngineError {
    EngineError::Storage(e.to_string())
}

fn corrupt(what: &str) -> EngineError {
    EngineError::Storage(format!("corrupt {what}"))
}

/// What the engine, its readers and its writer share.
struct Shared {
    keyspace: Keyspace,
    log: PartitionHandle,
    channels: PartitionHandle,
    sessions: PartitionHandle,
    /// Bounds of every channel, as of the last commit. Readers use it to bound their scans, so
    /// they never see a message before its batch is durable.
    state: RwLock<BTreeMap<Arc<str>, ChannelMeta>>,
    feeds: Mutex<Vec<UnboundedSender<Stored>>>,
    retention: Retention,
}

type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

enum Request {
    Append {
        channel: Arc<str>,
        payload: Bytes,
        reply: Reply<Stored>,
    },
    SaveSession {
        client_id: String,
        value: Vec<u8>,
        reply: Reply<()>,
    },
    /// Extends a live record to `expires_ms`; removes it if it has expired. With `None`, only
    /// removes it if it has expired.
    TouchSession {
        client_id: String,
        expires_ms: Option<u64>,
        reply: Reply<()>,
    },
    RemoveSession {
        client_id: String,
        reply: Reply<()>,
    },
    Trim {
        retention: Retention,
        cutoff_ms: u64,
        sweep_sessions: bool,
        reply: Reply<(TrimStats, bool)>,
    },
    Shutdown,
}

/// Channel logs and session records on disk, group-committed by one writer thread.
///
/// See the [module documentation](self) for the layout and the guarantees.
pub struct DiskEngine {
    shared: Arc<Shared>,
    requests: mpsc::Sender<Request>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Held open with an exclusive lock for the engine's life: one process per directory.
    _lock: std::fs::File,
}

impl DiskEngine {
    /// Opens (or creates) the engine stored in `dir`, recovering every channel's bounds, and
    /// starts its writer thread. Appends keep at most what `retention` allows per channel by
    /// count and bytes; age is applied by [`Engine::trim`].
    pub fn open(dir: &Path, retention: Retention) -> Result<DiskEngine, EngineError> {
        std::fs::create_dir_all(dir).map_err(storage)?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))
            .map_err(storage)?;
        if let Err(e) = lock.try_lock() {
            return Err(EngineError::Storage(format!(
                "{} is in use by another process ({e})",
                dir.display()
            )));
        }
        journal::drop_torn_tail(&dir.join("fjall").join("journals"))?;
        let keyspace = fjall::Config::new(dir.join("fjall"))
            .open()
            .map_err(storage)?;
        let open = |name: &str| {
            keyspace
                .open_partition(name, PartitionCreateOptions::default())
                .map_err(storage)
        };
        let log = open("log")?;
        let channels = open("channels")?;
        let sessions = open("sessions")?;

        let mut state = BTreeMap::new();
        let mut next_id = 0u32;
        for item in channels.iter() {
            let (name, value) = item.map_err(storage)?;
            let name = std::str::from_utf8(&name).map_err(|_| corrupt("channel name"))?;
            let meta = ChannelMeta::decode(&value).ok_or_else(|| corrupt("channel record"))?;
            next_id = next_id.max(meta.id + 1);
            state.insert(Arc::<str>::from(name), meta);
        }

        let shared = Arc::new(Shared {
            keyspace,
            log,
            channels,
            sessions,
            state: RwLock::new(state),
            feeds: Mutex::new(Vec::new()),
            retention,
        });
        let (requests, rx) = mpsc::channel();
        let writer = Writer {
            shared: shared.clone(),
            next_id,
        };
        let handle = std::thread::Builder::new()
            .name("bayeux-disk-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(storage)?;
        Ok(DiskEngine {
            shared,
            requests,
            writer: Mutex::new(Some(handle)),
            _lock: lock,
        })
    }

    async fn request<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(make(tx))
            .map_err(|_| EngineError::Closed)?;
        rx.await.map_err(|_| EngineError::Closed)?
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Shared) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, EngineError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || f(&shared))
            .await
            .map_err(|e| EngineError::Storage(format!("reader failed: {e}")))?
    }
}

impl Drop for DiskEngine {
    fn drop(&mut self) {
        let _ = self.requests.send(Request::Shutdown);
        if let Some(handle) = self.writer.lock().take() {
            let _ = handle.join();
        }
    }
}

fn decode_session(value: &[u8]) -> Result<(u64, SessionRecord), EngineError> {
    let expires = value_timestamp(value).ok_or_else(|| corrupt("session record"))?;
    let record = serde_json::from_slice(&value[TS_LEN..]).map_err(|_| corrupt("session record"))?;
    Ok((expires, record))
}

#[async_trait]
impl Engine for DiskEngine {
    fn name(&self) -> &'static str {
        "disk"
    }

    async fn append(&self, channel: &str, payload: Bytes) -> Result<Stored, EngineError> {
        let channel = Arc::from(channel);
        self.request(|reply| Request::Append {
            channel,
            payload,
            reply,
        })
        .await
    }

    async fn read(
        &self,
        channel: &str,
        after: ReplayId,
        limit: usize,
    ) -> Result<Vec<Stored>, EngineError> {
        let Some((name, meta)) = self
            .shared
            .state
            .read()
            .get_key_value(channel)
            .map(|(k, v)| (k.clone(), *v))
        else {
            return Ok(Vec::new());
        };
        let start = after.saturating_add(1).max(meta.first);
        if start > meta.last_issued || limit == 0 {
            return Ok(Vec::new());
        }
        self.blocking(move |shared| {
            let range = log_key(meta.id, start)..=log_key(meta.id, meta.last_issued);
            let mut out = Vec::with_capacity(limit.min(meta.retained() as usize));
            for item in shared.log.range(range).take(limit) {
                let (key, value) = item.map_err(storage)?;
                let replay_id = key_replay_id(&key).ok_or_else(|| corrupt("log key"))?;
                let timestamp_ms = value_timestamp(&value).ok_or_else(|| corrupt("log value"))?;
                out.push(Stored {
                    channel: name.clone(),
                    replay_id,
                    timestamp_ms,
                    payload: Bytes::copy_from_slice(&value[TS_LEN..]),
                });
            }
            Ok(out)
        })
        .await
    }

    async fn bounds(&self, channel: &str) -> Result<Bounds, EngineError> {
        Ok(self
            .shared
            .state
            .read()
            .get(channel)
            .map(|m| Bounds {
                first: (m.first <= m.last_issued).then_some(m.first),
                last_issued: m.last_issued,
            })
            .unwrap_or_default())
    }

    async fn channels(&self) -> Result<Vec<String>, EngineError> {
        Ok(self
            .shared
            .state
            .read()
            .keys()
            .map(|k| k.to_string())
            .collect())
    }

    fn feed(&self) -> FeedReceiver {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.shared.feeds.lock().push(tx);
        rx
    }

    async fn trim(&self, retention: &Retention, now: SystemTime) -> Result<TrimStats, EngineError> {
        let cutoff_ms = system_time_ms(now).saturating_sub(retention.max_age.as_millis() as u64);
        let mut total = TrimStats::default();
        let mut sweep_sessions = true;
        loop {
            let retention = *retention;
            let (stats, more) = self
                .request(|reply| Request::Trim {
                    retention,
                    cutoff_ms,
                    sweep_sessions,
                    reply,
                })
                .await?;
            sweep_sessions = false;
            total.messages += stats.messages;
            total.bytes += stats.bytes;
            if !more {
                return Ok(total);
            }
        }
    }

    async fn save_session(&self, record: &SessionRecord, ttl: Duration) -> Result<(), EngineError> {
        let json = serde_json::to_vec(record).map_err(storage)?;
        let client_id = record.client_id.clone();
        let value = session_value(ttl_ms(ttl), &json);
        self.request(|reply| Request::SaveSession {
            client_id,
            value,
            reply,
        })
        .await
    }

    async fn load_session(&self, client_id: &str) -> Result<Option<SessionRecord>, EngineError> {
        let key = client_id.to_owned();
        let found = self
            .blocking(move |shared| shared.sessions.get(key.as_bytes()).map_err(storage))
            .await?;
        let Some(value) = found else {
            return Ok(None);
        };
        let (expires, record) = decode_session(&value)?;
        if expires <= now_ms() {
            // Expired: forget it (the writer only removes it if it is still expired then).
            self.remove_expired(client_id).await?;
            return Ok(None);
        }
        Ok(Some(record))
    }

    async fn touch_session(&self, client_id: &str, ttl: Duration) -> Result<(), EngineError> {
        let client_id = client_id.to_owned();
        let expires_ms = Some(ttl_ms(ttl));
        self.request(|reply| Request::TouchSession {
            client_id,
            expires_ms,
            reply,
        })
        .await
    }

    async fn remove_session(&self, client_id: &str) -> Result<(), EngineError> {
        let client_id = client_id.to_owned();
        self.request(|reply| Request::RemoveSession { client_id, reply })
            .await
    }
}

impl DiskEngine {
    /// Removes a session record if it is still expired when the writer gets to it (a touch or
    /// save queued before keeps it).
    async fn remove_expired(&self, client_id: &str) -> Result<(), EngineError> {
        let client_id = client_id.to_owned();
        self.request(|reply| Request::TouchSession {
            client_id,
            expires_ms: None,
            reply,
        })
        .await
    }
}

/// A channel touched by the batch being built.
struct Work {
    /// The channel's name, shared with the engine's state.
    name: Arc<str>,
    meta: ChannelMeta,
    /// The first replay ID issued in this batch.
    batch_start: ReplayId,
    /// The payload sizes of the messages issued in this batch, from `batch_start` on.
    sizes: Vec<u64>,
    /// Whether the channel is new (not yet in the shared state).
    is_new: bool,
}

/// A session write of the batch being built: `None` removes.
type SessionWrite = Option<Vec<u8>>;

struct Writer {
    shared: Arc<Shared>,
    next_id: u32,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Request>) {
        let mut pending = Vec::with_capacity(MAX_BATCH);
        'outer: while let Ok(first) = rx.recv() {
            let mut shutdown = matches!(first, Request::Shutdown);
            if !shutdown {
                pending.push(first);
            }
            while !shutdown && pending.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(Request::Shutdown) => shutdown = true,
                    Ok(request) => pending.push(request),
                    Err(_) => break,
                }
            }
            // Trims are committed on their own; the rest of a run of requests shares a batch.
            let mut group = Vec::new();
            for request in pending.drain(..) {
                match request {
                    Request::Trim {
                        retention,
                        cutoff_ms,
                        sweep_sessions,
                        reply,
                    } => {
                        self.commit_group(std::mem::take(&mut group));
                        let result = self.trim_step(&retention, cutoff_ms, sweep_sessions);
                        let _ = reply.send(result);
                    }
                    other => group.push(other),
                }
            }
            self.commit_group(group);
            if shutdown {
                break 'outer;
            }
        }
        // Trims are not synced when they commit; make them durable before closing.
        let _ = self.shared.keyspace.persist(PersistMode::SyncAll);
    }

    /// The payload size of `id`, retained in `work`'s channel.
    fn size_of(&self, work: &Work, id: ReplayId) -> u64 {
        if id >= work.batch_start {
            return work.sizes[(id - work.batch_start) as usize];
        }
        match self.shared.log.size_of(log_key(work.meta.id, id)) {
            Ok(Some(len)) => u64::from(len).saturating_sub(TS_LEN as u64),
            _ => 0,
        }
    }

    fn commit_group(&mut self, group: Vec<Request>) {
        if group.is_empty() {
            return;
        }
        let shared = self.shared.clone();
        let retention = shared.retention;
        let timestamp_ms = now_ms();
        let mut batch = shared
            .keyspace
            .batch()
            .durability(Some(PersistMode::SyncAll));
        let mut work: HashMap<Arc<str>, Work> = HashMap::new();
        let mut appended: Vec<(Stored, Reply<Stored>)> = Vec::new();
        let mut session_writes: HashMap<String, SessionWrite> = HashMap::new();
        let mut done: Vec<Reply<()>> = Vec::new();
        let mut failed: Vec<(Reply<()>, EngineError)> = Vec::new();

        {
            let state = shared.state.read();
            for request in group {
                match request {
                    Request::Append {
                        channel,
                        payload,
                        reply,
                    } => {
                        if !work.contains_key(&channel) {
                            let (name, meta, is_new) = match state.get_key_value(&channel) {
                                Some((name, meta)) => (name.clone(), *meta, false),
                                None => {
                                    let meta = ChannelMeta::new(self.next_id);
                                    self.next_id += 1;
                                    (channel.clone(), meta, true)
                                }
                            };
                            let w = Work {
                                name,
                                meta,
                                batch_start: meta.last_issued + 1,
                                sizes: Vec::new(),
                                is_new,
                            };
                            work.insert(channel.clone(), w);
                        }
                        let w = work.get_mut(&channel).expect("inserted above");
                        w.meta.last_issued += 1;
                        w.meta.bytes += payload.len() as u64;
                        w.sizes.push(payload.len() as u64);
                        let stored = Stored {
                            channel: w.name.clone(),
                            replay_id: w.meta.last_issued,
                            timestamp_ms,
                            payload,
                        };
                        appended.push((stored, reply));
                    }
                    Request::SaveSession {
                        client_id,
                        value,
                        reply,
                    } => {
                        session_writes.insert(client_id, Some(value));
                        done.push(reply);
                    }
                    Request::TouchSession {
                        client_id,
                        expires_ms,
                        reply,
                    } => {
                        let current = match session_writes.get(&client_id) {
                            Some(write) => Ok(write.clone()),
                            None => shared
                                .sessions
                                .get(client_id.as_bytes())
                                .map(|v| v.map(|v| v.to_vec()))
                                .map_err(storage),
                        };
                        match current {
                            Ok(Some(value)) => {
                                let expired = value_timestamp(&value).is_none_or(|e| e <= now_ms());
                                if expired {
                                    session_writes.insert(client_id, None);
                                } else if let Some(expires_ms) = expires_ms {
                                    let mut value = value;
                                    value[..TS_LEN].copy_from_slice(&expires_ms.to_be_bytes());
                                    session_writes.insert(client_id, Some(value));
                                }
                                done.push(reply);
                            }
                            Ok(None) => done.push(reply),
                            Err(e) => failed.push((reply, e)),
                        }
                    }
                    Request::RemoveSession { client_id, reply } => {
                        session_writes.insert(client_id, None);
                        done.push(reply);
                    }
                    Request::Trim { .. } | Request::Shutdown => {
                        unreachable!("handled by run")
                    }
                }
            }
        }

        // Apply the engine's caps, then write the survivors and the new bounds.
        for (name, w) in work.iter_mut() {
            let old_first = w.meta.first;
            let max_messages = retention.max_messages as u64;
            if w.meta.retained() > max_messages {
                let new_first = w.meta.last_issued + 1 - max_messages;
                while w.meta.first < new_first {
                    w.meta.bytes = w.meta.bytes.saturating_sub(self.size_of(w, w.meta.first));
                    w.meta.first += 1;
                }
            }
            while w.meta.bytes > retention.max_bytes && w.meta.first <= w.meta.last_issued {
                w.meta.bytes = w.meta.bytes.saturating_sub(self.size_of(w, w.meta.first));
                w.meta.first += 1;
            }
            for id in old_first..w.meta.first.min(w.batch_start) {
                batch.remove(&shared.log, log_key(w.meta.id, id));
            }
            batch.insert(&shared.channels, name.as_bytes(), w.meta.encode());
        }
        for (stored, _) in &appended {
            let w = &work[&stored.channel];
            if stored.replay_id >= w.meta.first {
                batch.insert(
                    &shared.log,
                    log_key(w.meta.id, stored.replay_id),
                    log_value(timestamp_ms, &stored.payload),
                );
            }
        }
        for (client_id, write) in session_writes {
            match write {
                Some(value) => batch.insert(&shared.sessions, client_id.as_bytes(), value),
                None => batch.remove(&shared.sessions, client_id.as_bytes()),
            }
        }

        if let Err(e) = batch.commit() {
            let e = e.to_string();
            for (_, reply) in appended {
                let _ = reply.send(Err(EngineError::Storage(e.clone())));
            }
            for reply in done {
                let _ = reply.send(Err(EngineError::Storage(e.clone())));
            }
            for (reply, e) in failed {
                let _ = reply.send(Err(e));
            }
            return;
        }

        {
            let mut state = shared.state.write();
            for (name, w) in work {
                if w.is_new {
                    state.insert(name, w.meta);
                } else if let Some(meta) = state.get_mut(&name) {
                    *meta = w.meta;
                }
            }
        }
        {
            let mut feeds = shared.feeds.lock();
            for (stored, _) in &appended {
                feeds.retain(|feed| feed.send(stored.clone()).is_ok());
            }
        }
        for (stored, reply) in appended {
            let _ = reply.send(Ok(stored));
        }
        for reply in done {
            let _ = reply.send(Ok(()));
        }
        for (reply, e) in failed {
            let _ = reply.send(Err(e));
        }
    }

    /// Trims at most [`TRIM_STEP`] messages; returns what it removed and whether more may remain.
    fn trim_step(
        &mut self,
        retention: &Retention,
        cutoff_ms: u64,
        sweep_sessions: bool,
    ) -> Result<(TrimStats, bool), EngineError> {
        let shared = self.shared.clone();
        let mut batch = shared.keyspace.batch();
        let mut stats = TrimStats::default();
        let mut budget = TRIM_STEP;
        let mut more = false;
        let mut changed = Vec::new();
        let snapshot: Vec<(Arc<str>, ChannelMeta)> = shared
            .state
            .read()
            .iter()
            .filter(|(_, m)| m.first <= m.last_issued)
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        for (name, mut meta) in snapshot {
            if budget == 0 {
                more = true;
                break;
            }
            let before = meta;
            let range = log_key(meta.id, meta.first)..=log_key(meta.id, meta.last_issued);
            for item in shared.log.range(range) {
                let (key, value) = item.map_err(storage)?;
                let ts = value_timestamp(&value).ok_or_else(|| corrupt("log value"))?;
                let size = (value.len() - TS_LEN) as u64;
                let trim = meta.retained() > retention.max_messages as u64
                    || meta.bytes > retention.max_bytes
                    || ts < cutoff_ms;
                if !trim {
                    break;
                }
                if budget == 0 {
                    more = true;
                    break;
                }
                meta.first = key_replay_id(&key).ok_or_else(|| corrupt("log key"))? + 1;
                batch.remove(&shared.log, key);
                meta.bytes = meta.bytes.saturating_sub(size);
                stats.messages += 1;
                stats.bytes += size;
                budget -= 1;
            }
            if meta != before {
                batch.insert(&shared.channels, name.as_bytes(), meta.encode());
                changed.push((name, meta));
            }
        }
        if sweep_sessions {
            let now = now_ms();
            for item in shared.sessions.iter() {
                let (key, value) = item.map_err(storage)?;
                if value_timestamp(&value).is_none_or(|e| e <= now) {
                    batch.remove(&shared.sessions, key);
                }
            }
        }
        if batch.is_empty() {
            return Ok((stats, false));
        }
        commit(batch)?;
        let mut state = shared.state.write();
        for (name, meta) in changed {
            if let Some(m) = state.get_mut(&name) {
                *m = meta;
            }
        }
        Ok((stats, more))
    }
}

fn commit(batch: Batch) -> Result<(), EngineError> {
    batch.commit().map_err(storage)
}

/// A check of fjall's active journal before it is opened, for the one torn tail fjall 2 does not
/// drop by itself.
///
/// fjall frames each batch as a start marker, its items and an end marker holding an xxh3
/// checksum of the items and a magic trailer. On open it drops a batch that is cut short (no
/// whole end marker), but a batch that is whole in length with damaged contents (a crash that
/// persisted the end of a write but not its middle) makes it refuse to open, and a damaged start
/// marker can make it panic. This check finds such a batch: if it is the last one in the journal
/// (nothing valid follows), it was never acknowledged (acknowledged batches were synced whole),
/// so the journal is truncated before it; if a valid batch follows, acknowledged data is damaged
/// and opening fails instead of serving it.
///
/// The format is fjall 2.11's (which is why its version is pinned).
mod journal {
    use std::path::Path;

    use crate::EngineError;

    const START: u8 = 1;
    const ITEM: u8 = 2;
    const END: u8 = 3;
    const MAGIC: &[u8] = b"FJL\x02";

    struct Cursor<'a> {
        data: &'a [u8],
        pos: usize,
    }

    impl Cursor<'_> {
        fn take(&mut self, n: usize) -> Option<&[u8]> {
            let end = self.pos.checked_add(n)?;
            let bytes = self.data.get(self.pos..end)?;
            self.pos = end;
            Some(bytes)
        }
        fn u8(&mut self) -> Option<u8> {
            Some(self.take(1)?[0])
        }
        fn u16(&mut self) -> Option<usize> {
            Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?).into())
        }
        fn u32(&mut self) -> Option<u32> {
            Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
        }
        fn u64(&mut self) -> Option<u64> {
            Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
        }
    }

    /// What one batch at a position turned out to be.
    enum Batch {
        /// Whole and valid: the next one starts at `end`.
        Valid { end: usize },
        /// Whole in length, but its checksum or start marker is wrong: the next one starts at
        /// `end`.
        Damaged { end: usize },
        /// No batch here: the end of the data (zeros, EOF or a write cut short).
        End,
    }

    fn batch_at(data: &[u8], pos: usize) -> Batch {
        let mut c = Cursor { data, pos };
        let header = (|| {
            if c.u8()? != START {
                return None;
            }
            let count = c.u32()?;
            let _seqno = c.u64()?;
            let compression = c.take(2)?;
            Some((count, compression == [0, 0]))
        })();
        let Some((count, start_ok)) = header else {
            return Batch::End;
        };
        let items_start = c.pos;
        let items = (|| {
            for _ in 0..count {
                if c.u8()? != ITEM {
                    return None;
                }
                let _value_type = c.u8()?;
                let partition = c.u8()?;
                c.take(partition.into())?;
                let key = c.u16()?;
                c.take(key)?;
                let value = c.u32()?;
                c.take(value as usize)?;
            }
            Some(c.pos)
        })();
        let Some(items_end) = items else {
            return Batch::End;
        };
        let end = (|| {
            if c.u8()? != END {
                return None;
            }
            let checksum = c.u64()?;
            (c.take(MAGIC.len())? == MAGIC).then_some(checksum)
        })();
        let Some(checksum) = end else {
            return Batch::End;
        };
        if start_ok && xxhash_rust::xxh3::xxh3_64(&data[items_start..items_end]) == checksum {
            Batch::Valid { end: c.pos }
        } else {
            Batch::Damaged { end: c.pos }
        }
    }

    /// Where the journal must be cut to drop a damaged last batch, if it must; an error if
    /// damaged data is followed by valid data.
    pub(super) fn torn_tail(data: &[u8]) -> Result<Option<usize>, String> {
        let mut pos = 0;
        let mut damaged: Option<usize> = None;
        loop {
            match batch_at(data, pos) {
                Batch::Valid { end } => {
                    if let Some(at) = damaged {
                        return Err(format!(
                            "journal damaged at byte {at}, before valid data at byte {pos}"
                        ));
                    }
                    pos = end;
                }
                Batch::Damaged { end } => {
                    damaged.get_or_insert(pos);
                    pos = end;
                }
                Batch::End => return Ok(damaged),
            }
        }
    }

    /// Truncates the newest journal in `dir` before a damaged last batch (see the module doc).
    pub(super) fn drop_torn_tail(dir: &Path) -> Result<(), EngineError> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Ok(()); // a new engine
        };
        let newest = entries
            .filter_map(|e| {
                let path = e.ok()?.path();
                let n: u64 = path.file_name()?.to_str()?.parse().ok()?;
                Some((n, path))
            })
            .max();
        let Some((_, path)) = newest else {
            return Ok(());
        };
        let data = std::fs::read(&path).map_err(super::storage)?;
        let cut = torn_tail(&data)
            .map_err(|e| EngineError::Storage(format!("{}: {e}", path.display())))?;
        if let Some(at) = cut {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(super::storage)?;
            file.set_len(at as u64).map_err(super::storage)?;
            file.sync_all().map_err(super::storage)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Write};
    use std::path::PathBuf;
    use std::process::{Command, Stdio};
    use std::time::Instant;

    use super::*;

    fn generous() -> Retention {
        Retention {
            max_age: Duration::from_secs(3600),
            max_messages: 1_000_000,
            max_bytes: u64::MAX,
        }
    }

    /// All of the same size.
    fn payload(i: usize) -> Bytes {
        Bytes::from(format!(r#"{{"channel":"/c","data":"{i:06}"}}"#))
    }

    fn open(dir: &Path) -> Arc<DiskEngine> {
        Arc::new(DiskEngine::open(dir, generous()).expect("open"))
    }

    async fn ids(engine: &DiskEngine, channel: &str) -> Vec<ReplayId> {
        engine
            .read(channel, 0, usize::MAX)
            .await
            .unwrap()
            .iter()
            .map(|s| s.replay_id)
            .collect()
    }

    #[tokio::test]
    async fn conformance() {
        let dirs = Mutex::new(Vec::new());
        crate::conformance::run_all(|retention| {
            let dir = tempfile::tempdir().unwrap();
            let engine = DiskEngine::open(dir.path(), retention).unwrap();
            dirs.lock().push(dir);
            Arc::new(engine) as Arc<dyn Engine>
        })
        .await;
    }

    #[tokio::test]
    async fn a_directory_is_opened_by_one_engine_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = DiskEngine::open(dir.path(), Retention::default()).unwrap();
        match DiskEngine::open(dir.path(), Retention::default()) {
            Err(EngineError::Storage(msg)) => assert!(msg.contains("in use"), "{msg}"),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("a second engine opened a directory in use"),
        }
        drop(first);
        DiskEngine::open(dir.path(), Retention::default()).expect("reopen after drop");
    }

    #[tokio::test]
    async fn reopen_keeps_data_ids_and_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let record = SessionRecord {
            client_id: "c1".into(),
            subscriptions: vec!["/a".into()],
            cursors: [("/a".to_owned(), 3)].into_iter().collect(),
            extensions: vec!["replay".into()],
            epoch: 9,
            owner: None,
        };
        {
            let engine = open(dir.path());
            for i in 0..5 {
                engine.append("/a", payload(i)).await.unwrap();
            }
            for i in 0..3 {
                engine.append("/b", payload(i)).await.unwrap();
            }
            engine
                .save_session(&record, Duration::from_secs(60))
                .await
                .unwrap();
            engine
                .save_session(
                    &SessionRecord {
                        client_id: "short".into(),
                        ..SessionRecord::default()
                    },
                    Duration::from_millis(1),
                )
                .await
                .unwrap();
        }
        let engine = open(dir.path());
        assert_eq!(engine.channels().await.unwrap(), ["/a", "/b"]);
        assert_eq!(ids(&engine, "/a").await, [1, 2, 3, 4, 5]);
        let b = engine.read("/b", 0, 10).await.unwrap();
        assert_eq!(
            b.iter().map(|s| s.payload.clone()).collect::<Vec<_>>(),
            [payload(0), payload(1), payload(2)]
        );
        assert!(b.iter().all(|s| s.timestamp_ms > 0 && &*s.channel == "/b"));
        assert_eq!(
            engine.bounds("/a").await.unwrap(),
            Bounds {
                first: Some(1),
                last_issued: 5
            }
        );
        assert_eq!(engine.append("/a", payload(9)).await.unwrap().replay_id, 6);
        assert_eq!(engine.append("/c", payload(9)).await.unwrap().replay_id, 1);
        assert_eq!(
            engine.read("/c", 0, 10).await.unwrap()[0].payload,
            payload(9)
        );
        assert_eq!(engine.load_session("c1").await.unwrap(), Some(record));
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(engine.load_session("short").await.unwrap(), None);
    }

    #[tokio::test]
    async fn ids_are_never_reused_after_trimming_everything_and_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let engine = open(dir.path());
            for i in 0..4 {
                engine.append("/t", payload(i)).await.unwrap();
            }
            let later = SystemTime::now() + Duration::from_secs(7200);
            let stats = engine.trim(&generous(), later).await.unwrap();
            assert_eq!(stats.messages, 4);
            assert_eq!(
                stats.bytes,
                (0..4).map(|i| payload(i).len() as u64).sum::<u64>()
            );
            assert_eq!(
                engine.bounds("/t").await.unwrap(),
                Bounds {
                    first: None,
                    last_issued: 4
                }
            );
        }
        let engine = open(dir.path());
        assert!(engine.read("/t", 0, 10).await.unwrap().is_empty());
        assert_eq!(engine.bounds("/t").await.unwrap().last_issued, 4);
        assert_eq!(engine.append("/t", payload(0)).await.unwrap().replay_id, 5);
        assert_eq!(ids(&engine, "/t").await, [5]);
    }

    #[tokio::test]
    async fn retention_caps_by_bytes_and_count_and_trim_by_age() {
        let dir = tempfile::tempdir().unwrap();
        let size = payload(0).len() as u64;
        let retention = Retention {
            max_bytes: size * 3,
            ..generous()
        };
        {
            let engine = Arc::new(DiskEngine::open(dir.path(), retention).unwrap());
            for i in 0..5 {
                engine.append("/bytes", payload(i)).await.unwrap();
            }
            assert_eq!(ids(&engine, "/bytes").await, [3, 4, 5]);
            // A batch bigger than the cap keeps only its tail.
            let mut tasks = Vec::new();
            for i in 0..20 {
                let engine = engine.clone();
                tasks.push(tokio::spawn(async move {
                    engine.append("/bytes", payload(i)).await.unwrap()
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            assert_eq!(ids(&engine, "/bytes").await, [23, 24, 25]);
            assert_eq!(engine.bounds("/bytes").await.unwrap().first, Some(23));
        }
        // The caps were persisted with the batches.
        let engine = open(dir.path());
        assert_eq!(ids(&engine, "/bytes").await, [23, 24, 25]);
        for i in 0..6 {
            engine.append("/count", payload(i)).await.unwrap();
        }
        // trim() with a count cap and then by age.
        let stats = engine
            .trim(
                &Retention {
                    max_messages: 2,
                    ..generous()
                },
                SystemTime::now(),
            )
            .await
            .unwrap();
        assert_eq!(stats.messages, 1 + 4);
        assert_eq!(ids(&engine, "/count").await, [5, 6]);
        assert_eq!(ids(&engine, "/bytes").await, [24, 25]);
        let stats = engine
            .trim(&generous(), SystemTime::now() + Duration::from_secs(7200))
            .await
            .unwrap();
        assert_eq!(stats.messages, 4);
        assert_eq!(stats.bytes, 4 * size);
        assert!(engine.read("/count", 0, 10).await.unwrap().is_empty());
        // Nothing left to trim: an empty step.
        let stats = engine.trim(&generous(), SystemTime::now()).await.unwrap();
        assert_eq!(stats, TrimStats::default());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn trim_of_many_messages_runs_in_steps() {
        let dir = tempfile::tempdir().unwrap();
        let engine = open(dir.path());
        let mut tasks = Vec::new();
        for t in 0..64 {
            let engine = engine.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..80 {
                    engine.append("/many", payload(t * 100 + i)).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(engine.bounds("/many").await.unwrap().last_issued, 5120);
        let stats = engine
            .trim(
                &Retention {
                    max_messages: 10,
                    ..generous()
                },
                SystemTime::now(),
            )
            .await
            .unwrap();
        assert_eq!(stats.messages, 5110);
        assert_eq!(
            ids(&engine, "/many").await,
            (5111..=5120).collect::<Vec<_>>()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_from_64_tasks_are_acknowledged_and_contiguous() {
        let dir = tempfile::tempdir().unwrap();
        let engine = open(dir.path());
        let mut feed = engine.feed();
        let mut tasks = Vec::new();
        for t in 0..64usize {
            let engine = engine.clone();
            tasks.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..25 {
                    let p = payload(t * 1000 + i);
                    let s = engine
                        .append(&format!("/p/{}", t % 4), p.clone())
                        .await
                        .unwrap();
                    assert_eq!(s.payload, p);
                    acked.push(s);
                }
                acked
            }));
        }
        let mut by_channel: HashMap<String, Vec<Stored>> = HashMap::new();
        for t in tasks {
            for s in t.await.unwrap() {
                by_channel.entry(s.channel.to_string()).or_default().push(s);
            }
        }
        assert_eq!(by_channel.len(), 4);
        for (channel, mut acked) in by_channel {
            acked.sort_by_key(|s| s.replay_id);
            let expect: Vec<ReplayId> = (1..=400).collect();
            assert_eq!(
                acked.iter().map(|s| s.replay_id).collect::<Vec<_>>(),
                expect,
                "{channel}: ids not contiguous"
            );
            let stored = engine.read(&channel, 0, 1000).await.unwrap();
            assert_eq!(stored, acked, "{channel}: read differs from acks");
        }
        let mut last: HashMap<String, ReplayId> = HashMap::new();
        for _ in 0..1600 {
            let s = feed.try_recv().expect("feed has every acknowledged append");
            let prev = last.insert(s.channel.to_string(), s.replay_id);
            assert_eq!(prev.unwrap_or(0) + 1, s.replay_id, "feed order");
        }
        assert!(feed.try_recv().is_err());
    }

    fn journals(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(dir.join("fjall/journals"))
            .unwrap()
            .filter_map(|e| {
                let path = e.ok()?.path();
                let n = path.file_name()?.to_str()?.parse().ok()?;
                Some((n, path))
            })
            .collect();
        files.sort();
        files.into_iter().map(|(_, p)| p).collect()
    }

    #[tokio::test]
    async fn a_torn_tail_is_dropped_whole() {
        let dir = tempfile::tempdir().unwrap();
        let journal = ten_batches(dir.path()).await;
        // Tear the last batch, as a crash in the middle of its write would: the journal is
        // preallocated (zeros after the data), so a write cut short leaves zeros at its end.
        let mut bytes = std::fs::read(&journal).unwrap();
        let end = bytes
            .iter()
            .rposition(|b| *b != 0)
            .expect("journal has data")
            + 1;
        bytes[end - 5..end].fill(0);
        std::fs::write(&journal, &bytes).unwrap();

        let engine = open(dir.path());
        let kept = engine.read("/torn", 0, 100).await.unwrap();
        assert_eq!(
            kept.iter().map(|s| s.replay_id).collect::<Vec<_>>(),
            (1..=9).collect::<Vec<_>>()
        );
        for (i, s) in kept.iter().enumerate() {
            assert_eq!(s.payload, payload(i));
        }
        assert_eq!(engine.bounds("/torn").await.unwrap().last_issued, 9);
        // The dropped append was never acknowledged in a real crash, so its ID is free.
        let next = engine.append("/torn", payload(10)).await.unwrap();
        assert_eq!(next.replay_id, 10);
        assert_eq!(ids(&engine, "/torn").await, (1..=10).collect::<Vec<_>>());
    }

    /// Ten appends, one batch each, then the engine is closed; returns the active journal.
    async fn ten_batches(dir: &Path) -> PathBuf {
        let engine = open(dir);
        for i in 0..10 {
            engine.append("/torn", payload(i)).await.unwrap();
        }
        drop(engine);
        journals(dir).pop().expect("a journal")
    }

    #[tokio::test]
    async fn a_damaged_last_batch_is_dropped_and_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let journal = ten_batches(dir.path()).await;
        // Damage the last payload byte of the last batch, keeping its length and end marker, as
        // a crash that persisted the end of a write but not all of its middle would.
        let mut bytes = std::fs::read(&journal).unwrap();
        let end = bytes.iter().rposition(|b| *b != 0).unwrap() + 1;
        let last_payload_byte = end - 13 - 1; // the end marker is 13 bytes
        assert_eq!(bytes[last_payload_byte], b'}');
        bytes[last_payload_byte] = b'~';
        std::fs::write(&journal, &bytes).unwrap();

        let engine = open(dir.path());
        let kept = engine.read("/torn", 0, 100).await.unwrap();
        assert_eq!(kept.len(), 9);
        for (i, s) in kept.iter().enumerate() {
            assert_eq!((s.replay_id, &s.payload), (i as u64 + 1, &payload(i)));
        }
        assert_eq!(
            engine.append("/torn", payload(10)).await.unwrap().replay_id,
            10
        );
    }

    #[tokio::test]
    async fn damaged_acknowledged_data_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let journal = ten_batches(dir.path()).await;
        let mut bytes = std::fs::read(&journal).unwrap();
        let first = payload(0);
        let at = bytes
            .windows(first.len())
            .position(|w| w == &first[..])
            .expect("the first payload is in the journal");
        bytes[at + 1] ^= 0x20;
        std::fs::write(&journal, &bytes).unwrap();
        match DiskEngine::open(dir.path(), generous()) {
            Err(EngineError::Storage(e)) => assert!(e.contains("damaged"), "{e}"),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("opened over damaged acknowledged data"),
        }
    }

    #[test]
    fn journal_scan_stops_at_zeros_and_garbage() {
        assert_eq!(journal::torn_tail(&[]), Ok(None));
        assert_eq!(journal::torn_tail(&[0; 64]), Ok(None));
        assert_eq!(journal::torn_tail(&[1, 0, 0, 0, 5]), Ok(None));
        assert_eq!(journal::torn_tail(&[7; 64]), Ok(None));
    }

    const CHILD_DIR: &str = "BAYEUX_DISK_CRASH_CHILD_DIR";
    const CHILD_TASKS: usize = 16;
    const CHILD_CHANNELS: usize = 4;

    /// Not a test on its own: the child process of
    /// [`kill_9_loses_nothing_acknowledged`], which runs it with `CHILD_DIR` set. It appends from
    /// many tasks and prints each acknowledged append until it is killed (or a minute passes).
    #[test]
    fn crash_child() {
        let Some(dir) = std::env::var_os(CHILD_DIR) else {
            return;
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let engine = open(Path::new(&dir));
            for t in 0..CHILD_TASKS {
                let engine = engine.clone();
                tokio::spawn(async move {
                    let channel = format!("/crash/{}", t % CHILD_CHANNELS);
                    for n in 0.. {
                        let p = Bytes::from(format!(r#"{{"t":{t},"n":{n}}}"#));
                        let s = engine.append(&channel, p).await.unwrap();
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "ACK {} {} {t} {n}", s.channel, s.replay_id).unwrap();
                        out.flush().unwrap();
                    }
                });
            }
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kill_9_loses_nothing_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "disk::tests::crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            let mut stdout = BufReader::new(stdout);
            loop {
                let mut line = String::new();
                match stdout.read_line(&mut line) {
                    // A line cut short by the kill was not a complete acknowledgement.
                    Ok(n) if n > 0 && line.ends_with('\n') => {
                        if tx.send(line).is_err() {
                            return;
                        }
                    }
                    _ => return,
                }
            }
        });
        // Let it run until it has acknowledged a good number of appends, then kill -9.
        let mut lines = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while lines
            .iter()
            .filter(|l: &&String| l.starts_with("ACK "))
            .count()
            < 3000
            && Instant::now() < deadline
        {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
                lines.push(line);
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        lines.extend(rx.try_iter());

        // channel -> id -> (task, n)
        let mut acked: HashMap<String, BTreeMap<ReplayId, (usize, u64)>> = HashMap::new();
        for line in lines.iter().filter(|l| l.starts_with("ACK ")) {
            let f: Vec<&str> = line.split_whitespace().collect();
            acked.entry(f[1].to_owned()).or_default().insert(
                f[2].parse().unwrap(),
                (f[3].parse().unwrap(), f[4].parse().unwrap()),
            );
        }
        let total: usize = acked.values().map(BTreeMap::len).sum();
        assert!(total >= 100, "the child acknowledged only {total} appends");
        eprintln!("the child acknowledged {total} appends before kill -9");

        let engine = open(dir.path());
        for c in 0..CHILD_CHANNELS {
            let channel = format!("/crash/{c}");
            let stored = engine.read(&channel, 0, usize::MAX).await.unwrap();
            let last = engine.bounds(&channel).await.unwrap().last_issued;
            assert_eq!(
                stored.iter().map(|s| s.replay_id).collect::<Vec<_>>(),
                (1..=last).collect::<Vec<_>>(),
                "{channel}: ids not contiguous from 1"
            );
            let mut next_n: HashMap<usize, u64> = HashMap::new();
            for s in &stored {
                let v: serde_json::Value =
                    serde_json::from_slice(&s.payload).expect("a valid payload");
                let t = v["t"].as_u64().unwrap() as usize;
                let n = v["n"].as_u64().unwrap();
                assert_eq!(
                    t % CHILD_CHANNELS,
                    c,
                    "{channel}: payload of another channel"
                );
                // Each task appends in sequence: its messages are all there, in order.
                let expect = next_n.entry(t).or_insert(0);
                assert_eq!(n, *expect, "{channel}: task {t} skipped or reordered");
                *expect += 1;
            }
            for (id, (t, n)) in acked.get(&channel).into_iter().flatten() {
                let s = stored
                    .get((*id - 1) as usize)
                    .unwrap_or_else(|| panic!("{channel}: acknowledged {id} lost"));
                assert_eq!(
                    s.payload,
                    Bytes::from(format!(r#"{{"t":{t},"n":{n}}}"#)),
                    "{channel}: acknowledged {id} differs"
                );
            }
            let next = engine.append(&channel, payload(0)).await.unwrap();
            assert_eq!(next.replay_id, last + 1, "{channel}: ids reused");
        }
    }
}
