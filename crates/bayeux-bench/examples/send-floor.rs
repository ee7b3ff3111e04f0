//! The floor for `bench/compare.sh`'s CPU cases: what the system calls of a case cost alone,
//! with no server logic at all.
//!
//! `serve` is a "server" that does nothing but the I/O a Bayeux server must do per delivery in
//! a fan-out: every `1/rate` seconds it writes one fixed frame to each of the next `burst`
//! connections (a publish fanned out to `burst` subscribers), round robin. With
//! `--pattern ws` a connection is always ready for a frame (a WebSocket push); with
//! `--pattern lp` it is ready once it has sent a request, and the frame is the answer to it
//! (a held long-poll answered, then the next connect read). It parses nothing, encodes nothing,
//! keeps no session: one `epoll` loop (mio), one `send` per delivery and, for long-polling, one
//! `recv` per request, which is the least any server that sends each delivery on its
//! subscriber's own TCP connection can do.
//!
//! `load` opens the connections (pin it to the other CPU), reads every frame (and, for
//! long-polling, sends the next request as soon as an answer is complete, as `bayeux bench`
//! does), and after the warm-up measures the server's CPU from `/proc/PID/stat` over the window,
//! exactly as `bayeux bench --server-pid` measures real servers. It prints one JSON line in the
//! shape of `bayeux bench`'s report (no latencies: nothing is timed per message).
//!
//! ```sh
//! taskset -c 0 cargo run --release -p bayeux-bench --example send-floor -- \
//!     serve --bind 127.0.0.1:18300 --pattern ws --burst 100 --rate 200 --frame 166 &
//! taskset -c 1 cargo run --release -p bayeux-bench --example send-floor -- \
//!     load --addr 127.0.0.1:18300 --pattern ws --sockets 1000 --frame 166 --server-pid $!
//! ```

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

const LISTENER: Token = Token(usize::MAX);

/// Flags of either role, `--name value` pairs after the role.
struct Flags(Vec<(String, String)>);

impl Flags {
    fn parse(args: &[String]) -> Result<Self, String> {
        let mut pairs = Vec::new();
        let mut it = args.iter();
        while let Some(name) = it.next() {
            let name = name
                .strip_prefix("--")
                .ok_or_else(|| format!("expected a --flag, got {name}"))?;
            let value = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
            pairs.push((name.to_string(), value.clone()));
        }
        Ok(Flags(pairs))
    }

