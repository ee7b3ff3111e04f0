//! A node on the Redis engine: what serving its sessions costs in Redis commands. The session
//! path (claims, cursor commits) must not grow with the number of subscribers: a node commits
//! what it sent to all its sessions in one script per batch (docs/scaleout.md).
#![cfg(feature = "redis")]

use std::sync::Arc;
use std::time::Duration;

use bayeux_engine::redis::{RedisEngine, RedisOptions};
use bayeux_engine::{Engine, Retention};
use bayeux_server::Server;
use bayeux_test_support::{RedisServer, TestServer, test_config};
use serde_json::json;

const MESSAGES: i64 = 20;

/// Commands in Redis since the last `CONFIG RESETSTAT` (those run by scripts included).
fn calls(redis: &RedisServer) -> u64 {
    redis.command_counts().iter().map(|(_, n)| n).sum()
}

/// `subscribers` long-polling clients on one node, `MESSAGES` publishes: returns the Redis
/// commands per published message outside the publish path, after checking every subscriber
/// got every message once, in order.
async fn session_commands_per_message(redis: &RedisServer, subscribers: usize) -> f64 {
    let engine = RedisEngine::connect(
        &redis.url(),
        Retention::default(),
        RedisOptions::with_prefix(format!("cost{subscribers}:")),
    )
    .await
    .expect("connect");
    let engine: Arc<dyn Engine> = Arc::new(engine);
    let mut config = test_config();
    config.timeouts.connect_timeout_ms = 5_000;
    let node = TestServer::start_with(Server::builder(config).engine(engine)).await;
    let mut tasks = Vec::new();
    for _ in 0..subscribers {
        let mut c = node.client();
        c.handshake().await;
        assert_eq!(c.subscribe(json!("/cost")).await["successful"], true);
        c.connect_split().await;
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while (got.len() as i64) < MESSAGES && tokio::time::Instant::now() < deadline {
                let (_, deliveries) = c.connect_split().await;
                got.extend(deliveries.iter().filter_map(|m| m["data"]["n"].as_i64()));
            }
            got
        }));
    }
    let mut publisher = node.client();
    publisher.handshake().await;
    // Let every subscriber's connect be held.
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.command(&["CONFIG", "RESETSTAT"]).unwrap();
    for n in 0..MESSAGES {
        let reply = publisher.publish("/cost", json!({ "n": n })).await;
        assert_eq!(reply["successful"], true, "{reply}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for task in tasks {
        let got: Vec<i64> = task.await.unwrap();
        assert_eq!(
            got,
            (0..MESSAGES).collect::<Vec<_>>(),
            "once each, in order"
        );
    }
    let total = calls(redis);
    // The append script: EVALSHA and HMGET, TIME, XADD, HSET, PUBLISH inside it.
    let publish_path = 6 * MESSAGES as u64;
    let counts: Vec<(String, u64)> = redis.command_counts();
    let per_message = (total - publish_path) as f64 / MESSAGES as f64;
    eprintln!(
        "{subscribers} subscribers: {per_message:.1} session commands per message; {counts:?}"
    );
    per_message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_commands_per_message_do_not_grow_with_subscribers() {
    let redis = RedisServer::start();
    let few = session_commands_per_message(&redis, 4).await;
    let many = session_commands_per_message(&redis, 40).await;
    // A record read and write per delivering connect (about 5 commands per subscriber per
    // message) would be about 200 here; one commit script per batch is a handful.
    assert!(
        many < 40.0,
        "40 subscribers: {many:.1} session commands per message (4 subscribers: {few:.1})"
    );
    assert!(
        many < few * 3.0 + 10.0,
        "40 subscribers: {many:.1} session commands per message, 4 subscribers: {few:.1}"
    );
}
