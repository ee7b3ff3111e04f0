//! Sessions on a shared engine (several nodes, one Redis): any node serves any client.
//!
//! Each session has a record in the engine: its subscriptions, its per-channel cursors (the last
//! replay ID sent), the node that **owns** it (served it last) and an `epoch` that changes
//! whenever a node takes it. The owner keeps its local copy and trusts it: serving a client
//! that stays on its node costs no engine round trip per request. What it sends goes into the
//! engine as **cursor commits**, batched over all its sessions by one task ([`Committer`]), one
//! engine operation per batch whatever the number of sessions, and a long-polling response
//! leaves only after its commit.
//! - A request for a session with no local copy, or a stale one (epoch 0), **claims** it
//!   ([`Engine::claim_session`]): the node becomes its owner, gets the cursors the previous
//!   owner last committed, subscribes its copy locally and queues the history after those
//!   cursors (a stale copy is rebuilt in place, so a connect held on it goes on). No record:
//!   the session ended everywhere.
//! - The previous owner learns that the session was taken from the result of its next commit
//!   (at least one a second) and marks its copy stale. A commit for a session taken meanwhile
//!   is refused, so a long-polling response built from a stale copy never leaves: the node
//!   claims the session back, rebuilds the copy and takes again.
//! - Subscribes and unsubscribes write the record by compare-and-set on the epoch
//!   ([`Engine::replace_session`]); if another node took the session meanwhile, the node claims
//!   it back, applies the change to the claimed state and rebuilds its copy from that. No node
//!   undoes another's change, and the owner's copy always has every subscription.
//! - With the ack extension the cursors also keep the newest batch sent and where the confirmed
//!   deliveries end (cursor keys `#ack` and `#<channel>`), so that a node taking the session
//!   for a connect that did not confirm that batch sends it again.
//!
//! Engines that are not shared (memory, disk) skip all of this. Guarantees and costs:
//! `docs/scaleout.md`.
//!
//! [`Engine::claim_session`]: bayeux_engine::Engine::claim_session
//! [`Engine::replace_session`]: bayeux_engine::Engine::replace_session

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bayeux_engine::{CursorCommit, SessionRecord};
use bayeux_protocol::ChannelName;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use super::session::{AckState, State};
use super::{Broker, CloseReason, ReplayFrom, Session};

/// The most sessions in one cursor commit.
const COMMIT_BATCH: usize = 1_000;
/// How often the committer commits even with nothing to commit: it learns which sessions other
/// nodes took and keeps this node's commits alive in the engine.
const COMMIT_TICK: Duration = Duration::from_secs(1);

/// How a cursor commit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Committed {
    /// Recorded (or nothing to record).
    Done,
    /// Another node took the session: this copy is stale and what it took must not be sent.
    Taken,
    /// The engine failed; nothing is known.
    Failed,
}

struct CommitRequest {
    session: Arc<Session>,
    /// The copy's epoch when the commit was asked for; a copy claimed or marked stale since
    /// is not committed.
    epoch: u64,
    commit: CursorCommit,
    done: Option<oneshot::Sender<Committed>>,
}

/// The queue of cursor commits, drained by one task ([`Broker::start_committer`]).
pub(crate) struct Committer {
    tx: mpsc::UnboundedSender<CommitRequest>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<CommitRequest>>>,
}

impl Committer {
    pub(crate) fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Committer {
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }
}

