//! The memory engine: logs and sessions in this process. Nothing survives a restart.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};

use crate::{
    Bounds, CommitOutcome, CursorCommit, Engine, EngineError, FeedReceiver, ReplayId, Retention,
    SessionRecord, Stored, TrimStats, now_ms, system_time_ms,
};

#[derive(Default)]
struct ChannelLog {
    messages: VecDeque<Stored>,
    bytes: u64,
    last_issued: ReplayId,
}

#[derive(Default)]
struct Logs {
    channels: BTreeMap<Arc<str>, ChannelLog>,
    feeds: Vec<UnboundedSender<Stored>>,
}

/// Keeps each channel's recent history in memory, bounded by a [`Retention`] applied on every
/// append (count and bytes) and by [`Engine::trim`] (age).
pub struct MemoryEngine {
    // One lock for all logs: appends are short, and one lock makes the feed order trivially
    // equal to the replay-ID order.
    logs: Mutex<Logs>,
    sessions: Mutex<Sessions>,
    retention: Retention,
}

/// Session records, and what each node committed for the sessions it owns (several brokers
/// in one process can share a memory engine, as nodes share Redis).
#[derive(Default)]
struct Sessions {
    /// Each record with its expiry; `None` while a node owns it.
    records: HashMap<String, (SessionRecord, Option<Instant>)>,
    nodes: HashMap<String, NodeCommits>,
}

#[derive(Default)]
struct NodeCommits {
    cursors: HashMap<String, BTreeMap<String, ReplayId>>,
    /// Sessions taken from the node since its last commit.
    taken: HashSet<String>,
    /// Sessions of the node removed since its last commit.
    ended: HashSet<String>,
    /// Its last commit.
    heartbeat: Option<Instant>,
}

impl Sessions {
    fn live(&mut self, client_id: &str) -> Option<&mut SessionRecord> {
        if self
            .records
            .get(client_id)
            .is_some_and(|(_, expires)| expires.is_some_and(|e| e <= Instant::now()))
        {
            self.records.remove(client_id);
        }
        self.records.get_mut(client_id).map(|(r, _)| r)
    }

    /// Takes `client_id` from its owner (for `new_owner`, or because it ended), returning what
    /// the owner committed for it.
    fn take_from_owner(
        &mut self,
        client_id: &str,
        owner: Option<&str>,
        new_owner: Option<&str>,
    ) -> Option<BTreeMap<String, ReplayId>> {
        let node = self.nodes.entry(owner?.to_owned()).or_default();
        let committed = node.cursors.remove(client_id);
        match new_owner {
            None => {
                node.ended.insert(client_id.to_owned());
            }
            Some(new) if owner != Some(new) => {
                node.taken.insert(client_id.to_owned());
            }
            Some(_) => {}
        }
        committed
    }

    /// `node` no longer serves `client_id`: the record gets `cursors`, no owner, and `ttl`.
    fn release(
        &mut self,
        client_id: &str,
        node: &str,
        cursors: BTreeMap<String, ReplayId>,
        ttl: Duration,
    ) {
        if let Some((record, expires)) = self.records.get_mut(client_id)
            && record.owner.as_deref() == Some(node)
        {
            record.cursors = cursors;
            record.owner = None;
            *expires = Some(Instant::now() + ttl);
        }
    }
}

impl MemoryEngine {
    /// A memory engine that keeps at most what `retention` allows.
    pub fn new(retention: Retention) -> Self {
        MemoryEngine {
            logs: Mutex::new(Logs::default()),
            sessions: Mutex::new(Sessions::default()),
            retention,
        }
    }
}

impl Default for MemoryEngine {
    fn default() -> Self {
        MemoryEngine::new(Retention::default())
    }
}

