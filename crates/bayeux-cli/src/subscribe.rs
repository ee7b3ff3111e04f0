//! `bayeux subscribe`: one JSON line per event on stdout, everything else on stderr.
//!
//! Checkpoints (`--replay-file`) are written by this command, not by the library: a batch of
//! events is checkpointed durably (write, fsync, rename) *before* its lines are written to
//! stdout, so a process killed at any moment resumes with no repeat. The only loss window is
//! the few microseconds between the checkpoint's rename and the `write(2)` of the lines.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bayeux_client::ext::replay::{FileReplayStore, ReplayStore, replay_id_of};
use bayeux_client::{BackoffPolicy, Event, Message, Replay, ReplayFallback};
use bayeux_protocol::ChannelName;
use clap::{Args, ValueEnum};
use futures::stream::{BoxStream, SelectAll};
use futures::{FutureExt, StreamExt};

use crate::remote::{
    EndpointArgs, Failure, Log, SalesforceArgs, TransportArg, describe, init_tracing,
    parse_duration, resolve, signal,
};

/// `--replay-fallback`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum FallbackArg {
    /// Subscribe again with -2: nothing is missed; retained events may arrive again.
    All,
    /// Subscribe again with -1: events published meanwhile are missed.
    New,
    /// Stop with exit status 1.
    Fail,
}

/// Subscribes and prints every event as one JSON line (the whole Bayeux message) on stdout,
/// flushed per line. Progress and every connection state change go to stderr. Exit status:
/// 0 when it ended by --max-events, --duration, Ctrl-C or SIGTERM; 1 when the client gave up
/// or a subscription was refused; 2 for bad arguments.
#[derive(Args, Debug)]
pub(crate) struct SubscribeArgs {
    /// Channels or patterns (`/a/*`, `/a/**`); Salesforce: /event/X__e, /topic/X, /data/…,
    /// /u/X. An event matching several is printed once.
    #[arg(required = true, value_name = "CHANNEL")]
    channels: Vec<String>,
    /// Where to start: -1 (or `new`): new events only; -2 (or `all`): every retained event;
    /// N: the events after replay ID N. Overrides --replay-file's position. [default: resume
    /// after the position in --replay-file, else -1]
    #[arg(long, allow_hyphen_values = true, value_parser = parse_replay, value_name = "-1|-2|N")]
    replay: Option<Replay>,
    /// A JSON file of the last replay ID printed per channel; written (atomically, fsynced)
    /// before each batch of lines is printed, so a restarted process resumes with no gap and
    /// no repeat.
    #[arg(long, env = "BAYEUX_REPLAY_FILE", value_name = "FILE")]
    replay_file: Option<PathBuf>,
    /// What to do when the server refuses a replay ID (outside retention).
    #[arg(long, value_enum, default_value = "all")]
    replay_fallback: FallbackArg,
    /// Connection type.
    #[arg(long, value_enum, default_value = "auto")]
    transport: TransportArg,
    /// Stop (exit status 0) after printing this many events.
    #[arg(long, value_name = "N")]
    max_events: Option<u64>,
    /// Stop (exit status 0) after this long: seconds, or `90s`, `2m`…
    #[arg(long, value_parser = parse_duration, value_name = "S")]
    duration: Option<Duration>,
    /// Watchdog: how long beyond the server's advised timeout a held connect may take before
    /// it is aborted and retried.
    #[arg(long, value_parser = parse_duration, default_value = "10", value_name = "S")]
    network_allowance: Duration,
    /// Watchdog: stalled connects in a row before handshaking afresh.
    #[arg(long, default_value_t = 2, value_name = "N")]
    max_stalls: u32,
    /// Give up (exit status 1) after this many consecutive failures [default: never].
    #[arg(long, value_name = "N")]
    give_up_after: Option<u32>,
    /// Longest wait between retries (the backoff starts at 0.5 s and doubles, with jitter).
    #[arg(long, value_parser = parse_duration, default_value = "30", value_name = "S")]
    max_backoff: Duration,
    /// Bounds each request but the held connect, and each login.
    #[arg(long, value_parser = parse_duration, default_value = "30", value_name = "S")]
    request_timeout: Duration,
    /// Print a progress line on stderr this often (0: never).
    #[arg(long, value_parser = parse_duration, default_value = "10", value_name = "S")]
    progress_interval: Duration,
    /// No progress or state lines on stderr (errors are still printed).
    #[arg(short, long)]
    quiet: bool,
    // Flattened last: their help headings would otherwise carry over to the options above.
    #[command(flatten)]
    endpoint: EndpointArgs,
    #[command(flatten)]
    salesforce: SalesforceArgs,
}

