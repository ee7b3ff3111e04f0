//! Several nodes sharing one engine: any node serves any client. The engine here is the memory
//! engine marked shared, so two in-process servers behave like two nodes on one Redis (the Redis
//! engine has its own tests); requests alternate between nodes as behind a round-robin balancer.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bayeux_engine::memory::MemoryEngine;
use bayeux_engine::{
    Bounds, CommitOutcome, CursorCommit, Engine, EngineError, FeedReceiver, ReplayId, Retention,
    SessionRecord, Stored, TrimStats,
};
use bayeux_server::Server;
use bayeux_test_support::{LpClient, TestServer, test_config};
use bytes::Bytes;
use serde_json::{Value, json};

/// The memory engine, shared by several brokers in one process.
struct Shared(MemoryEngine);

#[async_trait]
impl Engine for Shared {
    fn name(&self) -> &'static str {
        "shared-memory"
    }
    fn shared(&self) -> bool {
        true
    }
    async fn append(&self, channel: &str, payload: Bytes) -> Result<Stored, EngineError> {
        self.0.append(channel, payload).await
    }
    async fn read(
        &self,
        channel: &str,
        after: ReplayId,
        limit: usize,
    ) -> Result<Vec<Stored>, EngineError> {
        self.0.read(channel, after, limit).await
    }
    async fn bounds(&self, channel: &str) -> Result<Bounds, EngineError> {
        self.0.bounds(channel).await
    }
    async fn channels(&self) -> Result<Vec<String>, EngineError> {
        self.0.channels().await
    }
    fn feed(&self) -> FeedReceiver {
        self.0.feed()
    }
    async fn trim(&self, retention: &Retention, now: SystemTime) -> Result<TrimStats, EngineError> {
        self.0.trim(retention, now).await
    }
    async fn save_session(&self, r: &SessionRecord, ttl: Duration) -> Result<(), EngineError> {
        self.0.save_session(r, ttl).await
    }
    async fn load_session(&self, id: &str) -> Result<Option<SessionRecord>, EngineError> {
        self.0.load_session(id).await
    }
    async fn touch_session(&self, id: &str, ttl: Duration) -> Result<(), EngineError> {
        self.0.touch_session(id, ttl).await
    }
    async fn remove_session(&self, id: &str) -> Result<(), EngineError> {
        self.0.remove_session(id).await
    }
    async fn claim_session(
        &self,
        id: &str,
        node: &str,
        epoch: u64,
        ttl: Duration,
    ) -> Result<Option<SessionRecord>, EngineError> {
        self.0.claim_session(id, node, epoch, ttl).await
    }
    async fn commit_cursors(
        &self,
        node: &str,
        commits: &[CursorCommit],
        ttl: Duration,
    ) -> Result<CommitOutcome, EngineError> {
        self.0.commit_cursors(node, commits, ttl).await
    }
}

async fn nodes(n: usize) -> (Vec<TestServer>, Arc<dyn Engine>) {
    let engine: Arc<dyn Engine> = Arc::new(Shared(MemoryEngine::default()));
    let mut out = Vec::new();
    for _ in 0..n {
        let mut config = test_config();
        config.timeouts.connect_timeout_ms = 500;
        out.push(TestServer::start_with(Server::builder(config).engine(engine.clone())).await);
    }
    (out, engine)
}

/// A client whose every request goes to the next node in turn.
struct RoundRobin {
    clients: Vec<LpClient>,
    next: usize,
}

impl RoundRobin {
    fn new(nodes: &[TestServer]) -> Self {
        RoundRobin {
            clients: nodes.iter().map(|n| n.client()).collect(),
            next: 0,
        }
    }

    async fn send(&mut self, body: Value) -> Vec<Value> {
        let c = &self.clients[self.next % self.clients.len()];
        self.next += 1;
        c.send(body).await
    }
}

