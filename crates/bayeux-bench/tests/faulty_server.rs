//! `bayeux bench` against a tiny long-polling Bayeux server that misbehaves on purpose and
//! counts its own misdeeds: it drops some deliveries, repeats others, rejects some publishes
//! (and delivers a few of those anyway), and tells every other one of the first sessions to
//! handshake again on its first connect. The bench must report exactly those numbers.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::routing::post;
use bayeux_bench::{BenchArgs, run};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::Notify;

#[derive(Default)]
struct Session {
    queue: Vec<Value>,
    notify: Arc<Notify>,
    connects: u64,
    /// Told to handshake again on its first connect.
    evict_on_first_connect: bool,
}

#[derive(Default)]
struct Faulty {
    sessions: Mutex<HashMap<String, Session>>,
    /// channel → subscribed client ids, in subscription order.
    subs: Mutex<HashMap<String, Vec<String>>>,
    handshakes: AtomicU64,
    publishes: AtomicU64,
    rejected: AtomicU64,
    /// Deliveries owed for accepted publishes (one per subscriber of the channel).
    owed: AtomicU64,
    dropped: AtomicU64,
    repeated: AtomicU64,
    delivered_unacked: AtomicU64,
    evicted: AtomicU64,
    unknown: AtomicU64,
}

/// Subscribers plus publishers in the test: each handshakes once before any eviction.
const CLIENTS: u64 = 7;

/// Which deliveries misbehave, decided from the message's seq and the subscriber's position.
fn rejects(seq: u64) -> bool {
    seq % 10 == 7
}
fn delivers_anyway(seq: u64) -> bool {
    seq % 20 == 17
}
fn drops(seq: u64, i: u64) -> bool {
    (seq + i) % 9 == 4
}
fn repeats(seq: u64, i: u64) -> bool {
    (seq + i) % 7 == 2
}

impl Faulty {
    fn forget(&self, cid: &str) {
        self.sessions.lock().remove(cid);
        for list in self.subs.lock().values_mut() {
            list.retain(|c| c != cid);
        }
    }

    async fn handle(&self, m: Value) -> Vec<Value> {
        let channel = m["channel"].as_str().unwrap_or("").to_owned();
        let id = m["id"].clone();
        let cid = m["clientId"].as_str().unwrap_or("").to_owned();
        match channel.as_str() {
            "/meta/handshake" => {
                let n = self.handshakes.fetch_add(1, Ordering::SeqCst) + 1;
                let cid = format!("c{n}");
                self.sessions.lock().insert(
                    cid.clone(),
                    Session {
                        // Among the first handshakes only (one per client of the test), so
                        // that a client's handshake after an eviction is never evicted again:
                        // with concurrent setups, "every other handshake" could hit one client
                        // until it gives up.
                        evict_on_first_connect: n % 2 == 1 && n <= CLIENTS,
                        ..Session::default()
                    },
                );
                vec![json!({
                    "channel": channel, "id": id, "successful": true, "clientId": cid,
                    "version": "1.0", "supportedConnectionTypes": ["long-polling"],
                    "advice": {"reconnect": "retry", "interval": 0, "timeout": 300}
                })]
            }
            "/meta/subscribe" => {
                let sub = m["subscription"].as_str().unwrap_or("").to_owned();
                let known = self.sessions.lock().contains_key(&cid);
                if known {
                    self.subs.lock().entry(sub.clone()).or_default().push(cid);
                }
                vec![
                    json!({"channel": channel, "id": id, "subscription": sub, "successful": known}),
                ]
            }
            "/meta/disconnect" => {
                self.forget(&cid);
                vec![json!({"channel": channel, "id": id, "successful": true})]
            }
            "/meta/connect" => self.connect(&cid, id).await,
            _ => self.publish(&channel, id, &m["data"]),
        }
    }

    async fn connect(&self, cid: &str, id: Value) -> Vec<Value> {
        let notify = {
            let mut sessions = self.sessions.lock();
            let Some(s) = sessions.get_mut(cid) else {
                self.unknown.fetch_add(1, Ordering::SeqCst);
                return vec![json!({
                    "channel": "/meta/connect", "id": id, "successful": false,
                    "error": "402::session_unknown",
                    "advice": {"reconnect": "handshake", "interval": 0}
                })];
            };
            s.connects += 1;
            if s.connects == 1 && s.evict_on_first_connect {
                drop(sessions);
                self.forget(cid);
                self.evicted.fetch_add(1, Ordering::SeqCst);
                return vec![json!({
                    "channel": "/meta/connect", "id": id, "successful": false,
                    "error": "402::session_unknown",
                    "advice": {"reconnect": "handshake", "interval": 0}
                })];
            }
            (s.connects > 1 && s.queue.is_empty()).then(|| s.notify.clone())
        };
        if let Some(n) = notify {
            let _ = tokio::time::timeout(Duration::from_millis(300), n.notified()).await;
        }
        let mut out = self
            .sessions
            .lock()
            .get_mut(cid)
            .map(|s| std::mem::take(&mut s.queue))
            .unwrap_or_default();
        out.push(json!({"channel": "/meta/connect", "id": id, "successful": true}));
        out
    }

