//! The state machine without a network: every advice and error variant, fed as messages.

use super::*;
use crate::ext::ack::AckExtension;
use serde_json::json;

fn config() -> Config {
    Config {
        transport: TransportKind::LongPolling,
        seed: Some(1),
        backoff: BackoffPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            jitter: false,
        },
        ..Config::default()
    }
}

fn msg(v: Value) -> Message {
    serde_json::from_value(v).expect("a message")
}

struct Harness {
    s: State,
    now: Instant,
}

impl Harness {
    fn new(config: Config) -> Self {
        Harness {
            s: State::new(config, Vec::new()),
            now: Instant::now(),
        }
    }

    fn with_provider() -> Self {
        Harness::new(Config {
            has_token_provider: true,
            ..config()
        })
    }

    fn input(&mut self, input: Input) -> Vec<Action> {
        self.s.handle(input, self.now)
    }

    fn reply(&mut self, messages: Vec<Value>) -> Vec<Action> {
        self.input(Input::Messages(messages.into_iter().map(msg).collect()))
    }

    /// Start → handshake (ok) → first connect (ok). Returns the actions of the first connect
    /// reply (which hold the second connect).
    fn connected(&mut self) -> Vec<Action> {
        let a = self.input(Input::Start);
        let a = if self.s.config.has_token_provider {
            assert!(has_reauth(&a));
            self.input(Input::Token(Ok(())))
        } else {
            a
        };
        let hs = handshake(&a).expect("a handshake");
        let a = self.reply(vec![hs_ok(&hs, "c1")]);
        let (connect, _) = connect(&a).expect("first connect");
        self.reply(vec![json!({
            "channel": "/meta/connect", "id": connect.id, "successful": true,
            "advice": {"reconnect": "retry", "interval": 0, "timeout": 30000}
        })])
    }

    /// Subscribes and confirms.
    fn subscribe(&mut self, channel: &str, replay: i64) {
        let a = self.input(Input::Subscribe {
            channel: channel.into(),
            replay,
        });
        let sub = subscribes(&a).pop().expect("a subscribe");
        let a = self.reply(vec![json!({
            "channel": "/meta/subscribe", "id": sub.id, "subscription": channel, "successful": true
        })]);
        assert!(
            a.iter()
                .any(|x| matches!(x, Action::Subscribed { result: Ok(()), .. })),
            "{a:?}"
        );
    }

    fn deliver(&mut self, channel: &str, replay_id: i64) -> Vec<Action> {
        self.reply(vec![json!({
            "channel": channel, "data": {"n": replay_id}, "ext": {"replay": replay_id}
        })])
    }

    /// The id of the connect now in flight.
    fn connect_id(&self) -> Value {
        json!(self.s.connect_id.clone().expect("a connect in flight"))
    }
}

fn hs_ok(hs: &Message, client_id: &str) -> Value {
    json!({
        "channel": "/meta/handshake", "id": hs.id, "successful": true, "clientId": client_id,
        "version": "1.0", "supportedConnectionTypes": ["long-polling"],
        "advice": {"reconnect": "retry", "interval": 0, "timeout": 30000},
        "ext": {"replay": true}
    })
}

fn handshake(actions: &[Action]) -> Option<Message> {
    actions.iter().find_map(|a| match a {
        Action::SendHandshake(m) => Some(m.clone()),
        _ => None,
    })
}

fn connect(actions: &[Action]) -> Option<(Message, Duration)> {
    actions.iter().find_map(|a| match a {
        Action::SendConnect { message, deadline } => Some((message.clone(), *deadline)),
        _ => None,
    })
}

fn subscribes(actions: &[Action]) -> Vec<Message> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Subscribe(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

fn sent(actions: &[Action]) -> Vec<Message> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

fn sleeps(actions: &[Action]) -> Vec<(Duration, u64)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Sleep { duration, token } => Some((*duration, *token)),
            _ => None,
        })
        .collect()
}

fn events(actions: &[Action]) -> Vec<Event> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Event(e) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

fn delivered(actions: &[Action]) -> Vec<i64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver(m) => replay_id_of(m),
            _ => None,
        })
        .collect()
}

fn has_reauth(actions: &[Action]) -> bool {
    actions.iter().any(|a| matches!(a, Action::Reauthenticate))
}

fn gave_up(actions: &[Action]) -> bool {
    events(actions)
        .iter()
        .any(|e| matches!(e, Event::GaveUp { .. }))
        && actions.iter().any(|a| matches!(a, Action::Close))
}