fn data(replies: &[Value], channel: &str) -> Vec<i64> {
    replies
        .iter()
        .filter(|m| m["channel"] == channel)
        .map(|m| m["data"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn a_client_alternating_between_nodes_gets_everything_once_in_order() {
    let (nodes, _engine) = nodes(2).await;
    let mut rr = RoundRobin::new(&nodes);
    let hs = rr
        .send(json!([{"channel":"/meta/handshake","version":"1.0"}]))
        .await;
    let id = hs[0]["clientId"].as_str().unwrap().to_owned();
    let sub = rr
        .send(json!([{"channel":"/meta/subscribe","clientId":id,"subscription":"/rr"}]))
        .await;
    assert_eq!(sub[0]["successful"], true, "{sub:?}");
    let connect =
        json!([{"channel":"/meta/connect","clientId":id,"connectionType":"long-polling"}]);
    // Publishers on both nodes, interleaved with the subscriber's connects on both nodes.
    let mut got = Vec::new();
    let mut published = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while got.len() < 60 && tokio::time::Instant::now() < deadline {
        for _ in 0..3 {
            if published < 60 {
                let node = &nodes[published as usize % 2];
                let ack = node.client().publish("/rr", json!(published)).await;
                assert_eq!(ack["successful"], true);
                published += 1;
            }
        }
        let replies = rr.send(connect.clone()).await;
        let reply = replies
            .iter()
            .find(|m| m["channel"] == "/meta/connect")
            .unwrap();
        assert_eq!(reply["successful"], true, "{reply}");
        got.extend(data(&replies, "/rr"));
    }
    assert_eq!(got, (0..60).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_node_that_dies_loses_its_clients_nothing() {
    let (mut nodes, _engine) = nodes(2).await;
    let a = nodes.remove(0);
    let b = nodes.remove(0);
    let mut client = a.client();
    client.handshake().await;
    client.subscribe(json!("/die")).await;
    client.connect().await;
    for i in 0..5 {
        b.client().publish("/die", json!(i)).await;
    }
    // Node A delivers the first five, then dies while the next ones are published.
    let mut got = Vec::new();
    while got.len() < 5 {
        got.extend(data(&client.connect().await, "/die"));
    }
    a.stop().await;
    for i in 5..10 {
        b.client().publish("/die", json!(i)).await;
    }
    // The client's next request lands on B, which adopts the session.
    let mut moved = b.client();
    moved.client_id = client.client_id.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.len() < 10 && tokio::time::Instant::now() < deadline {
        let replies = moved.connect().await;
        let reply = replies
            .iter()
            .find(|m| m["channel"] == "/meta/connect")
            .unwrap();
        assert_eq!(reply["successful"], true, "{reply}");
        got.extend(data(&replies, "/die"));
    }
    assert_eq!(got, (0..10).collect::<Vec<_>>());
}

/// Node B subscribes a session that node A took back from it moments before (B does not know
/// yet): the subscription must reach A's copy, which serves the client's connects.
#[tokio::test]
async fn a_subscribe_on_a_node_whose_copy_was_taken_reaches_the_owner() {
    let (nodes, _engine) = nodes(2).await;
    let on = |n: usize, id: &str| {
        let mut c = nodes[n].client();
        c.client_id = Some(id.to_owned());
        c
    };
    let mut a = nodes[0].client();
    a.handshake().await;
    let id = a.id().to_owned();
    assert_eq!(a.subscribe(json!("/x")).await["successful"], true);
    a.connect_split().await;
    // B takes the session; once A's next commit told it, A takes it back with a connect.
    on(1, &id).connect_split().await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let back = on(0, &id);
    let held = tokio::spawn(async move { back.connect_split().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // B still believes it owns the session.
    assert_eq!(on(1, &id).subscribe(json!("/y")).await["successful"], true);
    held.await.unwrap();
    let ack = nodes[1].client().publish("/y", json!(7)).await;
    assert_eq!(ack["successful"], true);
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while got.is_empty() && tokio::time::Instant::now() < deadline {
        let replies = on(0, &id).connect().await;
        got.extend(data(&replies, "/y"));
    }
    assert_eq!(
        got,
        vec![7],
        "the owner's copy has the subscription made on node B"
    );
}

#[tokio::test]
async fn a_disconnect_on_one_node_ends_the_session_everywhere() {
    let (nodes, _engine) = nodes(2).await;
    let mut c = nodes[0].client();
    c.handshake().await;
    c.subscribe(json!("/x")).await;
    let mut other = nodes[1].client();
    other.client_id = c.client_id.clone();
    let (reply, _) = other.connect_split().await;
    assert_eq!(reply["successful"], true, "adopted by node B");
    let bye = other
        .send(json!([{"channel":"/meta/disconnect","clientId":c.id()}]))
        .await;
    assert_eq!(bye[0]["successful"], true);
    // Node A, whose copy node B took, learns it from its next cursor commit (one a second at
    // least) instead of reading the record on every request; its copy is stale then, and the
    // next request finds the record gone.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let (reply, _) = c.connect_split().await;
    assert_eq!(reply["error"], "402::session_unknown");
    assert_eq!(nodes[0].broker.session_count(), 0);
}

/// A connect with the ack extension: `(reply, delivered data)`.
async fn ack_connect(node: &TestServer, id: &str, ack: u64) -> (Value, Vec<i64>) {
    let replies = node
        .client()
        .send(json!([{"channel":"/meta/connect","clientId":id,
            "connectionType":"long-polling","ext":{"ack":ack}}]))
        .await;
    let reply = replies
        .iter()
        .find(|m| m["channel"] == "/meta/connect")
        .unwrap()
        .clone();
    assert_eq!(reply["successful"], true, "{reply}");
    (reply, data(&replies, "/lost"))
}

/// A session with the ack extension, handshaken on `node` and subscribed to `/lost`.
async fn ack_client_on_lost(node: &TestServer) -> String {
    let hs = node
        .client()
        .send(json!([{"channel":"/meta/handshake","version":"1.0","ext":{"ack":true}}]))
        .await;
    assert_eq!(hs[0]["ext"]["ack"], true);
    let id = hs[0]["clientId"].as_str().unwrap().to_owned();
    let sub = node
        .client()
        .send(json!([{"channel":"/meta/subscribe","clientId":id,"subscription":"/lost"}]))
        .await;
    assert_eq!(sub[0]["successful"], true);
    id
}

#[tokio::test]
async fn a_response_lost_with_its_node_is_sent_again_to_an_ack_client() {
    let (nodes, _engine) = nodes(2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let id = ack_client_on_lost(a).await;
    let (first, _) = ack_connect(a, &id, 0).await;
    let batch0 = first["ext"]["ack"].as_u64().unwrap();
    for i in 0..5 {
        b.client().publish("/lost", json!(i)).await;
    }
    // Node A delivers 0..4, confirmed batch by batch, but its last response never reaches the
    // client (the node died on the way): the client still confirms only the batch before it.
    let mut confirmed = batch0;
    let mut before_lost = batch0;
    let mut received = Vec::new();
    let mut lost = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while received.len() + lost.len() < 5 && tokio::time::Instant::now() < deadline {
        let (reply, got) = ack_connect(a, &id, confirmed).await;
        if !got.is_empty() {
            received.append(&mut lost);
            lost = got;
            before_lost = confirmed;
            confirmed = reply["ext"]["ack"].as_u64().unwrap();
        }
    }
    assert!(!lost.is_empty());
    let batch = confirmed;
    // The client's next connect lands on node B and confirms only `before_lost`: B sends the
    // lost messages again, then new ones, each once.
    let (reply, again) = ack_connect(b, &id, before_lost).await;
    assert_eq!(again, lost, "the lost response, again");
    received.extend(again);
    assert_eq!(received, (0..5).collect::<Vec<_>>());
    let next = reply["ext"]["ack"].as_u64().unwrap();
    assert!(next > batch, "batch numbers go on after the client's");
    for i in 5..8 {
        a.client().publish("/lost", json!(i)).await;
    }
    let mut got = Vec::new();
    let mut confirmed = next;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while got.len() < 3 && tokio::time::Instant::now() < deadline {
        let (reply, more) = ack_connect(b, &id, confirmed).await;
        got.extend(more);
        confirmed = reply["ext"]["ack"].as_u64().unwrap();
    }
    assert_eq!(got, vec![5, 6, 7]);
}

#[tokio::test]
async fn an_ack_client_that_got_its_response_gets_nothing_twice_on_another_node() {
    let (nodes, _engine) = nodes(2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let id = ack_client_on_lost(a).await;
    let (first, _) = ack_connect(a, &id, 0).await;
    let mut confirmed = first["ext"]["ack"].as_u64().unwrap();
    for i in 0..5 {
        b.client().publish("/lost", json!(i)).await;
    }
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while got.len() < 5 && tokio::time::Instant::now() < deadline {
        let (reply, more) = ack_connect(a, &id, confirmed).await;
        got.extend(more);
        confirmed = reply["ext"]["ack"].as_u64().unwrap();
    }
    // The client confirms the batch it got, on node B: nothing again.
    b.client().publish("/lost", json!(5)).await;
    let (_, more) = ack_connect(b, &id, confirmed).await;
    got.extend(more);
    assert_eq!(got, (0..6).collect::<Vec<_>>());
}
