//! A custom security policy plugged into a real server: what it refuses is refused with the
//! policy's error and advice; what the broker itself refuses no policy can open.

use std::sync::Arc;

use bayeux_protocol::{Advice, ErrorKind, Message, Reconnect};
use bayeux_server::Server;
use bayeux_server::broker::Session;
use bayeux_server::policy::{Denial, Operation, RequestInfo, SecurityPolicy};
use bayeux_test_support::{TestServer, test_config};
use serde_json::{Value, json};

/// Handshakes need `X-Api-Key: good`; `/secret/**` needs the session to be an admin; nobody may
/// publish to `/readonly/**`; everything else is allowed (even what the broker refuses).
struct KeyPolicy;

impl SecurityPolicy for KeyPolicy {
    #[allow(clippy::result_large_err)]
    fn authorize(
        &self,
        request: &RequestInfo<'_>,
        session: Option<&Session>,
        operation: Operation<'_>,
        message: &Message,
    ) -> Result<(), Denial> {
        match operation {
            Operation::Handshake => {
                let key = request
                    .headers
                    .get("x-api-key")
                    .and_then(|v| v.to_str().ok());
                match key {
                    Some("good") | Some("admin") => {
                        let admin = key == Some("admin");
                        session
                            .unwrap()
                            .attributes
                            .lock()
                            .insert("admin".into(), Value::Bool(admin));
                        Ok(())
                    }
                    _ => Err(Denial {
                        error: ErrorKind::HandshakeDenied,
                        advice: None,
                        ext: Some(json!({"reason": "missing api key"})),
                    }),
                }
            }
            Operation::Subscribe(channel) if channel.as_str().starts_with("/secret/") => {
                let admin = session
                    .and_then(|s| s.attributes.lock().get("admin").cloned())
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false);
                if admin {
                    Ok(())
                } else {
                    Err(Denial::new(ErrorKind::SubscribeDenied(
                        "denied_by_security_policy".into(),
                    )))
                }
            }
            Operation::Publish(channel) if channel.as_str().starts_with("/readonly/") => {
                Err(Denial {
                    error: ErrorKind::PublishDenied("read_only".into()),
                    advice: Some(Advice {
                        reconnect: Some(Reconnect::Retry),
                        ..Advice::default()
                    }),
                    ext: None,
                })
            }
            _ => {
                let _ = message;
                Ok(())
            }
        }
    }
}

async fn server() -> TestServer {
    TestServer::start_with(Server::builder(test_config()).policy(Arc::new(KeyPolicy))).await
}

async fn post(server: &TestServer, key: &str, body: Value) -> Vec<Value> {
    reqwest::Client::new()
        .post(&server.url)
        .header("x-api-key", key)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn handshake(server: &TestServer, key: &str) -> Value {
    post(
        server,
        key,
        json!([{"channel":"/meta/handshake","version":"1.0","id":"h"}]),
    )
    .await[0]
        .clone()
}

#[tokio::test]
async fn handshake_denied_by_the_policy() {
    let server = server().await;
    let reply = handshake(&server, "bad").await;
    assert_eq!(reply["successful"], false);
    assert_eq!(reply["error"], "403::handshake_denied");
    assert_eq!(reply["advice"], json!({"reconnect":"none","interval":0}));
    assert_eq!(reply["ext"]["reason"], "missing api key");
    assert!(reply.get("clientId").is_none());
    assert_eq!(
        server.broker.session_count(),
        0,
        "a denied handshake leaves no session"
    );
}

#[tokio::test]
async fn subscribe_and_publish_denied_by_the_policy() {
    let server = server().await;
    let user = handshake(&server, "good").await["clientId"].clone();
    let admin = handshake(&server, "admin").await["clientId"].clone();
    let sub = |id: &Value| json!([{"channel":"/meta/subscribe","clientId":id,"subscription":"/secret/plans","id":"s"}]);
    let reply = &post(&server, "good", sub(&user)).await[0];
    assert_eq!(
        reply["error"],
        "403:denied_by_security_policy:subscribe_denied"
    );
    let reply = &post(&server, "admin", sub(&admin)).await[0];
    assert_eq!(reply["successful"], true);
    let reply = &post(
        &server,
        "good",
        json!([{"channel":"/readonly/news","clientId":user,"data":1,"id":"p"}]),
    )
    .await[0];
    assert_eq!(reply["error"], "403:read_only:publish_denied");
    assert_eq!(reply["advice"]["reconnect"], "retry");
}

#[tokio::test]
async fn no_policy_can_open_what_the_broker_refuses() {
    let server = server().await;
    let id = handshake(&server, "good").await["clientId"].clone();
    let replies = post(
        &server,
        "good",
        json!([
            {"channel":"/meta/subscribe","clientId":id,"subscription":"/meta/connect","id":"1"},
            {"channel":"/meta/foo","clientId":id,"data":1,"id":"2"},
            {"channel":"/a/*","clientId":id,"data":1,"id":"3"},
        ]),
    )
    .await;
    assert_eq!(replies[0]["error"], "403::subscribe_failed");
    assert_eq!(replies[1]["error"], "403::meta_channel_denied");
    assert_eq!(replies[2]["error"], "405::channel_invalid");
}
