//! The Salesforce emulator: the server plays the Salesforce Streaming API so subscribers can be
//! tested offline, failures included.
//!
//! It is a profile of the same broker, not a second server: the [`SalesforcePolicy`] checks
//! bearer tokens, the Salesforce [`Dialect`](bayeux_protocol::Dialect) supplies the error texts,
//! and [`routes`] adds the OAuth, REST publish and fault-injection endpoints.

pub mod config;
mod oauth;
mod rest;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{HeaderMap, header};
use bayeux_protocol::{Advice, ErrorKind, Message, Reconnect};
use parking_lot::Mutex;
use rand::Rng;
use serde_json::{Value, json};

pub use config::SalesforceConfig;

use crate::broker::{Broker, Session};
use crate::policy::{Denial, Operation, RequestInfo, SecurityPolicy};

/// An issued access token.
#[derive(Debug, Clone)]
pub(crate) struct Token {
    /// Index into `config.users`.
    pub(crate) user: usize,
    pub(crate) expires: Instant,
    pub(crate) revoked: bool,
}

/// The emulator's state: the org, its tokens and the faults to inject.
pub struct Emulator {
    config: SalesforceConfig,
    tokens: Mutex<HashMap<String, Token>>,
    /// Refresh tokens revoked through `/services/oauth2/revoke` or `/_emulator/revoke`.
    revoked_refresh: Mutex<Vec<String>>,
    busy: AtomicU64,
    instance_url: OnceLock<String>,
    broker: OnceLock<Weak<Broker>>,
    delivered_today: Mutex<(Instant, u64)>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("org_id", &self.config.org_id)
            .finish_non_exhaustive()
    }
}

fn random_alnum(n: usize) -> String {
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..n)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

/// The token in an `Authorization` header: `Bearer <t>`, `OAuth <t>` or a bare token.
pub fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let token = match value.split_once(' ') {
        Some((scheme, rest))
            if scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("oauth") =>
        {
            rest.trim()
        }
        _ => value,
    };
    (!token.is_empty()).then(|| token.to_owned())
}

impl Emulator {
    /// An emulator for `config`.
    pub fn new(config: SalesforceConfig) -> Arc<Self> {
        Arc::new(Emulator {
            config,
            tokens: Mutex::new(HashMap::new()),
            revoked_refresh: Mutex::new(Vec::new()),
            busy: AtomicU64::new(0),
            instance_url: OnceLock::new(),
            broker: OnceLock::new(),
            delivered_today: Mutex::new((Instant::now(), 0)),
        })
    }

    /// The org.
    pub fn config(&self) -> &SalesforceConfig {
        &self.config
    }

    /// Sets the server's own base URL (used as `instance_url` unless the config names one) and
    /// the broker. Called once the server is bound.
    pub fn attach(&self, base_url: &str, broker: &Arc<Broker>) {
        let url = if self.config.instance_url.is_empty() {
            base_url.trim_end_matches('/').to_owned()
        } else {
            self.config.instance_url.trim_end_matches('/').to_owned()
        };
        let _ = self.instance_url.set(url);
        let _ = self.broker.set(Arc::downgrade(broker));
    }

    /// The org's base URL as given to clients.
    pub fn instance_url(&self) -> &str {
        self.instance_url.get().map(String::as_str).unwrap_or("")
    }

    fn broker(&self) -> Option<Arc<Broker>> {
        self.broker.get().and_then(Weak::upgrade)
    }

    /// Issues an access token for user `user` (an index into `config.users`).
    pub(crate) fn issue(&self, user: usize) -> String {
        let org15 = &self.config.org_id[..self.config.org_id.len().min(15)];
        let token = format!("{org15}!AQ{}", random_alnum(94));
        let expires = Instant::now() + Duration::from_secs(self.config.token_lifetime_secs);
        self.tokens.lock().insert(
            token.clone(),
            Token {
                user,
                expires,
                revoked: false,
            },
        );
        token
    }

