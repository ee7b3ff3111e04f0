//! `bayeux bench`: a load generator for any Bayeux server (this one, Faye, CometD).
//!
//! N subscribers over long-polling or WebSocket spread over K channels, P publishers at a
//! target rate or as fast as W publishes in flight allow. Every message carries its send time
//! and a global sequence number, so the run reports deliveries per second, publish→receive
//! latency percentiles, lost and duplicated messages (expected deliveries are counted from
//! acknowledged publishes), errors by kind and, given its PID, the server's CPU and memory.
//!
//! ```no_run
//! # async fn demo() -> Result<(), bayeux_bench::BenchError> {
//! let args = bayeux_bench::BenchArgs::from_flags([
//!     "bench", "--url", "http://127.0.0.1:8080/cometd", "--subscribers", "50",
//! ]).unwrap();
//! let report = bayeux_bench::run(args).await?;
//! println!("{}", serde_json::to_string(&report).unwrap());
//! # Ok(()) }
//! ```
#![deny(unreachable_pub)]

mod args;
mod client;
mod link;
mod net;
pub mod procfs;
mod progress;
mod stats;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

pub use args::{BenchArgs, Transport, parse_sources};

use client::{Counters, Ctx};
use stats::{BitSet, Errors, Latencies, PubShared, SubShared, Timeline};

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A flag has a value that cannot work.
    #[error("bad arguments: {0}")]
    Args(String),
    /// The URL cannot be used.
    #[error("bad URL: {0}")]
    Url(String),
    /// The runtime could not start.
    #[error("cannot start: {0}")]
    Runtime(String),
}

/// Publish→receive latency percentiles, milliseconds, over the first receipt of each counted
/// message by each subscriber.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LatencyMs {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
    /// Number of samples.
    pub count: u64,
}

/// CPU and memory of a process over the measured window.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProcessUsage {
    /// The process.
    pub pid: u32,
    /// CPU time used during the measured window, percent of one core (200 = two cores busy).
    pub cpu_percent: f64,
    /// Resident memory at the end of the measured window, MiB.
    pub rss_mb: f64,
    /// Peak resident memory (VmHWM) at the end of the measured window, MiB.
    pub rss_peak_mb: f64,
}

/// The result of a run: the JSON line printed on stdout.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// Deliveries received during the measured window (whenever their message was sent), per
    /// second.
    pub deliveries_per_sec: f64,
    /// Acknowledged publishes sent during the measured window, per second.
    pub publishes_per_sec: f64,
    /// Publish→receive latency.
    pub latency_ms: LatencyMs,
    /// Publishes sent during the measured window.
    pub published: u64,
    /// Of those, how many the server acknowledged as successful (before the end of grace).
    pub acked: u64,
    /// Deliveries expected: each acked publish times the ready subscribers of its channel.
    pub expected: u64,
    /// Expected deliveries that arrived (each message counted once per subscriber).
    pub delivered: u64,
    /// `expected - delivered`: acked messages a subscriber never got by the end of grace.
    pub lost: u64,
    /// Extra copies of counted messages a subscriber had already received.
    pub duplicated: u64,
    /// Counted messages delivered although their publish was not acknowledged (failed or
    /// unanswered); not part of `expected` or `delivered`.
    pub delivered_unacked: u64,
    /// Errors by kind (see docs/bench.md).
    pub errors: BTreeMap<String, u64>,
    /// The server process, when `--server-pid` was given and /proc could be read.
    pub server: Option<ProcessUsage>,
    /// This bench process.
    pub bench: Option<ProcessUsage>,
    /// Subscribers set up in time (the others are left out of `expected`).
    pub subscribers_ready: u64,
    /// Publishers set up in time.
    pub publishers_ready: u64,
    /// Seconds the setup (connect, handshake, subscribe) took.
    pub setup_secs: f64,
    /// Length of the measured window, seconds.
    pub measured_secs: f64,
    /// Set when the run stopped after setup because no publisher or no subscriber was ready.
    pub aborted: Option<String>,
    /// The parameters of the run.
    pub params: Option<BenchArgs>,
}

