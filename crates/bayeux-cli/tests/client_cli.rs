//! `bayeux subscribe` and `bayeux publish` as a user runs them: output lines, exit statuses
//! (0 ended by --max-events/--duration, 1 gave up or refused, 2 bad arguments), resuming from
//! the replay file, and the Salesforce login and REST publish against the emulator.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn bayeux() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bayeux"));
    c.env("RUST_LOG", "warn");
    for var in [
        "BAYEUX_URL",
        "BAYEUX_ACCESS_TOKEN",
        "BAYEUX_REPLAY_FILE",
        "BAYEUX_SF_LOGIN_URL",
        "BAYEUX_SF_CLIENT_ID",
        "BAYEUX_SF_CLIENT_SECRET",
        "BAYEUX_SF_USERNAME",
        "BAYEUX_SF_PASSWORD",
        "BAYEUX_SF_REFRESH_TOKEN",
        "BAYEUX_SF_JWT_KEY",
    ] {
        c.env_remove(var);
    }
    c
}

/// A child killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `bayeux serve` on port 0 with the memory engine; returns the process and its URL.
fn serve(extra: &[&str]) -> (Proc, String) {
    let mut child = bayeux()
        .args(["serve", "--engine", "memory", "--bind", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let proc = Proc(child);
    let line = rx.recv_timeout(Duration::from_secs(20)).expect("LISTENING");
    let url = line.strip_prefix("LISTENING ").unwrap().trim().to_owned();
    (proc, url)
}

/// Runs to completion, bounded.
fn run(cmd: &mut Command, stdin: &str, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} ran over {limit:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const LIMIT: Duration = Duration::from_secs(30);

#[test]
fn bad_arguments_exit_2() {
    for args in [
        vec!["subscribe", "/a"],
        vec![
            "subscribe",
            "/a",
            "--url",
            "http://127.0.0.1:1/cometd",
            "--sf-login-url",
            "http://127.0.0.1:1",
        ],
        vec![
            "subscribe",
            "/a",
            "--url",
            "http://127.0.0.1:1/cometd",
            "--replay",
            "-3",
        ],
        vec![
            "subscribe",
            "/meta/connect",
            "--url",
            "http://127.0.0.1:1/cometd",
        ],
        vec!["subscribe", "/a", "--url", "ftp://127.0.0.1/cometd"],
        vec!["subscribe", "/a", "--sf-login-url", "http://127.0.0.1:1"],
        vec!["publish", "/a/*", "1", "--url", "http://127.0.0.1:1/cometd"],
        vec![
            "publish",
            "/a",
            "{not json",
            "--url",
            "http://127.0.0.1:1/cometd",
        ],
        vec![
            "publish",
            "/topic/X",
            "{}",
            "--sf-login-url",
            "http://127.0.0.1:1",
            "--client-id",
            "x",
            "--client-secret",
            "y",
        ],
    ] {
        let out = run(bayeux().args(&args), "", LIMIT);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).is_empty(), "{args:?}: says why");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn publish_and_subscribe_over_bayeux_then_resume_from_the_replay_file() {
    let (_server, url) = serve(&[]);
    let dir = tempfile::tempdir().unwrap();
    let replay = dir.path().join("replay.json");
    let replay = replay.to_str().unwrap();
    // Retained history: the first subscriber asks for all of it.
    let published = run(
        bayeux().args(["publish", "/cli/a", "--url", &url]),
        "{\"n\":0}\n\n{\"n\":1}\n{\"n\":2}\n",
        LIMIT,
    );
    assert_eq!(published.status.code(), Some(0), "{}", stderr(&published));
    let acks = lines(&published);
    assert_eq!(acks.len(), 3);
    assert!(acks.iter().all(|a| a["successful"] == true), "{acks:?}");

    let out = run(
        bayeux().args([
            "subscribe",
            "/cli/a",
            "/cli/*",
            "--url",
            &url,
            "--replay",
            "-2",
            "--replay-file",
            replay,
            "--max-events",
            "2",
        ]),
        "",
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let got = lines(&out);
    assert_eq!(
        got.iter()
            .map(|m| m["data"]["n"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        vec![0, 1],
        "two events, each once although two subscriptions match"
    );
    assert!(
        stderr(&out).contains("--max-events reached"),
        "{}",
        stderr(&out)
    );

    // Without --replay, the next run resumes after what the first printed.
    let out = run(
        bayeux().args([
            "subscribe",
            "/cli/a",
            "--url",
            &url,
            "--replay-file",
            replay,
            "--duration",
            "1.5",
        ]),
        "",
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let got = lines(&out);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["data"]["n"], 2);
    assert_eq!(got[0]["channel"], "/cli/a");
    assert!(
        stderr(&out).contains("--duration reached"),
        "{}",
        stderr(&out)
    );
    let stored: Value = serde_json::from_slice(&std::fs::read(replay).unwrap()).unwrap();
    assert_eq!(stored["/cli/a"], 3);
}

#[test]
fn giving_up_exits_1_with_the_reason() {
    // Nothing listens there: every request fails.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let out = run(
        bayeux().args([
            "subscribe",
            "/a",
            "--url",
            &format!("http://127.0.0.1:{port}/cometd"),
            "--give-up-after",
            "2",
            "--max-backoff",
            "0.1",
        ]),
        "",
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("gave up"), "{}", stderr(&out));
}

#[test]
fn salesforce_login_rest_publish_and_subscribe() {
    let (_server, url) = serve(&["--salesforce"]);
    let base = url.strip_suffix("/cometd").unwrap().to_owned();
    let sf = |cmd: &mut Command| {
        cmd.args(["--sf-login-url", &base, "--client-id", "demo"])
            .args(["--username", "demo@example.com", "--api-version", "59.0"])
            .env("BAYEUX_SF_CLIENT_SECRET", "demo")
            .env("BAYEUX_SF_PASSWORD", "demo");
    };
    let mut publish = bayeux();
    publish.args(["publish", "/event/Demo__e"]);
    sf(&mut publish);
    let out = run(&mut publish, "{\"N__c\":1}\n{\"N__c\":2}\n", LIMIT);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let replies = lines(&out);
    assert_eq!(replies.len(), 2);
    assert!(replies.iter().all(|r| r["success"] == true), "{replies:?}");

    let mut subscribe = bayeux();
    subscribe.args([
        "subscribe",
        "/event/Demo__e",
        "--replay",
        "all",
        "--max-events",
        "2",
    ]);
    sf(&mut subscribe);
    let out = run(&mut subscribe, "", LIMIT);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let got = lines(&out);
    assert_eq!(
        got.iter()
            .map(|m| m["data"]["payload"]["N__c"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert!(got.iter().all(|m| m["data"]["event"]["replayId"].is_i64()));

    // Refused credentials: a clear message and exit status 1.
    let mut refused = bayeux();
    refused.args(["subscribe", "/event/Demo__e"]);
    sf(&mut refused);
    refused.env("BAYEUX_SF_PASSWORD", "wrong");
    let out = run(&mut refused, "", LIMIT);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("invalid_grant"), "{}", stderr(&out));
}
