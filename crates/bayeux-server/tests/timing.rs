//! Timing behaviour of the broker under paused tokio time: connect timeout, lazy batching,
//! session sweep, superseded connects. These drive the broker directly (no sockets), so
//! `tokio::time::pause` controls every clock involved.

use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use bayeux_engine::memory::MemoryEngine;
use bayeux_protocol::{Dialect, Message, decode_batch};
use bayeux_server::broker::{Broker, CloseReason, HoldEnd};
use bayeux_server::config::ServerConfig;
use bayeux_server::policy::{AllowAll, RequestInfo};
use serde_json::{Value, json};

fn broker(config: ServerConfig) -> Arc<Broker> {
    let b = Broker::new(
        config,
        Arc::new(MemoryEngine::default()),
        Arc::new(AllowAll),
        Dialect::Cometd,
    );
    b.start();
    b
}

fn msgs(v: Value) -> Vec<Message> {
    decode_batch(v.to_string().as_bytes()).unwrap()
}

async fn process(b: &Arc<Broker>, v: Value) -> bayeux_server::broker::Processed {
    let headers = HeaderMap::new();
    let info = RequestInfo {
        headers: &headers,
        remote: None,
        connection_type: "long-polling",
    };
    b.process(&info, msgs(v)).await
}

async fn handshake(b: &Arc<Broker>) -> String {
    let p = process(b, json!([{"channel":"/meta/handshake","version":"1.0"}])).await;
    p.replies[0].client_id.clone().unwrap()
}

fn connect_msg(id: &str) -> Value {
    json!([{"channel":"/meta/connect","clientId":id,"connectionType":"long-polling"}])
}

async fn subscribed_client(b: &Arc<Broker>, channel: &str) -> String {
    let id = handshake(b).await;
    let p = process(
        b,
        json!([{"channel":"/meta/subscribe","clientId":id,"subscription":channel}]),
    )
    .await;
    assert_eq!(p.replies[0].successful, Some(true));
    // The first connect answers at once.
    let first = process(b, connect_msg(&id)).await.connect.unwrap();
    assert!(first.hold.is_none(), "first connect must not be held");
    id
}

#[tokio::test(start_paused = true)]
async fn held_connect_times_out_at_the_configured_timeout() {
    let mut config = ServerConfig::default();
    config.timeouts.connect_timeout_ms = 30_000;
    let b = broker(config);
    let id = subscribed_client(&b, "/a").await;
    let plan = process(&b, connect_msg(&id)).await.connect.unwrap();
    assert_eq!(plan.hold, Some(Duration::from_secs(30)));
    let start = tokio::time::Instant::now();
    let end = b.hold_connect(&plan.session, plan.hold.unwrap()).await;
    assert_eq!(end, HoldEnd::Timeout);
    assert_eq!(start.elapsed(), Duration::from_secs(30));
}

#[tokio::test(start_paused = true)]
async fn client_advice_timeout_zero_and_first_connect_answer_at_once() {
    let b = broker(ServerConfig::default());
    let id = handshake(&b).await;
    let first = process(&b, connect_msg(&id)).await.connect.unwrap();
    assert_eq!(first.hold, None);
    let advice = first.reply.advice.expect("first connect carries advice");
    assert_eq!(advice.timeout, Some(30_000));
    let zero = process(
        &b,
        json!([{"channel":"/meta/connect","clientId":id,"connectionType":"long-polling","advice":{"timeout":0}}]),
    )
    .await
    .connect
    .unwrap();
    assert_eq!(zero.hold, None);
    assert!(
        zero.reply.advice.is_some(),
        "client advice is answered with advice"
    );
    let later = process(&b, connect_msg(&id)).await.connect.unwrap();
    assert!(later.hold.is_some());
    assert!(later.reply.advice.is_none());
    // A client asking for a shorter hold gets it; a longer one is capped.
    let short = process(
        &b,
        json!([{"channel":"/meta/connect","clientId":id,"connectionType":"long-polling","advice":{"timeout":5000}}]),
    )
    .await
    .connect
    .unwrap();
    assert_eq!(short.hold, Some(Duration::from_secs(5)));
}

#[tokio::test(start_paused = true)]
async fn lazy_delay_batches_messages_into_one_response() {
    let mut config = ServerConfig::default();
    config.timeouts.lazy_delay_ms = 50;
    let b = broker(config);
    let id = subscribed_client(&b, "/a").await;
    let plan = process(&b, connect_msg(&id)).await.connect.unwrap();
    let session = plan.session.clone();
    let holder = {
        let b = b.clone();
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let end = b.hold_connect(&session, plan.hold.unwrap()).await;
            (end, start.elapsed(), b.take_deliveries(&session))
        })
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for i in 0..3 {
        process(&b, json!([{"channel":"/a","data":i}])).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (end, elapsed, deliveries) = holder.await.unwrap();
    assert_eq!(end, HoldEnd::Messages);
    // Woken by the first message at 1000 ms, answered 50 ms later with all three.
    assert_eq!(elapsed, Duration::from_millis(1050));
    assert_eq!(deliveries.len(), 3);
    let data: Vec<Value> = deliveries
        .iter()
        .map(|d| serde_json::from_slice::<Value>(d).unwrap()["data"].clone())
        .collect();
    assert_eq!(data, [json!(0), json!(1), json!(2)]);
}

