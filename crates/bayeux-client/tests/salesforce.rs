//! The client against the Salesforce emulator (the bayeux server with a `[salesforce]` section,
//! on port 0): the four OAuth flows, the Bearer header, platform events with
//! `data.event.replayId`, and every fault the emulator injects (revoked tokens, swept sessions,
//! server-sent disconnects, 503s, silent stalls). Each ends with the client subscribed again
//! and nothing lost or repeated.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bayeux_client::auth::{AuthError, Flow, SalesforceAuth, TokenProvider};
use bayeux_client::ext::replay::replay_id_of;
use bayeux_client::{
    BackoffPolicy, Client, ClientBuilder, Event, Events, Message, Replay, Subscription,
    TransportKind,
};
use bayeux_server::config::ServerConfig;
use bayeux_server::salesforce::SalesforceConfig;
use bayeux_server::salesforce::config::App;
use bayeux_test_support::{TestServer, test_config};
use futures::StreamExt;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);
const CHANNEL: &str = "/event/Demo__e";
const USER: &str = "demo@example.com";

fn org_config() -> ServerConfig {
    let mut sf = SalesforceConfig::demo();
    sf.connect_timeout_secs = 2;
    sf.reconnect_deadline_secs = 10;
    sf.apps.push(App {
        client_id: "jwt-app".into(),
        client_secret: "unused".into(),
        run_as: Some(USER.into()),
        jwt_public_key_file: None,
        jwt_public_key: Some(include_str!("fixtures/test-jwt-key.pub.pem").into()),
    });
    let mut c = test_config();
    c.timeouts.sweep_interval_ms = 100;
    c.salesforce = Some(sf);
    c
}

struct Org {
    server: TestServer,
    http: reqwest::Client,
}

impl Org {
    async fn start() -> Org {
        Org {
            server: TestServer::start(org_config()).await,
            http: reqwest::Client::builder().timeout(WAIT).build().unwrap(),
        }
    }

    fn endpoint(&self) -> String {
        format!("{}/59.0", self.server.url)
    }

    fn password_flow(&self) -> SalesforceAuth {
        SalesforceAuth::new(
            &self.server.base,
            Flow::Password {
                client_id: "demo".into(),
                client_secret: "demo".into(),
                username: USER.into(),
                password: "demo".into(),
            },
        )
    }

    fn client(&self) -> ClientBuilder {
        Client::builder(self.endpoint())
            .token_provider(self.password_flow())
            .backoff(BackoffPolicy {
                initial: Duration::from_millis(20),
                max: Duration::from_millis(300),
                jitter: true,
            })
            .network_allowance(Duration::from_millis(700))
            .request_timeout(Duration::from_secs(5))
            .operation_timeout(Duration::from_secs(15))
    }

    /// Publishes a platform event through REST with a fresh token.
    async fn publish(&self, n: i64) {
        let token = self.password_flow().token().await.expect("token");
        let r = self
            .http
            .post(format!(
                "{}/services/data/v59.0/sobjects/Demo__e/",
                self.server.base
            ))
            .header("authorization", token.authorization())
            .json(&json!({ "N__c": n }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201, "{}", r.text().await.unwrap());
    }

    async fn publish_range(&self, range: std::ops::Range<i64>) {
        for n in range {
            self.publish(n).await;
        }
    }

    async fn fault(&self, path: &str) {
        let r = self
            .http
            .post(format!("{}/_emulator/{path}", self.server.base))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }
}

fn n_of(m: &Message) -> i64 {
    m.data
        .as_ref()
        .and_then(|d| d["payload"]["N__c"].as_i64())
        .expect("payload.N__c")
}

async fn take(sub: &mut Subscription, n: usize) -> Vec<Message> {
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(WAIT, sub.next()).await {
            Ok(Some(m)) => out.push(m),
            other => panic!("{} of {n} arrived, then {other:?}", out.len()),
        }
    }
    out
}

async fn nothing_more(sub: &mut Subscription) {
    if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
        panic!("unexpected extra message {m:?}");
    }
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

/// Subscribes, receives events 0..3, injects `fault`, publishes 3..6 and checks they arrive
/// exactly once after the client recovers, with `expect` among the events seen meanwhile.
async fn survives(fault: &str, expect: impl Fn(&[Event]) -> bool) {
    let org = Org::start().await;
    let client = org.client().build().unwrap();
    let mut events = client.events();
    let mut sub = client.subscribe(CHANNEL, Replay::All).await.unwrap();
    assert!(client.wait_connected(WAIT).await);
    assert_eq!(
        client.status().transport,
        "long-polling",
        "Salesforce is long-polling only"
    );
    org.publish_range(0..3).await;
    let first = take(&mut sub, 3).await;
    assert_eq!(first.iter().map(n_of).collect::<Vec<_>>(), vec![0, 1, 2]);
    let last_id = replay_id_of(&first[2]).expect("data.event.replayId");

    org.fault(fault).await;
    org.publish_range(3..6).await;
    let rest = take(&mut sub, 3).await;
    assert_eq!(rest.iter().map(n_of).collect::<Vec<_>>(), vec![3, 4, 5]);
    nothing_more(&mut sub).await;
    // Collect what was reported up to now.
    let mut seen = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(100), events.next()).await {
        seen.push(e);
    }
    assert!(
        expect(&seen),
        "{fault}: {seen:?} (last replay id {last_id})"
    );
    client.disconnect().await;
}

fn resumed(seen: &[Event]) -> bool {
    seen.iter()
        .any(|e| matches!(e, Event::Resumed { channel, from } if channel == CHANNEL && *from >= 0))
}