fn trim_log(log: &mut ChannelLog, retention: &Retention, cutoff_ms: u64, stats: &mut TrimStats) {
    while let Some(front) = log.messages.front() {
        let over_count = log.messages.len() > retention.max_messages;
        let over_bytes = log.bytes > retention.max_bytes;
        if over_count || over_bytes || front.timestamp_ms < cutoff_ms {
            let len = front.payload.len() as u64;
            log.bytes -= len;
            log.messages.pop_front();
            stats.messages += 1;
            stats.bytes += len;
        } else {
            break;
        }
    }
}

#[async_trait]
impl Engine for MemoryEngine {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn append(&self, channel: &str, payload: Bytes) -> Result<Stored, EngineError> {
        let mut logs = self.logs.lock();
        let logs = &mut *logs;
        let log = match logs.channels.get_mut(channel) {
            Some(log) => log,
            None => logs.channels.entry(Arc::from(channel)).or_default(),
        };
        log.last_issued += 1;
        let stored = Stored {
            channel: Arc::from(channel),
            replay_id: log.last_issued,
            timestamp_ms: now_ms(),
            payload,
        };
        log.bytes += stored.payload.len() as u64;
        log.messages.push_back(stored.clone());
        trim_log(log, &self.retention, 0, &mut TrimStats::default());
        // Sent under the lock, so every feed sees each channel in replay-ID order.
        logs.feeds.retain(|feed| feed.send(stored.clone()).is_ok());
        Ok(stored)
    }

    async fn read(
        &self,
        channel: &str,
        after: ReplayId,
        limit: usize,
    ) -> Result<Vec<Stored>, EngineError> {
        let logs = self.logs.lock();
        let Some(log) = logs.channels.get(channel) else {
            return Ok(Vec::new());
        };
        // IDs are contiguous within a log, so the start index is arithmetic.
        let first = log.messages.front().map_or(0, |m| m.replay_id);
        let skip = after.saturating_add(1).saturating_sub(first) as usize;
        Ok(log
            .messages
            .iter()
            .skip(skip)
            .take(limit)
            .cloned()
            .collect())
    }

    async fn bounds(&self, channel: &str) -> Result<Bounds, EngineError> {
        let logs = self.logs.lock();
        Ok(logs
            .channels
            .get(channel)
            .map(|log| Bounds {
                first: log.messages.front().map(|m| m.replay_id),
                last_issued: log.last_issued,
            })
            .unwrap_or_default())
    }

    async fn channels(&self) -> Result<Vec<String>, EngineError> {
        Ok(self
            .logs
            .lock()
            .channels
            .keys()
            .map(|k| k.to_string())
            .collect())
    }

    fn feed(&self) -> FeedReceiver {
        let (tx, rx) = unbounded_channel();
        self.logs.lock().feeds.push(tx);
        rx
    }

    async fn trim(&self, retention: &Retention, now: SystemTime) -> Result<TrimStats, EngineError> {
        let cutoff = system_time_ms(now).saturating_sub(retention.max_age.as_millis() as u64);
        let mut stats = TrimStats::default();
        let mut logs = self.logs.lock();
        for log in logs.channels.values_mut() {
            trim_log(log, retention, cutoff, &mut stats);
        }
        Ok(stats)
    }

    async fn save_session(&self, record: &SessionRecord, ttl: Duration) -> Result<(), EngineError> {
        let mut sessions = self.sessions.lock();
        let expires = match &record.owner {
            Some(owner) => {
                sessions
                    .nodes
                    .entry(owner.clone())
                    .or_default()
                    .cursors
                    .insert(record.client_id.clone(), record.cursors.clone());
                None
            }
            None => Some(Instant::now() + ttl),
        };
        sessions
            .records
            .insert(record.client_id.clone(), (record.clone(), expires));
        Ok(())
    }