impl Broker {
    /// How long a session record lives once no node owns it (its copy expired, or its node
    /// died or stopped), and how long a node may be silent before it counts as dead: long
    /// enough to outlive a held connect and the reconnect interval after it.
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
        let cursors = cursors_of(&st);
        SessionRecord {
            client_id: session.id().to_owned(),
            subscriptions: st.subscriptions.iter().map(|s| s.to_string()).collect(),
            cursors,
            extensions,
            epoch: session.epoch.load(Ordering::Acquire),
            owner: Some(self.node_id.clone()),
        }
    }

    /// Starts the task that commits cursors in batches (shared engines).
    pub(crate) fn start_committer(self: &Arc<Self>) {
        let Some(mut rx) = self.commits.rx.lock().take() else {
            return;
        };
        // Runs as long as the broker: connects answered during a shutdown are committed too. A
        // node that stops owns its sessions until another node claims them, or finds it silent
        // for longer than the record TTL and releases them.
        let broker = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(COMMIT_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let batch = tokio::select! {
                    first = rx.recv() => {
                        let Some(first) = first else { break };
                        let mut batch = vec![first];
                        while batch.len() < COMMIT_BATCH {
                            match rx.try_recv() {
                                Ok(next) => batch.push(next),
                                Err(_) => break,
                            }
                        }
                        batch
                    }
                    _ = tick.tick() => Vec::new(),
                };
                let Some(broker) = broker.upgrade() else {
                    break;
                };
                broker.run_commits(batch).await;
            }
        });
    }

    /// One engine operation for a batch of commits: records them, learns which sessions other
    /// nodes took (their copies here turn stale), and answers every request.
    async fn run_commits(&self, batch: Vec<CommitRequest>) {
        let mut live = Vec::with_capacity(batch.len());
        for request in batch {
            // Taken (or rebuilt) since it was asked for: a result of an earlier batch.
            if !request.commit.release
                && request.session.epoch.load(Ordering::Acquire) != request.epoch
            {
                if let Some(done) = request.done {
                    let _ = done.send(Committed::Taken);
                }
                continue;
            }
            live.push(request);
        }
        let commits: Vec<CursorCommit> = live.iter().map(|r| r.commit.clone()).collect();
        let result = self
            .engine
            .commit_cursors(&self.node_id, &commits, self.record_ttl())
            .await;
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::warn!(error = %e, sessions = live.len(), "committing cursors failed");
                for request in live {
                    if let Some(done) = request.done {
                        let _ = done.send(Committed::Failed);
                    }
                }
                return;
            }
        };
        for id in &outcome.taken {
            if let Some(local) = self.session(id) {
                tracing::debug!(client_id = id, "session taken by another node");
                local.epoch.store(0, Ordering::Release);
            }
        }
        for id in &outcome.ended {
            if let Some(local) = self.session(id) {
                // Disconnected through another node: a connect held here learns it now.
                tracing::debug!(client_id = id, "session ended on another node");
                self.remove_session(&local, CloseReason::Expired);
            }
        }
        for request in live {
            let id = &request.commit.client_id;
            let outcome = if outcome.taken.contains(id) || outcome.ended.contains(id) {
                Committed::Taken
            } else {
                Committed::Done
            };
            if let Some(done) = request.done {
                let _ = done.send(outcome);
            }
        }
    }

    /// Commits what this copy has sent, in the committer's next batch, and waits for it.
    async fn commit(&self, session: &Arc<Session>) -> Committed {
        let epoch = session.epoch.load(Ordering::Acquire);
        if epoch == 0 {
            return Committed::Taken;
        }
        let commit = CursorCommit {
            client_id: session.id().to_owned(),
            cursors: cursors_of(&session.state.lock()),
            release: false,
        };
        let (done, outcome) = oneshot::channel();
        let request = CommitRequest {
            session: session.clone(),
            epoch,
            commit,
            done: Some(done),
        };
        if self.commits.tx.send(request).is_err() {
            return Committed::Failed;
        }
        outcome.await.unwrap_or(Committed::Failed)
    }

    /// This node stops serving `session` (its copy expired here): its cursors go into the
    /// record, so that the client can come back to any node within the record's life.
    pub(crate) fn release(&self, session: &Arc<Session>) {
        let commit = CursorCommit {
            client_id: session.id().to_owned(),
            cursors: cursors_of(&session.state.lock()),
            release: true,
        };
        let _ = self.commits.tx.send(CommitRequest {
            session: session.clone(),
            epoch: 0,
            commit,
            done: None,
        });
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
            Ok(()) => session.epoch.store(record.epoch, Ordering::Release),
            Err(e) => tracing::warn!(client_id = session.id(), error = %e, "saving session failed"),
        }
    }

    /// After a response was built (long-polling: before it leaves; WebSocket: after the frame
    /// went out): commits what the copy sent, so another node can take over exactly here.
    /// [`Committed::Taken`]: another node served the client since this
    /// copy was made; what was taken must not be sent (see [`Broker::resync`]).
    pub(crate) async fn commit_delivery(&self, session: &Arc<Session>) -> Committed {
        if !self.shared || session.is_closed() {
            return Committed::Done;
        }
        let (generation, changed) = {
            let st = session.state.lock();
            (
                st.delivered_generation,
                st.delivered_generation != st.record_generation,
            )
        };
        if !changed {
            // Nothing sent since the last commit (a hold that timed out, say). The record needs
            // no keeping alive: it has no TTL while this node owns it and commits.
            return Committed::Done;
        }
        // Boxed: callers await this in futures that live as long as a connection (a held
        // long-poll, an open WebSocket), and the checks above end most calls without it.
        let outcome = Box::pin(self.commit(session)).await;
        if outcome == Committed::Done {
            session.state.lock().record_generation = generation;
        }
        outcome
    }

    /// After a commit said [`Committed::Taken`]: claims the session back and rebuilds the copy
    /// in place (its queue then holds what the client has not had, from any node).
    pub(crate) async fn resync(&self, session: &Arc<Session>, client_ack: Option<u64>) {
        session.epoch.store(0, Ordering::Release);
        self.sync_session(session.id(), client_ack).await;
    }

    /// Saves the record of `session` after a subscribe (`added`) or an unsubscribe (`removed`)
    /// of `channels`.
    pub(crate) async fn save_subscriptions(
        &self,
        session: &Arc<Session>,
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
    /// - another node took the session: claim it back, apply this request's subscription
    ///   change to the claimed state, write that by compare-and-set, and rebuild this copy from
    ///   it. Retried a few times if yet another node writes in between.
    async fn update_record(&self, session: &Arc<Session>, change: Change<'_>) {
        // Taken before the record: a delivery in between is written again next time.
        let generation = session.state.lock().delivered_generation;
        let saved = || session.state.lock().record_generation = generation;
        let mine = self.record_of(session);
        let ttl = self.record_ttl();
        let mut record = mine.clone();
        record.epoch = Self::next_epoch();
        match self.engine.replace_session(&record, mine.epoch, ttl).await {
            Ok(true) => {
                session.epoch.store(record.epoch, Ordering::Release);
                saved();
                // This node's commit for the session follows the record (a channel subscribed
                // again starts at its new position).
                self.commit(session).await;
                return;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(client_id = session.id(), error = %e, "saving session failed");
                return;
            }
        }
        // Another node took the session since this copy was made: take it back (its owner
        // learns it, and what it committed comes with it), apply this request's change to
        // that state, and rebuild this copy from the result. Writing the change into the record
        // behind the owner's back would leave the owner's copy without it.
        session.epoch.store(0, Ordering::Release);
        for _ in 0..4 {
            let claimed = self
                .engine
                .claim_session(session.id(), &self.node_id, Self::next_epoch(), ttl)
                .await;
            let claimed = match claimed {
                Ok(Some(r)) => r,
                // Ended elsewhere (disconnected or expired): nothing to keep.
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(client_id = session.id(), error = %e, "claiming session failed");
                    return;
                }
            };
            let mut next = claimed.clone();
            match change {
                Change::Subscribed(channels) => {
                    for c in channels {
                        if !next.subscriptions.contains(c) {
                            next.subscriptions.push(c.clone());
                        }
                        // Where the subscription starts (set when it was made here).
                        if let Some(start) = mine.cursors.get(c) {
                            next.cursors.entry(c.clone()).or_insert(*start);
                        }
                    }
                }
                Change::Unsubscribed(channels) => {
                    next.subscriptions.retain(|s| !channels.contains(s));
                }
            }
            next.epoch = Self::next_epoch();
            match self.engine.replace_session(&next, claimed.epoch, ttl).await {
                Ok(true) => {
                    self.adopt(next, Some(session.clone()), None).await;
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
        if let Some(local) = &local
            && local.epoch.load(Ordering::Acquire) != 0
        {
            // This node owns the session as far as it knows; if another node took it, the
            // commit of whatever this copy sends says so.
            return Some(local.clone());
        }
        let claimed = self
            .engine
            .claim_session(
                client_id,
                &self.node_id,
                Self::next_epoch(),
                self.record_ttl(),
            )
            .await;
        let record = match claimed {
            Ok(r) => r,
            Err(e) => {
                // The engine is unreachable: serve from the local copy if there is one.
                tracing::warn!(client_id, error = %e, "claiming session failed");
                return local;
            }
        };
        let Some(record) = record else {
            if let Some(local) = &local {
                self.remove_session(local, CloseReason::Expired);
            }
            return None;
        };
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

/// What a copy has sent, as a record's cursors: what has left the queue, not what is queued
/// (another node claiming the session must re-read what waits here undelivered).
fn cursors_of(st: &State) -> BTreeMap<String, u64> {
    let mut cursors: BTreeMap<String, u64> = st
        .delivered
        .iter()
        .map(|(c, id)| (c.to_string(), *id))
        .collect();
    // Ack extension: batches sent but not confirmed yet may have been lost with this node.
    // `#ack` is the newest batch sent and `#<channel>` where the confirmed deliveries end, so
    // that a node claiming the session can send them again to a client that says (in its
    // connect) it did not get them.
    if let Some(ack) = &st.ack
        && let Some((_, confirmed)) = ack.before.front()
    {
        cursors.insert(ACK_BATCH.to_owned(), ack.batch);
        for (channel, id) in confirmed {
            cursors.insert(format!("{CONFIRMED}{channel}"), *id);
        }
    }
    cursors
}

/// In a record's cursors (ack extension): the newest batch sent, not yet confirmed.
const ACK_BATCH: &str = "#ack";
/// In a record's cursors (ack extension), before a channel name: where the deliveries the
/// client confirmed end on that channel.
const CONFIRMED: &str = "#";

/// What a record update carries besides the cursors.
#[derive(Clone, Copy)]
enum Change<'a> {
    /// These channels were subscribed.
    Subscribed(&'a [String]),
    /// These channels were unsubscribed.
    Unsubscribed(&'a [String]),
}