#[test]
fn first_handshake_and_first_connect() {
    let mut h = Harness::new(config());
    let a = h.input(Input::Start);
    let hs = handshake(&a).unwrap();
    assert_eq!(hs.version.as_deref(), Some("1.0"));
    assert_eq!(
        hs.supported_connection_types,
        Some(vec!["long-polling".to_owned()])
    );
    assert_eq!(hs.ext_get("replay"), Some(&json!(true)));
    assert_eq!(h.s.phase(), Phase::Handshaking);

    let a = h.reply(vec![hs_ok(&hs, "c1")]);
    assert_eq!(h.s.client_id(), Some("c1"));
    let (c, deadline) = connect(&a).unwrap();
    assert_eq!(c.client_id.as_deref(), Some("c1"));
    assert_eq!(c.connection_type.as_deref(), Some("long-polling"));
    // The first connect asks for an immediate answer: its deadline is the allowance alone.
    assert_eq!(c.advice.as_ref().and_then(|a| a.timeout), Some(0));
    assert_eq!(deadline, Duration::from_secs(10));

    let a = h.reply(vec![json!({
        "channel": "/meta/connect", "id": c.id, "successful": true,
        "advice": {"reconnect": "retry", "interval": 0, "timeout": 110000}
    })]);
    assert!(matches!(
        &events(&a)[..],
        [Event::Connected { client_id, rehandshake: false, .. }] if client_id == "c1"
    ));
    let (c2, deadline) = connect(&a).unwrap();
    assert_eq!(c2.advice, None);
    assert_eq!(deadline, Duration::from_secs(120));
    // A later connect reply without advice keeps the advice in force.
    let a = h.reply(vec![
        json!({"channel": "/meta/connect", "id": c2.id, "successful": true}),
    ]);
    assert_eq!(connect(&a).unwrap().1, Duration::from_secs(120));
    assert!(events(&a).is_empty());
}

#[test]
fn retry_advice_reconnects_after_interval() {
    let mut h = Harness::new(config());
    h.connected();
    let id = h.connect_id();
    let a = h.reply(vec![json!({
        "channel": "/meta/connect", "id": id, "successful": true,
        "advice": {"reconnect": "retry", "interval": 2500}
    })]);
    assert!(connect(&a).is_none());
    let [(d, token)] = sleeps(&a)[..] else {
        panic!("{a:?}")
    };
    assert_eq!(d, Duration::from_millis(2500));
    let a = h.input(Input::Wake(token));
    assert!(connect(&a).is_some());
    // A stale timer does nothing.
    assert!(h.input(Input::Wake(token)).is_empty());
}

#[test]
fn multiple_clients_advice_polls_at_its_interval() {
    let mut h = Harness::new(config());
    h.connected();
    let id = h.connect_id();
    let a = h.reply(vec![json!({
        "channel": "/meta/connect", "id": id, "successful": true,
        "advice": {"interval": 2000, "multiple-clients": true, "reconnect": "retry", "timeout": 110000}
    })]);
    assert_eq!(sleeps(&a)[0].0, Duration::from_millis(2000));
    assert_eq!(h.s.advice().multiple_clients, Some(true));
    let a = h.input(Input::Wake(sleeps(&a)[0].1));
    assert_eq!(connect(&a).unwrap().1, Duration::from_secs(120));
}

fn resubscribe_after(error_reply: Value) {
    let mut h = Harness::new(config());
    h.connected();
    h.subscribe("/a", -1);
    h.subscribe("/b", -2);
    h.subscribe("/c", -1);
    assert_eq!(delivered(&h.deliver("/a", 5)), vec![5]);
    assert_eq!(delivered(&h.deliver("/b", 7)), vec![7]);
    let mut reply = error_reply;
    reply["id"] = h.connect_id();
    let a = h.reply(vec![reply]);
    assert!(connect(&a).is_none());
    assert!(matches!(
        events(&a)[..],
        [Event::Reconnecting {
            handshake: true,
            ..
        }]
    ));
    let hs = handshake(&a).expect("handshake at once");
    assert_eq!(h.s.advice(), &Advice::default(), "advice reset");
    let a = h.reply(vec![hs_ok(&hs, "c2")]);
    assert!(connect(&a).is_some());
    let subs = subscribes(&a);
    assert_eq!(subs.len(), 3);
    let map = json!({"/a": 5, "/b": 7, "/c": -1});
    for s in &subs {
        assert_eq!(s.client_id.as_deref(), Some("c2"));
        assert_eq!(s.ext_get("replay"), Some(&map), "the whole map on each");
    }
    let first = &subs[0];
    let a = h.reply(vec![json!({
        "channel": "/meta/subscribe", "id": first.id, "subscription": "/a", "successful": true
    })]);
    assert_eq!(
        events(&a),
        vec![Event::Resumed {
            channel: "/a".into(),
            from: 5
        }]
    );
    // Nothing the application saw is delivered twice.
    assert_eq!(delivered(&h.deliver("/a", 5)), Vec::<i64>::new());
    assert_eq!(delivered(&h.deliver("/a", 6)), vec![6]);
}

