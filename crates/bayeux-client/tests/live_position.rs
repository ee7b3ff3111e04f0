//! A `Replay::New` subscription that has seen no event yet loses its session: against the
//! bayeux server it resumes from the position the server named in the subscribe reply
//! (`ext.replay: {channel: last replay ID}`), so the events published during the outage
//! arrive, and the ones before the subscribe do not.

use std::time::Duration;

use bayeux_client::{BackoffPolicy, Client, Event, Replay, TransportKind};
use bayeux_protocol::ChannelName;
use bayeux_server::broker::CloseReason;
use bayeux_test_support::TestServer;
use futures::StreamExt;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(15);

async fn publish(server: &TestServer, range: std::ops::Range<i64>) {
    let channel = ChannelName::new("/quiet").unwrap();
    for n in range {
        server
            .broker
            .publish_from_server(&channel, json!({ "n": n }))
            .await
            .unwrap();
    }
}

async fn outage_before_the_first_event(transport: TransportKind) {
    let server = TestServer::default_config().await;
    // History from before the subscribe: not wanted by a `New` subscription.
    publish(&server, 0..5).await;
    let client = Client::builder(&server.url)
        .transport(transport)
        .backoff(BackoffPolicy {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
            jitter: true,
        })
        .operation_timeout(WAIT)
        .build()
        .unwrap();
    let mut events = client.events();
    let mut sub = client.subscribe("/quiet", Replay::New).await.unwrap();
    assert!(client.wait_connected(WAIT).await);

    let id = client.status().client_id.unwrap();
    let session = server.broker.session(&id).expect("live session");
    server.broker.remove_session(&session, CloseReason::Expired);
    // Published while the client has no session, before it ever saw an event.
    publish(&server, 5..10).await;

    let resumed = tokio::time::timeout(WAIT, async {
        while let Some(e) = events.next().await {
            if let Event::Resumed { from, .. } = e {
                return from;
            }
        }
        panic!("events ended");
    })
    .await
    .expect("resumed");
    assert_eq!(
        resumed, 5,
        "after the last replay ID issued at subscribe time"
    );
    let mut got = Vec::new();
    while got.len() < 5 {
        let m = tokio::time::timeout(WAIT, sub.next())
            .await
            .expect("an event")
            .expect("the stream goes on");
        got.push(m.data.unwrap()["n"].as_i64().unwrap());
    }
    assert_eq!(got, vec![5, 6, 7, 8, 9]);
    if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
        panic!("unexpected {m:?}");
    }
    client.disconnect().await;
}

#[tokio::test]
async fn outage_before_the_first_event_long_polling() {
    outage_before_the_first_event(TransportKind::LongPolling).await;
}

#[tokio::test]
async fn outage_before_the_first_event_websocket() {
    outage_before_the_first_event(TransportKind::WebSocket).await;
}
