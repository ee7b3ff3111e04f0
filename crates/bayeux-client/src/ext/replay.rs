//! The Salesforce replay extension, client side, and where replay checkpoints are kept.
//!
//! On the wire: the handshake sends `ext.replay: true`; when the server echoes it, every
//! subscribe carries `ext.replay: {channel: id, …}` with an entry for **every** subscription
//! (`-1`: new events only, `-2`: everything retained, `N`: everything after `N`). Each event
//! names its replay ID in `data.event.replayId` (Salesforce) or `ext.replay` (the bayeux
//! server, for payloads without `data.event`).
//!
//! A [`ReplayStore`] records, per subscribed channel, the last replay ID **the application has
//! received** (when the subscription stream yields it), so a restarted process can resume with
//! [`Replay::Resume`].

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bayeux_protocol::Message;
use serde_json::Value;

/// Where a new subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Replay {
    /// New events only (`-1`).
    #[default]
    New,
    /// Every event still retained (`-2`).
    All,
    /// Events after this replay ID.
    After(i64),
    /// After the ID in the client's [`ReplayStore`]; when it holds none, from the client's
    /// [`resume_default`](crate::ClientBuilder::resume_default).
    Resume,
}

impl Replay {
    /// The wire value, for every variant but [`Replay::Resume`].
    pub fn wire(self) -> Option<i64> {
        match self {
            Replay::New => Some(NEW),
            Replay::All => Some(ALL),
            Replay::After(n) => Some(n),
            Replay::Resume => None,
        }
    }
}

/// `-1`: new events only.
pub const NEW: i64 = -1;
/// `-2`: every retained event.
pub const ALL: i64 = -2;

/// What to do when the server refuses a stored replay ID (the
/// `400::The replayId {N} you provided was invalid…` error: outside retention, or unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplayFallback {
    /// Subscribe again with `-2`: nothing is missed; events may arrive a second time.
    #[default]
    All,
    /// Subscribe again with `-1`: events published meanwhile are missed.
    New,
    /// Give up on the subscription and report the error.
    Fail,
}

impl ReplayFallback {
    /// The replay ID to use instead, or `None` to fail.
    pub fn wire(self) -> Option<i64> {
        match self {
            ReplayFallback::All => Some(ALL),
            ReplayFallback::New => Some(NEW),
            ReplayFallback::Fail => None,
        }
    }
}

/// The replay ID of a delivered event: `data.event.replayId` when present (Salesforce), else
/// `ext.replay` when it is a number (the bayeux server).
///
/// ```
/// use bayeux_client::ext::replay::replay_id_of;
/// use bayeux_protocol::Message;
/// let mut m = Message::new("/event/Foo__e");
/// m.data = Some(serde_json::json!({"event": {"replayId": 7}, "payload": {}}));
/// assert_eq!(replay_id_of(&m), Some(7));
/// let mut m = Message::new("/chat");
/// m.ext_insert("replay", 12.into());
/// assert_eq!(replay_id_of(&m), Some(12));
/// ```
pub fn replay_id_of(message: &Message) -> Option<i64> {
    let from_event = message
        .data
        .as_ref()
        .and_then(|d| d.get("event"))
        .and_then(|e| e.get("replayId"))
        .and_then(Value::as_i64);
    from_event.or_else(|| message.ext_get("replay").and_then(Value::as_i64))
}

/// If `error` is the "replayId … you provided was invalid" error, the refused ID as sent.
///
/// ```
/// use bayeux_client::ext::replay::invalid_replay_id;
/// let e = "400::The replayId {1553783} you provided was invalid.  Please provide a valid ID, -2 to replay all events, or -1 to replay only new events.";
/// assert_eq!(invalid_replay_id(e), Some("1553783"));
/// assert_eq!(invalid_replay_id("403::Restricted channel"), None);
/// ```
pub fn invalid_replay_id(error: &str) -> Option<&str> {
    let rest = error.strip_prefix("400::The replayId {")?;
    let (id, tail) = rest.split_once('}')?;
    tail.contains("you provided was invalid").then_some(id)
}

/// Why a replay store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Reading or writing the file failed.
    #[error("replay store I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The file is not a JSON object of channel → replay ID.
    #[error("replay store file is corrupt: {0}")]
    Corrupt(String),
    /// A user-supplied store failed.
    #[error("replay store: {0}")]
    Other(String),
}

/// Where the last replay ID per channel is kept between runs. Object-safe; implementations
/// must be cheap to call from a blocking thread (the client calls them off the async
/// runtime, coalescing rapid updates).
pub trait ReplayStore: Send + Sync + 'static {
    /// The last replay ID recorded for `channel`.
    fn load(&self, channel: &str) -> Result<Option<i64>, StoreError>;

    /// Records `replay_id` as the last event of `channel` the application received.
    fn save(&self, channel: &str, replay_id: i64) -> Result<(), StoreError>;

    /// Forgets `channel` (for example after a replay ID was refused as outside retention).
    fn remove(&self, channel: &str) -> Result<(), StoreError>;
}

