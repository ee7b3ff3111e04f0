//! The client against the real bayeux server (bayeux-test-support's TestServer on port 0):
//! both transports, ordering and exactly-once delivery, a session killed server-side, resuming
//! from a replay store after a restart, and re-authentication through a token provider.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bayeux_client::auth::{AuthError, StaticToken, Token, TokenProvider};
use bayeux_client::ext::replay::{FileReplayStore, MemoryReplayStore, ReplayStore};
use bayeux_client::{BackoffPolicy, Client, Event, Events, Message, Replay, TransportKind};
use bayeux_protocol::{Advice, ChannelName, ErrorKind};
use bayeux_server::Server;
use bayeux_server::broker::{CloseReason, Session};
use bayeux_server::policy::{Denial, Operation, RequestInfo, SecurityPolicy};
use bayeux_test_support::{TestServer, test_config};
use futures::StreamExt;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(15);

fn fast_backoff() -> BackoffPolicy {
    BackoffPolicy {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
        jitter: true,
    }
}

fn client(server: &TestServer, transport: TransportKind) -> bayeux_client::ClientBuilder {
    Client::builder(&server.url)
        .transport(transport)
        .backoff(fast_backoff())
        .request_timeout(Duration::from_secs(5))
        .operation_timeout(Duration::from_secs(10))
}

/// The next `n` messages, or a panic after `WAIT`.
async fn take(sub: &mut bayeux_client::Subscription, n: usize) -> Vec<Message> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout(WAIT, sub.next()).await {
            Ok(Some(m)) => out.push(m),
            Ok(None) => panic!("stream ended after {} of {n}", out.len()),
            Err(_) => panic!("only {} of {n} messages arrived", out.len()),
        }
    }
    out
}

/// Asserts nothing more arrives for a moment.
async fn nothing_more(sub: &mut bayeux_client::Subscription) {
    if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
        panic!("unexpected extra message {m:?}");
    }
}

/// Waits for an event matching `pred`, returning every event seen up to it.
async fn wait_event(events: &mut Events, pred: impl Fn(&Event) -> bool) -> Vec<Event> {
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, events.next()).await {
            Ok(Some(e)) => {
                let done = pred(&e);
                seen.push(e);
                if done {
                    return seen;
                }
            }
            other => panic!("event never came ({other:?}); saw {seen:?}"),
        }
    }
}

fn n_of(m: &Message) -> i64 {
    m.data
        .as_ref()
        .and_then(|d| d["n"].as_i64())
        .expect("data.n")
}

async fn publish_n(server: &TestServer, channel: &str, range: std::ops::Range<i64>) {
    let channel = ChannelName::new(channel).unwrap();
    for n in range {
        server
            .broker
            .publish_from_server(&channel, json!({ "n": n }))
            .await
            .expect("server publish");
    }
}

async fn subscribe_publish(transport: TransportKind, expected: &str) {
    let server = TestServer::default_config().await;
    // Plain Bayeux, without the ack extension (the other tests have it, the default).
    let client = client(&server, transport).ack(false).build().unwrap();
    let mut chat = client.subscribe("/chat/room", Replay::New).await.unwrap();
    assert!(client.wait_connected(WAIT).await);
    assert_eq!(client.status().transport, expected);
    let ack = client
        .publish("/chat/room", json!({"text": "hello"}))
        .await
        .unwrap();
    assert_eq!(ack.successful, Some(true));
    let got = take(&mut chat, 1).await;
    assert_eq!(got[0].channel, "/chat/room");
    assert_eq!(got[0].data, Some(json!({"text": "hello"})));
    // A refused publish is an error, not a hang.
    let denied = client.publish("/a/*", json!(1)).await;
    assert!(denied.is_err());
    client.disconnect().await;
    assert!(client.status().closed);
}

#[tokio::test]
async fn subscribe_and_publish_over_long_polling() {
    subscribe_publish(TransportKind::LongPolling, "long-polling").await;
}

#[tokio::test]
async fn subscribe_and_publish_over_websocket_negotiated() {
    subscribe_publish(TransportKind::Auto, "websocket").await;
}

#[tokio::test]
async fn subscribe_and_publish_over_websocket_only() {
    subscribe_publish(TransportKind::WebSocket, "websocket").await;
}