    /// The user index of a live token.
    pub(crate) fn validate(&self, token: &str) -> Option<usize> {
        let tokens = self.tokens.lock();
        let t = tokens.get(token)?;
        (!t.revoked && Instant::now() < t.expires).then_some(t.user)
    }

    /// Revokes one access token or refresh token. False if it was never issued.
    pub(crate) fn revoke(&self, token: &str) -> bool {
        if let Some(t) = self.tokens.lock().get_mut(token) {
            t.revoked = true;
            return true;
        }
        let known_refresh = self
            .config
            .users
            .iter()
            .any(|u| u.refresh_tokens.iter().any(|r| r == token));
        if known_refresh {
            self.revoked_refresh.lock().push(token.to_owned());
        }
        known_refresh
    }

    pub(crate) fn refresh_revoked(&self, token: &str) -> bool {
        self.revoked_refresh.lock().iter().any(|r| r == token)
    }

    /// Fault injection: every token dies (access and refresh).
    pub fn revoke_all(&self) -> usize {
        let mut tokens = self.tokens.lock();
        for t in tokens.values_mut() {
            t.revoked = true;
        }
        let mut refresh = self.revoked_refresh.lock();
        for u in &self.config.users {
            refresh.extend(u.refresh_tokens.iter().cloned());
        }
        tokens.len()
    }

    /// Fault injection: the next `count` meta replies are `503::Server is too busy`.
    pub fn set_busy(&self, count: u64) {
        self.busy.store(count, Ordering::SeqCst);
    }