fn parse_replay(s: &str) -> Result<Replay, String> {
    match s {
        "new" | "-1" => Ok(Replay::New),
        "all" | "-2" => Ok(Replay::All),
        n => match n.parse::<i64>() {
            Ok(n) if n >= 0 => Ok(Replay::After(n)),
            _ => Err(format!(
                "{s:?}: expected -1, -2, new, all or a replay ID ≥ 0"
            )),
        },
    }
}

/// Runs `bayeux subscribe`.
pub(crate) fn run(args: SubscribeArgs) -> ExitCode {
    init_tracing();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => return Failure::Runtime(format!("cannot start the runtime: {e}")).report(),
    };
    let result = runtime.block_on(subscribe(args));
    // The client's tasks may still hold a connect open; do not wait for them.
    runtime.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.report(),
    }
}

/// One subscription's stream, tagged with its index; `None` marks its end.
type Tagged = BoxStream<'static, (usize, Option<Message>)>;

/// Where each subscription stands, for its checkpoint.
struct Position {
    name: String,
    pattern: Option<ChannelName>,
    alive: bool,
    /// The last replay ID received per concrete channel.
    last: HashMap<String, i64>,
}

impl Position {
    fn matches(&self, channel: &str) -> bool {
        match &self.pattern {
            Some(p) => p.matches(channel),
            None => self.name == channel,
        }
    }

    /// The replay ID to resume after: for a pattern, the lowest of its channels' (replay IDs
    /// are per channel, so a restart may repeat events of the others, never skip one).
    fn checkpoint(&self) -> Option<i64> {
        if self.pattern.as_ref().is_some_and(ChannelName::is_wildcard) {
            self.last.values().copied().min()
        } else {
            self.last.get(&self.name).copied()
        }
    }
}