#[test]
fn handshake_advice_cometd_session_unknown() {
    resubscribe_after(json!({
        "channel": "/meta/connect", "successful": false, "error": "402::session_unknown",
        "advice": {"reconnect": "handshake", "interval": 0}
    }));
}

#[test]
fn handshake_advice_salesforce_unknown_client() {
    resubscribe_after(json!({
        "advice": {"interval": 0, "reconnect": "handshake"}, "channel": "/meta/connect",
        "error": "403::Unknown client", "successful": false
    }));
}

#[test]
fn handshake_advice_on_a_successful_connect() {
    resubscribe_after(json!({
        "channel": "/meta/connect", "successful": true, "advice": {"reconnect": "handshake"}
    }));
}

#[test]
fn none_without_token_provider_gives_up() {
    let mut h = Harness::new(config());
    h.connected();
    let id = h.connect_id();
    let a = h.reply(vec![json!({
        "channel": "/meta/connect", "id": id, "successful": false, "error": "403::denied",
        "advice": {"reconnect": "none", "interval": 0}
    })]);
    assert!(gave_up(&a), "{a:?}");
    assert_eq!(h.s.phase(), Phase::Closed);
    // Anything asked afterwards is refused at once.
    let a = h.input(Input::Publish {
        ticket: 1,
        channel: "/x".into(),
        data: json!(1),
    });
    assert!(matches!(
        a[..],
        [Action::Published {
            ticket: 1,
            result: Err(_)
        }]
    ));
}

#[test]
fn none_with_token_provider_reauthenticates_then_resubscribes() {
    let mut h = Harness::with_provider();
    h.connected();
    h.subscribe("/event/Foo__e", -1);
    h.reply(vec![json!({
        "channel": "/event/Foo__e", "data": {"event": {"replayId": 41}, "payload": {}}
    })]);
    let id = h.connect_id();
    let a = h.reply(vec![json!({
        "channel": "/meta/connect", "id": id, "successful": true,
        "advice": {"reconnect": "none"}
    })]);
    assert!(has_reauth(&a), "{a:?}");
    assert_eq!(h.s.phase(), Phase::Authenticating);
    let a = h.input(Input::Token(Ok(())));
    assert_eq!(events(&a), vec![Event::Reauthenticated]);
    let hs = handshake(&a).unwrap();
    let a = h.reply(vec![hs_ok(&hs, "c2")]);
    let subs = subscribes(&a);
    assert_eq!(
        subs[0].ext_get("replay"),
        Some(&json!({"/event/Foo__e": 41}))
    );
}

#[test]
fn salesforce_401_authentication_invalid_on_connect() {
    let mut h = Harness::with_provider();
    h.connected();
    let id = h.connect_id();
    let id: u64 = id.as_str().unwrap().parse().unwrap();
    // Captured from Salesforce: the id comes back as a number.
    let a = h.reply(vec![json!({
        "clientId": "c1", "advice": {"reconnect": "none", "interval": 0},
        "channel": "/meta/connect", "id": id, "error": "401::Authentication invalid",
        "successful": false
    })]);
    assert!(has_reauth(&a), "{a:?}");
}

#[test]
fn salesforce_403_handshake_denied_with_failure_reason() {
    let mut h = Harness::with_provider();
    h.connected();
    let id = h.connect_id();
    h.reply(vec![json!({
        "channel": "/meta/connect", "id": id, "successful": false,
        "error": "401::Authentication invalid", "advice": {"reconnect": "none", "interval": 0}
    })]);
    let a = h.input(Input::Token(Ok(())));
    let hs = handshake(&a).unwrap();
    let denied = json!({
        "ext": {"sfdc": {"failureReason": "401::Authentication invalid"}, "replay": true, "payload.format": true},
        "advice": {"reconnect": "none"}, "channel": "/meta/handshake", "id": hs.id,
        "error": "403::Handshake denied", "successful": false
    });
    let a = h.reply(vec![denied.clone()]);
    // The fresh token was refused too: back off before asking again.
    assert!(!has_reauth(&a));
    let [(d, token)] = sleeps(&a)[..] else {
        panic!("{a:?}")
    };
    assert!(d >= Duration::from_millis(100), "{d:?}");
    let a = h.input(Input::Wake(token));
    assert!(has_reauth(&a));
    // The same denial without advice is still an auth failure (failureReason 401).
    let a = h.input(Input::Token(Ok(())));
    let hs = handshake(&a).unwrap();
    let mut no_advice = denied;
    no_advice["id"] = json!(hs.id);
    no_advice.as_object_mut().unwrap().remove("advice");
    let a = h.reply(vec![no_advice]);
    assert!(!sleeps(&a).is_empty() || has_reauth(&a), "{a:?}");
    assert_eq!(h.s.phase(), Phase::Authenticating);
}

