//! The client against a tiny scripted Bayeux server written here (axum on port 0): connects
//! that never answer (the watchdog), bad answers (non-JSON, HTTP 500, no `successful`, a huge
//! body, an empty array), HTTP 401, a WebSocket offer that cannot be honoured, and a
//! server-sent `/meta/disconnect`. The client must recover every time: no panic, no hang.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bayeux_client::auth::{AuthError, Token, TokenProvider};
use bayeux_client::{BackoffPolicy, Client, Event, Events, Replay, TransportKind};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(15);

#[derive(Clone)]
enum Answer {
    Raw(u16, Vec<u8>),
    Json(Value),
}

#[derive(Default)]
struct Fake {
    handshakes: Mutex<VecDeque<Answer>>,
    connects: Mutex<VecDeque<Answer>>,
    /// Connects that may be held are never answered (up to 30 s).
    hang_held: bool,
    offer_websocket: bool,
    require_auth: Option<String>,
    handshake_count: AtomicU32,
    connect_count: AtomicU32,
    auth_seen: Mutex<Vec<String>>,
    next_replay: AtomicI64,
}

fn json_response(status: u16, body: Vec<u8>) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

fn answer(a: Answer) -> Response {
    match a {
        Answer::Raw(status, body) => json_response(status, body),
        Answer::Json(v) => json_response(200, serde_json::to_vec(&v).unwrap()),
    }
}

async fn endpoint(State(fake): State<Arc<Fake>>, headers: HeaderMap, body: Bytes) -> Response {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    fake.auth_seen.lock().unwrap().push(auth.clone());
    if let Some(required) = &fake.require_auth
        && &auth != required
    {
        return json_response(401, b"{}".to_vec());
    }
    let Ok(Value::Array(messages)) = serde_json::from_slice::<Value>(&body) else {
        return json_response(400, b"[]".to_vec());
    };
    let mut out = Vec::new();
    for m in messages {
        let channel = m["channel"].as_str().unwrap_or("").to_owned();
        let id = m["id"].clone();
        match channel.as_str() {
            "/meta/handshake" => {
                fake.handshake_count.fetch_add(1, Ordering::SeqCst);
                if let Some(a) = fake.handshakes.lock().unwrap().pop_front() {
                    return answer(a);
                }
                let types = if fake.offer_websocket {
                    json!(["websocket", "long-polling"])
                } else {
                    json!(["long-polling"])
                };
                out.push(json!({
                    "channel": channel, "id": id, "successful": true, "clientId": "fake1",
                    "version": "1.0", "supportedConnectionTypes": types,
                    "advice": {"reconnect": "retry", "interval": 0, "timeout": 500},
                    "ext": {"replay": true}
                }));
            }
            "/meta/connect" => {
                fake.connect_count.fetch_add(1, Ordering::SeqCst);
                if let Some(a) = fake.connects.lock().unwrap().pop_front() {
                    return answer(a);
                }
                let quick = m["advice"]["timeout"] == json!(0);
                if !quick {
                    if fake.hang_held {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    } else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    let n = fake.next_replay.fetch_add(1, Ordering::SeqCst) + 1;
                    out.push(json!({"channel": "/fake", "data": {"n": n}, "ext": {"replay": n}}));
                }
                out.push(json!({"channel": channel, "id": id, "successful": true}));
            }
            _ => out.push(json!({
                "channel": channel, "id": id, "successful": true,
                "subscription": m["subscription"].clone()
            })),
        }
    }
    answer(Answer::Json(Value::Array(out)))
}

struct Running {
    url: String,
    fake: Arc<Fake>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(fake: Fake) -> Running {
    let fake = Arc::new(fake);
    let app = Router::new()
        .route("/cometd", post(endpoint))
        .with_state(fake.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await;
    });
    Running {
        url: format!("http://{addr}/cometd"),
        fake,
        _stop: tx,
    }
}

fn builder(url: &str) -> bayeux_client::ClientBuilder {
    Client::builder(url)
        .transport(TransportKind::LongPolling)
        .backoff(BackoffPolicy {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(100),
            jitter: true,
        })
        .request_timeout(Duration::from_secs(3))
        .operation_timeout(Duration::from_secs(10))
}

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

#[tokio::test]
async fn watchdog_aborts_a_connect_that_never_answers_and_escalates() {
    let server = start(Fake {
        hang_held: true,
        ..Fake::default()
    })
    .await;
    let client = builder(&server.url)
        .network_allowance(Duration::from_millis(300))
        .max_stalls(2)
        .build()
        .unwrap();
    let mut events = client.events();
    let started = std::time::Instant::now();
    let seen = wait_event(&mut events, |e| {
        matches!(
            e,
            Event::Stalled {
                rehandshake: true,
                ..
            }
        )
    })
    .await;
    assert!(
        seen.contains(&Event::Stalled {
            count: 1,
            rehandshake: false
        }),
        "{seen:?}"
    );
    // Two deadlines of 500 ms + 300 ms, give or take.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The fresh handshake happens and the client is connected again.
    wait_event(&mut events, |e| matches!(e, Event::Connected { .. })).await;
    assert_eq!(server.fake.handshake_count.load(Ordering::SeqCst), 2);
    client.disconnect().await;
}

