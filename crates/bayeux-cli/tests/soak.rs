//! The soak test: nothing goes silent. A subscriber must receive every event exactly once and
//! in order while the Salesforce emulator throws every fault it has at it, one after another.
//!
//! Setup: `bayeux serve --salesforce --engine disk --sf-token-lifetime 4 --sf-connect-timeout 2
//! --sf-reconnect-deadline 3` as a child process (tokens die 4 s after they are issued,
//! connects are held 2 s, a session without a request for 3 s is swept). A publisher POSTs a
//! platform event `{"Seq__c": n}` to `/services/data/v59.0/sobjects/Demo__e/` every 100 ms
//! for 48 s (n = 0..480), with its own token, logging in again whenever the REST API answers
//! 401. Two subscribers on `/event/Demo__e`:
//!
//! - (a) the library in this process: `SalesforceAuth` password flow, watchdog network
//!   allowance 1 s (a connect unanswered 2 s + 1 s after it was sent is stalled), backoff
//!   50 ms → 1 s;
//! - (b) `bayeux subscribe … --replay-file F --network-allowance 1` as a child process, its
//!   secrets in `BAYEUX_SF_CLIENT_SECRET` / `BAYEUX_SF_PASSWORD`.
//!
//! Timeline, in seconds from the first publish (t = 0), with what the subscribers' `events()`
//! reported in the recorded runs (each recovery takes under 10 ms once the fault is seen):
//!
//! | t | fault | recovery |
//! |---|---|---|
//! | ≈4, 12, 16, 20, … | natural token expiry: each subscriber's token dies 4 s after its login | the next connect gets `401::Authentication invalid` + `reconnect: none` → `Reconnecting { reason: "401::Authentication invalid", handshake: true }`, `Reauthenticated` (fresh token), handshake, `Connected { rehandshake: true }`, `Resumed { from: last replay ID }`; the publisher's next POST gets 401 and it logs in again |
//! | 8 | `POST /_emulator/revoke`: every token dies at once | the same, for both subscribers and the publisher together |
//! | 14 | `POST /_emulator/expire-sessions`: every session swept | the held connect is answered `403::Unknown client` + advice `handshake` → `Reconnecting { reason: "403::Unknown client", handshake: true }`, handshake, `Connected`, `Resumed` (no re-authentication) |
//! | 20 | `POST /_emulator/disconnect`: a server-sent `/meta/disconnect` in the held connect | `ServerDisconnected`, `Reconnecting { reason: "server sent /meta/disconnect", handshake: true }`, handshake, `Connected`, `Resumed` |
//! | 24 | `kill -9` of the `bayeux subscribe` process (≈240 lines printed) | — (each batch's checkpoint is written before its lines are printed) |
//! | 26 | `bayeux subscribe` restarted with the same command line | `subscribed to /event/Demo__e from N`, N the replay ID of its last printed line; the ~20 events published while it was down arrive at once, then live ones |
//! | 30 | `POST /_emulator/busy?count=3`: the next 3 meta replies are `503` | whichever subscribers connect next (one got 1, the other 2 in the recorded runs): `Reconnecting { reason: "503::Server is too busy…", handshake: false, delay: 1 s }` (the advised interval), then the same session connects again: `Connected { rehandshake: false }` |
//! | 36 | `POST /_emulator/stall?seconds=3`: connects held now or arriving within 3 s are never answered | 3 s after the held connect was sent (t ≈ 39) the watchdog aborts it: `Stalled { count: 1 }`, connect again (refused for the expired token: re-authentication, handshake, `Resumed`); the first connect of that session, which asks for an immediate answer and so has a 1 s deadline, falls in the window too: `Stalled { count: 2, rehandshake: true }` (t ≈ 40), handshake, `Resumed` replays the ~4 s of events published during the silence |
//! | 48 | the publisher stops | both subscribers have everything within ~0.5 s; `bayeux subscribe` gets SIGTERM and exits 0 |
//!
//! Asserted: the library received Seq 0..480 exactly once, in order, and reported
//! `Reauthenticated`, `Reconnecting { handshake: true }` after `403::Unknown client`,
//! `ServerDisconnected`, `Stalled` and `Resumed`; the two `bayeux subscribe` runs together
//! printed Seq 0..480 exactly once, in order (no gap, no repeat across the kill -9), reported
//! the same recoveries on stderr, and left the replay file at the last replay ID printed. The
//! `503` goes to whichever clients send the next three meta messages, so it is asserted for
//! the two subscribers together.
//!
//! Run alone: `cargo test -p bayeux-cli --test soak -- --nocapture` (about 55 s; it prints
//! the timeline of faults and recoveries it saw).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bayeux_client::auth::{Flow, SalesforceAuth, Token, TokenProvider};
use bayeux_client::{BackoffPolicy, Client, Event, Message, Replay};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::time::Instant;