#[test]
fn handshake_denied_without_provider_gives_up() {
    let mut h = Harness::new(config());
    let hs = handshake(&h.input(Input::Start)).unwrap();
    let a = h.reply(vec![json!({
        "channel": "/meta/handshake", "id": hs.id, "successful": false,
        "error": "403::Handshake denied",
        "ext": {"sfdc": {"failureReason": "401::Request requires authentication"}},
        "advice": {"reconnect": "none"}
    })]);
    assert!(gave_up(&a));
}

#[test]
fn http_401_reauthenticates() {
    let mut h = Harness::with_provider();
    h.connected();
    let id = h.s.connect_id.clone().unwrap();
    let a = h.input(Input::SendFailed {
        ids: vec![id],
        failure: Failure::Unauthorized,
    });
    assert!(has_reauth(&a));
}

#[test]
fn token_endpoint_failures_back_off_up_to_the_cap() {
    let mut h = Harness::with_provider();
    assert!(has_reauth(&h.input(Input::Start)));
    let mut delays = Vec::new();
    for _ in 0..6 {
        let a = h.input(Input::Token(Err("invalid_grant".into())));
        assert!(
            matches!(events(&a)[..], [Event::AuthFailed { .. }]),
            "{a:?}"
        );
        let [(d, token)] = sleeps(&a)[..] else {
            panic!("{a:?}")
        };
        delays.push(d.as_millis());
        assert!(has_reauth(&h.input(Input::Wake(token))));
    }
    assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
    let a = h.input(Input::Token(Ok(())));
    assert!(handshake(&a).is_some());
    // The first token is no re-authentication.
    assert!(!events(&a).contains(&Event::Reauthenticated));
}

#[test]
fn server_sent_disconnect_rehandshakes_and_resubscribes() {
    let mut h = Harness::new(config());
    h.connected();
    h.subscribe("/a", -2);
    h.deliver("/a", 3);
    let a = h.reply(vec![
        json!({"channel": "/meta/disconnect", "clientId": "c1"}),
    ]);
    assert!(events(&a).contains(&Event::ServerDisconnected));
    let hs = handshake(&a).unwrap();
    let a = h.reply(vec![hs_ok(&hs, "c2")]);
    assert_eq!(subscribes(&a)[0].ext_get("replay"), Some(&json!({"/a": 3})));
}

#[test]
fn invalid_replay_id_falls_back_per_configuration() {
    for (fallback, wire) in [(ReplayFallback::All, -2), (ReplayFallback::New, -1)] {
        let mut h = Harness::new(Config {
            replay_fallback: fallback,
            ..config()
        });
        h.connected();
        let a = h.input(Input::Subscribe {
            channel: "/a".into(),
            replay: 1553783,
        });
        let sub = subscribes(&a).pop().unwrap();
        assert_eq!(sub.ext_get("replay"), Some(&json!({"/a": 1553783})));
        let a = h.reply(vec![json!({
            "channel": "/meta/subscribe", "id": sub.id, "subscription": "/a", "successful": false,
            "error": "400::The replayId {1553783} you provided was invalid.  Please provide a valid ID, -2 to replay all events, or -1 to replay only new events."
        })]);
        assert_eq!(
            events(&a),
            vec![Event::ReplayFallback {
                channel: "/a".into(),
                invalid: 1553783,
                fallback: wire
            }]
        );
        let again = subscribes(&a).pop().unwrap();
        assert_eq!(again.ext_get("replay"), Some(&json!({"/a": wire})));
        let a = h.reply(vec![json!({
            "channel": "/meta/subscribe", "id": again.id, "subscription": "/a", "successful": true
        })]);
        assert!(
            a.iter()
                .any(|x| matches!(x, Action::Subscribed { result: Ok(()), .. }))
        );
        // Whatever the server replays now is delivered: the refused position is forgotten.
        assert_eq!(delivered(&h.deliver("/a", 1)), vec![1]);
    }
    let mut h = Harness::new(Config {
        replay_fallback: ReplayFallback::Fail,
        ..config()
    });
    h.connected();
    let sub = subscribes(&h.input(Input::Subscribe {
        channel: "/a".into(),
        replay: 9,
    }))
    .pop()
    .unwrap();
    let a = h.reply(vec![json!({
        "channel": "/meta/subscribe", "id": sub.id, "successful": false,
        "error": "400::The replayId {9} you provided was invalid.  Please provide a valid ID, -2 to replay all events, or -1 to replay only new events."
    })]);
    assert!(
        a.iter()
            .any(|x| matches!(x, Action::Subscribed { result: Err(_), .. }))
    );
    assert!(matches!(events(&a)[..], [Event::SubscriptionFailed { .. }]));
    assert_eq!(h.s.subscriptions().count(), 0);
}