    fn publish(&self, channel: &str, id: Value, data: &Value) -> Vec<Value> {
        self.publishes.fetch_add(1, Ordering::SeqCst);
        let seq = data["seq"].as_u64().expect("bench data has seq");
        let rejected = rejects(seq);
        if rejected {
            self.rejected.fetch_add(1, Ordering::SeqCst);
        }
        if !rejected || delivers_anyway(seq) {
            let delivery = json!({"channel": channel, "data": data});
            let subs = self.subs.lock().get(channel).cloned().unwrap_or_default();
            let mut sessions = self.sessions.lock();
            for (i, cid) in subs.iter().enumerate() {
                let i = i as u64;
                let Some(s) = sessions.get_mut(cid) else {
                    continue;
                };
                if rejected {
                    self.delivered_unacked.fetch_add(1, Ordering::SeqCst);
                } else {
                    self.owed.fetch_add(1, Ordering::SeqCst);
                    if drops(seq, i) {
                        self.dropped.fetch_add(1, Ordering::SeqCst);
                        continue;
                    }
                }
                s.queue.push(delivery.clone());
                if !rejected && repeats(seq, i) {
                    s.queue.push(delivery.clone());
                    self.repeated.fetch_add(1, Ordering::SeqCst);
                }
                s.notify.notify_one();
            }
        }
        let mut ack = json!({"channel": channel, "id": id, "successful": !rejected});
        if rejected {
            ack["error"] = json!("403::publish_denied");
        }
        vec![ack]
    }
}

async fn endpoint(State(f): State<Arc<Faulty>>, body: axum::body::Bytes) -> Json<Vec<Value>> {
    let messages: Vec<Value> = serde_json::from_slice(&body).expect("bench sends arrays");
    let mut out = Vec::new();
    for m in messages {
        out.extend(f.handle(m).await);
    }
    Json(out)
}

async fn start_faulty() -> (String, Arc<Faulty>, tokio::task::JoinHandle<()>) {
    let faulty = Arc::new(Faulty::default());
    let app = axum::Router::new()
        .route("/cometd", post(endpoint))
        .with_state(faulty.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/cometd", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, faulty, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_exactly_what_a_faulty_server_drops_and_repeats() {
    let (url, f, task) = start_faulty().await;
    let args = BenchArgs::from_flags([
        "bench",
        "--url",
        &url,
        "--subscribers",
        "5",
        "--channels",
        "2",
        "--publishers",
        "2",
        "--rate",
        "300",
        "--in-flight",
        "2",
        // No warm-up: every publish the server sees is in the measured window.
        "--warmup",
        "0",
        "--duration",
        "1.5",
        "--grace",
        "1",
        "--request-timeout",
        "5",
        "--no-progress",
    ])
    .unwrap();
    let r = run(args).await.expect("bench runs");
    let line = serde_json::to_string(&r).unwrap();
    let get = |a: &AtomicU64| a.load(Ordering::SeqCst);

    assert_eq!(r.subscribers_ready, 5, "{line}");
    assert_eq!(r.publishers_ready, 2, "{line}");
    assert_eq!(get(&f.unknown), 0, "{line}");
    // The misdeeds happened, so the test tests something.
    for (name, n) in [
        ("rejected", &f.rejected),
        ("dropped", &f.dropped),
        ("repeated", &f.repeated),
        ("delivered_unacked", &f.delivered_unacked),
        ("evicted", &f.evicted),
    ] {
        assert!(get(n) > 0, "the faulty server never {name}: {line}");
    }

    assert_eq!(r.published, get(&f.publishes), "{line}");
    assert_eq!(r.acked, get(&f.publishes) - get(&f.rejected), "{line}");
    assert_eq!(r.expected, get(&f.owed), "{line}");
    assert_eq!(r.lost, get(&f.dropped), "{line}");
    assert_eq!(r.duplicated, get(&f.repeated), "{line}");
    assert_eq!(r.delivered, r.expected - r.lost, "{line}");
    assert_eq!(r.delivered_unacked, get(&f.delivered_unacked), "{line}");

    assert_eq!(
        r.errors.get("rehandshake"),
        Some(&get(&f.evicted)),
        "{line}"
    );
    assert_eq!(
        r.errors.get("connect_failed:402"),
        Some(&get(&f.evicted)),
        "{line}"
    );
    assert_eq!(
        r.errors.get("publish_failed:403"),
        Some(&get(&f.rejected)),
        "{line}"
    );
    let known = ["rehandshake", "connect_failed:402", "publish_failed:403"];
    assert!(
        r.errors.keys().all(|k| known.contains(&k.as_str())),
        "unexpected errors: {line}"
    );
    task.abort();
}