async fn subscribe(args: SubscribeArgs) -> Result<(), Failure> {
    let log = Log::new(args.quiet);
    if args.max_events == Some(0) {
        return Err(Failure::Usage("--max-events must be at least 1".into()));
    }
    for c in &args.channels {
        let base = c.split_once('?').map_or(c.as_str(), |(b, _)| b);
        let name =
            ChannelName::new(base).map_err(|e| Failure::Usage(format!("channel {c:?}: {e}")))?;
        if c.starts_with("/meta/") || c.starts_with("/service/") || name.as_str() == "/" {
            return Err(Failure::Usage(format!(
                "cannot subscribe to {c}: not a broadcast channel"
            )));
        }
    }
    let store = match &args.replay_file {
        Some(path) => Some(Arc::new(FileReplayStore::open(path).map_err(|e| {
            Failure::Usage(format!("--replay-file {}: {e}", path.display()))
        })?)),
        None => None,
    };
    let target = resolve(&args.endpoint, &args.salesforce, args.request_timeout).await?;
    let fallback = match args.replay_fallback {
        FallbackArg::All => ReplayFallback::All,
        FallbackArg::New => ReplayFallback::New,
        FallbackArg::Fail => ReplayFallback::Fail,
    };
    let mut builder = target
        .builder()
        .transport(args.transport.into())
        .network_allowance(args.network_allowance)
        .max_stalls(args.max_stalls)
        .request_timeout(args.request_timeout)
        .replay_fallback(fallback)
        .backoff(BackoffPolicy {
            initial: Duration::from_millis(500).min(args.max_backoff),
            max: args.max_backoff,
            jitter: true,
        });
    if let Some(n) = args.give_up_after {
        builder = builder.give_up_after(n);
    }
    let client = builder
        .build()
        .map_err(|e| Failure::Usage(format!("{}: {e}", target.url)))?;
    let mut events = client.events();
    log.info(&format!("connecting to {}", target.url));

    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut streams: SelectAll<Tagged> = SelectAll::new();
    let mut positions = Vec::new();
    let stop = signal().shared();
    for (i, channel) in args.channels.iter().enumerate() {
        let stored = match &store {
            Some(s) => s
                .load(channel)
                .map_err(|e| Failure::Runtime(format!("replay file: {e}")))?,
            None => None,
        };
        let from = match (args.replay, stored) {
            (Some(r), _) => r,
            (None, Some(id)) => Replay::After(id),
            (None, None) => Replay::New,
        };
        // Connection trouble while subscribing is reported as it happens.
        let subscribing = client.subscribe(channel, from);
        tokio::pin!(subscribing);
        let mut gave_up = None;
        let subscribed = loop {
            tokio::select! {
                biased;
                _ = stop.clone() => {
                    log.info("stopped by a signal before subscribing");
                    client_stop(&client, &log).await;
                    return Ok(());
                }
                _ = sleep_until(deadline) => {
                    client_stop(&client, &log).await;
                    return Err(Failure::Runtime(format!(
                        "--duration ended before the subscription to {channel} was confirmed"
                    )));
                }
                r = &mut subscribing => break r,
                Some(e) = events.next() => {
                    log.info(&describe(&e));
                    if let Event::GaveUp { reason } = e {
                        gave_up = Some(reason);
                    }
                }
            }
        };
        let sub = match subscribed {
            Ok(s) => s,
            Err(e) => {
                let why = match gave_up {
                    Some(r) => Some(r),
                    None => gave_up_reason(&mut events).await,
                };
                client_stop(&client, &log).await;
                return Err(Failure::Runtime(match why {
                    Some(reason) => format!("gave up: {reason}"),
                    None => format!("subscribe to {channel}: {e}"),
                }));
            }
        };
        let wire = match from {
            Replay::After(n) => n.to_string(),
            Replay::All => "-2 (all retained)".into(),
            _ => "-1 (new events)".into(),
        };
        log.info(&format!("subscribed to {channel} from {wire}"));
        let base = channel.split_once('?').map_or(channel.as_str(), |(b, _)| b);
        positions.push(Position {
            name: channel.clone(),
            pattern: ChannelName::new(base).ok(),
            alive: true,
            last: match from {
                Replay::After(n) => HashMap::from([(channel.clone(), n)]),
                _ => HashMap::new(),
            },
        });
        let tagged = sub
            .map(move |m| (i, Some(m)))
            .chain(futures::stream::once(async move { (i, None) }))
            .boxed();
        streams.push(tagged);
    }

    let mut printed: u64 = 0;
    let mut progress = (!args.progress_interval.is_zero()).then(|| {
        let mut t = tokio::time::interval(args.progress_interval);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    if let Some(p) = progress.as_mut() {
        p.reset();
    }
    let mut last_progress = 0;
    let mut stdout = std::io::stdout();
    let outcome: Result<&str, Failure> = loop {
        tokio::select! {
            biased;
            _ = stop.clone() => break Ok("stopped by a signal"),
            _ = sleep_until(deadline) => break Ok("--duration reached"),
            event = events.next() => match event {
                Some(Event::GaveUp { reason }) => {
                    log.info(&format!("gave up: {reason}"));
                    break Err(Failure::Runtime(format!("gave up: {reason}")));
                }
                Some(e) => log.info(&describe(&e)),
                None => break Err(Failure::Runtime("the client stopped".into())),
            },
            item = streams.next() => {
                let Some(first) = item else {
                    let why = gave_up_reason(&mut events).await;
                    break Err(Failure::Runtime(match why {
                        Some(reason) => format!("gave up: {reason}"),
                        None => "every subscription ended".into(),
                    }));
                };
                // Everything already waiting goes into the same batch: one checkpoint write.
                let mut batch = vec![first];
                while let Some(Some(item)) = streams.next().now_or_never() {
                    batch.push(item);
                }
                let remaining = args.max_events.map(|m| m - printed);
                let lines = take_batch(&mut positions, batch, remaining);
                if let Some(store) = &store {
                    save(store, &positions).await?;
                }
                if let Err(e) = write_lines(&mut stdout, &lines) {
                    break Err(Failure::Runtime(format!("stdout: {e}")));
                }
                printed += lines.len() as u64;
                if args.max_events.is_some_and(|m| printed >= m) {
                    break Ok("--max-events reached");
                }
                if positions.iter().all(|p| !p.alive) {
                    break Err(Failure::Runtime("every subscription ended".into()));
                }
            },
            _ = tick(&mut progress) => {
                if printed != last_progress {
                    log.info(&format!("{printed} events so far"));
                    last_progress = printed;
                }
            }
        }
    };
    if let Ok(why) = &outcome {
        log.info(&format!("{printed} events; {why}"));
    }
    client_stop(&client, &log).await;
    outcome.map(|_| ())
}

/// Sorts a batch: lines to print (each event once), positions advanced, ends noted.
fn take_batch(
    positions: &mut [Position],
    batch: Vec<(usize, Option<Message>)>,
    mut remaining: Option<u64>,
) -> Vec<String> {
    let mut lines = Vec::new();
    for (i, item) in batch {
        let Some(message) = item else {
            positions[i].alive = false;
            continue;
        };
        if remaining == Some(0) {
            // Not printed, so not checkpointed: a restart gets it again.
            continue;
        }
        // Every stream whose pattern matches gets its own copy: print the first one's.
        let owner = positions
            .iter()
            .position(|p| p.alive && p.matches(&message.channel));
        if let Some(id) = replay_id_of(&message) {
            positions[i].last.insert(message.channel.clone(), id);
        }
        if owner.is_some_and(|o| o != i) {
            continue;
        }
        let mut line = serde_json::to_string(&message).unwrap_or_else(|e| {
            serde_json::json!({"error": format!("cannot print the message: {e}")}).to_string()
        });
        line.push('\n');
        lines.push(line);
        remaining = remaining.map(|r| r - 1);
    }
    lines
}

async fn save(store: &Arc<FileReplayStore>, positions: &[Position]) -> Result<(), Failure> {
    let updates: Vec<(String, i64)> = positions
        .iter()
        .filter_map(|p| Some((p.name.clone(), p.checkpoint()?)))
        .collect();
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        for (channel, id) in updates {
            store.save(&channel, id)?;
        }
        Ok::<_, bayeux_client::ext::replay::StoreError>(())
    })
    .await
    .map_err(|e| Failure::Runtime(format!("replay file: {e}")))?
    .map_err(|e| Failure::Runtime(format!("replay file: {e}")))
}

