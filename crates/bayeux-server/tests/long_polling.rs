//! Long-polling over real HTTP against a real server on port 0.

use std::sync::Arc;
use std::time::Duration;

use bayeux_protocol::{ChannelName, Message};
use bayeux_server::config::QueueOverflow;
use bayeux_test_support::{LpClient, TestServer, split, test_config};
use serde_json::{Value, json};

async fn subscribed(server: &TestServer, subscription: Value) -> LpClient {
    let mut c = server.client();
    c.handshake().await;
    let reply = c.subscribe(subscription).await;
    assert_eq!(reply["successful"], true, "{reply}");
    let (first, _) = c.connect_split().await;
    assert_eq!(first["successful"], true);
    c
}

/// Connects until `n` deliveries arrived (bounded).
async fn receive(c: &LpClient, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} arrived",
            got.len()
        );
        let (reply, deliveries) = c.connect_split().await;
        assert_eq!(reply["successful"], true, "{reply}");
        got.extend(deliveries);
    }
    got
}

#[tokio::test]
async fn handshake_reply_shape() {
    let server = TestServer::default_config().await;
    let mut c = server.client();
    let reply = c.handshake().await;
    assert_eq!(reply["channel"], "/meta/handshake");
    assert_eq!(reply["id"], "h");
    assert_eq!(reply["version"], "1.0");
    assert_eq!(reply["minimumVersion"], "1.0");
    assert_eq!(
        reply["supportedConnectionTypes"],
        json!(["websocket", "long-polling", "callback-polling"])
    );
    assert_eq!(
        reply["advice"],
        json!({"reconnect":"retry","interval":0,"timeout":2000})
    );
    let id = reply["clientId"].as_str().unwrap();
    assert_eq!(id.len(), 25);
    assert!(id.bytes().all(|b| b.is_ascii_alphanumeric()));
}

#[tokio::test]
async fn ids_are_echoed_exactly() {
    let server = TestServer::default_config().await;
    let mut c = server.client();
    c.handshake().await;
    let replies = c
        .send(json!([
            {"channel":"/meta/subscribe","clientId":c.id(),"subscription":"/x","id":7},
            {"channel":"/x","clientId":c.id(),"data":1,"id":"seven"},
        ]))
        .await;
    assert_eq!(replies[0]["id"], json!(7));
    assert_eq!(replies[1]["id"], json!("seven"));
}

#[tokio::test]
async fn publish_subscribe_in_order_with_concrete_channel() {
    let server = TestServer::default_config().await;
    let sub = subscribed(&server, json!("/chat/*")).await;
    let mut publisher = server.client();
    publisher.handshake().await;
    for i in 0..50 {
        let ack = publisher.publish("/chat/room", json!({"n": i})).await;
        assert_eq!(ack["successful"], true, "{ack}");
        assert_eq!(ack["channel"], "/chat/room");
    }
    let got = receive(&sub, 50).await;
    assert_eq!(got.len(), 50);
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m["channel"], "/chat/room");
        assert_eq!(m["data"]["n"], i);
        assert_eq!(m["ext"]["replay"], i + 1, "replay ids grow per channel");
    }
}

#[tokio::test]
async fn one_delivery_per_client_however_many_patterns_match() {
    let server = TestServer::default_config().await;
    let sub = subscribed(&server, json!(["/w/x", "/w/*", "/w/**", "/**"])).await;
    let other = subscribed(&server, json!("/w/*")).await;
    server.client().publish("/w/x", json!("once")).await;
    server.client().publish("/w/x/deep", json!("deep")).await;
    // Let both messages be fanned out before reading the queue.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let got = receive(&sub, 2).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0]["data"], "once");
    assert_eq!(got[1]["data"], "deep");
    assert_eq!(got[1]["channel"], "/w/x/deep");
    let got = receive(&other, 1).await;
    assert_eq!(got.len(), 1, "/w/* must not get /w/x/deep: {got:?}");
}