#[tokio::test]
async fn bad_answers_are_recovered_from() {
    let huge = {
        let pad = "x".repeat(2 << 20);
        Answer::Json(json!([{"channel": "/meta/handshake", "successful": true, "pad": pad}]))
    };
    let bad = vec![
        Answer::Raw(200, b"<html>not json</html>".to_vec()),
        Answer::Raw(500, Vec::new()),
        Answer::Json(json!([{"channel": "/meta/handshake", "clientId": "x"}])),
        huge.clone(),
        Answer::Raw(200, b"[]".to_vec()),
        Answer::Raw(200, b"42".to_vec()),
        Answer::Json(json!([{"channel": "/meta/somethingelse"}])),
    ];
    let connect_bad = vec![
        Answer::Raw(200, b"{\"channel\":".to_vec()),
        Answer::Raw(500, b"oops".to_vec()),
        Answer::Json(json!([{"channel": "/meta/connect"}])),
        Answer::Json(json!([{"channel": "/meta/connect", "successful": "yes"}])),
        huge,
        Answer::Raw(502, b"<html>bad gateway</html>".to_vec()),
    ];
    let server = start(Fake {
        handshakes: Mutex::new(bad.into()),
        connects: Mutex::new(connect_bad.into()),
        ..Fake::default()
    })
    .await;
    let client = builder(&server.url)
        .max_response_bytes(1 << 20)
        .build()
        .unwrap();
    let mut events = client.events();
    let started = std::time::Instant::now();
    let mut fake = tokio::time::timeout(WAIT, client.subscribe("/fake", Replay::New))
        .await
        .expect("subscribe settles")
        .expect("subscribed after the bad answers");
    let first = tokio::time::timeout(WAIT, fake.next())
        .await
        .expect("a delivery after recovery")
        .unwrap();
    assert_eq!(first.channel, "/fake");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(server.fake.handshake_count.load(Ordering::SeqCst) >= 8);
    assert!(server.fake.connect_count.load(Ordering::SeqCst) >= 7);
    let mut reconnects = 0;
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(50), events.next()).await {
        if matches!(e, Event::Reconnecting { .. }) {
            reconnects += 1;
        }
    }
    // Events were subscribed after the client started, so some may predate them; most do not.
    assert!(reconnects >= 5, "{reconnects}");
    assert!(client.status().connected);
    client.disconnect().await;
}

struct Counting(AtomicU32);

#[async_trait::async_trait]
impl TokenProvider for Counting {
    async fn token(&self) -> Result<Token, AuthError> {
        let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(Token::bearer(format!("t{n}")))
    }
}

#[tokio::test]
async fn http_401_reauthenticates_and_sends_the_bearer_header() {
    let server = start(Fake {
        require_auth: Some("Bearer t2".into()),
        ..Fake::default()
    })
    .await;
    let client = builder(&server.url)
        .token_provider(Counting(AtomicU32::new(0)))
        .build()
        .unwrap();
    let mut events = client.events();
    let seen = wait_event(&mut events, |e| matches!(e, Event::Connected { .. })).await;
    assert!(seen.contains(&Event::Reauthenticated), "{seen:?}");
    let auth = server.fake.auth_seen.lock().unwrap().clone();
    assert_eq!(auth[0], "Bearer t1");
    assert!(auth[1..].iter().all(|a| a == "Bearer t2"), "{auth:?}");
    client.disconnect().await;
}

#[tokio::test]
async fn websocket_offer_that_fails_falls_back_to_long_polling() {
    let server = start(Fake {
        offer_websocket: true,
        ..Fake::default()
    })
    .await;
    let client = builder(&server.url)
        .transport(TransportKind::Auto)
        .build()
        .unwrap();
    let mut events = client.events();
    let seen = wait_event(&mut events, |e| matches!(e, Event::Connected { .. })).await;
    assert!(
        seen.contains(&Event::TransportChanged {
            transport: "long-polling".into()
        }),
        "{seen:?}"
    );
    assert_eq!(client.status().transport, "long-polling");
    let mut fake = client.subscribe("/fake", Replay::New).await.unwrap();
    assert!(
        tokio::time::timeout(WAIT, fake.next())
            .await
            .unwrap()
            .is_some()
    );
    client.disconnect().await;
}

#[tokio::test]
async fn server_sent_disconnect_rehandshakes() {
    let server = start(Fake {
        connects: Mutex::new(
            vec![
                Answer::Json(json!([{"channel": "/meta/connect", "successful": true}])),
                Answer::Json(json!([{"channel": "/meta/disconnect", "clientId": "fake1"}])),
            ]
            .into(),
        ),
        ..Fake::default()
    })
    .await;
    let client = builder(&server.url).build().unwrap();
    let mut events = client.events();
    let seen = wait_event(&mut events, |e| {
        matches!(
            e,
            Event::Connected {
                rehandshake: true,
                ..
            }
        )
    })
    .await;
    assert!(seen.contains(&Event::ServerDisconnected), "{seen:?}");
    assert_eq!(server.fake.handshake_count.load(Ordering::SeqCst), 2);
    client.disconnect().await;
}

#[tokio::test]
async fn unreachable_server_backs_off_and_gives_up_when_told_to() {
    // Bind and drop a listener: nothing answers on that port.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let client = builder(&format!("http://127.0.0.1:{port}/cometd"))
        .give_up_after(4)
        .build()
        .unwrap();
    let mut events = client.events();
    let seen = wait_event(&mut events, |e| matches!(e, Event::GaveUp { .. })).await;
    let delays: Vec<Duration> = seen
        .iter()
        .filter_map(|e| match e {
            Event::Reconnecting { delay, .. } => Some(*delay),
            _ => None,
        })
        .collect();
    assert!(delays.len() >= 3, "{seen:?}");
    assert!(client.status().closed);
    assert!(matches!(
        client.subscribe("/x", Replay::New).await,
        Err(bayeux_client::Error::Closed)
    ));
}
