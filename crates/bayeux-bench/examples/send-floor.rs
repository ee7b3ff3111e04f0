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
//! `send-floor serve --help` and `send-floor load --help` list the flags.
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

/// The floor of bench/compare.sh's CPU cases: the system calls of a case and nothing else.
#[derive(clap::Parser)]
#[command(name = "send-floor")]
enum Command {
    /// Accept connections and write `--burst` frames, round robin, `--rate` times a second.
    Serve(ServeArgs),
    /// Open the connections, read every frame, and report the server's CPU over the window.
    Load(LoadArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: SocketAddr,
    /// `ws`: a connection always takes a frame; `lp`: only once it sent a request.
    #[arg(long)]
    pattern: Pattern,
    /// Frames per tick (a publish's fan-out).
    #[arg(long, default_value_t = 100)]
    burst: usize,
    /// Ticks per second (publishes per second).
    #[arg(long)]
    rate: f64,
    /// Bytes per frame.
    #[arg(long, default_value_t = 166)]
    frame: usize,
}

#[derive(clap::Args)]
struct LoadArgs {
    /// The `serve` side's address.
    #[arg(long)]
    addr: SocketAddr,
    /// As the server's `--pattern`.
    #[arg(long)]
    pattern: Pattern,
    /// Connections to open.
    #[arg(long)]
    sockets: usize,
    /// As the server's `--frame`.
    #[arg(long, default_value_t = 166)]
    frame: usize,
    /// Bytes of each request (`lp`).
    #[arg(long, default_value_t = 225)]
    request: usize,
    /// Seconds before the window.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 4.0)]
    duration: f64,
    /// The `serve` process, whose CPU is measured from /proc.
    #[arg(long)]
    server_pid: u32,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum Pattern {
    /// Every delivery is one frame pushed on an open connection.
    Ws,
    /// Every delivery answers a request; the client then sends the next one.
    Lp,
}

/// A frame of `len` bytes: an HTTP response with a JSON body for long-polling, a WebSocket text
/// frame header and a JSON body otherwise. The load side only counts bytes.
fn frame(pattern: Pattern, len: usize) -> Vec<u8> {
    let mut out = match pattern {
        Pattern::Lp => {
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: ";
            let body = len.saturating_sub(head.len() + 8);
            format!("{head}{body:04}\r\n\r\n").into_bytes()
        }
        Pattern::Ws => vec![0x81, 126, (len >> 8) as u8, len as u8],
    };
    out.resize(len.max(out.len()), b' ');
    out
}

/// A connection on the serve side.
struct Accepted {
    stream: TcpStream,
    /// Long-polling: a request came and has not been answered.
    ready: bool,
}

/// A connection on the load side.
struct Opened {
    stream: TcpStream,
    /// Bytes of the frame being received.
    partial: usize,
}

fn serve(args: ServeArgs) -> Result<(), String> {
    let ServeArgs {
        bind,
        pattern,
        burst,
        rate,
        ..
    } = args;
    let frame = frame(pattern, args.frame);
    let err = |e: std::io::Error| e.to_string();

    let mut poll = Poll::new().map_err(err)?;
    let mut listener = TcpListener::bind(bind).map_err(err)?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .map_err(err)?;
    println!("LISTENING {}", listener.local_addr().map_err(err)?);
    let mut conns: Vec<Option<Accepted>> = Vec::new();
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
                if pattern == Pattern::Lp && !conn.ready {
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
                        conns.push(Some(Accepted {
                            stream,
                            ready: false,
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

fn load(args: LoadArgs) -> Result<(), String> {
    let LoadArgs {
        addr,
        pattern,
        sockets,
        server_pid,
        ..
    } = args;
    let frame_len = frame(pattern, args.frame).len();
    let request = vec![b'r'; args.request];
    let warmup = Duration::from_secs_f64(args.warmup);
    let duration = Duration::from_secs_f64(args.duration);
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
        if pattern == Pattern::Lp {
            stream.write_all(&request).map_err(err)?;
        }
        conns.push(Opened { stream, partial: 0 });
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
                        if pattern == Pattern::Lp && frames > 0 {
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
        "params": {"pattern": if pattern == Pattern::Ws { "ws" } else { "lp" },
                   "sockets": sockets, "frame": frame_len, "request": request.len()},
    });
    println!("{report}");
    Ok(())
}

fn main() -> std::process::ExitCode {
    let result = match <Command as clap::Parser>::parse() {
        Command::Serve(args) => serve(args),
        Command::Load(args) => load(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("send-floor: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