#[tokio::test]
async fn wildcards_match_exactly_what_they_should() {
    let server = TestServer::default_config().await;
    let one = subscribed(&server, json!("/a/*")).await;
    let deep = subscribed(&server, json!("/a/**")).await;
    let p = server.client();
    for ch in ["/a", "/a/b", "/a/b/c", "/ab/c"] {
        p.publish(ch, json!(ch)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let channels = |v: Vec<Value>| -> Vec<String> {
        v.iter()
            .map(|m| m["channel"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(channels(receive(&one, 1).await), ["/a/b"]);
    assert_eq!(channels(receive(&deep, 2).await), ["/a/b", "/a/b/c"]);
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let server = TestServer::default_config().await;
    let sub = subscribed(&server, json!(["/u/1", "/u/2"])).await;
    let reply = sub.unsubscribe(json!("/u/1")).await;
    assert_eq!(reply["successful"], true);
    assert_eq!(reply["subscription"], "/u/1");
    let p = server.client();
    p.publish("/u/1", json!(1)).await;
    p.publish("/u/2", json!(2)).await;
    let got = receive(&sub, 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["channel"], "/u/2");
}

#[tokio::test]
async fn held_connect_returns_with_messages_and_times_out_empty() {
    let mut config = test_config();
    config.timeouts.connect_timeout_ms = 500;
    let server = TestServer::start(config).await;
    let sub = subscribed(&server, json!("/h")).await;
    // Nothing to deliver: the connect is held about the timeout, then answered empty.
    let start = std::time::Instant::now();
    let (reply, deliveries) = sub.connect_split().await;
    let held = start.elapsed();
    assert_eq!(reply["successful"], true);
    assert!(deliveries.is_empty());
    assert!(held >= Duration::from_millis(450), "held only {held:?}");
    // A message published while the connect is held is answered in that connect.
    let waiter = {
        let sub = sub.clone();
        tokio::spawn(async move { sub.connect_split().await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.client().publish("/h", json!("now")).await;
    let (reply, deliveries) = waiter.await.unwrap();
    assert_eq!(reply["successful"], true);
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0]["data"], "now");
}

#[tokio::test]
async fn a_second_connect_releases_the_first_with_http_500() {
    let server = TestServer::default_config().await;
    let sub = subscribed(&server, json!("/d")).await;
    let body = json!([{"channel":"/meta/connect","clientId":sub.id(),"connectionType":"long-polling","id":"1"}]);
    let first = {
        let sub = sub.clone();
        let body = body.clone();
        tokio::spawn(async move {
            sub.post_raw("application/json", serde_json::to_vec(&body).unwrap())
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = {
        let sub = sub.clone();
        tokio::spawn(async move { sub.connect_split().await })
    };
    let first = first.await.unwrap();
    assert_eq!(first.status, 500);
    assert!(first.content_type.starts_with("application/json"));
    assert_eq!(first.json()[0]["error"], "500::connect_superseded");
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.client().publish("/d", json!("x")).await;
    let (reply, deliveries) = second.await.unwrap();
    assert_eq!(reply["successful"], true);
    assert_eq!(deliveries.len(), 1, "the newer connect gets the message");
}

#[tokio::test]
async fn form_encoded_message_parameter() {
    let server = TestServer::default_config().await;
    let c = server.client();
    let body = format!(
        "message={}",
        urlencode(r#"[{"channel":"/meta/handshake","version":"1.0","id":"f"}]"#)
    );
    let r = c.post_raw("application/x-www-form-urlencoded", body).await;
    assert_eq!(r.status, 200);
    assert!(r.content_type.starts_with("application/json"));
    let v = r.json();
    assert_eq!(v[0]["successful"], true);
    assert_eq!(v[0]["id"], "f");
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn message_type_suffixes_are_routed() {
    let server = TestServer::default_config().await;
    for suffix in ["/handshake", "/connect", "/", "/anything/else"] {
        let c = LpClient::new(&format!("{}{}", server.url, suffix));
        let replies = c
            .send(json!([{"channel":"/meta/handshake","version":"1.0"}]))
            .await;
        assert_eq!(replies[0]["successful"], true, "{suffix}");
    }
}

#[tokio::test]
async fn unknown_session_is_told_to_handshake() {
    let server = TestServer::default_config().await;
    let mut c = server.client();
    c.client_id = Some("nosuchclient".into());
    let (reply, _) = c.connect_split().await;
    assert_eq!(reply["successful"], false);
    assert_eq!(reply["error"], "402::session_unknown");
    assert_eq!(
        reply["advice"],
        json!({"reconnect":"handshake","interval":0})
    );
    let sub = c.subscribe(json!("/x")).await;
    assert_eq!(sub["error"], "402::session_unknown");
}

#[tokio::test]
async fn disconnect_frees_the_session() {
    let server = TestServer::default_config().await;
    let sub = subscribed(&server, json!("/gone")).await;
    assert_eq!(server.broker.session_count(), 1);
    let replies = sub
        .send(json!([{"channel":"/meta/disconnect","clientId":sub.id(),"id":"d"}]))
        .await;
    assert_eq!(replies[0]["successful"], true);
    assert_eq!(replies[0]["id"], "d");
    assert_eq!(server.broker.session_count(), 0);
    assert_eq!(server.broker.subscribed_patterns(), 0);
    assert_eq!(server.metric("bayeux_sessions").await, Some(0.0));
    let (reply, _) = sub.connect_split().await;
    assert_eq!(reply["error"], "402::session_unknown");
}

#[tokio::test]
async fn service_channels_reach_listeners_only() {
    let server = TestServer::default_config().await;
    server.broker.add_service(
        ChannelName::new("/service/echo").unwrap(),
        Arc::new(|broker, session, message| {
            if let Some(session) = session {
                let mut reply = Message::new(message.channel.clone());
                reply.data = message.data.clone();
                broker.deliver(session, &reply);
            }
        }),
    );
    let watcher = subscribed(&server, json!("/**")).await;
    let sub_service = watcher.subscribe(json!("/service/echo")).await;
    assert_eq!(sub_service["successful"], true, "a no-op success");
    let caller = subscribed(&server, json!("/nothing")).await;
    let ack = caller.publish("/service/echo", json!({"q": 1})).await;
    assert_eq!(ack["successful"], true);
    let got = receive(&caller, 1).await;
    assert_eq!(got[0]["channel"], "/service/echo");
    assert_eq!(got[0]["data"], json!({"q": 1}));
    // The watcher of /** sees nothing of it.
    server.client().publish("/marker", json!(0)).await;
    let got = receive(&watcher, 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["channel"], "/marker");
}

#[tokio::test]
async fn queue_limit_drops_oldest_and_counts() {
    let mut config = test_config();
    config.limits.max_queue = 3;
    let server = TestServer::start(config).await;
    let sub = subscribed(&server, json!("/q")).await;
    let p = server.client();
    for i in 0..5 {
        p.publish("/q", json!(i)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let got = receive(&sub, 3).await;
    let data: Vec<Value> = got.iter().map(|m| m["data"].clone()).collect();
    assert_eq!(data, [json!(2), json!(3), json!(4)]);
    assert_eq!(
        server
            .metric("bayeux_queue_overflows_total{action=\"drop-oldest\"}")
            .await,
        Some(2.0)
    );
}

#[tokio::test]
async fn queue_limit_can_disconnect_the_client() {
    let mut config = test_config();
    config.limits.max_queue = 3;
    config.limits.queue_overflow = QueueOverflow::Disconnect;
    let server = TestServer::start(config).await;
    let sub = subscribed(&server, json!("/q")).await;
    let p = server.client();
    for i in 0..4 {
        p.publish("/q", json!(i)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (reply, deliveries) = sub.connect_split().await;
    assert_eq!(reply["error"], "402::session_unknown");
    assert_eq!(reply["advice"]["reconnect"], "handshake");
    assert!(deliveries.is_empty());
    assert_eq!(server.broker.session_count(), 0);
    assert_eq!(
        server
            .metric("bayeux_queue_overflows_total{action=\"disconnect\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn publish_without_client_id_is_allowed() {
    let server = TestServer::default_config().await;
    let sub = subscribed(&server, json!("/anon")).await;
    let anon = LpClient::new(&server.url);
    let ack = anon.publish("/anon", json!("hi")).await;
    assert_eq!(ack["successful"], true);
    let got = receive(&sub, 1).await;
    assert_eq!(got[0]["data"], "hi");
}

#[tokio::test]
async fn every_response_is_json_with_no_cache() {
    let server = TestServer::default_config().await;
    let c = server.client();
    for body in [
        r#"[{"channel":"/meta/handshake"}]"#,
        r#"[{"channel":"/meta/connect","clientId":"x"}]"#,
        "not json",
    ] {
        let r = c.post_raw("application/json", body).await;
        assert!(
            r.content_type.starts_with("application/json"),
            "{body}: {}",
            r.content_type
        );
        let _ = r.json();
    }
}

#[tokio::test]
async fn metrics_endpoint_counts() {
    let server = TestServer::default_config().await;
    let sub = subscribed(&server, json!("/m")).await;
    sub.publish("/m", json!(1)).await;
    receive(&sub, 1).await;
    let text = reqwest::get(format!("{}/metrics", server.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "bayeux_sessions 1",
        "bayeux_messages_published_total 1",
        "bayeux_messages_out_total 1",
        "bayeux_handshakes_total 1",
        "bayeux_held_connects 0",
    ] {
        assert!(text.contains(name), "missing {name:?} in\n{text}");
    }
}

#[tokio::test]
async fn graceful_shutdown_answers_held_connects() {
    let server = TestServer::default_config().await;
    let sub = subscribed(&server, json!("/s")).await;
    let waiter = {
        let sub = sub.clone();
        tokio::spawn(async move { split(sub.connect().await) })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = std::time::Instant::now();
    server.stop().await;
    let (reply, _) = waiter.await.unwrap();
    assert_eq!(reply["successful"], true);
    assert!(start.elapsed() < Duration::from_secs(2));
}

/// At path `/` the endpoint shares its path with `/metrics`: Bayeux requests are served
/// (the front end hands them to the router there, not straight to the endpoint) and
/// `/metrics` still answers the metrics, not a Bayeux error.
#[tokio::test]
async fn endpoint_at_root_path_leaves_metrics_alone() {
    let mut config = test_config();
    config.path = "/".to_owned();
    let server = TestServer::start(config).await;
    let sub = subscribed(&server, json!("/root")).await;
    sub.publish("/root", json!("here")).await;
    let got = receive(&sub, 1).await;
    assert_eq!(got[0]["data"], "here");
    let response = reqwest::get(format!("{}/metrics", server.base))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains("bayeux_messages_published_total 1"), "{text}");
}
