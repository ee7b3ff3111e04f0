//! The WebSocket and callback-polling transports against a real server on port 0.

use std::time::Duration;

use bayeux_test_support::{TestServer, WsClient, test_config};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(5);

async fn ws_subscribed(server: &TestServer, subscription: Value) -> WsClient {
    let mut c = WsClient::connect(&server.ws_url).await;
    c.handshake().await;
    c.send(json!([{"channel":"/meta/subscribe","clientId":c.id(),"subscription":subscription,"id":"s"}]))
        .await;
    let reply = c.recv(WAIT).await.unwrap();
    assert_eq!(reply[0]["successful"], true, "{reply:?}");
    c.send(json!([{"channel":"/meta/connect","clientId":c.id(),"connectionType":"websocket","id":"c0"}]))
        .await;
    let reply = c.recv(WAIT).await.unwrap();
    assert_eq!(reply.last().unwrap()["channel"], "/meta/connect");
    assert_eq!(reply.last().unwrap()["successful"], true);
    c
}

#[tokio::test]
async fn messages_are_pushed_while_the_connect_is_held() {
    let server = TestServer::default_config().await;
    let mut c = ws_subscribed(&server, json!("/ws/*")).await;
    // The second connect is held (no reply yet).
    c.send(json!([{"channel":"/meta/connect","clientId":c.id(),"connectionType":"websocket","id":"c1"}]))
        .await;
    let p = server.client();
    for i in 0..20 {
        p.publish("/ws/x", json!(i)).await;
    }
    let mut got = Vec::new();
    while got.len() < 20 {
        let frame = c.recv(WAIT).await.expect("pushed frame");
        for m in frame {
            assert_ne!(m["channel"], "/meta/connect", "connect answered early: {m}");
            got.push(m["data"].as_i64().unwrap());
        }
    }
    assert_eq!(got, (0..20).collect::<Vec<_>>());
    // The held connect is answered at its timeout (2 s in the test config).
    let frame = c.recv(Duration::from_secs(4)).await.expect("connect reply");
    assert_eq!(frame[0]["channel"], "/meta/connect");
    assert_eq!(frame[0]["id"], "c1");
    assert_eq!(frame[0]["successful"], true);
}

#[tokio::test]
async fn websocket_and_long_polling_clients_share_channels() {
    let server = TestServer::default_config().await;
    let mut ws = ws_subscribed(&server, json!("/mix")).await;
    let mut lp = server.client();
    lp.handshake().await;
    lp.subscribe(json!("/mix")).await;
    lp.connect().await;
    ws.send(json!([{"channel":"/mix","clientId":ws.id(),"data":"from-ws","id":"p"}]))
        .await;
    let mut saw_ack = false;
    let mut saw_msg = false;
    while !(saw_ack && saw_msg) {
        for m in ws.recv(WAIT).await.expect("frame") {
            if m["id"] == "p" && m["successful"] == true {
                saw_ack = true;
            }
            if m["data"] == "from-ws" {
                saw_msg = true;
            }
        }
    }
    let (_, deliveries) = lp.connect_split().await;
    assert_eq!(deliveries[0]["data"], "from-ws");
}

#[tokio::test]
async fn disconnect_over_websocket() {
    let server = TestServer::default_config().await;
    let mut c = ws_subscribed(&server, json!("/d")).await;
    c.send(json!([{"channel":"/meta/disconnect","clientId":c.id(),"id":"bye"}]))
        .await;
    let reply = c.recv(WAIT).await.unwrap();
    assert_eq!(reply[0]["channel"], "/meta/disconnect");
    assert_eq!(reply[0]["successful"], true);
    assert_eq!(server.broker.session_count(), 0);
}

#[tokio::test]
async fn a_new_connection_picks_up_the_session_by_client_id() {
    let server = TestServer::default_config().await;
    let c = ws_subscribed(&server, json!("/re")).await;
    let id = c.id();
    drop(c);
    server.client().publish("/re", json!("while away")).await;
    let mut c2 = WsClient::connect(&server.ws_url).await;
    c2.send(json!([{"channel":"/meta/connect","clientId":id,"connectionType":"websocket","id":"again"}]))
        .await;
    let mut got = Vec::new();
    while got.is_empty() {
        for m in c2.recv(WAIT).await.expect("frame") {
            if m["channel"] == "/re" {
                got.push(m);
            }
        }
    }
    assert_eq!(got[0]["data"], "while away");
}

#[tokio::test]
async fn upgrade_on_a_long_polling_only_server_is_refused_cleanly() {
    let mut config = test_config();
    config.transports = vec!["long-polling".into()];
    let server = TestServer::start(config).await;
    let err = tokio_tungstenite::connect_async(&server.ws_url).await;
    match err {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 400);
        }
        other => panic!("upgrade should be refused, got {other:?}"),
    }
    // The server still serves long-polling.
    let mut c = server.client();
    let reply = c.handshake().await;
    assert_eq!(reply["supportedConnectionTypes"], json!(["long-polling"]));
}

#[tokio::test]
async fn websocket_is_closed_at_shutdown() {
    let server = TestServer::default_config().await;
    let mut c = ws_subscribed(&server, json!("/z")).await;
    c.send(json!([{"channel":"/meta/connect","clientId":c.id(),"connectionType":"websocket","id":"held"}]))
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = tokio::spawn(server.stop());
    let frame = c.recv(WAIT).await.expect("held connect answered");
    assert_eq!(frame[0]["id"], "held");
    assert_eq!(c.close_code(WAIT).await, Some(1001));
    stopping.await.unwrap();
}