async fn two_hundred_in_order(transport: TransportKind) {
    let server = TestServer::default_config().await;
    let client = client(&server, transport).build().unwrap();
    let mut feed = client.subscribe("/feed", Replay::New).await.unwrap();
    // Half from the server, half through the client's own publishes.
    publish_n(&server, "/feed", 0..100).await;
    for n in 100..200 {
        client.publish("/feed", json!({ "n": n })).await.unwrap();
    }
    let got: Vec<i64> = take(&mut feed, 200).await.iter().map(n_of).collect();
    assert_eq!(got, (0..200).collect::<Vec<_>>());
    nothing_more(&mut feed).await;
    client.disconnect().await;
}

#[tokio::test]
async fn two_hundred_messages_in_order_exactly_once_long_polling() {
    two_hundred_in_order(TransportKind::LongPolling).await;
}

#[tokio::test]
async fn two_hundred_messages_in_order_exactly_once_websocket() {
    two_hundred_in_order(TransportKind::WebSocket).await;
}

fn kill(server: &TestServer, client: &Client) -> Arc<Session> {
    let id = client.status().client_id.expect("a session");
    let session = server.broker.session(&id).expect("live session");
    server.broker.remove_session(&session, CloseReason::Expired);
    session
}

async fn session_killed_server_side(transport: TransportKind) {
    let server = TestServer::default_config().await;
    let store = Arc::new(MemoryReplayStore::new());
    let client = client(&server, transport)
        .replay_store_arc(store.clone())
        .build()
        .unwrap();
    let mut events = client.events();
    let mut feed = client.subscribe("/feed", Replay::All).await.unwrap();
    assert!(client.wait_connected(WAIT).await);
    publish_n(&server, "/feed", 0..50).await;
    let first: Vec<i64> = take(&mut feed, 50).await.iter().map(n_of).collect();
    assert_eq!(first, (0..50).collect::<Vec<_>>());
    let old_id = client.status().client_id.unwrap();

    kill(&server, &client);
    // Published while the client has no session: only replay can bring these.
    publish_n(&server, "/feed", 50..100).await;

    let seen = wait_event(&mut events, |e| matches!(e, Event::Resumed { .. })).await;
    assert!(
        seen.iter().any(|e| matches!(
            e,
            Event::Reconnecting {
                handshake: true,
                ..
            }
        )),
        "{seen:?}"
    );
    assert!(
        seen.contains(&Event::Resumed {
            channel: "/feed".into(),
            from: 50
        }),
        "resumed from the last replay ID seen: {seen:?}"
    );
    let rest: Vec<i64> = take(&mut feed, 50).await.iter().map(n_of).collect();
    assert_eq!(
        rest,
        (50..100).collect::<Vec<_>>(),
        "nothing lost, nothing twice"
    );
    nothing_more(&mut feed).await;
    let new_id = client.status().client_id.unwrap();
    assert_ne!(old_id, new_id);
    // The replay store has the last event the application received.
    client.flush_checkpoints().await;
    assert_eq!(store.load("/feed").unwrap(), Some(100));
    // Live messages flow in the new session.
    publish_n(&server, "/feed", 100..101).await;
    assert_eq!(n_of(&take(&mut feed, 1).await[0]), 100);
    client.disconnect().await;
}

#[tokio::test]
async fn session_killed_server_side_resumes_from_last_id_long_polling() {
    session_killed_server_side(TransportKind::LongPolling).await;
}

#[tokio::test]
async fn session_killed_server_side_resumes_from_last_id_websocket() {
    session_killed_server_side(TransportKind::WebSocket).await;
}

