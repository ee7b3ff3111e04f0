//! Broker micro-benchmarks: finding subscribers among a million subscriptions, and fanning one
//! message out to 100,000 subscribers (one shared buffer, a handle per queue).
// criterion_group! generates an undocumented function.
#![allow(missing_docs)]

use std::sync::Arc;

use axum::http::HeaderMap;
use bayeux_engine::Stored;
use bayeux_engine::memory::MemoryEngine;
use bayeux_protocol::{Dialect, decode_batch};
use bayeux_server::Broker;
use bayeux_server::config::ServerConfig;
use bayeux_server::policy::{AllowAll, RequestInfo};
use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;

fn broker(rt: &tokio::runtime::Runtime, max_queue: usize) -> Arc<Broker> {
    let mut config = ServerConfig::default();
    config.limits.max_sessions = 10_000_000;
    config.limits.max_subscriptions_per_session = 1_000_000;
    config.limits.max_queue = max_queue;
    rt.block_on(async {
        Broker::new(
            config,
            Arc::new(MemoryEngine::default()),
            Arc::new(AllowAll),
            Dialect::Cometd,
        )
    })
}

/// Handshakes `clients` sessions, each subscribed to `channels(i)`.
fn populate(
    rt: &tokio::runtime::Runtime,
    b: &Arc<Broker>,
    clients: usize,
    channels: impl Fn(usize) -> Vec<String>,
) {
    let headers = HeaderMap::new();
    let info = RequestInfo {
        headers: &headers,
        remote: None,
        connection_type: "long-polling",
    };
    rt.block_on(async {
        for i in 0..clients {
            let hs = decode_batch(br#"[{"channel":"/meta/handshake"}]"#).unwrap();
            let id = b.process(&info, hs).await.replies[0]
                .client_id
                .clone()
                .unwrap();
            let sub =
                json!([{"channel":"/meta/subscribe","clientId":id,"subscription":channels(i)}]);
            let r = b
                .process(&info, decode_batch(sub.to_string().as_bytes()).unwrap())
                .await;
            assert_eq!(r.replies[0].successful, Some(true));
        }
    });
}

fn matching(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let b = broker(&rt, 10);
    // 1,000 clients × 1,000 subscriptions = 1,000,000: mostly concrete channels spread over
    // 100 rooms, plus `*` and `**` patterns.
    populate(&rt, &b, 1_000, |i| {
        let mut subs: Vec<String> = (0..998)
            .map(|j| format!("/org/{}/room/{}", (i + j) % 100, (i * 7 + j) % 10_000))
            .collect();
        subs.push(format!("/org/{}/room/*", i % 100));
        subs.push(format!("/org/{}/**", i % 100));
        subs
    });
    let mut group = c.benchmark_group("matching_1M_subscriptions");
    group.bench_function("concrete+wildcards", |bench| {
        let mut n = 0usize;
        bench.iter(|| {
            n += 1;
            b.bench_matching(&format!("/org/{}/room/{}", n % 100, n % 10_000))
        })
    });
    group.bench_function("no_subscriber", |bench| {
        bench.iter(|| b.bench_matching("/nobody/listens/here"))
    });
    group.finish();
}

fn fan_out(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let b = broker(&rt, 1_000);
    populate(&rt, &b, 100_000, |_| vec!["/news".to_owned()]);
    let sessions: Vec<_> = b
        .session_ids()
        .iter()
        .filter_map(|id| b.session(id))
        .collect();
    let payload = Bytes::from(r#"{"channel":"/news","data":{"headline":"hello"}}"#);
    let mut id = 0u64;
    let mut group = c.benchmark_group("fan_out");
    group.sample_size(20);
    group.bench_function("one_message_to_100k_subscribers", |bench| {
        // Queues are emptied between runs (not timed), as connects would.
        bench.iter_batched(
            || {
                for s in &sessions {
                    b.take_deliveries(s);
                }
                id += 1;
                Stored {
                    channel: Arc::from("/news"),
                    replay_id: id,
                    timestamp_ms: 0,
                    payload: payload.clone(),
                }
            },
            |stored| b.bench_fan_out(&stored),
            criterion::BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(3));
    targets = matching, fan_out
}
criterion_main!(benches);