#[tokio::test(start_paused = true)]
async fn sessions_without_connect_are_swept_after_max_interval() {
    let mut config = ServerConfig::default();
    config.timeouts.max_interval_ms = 10_000;
    config.timeouts.sweep_interval_ms = 1_000;
    let b = broker(config);
    let idle = handshake(&b).await;
    let held = subscribed_client(&b, "/a").await;
    let plan = process(&b, connect_msg(&held)).await.connect.unwrap();
    let session = plan.session.clone();
    let bb = b.clone();
    let holder =
        tokio::spawn(async move { bb.hold_connect(&session, Duration::from_secs(25)).await });
    tokio::time::sleep(Duration::from_millis(9_500)).await;
    assert!(b.session(&idle).is_some(), "swept too early");
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    assert!(b.session(&idle).is_none(), "not swept after max_interval");
    // A session whose connect is held is never swept.
    assert!(b.session(&held).is_some());
    assert_eq!(holder.await.unwrap(), HoldEnd::Timeout);
    // After its connect returns the clock restarts.
    tokio::time::sleep(Duration::from_millis(9_000)).await;
    assert!(b.session(&held).is_some());
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert!(b.session(&held).is_none());
    // An expired session is told to handshake again.
    let p = process(&b, connect_msg(&held)).await;
    let reply = &p.replies[0];
    assert_eq!(reply.error.as_deref(), Some("402::session_unknown"));
    let advice = reply.advice.as_ref().unwrap();
    assert_eq!(
        serde_json::to_value(advice).unwrap(),
        json!({"reconnect":"handshake","interval":0})
    );
}

#[tokio::test(start_paused = true)]
async fn a_newer_connect_supersedes_the_held_one() {
    let b = broker(ServerConfig::default());
    let id = subscribed_client(&b, "/a").await;
    let first = process(&b, connect_msg(&id)).await.connect.unwrap();
    let s1 = first.session.clone();
    let bb = b.clone();
    let older = tokio::spawn(async move { bb.hold_connect(&s1, Duration::from_secs(30)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = process(&b, connect_msg(&id)).await.connect.unwrap();
    let s2 = second.session.clone();
    let bb = b.clone();
    let newer = tokio::spawn(async move { bb.hold_connect(&s2, Duration::from_secs(30)).await });
    assert_eq!(older.await.unwrap(), HoldEnd::Superseded);
    tokio::time::sleep(Duration::from_millis(100)).await;
    process(&b, json!([{"channel":"/a","data":"x"}])).await;
    assert_eq!(newer.await.unwrap(), HoldEnd::Messages);
    assert_eq!(b.take_deliveries(&second.session).len(), 1);
}

#[tokio::test(start_paused = true)]
async fn disconnect_releases_a_held_connect_with_reconnect_none() {
    let b = broker(ServerConfig::default());
    let id = subscribed_client(&b, "/a").await;
    let plan = process(&b, connect_msg(&id)).await.connect.unwrap();
    let s = plan.session.clone();
    let bb = b.clone();
    let held = tokio::spawn(async move { bb.hold_connect(&s, Duration::from_secs(30)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let p = process(&b, json!([{"channel":"/meta/disconnect","clientId":id}])).await;
    assert_eq!(p.replies[0].successful, Some(true));
    assert_eq!(
        held.await.unwrap(),
        HoldEnd::Closed(CloseReason::Disconnected)
    );
    let reply = b.closed_connect_reply(plan.reply, CloseReason::Disconnected);
    assert_eq!(
        reply.advice.unwrap().reconnect,
        Some(bayeux_protocol::Reconnect::None)
    );
    assert!(b.session(&id).is_none());
    assert_eq!(
        b.subscribed_patterns(),
        0,
        "disconnect must free subscriptions"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_answers_held_connects() {
    let b = broker(ServerConfig::default());
    let id = subscribed_client(&b, "/a").await;
    let plan = process(&b, connect_msg(&id)).await.connect.unwrap();
    let s = plan.session.clone();
    let bb = b.clone();
    let held = tokio::spawn(async move { bb.hold_connect(&s, Duration::from_secs(30)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.shutdown();
    assert_eq!(held.await.unwrap(), HoldEnd::Shutdown);
}
