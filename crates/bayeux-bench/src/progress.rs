//! Progress on stderr: a bar on a terminal, a line every few seconds otherwise.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use parking_lot::Mutex;
use tokio::task::JoinHandle;

use crate::client::Ctx;

type Phases = (Instant, Instant, Instant, Instant);

struct Shared {
    ctx: Arc<Ctx>,
    phases: Mutex<Option<Phases>>,
    bar: Option<ProgressBar>,
}

impl Shared {
    fn line(&self) -> (String, Option<(u64, u64)>) {
        let c = &self.ctx.counters;
        let counts = format!(
            "sent {} acked {} received {} errors {}",
            c.published_total.load(Ordering::Relaxed),
            c.acked_total.load(Ordering::Relaxed),
            c.received.load(Ordering::Relaxed),
            self.ctx.errors.total()
        );
        let Some((warm, start, end, grace)) = *self.phases.lock() else {
            let a = &self.ctx.args;
            return (
                format!(
                    "setup: subscribers {}/{} publishers {}/{} failed {}",
                    c.subs_ready.load(Ordering::Relaxed),
                    a.subscribers,
                    c.pubs_ready.load(Ordering::Relaxed),
                    a.publishers,
                    c.setup_failed.load(Ordering::Relaxed)
                ),
                None,
            );
        };
        let now = Instant::now();
        let (name, from, to) = if now < start {
            ("warm-up", warm, start)
        } else if now < end {
            ("measure", start, end)
        } else {
            ("grace", end, grace)
        };
        let done = now.min(to).duration_since(from).as_secs_f64();
        let total = to.duration_since(from).as_secs_f64();
        let pos = now.min(grace).duration_since(warm).as_millis() as u64;
        let len = grace.duration_since(warm).as_millis() as u64;
        (
            format!("{name} {done:.1}/{total:.1}s {counts}"),
            Some((pos, len)),
        )
    }
}

/// The progress reporter of one run.
pub(crate) struct Progress {
    shared: Option<Arc<Shared>>,
    task: Option<JoinHandle<()>>,
}

impl Progress {
    pub(crate) fn start(ctx: Arc<Ctx>) -> Progress {
        if ctx.args.no_progress {
            return Progress {
                shared: None,
                task: None,
            };
        }
        let tty = std::io::stderr().is_terminal();
        let bar = tty.then(|| {
            let bar = ProgressBar::with_draw_target(Some(1), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{bar:30}] {wide_msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar
        });
        let shared = Arc::new(Shared {
            ctx,
            phases: Mutex::new(None),
            bar,
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            let every = if tty {
                Duration::from_millis(200)
            } else {
                Duration::from_secs(5)
            };
            loop {
                tokio::time::sleep(every).await;
                let (msg, pos) = s.line();
                match &s.bar {
                    Some(bar) => {
                        if let Some((pos, len)) = pos {
                            bar.set_length(len.max(1));
                            bar.set_position(pos);
                        }
                        bar.set_message(msg);
                    }
                    None => eprintln!("bench: {msg}"),
                }
            }
        });
        Progress {
            shared: Some(shared),
            task: Some(task),
        }
    }

    /// The phases are known: warm-up start, measured window start and end, grace end.
    pub(crate) fn set_phases(&self, warm: Instant, start: Instant, end: Instant, grace: Instant) {
        if let Some(s) = &self.shared {
            *s.phases.lock() = Some((warm, start, end, grace));
        }
    }

    /// Stops reporting and clears the bar.
    pub(crate) fn finish(&self) {
        if let Some(t) = &self.task {
            t.abort();
        }
        if let Some(bar) = self.shared.as_ref().and_then(|s| s.bar.as_ref()) {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