    fn take_busy(&self) -> bool {
        self.busy
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Counts deliveries against the daily limit; true while within it.
    pub(crate) fn within_daily_limit(&self) -> bool {
        let limit = self.config.daily_delivery_limit;
        if limit == 0 {
            return true;
        }
        let Some(broker) = self.broker() else {
            return true;
        };
        let mut day = self.delivered_today.lock();
        let out = broker.metrics().messages_out.get();
        if day.0.elapsed() >= Duration::from_secs(24 * 3600) {
            *day = (Instant::now(), out);
        }
        out.saturating_sub(day.1) < limit
    }

    /// The user IDs of sessions connected now, for the push API's online status.
    pub(crate) fn online_user_ids(&self) -> Vec<String> {
        let Some(broker) = self.broker() else {
            return Vec::new();
        };
        broker
            .session_ids()
            .into_iter()
            .filter_map(|id| broker.session(&id))
            .filter_map(|s| {
                s.attributes
                    .lock()
                    .get("sf_user_id")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .collect()
    }

    fn handshake_denial(&self, reason: ErrorKind) -> Denial {
        Denial {
            error: ErrorKind::HandshakeDenied,
            advice: Some(Advice {
                reconnect: Some(Reconnect::None),
                ..Advice::default()
            }),
            ext: Some(json!({
                "sfdc": {"failureReason": reason.wire(bayeux_protocol::Dialect::Salesforce)},
                "replay": true,
                "payload.format": true,
            })),
        }
    }
}

/// The security policy of the emulator: bearer tokens, declared channels, limits and the
/// injected faults.
#[derive(Debug, Clone)]
pub struct SalesforcePolicy {
    emulator: Arc<Emulator>,
}

impl SalesforcePolicy {
    /// A policy for `emulator`.
    pub fn new(emulator: Arc<Emulator>) -> Self {
        SalesforcePolicy { emulator }
    }

    fn token_of(&self, request: &RequestInfo<'_>, session: Option<&Session>) -> Option<String> {
        bearer(request.headers).or_else(|| {
            session?
                .attributes
                .lock()
                .get("sf_token")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
    }

    fn auth_invalid() -> Denial {
        Denial {
            error: ErrorKind::AuthenticationInvalid,
            advice: Some(Advice::none()),
            ext: None,
        }
    }
}

impl SecurityPolicy for SalesforcePolicy {
    #[allow(clippy::result_large_err)]
    fn authorize(
        &self,
        request: &RequestInfo<'_>,
        session: Option<&Session>,
        operation: Operation<'_>,
        _message: &Message,
    ) -> Result<(), Denial> {
        let e = &self.emulator;
        if !matches!(operation, Operation::Publish(_)) && e.take_busy() {
            return Err(Denial {
                error: ErrorKind::TooBusy,
                advice: Some(Advice {
                    reconnect: Some(Reconnect::Retry),
                    interval: Some(1000),
                    ..Advice::default()
                }),
                ext: Some(
                    json!({"sfdc": {"failureReason": ErrorKind::TooBusy.wire(bayeux_protocol::Dialect::Salesforce)}}),
                ),
            });
        }
        match operation {
            Operation::Handshake => {
                let Some(token) = bearer(request.headers) else {
                    return Err(e.handshake_denial(ErrorKind::AuthenticationRequired));
                };
                let Some(user) = e.validate(&token) else {
                    return Err(e.handshake_denial(ErrorKind::AuthenticationInvalid));
                };
                if let Some(broker) = e.broker()
                    && broker.session_count() >= e.config.max_concurrent_clients
                {
                    return Err(e.handshake_denial(ErrorKind::SessionLimit));
                }
                if let Some(session) = session {
                    let mut attrs = session.attributes.lock();
                    attrs.insert("sf_token".into(), Value::String(token));
                    attrs.insert(
                        "sf_user_id".into(),
                        Value::String(e.config.users[user].user_id.clone()),
                    );
                }
                Ok(())
            }
            Operation::Connect | Operation::Subscribe(_) => {
                let alive = self
                    .token_of(request, session)
                    .is_some_and(|t| e.validate(&t).is_some());
                if !alive {
                    return Err(Self::auth_invalid());
                }
                if let Operation::Subscribe(channel) = operation
                    && e.config.channel(channel.as_str()).is_none()
                {
                    return Err(Denial::new(ErrorKind::ChannelNotFound(channel.to_string())));
                }
                if matches!(operation, Operation::Connect) && !e.within_daily_limit() {
                    return Err(Denial {
                        error: ErrorKind::DailyLimitExceeded,
                        advice: Some(Advice::none()),
                        ext: None,
                    });
                }
                Ok(())
            }
            // Salesforce does not let streaming clients publish.
            Operation::Publish(_) => Err(Denial::new(ErrorKind::PublishDenied(String::new()))),
        }
    }
}

/// The emulator's extra routes: OAuth, SOAP login, REST publish and `/_emulator/*` faults.
pub fn routes(emulator: Arc<Emulator>, broker: Arc<Broker>) -> Router {
    oauth::routes(emulator.clone()).merge(rest::routes(emulator, broker))
}

/// The ISO-8601 UTC time Salesforce uses in events (`2017-04-09T18:31:40.517Z`).
pub(crate) fn iso_now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// A short human text listing the demo org, printed at startup.
pub fn describe(emulator: &Emulator) -> String {
    let c = &emulator.config;
    let mut out = format!(
        "Salesforce emulator: org {} at {} (token lifetime {} s, connect timeout {} s)\n",
        c.org_id,
        emulator.instance_url(),
        c.token_lifetime_secs,
        c.connect_timeout_secs
    );
    for u in &c.users {
        out.push_str(&format!("  user     {} / {}\n", u.username, u.password));
    }
    for a in &c.apps {
        out.push_str(&format!(
            "  app      client_id {} / client_secret {}\n",
            a.client_id, a.client_secret
        ));
    }
    for ch in &c.channels {
        out.push_str(&format!("  channel  {} ({:?})\n", ch.name, ch.kind()));
    }
    out.push_str(&format!(
        "  token    POST {}/services/oauth2/token   streaming {}/cometd/{}",
        emulator.instance_url(),
        emulator.instance_url(),
        c.latest_api_version
    ));
    out
}
