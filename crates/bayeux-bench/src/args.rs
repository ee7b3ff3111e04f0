//! The command-line flags of `bayeux bench`.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::BenchError;

const AFTER_HELP: &str = "\
Each message's data is {\"seq\": N, \"t\": NANOS, \"pad\": \"xxx...\"}: a global sequence number
(channel = seq mod K) and its send time in ns since the bench started.

Phases: setup (every client connects, handshakes, subscribes, first /meta/connect), warm-up
(nothing counted), measured window (publishing stops at its end), grace (late deliveries still
count), clean /meta/disconnect.

Output: one JSON line on stdout with deliveries_per_sec, publishes_per_sec,
latency_ms {p50,p90,p99,max,mean,count}, published, acked, expected, delivered, lost,
duplicated, delivered_unacked, errors {kind: count}, server and bench {cpu_percent, rss_mb,
rss_peak_mb}, subscribers_ready, publishers_ready, setup_secs, measured_secs, aborted, params.
Progress goes to stderr. Exit code 0 after a run, 1 if it was aborted (no publisher or no
subscriber set up), 2 on bad arguments. See docs/bench.md.";

/// The transport every bench client (subscribers and publishers) uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// HTTP long-polling: one HTTP/1.1 keep-alive connection per subscriber, whose
    /// `/meta/connect` the server holds.
    LongPolling,
    /// WebSocket: one socket per client; `/meta/connect` is the heartbeat and messages are
    /// pushed.
    Websocket,
}

impl Transport {
    /// The Bayeux connection type name (`long-polling`, `websocket`).
    pub fn connection_type(self) -> &'static str {
        match self {
            Transport::LongPolling => bayeux_protocol::connection_type::LONG_POLLING,
            Transport::Websocket => bayeux_protocol::connection_type::WEBSOCKET,
        }
    }
}

/// `bayeux bench`: N subscribers on K channels, P publishers, and a report of deliveries/s,
/// publish→receive latency, lost and duplicated messages and errors as one JSON line on stdout.
///
/// Every published message carries `{"seq": N, "t": NANOS, "pad": "..."}`: a global sequence
/// number (channel = seq mod K) and its send time in nanoseconds since the bench started.
/// Timeline: setup (all clients handshake and subscribe), warm-up (not counted), measured
/// window (publishing stops at its end), grace (deliveries still land), clean disconnect.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
#[command(after_long_help = AFTER_HELP)]
pub struct BenchArgs {
    /// Bayeux endpoint, `http://HOST:PORT/PATH` (`ws://` is accepted too; the transport decides
    /// the scheme actually used). TLS is not supported.
    #[arg(long, default_value = "http://127.0.0.1:8080/cometd")]
    pub url: String,

    /// Transport of every client: `long-polling` (one HTTP/1.1 connection per subscriber, plus
    /// one per publisher and W per publisher for publishes) or `websocket` (one socket per
    /// client).
    #[arg(long, value_enum, default_value_t = Transport::LongPolling)]
    pub transport: Transport,

    /// Number of subscriber clients (N). Subscriber i subscribes to channel i mod K.
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,

    /// Number of channels (K), named `PREFIX/0` … `PREFIX/K-1`. Message seq goes to channel
    /// seq mod K, so publishes go round-robin over the channels.
    #[arg(long, default_value_t = 10)]
    pub channels: usize,

    /// Number of publisher clients (P), each handshaken and kept alive by its own
    /// `/meta/connect` loop.
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,

    /// Target publish rate, messages per second over all publishers together (open loop,
    /// limited by --in-flight). 0 publishes as fast as possible.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,

    /// Publishes in flight per publisher (W): each publisher runs W workers, each waiting for
    /// the ack of its publish before sending the next. Over long-polling every worker has its
    /// own HTTP connection; over WebSocket they share the publisher's socket.
    #[arg(long, default_value_t = 4)]
    pub in_flight: usize,

    /// Size in bytes of the `pad` filler string in each message's data (the data is about 40
    /// bytes more).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,

    /// Warm-up, seconds: clients publish and receive, nothing is counted.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,

    /// Measured window, seconds: messages published in it are counted; publishing stops at its
    /// end.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,

    /// Grace period, seconds, after the measured window: deliveries of counted messages that
    /// arrive in it still count; what has not arrived by its end is lost.
    #[arg(long, default_value_t = 2.0)]
    pub grace: f64,

    /// PID of the server process (on this machine): report its CPU use over the measured
    /// window and its resident memory, from /proc/PID/stat and /proc/PID/status.
    #[arg(long)]
    pub server_pid: Option<u32>,

    /// Local addresses to bind client sockets to, round-robin: a comma-separated list
    /// (`127.0.0.1,127.0.0.2`) or a count N meaning 127.0.0.1 … 127.0.0.1+N-1. Each source
    /// address gives about 28k ephemeral ports, so several let one machine open more than
    /// 60k connections. Default: let the OS choose.
    #[arg(long)]
    pub source_addrs: Option<String>,

    /// Seconds allowed for each TCP connect plus WebSocket upgrade.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,

    /// Seconds allowed for a reply to handshake, subscribe, publish and disconnect (a held
    /// /meta/connect gets the server's advised timeout plus this).
    #[arg(long, default_value_t = 10.0)]
    pub request_timeout: f64,

    /// Seconds allowed for setting up every client (connect, handshake, subscribe, first
    /// /meta/connect); clients not ready by then are left out of the run.
    #[arg(long, default_value_t = 120.0)]
    pub setup_timeout: f64,

    /// Clients set up at the same time (bounds the burst of new connections).
    #[arg(long, default_value_t = 256)]
    pub setup_concurrency: usize,