#[tokio::test]
async fn resume_after_restart_from_the_file_store() {
    let server = TestServer::default_config().await;
    let dir = std::env::temp_dir().join(format!(
        "bayeux-client-it-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("replay.json");
    publish_n(&server, "/orders", 0..10).await;
    {
        let client = client(&server, TransportKind::LongPolling)
            .replay_store(FileReplayStore::open(&path).unwrap())
            .build()
            .unwrap();
        let mut orders = client.subscribe("/orders", Replay::Resume).await.unwrap();
        // Nothing stored yet: resume_default is New, so history is not replayed.
        publish_n(&server, "/orders", 10..15).await;
        let got: Vec<i64> = take(&mut orders, 5).await.iter().map(n_of).collect();
        assert_eq!(got, vec![10, 11, 12, 13, 14]);
        client.disconnect().await;
    }
    let text = std::fs::read_to_string(&path).unwrap();
    let saved: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(saved, json!({"/orders": 15}));
    // Published while no client runs.
    publish_n(&server, "/orders", 15..20).await;
    let client = client(&server, TransportKind::LongPolling)
        .replay_store(FileReplayStore::open(&path).unwrap())
        .build()
        .unwrap();
    let mut orders = client.subscribe("/orders", Replay::Resume).await.unwrap();
    let got: Vec<i64> = take(&mut orders, 5).await.iter().map(n_of).collect();
    assert_eq!(got, vec![15, 16, 17, 18, 19]);
    nothing_more(&mut orders).await;
    client.disconnect().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn stale_replay_id_falls_back_and_reports_it() {
    let server = TestServer::default_config().await;
    publish_n(&server, "/old", 0..3).await;
    let client = client(&server, TransportKind::LongPolling).build().unwrap();
    let mut events = client.events();
    // Never issued: the server answers the 400 "replayId … invalid" error.
    let mut old = client.subscribe("/old", Replay::After(999)).await.unwrap();
    let seen = wait_event(&mut events, |e| matches!(e, Event::ReplayFallback { .. })).await;
    assert!(seen.contains(&Event::ReplayFallback {
        channel: "/old".into(),
        invalid: 999,
        fallback: -2
    }));
    let got: Vec<i64> = take(&mut old, 3).await.iter().map(n_of).collect();
    assert_eq!(got, vec![0, 1, 2]);
    client.disconnect().await;
}

#[tokio::test]
async fn server_side_disconnect_without_provider_gives_up() {
    let server = TestServer::default_config().await;
    let client = client(&server, TransportKind::LongPolling).build().unwrap();
    let mut events = client.events();
    let mut feed = client.subscribe("/feed", Replay::New).await.unwrap();
    assert!(client.wait_connected(WAIT).await);
    // The server disconnects the session: its held connect returns with reconnect none.
    wait_held(&server).await;
    let id = client.status().client_id.unwrap();
    let session = server.broker.session(&id).unwrap();
    server
        .broker
        .remove_session(&session, CloseReason::Disconnected);
    wait_event(&mut events, |e| matches!(e, Event::GaveUp { .. })).await;
    assert!(
        tokio::time::timeout(WAIT, feed.next())
            .await
            .unwrap()
            .is_none()
    );
    assert!(client.status().closed);
    assert!(client.publish("/feed", json!(1)).await.is_err());
}

/// Waits until a connect is held by the server.
async fn wait_held(server: &TestServer) {
    for _ in 0..200 {
        if server.broker.metrics().held_connects.get() > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no connect was held");
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
}

// ----- authentication against a policy that checks bearer tokens -----

/// Accepts only `Authorization: Bearer <valid>`, answering as Salesforce does.
struct BearerPolicy {
    valid: Arc<Mutex<String>>,
}

impl SecurityPolicy for BearerPolicy {
    fn authorize(
        &self,
        request: &RequestInfo<'_>,
        _session: Option<&Session>,
        operation: Operation<'_>,
        _message: &bayeux_protocol::Message,
    ) -> Result<(), Denial> {
        let expected = format!("Bearer {}", self.valid.lock().unwrap());
        let given = request
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if given == Some(expected.as_str()) {
            return Ok(());
        }
        let invalid = ErrorKind::Custom("401::Authentication invalid".into());
        Err(match operation {
            Operation::Handshake => Denial {
                error: ErrorKind::Custom("403::Handshake denied".into()),
                advice: Some(Advice::none()),
                ext: Some(json!({"sfdc": {"failureReason": "401::Authentication invalid"}})),
            },
            Operation::Connect => Denial {
                error: invalid,
                advice: Some(Advice::none()),
                ext: None,
            },
            _ => Denial::new(invalid),
        })
    }
}

/// Hands out `t1`, `t2`, … and fails the calls listed in `fail`.
struct Counting {
    calls: AtomicU32,
    fail: Vec<u32>,
}

#[async_trait::async_trait]
impl TokenProvider for Counting {
    async fn token(&self) -> Result<Token, AuthError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if self.fail.contains(&n) {
            return Err(AuthError::Unreachable(format!("call {n} fails")));
        }
        Ok(Token::bearer(format!("t{n}")))
    }
}

async fn reauthentication(transport: TransportKind) {
    let valid = Arc::new(Mutex::new("t1".to_owned()));
    let server = TestServer::start_with(Server::builder(test_config()).policy(Arc::new(
        BearerPolicy {
            valid: valid.clone(),
        },
    )))
    .await;
    let provider = Arc::new(Counting {
        calls: AtomicU32::new(0),
        fail: vec![2, 3],
    });
    struct Shared(Arc<Counting>);
    #[async_trait::async_trait]
    impl TokenProvider for Shared {
        async fn token(&self) -> Result<Token, AuthError> {
            self.0.token().await
        }
    }
    let client = client(&server, transport)
        .token_provider(Shared(provider.clone()))
        .build()
        .unwrap();
    let mut events = client.events();
    let mut feed = client.subscribe("/feed", Replay::All).await.unwrap();
    publish_n(&server, "/feed", 0..5).await;
    assert_eq!(take(&mut feed, 5).await.len(), 5);

    // The token is revoked; the next token the provider hands out (after two failures) works.
    *valid.lock().unwrap() = "t4".into();
    publish_n(&server, "/feed", 5..10).await;
    let seen = wait_event(&mut events, |e| matches!(e, Event::Resumed { .. })).await;
    let failed = seen
        .iter()
        .filter(|e| matches!(e, Event::AuthFailed { .. }))
        .count();
    assert_eq!(failed, 2, "{seen:?}");
    assert!(seen.contains(&Event::Reauthenticated), "{seen:?}");
    assert_eq!(provider.calls.load(Ordering::SeqCst), 4);
    let rest: Vec<i64> = take(&mut feed, 5).await.iter().map(n_of).collect();
    assert_eq!(rest, vec![5, 6, 7, 8, 9]);
    nothing_more(&mut feed).await;
    client.disconnect().await;
}

#[tokio::test]
async fn revoked_token_reauthenticates_and_resubscribes_long_polling() {
    reauthentication(TransportKind::LongPolling).await;
}

#[tokio::test]
async fn revoked_token_reauthenticates_and_resubscribes_websocket() {
    reauthentication(TransportKind::WebSocket).await;
}

#[tokio::test]
async fn static_token_refused_at_handshake_backs_off_without_hammering() {
    let valid = Arc::new(Mutex::new("good".to_owned()));
    let server = TestServer::start_with(
        Server::builder(test_config()).policy(Arc::new(BearerPolicy { valid })),
    )
    .await;
    let client = client(&server, TransportKind::LongPolling)
        .token_provider(StaticToken::bearer("bad"))
        .give_up_after(3)
        .build()
        .unwrap();
    let mut events = client.events();
    let seen = wait_event(&mut events, |e| matches!(e, Event::GaveUp { .. })).await;
    assert!(
        seen.iter()
            .filter(|e| matches!(e, Event::Reconnecting { .. }))
            .count()
            >= 2,
        "{seen:?}"
    );
    assert!(client.status().closed);
}

#[tokio::test]
async fn ack_extension_is_on_by_default_and_delivers_in_order_exactly_once() {
    for transport in [TransportKind::LongPolling, TransportKind::WebSocket] {
        let server = TestServer::default_config().await;
        let client = client(&server, transport).build().unwrap();
        let mut feed = client.subscribe("/acked", Replay::New).await.unwrap();
        assert!(client.wait_connected(WAIT).await);
        let id = client.status().client_id.unwrap();
        assert!(server.broker.session(&id).unwrap().ack_enabled());
        publish_n(&server, "/acked", 0..50).await;
        let got: Vec<i64> = take(&mut feed, 50).await.iter().map(n_of).collect();
        assert_eq!(got, (0..50).collect::<Vec<_>>(), "{transport:?}");
        nothing_more(&mut feed).await;
        client.disconnect().await;
        let plain = client_without_ack(&server, transport);
        plain.subscribe("/acked", Replay::New).await.unwrap();
        assert!(plain.wait_connected(WAIT).await);
        let id = plain.status().client_id.unwrap();
        assert!(!server.broker.session(&id).unwrap().ack_enabled());
        plain.disconnect().await;
    }
}

fn client_without_ack(server: &TestServer, transport: TransportKind) -> Client {
    client(server, transport).ack(false).build().unwrap()
}

#[tokio::test]
async fn dropping_the_last_stream_unsubscribes() {
    let server = TestServer::default_config().await;
    let client = client(&server, TransportKind::LongPolling).build().unwrap();
    let a = client.subscribe("/drop/me", Replay::New).await.unwrap();
    let b = client.subscribe("/drop/me", Replay::New).await.unwrap();
    assert!(client.wait_connected(WAIT).await);
    let id = client.status().client_id.unwrap();
    let session = server.broker.session(&id).unwrap();
    assert_eq!(session.subscriptions(), vec!["/drop/me".to_owned()]);
    drop(a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(session.subscriptions().len(), 1, "b still wants it");
    drop(b);
    for _ in 0..100 {
        if session.subscriptions().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(session.subscriptions().is_empty());
    client.disconnect().await;
    assert!(
        server.broker.session(&id).is_none(),
        "disconnect ends the session"
    );
}
