//! Scale-out under faults: three `bayeux serve --engine redis` nodes share one `redis-server`
//! (started here, `appendfsync always`, stopped by PID) behind a tiny round-robin TCP proxy.
//! 20 subscribers (the bayeux-client library, long-polling, through the proxy) on four
//! channels; one publisher per channel sends to every node in turn. Mid-stream one node is
//! killed with SIGKILL and Redis is stopped for two seconds and started again. Every subscriber
//! must receive every acknowledged message exactly once, in order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bayeux_client::ext::Extension;
use bayeux_client::{BackoffPolicy, Client, Message, Replay, TransportKind};
use bayeux_test_support::RedisServer;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

const NODES: usize = 3;
const SUBSCRIBERS: usize = 20;
const CHANNELS: usize = 4;
/// Each channel's publisher sends one message per this interval.
const PUBLISH_EVERY: Duration = Duration::from_millis(25);
/// From the start of publishing.
const KILL_NODE_AT: Duration = Duration::from_secs(3);
const REDIS_DOWN_AT: Duration = Duration::from_secs(6);
const REDIS_DOWN_FOR: Duration = Duration::from_secs(2);
const PUBLISH_FOR: Duration = Duration::from_secs(12);
/// After publishing stopped, how long subscribers may take to catch up.
const DRAIN_WITHIN: Duration = Duration::from_secs(20);

/// A `bayeux serve` child process; dropping it kills it (SIGKILL, by its PID).
struct Node {
    child: Option<Child>,
    url: String,
    addr: SocketAddr,
}

impl Node {
    fn start(redis_url: &str, prefix: &str, log: &std::path::Path) -> Node {
        let log = std::fs::File::create(log).expect("node log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_bayeux"))
            .args(["serve", "--bind", "127.0.0.1:0", "--engine", "redis"])
            .args(["--redis-url", redis_url, "--redis-prefix", prefix])
            .args(["--connect-timeout-ms", "2000"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start bayeux serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read LISTENING line");
        let url = line
            .strip_prefix("LISTENING ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .trim()
            .to_owned();
        let parsed = url::Url::parse(&url).expect("url");
        let addr = SocketAddr::from((
            [127, 0, 0, 1],
            parsed.port_or_known_default().expect("port"),
        ));
        Node {
            child: Some(child),
            url,
            addr,
        }
    }

    /// SIGKILL: no goodbye to clients, held connects die with their connections.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A round-robin TCP proxy: each accepted connection goes to the next backend in rotation
/// that accepts a connection (a dead node refuses, so it is skipped); bytes are copied both
/// ways until either side closes. Returns its address; it runs until the runtime ends.
async fn proxy(backends: Vec<SocketAddr>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
    let addr = listener.local_addr().expect("proxy addr");
    let next = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                continue;
            };
            let backends = backends.clone();
            let start = next.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                for k in 0..backends.len() {
                    let backend = backends[(start + k) % backends.len()];
                    let connect = TcpStream::connect(backend);
                    let Ok(Ok(mut outbound)) =
                        tokio::time::timeout(Duration::from_secs(1), connect).await
                    else {
                        continue; // dead backend: the next one
                    };
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    return;
                }
            });
        }
    });
    addr
}

/// Counts deliveries as they come off the wire, before the client library drops repeats by
/// replay ID: how many the servers sent twice.
#[derive(Clone, Default)]
struct WireCounter {
    seen: Arc<Mutex<HashSet<(String, i64)>>>,
    repeats: Arc<AtomicUsize>,
}

impl Extension for WireCounter {
    fn incoming(&mut self, message: &mut Message) -> bool {
        if !message.channel.starts_with("/meta/")
            && message.data.is_some()
            && let Some(id) = message.ext_get("replay").and_then(Value::as_i64)
            && !self
                .seen
                .lock()
                .unwrap()
                .insert((message.channel.clone(), id))
        {
            self.repeats.fetch_add(1, Ordering::Relaxed);
        }
        true
    }
}

fn channel(c: usize) -> String {
    format!("/scale/{c}")
}

