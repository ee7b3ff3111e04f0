//! The Redis engine against a `redis-server` each test starts for itself (on a free loopback
//! port, stopped by its PID): the conformance suite, two nodes sharing one Redis, a Redis
//! restart and outage, a dropped feed subscription, concurrency, retention, and the Redis
//! commands one append costs.
//!
//! `cargo test -p bayeux-engine --features redis` (needs `redis-server` on PATH).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bayeux_engine::redis::{RedisEngine, RedisOptions};
use bayeux_engine::{
    CursorCommit, Engine, EngineError, FeedReceiver, ReplayId, Retention, SessionRecord, Stored,
};
use bayeux_test_support::RedisServer;
use bytes::Bytes;

fn generous() -> Retention {
    Retention {
        max_age: Duration::from_secs(3600),
        max_messages: 1_000_000,
        max_bytes: u64::MAX,
    }
}

fn payload(i: usize) -> Bytes {
    Bytes::from(format!(r#"{{"channel":"/c","data":{i}}}"#))
}

async fn connect(redis: &RedisServer, prefix: &str, retention: Retention) -> RedisEngine {
    RedisEngine::connect(&redis.url(), retention, RedisOptions::with_prefix(prefix))
        .await
        .expect("connect to the test's redis-server")
}

/// Reads `n` messages from a feed (10 s at most for each) and returns (channel, id) pairs.
async fn take(feed: &mut FeedReceiver, n: usize) -> Vec<(String, ReplayId)> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let m = tokio::time::timeout(Duration::from_secs(10), feed.recv())
            .await
            .unwrap_or_else(|_| panic!("feed stalled after {i} of {n}"))
            .expect("feed closed");
        out.push((m.channel.to_string(), m.replay_id));
    }
    out
}

/// Per channel, the IDs in the order the feed yielded them.
fn by_channel(seen: &[(String, ReplayId)]) -> HashMap<String, Vec<ReplayId>> {
    let mut map: HashMap<String, Vec<ReplayId>> = HashMap::new();
    for (c, id) in seen {
        map.entry(c.clone()).or_default().push(*id);
    }
    map
}

