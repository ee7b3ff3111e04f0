//! The replay extension (Salesforce shape) and the ack extension (CometD shape), over real
//! HTTP, plus a property test of the replay seam under concurrent publishing.

use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use bayeux_engine::memory::MemoryEngine;
use bayeux_protocol::{Dialect, decode_batch};
use bayeux_server::Broker;
use bayeux_server::config::ServerConfig;
use bayeux_server::policy::{AllowAll, RequestInfo};
use bayeux_test_support::{LpClient, TestServer, test_config};
use proptest::prelude::*;
use serde_json::{Value, json};

const INVALID_TAIL: &str = " you provided was invalid.  Please provide a valid ID, -2 to replay all events, or -1 to replay only new events.";

async fn replay_client(server: &TestServer) -> LpClient {
    let mut c = server.client();
    let replies = c
        .send(json!([{"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":["long-polling"],"ext":{"replay":true}}]))
        .await;
    assert_eq!(
        replies[0]["ext"]["replay"], true,
        "handshake echoes ext.replay"
    );
    c.client_id = Some(replies[0]["clientId"].as_str().unwrap().to_owned());
    c.connect().await;
    c
}

async fn subscribe_replay(c: &LpClient, channel: &str, replay: Value) -> Value {
    c.send(json!([{"channel":"/meta/subscribe","clientId":c.id(),"subscription":channel,"ext":{"replay":replay}}]))
        .await[0]
        .clone()
}

async fn receive(c: &LpClient, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.len() < n && tokio::time::Instant::now() < deadline {
        let (_, deliveries) = c.connect_split().await;
        got.extend(deliveries);
    }
    got
}

async fn publish_n(server: &TestServer, channel: &str, range: std::ops::Range<i64>) {
    let p = server.client();
    for i in range {
        let ack = p.publish(channel, json!({"n": i})).await;
        assert_eq!(ack["successful"], true);
    }
}

fn ns(v: &[Value]) -> Vec<i64> {
    v.iter().map(|m| m["data"]["n"].as_i64().unwrap()).collect()
}

#[tokio::test]
async fn replay_all_after_n_and_new_only() {
    let server = TestServer::default_config().await;
    publish_n(&server, "/r", 0..10).await;
    let all = replay_client(&server).await;
    assert_eq!(
        subscribe_replay(&all, "/r", json!({"/r": -2})).await["successful"],
        true
    );
    let after = replay_client(&server).await;
    assert_eq!(
        subscribe_replay(&after, "/r", json!({"/r": 4})).await["successful"],
        true
    );
    let new = replay_client(&server).await;
    assert_eq!(
        subscribe_replay(&new, "/r", json!({"/r": -1})).await["successful"],
        true
    );
    publish_n(&server, "/r", 10..12).await;
    let got = receive(&all, 12).await;
    assert_eq!(ns(&got), (0..12).collect::<Vec<_>>());
    let ids: Vec<u64> = got
        .iter()
        .map(|m| m["ext"]["replay"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, (1..=12).collect::<Vec<_>>());
    assert_eq!(ns(&receive(&after, 8).await), (4..12).collect::<Vec<_>>());
    assert_eq!(ns(&receive(&new, 2).await), [10, 11]);
}

#[tokio::test]
async fn replay_id_outside_retention_or_never_issued_is_invalid() {
    let mut config = test_config();
    config.retention.max_messages = 5;
    let server = TestServer::start(config).await;
    publish_n(&server, "/t", 0..10).await;
    let c = replay_client(&server).await;
    for (bad, shown) in [
        (json!(2), "2"),
        (json!(11), "11"),
        (json!(i64::MAX), "9223372036854775807"),
        (json!(18446744073709551615u64), "18446744073709551615"),
        (json!(-3), "-3"),
        (json!("5"), "5"),
        (json!(5.5), "5.5"),
        (json!(null), "null"),
    ] {
        let reply = subscribe_replay(&c, "/t", json!({"/t": bad})).await;
        assert_eq!(reply["successful"], false, "{bad}");
        assert_eq!(
            reply["error"],
            format!("400::The replayId {{{shown}}}{INVALID_TAIL}"),
            "{bad}"
        );
    }
    // The oldest retained is 6: replaying after 5 is exactly everything retained.
    assert_eq!(
        subscribe_replay(&c, "/t", json!({"/t": 5})).await["successful"],
        true
    );
    assert_eq!(ns(&receive(&c, 5).await), (5..10).collect::<Vec<_>>());
}

#[tokio::test]
async fn replay_map_without_the_channel_is_not_found() {
    let server = TestServer::default_config().await;
    let c = replay_client(&server).await;
    let reply = subscribe_replay(&c, "/x", json!({"/y": -1, "/z": 3})).await;
    assert_eq!(
        reply["error"],
        "400::The replayId for channel {/x} wasn't found using the provided replay ID map {{/y=-1, /z=3}}. Ensure that the channel name you provided in the replay map is valid and matches the channel name used for subscribing."
    );
    let reply = subscribe_replay(&c, "/x", json!({})).await;
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("replay ID map {{}}")
    );
    let reply = subscribe_replay(&c, "/x", json!([1, 2])).await;
    assert_eq!(reply["successful"], false);
    assert!(reply["error"].as_str().unwrap().contains("wasn't found"));
    // The session is still usable.
    assert_eq!(
        subscribe_replay(&c, "/x", json!({"/x": -1})).await["successful"],
        true
    );
    server.client().publish("/x", json!({"n": 1})).await;
    assert_eq!(ns(&receive(&c, 1).await), [1]);
}