#[test]
fn busy_503_backs_off_then_retries() {
    let mut h = Harness::new(config());
    let hs = handshake(&h.input(Input::Start)).unwrap();
    let a = h.reply(vec![json!({
        "channel": "/meta/handshake", "id": hs.id, "successful": false,
        "error": "403::Handshake denied",
        "ext": {"sfdc": {"failureReason": "503::Server is too busy.  Please try your request again later."}},
        "advice": {"reconnect": "none"}
    })]);
    assert!(!gave_up(&a), "503 is transient even with reconnect none");
    let [(d, token)] = sleeps(&a)[..] else {
        panic!("{a:?}")
    };
    assert_eq!(d, Duration::from_millis(100));
    let hs = handshake(&h.input(Input::Wake(token))).unwrap();
    h.reply(vec![hs_ok(&hs, "c1")]);
    let id = h.connect_id();
    let a = h.reply(vec![json!({
        "channel": "/meta/connect", "id": id, "successful": false, "error": "503::server_busy"
    })]);
    let [(d, token)] = sleeps(&a)[..] else {
        panic!("{a:?}")
    };
    assert_eq!(d, Duration::from_millis(200));
    assert!(connect(&h.input(Input::Wake(token))).is_some());
}

#[test]
fn dedupe_at_the_seam() {
    let mut h = Harness::new(config());
    h.connected();
    h.subscribe("/a", -2);
    let mut got = Vec::new();
    for n in 1..=3 {
        got.extend(delivered(&h.deliver("/a", n)));
    }
    // A re-handshake; the server replays from 3, and some history overlaps anyway.
    let id = h.connect_id();
    let a = h.reply(vec![json!({
        "channel": "/meta/connect", "id": id, "successful": false,
        "error": "402::session_unknown", "advice": {"reconnect": "handshake", "interval": 0}
    })]);
    let hs = handshake(&a).unwrap();
    h.reply(vec![hs_ok(&hs, "c2")]);
    let batch: Vec<Value> = [2, 3, 4, 5, 5]
        .iter()
        .map(|n| json!({"channel": "/a", "data": {"n": n}, "ext": {"replay": n}}))
        .collect();
    got.extend(delivered(&h.reply(batch)));
    assert_eq!(got, vec![1, 2, 3, 4, 5]);
    assert_eq!(h.s.last_seen("/a"), Some(5));
    // Other channels keep their own sequence.
    assert_eq!(delivered(&h.deliver("/b", 1)), vec![1]);
}

#[test]
fn stalled_connect_reconnects_then_escalates_to_handshake() {
    let mut h = Harness::new(config());
    h.connected();
    let id = h.s.connect_id.clone().unwrap();
    let a = h.input(Input::ConnectStalled { id });
    assert_eq!(
        events(&a),
        vec![Event::Stalled {
            count: 1,
            rehandshake: false
        }]
    );
    let (c, deadline) = connect(&a).unwrap();
    assert_eq!(c.advice.and_then(|a| a.timeout), Some(0));
    assert_eq!(deadline, Duration::from_secs(10));
    // The quick connect answers; that does not prove the held ones work.
    let a = h.reply(vec![
        json!({"channel": "/meta/connect", "id": c.id, "successful": true}),
    ]);
    assert!(matches!(events(&a)[..], [Event::Connected { .. }]));
    let id = h.s.connect_id.clone().unwrap();
    let a = h.input(Input::ConnectStalled { id });
    assert!(events(&a).contains(&Event::Stalled {
        count: 2,
        rehandshake: true
    }));
    assert!(handshake(&a).is_some());
    // A stall report for a connect that already answered is ignored.
    assert!(h.input(Input::ConnectStalled { id: "1".into() }).is_empty());
}

#[test]
fn transport_failures_retry_at_once_then_back_off() {
    let mut h = Harness::new(config());
    h.connected();
    let id = h.s.connect_id.clone().unwrap();
    let a = h.input(Input::SendFailed {
        ids: vec![id],
        failure: Failure::Status(500),
    });
    let (c, _) = connect(&a).expect("the first failure retries at once");
    let a = h.input(Input::SendFailed {
        ids: vec![c.id.as_ref().unwrap().as_str().unwrap().to_owned()],
        failure: Failure::Invalid("not JSON".into()),
    });
    let [(d, _)] = sleeps(&a)[..] else {
        panic!("{a:?}")
    };
    assert_eq!(d, Duration::from_millis(100));
    assert!(matches!(
        events(&a)[..],
        [Event::Reconnecting {
            handshake: false,
            attempt: 2,
            ..
        }]
    ));
}