    async fn replace_session(
        &self,
        record: &SessionRecord,
        expected: u64,
        ttl: Duration,
    ) -> Result<bool, EngineError> {
        let mut sessions = self.sessions.lock();
        match sessions.live(&record.client_id) {
            Some(current) if current.epoch == expected => {
                let expires = record.owner.is_none().then(|| Instant::now() + ttl);
                sessions
                    .records
                    .insert(record.client_id.clone(), (record.clone(), expires));
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn load_session(&self, client_id: &str) -> Result<Option<SessionRecord>, EngineError> {
        Ok(self.sessions.lock().live(client_id).cloned())
    }

    async fn touch_session(&self, client_id: &str, ttl: Duration) -> Result<(), EngineError> {
        if let Some((_, expires)) = self.sessions.lock().records.get_mut(client_id) {
            *expires = Some(Instant::now() + ttl);
        }
        Ok(())
    }

    async fn remove_session(&self, client_id: &str) -> Result<(), EngineError> {
        let mut sessions = self.sessions.lock();
        if let Some((record, _)) = sessions.records.remove(client_id) {
            sessions.take_from_owner(client_id, record.owner.as_deref(), None);
        }
        Ok(())
    }

    async fn claim_session(
        &self,
        client_id: &str,
        node: &str,
        epoch: u64,
        ttl: Duration,
    ) -> Result<Option<SessionRecord>, EngineError> {
        let mut sessions = self.sessions.lock();
        let Some(record) = sessions.live(client_id) else {
            return Ok(None);
        };
        let owner = record.owner.clone();
        let mut record = record.clone();
        if let Some(committed) = sessions.take_from_owner(client_id, owner.as_deref(), Some(node)) {
            record.cursors.extend(committed);
        }
        record.owner = Some(node.to_owned());
        record.epoch = epoch;
        let mine = sessions.nodes.entry(node.to_owned()).or_default();
        mine.taken.remove(client_id);
        mine.ended.remove(client_id);
        mine.cursors
            .insert(client_id.to_owned(), record.cursors.clone());
        let _ = ttl;
        sessions
            .records
            .insert(client_id.to_owned(), (record.clone(), None));
        Ok(Some(record))
    }

    async fn commit_cursors(
        &self,
        node: &str,
        commits: &[CursorCommit],
        ttl: Duration,
    ) -> Result<CommitOutcome, EngineError> {
        let mut sessions = self.sessions.lock();
        let now = Instant::now();
        let mine = sessions.nodes.entry(node.to_owned()).or_default();
        mine.heartbeat = Some(now);
        let taken = std::mem::take(&mut mine.taken);
        let ended = std::mem::take(&mut mine.ended);
        for commit in commits
            .iter()
            .filter(|c| !taken.contains(&c.client_id) && !ended.contains(&c.client_id))
        {
            let mine = sessions.nodes.entry(node.to_owned()).or_default();
            if commit.release {
                mine.cursors.remove(&commit.client_id);
                sessions.release(&commit.client_id, node, commit.cursors.clone(), ttl);
            } else {
                mine.cursors
                    .insert(commit.client_id.clone(), commit.cursors.clone());
            }
        }
        // A node silent for longer than `ttl` is dead: release its sessions.
        let dead: Vec<String> = sessions
            .nodes
            .iter()
            .filter(|(_, n)| n.heartbeat.is_some_and(|h| now.duration_since(h) > ttl))
            .map(|(name, _)| name.clone())
            .collect();
        for name in dead {
            if let Some(gone) = sessions.nodes.remove(&name) {
                for (id, cursors) in gone.cursors {
                    sessions.release(&id, &name, cursors, ttl);
                }
            }
        }
        let sorted = |set: HashSet<String>| {
            let mut v: Vec<String> = set.into_iter().collect();
            v.sort();
            v
        };
        Ok(CommitOutcome {
            taken: sorted(taken),
            ended: sorted(ended),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance() {
        crate::conformance::run_all(|retention| Arc::new(MemoryEngine::new(retention))).await;
        crate::conformance::ownership(Arc::new(MemoryEngine::default())).await;
    }
}
