//! The client against servers that are not ours, from npm (pinned in `interop/package.json`):
//! a Faye 1.4.3 `NodeAdapter` (long-polling and WebSocket) and `cometd-nodejs-server` 1.2.1
//! (long-polling only, with its acknowledged-messages extension, sessions bound to the
//! `BAYEUX_BROWSER` cookie). Each is started with `node interop/servers/<name>.js` on port 0
//! and prints its URL, then one JSON line per handshake, subscribe, unsubscribe and disconnect
//! it sees, which is how these tests check what the server did.
//!
//! Scenario, per server and transport: subscribe; 50 messages published by a second client
//! arrive in order, exactly once; unsubscribe (the server says so); disconnect (the server
//! says so). Needs `node` (20+) and `npm` on the PATH; `interop/node_modules` is installed with
//! `npm ci` by the first test that needs it when it is missing or stale.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bayeux_client::{Client, Event, Replay, TransportKind};
use futures::StreamExt;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);
const CHANNEL: &str = "/peer/chat";
const MESSAGES: i64 = 50;

fn interop_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../interop")
}

/// Runs `cmd` to completion within `limit`, killing it (by its PID) if it takes longer.
fn run_bounded(mut cmd: Command, limit: Duration) -> Result<(), String> {
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("{cmd:?} failed: {status}")),
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{cmd:?} took over {limit:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// `npm ci` in `interop/` unless the pinned packages are installed and the lock file has not
/// changed since (the same stamp `interop/run.sh` keeps). Once per test process.
fn node_modules() {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    let ready = READY.get_or_init(|| {
        let dir = interop_dir();
        let mut version = Command::new("node");
        version.arg("--version").stdout(Stdio::null());
        run_bounded(version, Duration::from_secs(20))
            .map_err(|e| format!("these tests need Node 20+ on the PATH: {e}"))?;
        let lock: Vec<u8> = ["package.json", "package-lock.json"]
            .iter()
            .flat_map(|f| std::fs::read(dir.join(f)).unwrap_or_default())
            .collect();
        // Not run.sh's sha256, but the same idea: reinstall when the pins change.
        let stamp = format!("{:x}-{}", fnv1a(&lock), lock.len());
        let stamp_file = dir.join("node_modules/.peers-installed");
        let installed = ["faye", "cometd-nodejs-server"].iter().all(|p| {
            dir.join("node_modules")
                .join(p)
                .join("package.json")
                .exists()
        });
        if installed && std::fs::read_to_string(&stamp_file).ok().as_deref() == Some(&stamp) {
            return Ok(());
        }
        eprintln!("peers: npm ci in {}", dir.display());
        let mut npm = Command::new("npm");
        npm.args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .stdout(Stdio::null());
        run_bounded(npm, Duration::from_secs(600))
            .map_err(|e| format!("installing the npm peers failed: {e}"))?;
        let _ = std::fs::write(&stamp_file, &stamp);
        Ok(())
    });
    if let Err(e) = ready {
        panic!("{e}");
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

/// A peer server started with node; killed (by its PID) when dropped.
struct Peer {
    child: Child,
    url: String,
    log: Arc<Mutex<Vec<Value>>>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Peer {
    fn start(script: &str) -> Peer {
        node_modules();
        let dir = interop_dir();
        let mut child = Command::new("node")
            .arg(dir.join("servers").join(script))
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn node");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log: Arc<Mutex<Vec<Value>>> = Arc::default();
        let lines = log.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout).lines();
            if let Some(Ok(first)) = reader.next() {
                let _ = tx.send(first);
            }
            for line in reader {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str(&line) {
                    lines.lock().unwrap().push(v);
                }
            }
        });
        let mut peer = Peer {
            child,
            url: String::new(),
            log,
        };
        let first = rx
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("{script} printed no LISTENING line within {WAIT:?}"));
        peer.url = first
            .strip_prefix("LISTENING ")
            .unwrap_or_else(|| panic!("{script}: first line {first:?}"))
            .trim()
            .to_owned();
        peer
    }

    /// Waits (bounded) for the server to report `event` for `client_id` (and `channel`).
    async fn saw(&self, event: &str, client_id: &str, channel: Option<&str>) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let found = self
                .log
                .lock()
                .unwrap()
                .iter()
                .find(|v| {
                    v["event"] == event
                        && v["clientId"] == client_id
                        && channel.is_none_or(|c| v["channel"] == c)
                })
                .cloned();
            if let Some(v) = found {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the server never reported {event} for {client_id} {channel:?}: {:#?}",
                self.log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn client(url: &str, transport: TransportKind) -> Client {
    Client::builder(url)
        .transport(transport)
        .request_timeout(Duration::from_secs(5))
        .operation_timeout(WAIT)
        .build()
        .unwrap()
}

/// Subscribe, 50 messages in order exactly once, unsubscribe, disconnect.
async fn scenario(script: &str, transport: TransportKind, expect_transport: &str) {
    let peer = Peer::start(script);
    let subscriber = client(&peer.url, transport);
    let mut events = subscriber.events();
    let mut sub = subscriber.subscribe(CHANNEL, Replay::New).await.unwrap();
    assert!(subscriber.wait_connected(WAIT).await);
    let status = subscriber.status();
    assert_eq!(status.transport, expect_transport, "{script}");
    let id = status.client_id.clone().unwrap();
    peer.saw("subscribe", &id, Some(CHANNEL)).await;

    let publisher = client(&peer.url, transport);
    for n in 0..MESSAGES {
        let ack = publisher
            .publish(CHANNEL, json!({ "n": n }))
            .await
            .unwrap_or_else(|e| panic!("{script}: publish {n}: {e}"));
        assert_eq!(ack.successful, Some(true), "{ack:?}");
    }
    let mut got = Vec::new();
    while got.len() < MESSAGES as usize {
        match tokio::time::timeout(WAIT, sub.next()).await {
            Ok(Some(m)) => {
                assert_eq!(m.channel, CHANNEL);
                got.push(m.data.as_ref().and_then(|d| d["n"].as_i64()).unwrap());
            }
            other => panic!("{script}: {} of {MESSAGES}, then {other:?}", got.len()),
        }
    }
    assert_eq!(got, (0..MESSAGES).collect::<Vec<_>>(), "{script}: in order");
    // Exactly once: nothing more comes, across at least one held-connect cycle (2 s).
    if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(2500), sub.next()).await {
        panic!("{script}: a message arrived twice or unasked: {m:?}");
    }

    subscriber.unsubscribe(CHANNEL).unwrap();
    peer.saw("unsubscribe", &id, Some(CHANNEL)).await;
    assert!(
        tokio::time::timeout(WAIT, sub.next())
            .await
            .unwrap()
            .is_none(),
        "the stream ends on unsubscribe"
    );
    subscriber.disconnect().await;
    let gone = peer.saw("disconnect", &id, None).await;
    assert_ne!(gone["timeout"], true, "{script}: disconnected, not expired");
    // The client's own account: connected, then disconnected, nothing in between.
    let mut seen = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(200), events.next()).await {
        seen.push(e);
    }
    assert!(
        seen.iter()
            .all(|e| matches!(e, Event::Connected { .. } | Event::Disconnected)),
        "{script}: {seen:?}"
    );
    assert!(seen.contains(&Event::Disconnected), "{seen:?}");
    publisher.disconnect().await;
}

#[tokio::test]
async fn faye_long_polling() {
    scenario("faye.js", TransportKind::LongPolling, "long-polling").await;
}

#[tokio::test]
async fn faye_websocket() {
    scenario("faye.js", TransportKind::WebSocket, "websocket").await;
}

#[tokio::test]
async fn faye_auto_picks_websocket() {
    scenario("faye.js", TransportKind::Auto, "websocket").await;
}

#[tokio::test]
async fn cometd_nodejs_server_long_polling() {
    scenario("cometd.js", TransportKind::LongPolling, "long-polling").await;
}

/// The server offers long-polling only: `Auto` must settle on it.
#[tokio::test]
async fn cometd_nodejs_server_auto_settles_on_long_polling() {
    scenario("cometd.js", TransportKind::Auto, "long-polling").await;
}
