//! The Redis engine: channel logs, replay IDs and session records in one Redis shared by every
//! node of a cluster (feature `redis`).
//!
//! # Design
//!
//! * **Logs.** A channel's log is the stream `{prefix}log:{channel}`; the entry of replay ID `N`
//!   has the stream ID `0-N` and the fields `p` (payload), `t` (timestamp, Redis `TIME` in ms)
//!   and `c` (the channel's payload bytes ever appended, up to and including this entry). The
//!   hash `{prefix}meta:{channel}` holds `seq` (the last replay ID issued) and `bytes` (the
//!   running total that `c` samples); the set `{prefix}channels` names every channel.
//! * **Append** is one Lua script (EVALSHA): it issues the next ID, XADDs the entry with an exact
//!   `MAXLEN` (the count cap), trims the head by the byte cap, updates the meta hash and
//!   PUBLISHes the message on `{prefix}feed` — atomically, so the notifications of a channel are
//!   published in replay-ID order. It returns when Redis answered: the message is then as
//!   durable as Redis' persistence makes it (`appendonly yes` + `appendfsync always`: on disk;
//!   `everysec`: up to a second of acknowledged messages can be lost if Redis' host dies).
//! * **Feed.** Every engine keeps one pub/sub connection subscribed to `{prefix}feed` (so Redis
//!   sends each message once per node, whatever the number of subscribers) and remembers, per
//!   channel, the last replay ID it fed. Pub/sub drops what is published while a subscriber is
//!   disconnected, so after every (re)subscription the engine reads each channel's `seq` and
//!   XRANGEs whatever it has not fed yet; a notification that skips IDs is preceded by an
//!   XRANGE of the gap, and one at or below the last fed ID is a duplicate and dropped. The feed
//!   thus yields every retained message once, in replay-ID order per channel.
//! * **Sessions** are hashes `{prefix}session:{clientId}` naming their `owner` node. A node's
//!   cursor commits for the sessions it owns are one hash, `{prefix}node:{node}` (field:
//!   clientId), written by one script per batch, so their cost does not grow with subscribers;
//!   a claim moves the session's entry to the claiming node and adds the id to the previous
//!   owner's set `{prefix}node:{owner}:taken` (a removal, to `…:ended`), which that owner's
//!   next commit reads and empties. A record with a live owner has no TTL (so keeping it alive
//!   costs nothing per session); one without (released by a node whose copy expired, or
//!   swept from a dead node) has a `PEXPIRE` TTL. Every commit is also its node's heartbeat in
//!   the sorted set `{prefix}nodes`; a node silent for longer than the TTL is dead, and the next
//!   commit of any node sweeps it.
//! * **Faults.** Every operation is bounded by [`RedisOptions::op_timeout`] and fails with
//!   [`EngineError::Unavailable`] while Redis is unreachable; the connection is re-established
//!   in the background. An append that fails was not acknowledged; one that timed out may or may
//!   not have been stored (a retry can store it twice, under a new ID).
//!
//! Requires Redis 6.2 or newer (`XTRIM MINID`, exclusive `XRANGE` bounds); a single Redis
//! (optionally with a replica and failover), not Redis Cluster: the scripts touch keys of many
//! channels. See `docs/engine-redis.md` for the guarantees in detail.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, ErrorKind, RedisError, Script, ServerErrorKind, Value};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{
    Bounds, CommitOutcome, CursorCommit, Engine, EngineError, FeedReceiver, ReplayId, Retention,
    SessionRecord, Stored, TrimStats, system_time_ms,
};

/// Settings of a [`RedisEngine`] besides its URL and retention.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// Prefixes every key and the feed's pub/sub channel, so that several clusters (or tests)
    /// can share one Redis. Default `bayeux:`.
    pub prefix: String,
    /// The longest any operation waits for Redis before failing with
    /// [`EngineError::Unavailable`]. Default 2 s.
    pub op_timeout: Duration,
    /// The longest one connection attempt takes. Default 1 s.
    pub connect_timeout: Duration,
    /// How often the feed connection is pinged to notice a dead peer. Default 1 s.
    pub ping_interval: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            prefix: "bayeux:".into(),
            op_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            ping_interval: Duration::from_secs(1),
        }
    }
}

impl RedisOptions {
    /// The default options with another key prefix.
    pub fn with_prefix(prefix: impl Into<String>) -> Self {
        RedisOptions {
            prefix: prefix.into(),
            ..RedisOptions::default()
        }
    }
}

/// Appends one message. KEYS: meta hash, log stream, channels set. ARGV: channel, payload,
/// max messages, max bytes, feed channel. Returns `{replay id, timestamp ms}` as strings.
///
/// Writes happen only after every check that can fail, so a failing script changes nothing.
const APPEND_LUA: &str = r#"
local meta = redis.call('HMGET', KEYS[1], 'seq', 'bytes')
local id = (tonumber(meta[1]) or 0) + 1
local plen = string.len(ARGV[2])
local total = (tonumber(meta[2]) or 0) + plen
local now = redis.call('TIME')
local ts = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local sid = string.format('0-%d', id)
local tss = string.format('%d', ts)
local totals = string.format('%d', total)
redis.call('XADD', KEYS[2], 'MAXLEN', '=', ARGV[3], sid, 'p', ARGV[2], 't', tss, 'c', totals)
redis.call('HSET', KEYS[1], 'seq', string.format('%d', id), 'bytes', totals)
if id == 1 then
  redis.call('SADD', KEYS[3], ARGV[1])