#[test]
fn a_reply_without_successful_is_a_failure_not_a_panic() {
    let mut h = Harness::new(config());
    let hs = handshake(&h.input(Input::Start)).unwrap();
    let a = h.reply(vec![
        json!({"channel": "/meta/handshake", "id": hs.id, "clientId": "x"}),
    ]);
    assert!(matches!(
        events(&a)[..],
        [Event::Reconnecting {
            handshake: true,
            ..
        }]
    ));
    let hs = handshake(&a).unwrap();
    h.reply(vec![hs_ok(&hs, "c1")]);
    let id = h.connect_id();
    let a = h.reply(vec![json!({"channel": "/meta/connect", "id": id})]);
    assert!(connect(&a).is_some() || !sleeps(&a).is_empty(), "{a:?}");
    // A response that lacks the reply altogether counts as a failure too.
    let id = h.s.connect_id.clone();
    if let Some(id) = id {
        let a = h.input(Input::Response {
            sent: vec![id],
            messages: vec![],
        });
        assert!(!events(&a).is_empty());
    }
}

#[test]
fn auto_negotiates_websocket_and_falls_back() {
    let mut h = Harness::new(Config {
        transport: TransportKind::Auto,
        ..config()
    });
    let hs = handshake(&h.input(Input::Start)).unwrap();
    assert_eq!(
        hs.supported_connection_types,
        Some(vec!["websocket".to_owned(), "long-polling".to_owned()])
    );
    let mut reply = hs_ok(&hs, "c1");
    reply["supportedConnectionTypes"] = json!(["websocket", "long-polling"]);
    let a = h.reply(vec![reply]);
    assert!(matches!(a[0], Action::UseTransport("websocket")), "{a:?}");
    let (c, _) = connect(&a).unwrap();
    assert_eq!(c.connection_type.as_deref(), Some("websocket"));
    let a = h.input(Input::TransportUnavailable);
    assert!(matches!(a[0], Action::UseTransport("long-polling")));
    let a = h.input(Input::SendFailed {
        ids: vec![c.id.unwrap().as_str().unwrap().into()],
        failure: Failure::Io("refused".into()),
    });
    let (c, _) = connect(&a).unwrap();
    assert_eq!(c.connection_type.as_deref(), Some("long-polling"));
    // Salesforce offers long-polling only.
    let mut h = Harness::new(Config {
        transport: TransportKind::Auto,
        ..config()
    });
    let hs = handshake(&h.input(Input::Start)).unwrap();
    let a = h.reply(vec![hs_ok(&hs, "c1")]);
    assert_eq!(
        connect(&a).unwrap().0.connection_type.as_deref(),
        Some("long-polling")
    );
}

#[test]
fn publish_waits_for_the_handshake_and_returns_the_ack() {
    let mut h = Harness::new(config());
    let hs = handshake(&h.input(Input::Start)).unwrap();
    let a = h.input(Input::Publish {
        ticket: 9,
        channel: "/chat".into(),
        data: json!({"t": 1}),
    });
    assert!(a.is_empty(), "queued until handshaken");
    let a = h.reply(vec![hs_ok(&hs, "c1")]);
    let p = sent(&a).pop().unwrap();
    assert_eq!(p.channel, "/chat");
    assert_eq!(p.client_id.as_deref(), Some("c1"));
    let a = h.reply(vec![
        json!({"channel": "/chat", "id": p.id, "successful": true}),
    ]);
    assert!(matches!(
        a[..],
        [Action::Published {
            ticket: 9,
            result: Ok(_)
        }]
    ));
    let a = h.input(Input::Publish {
        ticket: 10,
        channel: "/chat".into(),
        data: json!(2),
    });
    let p = sent(&a).pop().unwrap();
    let a = h.reply(vec![json!({
        "channel": "/chat", "id": p.id, "successful": false, "error": "403::publish_denied"
    })]);
    assert!(matches!(
        &a[..],
        [Action::Published { ticket: 10, result: Err(e) }] if e == "403::publish_denied"
    ));
}