    /// Prefix of the channel names.
    #[arg(long, default_value = "/bench")]
    pub channel_prefix: String,

    /// Print no progress on stderr.
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Parser)]
#[command(name = "bench", args_override_self = true)]
struct Wrapper {
    #[command(flatten)]
    args: BenchArgs,
}

impl BenchArgs {
    /// Parses flags as the command line would (the first item is the program name), for
    /// tests and embedding. A flag given twice takes its last value.
    ///
    /// ```
    /// let a = bayeux_bench::BenchArgs::from_flags(["bench", "--subscribers", "5"]).unwrap();
    /// assert_eq!(a.subscribers, 5);
    /// ```
    pub fn from_flags<I, T>(flags: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Wrapper::try_parse_from(flags).map(|w| w.args)
    }

    /// Checks the values that clap cannot.
    pub fn validate(&self) -> Result<(), BenchError> {
        let bad = |m: String| Err(BenchError::Args(m));
        if self.channels == 0 {
            return bad("--channels must be at least 1".into());
        }
        if self.publishers == 0 {
            return bad("--publishers must be at least 1".into());
        }
        if self.in_flight == 0 {
            return bad("--in-flight must be at least 1".into());
        }
        if self.setup_concurrency == 0 {
            return bad("--setup-concurrency must be at least 1".into());
        }
        if !(self.rate.is_finite() && self.rate >= 0.0) {
            return bad("--rate must be a number >= 0".into());
        }
        for (name, v) in [
            ("--warmup", self.warmup),
            ("--duration", self.duration),
            ("--grace", self.grace),
            ("--connect-timeout", self.connect_timeout),
            ("--request-timeout", self.request_timeout),
            ("--setup-timeout", self.setup_timeout),
        ] {
            if !(v.is_finite() && (0.0..=86_400.0).contains(&v)) {
                return bad(format!("{name} must be between 0 and 86400 seconds"));
            }
        }
        if self.duration <= 0.0 {
            return bad("--duration must be more than 0".into());
        }
        if !self.channel_prefix.starts_with('/') || self.channel_prefix.ends_with('/') {
            return bad("--channel-prefix must start with / and not end with /".into());
        }
        self.sources()?;
        Ok(())
    }

    /// The source addresses from `--source-addrs` (empty: let the OS choose).
    pub fn sources(&self) -> Result<Vec<IpAddr>, BenchError> {
        match &self.source_addrs {
            None => Ok(Vec::new()),
            Some(s) => parse_sources(s),
        }
    }

    /// The channel names.
    pub fn channel_names(&self) -> Vec<String> {
        (0..self.channels)
            .map(|k| format!("{}/{k}", self.channel_prefix))
            .collect()
    }

    pub(crate) fn secs(v: f64) -> Duration {
        Duration::from_secs_f64(v.max(0.0))
    }
}

/// Parses `--source-addrs`: a count N (127.0.0.1 and the N-1 addresses after it) or a
/// comma-separated list of IP addresses.
///
/// ```
/// use bayeux_bench::parse_sources;
/// assert_eq!(parse_sources("3").unwrap().len(), 3);
/// assert_eq!(parse_sources("127.0.0.1, 127.0.0.9").unwrap()[1].to_string(), "127.0.0.9");
/// assert!(parse_sources("nope").is_err());
/// ```
pub fn parse_sources(s: &str) -> Result<Vec<IpAddr>, BenchError> {
    let s = s.trim();
    if let Ok(n) = s.parse::<u32>() {
        if n == 0 || n > (1 << 24) - 2 {
            return Err(BenchError::Args(format!(
                "--source-addrs count must be between 1 and {}",
                (1u32 << 24) - 2
            )));
        }
        let base = u32::from(Ipv4Addr::new(127, 0, 0, 1));
        return Ok((0..n)
            .map(|i| IpAddr::V4(Ipv4Addr::from(base + i)))
            .collect());
    }
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let ip: IpAddr = part
            .parse()
            .map_err(|_| BenchError::Args(format!("--source-addrs: bad address {part:?}")))?;
        out.push(ip);
    }
    if out.is_empty() {
        return Err(BenchError::Args("--source-addrs is empty".into()));
    }
    let v4 = out[0].is_ipv4();
    if out.iter().any(|ip| ip.is_ipv4() != v4) {
        return Err(BenchError::Args(
            "--source-addrs mixes IPv4 and IPv6".into(),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let a = BenchArgs::from_flags(["bench"]).unwrap();
        a.validate().unwrap();
        assert_eq!(a.transport, Transport::LongPolling);
        assert_eq!(a.channel_names()[9], "/bench/9");
    }

    #[test]
    fn counts_and_lists() {
        let v = parse_sources("300").unwrap();
        assert_eq!(v[0].to_string(), "127.0.0.1");
        assert_eq!(v[255].to_string(), "127.0.1.0");
        assert_eq!(v[299].to_string(), "127.0.1.44");
        assert!(parse_sources("0").is_err());
        assert!(parse_sources("127.0.0.1,::1").is_err());
        assert_eq!(parse_sources("::1").unwrap().len(), 1);
    }

    #[test]
    fn bad_values() {
        for flags in [
            vec!["b", "--channels", "0"],
            vec!["b", "--duration", "0"],
            vec!["b", "--rate=-1"],
            vec!["b", "--channel-prefix", "bench"],
            vec!["b", "--source-addrs", "x"],
        ] {
            let a = BenchArgs::from_flags(&flags).unwrap();
            assert!(a.validate().is_err(), "{flags:?}");
        }
    }
}