#[tokio::test]
async fn platform_events_arrive_with_their_replay_ids() {
    let org = Org::start().await;
    let client = org.client().transport(TransportKind::Auto).build().unwrap();
    let mut sub = client.subscribe(CHANNEL, Replay::New).await.unwrap();
    org.publish_range(0..5).await;
    let got = take(&mut sub, 5).await;
    let ids: Vec<i64> = got.iter().filter_map(replay_id_of).collect();
    assert_eq!(ids.len(), 5);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert_eq!(
        got.iter().map(n_of).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );
    // Salesforce does not let streaming clients publish.
    assert!(client.publish(CHANNEL, json!({})).await.is_err());
    client.disconnect().await;
}

#[tokio::test]
async fn revoked_tokens_reauthenticate_and_resume() {
    survives("revoke", |seen| {
        seen.contains(&Event::Reauthenticated) && resumed(seen)
    })
    .await;
}

#[tokio::test]
async fn expired_sessions_rehandshake_and_resume() {
    survives("expire-sessions", |seen| {
        resumed(seen)
            && seen.iter().any(|e| {
                matches!(e, Event::Reconnecting { handshake: true, reason, .. } if reason.contains("403::Unknown client"))
            })
    })
    .await;
}

#[tokio::test]
async fn server_sent_disconnect_rehandshakes_and_resumes() {
    // The notice arrives in the held connect's response, whose own reply says `handshake`.
    survives("disconnect", |seen| {
        seen.contains(&Event::ServerDisconnected) && resumed(seen)
    })
    .await;
}

#[tokio::test]
async fn busy_server_is_retried() {
    survives("busy?count=2", |seen| {
        seen.iter().any(|e| {
            matches!(e, Event::Reconnecting { reason, .. } if reason.contains("503::Server is too busy"))
        })
    })
    .await;
}

#[tokio::test]
async fn silent_stall_is_caught_by_the_watchdog() {
    survives("stall?seconds=2", |seen| {
        seen.iter().any(|e| matches!(e, Event::Stalled { .. }))
    })
    .await;
}

async fn token_from(org: &Org, flow: Flow) -> Result<bayeux_client::auth::Token, AuthError> {
    SalesforceAuth::new(&org.server.base, flow).token().await
}

#[tokio::test]
async fn every_oauth_flow_gets_a_token_the_streaming_endpoint_accepts() {
    let org = Org::start().await;
    let key =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/test-jwt-key.pem");
    let flows = vec![
        Flow::Password {
            client_id: "demo".into(),
            client_secret: "demo".into(),
            username: USER.into(),
            password: "demo".into(),
        },
        Flow::RefreshToken {
            client_id: "demo".into(),
            client_secret: "demo".into(),
            refresh_token: "demo-refresh-token".into(),
        },
        Flow::ClientCredentials {
            client_id: "demo".into(),
            client_secret: "demo".into(),
        },
        Flow::JwtBearer {
            client_id: "jwt-app".into(),
            username: USER.into(),
            key_file: key,
            audience: Some("https://login.salesforce.com".into()),
        },
    ];
    for flow in flows {
        let name = format!("{flow:?}");
        let token = token_from(&org, flow.clone())
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(token.token_type, "Bearer", "{name}");
        assert_eq!(
            token.instance_url.as_deref(),
            Some(org.server.base.as_str()),
            "{name}"
        );
        assert!(
            token.id.as_deref().is_some_and(|id| id.contains("/id/")),
            "{name}"
        );
        let client = org
            .client()
            .token_provider(SalesforceAuth::new(&org.server.base, flow))
            .build()
            .unwrap();
        assert!(client.wait_connected(WAIT).await, "{name}");
        client.disconnect().await;
    }
}

#[tokio::test]
async fn refused_credentials_back_off_and_report() {
    let org = Org::start().await;
    let bad = Flow::Password {
        client_id: "demo".into(),
        client_secret: "demo".into(),
        username: USER.into(),
        password: "wrong".into(),
    };
    match token_from(&org, bad.clone()).await {
        Err(AuthError::Rejected {
            status: 400, error, ..
        }) => assert_eq!(error, "invalid_grant"),
        other => panic!("{other:?}"),
    }
    let client = org
        .client()
        .token_provider(SalesforceAuth::new(&org.server.base, bad))
        .give_up_after(3)
        .build()
        .unwrap();
    let mut events = client.events();
    let seen = wait_event(&mut events, |e| matches!(e, Event::GaveUp { .. })).await;
    let delays: Vec<Duration> = seen
        .iter()
        .filter_map(|e| match e {
            Event::AuthFailed {
                retry_in, error, ..
            } => {
                assert!(error.contains("invalid_grant"), "{error}");
                Some(*retry_in)
            }
            _ => None,
        })
        .collect();
    assert!(delays.len() >= 2, "{seen:?}");
    assert!(client.status().closed);
}

/// A provider that counts calls, wrapping the password flow.
struct Counted {
    inner: SalesforceAuth,
    calls: Arc<AtomicI64>,
}

#[async_trait::async_trait]
impl TokenProvider for Counted {
    async fn token(&self) -> Result<bayeux_client::auth::Token, AuthError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.token().await
    }
}

#[tokio::test]
async fn missing_or_dead_tokens_never_hammer_the_token_endpoint() {
    let org = Org::start().await;
    let calls = Arc::new(AtomicI64::new(0));
    let client = org
        .client()
        .token_provider(Counted {
            inner: org.password_flow(),
            calls: calls.clone(),
        })
        .build()
        .unwrap();
    let mut events = client.events();
    assert!(client.wait_connected(WAIT).await);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    org.fault("revoke").await;
    wait_event(&mut events, |e| *e == Event::Reauthenticated).await;
    wait_event(&mut events, |e| matches!(e, Event::Connected { .. })).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "one re-authentication per revocation"
    );
    client.disconnect().await;
}