end
local maxb = tonumber(ARGV[4])
if total > maxb then
  -- Keep the longest tail whose payload bytes fit: the first entry e with
  -- total - (c(e) - len(e)) <= maxb.
  local start = '-'
  local keep = nil
  local dropped = 0
  while true do
    local page = redis.call('XRANGE', KEYS[2], start, '+', 'COUNT', 64)
    if #page == 0 then break end
    for _, e in ipairs(page) do
      local f = e[2]
      local p, c = nil, nil
      for i = 1, #f, 2 do
        if f[i] == 'p' then p = f[i + 1] elseif f[i] == 'c' then c = f[i + 1] end
      end
      if total - (tonumber(c) - string.len(p)) <= maxb then
        keep = e[1]
        break
      end
      dropped = dropped + 1
    end
    if keep then break end
    start = '(' .. page[#page][1]
  end
  if dropped > 0 then
    redis.call('XTRIM', KEYS[2], 'MINID', keep or string.format('0-%d', id + 1))
  end
end
redis.call('PUBLISH', ARGV[5],
  string.format('%d:%s:%d:', id, tss, string.len(ARGV[1])) .. ARGV[1] .. ARGV[2])
return {string.format('%d', id), tss}
"#;

/// Trims one channel's head. KEYS: meta hash, log stream. ARGV: cutoff ms, max messages, max
/// bytes, the most entries to drop in this call. Returns `{dropped, bytes dropped, more}`.
/// Compare-and-set of a session record: KEYS[1] the record; ARGV: the expected epoch, then
/// client_id, subscriptions, cursors, extensions, epoch, TTL in ms, owner (empty: none).
/// Returns 1 if replaced, 0 if the record is gone or has another epoch. Every field is
/// written, so no DEL is needed.
const REPLACE_SESSION_LUA: &str = r#"
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'client_id', ARGV[2], 'subscriptions', ARGV[3], 'cursors', ARGV[4],
  'extensions', ARGV[5], 'epoch', ARGV[6])
if ARGV[8] == '' then
  redis.call('HDEL', KEYS[1], 'owner')
  redis.call('PEXPIRE', KEYS[1], ARGV[7])
else
  redis.call('HSET', KEYS[1], 'owner', ARGV[8])
  redis.call('PERSIST', KEYS[1])
end
return 1
"#;

/// How long a node's "taken" set outlives its last change: the node, if alive, empties it
/// within a second or two.
const TAKEN_TTL: Duration = Duration::from_secs(600);

/// Claims a session for a node. KEYS[1]: the record. ARGV: node key prefix, client id, node,
/// new epoch, (unused), TTL of a node's "taken" set in ms. Returns `false` if there is no
/// record, else `{record fields, the owner's commit or false}`. The record loses its TTL (a
/// live owner keeps it) and the claiming node's commit for it starts as the previous owner's
/// (or the record's cursors).
const CLAIM_SESSION_LUA: &str = r#"
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return false end
local owner, cursors = nil, '{}'
for i = 1, #fields, 2 do
  if fields[i] == 'owner' then owner = fields[i + 1]
  elseif fields[i] == 'cursors' then cursors = fields[i + 1] end
end
local committed = false
if owner then
  local theirs = ARGV[1] .. owner
  committed = redis.call('HGET', theirs, ARGV[2])
  if owner ~= ARGV[3] then
    if committed then redis.call('HDEL', theirs, ARGV[2]) end
    redis.call('SADD', theirs .. ':taken', ARGV[2])
    redis.call('PEXPIRE', theirs .. ':taken', ARGV[6])
  end
end
local mine = ARGV[1] .. ARGV[3]
redis.call('SREM', mine .. ':taken', ARGV[2])
redis.call('SREM', mine .. ':ended', ARGV[2])
redis.call('HSET', mine, ARGV[2], committed or cursors)
redis.call('HSET', KEYS[1], 'owner', ARGV[3], 'epoch', ARGV[4])
redis.call('PERSIST', KEYS[1])
return {fields, committed}
"#;

/// Commits a node's cursors. KEYS: the node's commits hash, its "taken" and "ended" sets, the
/// nodes' heartbeat sorted set. ARGV: TTL in ms, session key prefix, node, node key prefix,
/// then per session: client id, cursors, release (`1`/`0`). Returns `{taken, ended}`: the ids
/// in the node's "taken" and "ended" sets (which it empties); their commits are skipped.
/// Also the node's heartbeat, and the sweep of nodes (up to 16 per call) silent for longer than the TTL (dead):
/// its sessions' records get their cursors from its commits, lose their owner and get the
/// TTL. A constant number of commands for any batch (a release, or a dead node's sessions,
/// cost a few more each: they write records).
const COMMIT_CURSORS_LUA: &str = r#"
local ttl = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[4], now, ARGV[3])
local taken = redis.call('SMEMBERS', KEYS[2])
local ended = redis.call('SMEMBERS', KEYS[3])
local gone = {}
if #taken > 0 or #ended > 0 then
  redis.call('DEL', KEYS[2], KEYS[3])
  for _, id in ipairs(taken) do gone[id] = true end
  for _, id in ipairs(ended) do gone[id] = true end
end
local function release(record, owner, cursors)
  if redis.call('HGET', record, 'owner') == owner then
    redis.call('HSET', record, 'cursors', cursors)
    redis.call('HDEL', record, 'owner')
    redis.call('PEXPIRE', record, ttl)
  end