#[test]
fn a_delivery_with_an_id_is_not_mistaken_for_an_ack() {
    let mut h = Harness::new(config());
    h.connected();
    let a = h.input(Input::Publish {
        ticket: 1,
        channel: "/chat".into(),
        data: json!(1),
    });
    let p = sent(&a).pop().unwrap();
    // Our own message comes back as a delivery carrying the same id.
    let a = h.reply(vec![
        json!({"channel": "/chat", "id": p.id, "data": 1, "ext": {"replay": 1}}),
        json!({"channel": "/chat", "id": p.id, "successful": true}),
    ]);
    assert_eq!(delivered(&a), vec![1]);
    assert!(
        a.iter()
            .any(|x| matches!(x, Action::Published { result: Ok(_), .. }))
    );
}

#[test]
fn refused_subscribe_settles_the_caller() {
    let mut h = Harness::new(config());
    h.connected();
    let a = h.input(Input::Subscribe {
        channel: "/secret".into(),
        replay: -1,
    });
    let sub = subscribes(&a).pop().unwrap();
    let a = h.reply(vec![json!({
        "channel": "/meta/subscribe", "id": sub.id, "successful": false,
        "error": "403:denied_by_security_policy:subscribe_denied"
    })]);
    assert!(a.iter().any(|x| matches!(
        x,
        Action::Subscribed { result: Err(e), .. } if e.contains("subscribe_denied")
    )));
    // A 403 on a subscribe is no auth failure.
    assert!(!has_reauth(&a));
}

#[test]
fn subscribe_before_the_handshake_goes_out_with_it() {
    let mut h = Harness::new(config());
    let hs = handshake(&h.input(Input::Start)).unwrap();
    assert!(
        h.input(Input::Subscribe {
            channel: "/a".into(),
            replay: 10
        })
        .is_empty()
    );
    let a = h.reply(vec![hs_ok(&hs, "c1")]);
    let subs = subscribes(&a);
    assert_eq!(subs[0].ext_get("replay"), Some(&json!({"/a": 10})));
    // After 10: 10 and before are already had.
    assert_eq!(delivered(&h.deliver("/a", 10)), Vec::<i64>::new());
    assert_eq!(delivered(&h.deliver("/a", 11)), vec![11]);
}

#[test]
fn no_replay_map_unless_the_server_echoes_replay() {
    let mut h = Harness::new(config());
    let hs = handshake(&h.input(Input::Start)).unwrap();
    let mut reply = hs_ok(&hs, "c1");
    reply.as_object_mut().unwrap().remove("ext");
    h.reply(vec![reply]);
    let a = h.input(Input::Subscribe {
        channel: "/a".into(),
        replay: -1,
    });
    assert_eq!(subscribes(&a)[0].ext, None);
}

#[test]
fn unsubscribe_and_disconnect() {
    let mut h = Harness::new(config());
    h.connected();
    h.subscribe("/a", -1);
    let a = h.input(Input::Unsubscribe {
        channel: "/a".into(),
    });
    assert_eq!(sent(&a)[0].channel, "/meta/unsubscribe");
    let a = h.input(Input::Disconnect);
    let d = sent(&a).pop().unwrap();
    assert_eq!(d.channel, "/meta/disconnect");
    assert_eq!(h.s.phase(), Phase::Disconnecting);
    // The held connect comes back with reconnect none: no give-up, no re-auth.
    let id = h.connect_id();
    let a = h.reply(vec![json!({
        "channel": "/meta/connect", "id": id, "successful": true, "advice": {"reconnect": "none"}
    })]);
    assert!(a.is_empty(), "{a:?}");
    let a = h.reply(vec![
        json!({"channel": "/meta/disconnect", "id": d.id, "successful": true}),
    ]);
    assert_eq!(events(&a), vec![Event::Disconnected]);
    assert!(matches!(a.last(), Some(Action::Close)));
}

#[test]
fn a_stale_connect_reply_is_ignored_but_its_deliveries_count() {
    let mut h = Harness::new(config());
    h.connected();
    h.subscribe("/a", -1);
    let a = h.reply(vec![
        json!({"channel": "/a", "data": 1, "ext": {"replay": 1}}),
        json!({"channel": "/meta/connect", "id": "nope", "successful": false, "advice": {"reconnect": "none"}}),
    ]);
    assert_eq!(delivered(&a), vec![1]);
    assert_eq!(h.s.phase(), Phase::Connected);
}

#[test]
fn give_up_after_consecutive_failures() {
    let mut h = Harness::new(Config {
        give_up_after: Some(2),
        ..config()
    });
    let mut a = h.input(Input::Start);
    for _ in 0..3 {
        if let Some(hs) = handshake(&a) {
            a = h.input(Input::SendFailed {
                ids: vec![hs.id.unwrap().as_str().unwrap().into()],
                failure: Failure::Io("refused".into()),
            });
        } else {
            let (_, token) = sleeps(&a)[0];
            let b = h.input(Input::Wake(token));
            let hs = handshake(&b).unwrap();
            a = h.input(Input::SendFailed {
                ids: vec![hs.id.unwrap().as_str().unwrap().into()],
                failure: Failure::Io("refused".into()),
            });
        }
    }
    assert!(gave_up(&a), "{a:?}");
}