/// Writes each line with its own `write(2)` (atomic on a pipe for lines up to 4 KiB), flushed.
fn write_lines(stdout: &mut std::io::Stdout, lines: &[String]) -> std::io::Result<()> {
    let mut out = stdout.lock();
    for line in lines {
        out.write_all(line.as_bytes())?;
        out.flush()?;
    }
    Ok(())
}

/// After the streams ended: the client's reason for giving up, if that is why.
async fn gave_up_reason(events: &mut bayeux_client::Events) -> Option<String> {
    let wait = async {
        while let Some(e) = events.next().await {
            if let Event::GaveUp { reason } = e {
                return Some(reason);
            }
        }
        None
    };
    tokio::time::timeout(Duration::from_secs(1), wait)
        .await
        .ok()
        .flatten()
}

async fn client_stop(client: &bayeux_client::Client, log: &Log) {
    if tokio::time::timeout(Duration::from_secs(5), client.disconnect())
        .await
        .is_err()
    {
        log.info("the server did not answer the disconnect; leaving anyway");
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position(name: &str) -> Position {
        Position {
            name: name.into(),
            pattern: ChannelName::new(name).ok(),
            alive: true,
            last: HashMap::new(),
        }
    }

    fn event(channel: &str, id: i64) -> Message {
        let mut m = Message::new(channel);
        m.data = Some(serde_json::json!({"n": id}));
        m.ext_insert("replay", id.into());
        m
    }

    #[test]
    fn replay_values() {
        assert_eq!(parse_replay("-1").unwrap(), Replay::New);
        assert_eq!(parse_replay("all").unwrap(), Replay::All);
        assert_eq!(parse_replay("42").unwrap(), Replay::After(42));
        assert!(parse_replay("-3").is_err());
        assert!(parse_replay("x").is_err());
    }

    #[test]
    fn overlapping_subscriptions_print_once_and_both_advance() {
        let mut p = vec![position("/a/*"), position("/a/b")];
        let lines = take_batch(
            &mut p,
            vec![
                (0, Some(event("/a/b", 1))),
                (1, Some(event("/a/b", 1))),
                (0, Some(event("/a/c", 5))),
            ],
            None,
        );
        assert_eq!(lines.len(), 2);
        assert_eq!(
            p[0].checkpoint(),
            Some(1),
            "a pattern resumes at its lowest"
        );
        assert_eq!(p[1].checkpoint(), Some(1));
        // The first stream ends: the second one's copies are printed now.
        let lines = take_batch(
            &mut p,
            vec![(0, None), (1, Some(event("/a/b", 2)))],
            Some(5),
        );
        assert_eq!(lines.len(), 1);
        assert!(!p[0].alive);
    }

    #[test]
    fn max_events_stops_mid_batch_without_checkpointing_the_rest() {
        let mut p = vec![position("/x")];
        let lines = take_batch(
            &mut p,
            vec![(0, Some(event("/x", 1))), (0, Some(event("/x", 2)))],
            Some(1),
        );
        assert_eq!(lines.len(), 1);
        assert_eq!(p[0].checkpoint(), Some(1));
    }
}
