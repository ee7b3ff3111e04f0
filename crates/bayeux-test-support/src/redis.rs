//! A `redis-server` of the test's own: on a free loopback port, in a temporary directory,
//! persisting every write (`appendonly yes`, `appendfsync always`), stopped by its PID.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a start waits for the server to answer `PING`.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// `redis-server` on `PATH`, if any.
pub fn find_redis_server() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("redis-server"))
        .find(|p| p.is_file())
}

/// A running `redis-server` that this test started. Dropping it kills the process (by its PID,
/// through the child handle; nothing else is touched) and removes its directory.
pub struct RedisServer {
    binary: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts `redis-server` on a free port of 127.0.0.1 with a fresh temporary directory.
    ///
    /// Panics, saying how to install it, if `redis-server` is not on `PATH`.
    pub fn start() -> RedisServer {
        let binary = find_redis_server().unwrap_or_else(|| {
            panic!(
                "redis-server is not on PATH: the Redis engine tests start their own. Install it \
                 (Debian/Ubuntu: `apt-get install -y redis-server`; macOS: `brew install redis`) \
                 or run scripts/test.sh, which installs it when run as root"
            )
        });
        let dir = tempfile::Builder::new()
            .prefix("bayeux-redis-")
            .tempdir()
            .expect("temporary directory for redis-server");
        let mut last_error = String::new();
        // A free port can be taken between the probe and the server's bind: try a few.
        for _ in 0..5 {
            let port = free_port();
            match spawn_and_wait(&binary, port, dir.path()) {
                Ok(child) => {
                    return RedisServer {
                        binary,
                        port,
                        dir,
                        child: Some(child),
                    };
                }
                Err(e) => last_error = e,
            }
        }
        panic!("redis-server did not start: {last_error}");
    }

    /// `redis://127.0.0.1:PORT/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The port it listens on (kept across [`restart`](Self::restart)).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The PID of the running process, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its data directory (the append-only file and `redis.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the process (SIGKILL: a crash, no goodbye to clients) and waits for it. What it
    /// acknowledged is on disk (`appendfsync always`). Does nothing if it is stopped.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and directory (it reloads its append-only file) and
    /// waits until it answers `PING`. Does nothing if it runs. Panics if it does not come up.
    pub fn start_again(&mut self) {
        if self.child.is_some() {
            return;
        }
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match spawn_and_wait(&self.binary, self.port, self.dir.path()) {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                // The port may linger for a moment after the kill.
                Err(e) if Instant::now() < deadline => {
                    eprintln!("redis-server restart: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("redis-server did not restart on port {}: {e}", self.port),
            }
        }
    }

    /// [`stop`](Self::stop), then [`start_again`](Self::start_again): a Redis restart.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// Sends one command (arguments as strings) and returns the reply as text: a simple or bulk
    /// string, an integer, or `Err` with an error reply. For `INFO`, `CONFIG`, `PING`, ….
    pub fn command(&self, args: &[&str]) -> Result<String, String> {
        command(self.port, args)
    }

    /// `INFO section` as `(key, value)` lines.
    pub fn info(&self, section: &str) -> Vec<(String, String)> {
        let text = self
            .command(&["INFO", section])
            .unwrap_or_else(|e| panic!("INFO {section}: {e}"));
        text.lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
            .collect()
    }

    /// Per command, how many times it ran since the last `CONFIG RESETSTAT` (commands run by
    /// scripts included), from `INFO commandstats`.
    pub fn command_counts(&self) -> Vec<(String, u64)> {
        self.info("commandstats")
            .into_iter()
            .filter_map(|(k, v)| {
                let name = k.strip_prefix("cmdstat_")?;
                let calls = v
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("calls="))?
                    .parse()
                    .ok()?;
                Some((name.to_owned(), calls))
            })
            .collect()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts `redis-server` on `port` with its files in `dir` and waits for its `PONG`.
fn spawn_and_wait(binary: &Path, port: u16, dir: &Path) -> Result<Child, String> {
    let log = dir.join("redis.log");
    let mut child = Command::new(binary)
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "yes"])
        .args(["--appendfsync", "always"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(&log)
        .args(["--daemonize", "no"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", binary.display()))?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "redis-server exited ({status}) on port {port}: {}",
                log_tail(&log)
            ));
        }
        if command(port, &["PING"]).is_ok_and(|r| r == "PONG") {
            return Ok(child);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "no PONG on port {port} within {START_TIMEOUT:?}: {}",
                log_tail(&log)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// One RESP command on a fresh connection, with short timeouts.
fn command(port: u16, args: &[&str]) -> Result<String, String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .and_then(|()| stream.set_write_timeout(Some(Duration::from_secs(5))))
        .map_err(|e| e.to_string())?;
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    stream
        .write_all(req.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|e| format!("read: {e}"))?;
    let line = line.trim_end();
    let (kind, rest) = line.split_at(line.len().min(1));
    match kind {
        "+" | ":" => Ok(rest.to_owned()),
        "-" => Err(rest.to_owned()),
        "$" => {
            let len: i64 = rest.parse().map_err(|_| format!("bad reply: {line}"))?;
            if len < 0 {
                return Ok(String::new());
            }
            let mut body = vec![0u8; len as usize + 2];
            reader
                .read_exact(&mut body)
                .map_err(|e| format!("read: {e}"))?;
            body.truncate(len as usize);
            String::from_utf8(body).map_err(|e| e.to_string())
        }
        _ => Err(format!("unsupported reply: {line}")),
    }
}
