//! Sessions on a shared engine (several nodes, one Redis): any node serves any client.
//!
//! Each session has a record in the engine: its subscriptions, its per-channel cursors (the last
//! replay ID delivered) and an `epoch` that changes whenever a node saves the record after
//! serving the client. Before a node handles a message for a session, it reads the record:
//! - no local copy (the client was served elsewhere, or this node restarted): the node **adopts**
//!   the session: it subscribes it locally and queues the history after its cursors;
//! - a local copy with another epoch (another node served the client since): the copy is stale
//!   (its queue holds what the other node already delivered), so it is rebuilt the same way;
//! - no record: the session ended (disconnected or expired everywhere).
//!
//! After a connect that delivered something, the node writes the record with a new epoch by
//! compare-and-set on the epoch it had ([`Engine::replace_session`]). The cursors it writes are
//! what left the queue for a response (`State::delivered`), not what is queued. If another node
//! changed the record meanwhile, the node merges into the stored record instead (cursors only move
//! forward; its own subscribe or unsubscribe is applied) and leaves its copy stale, so that the
//! next request rebuilds it: no node ever undoes another's change. With the ack extension the
//! record also keeps the newest batch sent and where the confirmed deliveries end (cursor keys
//! `#ack` and `#<channel>`), so that a node adopting the session for a connect that did not
//! confirm that batch sends it again. A connect that delivered nothing writes nothing.
//!
//! Engines that are not shared (memory, disk) skip all of this. Guarantees and costs:
//! `docs/scaleout.md`.
//!
//! [`Engine::replace_session`]: bayeux_engine::Engine::replace_session

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bayeux_engine::SessionRecord;
use bayeux_protocol::ChannelName;
use tokio::time::Instant;

use super::session::{AckState, State};
use super::{Broker, CloseReason, ReplayFrom, Session};

impl Broker {
    /// How long a session record lives without being saved: long enough to outlive a held
    /// connect and the reconnect interval after it.
    fn record_ttl(&self) -> Duration {
        self.config.timeouts.connect_timeout() + self.config.timeouts.max_interval() * 2
    }

    fn record_of(&self, session: &Session) -> SessionRecord {
        let st = session.state.lock();
        let mut extensions = Vec::new();
        if st.replay_ext {
            extensions.push("replay".to_owned());
        }
        if st.ack.is_some() {
            extensions.push("ack".to_owned());
        }
        // What has left the queue, not what is queued: another node adopting the session must
        // re-read what waits here undelivered.
        let mut cursors: BTreeMap<String, u64> = st
            .delivered
            .iter()
            .map(|(c, id)| (c.to_string(), *id))
            .collect();
        // Ack extension: batches sent but not confirmed yet may have been lost with this node.
        // `#ack` is the newest batch sent and `#<channel>` where the confirmed deliveries end,
        // so that a node adopting the session can send them again to a client that says (in
        // its connect) it did not get them.
        if let Some(ack) = &st.ack
            && let Some((_, confirmed)) = ack.before.front()
        {
            cursors.insert(ACK_BATCH.to_owned(), ack.batch);
            for (channel, id) in confirmed {
                cursors.insert(format!("{CONFIRMED}{channel}"), *id);
            }
        }
        SessionRecord {
            client_id: session.id().to_owned(),
            subscriptions: st.subscriptions.iter().map(|s| s.to_string()).collect(),
            cursors,
            extensions,
            epoch: session.epoch.load(Ordering::Acquire),
        }
    }

    fn next_epoch() -> u64 {
        rand::random::<u64>() | 1
    }

    /// Saves the record of a session just handshaken.
    pub(crate) async fn save_record(&self, session: &Session) {
        if !self.shared {
            return;
        }
        let mut record = self.record_of(session);
        record.epoch = Self::next_epoch();
        match self.engine.save_session(&record, self.record_ttl()).await {
            Ok(()) => {
                session.epoch.store(record.epoch, Ordering::Release);
                session.state.lock().record_saved = Some(Instant::now());
            }
            Err(e) => tracing::warn!(client_id = session.id(), error = %e, "saving session failed"),
        }
    }

    /// After a connect was answered: merge what was delivered into the record and save it with
    /// a new epoch, so another node can take over exactly here.
    pub async fn commit_delivery(&self, session: &Session) {
        if !self.shared || session.is_closed() {
            return;
        }
        let (changed, saved) = {
            let st = session.state.lock();
            (
                st.delivered_generation != st.record_generation,
                st.record_saved,
            )
        };
        if !changed {
            // Nothing delivered since the record was written (a hold that timed out, say):
            // leave it as it is, and only keep it alive once it is getting old.
            let refresh = self.config.timeouts.max_interval();
            if saved.is_some_and(|t| t.elapsed() < refresh) {
                return;
            }
            match self
                .engine
                .touch_session(session.id(), self.record_ttl())
                .await
            {
                Ok(()) => session.state.lock().record_saved = Some(Instant::now()),
                Err(e) => {
                    tracing::warn!(client_id = session.id(), error = %e, "touching session failed")
                }
            }
            return;
        }
        self.update_record(session, Change::Delivery).await;
    }

