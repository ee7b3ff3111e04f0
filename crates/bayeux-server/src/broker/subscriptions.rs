//! The subscription index: pattern → subscribed sessions.
//!
//! A concrete channel `/a/b` is matched by at most `depth + 2` patterns (`/a/b`, `/a/*`, `/a/**`,
//! `/**`), so finding the subscribers of a message costs that many hash lookups whatever the
//! number of channels and subscriptions.

use std::collections::HashMap;
use std::sync::Arc;

use bayeux_protocol::channel::for_each_candidate_pattern;

use super::Session;

#[derive(Default)]
pub(crate) struct SubscriptionIndex {
    by_pattern: HashMap<Arc<str>, HashMap<u64, Arc<Session>>>,
}

impl SubscriptionIndex {
    /// Adds `session` under `pattern`. Returns false if it was already there.
    pub(crate) fn add(&mut self, pattern: &Arc<str>, session: &Arc<Session>) -> bool {
        self.by_pattern
            .entry(pattern.clone())
            .or_default()
            .insert(session.seq, session.clone())
            .is_none()
    }

    /// Removes `session` from `pattern`.
    pub(crate) fn remove(&mut self, pattern: &str, session_seq: u64) {
        if let Some(set) = self.by_pattern.get_mut(pattern) {
            set.remove(&session_seq);
            if set.is_empty() {
                self.by_pattern.remove(pattern);
            }
        }
    }

    /// Every session subscribed to a pattern matching `channel`, each once.
    pub(crate) fn matching(&self, channel: &str) -> Vec<Arc<Session>> {
        let mut sets = Vec::new();
        for_each_candidate_pattern(channel, |p| {
            if let Some(set) = self.by_pattern.get(p) {
                sets.push(set);
            }
        });
        let mut sets = sets.into_iter();
        let Some(first) = sets.next() else {
            return Vec::new();
        };
        let mut out: Vec<Arc<Session>> = first.values().cloned().collect();
        let rest: Vec<_> = sets.collect();
        if !rest.is_empty() {
            // A session may be reached through several patterns: deliver once.
            let mut seen: std::collections::HashSet<u64> = first.keys().copied().collect();
            for set in rest {
                for (seq, session) in set {
                    if seen.insert(*seq) {
                        out.push(session.clone());
                    }
                }
            }
        }
        out
    }

    /// Number of distinct patterns with subscribers.
    pub(crate) fn patterns(&self) -> usize {
        self.by_pattern.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_session() {
        let mut index = SubscriptionIndex::default();
        let a = Arc::new(Session::new("a".into(), 1));
        let b = Arc::new(Session::new("b".into(), 2));
        for p in ["/x/y", "/x/*", "/x/**", "/**"] {
            index.add(&Arc::from(p), &a);
        }
        index.add(&Arc::from("/x/*"), &b);
        let mut got: Vec<_> = index
            .matching("/x/y")
            .iter()
            .map(|s| s.id().to_owned())
            .collect();
        got.sort();
        assert_eq!(got, ["a", "b"]);
        assert_eq!(index.matching("/x/y/z").len(), 1);
        assert!(index.matching("/z").iter().any(|s| s.id() == "a"));
        index.remove("/**", 1);
        assert!(index.matching("/z").is_empty());
        assert_eq!(index.patterns(), 3);
    }
}
