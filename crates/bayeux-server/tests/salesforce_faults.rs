//! The Salesforce emulator's failures over real HTTP on port 0: expired and revoked tokens, the
//! reconnect deadline, the concurrent-client and daily-delivery limits, and every
//! `/_emulator/*` fault route.

mod sf_common;

use std::time::Duration;

use bayeux_protocol::error::{SF_CONNECTION_LIMIT, SF_SERVER_BUSY};
use bayeux_test_support::{TestServer, split, test_config};
use serde_json::json;
use sf_common::*;

/// Salesforce's reply to a connect for a session it no longer knows (captured): no clientId.
fn unknown_client(id: &str) -> serde_json::Value {
    json!({
        "advice": {"interval": 0, "reconnect": "handshake"},
        "channel": "/meta/connect",
        "id": id,
        "error": "403::Unknown client",
        "successful": false,
    })
}

/// The connect reply for a dead token (captured, Spring '18 release note).
fn auth_invalid(client_id: &str, id: serde_json::Value) -> serde_json::Value {
    json!({
        "clientId": client_id,
        "advice": {"reconnect": "none", "interval": 0},
        "channel": "/meta/connect",
        "id": id,
        "error": "401::Authentication invalid",
        "successful": false,
    })
}

/// The handshake reply for a dead token.
fn handshake_denied(id: &str, reason: &str) -> serde_json::Value {
    json!({
        "ext": {"sfdc": {"failureReason": reason}, "replay": true, "payload.format": true},
        "advice": {"reconnect": "none"},
        "channel": "/meta/handshake",
        "id": id,
        "error": "403::Handshake denied",
        "successful": false,
    })
}

#[tokio::test]
async fn expired_token() {
    let mut sf = demo();
    sf.token_lifetime_secs = 2;
    let org = Org::start(sf).await;
    let token = org.token().await;
    let mut c = org.client(&token);
    c.ready(&["/event/Demo__e"]).await;
    tokio::time::sleep(Duration::from_millis(2300)).await;

    let replies = c
        .send(json!([{"channel":"/meta/connect","clientId":c.id(),"connectionType":"long-polling","id":7}]))
        .await;
    assert_eq!(replies, vec![auth_invalid(c.id(), json!(7))]);
    let sub = c.subscribe("/u/Demo", None).await;
    assert_eq!(sub["successful"], false, "{sub}");
    assert_eq!(sub["error"], "401::Authentication invalid");
    let replies = c.send(Client::handshake_message("2x")).await;
    assert_eq!(
        replies,
        vec![handshake_denied("2x", "401::Authentication invalid")]
    );
    let r = org
        .post_json(
            &format!("/services/data/v{VERSION}/sobjects/Demo__e/"),
            Some(&token),
            json!({}),
        )
        .await;
    assert_eq!(r.status, 401, "{}", r.text);

    // A fresh token streams again.
    let mut fresh = org.client(&org.token().await);
    fresh.ready(&["/event/Demo__e"]).await;
}