/// Runs `bayeux bench` on a new runtime, prints the JSON report line on stdout, and returns
/// the exit code: 0 after a run, 1 when the run was aborted, 2 when it could not start.
pub fn run_cli(args: BenchArgs) -> ExitCode {
    // Many connections need many file descriptors: raise the soft limit to the hard one.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bayeux bench: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(report) => {
            match serde_json::to_string(&report) {
                Ok(line) => println!("{line}"),
                Err(e) => {
                    eprintln!("bayeux bench: cannot write the report: {e}");
                    return ExitCode::from(2);
                }
            }
            if report.aborted.is_some() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("bayeux bench: {e}");
            ExitCode::from(2)
        }
    }
}

fn usage(pid: u32, a: &procfs::Sample, b: &procfs::Sample) -> ProcessUsage {
    ProcessUsage {
        pid,
        cpu_percent: round2(procfs::cpu_percent(a, b)),
        rss_mb: round2(b.rss_kb as f64 / 1024.0),
        rss_peak_mb: round2(b.peak_kb as f64 / 1024.0),
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Runs the benchmark and returns its report. Needs a multi-threaded Tokio runtime or a
/// current-thread one alike; every phase is bounded in time.
pub async fn run(args: BenchArgs) -> Result<Report, BenchError> {
    args.validate()?;
    let secs = BenchArgs::secs;
    let target = Arc::new(
        net::Target::resolve(&args.url, args.sources()?, secs(args.connect_timeout)).await?,
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let (start_tx, start_rx) = watch::channel(None);
    let n = args.subscribers;
    let p = args.publishers;
    let ctx = Arc::new(Ctx {
        channels: args.channel_names(),
        target,
        timeline: Timeline::new(),
        errors: Errors::default(),
        latency: Latencies::new(16),
        counters: Counters::default(),
        setup_open: Mutex::new(true),
        setup_slots: Semaphore::new(args.setup_concurrency),
        seq: AtomicU64::new(0),
        start: start_rx,
        stop: stop_rx,
        pad: "x".repeat(args.payload),
        request_timeout: secs(args.request_timeout),
        args: args.clone(),
    });
    let progress = progress::Progress::start(ctx.clone());

    // Setup: every client connects, handshakes, subscribes.
    let setup_began = Instant::now();
    let subs: Vec<Arc<SubShared>> = (0..n)
        .map(|i| {
            Arc::new(SubShared {
                index: i,
                channel: i % args.channels,
                state: Mutex::new(Default::default()),
            })
        })
        .collect();
    let pubs: Vec<Arc<PubShared>> = (0..p).map(|_| Arc::new(PubShared::default())).collect();
    let mut tasks = JoinSet::new();
    for s in &subs {
        tasks.spawn(client::subscriber(ctx.clone(), s.clone()));
    }
    for a in &pubs {
        tasks.spawn(client::publisher(ctx.clone(), a.clone()));
    }
    let setup_deadline = setup_began + secs(args.setup_timeout);
    loop {
        let c = &ctx.counters;
        let done = c.subs_ready.load(Ordering::Relaxed)
            + c.pubs_ready.load(Ordering::Relaxed)
            + c.setup_failed.load(Ordering::Relaxed);
        if done >= (n + p) as u64 || Instant::now() >= setup_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    *ctx.setup_open.lock() = false;
    let setup_secs = setup_began.elapsed().as_secs_f64();
    let subs_ready = ctx.counters.subs_ready.load(Ordering::Relaxed);
    let pubs_ready = ctx.counters.pubs_ready.load(Ordering::Relaxed);
    let aborted = if pubs_ready == 0 {
        Some("no publisher was set up".to_owned())
    } else if n > 0 && subs_ready == 0 {
        Some("no subscriber was set up".to_owned())
    } else {
        None
    };

    // Warm-up, measured window, grace.
    let mut server = None;
    let mut bench = None;
    if aborted.is_none() {
        let warm = Instant::now();
        let measure_start = warm + secs(args.warmup);
        let measure_end = measure_start + secs(args.duration);
        let grace_end = measure_end + secs(args.grace);
        ctx.timeline.set_window(measure_start, measure_end);
        progress.set_phases(warm, measure_start, measure_end, grace_end);
        let _ = start_tx.send(Some(warm));
        tokio::time::sleep_until(measure_start.into()).await;
        let me = std::process::id();
        let server_before = args.server_pid.map(procfs::sample);
        let bench_before = procfs::sample(me).ok();
        tokio::time::sleep_until(measure_end.into()).await;
        if let (Some(pid), Some(before)) = (args.server_pid, server_before) {
            match (before, procfs::sample(pid)) {
                (Ok(a), Ok(b)) => server = Some(usage(pid, &a, &b)),
                _ => ctx.errors.inc("server_stats"),
            }
        }
        if let (Some(a), Ok(b)) = (bench_before, procfs::sample(me)) {
            bench = Some(usage(me, &a, &b));
        }
        tokio::time::sleep_until(grace_end.into()).await;
    }
    ctx.timeline.close();
    progress.finish();
    let _ = stop_tx.send(true);

    // Clean disconnect, bounded.
    let teardown = secs(args.request_timeout) + Duration::from_secs(5);
    let _ = tokio::time::timeout(teardown, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();

    let mut report = tally(&ctx, &subs, &pubs);
    report.server = server;
    report.bench = bench;
    report.subscribers_ready = subs_ready;
    report.publishers_ready = pubs_ready;
    report.setup_secs = round3(setup_secs);
    report.aborted = aborted;
    report.params = Some(args);
    Ok(report)
}

/// Counts expected, delivered, lost and duplicated from what the subscribers saw.
fn tally(ctx: &Ctx, subs: &[Arc<SubShared>], pubs: &[Arc<PubShared>]) -> Report {
    let k = ctx.channels.len() as u64;
    let mut acked_bits = vec![BitSet::default(); k as usize];
    let mut acked_per_channel = vec![0u64; k as usize];
    for p in pubs {
        for &seq in p.acked.lock().iter() {
            let c = (seq % k) as usize;
            if acked_bits[c].insert(seq / k) {
                acked_per_channel[c] += 1;
            }
        }
    }
    let mut ready_per_channel = vec![0u64; k as usize];
    let (mut delivered, mut delivered_unacked, mut duplicated) = (0, 0, 0);
    for s in subs {
        let st = s.state.lock();
        if !st.ready {
            continue;
        }
        let got = st.seen.count_and(&acked_bits[s.channel]);
        ready_per_channel[s.channel] += 1;
        delivered += got;
        delivered_unacked += st.seen.len() - got;
        duplicated += st.duplicates;
    }
    let expected: u64 = acked_per_channel
        .iter()
        .zip(&ready_per_channel)
        .map(|(a, r)| a * r)
        .sum();
    let acked: u64 = acked_per_channel.iter().sum();
    let measured = ctx.args.duration;
    let h = ctx.latency.merged();
    let ms = |us: u64| round3(us as f64 / 1000.0);
    let latency_ms = if h.is_empty() {
        LatencyMs::default()
    } else {
        LatencyMs {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
            mean: round3(h.mean() / 1000.0),
            count: h.len(),
        }
    };
    Report {
        deliveries_per_sec: round2(
            ctx.counters.received_in_window.load(Ordering::Relaxed) as f64 / measured,
        ),
        publishes_per_sec: round2(acked as f64 / measured),
        latency_ms,
        published: ctx.counters.published_counted.load(Ordering::Relaxed),
        acked,
        expected,
        delivered,
        lost: expected.saturating_sub(delivered),
        duplicated,
        delivered_unacked,
        errors: ctx.errors.snapshot(),
        measured_secs: measured,
        ..Report::default()
    }
}