const CHANNEL: &str = "/event/Demo__e";
const EVENTS: i64 = 480;
const PERIOD: Duration = Duration::from_millis(100);

/// A child process killed (SIGKILL) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines a child writes, collected by a thread, stamped with the time since `t0`.
type Lines = Arc<Mutex<Vec<(Duration, String)>>>;

fn collect(reader: impl std::io::Read + Send + 'static, t0: Instant, into: Lines) {
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            into.lock().unwrap().push((t0.elapsed(), line));
        }
    });
}

fn serve(data_dir: &std::path::Path, log: &std::path::Path) -> (Proc, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bayeux"))
        .args([
            "serve",
            "--salesforce",
            "--engine",
            "disk",
            "--bind",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--sf-token-lifetime", "4", "--sf-connect-timeout", "2"])
        .args(["--sf-reconnect-deadline", "3"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("spawn bayeux serve");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let proc = Proc(child);
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("bayeux serve printed no LISTENING line within 20 s");
    let url = line
        .strip_prefix("LISTENING ")
        .unwrap_or_else(|| panic!("first line {line:?}"))
        .trim();
    let base = url.strip_suffix("/cometd").unwrap_or(url).to_owned();
    (proc, base)
}

struct CliRun {
    proc: Proc,
    stdout: Lines,
    stderr: Lines,
}

fn bayeux_subscribe(base: &str, replay_file: &std::path::Path, t0: Instant) -> CliRun {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bayeux"))
        .args(["subscribe", CHANNEL, "--sf-login-url", base])
        .args(["--client-id", "demo", "--username", "demo@example.com"])
        .args(["--api-version", "59.0", "--network-allowance", "1"])
        .args(["--max-backoff", "1", "--request-timeout", "5"])
        .args(["--progress-interval", "5"])
        .arg("--replay-file")
        .arg(replay_file)
        .env("BAYEUX_SF_CLIENT_SECRET", "demo")
        .env("BAYEUX_SF_PASSWORD", "demo")
        .env_remove("BAYEUX_URL")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bayeux subscribe");
    let stdout = Lines::default();
    let stderr = Lines::default();
    collect(child.stdout.take().unwrap(), t0, stdout.clone());
    collect(child.stderr.take().unwrap(), t0, stderr.clone());
    CliRun {
        proc: Proc(child),
        stdout,
        stderr,
    }
}

/// Waits (bounded) until a line of `lines` contains `needle`.
async fn wait_line(lines: &Lines, needle: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if lines
            .lock()
            .unwrap()
            .iter()
            .any(|(_, l)| l.contains(needle))
        {
            return;
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "no line with {needle:?} within {within:?}: {:#?}",
        lines.lock().unwrap()
    );
}

fn seq_of(m: &Value) -> i64 {
    m["data"]["payload"]["Seq__c"]
        .as_i64()
        .unwrap_or_else(|| panic!("no data.payload.Seq__c in {m}"))
}

fn seqs_printed(lines: &Lines) -> Vec<(i64, i64)> {
    lines
        .lock()
        .unwrap()
        .iter()
        .map(|(_, l)| {
            let m: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}"));
            (seq_of(&m), m["data"]["event"]["replayId"].as_i64().unwrap())
        })
        .collect()
}

fn password_flow(base: &str) -> SalesforceAuth {
    SalesforceAuth::new(
        base,
        Flow::Password {
            client_id: "demo".into(),
            client_secret: "demo".into(),
            username: "demo@example.com".into(),
            password: "demo".into(),
        },
    )
}

/// Publishes Seq 0..EVENTS every PERIOD with its own token, logging in again on a 401 (the
/// event was not published then, so the retry cannot duplicate it).
async fn publisher(base: String, t0: Instant, relogins: Arc<Mutex<Vec<Duration>>>) {
    let auth = password_flow(&base);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let url = format!("{base}/services/data/v59.0/sobjects/Demo__e/");
    let mut token: Token = auth.token().await.expect("publisher login");
    let mut tick = tokio::time::interval_at(t0, PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for seq in 0..EVENTS {
        tick.tick().await;
        for attempt in 0.. {
            assert!(attempt < 5, "Seq {seq}: five 401s in a row");
            let r = http
                .post(&url)
                .header("authorization", token.authorization())
                .json(&json!({ "Seq__c": seq }))
                .send()
                .await
                .unwrap_or_else(|e| panic!("publish Seq {seq}: {e}"));
            match r.status().as_u16() {
                201 => break,
                401 => {
                    relogins.lock().unwrap().push(t0.elapsed());
                    token = auth.token().await.expect("publisher re-login");
                }
                s => panic!("publish Seq {seq}: HTTP {s}: {}", r.text().await.unwrap()),
            }
        }
    }
}

async fn fault(http: &reqwest::Client, base: &str, path: &str) {
    let r = http
        .post(format!("{base}/_emulator/{path}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    assert!(r.status().is_success(), "{path}: {}", r.status());
}

fn terminate(proc: &mut Proc) -> std::process::ExitStatus {
    let pid = proc.0.id().to_string();
    let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(sent.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = proc.0.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "bayeux subscribe ignored SIGTERM for 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_exactly_once_in_order(what: &str, seqs: &[i64]) {
    let expected: Vec<i64> = (0..EVENTS).collect();
    if seqs != expected {
        let mut missing: Vec<i64> = expected
            .iter()
            .copied()
            .filter(|s| !seqs.contains(s))
            .collect();
        missing.truncate(20);
        let repeated: Vec<i64> = seqs
            .windows(2)
            .filter(|w| w[1] <= w[0])
            .map(|w| w[1])
            .collect();
        panic!(
            "{what}: {} events, expected {EVENTS}; missing (first 20) {missing:?}; out of \
             order or repeated {repeated:?}",
            seqs.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_every_event_exactly_once_through_every_fault() {
    let wall = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let (_server, base) = serve(&dir.path().join("data"), &dir.path().join("serve.log"));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let setup = Instant::now();

    // (a) The library.
    let client = Client::builder(format!("{base}/cometd/59.0"))
        .token_provider(password_flow(&base))
        .network_allowance(Duration::from_secs(1))
        .backoff(BackoffPolicy {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(1),
            jitter: true,
        })
        .request_timeout(Duration::from_secs(5))
        .operation_timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let lib_events: Arc<Mutex<Vec<(Duration, Event)>>> = Arc::default();
    let mut events = client.events();
    {
        let lib_events = lib_events.clone();
        tokio::spawn(async move {
            while let Some(e) = events.next().await {
                lib_events.lock().unwrap().push((setup.elapsed(), e));
            }
        });
    }
    // The data directory is fresh: -2 is exactly "everything the publisher sends".
    let mut sub = client.subscribe(CHANNEL, Replay::All).await.unwrap();
    let lib_got: Arc<Mutex<Vec<i64>>> = Arc::default();
    {
        let lib_got = lib_got.clone();
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let m: Message = m;
                let v = serde_json::to_value(&m).unwrap();
                lib_got.lock().unwrap().push(seq_of(&v));
            }
        });
    }

    // (b) `bayeux subscribe`, started before the first publish.
    let replay_file = dir.path().join("replay.json");
    let first = bayeux_subscribe(&base, &replay_file, setup);
    wait_line(&first.stderr, "subscribed to", Duration::from_secs(20)).await;
    assert!(client.wait_connected(Duration::from_secs(20)).await);

    // The publisher, and the faults in turn.
    let t0 = Instant::now() + Duration::from_millis(100);
    let offset = t0 - setup;
    let relogins: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let publishing = tokio::spawn(publisher(base.clone(), t0, relogins.clone()));
    let mut faults: Vec<(Duration, &str)> = Vec::new();
    let at = |s: u64| tokio::time::sleep_until(t0 + Duration::from_secs(s));
    at(8).await;
    fault(&http, &base, "revoke").await;
    faults.push((t0.elapsed(), "revoke"));
    at(14).await;
    fault(&http, &base, "expire-sessions").await;
    faults.push((t0.elapsed(), "expire-sessions"));
    at(20).await;
    fault(&http, &base, "disconnect").await;
    faults.push((t0.elapsed(), "disconnect"));
    at(24).await;
    let mut first = first;
    first.proc.0.kill().unwrap(); // SIGKILL
    first.proc.0.wait().unwrap();
    faults.push((t0.elapsed(), "kill -9 bayeux subscribe"));
    let printed_before_kill = seqs_printed(&first.stdout);
    at(26).await;
    let mut second = bayeux_subscribe(&base, &replay_file, setup);
    faults.push((t0.elapsed(), "bayeux subscribe restarted"));
    at(30).await;
    fault(&http, &base, "busy?count=3").await;
    faults.push((t0.elapsed(), "busy?count=3"));
    at(36).await;
    fault(&http, &base, "stall?seconds=3").await;
    faults.push((t0.elapsed(), "stall?seconds=3"));

    tokio::time::timeout(Duration::from_secs(30), publishing)
        .await
        .expect("the publisher took over 30 s beyond its schedule")
        .unwrap();
    let published_at = t0.elapsed();

    // Drain: both subscribers have everything within a bounded time.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let lib = lib_got.lock().unwrap().len() as i64;
        let cli = (printed_before_kill.len() + second.stdout.lock().unwrap().len()) as i64;
        if (lib >= EVENTS && cli >= EVENTS) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Anything extra (a repeat) would come right after: give it a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let drained_at = t0.elapsed();

    // SIGTERM: exit status 0, checkpoint in place.
    let status = terminate(&mut second.proc);
    client.disconnect().await;

    // The timeline, for the record (`--nocapture`).
    let stamp = |d: Duration| d.as_secs_f64() - offset.as_secs_f64();
    let mut timeline: Vec<(f64, String)> = Vec::new();
    for (t, f) in &faults {
        timeline.push((t.as_secs_f64(), format!("FAULT  {f}")));
    }
    for (t, e) in lib_events.lock().unwrap().iter() {
        timeline.push((stamp(*t), format!("lib    {e:?}")));
    }
    for (t, l) in first.stderr.lock().unwrap().iter() {
        timeline.push((stamp(*t), format!("cli#1  {l}")));
    }
    for (t, l) in second.stderr.lock().unwrap().iter() {
        timeline.push((stamp(*t), format!("cli#2  {l}")));
    }
    for t in relogins.lock().unwrap().iter() {
        timeline.push((t.as_secs_f64(), "pub    401: logged in again".into()));
    }
    timeline.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (t, line) in &timeline {
        eprintln!("{t:>8.3}  {line}");
    }
    eprintln!(
        "published {EVENTS} events by t={:.1}s, drained by t={:.1}s; wall {:.1}s",
        published_at.as_secs_f64(),
        drained_at.as_secs_f64(),
        wall.elapsed().as_secs_f64()
    );

    // (a) The library: every event exactly once, in order; each kind of recovery reported.
    let lib = lib_got.lock().unwrap().clone();
    assert_exactly_once_in_order("library", &lib);
    let seen: Vec<Event> = lib_events
        .lock()
        .unwrap()
        .iter()
        .map(|(_, e)| e.clone())
        .collect();
    let has = |pred: &dyn Fn(&Event) -> bool| seen.iter().any(pred);
    assert!(
        seen.iter()
            .filter(|e| **e == Event::Reauthenticated)
            .count()
            >= 3,
        "token expiry and revocation: {seen:#?}"
    );
    assert!(
        has(
            &|e| matches!(e, Event::Reconnecting { handshake: true, reason, .. } if reason.contains("403::Unknown client"))
        ),
        "swept session: {seen:#?}"
    );
    assert!(
        has(&|e| *e == Event::ServerDisconnected),
        "server disconnect: {seen:#?}"
    );
    assert!(
        has(&|e| matches!(e, Event::Stalled { .. })),
        "silent stall: {seen:#?}"
    );
    assert!(
        has(&|e| matches!(e, Event::Resumed { channel, from } if channel == CHANNEL && *from > 0)),
        "resumed with a replay ID: {seen:#?}"
    );
    assert!(
        !has(&|e| matches!(e, Event::GaveUp { .. } | Event::ReplayFallback { .. })),
        "{seen:#?}"
    );

    // (b) `bayeux subscribe`: the two runs together, no gap and no repeat.
    let after = seqs_printed(&second.stdout);
    let union: Vec<i64> = printed_before_kill
        .iter()
        .chain(after.iter())
        .map(|(s, _)| *s)
        .collect();
    assert!(
        printed_before_kill.len() > 100 && after.len() > 100,
        "the kill came mid-stream: {} before, {} after",
        printed_before_kill.len(),
        after.len()
    );
    assert_exactly_once_in_order("bayeux subscribe (both runs)", &union);
    assert!(
        status.success(),
        "bayeux subscribe exits 0 on SIGTERM: {status:?}"
    );
    let resumed_from = printed_before_kill.last().unwrap().1;
    wait_line(
        &second.stderr,
        &format!("subscribed to {CHANNEL} from {resumed_from}"),
        Duration::ZERO,
    )
    .await;
    let stored: Value = serde_json::from_slice(&std::fs::read(&replay_file).unwrap()).unwrap();
    assert_eq!(stored[CHANNEL], after.last().unwrap().1, "{stored}");
    let cli_stderr: String = first
        .stderr
        .lock()
        .unwrap()
        .iter()
        .chain(second.stderr.lock().unwrap().iter())
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    for needle in [
        "re-authenticated with a fresh token",
        "403::Unknown client",
        "the server ended the session (/meta/disconnect)",
        "a connect stalled",
        "re-subscribed to /event/Demo__e from replay ID",
    ] {
        assert!(
            cli_stderr.contains(needle),
            "{needle:?} not in:\n{cli_stderr}"
        );
    }
    // The 503s went to whichever subscribers sent the next meta messages.
    let busy_lib =
        has(&|e| matches!(e, Event::Reconnecting { reason, .. } if reason.contains("503::")));
    assert!(
        busy_lib || cli_stderr.contains("503::Server is too busy"),
        "nobody saw the 503s"
    );
    assert!(
        wall.elapsed() < Duration::from_secs(90),
        "the soak took {:?}",
        wall.elapsed()
    );
}