end
local set, del = {}, {}
for i = 5, #ARGV, 3 do
  local id = ARGV[i]
  if not gone[id] then
    if ARGV[i + 2] == '1' then
      del[#del + 1] = id
      release(ARGV[2] .. id, ARGV[3], ARGV[i + 1])
    else
      set[#set + 1] = id
      set[#set + 1] = ARGV[i + 1]
    end
  end
end
if #set > 0 then redis.call('HSET', KEYS[1], unpack(set)) end
if #del > 0 then redis.call('HDEL', KEYS[1], unpack(del)) end
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now - ttl, 'LIMIT', 0, 16)) do
  local theirs = ARGV[4] .. node
  local entries = redis.call('HGETALL', theirs)
  for i = 1, #entries, 2 do
    release(ARGV[2] .. entries[i], node, entries[i + 1])
  end
  redis.call('DEL', theirs, theirs .. ':taken', theirs .. ':ended')
  redis.call('ZREM', KEYS[4], node)
end
return {taken, ended}
"#;

/// Removes a session record and tells its owner. KEYS[1]: the record. ARGV: node key prefix,
/// client id, TTL of the owner's "taken" set in ms.
const REMOVE_SESSION_LUA: &str = r#"
local owner = redis.call('HGET', KEYS[1], 'owner')
redis.call('DEL', KEYS[1])
if owner then
  local theirs = ARGV[1] .. owner
  redis.call('HDEL', theirs, ARGV[2])
  redis.call('SADD', theirs .. ':ended', ARGV[2])
  redis.call('PEXPIRE', theirs .. ':ended', ARGV[3])
end
return 1
"#;

const TRIM_LUA: &str = r#"
local total = tonumber(redis.call('HGET', KEYS[1], 'bytes')) or 0
local len = redis.call('XLEN', KEYS[2])
local cutoff = tonumber(ARGV[1])
local maxm = tonumber(ARGV[2])
local maxb = tonumber(ARGV[3])
local budget = tonumber(ARGV[4])
local dropped, dbytes, keep, last = 0, 0, false, nil
local start = '-'
while (not keep) and dropped < budget do
  local page = redis.call('XRANGE', KEYS[2], start, '+', 'COUNT', math.min(100, budget - dropped))
  if #page == 0 then break end
  for _, e in ipairs(page) do
    local f = e[2]
    local p, t, c = nil, nil, nil
    for i = 1, #f, 2 do
      if f[i] == 'p' then p = f[i + 1] elseif f[i] == 't' then t = f[i + 1]
      elseif f[i] == 'c' then c = f[i + 1] end
    end
    local plen = string.len(p)
    if (len - dropped) > maxm or (total - (tonumber(c) - plen)) > maxb or tonumber(t) < cutoff then
      dropped = dropped + 1
      dbytes = dbytes + plen
      last = e[1]
    else
      keep = true
      break
    end
  end
  start = '(' .. page[#page][1]
end
if last then
  local n = tonumber(string.match(last, '^0%-(%d+)$'))
  redis.call('XTRIM', KEYS[2], 'MINID', string.format('0-%d', n + 1))
end
local more = 0
if (not keep) and dropped >= budget then more = 1 end
return {dropped, dbytes, more}
"#;

/// Every channel with its last issued ID. ARGV: channels set key, meta key prefix. Returns a
/// flat array `channel, seq, channel, seq, …`.
const SNAPSHOT_LUA: &str = r#"
local out = {}
for _, c in ipairs(redis.call('SMEMBERS', ARGV[1])) do
  out[#out + 1] = c
  out[#out + 1] = redis.call('HGET', ARGV[2] .. c, 'seq') or '0'
end
return out
"#;

/// The most entries one trim call drops before letting other commands through.
const TRIM_STEP: usize = 1_000;
/// The most trim calls per channel in one [`Engine::trim`].
const TRIM_MAX_STEPS: usize = 10_000;
/// Entries per XRANGE when the feed catches up.
const CATCH_UP_PAGE: usize = 1_000;
/// Bounds of the feed's reconnection back-off.
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

struct Keys {
    prefix: String,
    channels: String,
    feed: String,
    /// Sorted set: node → time of its last commit (ms), to find dead nodes.
    nodes: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_owned(),
            channels: format!("{prefix}channels"),
            feed: format!("{prefix}feed"),
            nodes: format!("{prefix}nodes"),
        }
    }
    fn log(&self, channel: &str) -> String {
        format!("{}log:{channel}", self.prefix)
    }
    fn meta(&self, channel: &str) -> String {
        format!("{}meta:{channel}", self.prefix)
    }
    fn meta_prefix(&self) -> String {
        format!("{}meta:", self.prefix)
    }
    fn session(&self, client_id: &str) -> String {
        format!("{}session:{client_id}", self.prefix)
    }
    fn session_prefix(&self) -> String {
        format!("{}session:", self.prefix)
    }
    /// Prefix of the hash of a node's commits (`{prefix}node:{node}`, field: clientId) and of
    /// its set of sessions taken by other nodes (`{prefix}node:{node}:taken`).
    fn node_prefix(&self) -> String {
        format!("{}node:", self.prefix)
    }
}

/// What the engine and its feed task share.
struct Shared {
    conn: ConnectionManager,
    keys: Keys,
    options: RedisOptions,
    /// The URL without credentials, for messages.
    target: String,
    append: Script,
    trim: Script,
    snapshot: Script,
    replace_session: Script,
    claim_session: Script,
    commit_cursors: Script,
    remove_session: Script,
    feeds: Mutex<Vec<UnboundedSender<Stored>>>,
    feed_connected: AtomicBool,
    feed_resubscriptions: AtomicU64,
    feed_recovered: AtomicU64,
}

/// A [`Engine`] on Redis, shared by every node of a cluster: see the [module](self) docs.
pub struct RedisEngine {
    shared: Arc<Shared>,
    retention: Retention,
    feed_task: JoinHandle<()>,
    keepalive_task: JoinHandle<()>,
}

impl std::fmt::Debug for RedisEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisEngine")
            .field("target", &self.shared.target)
            .field("prefix", &self.shared.keys.prefix)
            .finish()
    }
}