    /// Saves the record of `session` after a subscribe (`added`) or an unsubscribe (`removed`)
    /// of `channels`.
    pub(crate) async fn save_subscriptions(
        &self,
        session: &Session,
        channels: &[String],
        added: bool,
    ) {
        if !self.shared || session.is_closed() {
            return;
        }
        let change = if added {
            Change::Subscribed(channels)
        } else {
            Change::Unsubscribed(channels)
        };
        self.update_record(session, change).await;
    }

    /// Writes this copy's state into the shared record, by compare-and-set on the epoch:
    /// - the record is still at this copy's epoch (no other node served the client since):
    ///   replace it with this copy's state, under a new epoch that this copy takes;
    /// - another node changed it: merge into the stored record (cursors only move forward; the
    ///   subscription change of this request is applied to the stored subscriptions) and leave
    ///   this copy stale, so that its next request rebuilds it from the record. Retried a few
    ///   times if yet another node writes in between.
    async fn update_record(&self, session: &Session, change: Change<'_>) {
        // Taken before the record: a delivery in between is written again next time.
        let generation = session.state.lock().delivered_generation;
        let saved = || {
            let mut st = session.state.lock();
            st.record_generation = generation;
            st.record_saved = Some(Instant::now());
        };
        let mine = self.record_of(session);
        let ttl = self.record_ttl();
        let mut record = mine.clone();
        record.epoch = Self::next_epoch();
        match self.engine.replace_session(&record, mine.epoch, ttl).await {
            Ok(true) => {
                session.epoch.store(record.epoch, Ordering::Release);
                saved();
                return;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(client_id = session.id(), error = %e, "saving session failed");
                return;
            }
        }
        for _ in 0..4 {
            let mut stored = match self.engine.load_session(session.id()).await {
                Ok(Some(r)) => r,
                // Ended elsewhere (disconnected or expired): nothing to keep.
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(client_id = session.id(), error = %e, "loading session failed");
                    return;
                }
            };
            // The unconfirmed batch (ack extension) is this copy's, if it has one.
            stored.cursors.retain(|c, _| !c.starts_with('#'));
            for (channel, id) in &mine.cursors {
                let cursor = stored.cursors.entry(channel.clone()).or_insert(0);
                *cursor = if channel.starts_with('#') {
                    *id
                } else {
                    (*cursor).max(*id)
                };
            }
            match change {
                Change::Delivery => {}
                Change::Subscribed(channels) => {
                    for c in channels {
                        if !stored.subscriptions.contains(c) {
                            stored.subscriptions.push(c.clone());
                        }
                    }
                }
                Change::Unsubscribed(channels) => {
                    stored.subscriptions.retain(|s| !channels.contains(s));
                }
            }
            let expected = stored.epoch;
            stored.epoch = Self::next_epoch();
            match self.engine.replace_session(&stored, expected, ttl).await {
                Ok(true) => {
                    saved();
                    return;
                }
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(client_id = session.id(), error = %e, "saving session failed");
                    return;
                }
            }
        }
        tracing::warn!(
            client_id = session.id(),
            "session record changed by other nodes four times in a row: not saved"
        );
    }

    /// Makes the local copy of session `client_id` current (see the module docs). Returns the
    /// session, or `None` when it no longer exists anywhere.
    ///
    /// `client_ack` is the batch a connect confirms (ack extension), if the message is one.
    pub(crate) async fn sync_session(
        &self,
        client_id: &str,
        client_ack: Option<u64>,
    ) -> Option<Arc<Session>> {
        let local = self.session(client_id);
        if !self.shared {
            return local;
        }
        let record = match self.engine.load_session(client_id).await {
            Ok(r) => r,
            Err(e) => {
                // The engine is unreachable: serve from the local copy if there is one.
                tracing::warn!(client_id, error = %e, "loading session failed");
                return local;
            }
        };
        let Some(record) = record else {
            if let Some(local) = &local {
                self.remove_session(local, CloseReason::Expired);
            }
            return None;
        };
        if let Some(local) = &local
            && local.epoch.load(Ordering::Acquire) == record.epoch
        {
            return Some(local.clone());
        }
        Some(self.adopt(record, local, client_ack).await)
    }

    /// Makes a local session match `record` and queues the history after its cursors. A stale
    /// local copy is rebuilt in place (the same object: a connect held on it goes on and gets
    /// what is queued now); without one, a new local session is made.
    async fn adopt(
        &self,
        record: SessionRecord,
        stale: Option<Arc<Session>>,
        client_ack: Option<u64>,
    ) -> Arc<Session> {
        // Ack extension: the record's newest batch, and whether the client says it got it. A
        // connect that did not confirm it gets the deliveries after the confirmed cursors.
        let newest_batch = record.cursors.get(ACK_BATCH).copied();
        let resend = matches!((newest_batch, client_ack), (Some(newest), Some(n)) if n < newest);
        let cursors: HashMap<Arc<str>, u64> = record
            .cursors
            .iter()
            .filter(|(c, _)| !c.starts_with('#'))
            .map(|(c, id)| {
                let confirmed = record.cursors.get(&format!("{CONFIRMED}{c}"));
                let id = match confirmed {
                    Some(confirmed) if resend => *confirmed,
                    _ => *id,
                };
                (Arc::from(c.as_str()), id)
            })
            .collect();
        let patterns: Vec<ChannelName> = record
            .subscriptions
            .iter()
            .filter_map(|s| ChannelName::new(s).ok())
            .collect();
        let reset = |st: &mut State| {
            // The queue held what the other node may have delivered since: drop it and read
            // the history after the record's cursors instead.
            st.queue.clear();
            st.deferred.clear();
            st.connected = true;
            st.replay_ext = record.extensions.iter().any(|e| e == "replay");
            if record.extensions.iter().any(|e| e == "ack") {
                let ack = st.ack.get_or_insert_with(AckState::default);
                // Our batches are new to the client whichever node numbered its last one.
                ack.batch = ack.batch.max(newest_batch.unwrap_or(0));
                if client_ack.is_some() {
                    // What this copy sent unconfirmed is confirmed by the connect, or read
                    // again after the confirmed cursors.
                    ack.unacked.clear();
                    ack.before.clear();
                }
                // Otherwise (not a connect) they stay and go out again unless the client's
                // next connect confirms them.
            } else {
                st.ack = None;
            }
            st.cursors = cursors.clone();
            st.delivered = cursors.clone();
            // The copy matches the record now.
            st.record_generation = st.delivered_generation;
            st.record_saved = None;
            st.subscriptions = patterns.iter().map(|p| Arc::from(p.as_str())).collect();
            // Live messages wait until the history after the cursors is queued.
            st.replaying = patterns.iter().map(|p| Arc::from(p.as_str())).collect();
        };
        let session = match stale {
            Some(stale) if !stale.is_closed() => {
                let mut st = stale.state.lock();
                let mut index = self.index.write();
                for pattern in &st.subscriptions {
                    index.remove(pattern, stale.seq);
                }
                for p in &patterns {
                    index.add(&Arc::from(p.as_str()), &stale);
                }
                drop(index);
                reset(&mut st);
                drop(st);
                tracing::debug!(client_id = stale.id(), "rebuilt stale session");
                stale
            }
            _ => {
                let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
                let session = Arc::new(Session::new(record.client_id.clone(), seq));
                reset(&mut session.state.lock());
                {
                    let mut sessions = self.sessions.write();
                    if let Some(other) = sessions.get(session.id()) {
                        // Another request adopted it meanwhile: use that copy.
                        return other.clone();
                    }
                    sessions.insert(Arc::from(session.id()), session.clone());
                }
                self.metrics.sessions.inc();
                let mut index = self.index.write();
                for p in &patterns {
                    index.add(&Arc::from(p.as_str()), &session);
                }
                drop(index);
                tracing::debug!(client_id = session.id(), "adopted session");
                session
            }
        };
        session.epoch.store(record.epoch, Ordering::Release);
        for pattern in &patterns {
            // Channels without a cursor had nothing delivered yet: their history is not
            // replayed (the subscription recorded a cursor when it was made).
            let from = ReplayFrom::Cursors;
            if let Err(e) = self.queue_history(&session, pattern, from).await {
                // Incomplete: keep live messages of this pattern deferred (delivering them
                // would skip the history) and leave the copy stale, so that the next request
                // rebuilds it.
                tracing::warn!(client_id = session.id(), error = %e, "history after cursors");
                session.epoch.store(0, Ordering::Release);
                continue;
            }
        }
        session
    }
}

/// In a record's cursors (ack extension): the newest batch sent, not yet confirmed.
const ACK_BATCH: &str = "#ack";
/// In a record's cursors (ack extension), before a channel name: where the deliveries the
/// client confirmed end on that channel.
const CONFIRMED: &str = "#";

/// What a record update carries besides the cursors.
#[derive(Clone, Copy)]
enum Change<'a> {
    /// A connect was answered.
    Delivery,
    /// These channels were subscribed.
    Subscribed(&'a [String]),
    /// These channels were unsubscribed.
    Unsubscribed(&'a [String]),
}
