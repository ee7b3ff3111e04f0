//! Restart without loss: `bayeux serve` on the disk engine is killed with SIGKILL while a
//! publisher is busy, started again on the same data directory, and every acknowledged message
//! is replayed with the same replay ID, in order.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

struct Served {
    child: Child,
    url: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(data_dir: &std::path::Path) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bayeux"))
        .args(["serve", "--bind", "127.0.0.1:0", "--engine", "disk"])
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--connect-timeout-ms", "1000"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start bayeux serve");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read LISTENING line");
    let url = line
        .strip_prefix("LISTENING ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .trim()
        .to_owned();
    Served { child, url }
}

async fn post(http: &reqwest::Client, url: &str, body: Value) -> Vec<Value> {
    http.post(url)
        .json(&body)
        .send()
        .await
        .expect("request")
        .json::<Vec<Value>>()
        .await
        .expect("json reply")
}

/// Subscribes with `replay` and collects deliveries until at least `n` arrived and a connect
/// came back empty (the log is read to its end), or 10 s passed.
async fn replay(url: &str, replay: i64, n: usize) -> Vec<(u64, u64)> {
    let http = reqwest::Client::new();
    let hs = post(
        &http,
        url,
        json!([{"channel":"/meta/handshake","ext":{"replay":true}}]),
    )
    .await;
    let id = hs[0]["clientId"].as_str().unwrap().to_owned();
    let sub = post(
        &http,
        url,
        json!([{"channel":"/meta/subscribe","clientId":id,"subscription":"/crash","ext":{"replay":{"/crash":replay}}}]),
    )
    .await;
    assert_eq!(sub[0]["successful"], true, "{sub:?}");
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut quiet = false;
    while (got.len() < n || !quiet) && tokio::time::Instant::now() < deadline {
        let replies = post(
            &http,
            url,
            json!([{"channel":"/meta/connect","clientId":id,"connectionType":"long-polling"}]),
        )
        .await;
        quiet = !replies.iter().any(|m| m["channel"] == "/crash");
        for m in replies.iter().filter(|m| m["channel"] == "/crash") {
            got.push((
                m["ext"]["replay"].as_u64().unwrap(),
                m["data"]["n"].as_u64().unwrap(),
            ));
        }
    }
    got
}

#[tokio::test]
async fn acknowledged_messages_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path());
    let http = reqwest::Client::new();

    // A publisher acknowledged N messages before the crash.
    const N: u64 = 200;
    for n in 0..N {
        let ack = post(
            &http,
            &server.url,
            json!([{"channel":"/crash","data":{"n":n}}]),
        )
        .await;
        assert_eq!(ack[0]["successful"], true);
    }
    // Then more publishers race with SIGKILL; whatever they got acknowledged must survive too.
    let url = server.url.clone();
    let racer = tokio::spawn(async move {
        let http = reqwest::Client::new();
        let mut acked = Vec::new();
        for n in N..N + 10_000 {
            let reply = http
                .post(&url)
                .json(&json!([{"channel":"/crash","data":{"n":n}}]))
                .send()
                .await;
            let Ok(reply) = reply else { break };
            let Ok(v) = reply.json::<Vec<Value>>().await else {
                break;
            };
            if v[0]["successful"] == true {
                acked.push(n);
            }
        }
        acked
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(server); // SIGKILL
    let acked_in_race = racer.await.unwrap();
    assert!(!acked_in_race.is_empty(), "the race published nothing");

    let server = serve(dir.path());
    let last_acked = *acked_in_race.last().unwrap();
    let all = replay(&server.url, -2, (last_acked + 1) as usize).await;
    // Every message in order, replay IDs contiguous from 1, the same as before the crash.
    assert!(all.len() as u64 > last_acked, "lost acknowledged messages");
    for (i, (replay_id, n)) in all.iter().enumerate() {
        assert_eq!(*replay_id, i as u64 + 1);
        assert_eq!(*n, i as u64);
    }
    // Replay after N/2: exactly the rest.
    let half = replay(&server.url, (N / 2) as i64, all.len() - (N / 2) as usize).await;
    assert_eq!(half, all[(N / 2) as usize..]);
    // New messages continue the sequence.
    let ack = post(
        &http,
        &server.url,
        json!([{"channel":"/crash","data":{"n":999_999}}]),
    )
    .await;
    assert_eq!(ack[0]["successful"], true);
    let after = replay(&server.url, all.len() as i64, 1).await;
    assert_eq!(after, [(all.len() as u64 + 1, 999_999)]);
}
