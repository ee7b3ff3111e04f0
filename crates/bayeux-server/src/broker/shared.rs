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
//! After a connect is answered, the node merges what it delivered into the record (cursors only
//! move forward; subscriptions are the record's) and saves it with a new epoch.
//!
//! Engines that are not shared (memory, disk) skip all of this.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bayeux_engine::SessionRecord;
use bayeux_protocol::ChannelName;

use super::session::AckState;
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
        SessionRecord {
            client_id: session.id().to_owned(),
            subscriptions: st.subscriptions.iter().map(|s| s.to_string()).collect(),
            cursors: st
                .cursors
                .iter()
                .map(|(c, id)| (c.to_string(), *id))
                .collect::<BTreeMap<_, _>>(),
            extensions,
            epoch: session.epoch.load(Ordering::Acquire),
        }
    }

    fn next_epoch() -> u64 {
        rand::random::<u64>() | 1
    }

    /// Saves `session`'s record as it is now (after a handshake, subscribe or unsubscribe).
    pub(crate) async fn save_record(&self, session: &Session) {
        if !self.shared {
            return;
        }
        let mut record = self.record_of(session);
        record.epoch = Self::next_epoch();
        match self.engine.save_session(&record, self.record_ttl()).await {
            Ok(()) => session.epoch.store(record.epoch, Ordering::Release),
            Err(e) => tracing::warn!(client_id = session.id(), error = %e, "saving session failed"),
        }
    }

    /// After a connect was answered: merge what was delivered into the record and save it with
    /// a new epoch, so another node can take over exactly here.
    pub async fn commit_delivery(&self, session: &Session) {
        if !self.shared || session.is_closed() {
            return;
        }
        let mine = self.record_of(session);
        let mut record = match self.engine.load_session(session.id()).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(client_id = session.id(), error = %e, "loading session failed");
                return;
            }
        };
        if record.epoch == mine.epoch {
            record.subscriptions = mine.subscriptions;
        }
        for (channel, id) in mine.cursors {
            let cursor = record.cursors.entry(channel).or_insert(0);
            *cursor = (*cursor).max(id);
        }
        record.epoch = Self::next_epoch();
        match self.engine.save_session(&record, self.record_ttl()).await {
            Ok(()) => session.epoch.store(record.epoch, Ordering::Release),
            Err(e) => tracing::warn!(client_id = session.id(), error = %e, "saving session failed"),
        }
    }

    /// Makes the local copy of session `client_id` current (see the module docs). Returns the
    /// session, or `None` when it no longer exists anywhere.
    pub(crate) async fn sync_session(&self, client_id: &str) -> Option<Arc<Session>> {
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
        Some(self.adopt(record, local).await)
    }

    /// Builds a local session from `record` (replacing a stale local copy) and queues the
    /// history after its cursors.
    async fn adopt(&self, record: SessionRecord, stale: Option<Arc<Session>>) -> Arc<Session> {
        if let Some(stale) = &stale {
            // Drop the stale copy's local state without touching the shared record.
            let removed = self.sessions.write().remove(stale.id()).is_some();
            if removed {
                let st = stale.state.lock();
                let mut index = self.index.write();
                for pattern in &st.subscriptions {
                    index.remove(pattern, stale.seq);
                }
                drop(index);
                drop(st);
                self.metrics.sessions.dec();
            }
            stale.close();
            self.close_reasons
                .lock()
                .insert(stale.seq, CloseReason::ServerDisconnect);
        }
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let session = Arc::new(Session::new(record.client_id.clone(), seq));
        let patterns: Vec<ChannelName> = record
            .subscriptions
            .iter()
            .filter_map(|s| ChannelName::new(s).ok())
            .collect();
        {
            let mut st = session.state.lock();
            st.connected = true;
            st.replay_ext = record.extensions.iter().any(|e| e == "replay");
            if record.extensions.iter().any(|e| e == "ack") {
                st.ack = Some(AckState::default());
            }
            st.cursors = record
                .cursors
                .iter()
                .map(|(c, id)| (Arc::from(c.as_str()), *id))
                .collect();
            st.subscriptions = patterns.iter().map(|p| Arc::from(p.as_str())).collect();
            // Live messages wait until the history after the cursors is queued.
            st.replaying = patterns.iter().map(|p| Arc::from(p.as_str())).collect();
        }
        session.epoch.store(record.epoch, Ordering::Release);
        self.sessions
            .write()
            .insert(Arc::from(session.id()), session.clone());
        self.metrics.sessions.inc();
        {
            let mut index = self.index.write();
            for p in &patterns {
                index.add(&Arc::from(p.as_str()), &session);
            }
        }
        tracing::debug!(client_id = session.id(), "adopted session");
        for pattern in &patterns {
            // Channels without a cursor had nothing delivered yet: their history is not
            // replayed (the subscription recorded a cursor when it was made).
            let from = ReplayFrom::Cursors;
            if let Err(e) = self.queue_history(&session, pattern, from).await {
                tracing::warn!(client_id = session.id(), error = %e, "history after cursors");
                self.abandon_replay(&session, pattern.as_str());
            }
        }
        session
    }
}