impl Drop for RedisEngine {
    fn drop(&mut self) {
        self.feed_task.abort();
        self.keepalive_task.abort();
    }
}

/// `redis://user:secret@host:port/db` without the credentials.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// Maps a Redis error: connection trouble and transient server states are `Unavailable`.
fn map_err(target: &str, what: &str, e: RedisError) -> EngineError {
    let transient = e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ReadOnly
            )
        )
        || e.code() == Some("BUSY");
    if transient {
        EngineError::Unavailable(format!("redis at {target} unreachable ({what}): {e}"))
    } else {
        EngineError::Storage(format!("redis at {target} failed ({what}): {e}"))
    }
}

fn bad_reply(what: &str, v: &Value) -> EngineError {
    EngineError::Storage(format!("unexpected redis reply to {what}: {v:?}"))
}

fn as_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        other => std::str::from_utf8(as_bytes(other)?).ok()?.parse().ok(),
    }
}

fn as_array(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(a) | Value::Set(a) => Some(a),
        _ => None,
    }
}

/// `0-N` → `N`.
fn parse_stream_id(id: &[u8]) -> Option<ReplayId> {
    std::str::from_utf8(id.strip_prefix(b"0-")?)
        .ok()?
        .parse()
        .ok()
}

/// One XRANGE entry `[id, [field, value, …]]` of `channel`.
fn parse_entry(channel: &Arc<str>, v: &Value) -> Option<Stored> {
    let entry = as_array(v)?;
    let replay_id = parse_stream_id(as_bytes(entry.first()?)?)?;
    let fields = as_array(entry.get(1)?)?;
    let (mut payload, mut timestamp_ms) = (None, None);
    for pair in fields.chunks(2) {
        let [name, value] = pair else { return None };
        match as_bytes(name)? {
            b"p" => payload = Some(Bytes::copy_from_slice(as_bytes(value)?)),
            b"t" => timestamp_ms = as_u64(value),
            _ => {}
        }
    }
    Some(Stored {
        channel: channel.clone(),
        replay_id,
        timestamp_ms: timestamp_ms?,
        payload: payload?,
    })
}

fn parse_entries(channel: &Arc<str>, v: &Value) -> Result<Vec<Stored>, EngineError> {
    let entries = match v {
        Value::Nil => return Ok(Vec::new()),
        other => as_array(other).ok_or_else(|| bad_reply("XRANGE", v))?,
    };
    entries
        .iter()
        .map(|e| parse_entry(channel, e).ok_or_else(|| bad_reply("XRANGE entry", e)))
        .collect()
}