#[tokio::test]
async fn salesforce_shaped_events_carry_the_id_in_data_event() {
    let server = TestServer::default_config().await;
    let c = replay_client(&server).await;
    subscribe_replay(&c, "/event/Thing__e", json!({"/event/Thing__e": -1})).await;
    server
        .client()
        .publish(
            "/event/Thing__e",
            json!({"schema":"s","payload":{"A":1},"event":{"EventUuid":"u"}}),
        )
        .await;
    let got = receive(&c, 1).await;
    assert_eq!(
        got[0]["data"]["event"],
        json!({"EventUuid":"u","replayId":1})
    );
    assert!(got[0].get("ext").is_none(), "no ext.replay: {}", got[0]);
}

#[tokio::test]
async fn wildcard_replay_delivers_each_channel_in_order_then_live() {
    let server = TestServer::default_config().await;
    publish_n(&server, "/w/b", 0..3).await;
    publish_n(&server, "/w/a", 10..12).await;
    publish_n(&server, "/other", 100..101).await;
    let c = replay_client(&server).await;
    assert_eq!(
        subscribe_replay(&c, "/w/*", json!({"/w/*": -2})).await["successful"],
        true
    );
    publish_n(&server, "/w/c", 20..21).await;
    let got = receive(&c, 6).await;
    let channels: Vec<&str> = got.iter().map(|m| m["channel"].as_str().unwrap()).collect();
    assert_eq!(channels, ["/w/a", "/w/a", "/w/b", "/w/b", "/w/b", "/w/c"]);
    assert_eq!(ns(&got), [10, 11, 0, 1, 2, 20]);
}

#[tokio::test]
async fn ack_extension_redelivers_an_unacknowledged_batch() {
    let server = TestServer::default_config().await;
    let mut c = server.client();
    let replies = c
        .send(json!([{"channel":"/meta/handshake","version":"1.0","ext":{"ack":true}}]))
        .await;
    assert_eq!(replies[0]["ext"]["ack"], true);
    c.client_id = Some(replies[0]["clientId"].as_str().unwrap().to_owned());
    let connect = |ack: u64| json!([{"channel":"/meta/connect","clientId":c.id(),"connectionType":"long-polling","ext":{"ack":ack}}]);
    c.subscribe(json!("/k")).await;
    let (reply, _) = bayeux_test_support::split(c.send(connect(0)).await);
    assert_eq!(reply["ext"]["ack"], 0);
    publish_n(&server, "/k", 0..2).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (reply, got) = bayeux_test_support::split(c.send(connect(0)).await);
    assert_eq!(ns(&got), [0, 1]);
    let batch1 = reply["ext"]["ack"].as_u64().unwrap();
    assert_eq!(batch1, 1);
    // The client "loses" that response: it confirms only batch 0 and new messages arrive.
    publish_n(&server, "/k", 2..3).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (reply, got) = bayeux_test_support::split(c.send(connect(0)).await);
    assert_eq!(
        ns(&got),
        [0, 1, 2],
        "unacked batch first, in order, then the new one"
    );
    let batch2 = reply["ext"]["ack"].as_u64().unwrap();
    assert_eq!(batch2, 2);
    // Confirming batch 2 confirms everything: nothing comes again, and the connect is held.
    let start = std::time::Instant::now();
    let (reply, got) = bayeux_test_support::split(c.send(connect(batch2)).await);
    assert!(got.is_empty(), "acknowledged messages came again: {got:?}");
    assert_eq!(reply["ext"]["ack"], batch2);
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "connect was not held"
    );
}

