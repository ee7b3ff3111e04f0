//! The conformance suite every [`Engine`] must pass.
//!
//! Call [`run_all`] from an engine's tests with a factory that makes a fresh, empty engine with
//! the given retention. Each check panics with a message naming what failed.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::{CommitOutcome, CursorCommit, Engine, Retention, SessionRecord};

/// Makes a fresh, empty engine keeping at most `retention`.
pub trait Factory: Fn(Retention) -> Arc<dyn Engine> {}
impl<F: Fn(Retention) -> Arc<dyn Engine>> Factory for F {}

fn payload(i: usize) -> Bytes {
    Bytes::from(format!(r#"{{"channel":"/c","data":{i}}}"#))
}

fn generous() -> Retention {
    Retention {
        max_age: Duration::from_secs(3600),
        max_messages: 1_000_000,
        max_bytes: u64::MAX,
    }
}

/// Runs every check.
pub async fn run_all(make: impl Factory) {
    ids_grow_per_channel(make(generous())).await;
    read_after(make(generous())).await;
    feed_sees_every_append_in_order(make(generous())).await;
    retention_by_count(&make).await;
    trim_by_age(make(generous())).await;
    sessions(make(generous())).await;
}

/// Replay IDs start at 1 and grow by channel, independently.
pub async fn ids_grow_per_channel(engine: Arc<dyn Engine>) {
    let a1 = engine.append("/a", payload(1)).await.unwrap();
    let a2 = engine.append("/a", payload(2)).await.unwrap();
    let b1 = engine.append("/b", payload(3)).await.unwrap();
    assert!(a1.replay_id >= 1, "first id must be positive");
    assert!(
        a2.replay_id > a1.replay_id,
        "ids must grow within a channel"
    );
    assert!(b1.replay_id >= 1);
    assert_eq!(&*a1.channel, "/a");
    assert_eq!(a2.payload, payload(2), "payload must be stored as given");
    let bounds = engine.bounds("/a").await.unwrap();
    assert_eq!(bounds.first, Some(a1.replay_id));
    assert_eq!(bounds.last_issued, a2.replay_id);
    let none = engine.bounds("/nothing").await.unwrap();
    assert_eq!((none.first, none.last_issued), (None, 0));
    assert_eq!(engine.channels().await.unwrap(), ["/a", "/b"]);
}

/// `read` returns what follows an ID, oldest first, at most `limit`.
pub async fn read_after(engine: Arc<dyn Engine>) {
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(engine.append("/r", payload(i)).await.unwrap().replay_id);
    }
    let all = engine.read("/r", 0, 100).await.unwrap();
    assert_eq!(all.iter().map(|s| s.replay_id).collect::<Vec<_>>(), ids);
    let tail = engine.read("/r", ids[4], 100).await.unwrap();
    assert_eq!(
        tail.iter().map(|s| s.replay_id).collect::<Vec<_>>(),
        ids[5..]
    );
    let page = engine.read("/r", ids[1], 3).await.unwrap();
    assert_eq!(
        page.iter().map(|s| s.replay_id).collect::<Vec<_>>(),
        ids[2..5]
    );
    assert!(engine.read("/r", ids[9], 10).await.unwrap().is_empty());
    assert!(engine.read("/unknown", 0, 10).await.unwrap().is_empty());
}

/// The feed yields every append once, per channel in ID order, including concurrent ones.
pub async fn feed_sees_every_append_in_order(engine: Arc<dyn Engine>) {
    let mut feed = engine.feed();
    let mut tasks = Vec::new();
    for t in 0..4 {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                engine
                    .append(&format!("/f/{}", t % 2), payload(i))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut last = std::collections::HashMap::new();
    for _ in 0..200 {
        let stored = tokio::time::timeout(Duration::from_secs(10), feed.recv())
            .await
            .expect("feed stalled")
            .expect("feed closed");
        let prev = last.insert(stored.channel.to_string(), stored.replay_id);
        assert!(
            prev.is_none_or(|p| p < stored.replay_id),
            "feed out of order on {}",
            stored.channel
        );
    }
    assert!(feed.try_recv().is_err(), "feed yielded more than appended");
}

/// The count cap drops the oldest messages; IDs are never reused.
pub async fn retention_by_count(make: &impl Factory) {
    let engine = make(Retention {
        max_messages: 3,
        ..generous()
    });
    for i in 0..5 {
        engine.append("/k", payload(i)).await.unwrap();
    }
    engine.trim(&generous(), SystemTime::now()).await.unwrap();
    let kept = engine.read("/k", 0, 10).await.unwrap();
    assert_eq!(kept.len(), 3, "count cap not applied");
    assert_eq!(kept[0].payload, payload(2));
    let bounds = engine.bounds("/k").await.unwrap();
    assert_eq!(bounds.first, Some(kept[0].replay_id));
    assert_eq!(bounds.last_issued, kept[2].replay_id);
}

/// `trim` drops messages older than the window.
pub async fn trim_by_age(engine: Arc<dyn Engine>) {
    engine.append("/t", payload(0)).await.unwrap();
    let later = SystemTime::now() + Duration::from_secs(7200);
    let stats = engine.trim(&generous(), later).await.unwrap();
    assert_eq!(stats.messages, 1);
    assert!(engine.read("/t", 0, 10).await.unwrap().is_empty());
    let next = engine.append("/t", payload(1)).await.unwrap();
    assert_eq!(next.replay_id, 2, "ids must not restart after a trim");
}

/// Session records: save, load, touch, expire, remove.
pub async fn sessions(engine: Arc<dyn Engine>) {
    let record = SessionRecord {
        client_id: "abc".into(),
        subscriptions: vec!["/a/**".into()],
        cursors: [("/a/b".to_owned(), 7)].into_iter().collect(),
        extensions: vec!["ack".into()],
        epoch: 3,
        owner: None,
    };
    engine
        .save_session(&record, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        engine.load_session("abc").await.unwrap(),
        Some(record.clone())
    );
    assert_eq!(engine.load_session("zzz").await.unwrap(), None);
    // Compare-and-set on the epoch: a stale expectation changes nothing.
    let mut next = record.clone();
    next.subscriptions = vec!["/b".into()];
    next.epoch = 5;
    let ttl = Duration::from_secs(60);
    assert!(!engine.replace_session(&next, 4, ttl).await.unwrap());
    assert_eq!(engine.load_session("abc").await.unwrap(), Some(record));
    assert!(engine.replace_session(&next, 3, ttl).await.unwrap());
    assert_eq!(
        engine.load_session("abc").await.unwrap(),
        Some(next.clone())
    );
    let mut absent = next.clone();
    absent.client_id = "zzz".into();
    assert!(!engine.replace_session(&absent, 0, ttl).await.unwrap());
    assert_eq!(engine.load_session("zzz").await.unwrap(), None);
    engine
        .touch_session("abc", Duration::from_millis(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(engine.load_session("abc").await.unwrap(), None, "ttl");
    engine
        .touch_session("zzz", Duration::from_secs(1))
        .await
        .unwrap();
    engine.remove_session("zzz").await.unwrap();
}

/// Sessions that nodes sharing an engine claim from each other and commit cursors for (the
/// memory and Redis engines; the disk engine serves one node).
pub async fn ownership(engine: Arc<dyn Engine>) {
    let ttl = Duration::from_secs(60);
    let commit = |id: &str, at: u64, release: bool| CursorCommit {
        client_id: id.into(),
        cursors: [("/a".to_owned(), at)].into_iter().collect(),
        release,
    };
    let at = |r: &SessionRecord, channel: &str| r.cursors.get(channel).copied();
    let record = SessionRecord {
        client_id: "s1".into(),
        subscriptions: vec!["/a".into(), "/b".into()],
        cursors: [("/a".to_owned(), 1), ("/b".to_owned(), 2)]
            .into_iter()
            .collect(),
        extensions: vec![],
        epoch: 3,
        owner: Some("A".into()),
    };
    engine.save_session(&record, ttl).await.unwrap();
    assert_eq!(engine.load_session("s1").await.unwrap(), Some(record));
    let none = CommitOutcome::default();
    let taken = |id: &str| CommitOutcome {
        taken: vec![id.to_owned()],
        ended: vec![],
    };
    assert_eq!(
        engine
            .commit_cursors("A", &[commit("s1", 5, false)], ttl)
            .await
            .unwrap(),
        none
    );
    // B takes it: A's commit wins over the record; channels A committed nothing for keep the
    // record's cursor.
    let claimed = engine
        .claim_session("s1", "B", 9, ttl)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((at(&claimed, "/a"), at(&claimed, "/b")), (Some(5), Some(2)));
    assert_eq!((claimed.owner.as_deref(), claimed.epoch), (Some("B"), 9));
    let stored = engine.load_session("s1").await.unwrap().unwrap();
    assert_eq!((stored.owner.as_deref(), stored.epoch), (Some("B"), 9));
    // A learns it at its next commit, whose commit for s1 is refused; and only once.
    assert_eq!(
        engine
            .commit_cursors("A", &[commit("s1", 7, false)], ttl)
            .await
            .unwrap(),
        taken("s1")
    );
    assert_eq!(engine.commit_cursors("A", &[], ttl).await.unwrap(), none);
    // A takes it back from B: B's commit, not A's refused one.
    assert_eq!(
        engine
            .commit_cursors("B", &[commit("s1", 6, false)], ttl)
            .await
            .unwrap(),
        none
    );
    let back = engine
        .claim_session("s1", "A", 11, ttl)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(at(&back, "/a"), Some(6));
    assert_eq!(
        engine.commit_cursors("B", &[], ttl).await.unwrap(),
        taken("s1")
    );
    // The owner claiming again takes nothing from itself.
    let again = engine
        .claim_session("s1", "A", 13, ttl)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(at(&again, "/a"), Some(6));
    assert_eq!(engine.commit_cursors("A", &[], ttl).await.unwrap(), none);
    // Removing it tells the owner that it ended; claiming it finds nothing.
    engine.remove_session("s1").await.unwrap();
    assert_eq!(
        engine.commit_cursors("A", &[], ttl).await.unwrap(),
        CommitOutcome {
            taken: vec![],
            ended: vec!["s1".to_owned()],
        }
    );
    assert_eq!(
        engine.claim_session("s1", "B", 15, ttl).await.unwrap(),
        None
    );
    // Released: the cursors go into the record, which has no owner any more.
    let s2 = SessionRecord {
        client_id: "s2".into(),
        subscriptions: vec!["/a".into()],
        cursors: [("/a".to_owned(), 1)].into_iter().collect(),
        extensions: vec![],
        epoch: 3,
        owner: Some("A".into()),
    };
    engine.save_session(&s2, ttl).await.unwrap();
    engine
        .commit_cursors("A", &[commit("s2", 3, false)], ttl)
        .await
        .unwrap();
    engine
        .commit_cursors("A", &[commit("s2", 4, true)], ttl)
        .await
        .unwrap();
    let released = engine.load_session("s2").await.unwrap().unwrap();
    assert_eq!((at(&released, "/a"), released.owner), (Some(4), None));
    let claimed = engine
        .claim_session("s2", "B", 5, ttl)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(at(&claimed, "/a"), Some(4));
    assert_eq!(engine.commit_cursors("A", &[], ttl).await.unwrap(), none);
    engine.remove_session("s2").await.unwrap();
    // An owned record outlives its TTL (its owner keeps it alive by committing); once its
    // owner has been silent for longer than the TTL, the next commit of any node releases it
    // with the owner's cursors, and then it expires.
    let short = Duration::from_millis(300);
    let s3 = SessionRecord {
        client_id: "s3".into(),
        subscriptions: vec!["/a".into()],
        cursors: [("/a".to_owned(), 1)].into_iter().collect(),
        extensions: vec![],
        epoch: 1,
        owner: Some("C".into()),
    };
    engine.save_session(&s3, short).await.unwrap();
    engine
        .commit_cursors("C", &[commit("s3", 8, false)], short)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let kept = engine
        .load_session("s3")
        .await
        .unwrap()
        .expect("owned: no TTL");
    assert_eq!(kept.owner.as_deref(), Some("C"));
    engine.commit_cursors("D", &[], short).await.unwrap();
    let swept = engine
        .load_session("s3")
        .await
        .unwrap()
        .expect("swept, not gone");
    assert_eq!((at(&swept, "/a"), swept.owner), (Some(8), None));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        engine.load_session("s3").await.unwrap(),
        None,
        "then the TTL"
    );
}
