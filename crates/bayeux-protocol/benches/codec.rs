//! Codec micro-benchmarks: decoding and encoding batches of typical messages.
// criterion_group! generates an undocumented function.
#![allow(missing_docs)]

use bayeux_protocol::{Message, decode_batch, encode_batch};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;

fn batch(n: usize, payload: usize) -> Vec<u8> {
    let messages: Vec<_> = (0..n)
        .map(|i| {
            json!({
                "channel": "/chat/room",
                "clientId": "3k1pqbm8dn0gnw7qhgo4n6vqz",
                "id": i.to_string(),
                "data": {"seq": i, "t": 1_700_000_000_000u64 + i as u64, "pad": "x".repeat(payload)},
            })
        })
        .collect();
    serde_json::to_vec(&messages).unwrap()
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    for (n, payload) in [(1, 64), (10, 64), (100, 64), (10, 4096)] {
        let bytes = batch(n, payload);
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        let id = format!("{n}x{payload}B");
        group.bench_with_input(BenchmarkId::new("decode", &id), &bytes, |b, bytes| {
            b.iter(|| decode_batch(bytes).unwrap())
        });
        let messages: Vec<Message> = decode_batch(&bytes).unwrap();
        group.bench_with_input(BenchmarkId::new("encode", &id), &messages, |b, m| {
            b.iter(|| encode_batch(m))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = codec
}
criterion_main!(benches);