#[tokio::test]
async fn callback_polling_wraps_replies_in_the_callback() {
    let server = TestServer::default_config().await;
    let message = r#"[{"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":["callback-polling"],"id":"j"}]"#;
    let url =
        reqwest::Url::parse_with_params(&server.url, &[("jsonp", "cb_1.x"), ("message", message)])
            .unwrap();
    let r = reqwest::get(url).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    let body = r.text().await.unwrap();
    let inner = body
        .strip_prefix("cb_1.x(")
        .and_then(|b| b.strip_suffix(");"))
        .unwrap_or_else(|| panic!("not wrapped: {body}"));
    let v: Value = serde_json::from_str(inner).unwrap();
    assert_eq!(v[0]["successful"], true);
    let id = v[0]["clientId"].as_str().unwrap().to_owned();
    // Without a jsonp parameter the Bayeux default callback name is used.
    let connect =
        json!([{"channel":"/meta/connect","clientId":id,"connectionType":"callback-polling"}])
            .to_string();
    let url = reqwest::Url::parse_with_params(&server.url, &[("message", connect)]).unwrap();
    let body = reqwest::get(url).await.unwrap().text().await.unwrap();
    assert!(body.starts_with("jsonpcallback(["), "{body}");
}

/// One WebSocket client sends many publishes without waiting for their replies (they are
/// processed concurrently, so the disk engine can group-commit them): the replies come back in
/// the order sent, and the channel's log and a subscriber get the messages in that order too.
#[tokio::test]
async fn publishes_sent_without_waiting_keep_their_order() {
    for disk in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let server = if disk {
            let engine = bayeux_engine::disk::DiskEngine::open(dir.path(), Default::default())
                .expect("disk engine");
            TestServer::start_with(
                bayeux_server::Server::builder(test_config()).engine(std::sync::Arc::new(engine)),
            )
            .await
        } else {
            TestServer::default_config().await
        };
        let mut sub = ws_subscribed(&server, json!("/order")).await;
        sub.send(json!([{"channel":"/meta/connect","clientId":sub.id(),"connectionType":"websocket","id":"c1"}]))
            .await;
        let mut p = WsClient::connect(&server.ws_url).await;
        p.handshake().await;
        const N: i64 = 300;
        for i in 0..N {
            p.send(json!([{"channel":"/order","clientId":p.id(),"data":i,"id":format!("p{i}")}]))
                .await;
        }
        let mut ids = Vec::new();
        while (ids.len() as i64) < N {
            let frame = p.recv(WAIT).await.expect("publish replies");
            for m in frame {
                assert_eq!(m["successful"], true, "{m}");
                ids.push(m["id"].as_str().unwrap().to_owned());
            }
        }
        let expected: Vec<String> = (0..N).map(|i| format!("p{i}")).collect();
        assert_eq!(ids, expected, "replies in the order sent (disk: {disk})");
        let mut got = Vec::new();
        while (got.len() as i64) < N {
            let frame = sub.recv(WAIT).await.expect("deliveries");
            got.extend(
                frame
                    .iter()
                    .filter(|m| m["channel"] == "/order")
                    .map(|m| m["data"].as_i64().unwrap()),
            );
        }
        assert_eq!(
            got,
            (0..N).collect::<Vec<_>>(),
            "delivered in the order sent (disk: {disk})"
        );
    }
}

/// With a lazy delay, messages published within it reach a WebSocket subscriber together, in
/// one frame, and the held connect is not answered by them.
#[tokio::test]
async fn lazy_delay_batches_pushed_messages_into_one_frame() {
    let mut config = test_config();
    config.timeouts.lazy_delay_ms = 300;
    let server = TestServer::start(config).await;
    let mut c = ws_subscribed(&server, json!("/lazy")).await;
    c.send(json!([{"channel":"/meta/connect","clientId":c.id(),"connectionType":"websocket","id":"c1"}]))
        .await;
    let p = server.client();
    for i in 0..3 {
        p.publish("/lazy", json!(i)).await;
    }
    let frame = c.recv(WAIT).await.expect("pushed frame");
    let data: Vec<Value> = frame.iter().map(|m| m["data"].clone()).collect();
    assert_eq!(data, [json!(0), json!(1), json!(2)], "{frame:?}");
}

/// Frames larger than what the socket takes at once (a subscriber that does not read while
/// about 12 MB are published for it) are written in parts, as the socket drains, and arrive
/// whole and in order once it reads.
#[tokio::test]
async fn frames_to_a_subscriber_that_reads_late_arrive_whole() {
    let server = TestServer::default_config().await;
    let mut sub = ws_subscribed(&server, json!("/big")).await;
    sub.send(json!([{"channel":"/meta/connect","clientId":sub.id(),"connectionType":"websocket","id":"c1"}]))
        .await;
    let mut p = WsClient::connect(&server.ws_url).await;
    p.handshake().await;
    const N: usize = 200;
    let pad = "x".repeat(60_000);
    for i in 0..N {
        p.send(json!([{"channel":"/big","clientId":p.id(),"data":{"i":i,"pad":pad},"id":format!("p{i}")}]))
            .await;
    }
    let mut acked = 0;
    while acked < N {
        let frame = p.recv(WAIT).await.expect("publish replies");
        for m in frame {
            assert_eq!(m["successful"], true, "{m}");
            acked += 1;
        }
    }
    let mut got = Vec::new();
    while got.len() < N {
        let frame = sub.recv(WAIT).await.expect("deliveries");
        for m in frame.iter().filter(|m| m["channel"] == "/big") {
            assert_eq!(m["data"]["pad"].as_str().map(str::len), Some(60_000));
            got.push(m["data"]["i"].as_u64().unwrap() as usize);
        }
    }
    assert_eq!(got, (0..N).collect::<Vec<_>>());
}