/// Appends, retrying (every 50 ms, 5 s at most) while the engine reports Redis unavailable.
async fn append_when_back(engine: &RedisEngine, channel: &str, payload: Bytes) -> Stored {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match engine.append(channel, payload.clone()).await {
            Ok(s) => return s,
            Err(e) => {
                assert!(
                    matches!(e, EngineError::Unavailable(_)),
                    "only Unavailable while Redis comes back: {e:?}"
                );
                assert!(Instant::now() < deadline, "no append after restart: {e}");
                eprintln!("append while Redis comes back: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn assert_quiet(feed: &mut FeedReceiver) {
    assert!(feed.try_recv().is_err(), "feed yielded more than appended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance() {
    let redis = RedisServer::start();
    let url = redis.url();
    let counter = AtomicU64::new(0);
    bayeux_engine::conformance::run_all(|retention| {
        // Each check gets an empty engine: its own key prefix in the same Redis.
        let prefix = format!("conf{}:", counter.fetch_add(1, Ordering::Relaxed));
        let engine = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(RedisEngine::connect(
                &url,
                retention,
                RedisOptions::with_prefix(prefix),
            ))
        })
        .expect("connect");
        Arc::new(engine) as Arc<dyn Engine>
    })
    .await;
    let own = connect(&redis, "own:", generous()).await;
    bayeux_engine::conformance::ownership(Arc::new(own)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_and_named() {
    let redis = RedisServer::start();
    let engine = connect(&redis, "n:", generous()).await;
    assert!(engine.shared());
    assert_eq!(engine.name(), "redis");
    assert_eq!(engine.prefix(), "n:");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_see_every_append_in_order() {
    let redis = RedisServer::start();
    let a = Arc::new(connect(&redis, "two:", generous()).await);
    let b = Arc::new(connect(&redis, "two:", generous()).await);
    let mut feed_a = a.feed();
    let mut feed_b = b.feed();
    let mut tasks = Vec::new();
    for t in 0..8usize {
        let node = if t % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                node.append(&format!("/two/{}", t % 3), payload(i))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let seen_a = take(&mut feed_a, 400).await;
    let seen_b = take(&mut feed_b, 400).await;
    for seen in [&seen_a, &seen_b] {
        for (channel, ids) in by_channel(seen) {
            let expected: Vec<ReplayId> = (1..=ids.len() as u64).collect();
            assert_eq!(ids, expected, "{channel}: every ID once, in order");
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_quiet(&mut feed_a);
    assert_quiet(&mut feed_b);
    // Both nodes read the same logs.
    assert_eq!(a.channels().await.unwrap(), b.channels().await.unwrap());
    let from_b = b.read("/two/0", 0, 1000).await.unwrap();
    assert_eq!(
        from_b.len(),
        a.bounds("/two/0").await.unwrap().last_issued as usize
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_loses_nothing_acknowledged_and_the_feed_resumes() {
    let mut redis = RedisServer::start();
    let node = connect(&redis, "rs:", generous()).await;
    let other = connect(&redis, "rs:", generous()).await;
    let mut feed = node.feed();
    let mut acked = Vec::new();
    for i in 0..20 {
        acked.push(node.append("/rs", payload(i)).await.unwrap().replay_id);
    }

    // Redis is down for a few seconds: every operation fails fast and clearly.
    redis.stop();
    for i in 0..3 {
        let started = Instant::now();
        let err = node
            .append("/rs", payload(100 + i))
            .await
            .expect_err("an append while Redis is down must fail");
        assert!(
            matches!(err, EngineError::Unavailable(_)),
            "append while down: {err:?}"
        );
        eprintln!(
            "an append while Redis is down failed in {:?}: {err}",
            started.elapsed()
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "an append while down took {:?}",
            started.elapsed()
        );
        assert!(
            err.to_string().contains("redis at redis://127.0.0.1:"),
            "the error names Redis: {err}"
        );
    }
    let err = other.read("/rs", 0, 10).await.expect_err("read while down");
    assert!(matches!(err, EngineError::Unavailable(_)), "{err:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!node.feed_connected(), "the feed knows Redis is gone");
    redis.start_again();

    // The nodes reconnect by themselves: appends succeed again within a bounded time (an
    // append racing the reconnection may still fail, clearly, and is then not acknowledged).
    let next = append_when_back(&other, "/rs", payload(200)).await;
    assert_eq!(
        next.replay_id, 21,
        "IDs continue after the restart, never reused"
    );
    acked.push(next.replay_id);
    acked.push(append_when_back(&node, "/rs", payload(201)).await.replay_id);
    for i in 0..10 {
        acked.push(
            node.append("/rs", payload(300 + i))
                .await
                .unwrap()
                .replay_id,
        );
    }

    // Everything acknowledged before the restart is still there (appendfsync always).
    let all = node.read("/rs", 0, 1000).await.unwrap();
    assert_eq!(all.iter().map(|s| s.replay_id).collect::<Vec<_>>(), acked);
    assert_eq!(all[0].payload, payload(0));

    // The feed yields every acknowledged message once, in order, with no gap.
    let seen = take(&mut feed, acked.len()).await;
    assert_eq!(seen.iter().map(|(_, id)| *id).collect::<Vec<_>>(), acked);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_quiet(&mut feed);
    assert!(node.feed_connected());
    assert!(node.feed_resubscriptions() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_feed_subscription_catches_up_without_gaps() {
    let redis = RedisServer::start();
    let node = connect(&redis, "cu:", generous()).await;
    let other = Arc::new(connect(&redis, "cu:", generous()).await);
    let mut feed = node.feed();
    for i in 0..5 {
        other.append("/cu/a", payload(i)).await.unwrap();
    }
    // Drop every pub/sub connection (both nodes' feeds), then append at once, to an old
    // channel and to a new one, while a writer keeps appending too: the notifications published
    // before the feeds resubscribe are lost to pub/sub, and the feed must read those messages
    // from the streams.
    let before = node.feed_resubscriptions();
    let writer = {
        let other = other.clone();
        tokio::spawn(async move {
            for i in 0..100 {
                other.append("/cu/w", payload(i)).await.unwrap();
            }
        })
    };
    for round in 0..3 {
        redis
            .command(&["CLIENT", "KILL", "TYPE", "pubsub"])
            .expect("CLIENT KILL");
        for i in 0..20 {
            other
                .append("/cu/a", payload(round * 100 + i))
                .await
                .unwrap();
            other
                .append("/cu/new", payload(round * 100 + i))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    writer.await.unwrap();
    let seen = take(&mut feed, 5 + 60 + 60 + 100).await;
    let map = by_channel(&seen);
    assert_eq!(map["/cu/a"], (1..=65).collect::<Vec<_>>());
    assert_eq!(map["/cu/new"], (1..=60).collect::<Vec<_>>());
    assert_eq!(map["/cu/w"], (1..=100).collect::<Vec<_>>());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_quiet(&mut feed);
    assert!(
        node.feed_resubscriptions() >= before + 3,
        "the feed resubscribed after each kill"
    );
    assert!(
        node.feed_recovered() > 0,
        "some messages came from the catch-up, not from pub/sub"
    );
    eprintln!(
        "feed: {} resubscriptions, {} messages recovered from the streams",
        node.feed_resubscriptions(),
        node.feed_recovered()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_from_64_tasks_are_acknowledged_and_contiguous() {
    let redis = RedisServer::start();
    let engine = Arc::new(connect(&redis, "cc:", generous()).await);
    let mut feed = engine.feed();
    let mut tasks = Vec::new();
    for t in 0..64 {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..20 {
                ids.push(
                    engine
                        .append("/cc", payload(t * 100 + i))
                        .await
                        .unwrap()
                        .replay_id,
                );
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        let mine = t.await.unwrap();
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "one task's IDs grow");
        ids.extend(mine);
    }
    ids.sort_unstable();
    assert_eq!(ids, (1..=1280).collect::<Vec<_>>());
    let stored = engine.read("/cc", 0, 2000).await.unwrap();
    assert_eq!(stored.len(), 1280);
    assert!(
        stored
            .windows(2)
            .all(|w| w[0].replay_id + 1 == w[1].replay_id)
    );
    let seen = take(&mut feed, 1280).await;
    assert_eq!(
        seen.iter().map(|(_, id)| *id).collect::<Vec<_>>(),
        (1..=1280).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_caps_bytes_exactly_and_trims_in_steps() {
    let redis = RedisServer::start();
    // 10-byte payloads, at most 35 bytes: the last three are kept.
    let engine = connect(
        &redis,
        "rt:",
        Retention {
            max_bytes: 35,
            ..generous()
        },
    )
    .await;
    for i in 0..10 {
        engine
            .append("/b", Bytes::from(format!("payload-{i:02}")))
            .await
            .unwrap();
    }
    let kept = engine.read("/b", 0, 100).await.unwrap();
    assert_eq!(
        kept.iter().map(|s| s.replay_id).collect::<Vec<_>>(),
        [8, 9, 10]
    );
    // A payload bigger than the cap is acknowledged and then not retained.
    let big = engine
        .append("/b", Bytes::from(vec![b'x'; 64]))
        .await
        .unwrap();
    assert_eq!(big.replay_id, 11);
    assert!(engine.read("/b", 0, 100).await.unwrap().is_empty());
    let bounds = engine.bounds("/b").await.unwrap();
    assert_eq!((bounds.first, bounds.last_issued), (None, 11));

    // trim: by count in several bounded steps, then by age; bytes are reported.
    let engine = connect(&redis, "rt2:", generous()).await;
    for i in 0..2500 {
        engine.append("/many", payload(i)).await.unwrap();
    }
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
    assert_eq!(stats.messages, 2490);
    let expected: u64 = (0..2490).map(|i| payload(i).len() as u64).sum();
    assert_eq!(stats.bytes, expected);
    let first = engine.bounds("/many").await.unwrap().first;
    assert_eq!(first, Some(2491));
    let stats = engine
        .trim(&generous(), SystemTime::now() + Duration::from_secs(7200))
        .await
        .unwrap();
    assert_eq!(stats.messages, 10);
    assert_eq!(
        engine.append("/many", payload(0)).await.unwrap().replay_id,
        2501
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_records_are_shared_hashes_with_a_ttl() {
    let redis = RedisServer::start();
    let a = connect(&redis, "ss:", generous()).await;
    let b = connect(&redis, "ss:", generous()).await;
    let record = SessionRecord {
        client_id: "c1".into(),
        subscriptions: vec!["/a/**".into(), "/b".into()],
        cursors: [("/a/x".to_owned(), 3), ("/b".to_owned(), 9)]
            .into_iter()
            .collect(),
        extensions: vec!["ack".into(), "replay".into()],
        epoch: 4,
        owner: None,
    };
    a.save_session(&record, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(b.load_session("c1").await.unwrap(), Some(record.clone()));
    let ttl: i64 = redis
        .command(&["PTTL", "ss:session:c1"])
        .unwrap()
        .parse()
        .unwrap();
    assert!((50_000..=60_000).contains(&ttl), "PTTL {ttl}");
    // Saving again replaces the whole record.
    let smaller = SessionRecord {
        subscriptions: vec![],
        cursors: Default::default(),
        ..record
    };
    b.save_session(&smaller, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(a.load_session("c1").await.unwrap(), Some(smaller));
    b.remove_session("c1").await.unwrap();
    assert_eq!(a.load_session("c1").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_nothing_fails_fast_and_clearly() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let err = RedisEngine::connect(
        &format!("redis://127.0.0.1:{port}/"),
        generous(),
        RedisOptions::default(),
    )
    .await
    .expect_err("nothing listens there");
    assert!(matches!(err, EngineError::Unavailable(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Measures the Redis commands one append costs with two nodes subscribed (printed; run with
/// `--nocapture` to see them) and checks the shape: one EVALSHA per append, one PUBLISH, no
/// per-node reads while the feed keeps up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_commands_per_append() {
    let redis = RedisServer::start();
    let a = connect(&redis, "cmd:", generous()).await;
    let b = connect(&redis, "cmd:", generous()).await;
    let mut feed_a = a.feed();
    let mut feed_b = b.feed();
    // Warm up (script loading, channel creation), then count.
    a.append("/cmd", payload(0)).await.unwrap();
    take(&mut feed_a, 1).await;
    take(&mut feed_b, 1).await;
    redis.command(&["CONFIG", "RESETSTAT"]).unwrap();
    const N: usize = 1000;
    for i in 0..N {
        a.append("/cmd", payload(i)).await.unwrap();
    }
    take(&mut feed_a, N).await;
    take(&mut feed_b, N).await;
    let counts: HashMap<String, u64> = redis.command_counts().into_iter().collect();
    let mut lines: Vec<_> = counts.iter().collect();
    lines.sort();
    println!("INFO commandstats after {N} appends with two nodes subscribed:");
    for (name, calls) in &lines {
        println!(
            "  {name:<10} {calls:>6}  ({:.2} per append)",
            **calls as f64 / N as f64
        );
    }
    assert_eq!(counts.get("evalsha"), Some(&(N as u64)));
    assert_eq!(counts.get("publish"), Some(&(N as u64)));
    assert_eq!(counts.get("xadd"), Some(&(N as u64)));
    assert!(
        !counts.contains_key("xrange"),
        "no catch-up reads: {counts:?}"
    );
}

/// Total command calls since the last `CONFIG RESETSTAT` (commands run by scripts included).
fn command_calls(redis: &RedisServer) -> u64 {
    redis.command_counts().iter().map(|(_, n)| n).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_costs_the_same_number_of_commands_for_one_session_or_a_thousand() {
    let redis = RedisServer::start();
    let engine = connect(&redis, "cc:", generous()).await;
    let ttl = Duration::from_secs(60);
    let commits = |n: usize, at: u64| -> Vec<CursorCommit> {
        (0..n)
            .map(|i| CursorCommit {
                client_id: format!("c{i}"),
                cursors: [("/a".to_owned(), at), ("/b".to_owned(), at + 1)]
                    .into_iter()
                    .collect(),
                release: false,
            })
            .collect()
    };
    // c3 has a record, owned by n1 (the other sessions only commits).
    let record = SessionRecord {
        client_id: "c3".into(),
        subscriptions: vec!["/a".into()],
        cursors: Default::default(),
        extensions: vec![],
        epoch: 1,
        owner: Some("n1".into()),
    };
    engine.save_session(&record, ttl).await.unwrap();
    // Loads the script (the first call is answered NOSCRIPT).
    engine.commit_cursors("n1", &[], ttl).await.unwrap();
    let mut cost = Vec::new();
    for n in [1, 10, 1_000] {
        redis.command(&["CONFIG", "RESETSTAT"]).unwrap();
        engine
            .commit_cursors("n1", &commits(n, 7), ttl)
            .await
            .unwrap();
        // CONFIG RESETSTAT itself is counted after the reset.
        cost.push(command_calls(&redis));
    }
    assert_eq!(cost[0], cost[1], "commands for 1 and 10 sessions: {cost:?}");
    assert_eq!(
        cost[0], cost[2],
        "commands for 1 and 1000 sessions: {cost:?}"
    );
    // EVALSHA; TIME, ZADD (heartbeat); SMEMBERS twice (taken, ended); HSET; ZRANGEBYSCORE
    // (dead nodes); and the CONFIG RESETSTAT before it.
    assert!(
        cost[0] <= 8,
        "a commit takes a handful of commands: {cost:?}"
    );
    let fields: u64 = redis
        .command(&["HLEN", "cc:node:n1"])
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(fields, 1_000);
    // A session taken by another node: its next commit is refused, in the same single call.
    let claimed = engine
        .claim_session("c3", "n2", 5, ttl)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.cursors.get("/a"), Some(&7));
    let outcome = engine
        .commit_cursors("n1", &commits(1_000, 9), ttl)
        .await
        .unwrap();
    assert_eq!(outcome.taken, vec!["c3".to_owned()]);
    let c3: String = redis.command(&["HGET", "cc:node:n2", "c3"]).unwrap();
    assert!(
        c3.contains("\"/a\":7"),
        "n2's commit for c3 is n1's last: {c3}"
    );
    let gone = redis.command(&["HEXISTS", "cc:node:n1", "c3"]).unwrap();
    assert_eq!(
        gone.trim(),
        "0",
        "n1's refused commit for c3 was not written"
    );
}