    fn get<T: std::str::FromStr>(&self, name: &str, default: Option<T>) -> Result<T, String> {
        match self.0.iter().rev().find(|(n, _)| n == name) {
            Some((_, v)) => v
                .parse()
                .map_err(|_| format!("bad value for --{name}: {v}")),
            None => default.ok_or_else(|| format!("--{name} is required")),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Pattern {
    /// Every delivery is one frame pushed on an open connection.
    WebSocket,
    /// Every delivery answers a request; the client then sends the next one.
    LongPolling,
}

impl std::str::FromStr for Pattern {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "ws" => Ok(Pattern::WebSocket),
            "lp" => Ok(Pattern::LongPolling),
            _ => Err(()),
        }
    }
}

/// A frame of `len` bytes: an HTTP response with a JSON body for long-polling, a WebSocket text
/// frame header and a JSON body otherwise. The load side only counts bytes.
fn frame(pattern: Pattern, len: usize) -> Vec<u8> {
    let mut out = match pattern {
        Pattern::LongPolling => {
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: ";
            let body = len.saturating_sub(head.len() + 8);
            format!("{head}{body:04}\r\n\r\n").into_bytes()
        }
        Pattern::WebSocket => vec![0x81, 126, (len >> 8) as u8, len as u8],
    };
    out.resize(len.max(out.len()), b' ');
    out
}

struct Conn {
    stream: TcpStream,
    /// Long-polling: a request came and has not been answered.
    ready: bool,
    /// Load side: bytes of the frame being received.
    partial: usize,
}

fn serve(flags: &Flags) -> Result<(), String> {
    let bind: SocketAddr = flags.get("bind", Some("127.0.0.1:0".parse().unwrap()))?;
    let pattern: Pattern = flags.get("pattern", None)?;
    let burst: usize = flags.get("burst", Some(100))?;
    let rate: f64 = flags.get("rate", None)?;
    let frame = frame(pattern, flags.get("frame", Some(166))?);
    let err = |e: std::io::Error| e.to_string();

    let mut poll = Poll::new().map_err(err)?;
    let mut listener = TcpListener::bind(bind).map_err(err)?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .map_err(err)?;
    println!("LISTENING {}", listener.local_addr().map_err(err)?);
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut next = Instant::now() + interval;
    let mut cursor = 0usize;
    loop {
        let now = Instant::now();
        if now >= next {
            // One "publish": the next `burst` ready connections get a frame each.
            next += interval;
            if next < now {
                next = now + interval;
            }
            let mut sent = 0;
            for _ in 0..conns.len() {
                if sent == burst {
                    break;
                }
                cursor = (cursor + 1) % conns.len();
                let Some(conn) = conns[cursor].as_mut() else {
                    continue;
                };
                if pattern == Pattern::LongPolling && !conn.ready {
                    continue;
                }
                match conn.stream.write(&frame) {
                    Ok(_) => {
                        conn.ready = false;
                        sent += 1;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => conns[cursor] = None,
                }
            }
        }
        let wait = next.saturating_duration_since(Instant::now());
        poll.poll(&mut events, Some(wait)).map_err(err)?;
        for event in events.iter() {
            if event.token() == LISTENER {
                while let Ok((mut stream, _)) = listener.accept() {
                    let _ = stream.set_nodelay(true);
                    let token = Token(conns.len());
                    if poll
                        .registry()
                        .register(&mut stream, token, Interest::READABLE)
                        .is_ok()
                    {
                        conns.push(Some(Conn {
                            stream,
                            ready: false,
                            partial: 0,
                        }));
                    }
                }
                continue;
            }
            let i = event.token().0;
            let Some(conn) = conns[i].as_mut() else {
                continue;
            };
            loop {
                match conn.stream.read(&mut buf) {
                    Ok(0) => {
                        conns[i] = None;
                        break;
                    }
                    Ok(n) => {
                        conn.ready = true;
                        if n < buf.len() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        conns[i] = None;
                        break;
                    }
                }
            }
        }
    }
}

fn load(flags: &Flags) -> Result<(), String> {
    let addr: SocketAddr = flags.get("addr", None)?;
    let pattern: Pattern = flags.get("pattern", None)?;
    let sockets: usize = flags.get("sockets", None)?;
    let frame_len: usize = frame(pattern, flags.get("frame", Some(166))?).len();
    let request = vec![b'r'; flags.get("request", Some(225))?];
    let warmup = Duration::from_secs_f64(flags.get("warmup", Some(1.0))?);
    let duration = Duration::from_secs_f64(flags.get("duration", Some(4.0))?);
    let server_pid: u32 = flags.get("server-pid", None)?;
    let err = |e: std::io::Error| e.to_string();

    let mut poll = Poll::new().map_err(err)?;
    let mut conns = Vec::with_capacity(sockets);
    let setup = Instant::now();
    for i in 0..sockets {
        let std_stream = std::net::TcpStream::connect(addr).map_err(err)?;
        std_stream.set_nodelay(true).map_err(err)?;
        std_stream.set_nonblocking(true).map_err(err)?;
        let mut stream = TcpStream::from_std(std_stream);
        poll.registry()
            .register(&mut stream, Token(i), Interest::READABLE)
            .map_err(err)?;
        if pattern == Pattern::LongPolling {
            stream.write_all(&request).map_err(err)?;
        }
        conns.push(Conn {
            stream,
            ready: false,
            partial: 0,
        });
    }
    let setup_secs = setup.elapsed().as_secs_f64();
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    let mut delivered = 0u64;
    let mut errors = 0u64;
    let start = Instant::now();
    let mut window: Option<(u64, bayeux_bench::procfs::Sample)> = None;
    let mut result = None;
    while result.is_none() {
        let elapsed = start.elapsed();
        if window.is_none() && elapsed >= warmup {
            let s = bayeux_bench::procfs::sample(server_pid).map_err(err)?;
            window = Some((delivered, s));
        }
        if let Some((from, a)) = window
            && elapsed >= warmup + duration
        {
            let b = bayeux_bench::procfs::sample(server_pid).map_err(err)?;
            result = Some((delivered - from, a, b));
        }
        poll.poll(&mut events, Some(Duration::from_millis(10)))
            .map_err(err)?;
        for event in events.iter() {
            let conn = &mut conns[event.token().0];
            loop {
                match conn.stream.read(&mut buf) {
                    Ok(0) => {
                        errors += 1;
                        break;
                    }
                    Ok(n) => {
                        conn.partial += n;
                        let frames = conn.partial / frame_len;
                        conn.partial %= frame_len;
                        delivered += frames as u64;
                        if pattern == Pattern::LongPolling && frames > 0 {
                            // The next connect, as soon as the answer is complete.
                            if conn.stream.write_all(&request).is_err() {
                                errors += 1;
                            }
                        }
                        if n < buf.len() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        errors += 1;
                        break;
                    }
                }
            }
        }
    }
    let (count, a, b) = result.expect("the loop ends with a result");
    let secs = b.at.duration_since(a.at).as_secs_f64();
    let report = serde_json::json!({
        "deliveries_per_sec": count as f64 / secs,
        "publishes_per_sec": null,
        "latency_ms": {"p50": null, "p99": null},
        "delivered": count,
        "lost": 0,
        "duplicated": 0,
        "errors": if errors > 0 { serde_json::json!({"closed": errors}) } else { serde_json::json!({}) },
        "server": {
            "pid": server_pid,
            "cpu_percent": (bayeux_bench::procfs::cpu_percent(&a, &b) * 100.0).round() / 100.0,
            "rss_mb": b.rss_kb as f64 / 1024.0,
        },
        "subscribers_ready": sockets,
        "publishers_ready": 0,
        "setup_secs": setup_secs,
        "measured_secs": secs,
        "params": {"pattern": if pattern == Pattern::WebSocket { "ws" } else { "lp" },
                   "sockets": sockets, "frame": frame_len, "request": request.len()},
    });
    println!("{report}");
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => Flags::parse(&args[1..]).and_then(|f| serve(&f)),
        Some("load") => Flags::parse(&args[1..]).and_then(|f| load(&f)),
        _ => Err("usage: send-floor serve|load --flag value ... (see the source's header)".into()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("send-floor: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