#[tokio::test]
async fn swept_session_is_an_unknown_client() {
    let mut sf = demo();
    sf.reconnect_deadline_secs = 1;
    let org = Org::start(sf).await;
    let token = org.token().await;
    let mut idle = org.client(&token);
    idle.ready(&["/event/Demo__e"]).await;
    // A client that keeps long-polling (held 2 s, longer than the deadline) stays alive.
    let mut busy = org.client(&token);
    busy.ready(&["/event/Demo__e"]).await;
    let polling = tokio::spawn({
        let busy = busy.clone();
        async move {
            for _ in 0..2 {
                let (reply, _) = busy.connect_split().await;
                assert_eq!(reply["successful"], true, "{reply}");
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(1800)).await;

    let r = idle.post(idle.connect_message("83")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!([unknown_client("83")]));
    // Salesforce sent its cookie on this answer too (kdcllc/CometD.NetCore.Salesforce#43).
    assert!(
        r.set_cookies()
            .iter()
            .any(|c| c.starts_with("sfdc-stream=")),
        "{:?}",
        r.set_cookies()
    );
    let sub = idle.subscribe("/u/Demo", None).await;
    assert_eq!(sub["error"], "403::Unknown client", "{sub}");
    assert_eq!(sub["successful"], false);
    assert!(sub.get("clientId").is_none(), "{sub}");

    polling.await.expect("the polling client stayed connected");
    // A clientId never issued gets the same answer.
    let mut stranger = idle.clone();
    stranger.client_id = Some("nosuchclient".into());
    let replies = stranger.send(stranger.connect_message("9")).await;
    assert_eq!(replies, vec![unknown_client("9")]);
    // Handshaking again works.
    idle.ready(&["/event/Demo__e"]).await;
}

#[tokio::test]
async fn concurrent_client_limit() {
    let mut sf = demo();
    sf.max_concurrent_clients = 2;
    let org = Org::start(sf).await;
    let token = org.token().await;
    let mut a = org.client(&token);
    a.handshake().await;
    let mut b = org.client(&token);
    b.handshake().await;

    let mut c = org.client(&token);
    let replies = c.send(Client::handshake_message("3")).await;
    assert_eq!(replies, vec![handshake_denied("3", SF_CONNECTION_LIMIT)]);
    assert_eq!(
        SF_CONNECTION_LIMIT,
        "403::To protect all customers from excessive use and Denial of Service attacks, we limit the number of simultaneous connections per server. Your request has been denied because this limit has been exceeded. Please try your request again later."
    );

    // A client leaving frees its slot.
    let replies = a
        .send(json!([{"channel":"/meta/disconnect","clientId":a.id(),"id":"d"}]))
        .await;
    assert_eq!(replies[0]["successful"], true, "{}", replies[0]);
    assert_eq!(replies[0]["channel"], "/meta/disconnect");
    c.handshake().await;
}

#[tokio::test]
async fn daily_delivery_limit() {
    let mut sf = demo();
    sf.daily_delivery_limit = 2;
    let org = Org::start(sf).await;
    let token = org.token().await;
    let sub = org.subscriber(&["/event/Demo__e"]).await;
    for n in 0..2 {
        org.publish_event(&token, "Demo__e", json!({ "N__c": n }))
            .await;
    }
    let got = sub.receive(2).await;
    assert_eq!(got.len(), 2, "{got:?}");

    org.publish_event(&token, "Demo__e", json!({"N__c": 2}))
        .await;
    let replies = sub.connect().await;
    assert_eq!(replies.len(), 1, "{replies:?}");
    let reply = &replies[0];
    assert_eq!(reply["channel"], "/meta/connect");
    assert_eq!(reply["clientId"], sub.id());
    assert_eq!(reply["successful"], false, "{reply}");
    assert_eq!(
        reply["error"],
        "403::Organization total events daily limit exceeded"
    );
}

#[tokio::test]
async fn busy_fault() {
    let org = Org::start(demo()).await;
    let mut c = org.client(&org.token().await);
    c.handshake().await;
    assert_eq!(
        org.fault("/_emulator/busy?count=2").await,
        json!({"ok": true, "busy": 2})
    );
    for _ in 0..2 {
        let replies = c.connect().await;
        assert_eq!(
            replies,
            vec![json!({
                "clientId": c.id(),
                "channel": "/meta/connect",
                "id": "c",
                "error": SF_SERVER_BUSY,
                "advice": {"reconnect": "retry", "interval": 1000},
                "ext": {"sfdc": {"failureReason": SF_SERVER_BUSY}},
                "successful": false,
            })]
        );
    }
    assert_eq!(
        SF_SERVER_BUSY,
        "503::Server is too busy.  Please try your request again later."
    );
    // Then normal again: this is the session's first successful connect, answered at once.
    let (reply, _) = c.connect_split().await;
    assert_eq!(reply["successful"], true, "{reply}");
    assert_eq!(reply["advice"]["timeout"], 2000);

    // Handshakes and subscribes are meta replies too.
    org.fault("/_emulator/busy?count=2").await;
    let mut d = org.client(&org.token().await);
    let replies = d.send(Client::handshake_message("h")).await;
    assert_eq!(replies[0]["error"], SF_SERVER_BUSY, "{}", replies[0]);
    assert!(replies[0].get("clientId").is_none());
    let sub = c.subscribe("/event/Demo__e", None).await;
    assert_eq!(sub["error"], SF_SERVER_BUSY, "{sub}");
    assert_eq!(sub["subscription"], "/event/Demo__e");
    d.handshake().await;
    let sub = c.subscribe("/event/Demo__e", None).await;
    assert_eq!(sub["successful"], true, "{sub}");

    let r = org
        .http
        .post(format!("{}/_emulator/busy?count=many", org.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
}

#[tokio::test]
async fn stall_fault() {
    let org = Org::start(demo()).await;
    let token = org.token().await;
    let mut a = org.client(&token);
    a.ready(&["/event/Demo__e"]).await;
    let mut b = org.client(&token);
    b.ready(&["/event/Demo__e"]).await;

    // b's connect is held when the stall begins.
    let held = tokio::spawn({
        let b = b.clone().with_timeout(Duration::from_secs(4));
        async move { b.try_post(&b.connect_message("held")).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        org.fault("/_emulator/stall?seconds=2").await,
        json!({"ok": true, "stall_seconds": 2})
    );
    // An event waits for the first connect after the stall.
    let published = org
        .publish_event(&token, "Demo__e", json!({"N__c": 1}))
        .await;
    let uuid = published["errors"][0]["message"].clone();

    // a's connect arrives within the window: never answered.
    let short = a.clone().with_timeout(Duration::from_secs(3));
    let started = tokio::time::Instant::now();
    let err = short
        .try_post(&a.connect_message("stalled"))
        .await
        .expect_err("a connect during the stall is never answered");
    assert!(err.is_timeout(), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(2900));
    let err = held
        .await
        .unwrap()
        .expect_err("a connect held when the stall began is never answered");
    assert!(err.is_timeout(), "{err}");

    // The window is over: connects work again, and the event was not lost.
    for c in [&a, &b] {
        let (reply, deliveries) = c.connect_split().await;
        assert_eq!(reply["successful"], true, "{reply}");
        assert_eq!(deliveries.len(), 1, "{deliveries:?}");
        assert_eq!(deliveries[0]["data"]["event"]["EventUuid"], uuid);
    }
    let start = tokio::time::Instant::now();
    let (reply, deliveries) = a.connect_split().await;
    assert_eq!(reply["successful"], true, "{reply}");
    assert!(deliveries.is_empty());
    assert!(start.elapsed() >= Duration::from_millis(1900));
}

#[tokio::test]
async fn disconnect_fault() {
    let org = Org::start(demo()).await;
    let token = org.token().await;
    let mut c = org.client(&token);
    c.ready(&["/event/Demo__e"]).await;
    let mut idle = org.client(&token);
    idle.ready(&["/event/Demo__e"]).await;

    let held = tokio::spawn({
        let c = c.clone();
        async move {
            let start = tokio::time::Instant::now();
            let replies = c.send(c.connect_message("held")).await;
            (start.elapsed(), replies)
        }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        org.fault("/_emulator/disconnect").await,
        json!({"ok": true, "disconnected": 2})
    );
    let (elapsed, replies) = held.await.unwrap();
    assert!(
        elapsed < Duration::from_millis(1500),
        "answered after {elapsed:?}"
    );
    let (reply, others) = split(replies);
    assert_eq!(
        others,
        vec![json!({
            "channel": "/meta/disconnect",
            "clientId": c.id(),
            "advice": {"reconnect": "handshake", "interval": 0},
            "successful": true,
        })]
    );
    assert_eq!(reply["successful"], true, "{reply}");
    assert_eq!(reply["id"], "held");
    assert_eq!(
        reply["advice"],
        json!({"reconnect": "handshake", "interval": 0})
    );

    // The sessions are gone.
    let replies = c.send(c.connect_message("after")).await;
    assert_eq!(replies, vec![unknown_client("after")]);
    let replies = idle.send(idle.connect_message("idle")).await;
    assert_eq!(replies, vec![unknown_client("idle")]);
    // Handshaking again works.
    c.ready(&["/event/Demo__e"]).await;
}

#[tokio::test]
async fn expire_sessions_fault() {
    let org = Org::start(demo()).await;
    let token = org.token().await;
    let mut a = org.client(&token);
    a.ready(&["/event/Demo__e"]).await;
    let mut b = org.client(&token);
    b.ready(&["/event/Demo__e"]).await;
    let held = tokio::spawn({
        let b = b.clone();
        async move { b.send(b.connect_message("held")).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        org.fault("/_emulator/expire-sessions").await,
        json!({"ok": true, "expired": 2})
    );
    assert_eq!(held.await.unwrap(), vec![unknown_client("held")]);
    let replies = a.send(a.connect_message("next")).await;
    assert_eq!(replies, vec![unknown_client("next")]);
    // The tokens still work: handshake and subscribe again.
    a.ready(&["/event/Demo__e"]).await;
}

#[tokio::test]
async fn revoke_fault() {
    let org = Org::start(demo()).await;
    let token = org.token().await;
    let mut c = org.client(&token);
    c.ready(&["/event/Demo__e"]).await;
    assert_eq!(
        org.fault("/_emulator/revoke").await,
        json!({"ok": true, "revoked": 1})
    );
    let replies = c.send(c.connect_message("c")).await;
    assert_eq!(replies, vec![auth_invalid(c.id(), json!("c"))]);
    let replies = c.send(Client::handshake_message("h")).await;
    assert_eq!(
        replies,
        vec![handshake_denied("h", "401::Authentication invalid")]
    );
    // Refresh tokens die too.
    let r = org
        .form(
            "/services/oauth2/token",
            &[
                ("grant_type", "refresh_token"),
                ("client_id", "demo"),
                ("client_secret", "demo"),
                ("refresh_token", "demo-refresh-token"),
            ],
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json(),
        json!({"error": "invalid_grant", "error_description": "expired access/refresh token"})
    );
    // A new login works.
    let mut fresh = org.client(&org.token().await);
    fresh.ready(&["/event/Demo__e"]).await;
}

#[tokio::test]
async fn emulator_routes_exist_only_in_emulator_mode() {
    let server = TestServer::start(test_config()).await;
    let http = reqwest::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .build()
        .unwrap();
    for path in [
        "/_emulator/revoke",
        "/_emulator/expire-sessions",
        "/_emulator/disconnect",
        "/_emulator/busy?count=1",
        "/_emulator/stall?seconds=1",
        "/_emulator/publish?channel=/u/Demo",
        "/services/oauth2/token",
        "/services/oauth2/revoke",
        "/services/Soap/u/44.0",
        "/services/data/v59.0/sobjects/Demo__e/",
    ] {
        let r = http
            .post(format!("{}{path}", server.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 404, "{path}");
    }
}