/// One publisher per channel: message `seq` goes to node `(seq + c) % NODES`, straight over
/// HTTP (no session). A publish that is not acknowledged (error reply, refused connection,
/// timeout) is not retried with the same number: the next attempt gets the next number, so
/// that a message whose fate is unknown can never look like a duplicate. Returns the
/// acknowledged numbers and the attempts.
async fn publish_loop(
    c: usize,
    urls: Vec<String>,
    stop: Arc<AtomicBool>,
    failures: Arc<Mutex<BTreeMap<String, usize>>>,
) -> (Vec<u64>, u64) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http client");
    let ch = channel(c);
    let mut acked = Vec::new();
    let mut seq = 0u64;
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let url = &urls[(seq as usize + c) % urls.len()];
        let body = json!([{"channel": ch, "data": {"seq": seq}}]);
        let outcome = match http.post(url).json(&body).send().await {
            Ok(response) => match response.json::<Vec<Value>>().await {
                Ok(replies) if replies.first().is_some_and(|r| r["successful"] == true) => Ok(()),
                Ok(replies) => Err(replies
                    .first()
                    .and_then(|r| r["error"].as_str())
                    .unwrap_or("no error text")
                    .to_owned()),
                Err(e) => Err(format!("bad reply: {e}")),
            },
            Err(e) if e.is_connect() => Err("connection refused".to_owned()),
            Err(e) if e.is_timeout() => Err("timeout".to_owned()),
            Err(_) => Err("request failed".to_owned()),
        };
        match outcome {
            Ok(()) => acked.push(seq),
            Err(kind) => *failures.lock().unwrap().entry(kind).or_default() += 1,
        }
        seq += 1;
    }
    (acked, seq)
}

/// What one subscriber received: per channel, the `seq` of each message, in arrival order.
type Received = Arc<Mutex<HashMap<String, Vec<u64>>>>;

struct Subscriber {
    client: Client,
    channels: Vec<String>,
    received: Received,
    wire: WireCounter,
    rehandshakes: Arc<AtomicUsize>,
}