/// A store in memory: survives reconnects, not restarts. Clones share the map.
#[derive(Debug, Default)]
pub struct MemoryReplayStore {
    map: Mutex<HashMap<String, i64>>,
}

impl MemoryReplayStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything recorded.
    pub fn snapshot(&self) -> HashMap<String, i64> {
        lock(&self.map).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the map half-updated: every update is one
    // insert or remove. Keep going with the data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ReplayStore for MemoryReplayStore {
    fn load(&self, channel: &str) -> Result<Option<i64>, StoreError> {
        Ok(lock(&self.map).get(channel).copied())
    }

    fn save(&self, channel: &str, replay_id: i64) -> Result<(), StoreError> {
        lock(&self.map).insert(channel.to_owned(), replay_id);
        Ok(())
    }

    fn remove(&self, channel: &str) -> Result<(), StoreError> {
        lock(&self.map).remove(channel);
        Ok(())
    }
}

/// A store in a JSON file (`{"/channel": 123, …}`). Every change rewrites the file the safe
/// way: write a temporary file beside it, fsync it, rename it over the old one, fsync the
/// directory. A crash leaves either the old or the new file, never a torn one.
#[derive(Debug)]
pub struct FileReplayStore {
    path: PathBuf,
    map: Mutex<HashMap<String, i64>>,
}

impl FileReplayStore {
    /// Opens (or starts) the store at `path`. A missing file is an empty store.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let path = path.into();
        let map = match fs::read(&path) {
            Ok(bytes) => {
                let value: Value = serde_json::from_slice(&bytes)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                let Value::Object(object) = value else {
                    return Err(StoreError::Corrupt("not a JSON object".into()));
                };
                object
                    .into_iter()
                    .map(|(k, v)| match v.as_i64() {
                        Some(id) => Ok((k, id)),
                        None => Err(StoreError::Corrupt(format!("{k}: {v} is not an integer"))),
                    })
                    .collect::<Result<HashMap<_, _>, _>>()?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => return Err(e.into()),
        };
        Ok(FileReplayStore {
            path,
            map: Mutex::new(map),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&self, map: &HashMap<String, i64>) -> Result<(), StoreError> {
        let sorted: std::collections::BTreeMap<_, _> = map.iter().collect();
        let bytes = serde_json::to_vec_pretty(&sorted).expect("a map of numbers serializes");
        let mut tmp_name = self
            .path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_else(|| "replay".into());
        tmp_name.push(".tmp");
        let tmp = self.path.with_file_name(tmp_name);
        {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &self.path)?;
        // The rename is durable only once the directory entry is.
        if let Some(dir) = self.path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Ok(d) = fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl ReplayStore for FileReplayStore {
    fn load(&self, channel: &str) -> Result<Option<i64>, StoreError> {
        Ok(lock(&self.map).get(channel).copied())
    }

    fn save(&self, channel: &str, replay_id: i64) -> Result<(), StoreError> {
        let mut map = lock(&self.map);
        if map.get(channel) == Some(&replay_id) {
            return Ok(());
        }
        map.insert(channel.to_owned(), replay_id);
        self.write(&map)
    }

    fn remove(&self, channel: &str) -> Result<(), StoreError> {
        let mut map = lock(&self.map);
        if map.remove(channel).is_some() {
            self.write(&map)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "bayeux-client-{}-{}-{name}",
            std::process::id(),
            rand::random::<u32>()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir.join("replay.json")
    }

    #[test]
    fn file_store_survives_reopen_and_leaves_no_temp_file() {
        let path = temp_path("reopen");
        let store = FileReplayStore::open(&path).unwrap();
        assert_eq!(store.load("/a").unwrap(), None);
        store.save("/a", 5).unwrap();
        store.save("/b", 7).unwrap();
        store.save("/a", 9).unwrap();
        store.remove("/b").unwrap();
        drop(store);
        let store = FileReplayStore::open(&path).unwrap();
        assert_eq!(store.load("/a").unwrap(), Some(9));
        assert_eq!(store.load("/b").unwrap(), None);
        let entries: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, vec![std::ffi::OsString::from("replay.json")]);
        let _ = fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn corrupt_file_is_an_error_not_a_panic() {
        let path = temp_path("corrupt");
        fs::write(&path, b"{not json").unwrap();
        assert!(matches!(
            FileReplayStore::open(&path),
            Err(StoreError::Corrupt(_))
        ));
        fs::write(&path, br#"{"/a":"x"}"#).unwrap();
        assert!(FileReplayStore::open(&path).is_err());
        let _ = fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn memory_store() {
        let s = MemoryReplayStore::new();
        s.save("/a", 1).unwrap();
        assert_eq!(s.load("/a").unwrap(), Some(1));
        s.remove("/a").unwrap();
        assert!(s.snapshot().is_empty());
    }
}