/// A feed notification: `id:timestamp:channel length:channel` then the payload.
fn parse_notification(msg: &[u8]) -> Option<(ReplayId, u64, &str, &[u8])> {
    fn number(rest: &[u8]) -> Option<(u64, &[u8])> {
        let colon = rest.iter().position(|&b| b == b':')?;
        let n = std::str::from_utf8(&rest[..colon]).ok()?.parse().ok()?;
        Some((n, &rest[colon + 1..]))
    }
    let (id, rest) = number(msg)?;
    let (ts, rest) = number(rest)?;
    let (len, rest) = number(rest)?;
    let len = usize::try_from(len).ok()?;
    if rest.len() < len {
        return None;
    }
    let channel = std::str::from_utf8(&rest[..len]).ok()?;
    Some((id, ts, channel, &rest[len..]))
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn cap(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Shared {
    /// Runs `fut` against Redis within the operation timeout.
    async fn op<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, EngineError> {
        match tokio::time::timeout(self.options.op_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(map_err(&self.target, what, e)),
            Err(_) => Err(EngineError::Unavailable(format!(
                "redis at {} did not answer {what} within {:?}",
                self.target, self.options.op_timeout
            ))),
        }
    }

    /// Entries of `channel` with IDs in `(after, upto]`, at most `limit`.
    async fn range(
        &self,
        channel: &Arc<str>,
        after: ReplayId,
        upto: Option<ReplayId>,
        limit: usize,
    ) -> Result<Vec<Stored>, EngineError> {
        if limit == 0 || after == ReplayId::MAX {
            return Ok(Vec::new());
        }
        let end = upto.map_or_else(|| "+".to_owned(), |u| format!("0-{u}"));
        let mut cmd = ::redis::cmd("XRANGE");
        cmd.arg(self.keys.log(channel))
            .arg(format!("0-{}", after + 1))
            .arg(end)
            .arg("COUNT")
            .arg(cap(limit as u64));
        let mut conn = self.conn.clone();
        let v: Value = self.op("XRANGE", cmd.query_async(&mut conn)).await?;
        parse_entries(channel, &v)
    }

    fn dispatch(&self, stored: Stored) {
        self.feeds
            .lock()
            .retain(|feed| feed.send(stored.clone()).is_ok());
    }
}

impl RedisEngine {
    /// Connects to the Redis at `url` (`redis://host:port/db`), loads nothing into memory, and
    /// subscribes this node's feed. `retention`'s count and byte caps apply on every append.
    ///
    /// Fails with [`EngineError::Unavailable`] if Redis cannot be reached within the
    /// [connect timeout](RedisOptions::connect_timeout) (plus an operation timeout).
    pub async fn connect(
        url: &str,
        retention: Retention,
        options: RedisOptions,
    ) -> Result<RedisEngine, EngineError> {
        let target = redact(url);
        let client = Client::open(url)
            .map_err(|e| EngineError::Storage(format!("invalid redis url {target}: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(Some(options.op_timeout))
            .set_number_of_retries(2)
            .set_min_delay(MIN_BACKOFF)
            .set_max_delay(MAX_BACKOFF);
        let conn = match tokio::time::timeout(
            options.connect_timeout + options.op_timeout,
            client.get_connection_manager_with_config(config),
        )
        .await
        {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(map_err(&target, "connect", e)),
            Err(_) => {
                return Err(EngineError::Unavailable(format!(
                    "redis at {target} did not accept a connection within {:?}",
                    options.connect_timeout + options.op_timeout
                )));
            }
        };
        let shared = Arc::new(Shared {
            conn,
            keys: Keys::new(&options.prefix),
            options,
            target,
            append: Script::new(APPEND_LUA),
            trim: Script::new(TRIM_LUA),
            snapshot: Script::new(SNAPSHOT_LUA),
            replace_session: Script::new(REPLACE_SESSION_LUA),
            claim_session: Script::new(CLAIM_SESSION_LUA),
            commit_cursors: Script::new(COMMIT_CURSORS_LUA),
            remove_session: Script::new(REMOVE_SESSION_LUA),
            feeds: Mutex::new(Vec::new()),
            feed_connected: AtomicBool::new(false),
            feed_resubscriptions: AtomicU64::new(0),
            feed_recovered: AtomicU64::new(0),
        });
        let (ready_tx, ready_rx) = oneshot::channel();
        let feed_task = tokio::spawn(run_feed(shared.clone(), client, ready_tx));
        let keepalive_task = tokio::spawn(keepalive(shared.clone()));
        let engine = RedisEngine {
            shared,
            retention,
            feed_task,
            keepalive_task,
        };
        let wait = engine.shared.options.connect_timeout + engine.shared.options.op_timeout * 3;
        match tokio::time::timeout(wait, ready_rx).await {
            Ok(Ok(Ok(()))) => Ok(engine),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(EngineError::Closed),
            Err(_) => Err(EngineError::Unavailable(format!(
                "redis at {}: the feed did not subscribe within {wait:?}",
                engine.shared.target
            ))),
        }
    }

    /// Whether this node's feed is subscribed now (false while Redis is unreachable).
    pub fn feed_connected(&self) -> bool {
        self.shared.feed_connected.load(Ordering::Relaxed)
    }

    /// How many times the feed re-subscribed after losing its connection.
    pub fn feed_resubscriptions(&self) -> u64 {
        self.shared.feed_resubscriptions.load(Ordering::Relaxed)
    }

    /// How many messages the feed read back from the logs because their notification was lost
    /// (while its subscription was down) rather than received.
    pub fn feed_recovered(&self) -> u64 {
        self.shared.feed_recovered.load(Ordering::Relaxed)
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.shared.keys.prefix
    }
}

#[async_trait]
impl Engine for RedisEngine {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn shared(&self) -> bool {
        true
    }

    async fn append(&self, channel: &str, payload: Bytes) -> Result<Stored, EngineError> {
        let s = &self.shared;
        let mut inv = s.append.prepare_invoke();
        inv.key(s.keys.meta(channel))
            .key(s.keys.log(channel))
            .key(&s.keys.channels)
            .arg(channel)
            .arg(&payload[..])
            .arg(cap(self.retention.max_messages as u64))
            .arg(cap(self.retention.max_bytes))
            .arg(&s.keys.feed);
        let mut conn = s.conn.clone();
        let reply: Value =
            match tokio::time::timeout(s.options.op_timeout, inv.invoke_async(&mut conn)).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    return Err(match map_err(&s.target, "append", e) {
                        EngineError::Unavailable(m) => {
                            EngineError::Unavailable(format!("{m}; not acknowledged"))
                        }
                        other => other,
                    });
                }
                Err(_) => {
                    return Err(EngineError::Unavailable(format!(
                        "redis at {} did not answer an append to {channel} within {:?}: \
                     not acknowledged (it may or may not have been stored)",
                        s.target, s.options.op_timeout
                    )));
                }
            };
        let parsed = as_array(&reply).and_then(|a| match a {
            [id, ts] => Some((as_u64(id)?, as_u64(ts)?)),
            _ => None,
        });
        let (replay_id, timestamp_ms) = parsed.ok_or_else(|| bad_reply("append", &reply))?;
        Ok(Stored {
            channel: Arc::from(channel),
            replay_id,
            timestamp_ms,
            payload,
        })
    }

    async fn read(
        &self,
        channel: &str,
        after: ReplayId,
        limit: usize,
    ) -> Result<Vec<Stored>, EngineError> {
        self.shared
            .range(&Arc::from(channel), after, None, limit)
            .await
    }

    async fn bounds(&self, channel: &str) -> Result<Bounds, EngineError> {
        let s = &self.shared;
        let mut pipe = ::redis::pipe();
        pipe.atomic()
            .cmd("HGET")
            .arg(s.keys.meta(channel))
            .arg("seq")
            .cmd("XRANGE")
            .arg(s.keys.log(channel))
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1);
        let mut conn = s.conn.clone();
        let (seq, first): (Value, Value) = s.op("bounds", pipe.query_async(&mut conn)).await?;
        let last_issued = match &seq {
            Value::Nil => 0,
            v => as_u64(v).ok_or_else(|| bad_reply("HGET seq", v))?,
        };
        let first = parse_entries(&Arc::from(channel), &first)?
            .first()
            .map(|m| m.replay_id);
        Ok(Bounds { first, last_issued })
    }

    async fn channels(&self) -> Result<Vec<String>, EngineError> {
        let s = &self.shared;
        let mut conn = s.conn.clone();
        let mut names: Vec<String> = s
            .op(
                "SMEMBERS",
                ::redis::cmd("SMEMBERS")
                    .arg(&s.keys.channels)
                    .query_async(&mut conn),
            )
            .await?;
        names.sort();
        Ok(names)
    }

    fn feed(&self) -> FeedReceiver {
        let (tx, rx) = unbounded_channel();
        self.shared.feeds.lock().push(tx);
        rx
    }

    async fn trim(&self, retention: &Retention, now: SystemTime) -> Result<TrimStats, EngineError> {
        let s = &self.shared;
        let cutoff = system_time_ms(now).saturating_sub(retention.max_age.as_millis() as u64);
        let max_messages = retention.max_messages.min(self.retention.max_messages) as u64;
        let max_bytes = retention.max_bytes.min(self.retention.max_bytes);
        let mut stats = TrimStats::default();
        for channel in self.channels().await? {
            for _ in 0..TRIM_MAX_STEPS {
                let mut inv = s.trim.prepare_invoke();
                inv.key(s.keys.meta(&channel))
                    .key(s.keys.log(&channel))
                    .arg(cap(cutoff))
                    .arg(cap(max_messages))
                    .arg(cap(max_bytes))
                    .arg(TRIM_STEP);
                let mut conn = s.conn.clone();
                let reply: Value = s.op("trim", inv.invoke_async(&mut conn)).await?;
                let parsed = as_array(&reply).and_then(|a| match a {
                    [n, b, more] => Some((as_u64(n)?, as_u64(b)?, as_u64(more)?)),
                    _ => None,
                });
                let (n, b, more) = parsed.ok_or_else(|| bad_reply("trim", &reply))?;
                stats.messages += n;
                stats.bytes += b;
                if more == 0 {
                    break;
                }
            }
        }
        // Session records expire by themselves (PEXPIRE).
        Ok(stats)
    }

    async fn save_session(&self, record: &SessionRecord, ttl: Duration) -> Result<(), EngineError> {
        let s = &self.shared;
        let key = s.keys.session(&record.client_id);
        let mut pipe = ::redis::pipe();
        pipe.atomic().cmd("DEL").arg(&key).ignore();
        let hset = pipe
            .cmd("HSET")
            .arg(&key)
            .arg("client_id")
            .arg(&record.client_id)
            .arg("subscriptions")
            .arg(to_json(&record.subscriptions)?)
            .arg("cursors")
            .arg(to_json(&record.cursors)?)
            .arg("extensions")
            .arg(to_json(&record.extensions)?)
            .arg("epoch")
            .arg(record.epoch);
        match &record.owner {
            Some(owner) => {
                // A live owner keeps it; its commit for the session starts here.
                hset.arg("owner").arg(owner).ignore();
                pipe.cmd("PERSIST")
                    .arg(&key)
                    .ignore()
                    .cmd("HSET")
                    .arg(format!("{}{owner}", s.keys.node_prefix()))
                    .arg(&record.client_id)
                    .arg(to_json(&record.cursors)?)
                    .ignore();
            }
            None => {
                hset.ignore().cmd("PEXPIRE").arg(&key).arg(ms(ttl)).ignore();
            }
        }
        let mut conn = s.conn.clone();
        s.op("save_session", pipe.query_async::<()>(&mut conn))
            .await
    }

    async fn load_session(&self, client_id: &str) -> Result<Option<SessionRecord>, EngineError> {
        let s = &self.shared;
        let mut conn = s.conn.clone();
        let fields: HashMap<String, String> = s
            .op(
                "load_session",
                ::redis::cmd("HGETALL")
                    .arg(s.keys.session(client_id))
                    .query_async(&mut conn),
            )
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        record_from_fields(client_id, &fields).map(Some)
    }

    async fn replace_session(
        &self,
        record: &SessionRecord,
        expected: u64,
        ttl: Duration,
    ) -> Result<bool, EngineError> {
        let s = &self.shared;
        let mut inv = s.replace_session.prepare_invoke();
        inv.key(s.keys.session(&record.client_id))
            .arg(expected)
            .arg(&record.client_id)
            .arg(to_json(&record.subscriptions)?)
            .arg(to_json(&record.cursors)?)
            .arg(to_json(&record.extensions)?)
            .arg(record.epoch)
            .arg(ms(ttl))
            .arg(record.owner.as_deref().unwrap_or(""));
        let mut conn = s.conn.clone();
        let replaced: i64 = s.op("replace_session", inv.invoke_async(&mut conn)).await?;
        Ok(replaced == 1)
    }

    async fn touch_session(&self, client_id: &str, ttl: Duration) -> Result<(), EngineError> {
        let s = &self.shared;
        let mut conn = s.conn.clone();
        s.op(
            "touch_session",
            ::redis::cmd("PEXPIRE")
                .arg(s.keys.session(client_id))
                .arg(ms(ttl))
                .query_async::<()>(&mut conn),
        )
        .await
    }

    async fn remove_session(&self, client_id: &str) -> Result<(), EngineError> {
        let s = &self.shared;
        let mut inv = s.remove_session.prepare_invoke();
        inv.key(s.keys.session(client_id))
            .arg(s.keys.node_prefix())
            .arg(client_id)
            .arg(ms(TAKEN_TTL));
        let mut conn = s.conn.clone();
        s.op("remove_session", inv.invoke_async::<()>(&mut conn))
            .await
    }

    async fn claim_session(
        &self,
        client_id: &str,
        node: &str,
        epoch: u64,
        ttl: Duration,
    ) -> Result<Option<SessionRecord>, EngineError> {
        let s = &self.shared;
        let mut inv = s.claim_session.prepare_invoke();
        inv.key(s.keys.session(client_id))
            .arg(s.keys.node_prefix())
            .arg(client_id)
            .arg(node)
            .arg(epoch)
            .arg(ms(ttl))
            .arg(ms(TAKEN_TTL));
        let mut conn = s.conn.clone();
        let reply: Value = s.op("claim_session", inv.invoke_async(&mut conn)).await?;
        let Some([fields, committed]) = as_array(&reply) else {
            return match reply {
                Value::Nil => Ok(None),
                other => Err(bad_reply("claim_session", &other)),
            };
        };
        let fields = as_array(fields).ok_or_else(|| bad_reply("claim_session", fields))?;
        let mut map = HashMap::new();
        for pair in fields.chunks(2) {
            if let [k, v] = pair
                && let (Some(k), Some(v)) = (as_bytes(k), as_bytes(v))
            {
                map.insert(
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                );
            }
        }
        let mut record = record_from_fields(client_id, &map)?;
        if let Some(committed) = as_bytes(committed) {
            let committed: std::collections::BTreeMap<String, ReplayId> =
                serde_json::from_slice(committed).map_err(|e| {
                    EngineError::Storage(format!("committed cursors of {client_id}: {e}"))
                })?;
            record.cursors.extend(committed);
        }
        record.owner = Some(node.to_owned());
        record.epoch = epoch;
        Ok(Some(record))
    }

    async fn commit_cursors(
        &self,
        node: &str,
        commits: &[CursorCommit],
        ttl: Duration,
    ) -> Result<CommitOutcome, EngineError> {
        let s = &self.shared;
        let node_key = format!("{}{node}", s.keys.node_prefix());
        let mut inv = s.commit_cursors.prepare_invoke();
        inv.key(&node_key)
            .key(format!("{node_key}:taken"))
            .key(format!("{node_key}:ended"))
            .key(&s.keys.nodes)
            .arg(ms(ttl))
            .arg(s.keys.session_prefix())
            .arg(node)
            .arg(s.keys.node_prefix());
        for commit in commits {
            inv.arg(&commit.client_id)
                .arg(to_json(&commit.cursors)?)
                .arg(if commit.release { "1" } else { "0" });
        }
        let mut conn = s.conn.clone();
        let (taken, ended): (Vec<String>, Vec<String>) =
            s.op("commit_cursors", inv.invoke_async(&mut conn)).await?;
        Ok(CommitOutcome { taken, ended })
    }
}

/// A session record from its hash fields.
fn record_from_fields(
    client_id: &str,
    fields: &HashMap<String, String>,
) -> Result<SessionRecord, EngineError> {
    fn field<T: serde::de::DeserializeOwned>(
        fields: &HashMap<String, String>,
        name: &str,
    ) -> Result<T, EngineError> {
        let text = fields
            .get(name)
            .ok_or_else(|| EngineError::Storage(format!("session record lacks {name}")))?;
        serde_json::from_str(text)
            .map_err(|e| EngineError::Storage(format!("session record field {name}: {e}")))
    }
    Ok(SessionRecord {
        client_id: client_id.to_owned(),
        subscriptions: field(fields, "subscriptions")?,
        cursors: field(fields, "cursors")?,
        extensions: field(fields, "extensions")?,
        epoch: match fields.get("epoch") {
            None => 0,
            Some(e) => e
                .parse()
                .map_err(|e| EngineError::Storage(format!("session record field epoch: {e}")))?,
        },
        owner: fields.get("owner").cloned(),
    })
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String, EngineError> {
    serde_json::to_string(v).map_err(|e| EngineError::Storage(format!("session record: {e}")))
}

/// Pings Redis through the command connection every [`RedisOptions::ping_interval`] (every
/// [`MIN_BACKOFF`]·2 while it fails), so that a dead connection is noticed and replaced in the
/// background rather than by the next publisher after Redis comes back.
async fn keepalive(shared: Arc<Shared>) {
    loop {
        let mut conn = shared.conn.clone();
        let ok = tokio::time::timeout(
            shared.options.op_timeout,
            ::redis::cmd("PING").query_async::<Value>(&mut conn),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        let pause = if ok {
            shared.options.ping_interval
        } else {
            MIN_BACKOFF * 2
        };
        tokio::time::sleep(pause).await;
    }
}

/// The feed's memory: per channel, the last replay ID yielded.
#[derive(Default)]
struct FeedState {
    last_fed: HashMap<Arc<str>, ReplayId>,
}

impl FeedState {
    fn channel(&mut self, name: &str) -> (Arc<str>, ReplayId) {
        match self.last_fed.get_key_value(name) {
            Some((k, v)) => (k.clone(), *v),
            None => {
                let k: Arc<str> = Arc::from(name);
                self.last_fed.insert(k.clone(), 0);
                (k, 0)
            }
        }
    }
}

/// Keeps the feed subscribed for the engine's life: subscribe, catch up, relay; on any failure,
/// back off and start again.
async fn run_feed(
    shared: Arc<Shared>,
    client: Client,
    ready: oneshot::Sender<Result<(), EngineError>>,
) {
    let mut state = FeedState::default();
    let mut ready = Some(ready);
    let mut backoff = MIN_BACKOFF;
    loop {
        let Err(e) = feed_session(&shared, &client, &mut state, &mut ready).await;
        if let Some(r) = ready.take() {
            // The first subscription failed: `connect` reports it and the engine is not built.
            let _ = r.send(Err(e));
            return;
        }
        if shared.feed_connected.swap(false, Ordering::Relaxed) {
            // The feed was up before this failure: start the back-off again.
            backoff = MIN_BACKOFF;
        }
        tracing::warn!(target: "bayeux::engine::redis", error = %e, "redis feed lost; reconnecting");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One subscription's life; returns why it ended.
async fn feed_session(
    shared: &Shared,
    client: &Client,
    state: &mut FeedState,
    ready: &mut Option<oneshot::Sender<Result<(), EngineError>>>,
) -> Result<std::convert::Infallible, EngineError> {
    let opts = &shared.options;
    let target = &shared.target;
    let pubsub = match tokio::time::timeout(opts.connect_timeout, client.get_async_pubsub()).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return Err(map_err(target, "feed connect", e)),
        Err(_) => {
            return Err(EngineError::Unavailable(format!(
                "redis at {target}: feed connection not accepted within {:?}",
                opts.connect_timeout
            )));
        }
    };
    let (mut sink, mut stream) = pubsub.split();
    shared
        .op("SUBSCRIBE", sink.subscribe(&shared.keys.feed))
        .await?;
    // Subscribed: from here on every append is either in the snapshot or notified (or both).
    let first = ready.is_some();
    catch_up(shared, state, first).await?;
    shared.feed_connected.store(true, Ordering::Relaxed);
    if let Some(r) = ready.take() {
        let _ = r.send(Ok(()));
    } else {
        shared.feed_resubscriptions.fetch_add(1, Ordering::Relaxed);
        tracing::info!(target: "bayeux::engine::redis", "redis feed resubscribed and caught up");
    }
    let mut ping = tokio::time::interval(opts.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    loop {
        tokio::select! {
            msg = stream.next() => {
                let Some(msg) = msg else {
                    return Err(EngineError::Unavailable(format!(
                        "redis at {target}: feed connection closed"
                    )));
                };
                relay(shared, state, msg.get_payload_bytes()).await?;
            }
            _ = ping.tick() => {
                shared.op("feed PING", sink.ping::<Value>()).await?;
            }
        }
    }
}

/// Brings `state` up to every channel's last issued ID. The first time, only records them (the
/// feed starts "from now on"); afterwards, yields whatever was appended meanwhile.
async fn catch_up(shared: &Shared, state: &mut FeedState, first: bool) -> Result<(), EngineError> {
    let mut inv = shared.snapshot.prepare_invoke();
    inv.arg(&shared.keys.channels)
        .arg(shared.keys.meta_prefix());
    let mut conn = shared.conn.clone();
    let reply: Value = shared
        .op("feed snapshot", inv.invoke_async(&mut conn))
        .await?;
    let flat = as_array(&reply).ok_or_else(|| bad_reply("feed snapshot", &reply))?;
    for pair in flat.chunks(2) {
        let parsed = match pair {
            [name, seq] => as_bytes(name)
                .and_then(|n| std::str::from_utf8(n).ok())
                .zip(as_u64(seq)),
            _ => None,
        };
        let (name, seq) = parsed.ok_or_else(|| bad_reply("feed snapshot", &reply))?;
        let (channel, from) = state.channel(name);
        if first {
            state.last_fed.insert(channel, seq);
            continue;
        }
        if seq < from {
            // Redis lost data (restarted without persistence): its IDs went back. Follow them,
            // or every new message up to `from` would be taken for a duplicate.
            tracing::error!(
                target: "bayeux::engine::redis",
                channel = %channel, fed = from, issued = seq,
                "redis replay IDs went backwards (data lost in Redis); following them"
            );
            state.last_fed.insert(channel, seq);
            continue;
        }
        fill(shared, state, &channel, from, seq).await?;
    }
    Ok(())
}

/// Yields the retained messages of `channel` in `(from, upto]` and records `upto` as fed.
async fn fill(
    shared: &Shared,
    state: &mut FeedState,
    channel: &Arc<str>,
    mut from: ReplayId,
    upto: ReplayId,
) -> Result<(), EngineError> {
    // Bounded: every page advances `from`, and an empty page ends the loop.
    while from < upto {
        let page = shared
            .range(channel, from, Some(upto), CATCH_UP_PAGE)
            .await?;
        let Some(last) = page.last().map(|m| m.replay_id) else {
            break;
        };
        shared
            .feed_recovered
            .fetch_add(page.len() as u64, Ordering::Relaxed);
        for m in page {
            shared.dispatch(m);
        }
        from = last;
        state.last_fed.insert(channel.clone(), from);
    }
    // Anything not retained any more is skipped: the feed can only yield what Redis still has.
    state.last_fed.insert(channel.clone(), upto);
    Ok(())
}

/// Handles one notification: drops duplicates, fills gaps, yields the message.
async fn relay(shared: &Shared, state: &mut FeedState, msg: &[u8]) -> Result<(), EngineError> {
    let Some((replay_id, timestamp_ms, name, payload)) = parse_notification(msg) else {
        tracing::warn!(target: "bayeux::engine::redis", "ignoring a malformed feed notification");
        return Ok(());
    };
    let (channel, from) = state.channel(name);
    if replay_id <= from {
        return Ok(());
    }
    if replay_id > from + 1 {
        fill(shared, state, &channel, from, replay_id - 1).await?;
    }
    shared.dispatch(Stored {
        channel: channel.clone(),
        replay_id,
        timestamp_ms,
        payload: Bytes::copy_from_slice(payload),
    });
    state.last_fed.insert(channel, replay_id);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_parse() {
        let msg = b"42:1700000000000:4:/a/b{\"x\":1}";
        assert_eq!(
            parse_notification(msg),
            Some((42, 1_700_000_000_000, "/a/b", &b"{\"x\":1}"[..]))
        );
        assert_eq!(
            parse_notification(b"1:2:3:/a:"),
            Some((1, 2, "/a:", &b""[..]))
        );
        assert_eq!(parse_notification(b"1:2:9:/a"), None);
        assert_eq!(parse_notification(b"x:2:1:/"), None);
    }

    #[test]
    fn stream_ids_and_urls() {
        assert_eq!(parse_stream_id(b"0-17"), Some(17));
        assert_eq!(parse_stream_id(b"1-17"), None);
        assert_eq!(redact("redis://u:pw@h:1/0"), "redis://h:1/0");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
