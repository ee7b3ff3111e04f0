//! `bayeux bench` against our real server, started in-process on port 0: a correct server
//! loses and repeats nothing, so the bench must report exactly that.

use bayeux_bench::{BenchArgs, Report, run};
use bayeux_test_support::TestServer;

fn args(url: &str, extra: &[&str]) -> BenchArgs {
    let mut flags = vec![
        "bench",
        "--url",
        url,
        "--subscribers",
        "5",
        "--channels",
        "2",
        "--publishers",
        "2",
        "--rate",
        "200",
        "--in-flight",
        "2",
        "--payload",
        "100",
        "--warmup",
        "0.5",
        "--duration",
        "2",
        "--grace",
        "1",
        "--request-timeout",
        "5",
        "--no-progress",
    ];
    flags.extend_from_slice(extra);
    BenchArgs::from_flags(flags).expect("flags parse")
}

/// 5 subscribers on 2 channels: 3 on /bench/0, 2 on /bench/1; seq alternates channels.
fn assert_clean(r: &Report) {
    let line = serde_json::to_string(r).unwrap();
    assert_eq!(r.subscribers_ready, 5, "{line}");
    assert_eq!(r.publishers_ready, 2, "{line}");
    assert!(r.aborted.is_none(), "{line}");
    assert!(r.errors.is_empty(), "errors: {line}");
    assert!(r.published > 50, "too few publishes: {line}");
    assert_eq!(r.acked, r.published, "{line}");
    let lo = r.acked * 5 / 2 - 3;
    let hi = r.acked * 5 / 2 + 3;
    assert!((lo..=hi).contains(&r.expected), "expected: {line}");
    assert_eq!(r.lost, 0, "{line}");
    assert_eq!(r.duplicated, 0, "{line}");
    assert_eq!(r.delivered_unacked, 0, "{line}");
    assert_eq!(r.delivered, r.expected, "{line}");
    assert_eq!(r.latency_ms.count, r.delivered, "{line}");
    assert!(r.latency_ms.p50 > 0.0, "{line}");
    assert!(r.latency_ms.p50 <= r.latency_ms.p99, "{line}");
    assert!(r.latency_ms.p99 <= r.latency_ms.max, "{line}");
    assert!(r.deliveries_per_sec > 0.0, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polling_against_our_server_loses_nothing() {
    let server = TestServer::default_config().await;
    let pid = std::process::id().to_string();
    let r = run(args(
        &server.url,
        &["--transport", "long-polling", "--server-pid", &pid],
    ))
    .await
    .expect("bench runs");
    assert_clean(&r);
    // The "server" is this test process.
    let usage = r.server.as_ref().expect("server usage");
    assert_eq!(usage.pid, std::process::id());
    assert!(usage.rss_mb > 0.0 && usage.rss_peak_mb >= usage.rss_mb);
    assert!(usage.cpu_percent >= 0.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_against_our_server_loses_nothing() {
    let server = TestServer::default_config().await;
    let r = run(args(&server.url, &["--transport", "websocket"]))
        .await
        .expect("bench runs");
    assert_clean(&r);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_fast_as_possible_from_several_source_addresses() {
    let server = TestServer::default_config().await;
    let r = run(args(
        &server.url,
        &[
            "--rate",
            "0",
            "--duration",
            "1.5",
            "--source-addrs",
            "127.0.0.1,127.0.0.2,127.0.0.3",
        ],
    ))
    .await
    .expect("bench runs");
    assert_clean(&r);
    server.stop().await;
}

#[tokio::test]
async fn unreachable_server_aborts_with_errors() {
    // Bind then drop a listener: nothing listens on that port any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/cometd");
    let r = run(args(&url, &["--connect-timeout", "1"]))
        .await
        .expect("bench runs");
    assert!(r.aborted.is_some());
    assert_eq!(r.errors.get("setup:open:tcp_connect"), Some(&7), "{r:?}");
    assert_eq!(r.published, 0);
}
