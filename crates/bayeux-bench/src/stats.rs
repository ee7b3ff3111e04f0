//! What the run counts: the timeline, errors by kind, latencies, and which messages each
//! subscriber saw.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use hdrhistogram::Histogram;
use parking_lot::Mutex;

/// Highest per-channel message index tracked (seq / K); beyond it a message is foreign.
pub(crate) const MAX_INDEX: u64 = 1 << 32;

/// The phases, in nanoseconds since the bench started (the `t` in every message).
pub(crate) struct Timeline {
    epoch: Instant,
    measure_start: AtomicU64,
    measure_end: AtomicU64,
    closed: AtomicBool,
}

impl Timeline {
    pub(crate) fn new() -> Self {
        Timeline {
            epoch: Instant::now(),
            measure_start: AtomicU64::new(u64::MAX),
            measure_end: AtomicU64::new(u64::MAX),
            closed: AtomicBool::new(false),
        }
    }

    /// Nanoseconds since the bench started.
    pub(crate) fn now_ns(&self) -> u64 {
        self.ns_at(Instant::now())
    }

    /// `at` in nanoseconds since the bench started.
    pub(crate) fn ns_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Sets the measured window (until then nothing is counted).
    pub(crate) fn set_window(&self, start: Instant, end: Instant) {
        self.measure_start
            .store(self.ns_at(start), Ordering::Release);
        self.measure_end.store(self.ns_at(end), Ordering::Release);
    }

    /// `[start, end)` of the measured window, in ns.
    pub(crate) fn window(&self) -> (u64, u64) {
        (
            self.measure_start.load(Ordering::Acquire),
            self.measure_end.load(Ordering::Acquire),
        )
    }

    /// Ends the counting (the grace period is over).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// Error counts by kind.
#[derive(Default)]
pub(crate) struct Errors {
    counts: Mutex<BTreeMap<String, u64>>,
}

impl Errors {
    pub(crate) fn add(&self, kind: &str, n: u64) {
        let mut c = self.counts.lock();
        match c.get_mut(kind) {
            Some(v) => *v += n,
            None => {
                c.insert(kind.to_owned(), n);
            }
        }
    }

    pub(crate) fn inc(&self, kind: &str) {
        self.add(kind, 1);
    }

    pub(crate) fn total(&self) -> u64 {
        self.counts.lock().values().sum()
    }

    pub(crate) fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counts.lock().clone()
    }
}

/// A growable set of integers, stored from the lowest word used (the warm-up's messages,
/// below the first counted one, take no room).
#[derive(Default, Clone)]
pub(crate) struct BitSet {
    /// Index of the first word in `words`.
    base: u64,
    words: Vec<u64>,
}

impl BitSet {
    /// Adds `i`; false if it was there already.
    pub(crate) fn insert(&mut self, i: u64) -> bool {
        let w = i / 64;
        if self.words.is_empty() {
            self.base = w;
        } else if w < self.base {
            let grow = (self.base - w) as usize;
            self.words.splice(0..0, std::iter::repeat_n(0, grow));
            self.base = w;
        }
        let at = (w - self.base) as usize;
        if at >= self.words.len() {
            self.words.resize(at + 1, 0);
        }
        let bit = 1u64 << (i % 64);
        let was = self.words[at] & bit != 0;
        self.words[at] |= bit;
        !was
    }

    pub(crate) fn len(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// How many members are also in `other`.
    pub(crate) fn count_and(&self, other: &BitSet) -> u64 {
        let mut n = 0;
        for (j, a) in self.words.iter().enumerate() {
            let w = self.base + j as u64;
            if w < other.base {
                continue;
            }
            match other.words.get((w - other.base) as usize) {
                Some(b) => n += u64::from((a & b).count_ones()),
                None => break,
            }
        }
        n
    }
}

/// Publish→receive latencies in microseconds, in a few shards to spread lock traffic.
pub(crate) struct Latencies {
    shards: Vec<Mutex<Histogram<u64>>>,
}

fn histogram() -> Histogram<u64> {
    // 1 µs to one hour, three significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

impl Latencies {
    pub(crate) fn new(shards: usize) -> Self {
        Latencies {
            shards: (0..shards.max(1))
                .map(|_| Mutex::new(histogram()))
                .collect(),
        }
    }

    pub(crate) fn record(&self, shard: usize, micros: &[u64]) {
        let mut h = self.shards[shard % self.shards.len()].lock();
        for &v in micros {
            h.saturating_record(v);
        }
    }

    pub(crate) fn merged(&self) -> Histogram<u64> {
        let mut all = histogram();
        for s in &self.shards {
            // Same bounds on both sides: adding cannot fail.
            let _ = all.add(&*s.lock());
        }
        all
    }
}

/// What one subscriber saw.
#[derive(Default)]
pub(crate) struct SubState {
    /// Set up in time: counted in the expected deliveries.
    pub(crate) ready: bool,
    /// Counted messages received (by seq / K).
    pub(crate) seen: BitSet,
    /// Counted messages received again.
    pub(crate) duplicates: u64,
}

/// One subscriber's identity and tallies, shared with its task.
pub(crate) struct SubShared {
    pub(crate) index: usize,
    pub(crate) channel: usize,
    pub(crate) state: Mutex<SubState>,
}

/// One publisher's acknowledged, counted publishes.
#[derive(Default)]
pub(crate) struct PubShared {
    pub(crate) acked: Mutex<Vec<u64>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitset() {
        let mut a = BitSet::default();
        assert!(a.insert(3));
        assert!(!a.insert(3));
        assert!(a.insert(200));
        let mut b = BitSet::default();
        b.insert(200);
        b.insert(7);
        assert_eq!(a.len(), 2);
        assert_eq!(a.count_and(&b), 1);
        assert_eq!(b.count_and(&a), 1);
        // Starting high, then going lower.
        let mut c = BitSet::default();
        assert!(c.insert(10_000));
        assert!(c.insert(5));
        assert!(!c.insert(10_000));
        assert!(c.insert(200));
        assert_eq!(c.len(), 3);
        assert_eq!(c.count_and(&a), 1);
        assert_eq!(a.count_and(&c), 1);
        assert_eq!(c.count_and(&BitSet::default()), 0);
    }

    #[test]
    fn latencies_merge() {
        let l = Latencies::new(4);
        l.record(0, &[100, 200]);
        l.record(5, &[300, 0, u64::MAX]);
        let h = l.merged();
        assert_eq!(h.len(), 5);
        assert!(h.max() >= 3_600_000_000);
    }
}
