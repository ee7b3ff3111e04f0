//! The `bayeux` binary: configuration sources, startup line, errors and graceful shutdown.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bayeux_server::config::ServerConfig;
use serde_json::{Value, json};

fn bayeux() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bayeux"));
    c.env("RUST_LOG", "warn");
    c
}

struct Running {
    child: Child,
    url: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(mut cmd: Command) -> Running {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn bayeux");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .strip_prefix("LISTENING ")
        .unwrap_or_else(|| panic!("first line {line:?}"))
        .trim()
        .to_owned();
    Running { child, url }
}

async fn handshake(url: &str) -> Value {
    let replies: Vec<Value> = reqwest::Client::new()
        .post(url)
        .json(&json!([{"channel":"/meta/handshake","version":"1.0"}]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    replies[0].clone()
}

#[test]
fn generate_config_prints_the_defaults() {
    let out = bayeux().arg("generate-config").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        ServerConfig::from_toml(&text).unwrap(),
        ServerConfig::default()
    );
    assert!(
        text.contains("# [salesforce]"),
        "salesforce keys documented"
    );
}

#[test]
fn help_lists_every_limit_flag() {
    let out = bayeux().args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--bind",
        "--path",
        "--config",
        "--engine",
        "--data-dir",
        "--transports",
        "--connect-timeout-ms",
        "--max-interval-ms",
        "--lazy-delay-ms",
        "--max-body-bytes",
        "--max-frame-bytes",
        "--max-messages-per-request",
        "--max-queue",
        "--queue-overflow",
        "--max-sessions",
        "--max-subscriptions-per-session",
        "--retention-max-age-secs",
        "--salesforce",
        "--sf-token-lifetime",
        "--sf-connect-timeout",
        "BAYEUX_MAX_QUEUE",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}

#[tokio::test]
async fn environment_config_file_and_flags_in_that_order() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bayeux.toml");
    std::fs::write(
        &file,
        "path = \"/from-file\"\nengine = \"memory\"\n[timeouts]\nconnect_timeout_ms = 1234\n",
    )
    .unwrap();
    // The file sets the path; the environment overrides it.
    let mut cmd = bayeux();
    cmd.args(["serve", "--bind", "127.0.0.1:0", "--config"])
        .arg(&file)
        .env("BAYEUX_PATH", "/from-env");
    let server = start(cmd);
    assert!(server.url.ends_with("/from-env"), "{}", server.url);
    let reply = handshake(&server.url).await;
    assert_eq!(reply["advice"]["timeout"], 1234, "file value applies");
    drop(server);
    // A flag overrides the environment.
    let mut cmd = bayeux();
    cmd.args(["serve", "--bind", "127.0.0.1:0", "--engine", "memory"])
        .args(["--path", "/from-flag", "--connect-timeout-ms", "777"])
        .env("BAYEUX_PATH", "/from-env");
    let server = start(cmd);
    assert!(server.url.ends_with("/from-flag"), "{}", server.url);
    assert_eq!(handshake(&server.url).await["advice"]["timeout"], 777);
}

#[test]
fn bad_configuration_fails_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[limits]\nmax_queue = \"lots\"\n").unwrap();
    let out = bayeux()
        .args(["serve", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("invalid configuration"), "{err}");
    assert!(err.contains("max_queue"), "{err}");
    let out = bayeux()
        .args(["serve", "--bind", "127.0.0.1:0", "--path", "no-slash"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("path must start with '/'")
    );
}

#[tokio::test]
async fn sigterm_answers_held_connects_and_exits_cleanly() {
    let mut cmd = bayeux();
    cmd.args(["serve", "--bind", "127.0.0.1:0", "--engine", "memory"]);
    let mut server = start(cmd);
    let url = server.url.clone();
    let id = handshake(&url).await["clientId"]
        .as_str()
        .unwrap()
        .to_owned();
    let http = reqwest::Client::new();
    let connect =
        json!([{"channel":"/meta/connect","clientId":id,"connectionType":"long-polling"}]);
    http.post(&url).json(&connect).send().await.unwrap();
    let held = tokio::spawn({
        let http = http.clone();
        let url = url.clone();
        async move {
            http.post(&url)
                .json(&connect)
                .send()
                .await
                .unwrap()
                .json::<Vec<Value>>()
                .await
                .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let replies = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("held connect answered at shutdown")
        .unwrap();
    assert_eq!(replies[0]["successful"], true);
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status.code();
        }
        assert!(Instant::now() < deadline, "did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(0));
    assert!(start.elapsed() < Duration::from_secs(6));
}
