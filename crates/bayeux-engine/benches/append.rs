//! Append throughput (memory vs disk, 1, 8 and 64 appends in flight) and replay read speed.
//!
//! `cargo bench -p bayeux-engine --bench append`. Each append is one element: criterion's time
//! per element at N in flight is 1 / throughput, and the mean latency of one append is about N
//! times that (Little's law).
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bayeux_engine::disk::DiskEngine;
use bayeux_engine::memory::MemoryEngine;
use bayeux_engine::{Engine, Retention};
use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const CHANNELS: usize = 8;

fn retention() -> Retention {
    Retention {
        max_age: Duration::from_secs(3600),
        max_messages: 1_000_000,
        max_bytes: u64::MAX,
    }
}

fn payload() -> Bytes {
    // About the size of a small platform event.
    Bytes::from(format!(
        r#"{{"channel":"/bench","data":{{"id":"{}","text":"{}"}}}}"#,
        "x".repeat(18),
        "y".repeat(120)
    ))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// `iters` appends spread over `in_flight` tasks, each appending in sequence.
async fn appends(engine: &Arc<dyn Engine>, iters: u64, in_flight: u64) -> Duration {
    let payload = payload();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..in_flight {
        let n = iters / in_flight + u64::from(t < iters % in_flight);
        let engine = engine.clone();
        let payload = payload.clone();
        let channel = format!("/bench/{}", t as usize % CHANNELS);
        tasks.push(tokio::spawn(async move {
            for _ in 0..n {
                engine.append(&channel, payload.clone()).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed()
}

fn engines(dir: &std::path::Path) -> Vec<(&'static str, Arc<dyn Engine>)> {
    vec![
        (
            "memory",
            Arc::new(MemoryEngine::new(retention())) as Arc<dyn Engine>,
        ),
        (
            "disk",
            Arc::new(DiskEngine::open(dir, retention()).unwrap()) as Arc<dyn Engine>,
        ),
    ]
}

fn append(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let engines = engines(dir.path());
    let mut group = c.benchmark_group("append");
    group.throughput(Throughput::Elements(1));
    for (name, engine) in &engines {
        for in_flight in [1u64, 8, 64] {
            group.bench_with_input(BenchmarkId::new(*name, in_flight), &in_flight, |b, &n| {
                b.iter_custom(|iters| rt.block_on(appends(engine, iters, n)));
            });
        }
    }
    group.finish();
    drop(engines);
}

fn replay_read(c: &mut Criterion) {
    const RETAINED: u64 = 10_000;
    const PAGE: usize = 1_000;
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let engines = engines(dir.path());
    for (_, engine) in &engines {
        rt.block_on(async {
            let mut tasks = Vec::new();
            for _ in 0..64 {
                let engine = engine.clone();
                tasks.push(tokio::spawn(async move {
                    for _ in 0..RETAINED / 64 {
                        engine.append("/replay", payload()).await.unwrap();
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        });
    }
    let mut group = c.benchmark_group("replay_read");
    group.throughput(Throughput::Elements(PAGE as u64));
    for (name, engine) in &engines {
        group.bench_function(BenchmarkId::new(*name, PAGE), |b| {
            let mut after = 0;
            b.iter(|| {
                let page = rt.block_on(engine.read("/replay", after, PAGE)).unwrap();
                assert_eq!(page.len(), PAGE);
                // Walk the log page by page, as a replaying subscriber would.
                after = (page[0].replay_id + PAGE as u64) % (RETAINED - 2 * PAGE as u64);
                page
            });
        });
    }
    group.finish();
    drop(engines);
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = append, replay_read
}
criterion_main!(benches);