#[test]
fn ack_extension_rides_on_connects() {
    let mut h = Harness {
        s: State::new(config(), vec![Box::new(AckExtension::new())]),
        now: Instant::now(),
    };
    let hs = handshake(&h.input(Input::Start)).unwrap();
    assert_eq!(hs.ext_get("ack"), Some(&json!(true)));
    let mut reply = hs_ok(&hs, "c1");
    reply["ext"]["ack"] = json!(true);
    let a = h.reply(vec![reply]);
    let (c, _) = connect(&a).unwrap();
    assert_eq!(c.ext_get("ack"), Some(&json!(0)));
    let a = h.reply(vec![json!({
        "channel": "/meta/connect", "id": c.id, "successful": true, "ext": {"ack": 4}
    })]);
    assert_eq!(connect(&a).unwrap().0.ext_get("ack"), Some(&json!(4)));
}

#[test]
fn advice_on_a_failure_steers_that_retry_only() {
    let mut h = Harness::new(config());
    h.connected();
    let id = h.connect_id();
    let a = h.reply(vec![json!({
        "channel": "/meta/connect", "id": id, "successful": false,
        "error": "503::Server is too busy.  Please try your request again later.",
        "advice": {"reconnect": "retry", "interval": 1000}
    })]);
    let [(d, token)] = sleeps(&a)[..] else {
        panic!("{a:?}")
    };
    assert_eq!(d, Duration::from_millis(1000));
    let (c, _) = connect(&h.input(Input::Wake(token))).unwrap();
    let a = h.reply(vec![
        json!({"channel": "/meta/connect", "id": c.id, "successful": true}),
    ]);
    assert!(connect(&a).is_some(), "interval 0 is still in force: {a:?}");
}

#[test]
fn max_interval_expiry_switches_to_handshake() {
    let mut h = Harness::new(config());
    h.connected();
    let id = h.connect_id();
    h.reply(vec![json!({
        "channel": "/meta/connect", "id": id, "successful": true,
        "advice": {"reconnect": "retry", "interval": 0, "timeout": 1000, "maxInterval": 1000}
    })]);
    h.now += Duration::from_secs(5);
    let id = h.s.connect_id.clone().unwrap();
    let a = h.input(Input::SendFailed {
        ids: vec![id],
        failure: Failure::Io("reset".into()),
    });
    assert!(handshake(&a).is_some(), "{a:?}");
}

#[test]
fn a_live_start_resumes_from_the_position_the_server_named() {
    let mut h = Harness::new(config());
    h.connected();
    for (channel, replay, ext) in [
        ("/a", -1, json!({"replay": {"/a": 41}})),
        ("/b", -1, json!({})),
        ("/c", -2, json!({"replay": {"/c": 9}})),
        ("/d", -1, json!({"replay": {"/d": "x"}})),
    ] {
        let a = h.input(Input::Subscribe {
            channel: channel.into(),
            replay,
        });
        let sub = subscribes(&a).pop().expect("a subscribe");
        h.reply(vec![json!({
            "channel": "/meta/subscribe", "id": sub.id, "subscription": channel,
            "successful": true, "ext": ext
        })]);
    }
    assert_eq!(h.s.replay_position("/a"), Some(41), "the server's position");
    assert_eq!(h.s.replay_position("/b"), Some(-1), "no position named");
    assert_eq!(
        h.s.replay_position("/c"),
        Some(-2),
        "only live starts change"
    );
    assert_eq!(h.s.replay_position("/d"), Some(-1), "not a replay ID");
    // Events published before the subscribe are not mistaken for duplicates.
    assert_eq!(delivered(&h.deliver("/a", 40)), vec![40]);
    assert_eq!(
        h.s.replay_position("/a"),
        Some(40),
        "what was delivered wins"
    );
    // The session is lost before /b saw anything: the map still says -1 for it, and /a
    // resumes after what it got.
    let reply = json!({
        "channel": "/meta/connect", "id": h.connect_id(), "successful": false,
        "error": "402::session_unknown", "advice": {"reconnect": "handshake"}
    });
    let a = h.reply(vec![reply]);
    let hs = handshake(&a).expect("handshake");
    let a = h.reply(vec![hs_ok(&hs, "c2")]);
    let subs = subscribes(&a);
    assert_eq!(
        subs[0].ext_get("replay"),
        Some(&json!({"/a": 40, "/b": -1, "/c": -2, "/d": -1}))
    );
}