fn broker() -> Arc<Broker> {
    let b = Broker::new(
        ServerConfig::default(),
        Arc::new(MemoryEngine::default()),
        Arc::new(AllowAll),
        Dialect::Cometd,
    );
    b.start();
    b
}

async fn send(b: &Arc<Broker>, v: Value) -> Vec<bayeux_protocol::Message> {
    let headers = HeaderMap::new();
    let info = RequestInfo {
        headers: &headers,
        remote: None,
        connection_type: "long-polling",
    };
    b.process(&info, decode_batch(v.to_string().as_bytes()).unwrap())
        .await
        .replies
}

/// Publishes `total` messages from a task while a client subscribes with replay at a random
/// point; the subscriber must see exactly the expected messages, each once, in order.
async fn seam_case(total: usize, subscribe_after: usize, replay: i64, yield_every: usize) {
    let b = broker();
    let publisher = {
        let b = b.clone();
        tokio::spawn(async move {
            for i in 0..total {
                let r = send(&b, json!([{"channel":"/seam","data":i}])).await;
                assert_eq!(r[0].successful, Some(true));
                if i % yield_every == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    // Wait until `subscribe_after` messages exist, then subscribe with replay while the
    // publisher keeps going.
    while b.engine().bounds("/seam").await.unwrap().last_issued < subscribe_after as u64 {
        tokio::task::yield_now().await;
    }
    let hs = send(
        &b,
        json!([{"channel":"/meta/handshake","ext":{"replay":true}}]),
    )
    .await;
    let id = hs[0].client_id.clone().unwrap();
    let r = send(
        &b,
        json!([{"channel":"/meta/subscribe","clientId":id,"subscription":"/seam","ext":{"replay":{"/seam":replay}}}]),
    )
    .await;
    assert_eq!(r[0].successful, Some(true), "{:?}", r[0].error);
    publisher.await.unwrap();
    let session = b.session(&id).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let first = if replay == -2 { 0 } else { replay as usize };
    let mut got = Vec::new();
    while got.len() < total - first && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut reply = bayeux_protocol::Message::default();
        for bytes in b.take_for_connect(&session, &mut reply) {
            let v: Value = serde_json::from_slice(&bytes).unwrap();
            got.push(v["data"].as_u64().unwrap() as usize);
        }
    }
    assert_eq!(got, (first..total).collect::<Vec<_>>());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn replay_seam_has_no_gap_and_no_repeat(
        total in 20usize..300,
        at in 0.0f64..1.0,
        from_start in any::<bool>(),
        yield_every in 1usize..8,
    ) {
        let subscribe_after = ((total as f64) * at) as usize;
        let replay = if from_start { -2 } else { (subscribe_after / 2) as i64 };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(seam_case(total, subscribe_after, replay, yield_every));
    }
}

#[tokio::test]
async fn a_replay_longer_than_the_queue_loses_nothing() {
    let mut config = test_config();
    config.limits.max_queue = 100;
    config.timeouts.connect_timeout_ms = 300;
    let server = TestServer::start(config).await;
    publish_n(&server, "/long", 0..1000).await;
    let c = replay_client(&server).await;
    assert_eq!(
        subscribe_replay(&c, "/long", json!({"/long": -2})).await["successful"],
        true
    );
    // Publishing goes on while the history drains, a page per connect.
    let publisher = {
        let p = server.client();
        tokio::spawn(async move {
            for i in 1000..1300 {
                let ack = p.publish("/long", json!({"n": i})).await;
                assert_eq!(ack["successful"], true);
            }
        })
    };
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while got.len() < 1300 && tokio::time::Instant::now() < deadline {
        let (reply, deliveries) = c.connect_split().await;
        assert_eq!(reply["successful"], true, "{reply}");
        assert!(deliveries.len() <= 100, "a response larger than the queue");
        got.extend(ns(&deliveries));
    }
    publisher.await.unwrap();
    assert_eq!(got, (0..1300).collect::<Vec<_>>());
    assert_eq!(
        server
            .metric("bayeux_queue_overflows_total{action=\"drop-oldest\"}")
            .await,
        Some(0.0),
        "history must not overflow the queue"
    );
}

#[tokio::test]
async fn live_messages_dropped_while_a_long_replay_drains_are_read_again() {
    // A queue of 20: the gate's deferred buffer (also 20) overflows while the history drains
    // and the publisher keeps going; those messages must come from the log instead.
    let mut config = test_config();
    config.limits.max_queue = 20;
    config.timeouts.connect_timeout_ms = 300;
    let server = TestServer::start(config).await;
    publish_n(&server, "/flood", 0..500).await;
    let c = replay_client(&server).await;
    assert_eq!(
        subscribe_replay(&c, "/flood", json!({"/flood": -2})).await["successful"],
        true
    );
    let publisher = {
        let p = server.client();
        tokio::spawn(async move {
            for i in 500..1000 {
                p.publish("/flood", json!({"n": i})).await;
            }
        })
    };
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while got.len() < 1000 && tokio::time::Instant::now() < deadline {
        let (_, deliveries) = c.connect_split().await;
        got.extend(ns(&deliveries));
        // A slow reader, so that live messages pile up behind the gate.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    publisher.await.unwrap();
    assert_eq!(got, (0..1000).collect::<Vec<_>>());
}

/// Step by step through the gate's overflow: a replay that has read its channel to the end but
/// waits for room to release its deferred live messages must read the log again for any live
/// message it had to drop meanwhile.
#[tokio::test]
async fn dropped_deferred_messages_are_read_again_from_the_log() {
    let mut config = ServerConfig::default();
    config.limits.max_queue = 20;
    let b = Broker::new(
        config,
        Arc::new(MemoryEngine::default()),
        Arc::new(AllowAll),
        Dialect::Cometd,
    );
    b.start();
    let publish = |from: usize, to: usize| {
        let b = b.clone();
        async move {
            for i in from..to {
                let r = send(&b, json!([{"channel":"/gate","data":i}])).await;
                assert_eq!(r[0].successful, Some(true));
            }
            // Let the fan-out task catch up.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    publish(0, 30).await;
    let hs = send(
        &b,
        json!([{"channel":"/meta/handshake","ext":{"replay":true}}]),
    )
    .await;
    let id = hs[0].client_id.clone().unwrap();
    let r = send(
        &b,
        json!([{"channel":"/meta/subscribe","clientId":id,"subscription":"/gate","ext":{"replay":{"/gate":-2}}}]),
    )
    .await;
    assert_eq!(r[0].successful, Some(true));
    let session = b.session(&id).unwrap();
    let mut got = Vec::new();
    let take = |got: &mut Vec<usize>| {
        let mut reply = bayeux_protocol::Message::default();
        for bytes in b.take_for_connect(&session, &mut reply) {
            let v: Value = serde_json::from_slice(&bytes).unwrap();
            got.push(v["data"].as_u64().unwrap() as usize);
        }
    };
    // 20 of the 30 are queued; 25 live messages fill the gate's buffer (20) and drop 5.
    publish(30, 55).await;
    // Two rounds of drain and refill: the log is read to its end (0..55 queued or delivered)
    // and the replay waits for room for its 20 deferred messages.
    for _ in 0..2 {
        take(&mut got);
        b.refill(&session).await.unwrap();
    }
    assert_eq!(got, (0..40).collect::<Vec<_>>());
    assert_eq!(session.queued(), 15);
    // While it waits, more live messages arrive; the gate's buffer is full: they are dropped.
    publish(55, 65).await;
    for _ in 0..10 {
        take(&mut got);
        b.refill(&session).await.unwrap();
    }
    publish(65, 70).await;
    take(&mut got);
    assert_eq!(got, (0..70).collect::<Vec<_>>());
}