async fn subscriber(proxy_url: &str, i: usize, transport: TransportKind) -> Subscriber {
    let wire = WireCounter::default();
    let client = Client::builder(proxy_url)
        .transport(transport)
        .server_timeout(Duration::from_secs(2))
        .network_allowance(Duration::from_secs(3))
        .request_timeout(Duration::from_secs(5))
        .operation_timeout(Duration::from_secs(15))
        .backoff(BackoffPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            jitter: true,
        })
        .extension(wire.clone())
        .build()
        .expect("client");
    let rehandshakes = Arc::new(AtomicUsize::new(0));
    let mut events = client.events();
    let counter = rehandshakes.clone();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            if let bayeux_client::Event::Connected {
                rehandshake: true, ..
            } = event
            {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let channels = vec![channel(i % CHANNELS), channel((i + 1) % CHANNELS)];
    let received: Received = Arc::default();
    for ch in &channels {
        // `All`: should the session be lost, the re-subscription replays from the last
        // replay ID seen (and from the start before any was seen), so nothing is skipped.
        let mut sub = client
            .subscribe(ch, Replay::All)
            .await
            .unwrap_or_else(|e| panic!("subscriber {i} subscribe {ch}: {e}"));
        let received = received.clone();
        let ch = ch.clone();
        tokio::spawn(async move {
            while let Some(message) = sub.next().await {
                let seq = message.data.as_ref().and_then(|d| d["seq"].as_u64());
                let seq = seq.unwrap_or_else(|| panic!("message without seq: {message:?}"));
                received
                    .lock()
                    .unwrap()
                    .entry(ch.clone())
                    .or_default()
                    .push(seq);
            }
        });
    }
    Subscriber {
        client,
        channels,
        received,
        wire,
        rehandshakes,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_a_killed_node_and_a_redis_restart_lose_and_repeat_nothing() {
    scenario(TransportKind::LongPolling).await;
}

/// The same with WebSocket subscribers: a socket stays on its node until that node dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_over_websocket() {
    scenario(TransportKind::WebSocket).await;
}

async fn scenario(transport: TransportKind) {
    let started = Instant::now();
    let mut redis = RedisServer::start();
    let redis_url = format!("{}0", redis.url());
    let prefix = format!("scaleout-{}-{}:", std::process::id(), rand_suffix());
    let logs = tempfile::tempdir().expect("log directory");
    let mut nodes: Vec<Node> = (0..NODES)
        .map(|i| {
            Node::start(
                &redis_url,
                &prefix,
                &logs.path().join(format!("node{i}.log")),
            )
        })
        .collect();
    let path = url::Url::parse(&nodes[0].url).unwrap().path().to_owned();
    let proxy_addr = proxy(nodes.iter().map(|n| n.addr).collect()).await;
    let proxy_url = format!("http://{proxy_addr}{path}");

    let mut subscribers = Vec::new();
    for i in 0..SUBSCRIBERS {
        subscribers.push(subscriber(&proxy_url, i, transport).await);
    }
    for (i, s) in subscribers.iter().enumerate() {
        assert!(
            s.client.wait_connected(Duration::from_secs(10)).await,
            "subscriber {i} not connected"
        );
    }
    eprintln!("setup done after {:?}", started.elapsed());

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(BTreeMap::new()));
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    let publishers: Vec<_> = (0..CHANNELS)
        .map(|c| {
            tokio::spawn(publish_loop(
                c,
                urls.clone(),
                stop.clone(),
                failures.clone(),
            ))
        })
        .collect();
    let publishing = Instant::now();

    tokio::time::sleep_until(publishing + KILL_NODE_AT).await;
    nodes[1].kill();
    eprintln!("node 1 killed at {:?}", publishing.elapsed());

    tokio::time::sleep_until(publishing + REDIS_DOWN_AT).await;
    let redis_pid = redis.pid();
    let mut redis = tokio::task::spawn_blocking(move || {
        redis.stop();
        eprintln!("redis (pid {redis_pid:?}) stopped");
        std::thread::sleep(REDIS_DOWN_FOR);
        redis.start_again();
        redis
    })
    .await
    .expect("redis restart");
    eprintln!(
        "redis started again (pid {:?}) at {:?}",
        redis.pid(),
        publishing.elapsed()
    );

    tokio::time::sleep_until(publishing + PUBLISH_FOR).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked: HashMap<String, Vec<u64>> = HashMap::new();
    let mut attempts = 0;
    for (c, p) in publishers.into_iter().enumerate() {
        let (ok, tried) = p.await.expect("publisher");
        attempts += tried;
        acked.insert(channel(c), ok);
    }
    let total_acked: usize = acked.values().map(Vec::len).sum();
    eprintln!(
        "published: {attempts} attempts, {total_acked} acknowledged, failures {:?}",
        failures.lock().unwrap()
    );
    assert!(
        total_acked as u64 > attempts / 2,
        "too few publishes acknowledged"
    );

    // Every subscriber catches up with every acknowledged message of its channels.
    let complete = |s: &Subscriber| {
        let received = s.received.lock().unwrap();
        s.channels.iter().all(|ch| {
            let got: HashSet<u64> = received.get(ch).into_iter().flatten().copied().collect();
            acked[ch].iter().all(|seq| got.contains(seq))
        })
    };
    let deadline = Instant::now() + DRAIN_WITHIN;
    while Instant::now() < deadline && !subscribers.iter().all(complete) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A little longer, so that a late duplicate would be seen.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut problems = Vec::new();
    let mut unacked_delivered = 0;
    let mut wire_repeats = 0;
    let mut rehandshakes = 0;
    for (i, s) in subscribers.iter().enumerate() {
        wire_repeats += s.wire.repeats.load(Ordering::Relaxed);
        rehandshakes += s.rehandshakes.load(Ordering::Relaxed);
        let received = s.received.lock().unwrap();
        for ch in &s.channels {
            let got = received.get(ch).cloned().unwrap_or_default();
            let acked_set: HashSet<u64> = acked[ch].iter().copied().collect();
            let mut seen = HashSet::new();
            let dups: Vec<u64> = got.iter().copied().filter(|s| !seen.insert(*s)).collect();
            if !dups.is_empty() {
                problems.push(format!("subscriber {i} {ch}: duplicates {dups:?}"));
            }
            let acked_order: Vec<u64> = got
                .iter()
                .copied()
                .filter(|s| acked_set.contains(s))
                .collect();
            if let Some(w) = acked_order.windows(2).find(|w| w[0] >= w[1]) {
                problems.push(format!(
                    "subscriber {i} {ch}: out of order: {} after {}",
                    w[1], w[0]
                ));
            }
            let missing: Vec<u64> = acked[ch]
                .iter()
                .copied()
                .filter(|s| !seen.contains(s))
                .collect();
            if !missing.is_empty() {
                problems.push(format!(
                    "subscriber {i} {ch}: {} of {} acknowledged missing: {}",
                    missing.len(),
                    acked[ch].len(),
                    ranges(&missing)
                ));
            }
            unacked_delivered += got.iter().filter(|s| !acked_set.contains(s)).count();
        }
    }
    eprintln!(
        "checked after {:?}: {unacked_delivered} deliveries of unacknowledged publishes, \
         {wire_repeats} repeats on the wire dropped by the clients, {rehandshakes} re-handshakes",
        started.elapsed()
    );
    for s in &subscribers {
        let _ = tokio::time::timeout(Duration::from_secs(2), s.client.disconnect()).await;
    }
    redis.stop();
    if !problems.is_empty() {
        for i in 0..NODES {
            let log = std::fs::read_to_string(logs.path().join(format!("node{i}.log")));
            let log = log.unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            eprintln!("--- node {i} log tail (newest first):\n{}", tail.join("\n"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// `[0-116, 118, 120-125]`
fn ranges(sorted: &[u64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1] == sorted[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            sorted[i].to_string()
        } else {
            format!("{}-{}", sorted[i], sorted[j])
        });
        i = j + 1;
    }
    format!("[{}]", out.join(", "))
}
