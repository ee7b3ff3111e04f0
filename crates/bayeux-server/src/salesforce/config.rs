//! The `[salesforce]` configuration section: the org the emulator plays.

use serde::{Deserialize, Serialize};

/// What kind of streaming channel a declared channel is, which decides its event shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChannelKind {
    /// `/event/<Name>__e`: `{schema, payload: {…, CreatedDate, CreatedById}, event:
    /// {EventUuid, replayId}}`.
    PlatformEvent,
    /// `/topic/<Name>`: `{event: {createdDate, replayId, type}, sobject: {…}}`.
    PushTopic,
    /// `/u/<Name>`: `{event: {createdDate, replayId}, payload: "…"}`.
    Generic,
    /// `/data/<Entity>ChangeEvent` or `/data/ChangeEvents`: `{schema, payload:
    /// {ChangeEventHeader, …}, event: {replayId}}`.
    ChangeDataCapture,
}

/// A user of the org.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// Login name.
    pub username: String,
    /// Password (the security token, if any, is appended to it at login, as Salesforce does).
    pub password: String,
    /// Security token appended to the password at login (empty: none).
    #[serde(default)]
    pub security_token: String,
    /// The 18-character user ID (`005…`).
    pub user_id: String,
    /// Refresh tokens this user holds (for the `refresh_token` grant).
    #[serde(default)]
    pub refresh_tokens: Vec<String>,
}

/// A connected app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct App {
    /// OAuth `client_id` (consumer key).
    pub client_id: String,
    /// OAuth `client_secret` (consumer secret).
    pub client_secret: String,
    /// For the client-credentials flow: the user it runs as.
    #[serde(default)]
    pub run_as: Option<String>,
    /// For the JWT bearer flow: the PEM file of the public key that verifies assertions.
    #[serde(default)]
    pub jwt_public_key_file: Option<String>,
    /// For the JWT bearer flow: the PEM public key itself (instead of a file).
    #[serde(default)]
    pub jwt_public_key: Option<String>,
}

/// A declared streaming channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Channel {
    /// The channel name, e.g. `/event/Low_Ink__e`, `/topic/InvoiceUpdates`, `/u/Notifications`.
    pub name: String,
    /// Its kind; guessed from the name when absent.
    #[serde(default)]
    pub kind: Option<ChannelKind>,
    /// For generic channels: the `StreamingChannel` record ID (`0M6…`) used by the push API.
    #[serde(default)]
    pub id: Option<String>,
}

impl Channel {
    /// The kind, declared or guessed from the name.
    pub fn kind(&self) -> ChannelKind {
        self.kind.unwrap_or_else(|| guess_kind(&self.name))
    }
}

/// The channel kind a name suggests.
pub fn guess_kind(name: &str) -> ChannelKind {
    if name.starts_with("/topic/") {
        ChannelKind::PushTopic
    } else if name.starts_with("/u/") {
        ChannelKind::Generic
    } else if name.starts_with("/data/") {
        ChannelKind::ChangeDataCapture
    } else {
        ChannelKind::PlatformEvent
    }
}

/// The `[salesforce]` section. Its presence (or `bayeux serve --salesforce`) turns the emulator on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SalesforceConfig {
    /// The 18-character org ID (`00D…`).
    pub org_id: String,
    /// How long an access token lives, seconds.
    pub token_lifetime_secs: u64,
    /// `advice.timeout` of the first connect and how long connects are held, seconds.
    pub connect_timeout_secs: u64,
    /// A session with no request for this long is swept (`403::Unknown client`), seconds.
    pub reconnect_deadline_secs: u64,
    /// Largest request body on `/cometd/<version>`, bytes (larger: HTTP 413).
    pub max_body_bytes: usize,
    /// The oldest API version accepted on `/cometd/<version>`.
    pub min_api_version: String,
    /// The version shown in error texts (`URI format: '/cometd/66.0'`).
    pub latest_api_version: String,
    /// Most concurrent streaming clients (handshaken sessions) in the org.
    pub max_concurrent_clients: usize,
    /// Most event deliveries per rolling day (0: no limit).
    pub daily_delivery_limit: u64,
    /// The org's base URL as given to clients (`instance_url`); empty: the server's own URL.
    pub instance_url: String,
    /// Users.
    pub users: Vec<User>,
    /// Connected apps.
    pub apps: Vec<App>,
    /// Streaming channels.
    pub channels: Vec<Channel>,
}

impl Default for SalesforceConfig {
    fn default() -> Self {
        SalesforceConfig {
            org_id: "00D000000000001AAA".into(),
            token_lifetime_secs: 7200,
            connect_timeout_secs: 110,
            reconnect_deadline_secs: 40,
            max_body_bytes: 32_768,
            min_api_version: "37.0".into(),
            latest_api_version: "66.0".into(),
            max_concurrent_clients: 2000,
            daily_delivery_limit: 0,
            instance_url: String::new(),
            users: Vec::new(),
            apps: Vec::new(),
            channels: Vec::new(),
        }
    }
}

impl SalesforceConfig {
    /// The demo org of `bayeux serve --salesforce` without configuration: user
    /// `demo@example.com` / `demo`, app `demo` / `demo`, channels `/event/Demo__e`,
    /// `/topic/DemoTopic` and `/u/Demo`.
    pub fn demo() -> Self {
        SalesforceConfig {
            users: vec![User {
                username: "demo@example.com".into(),
                password: "demo".into(),
                security_token: String::new(),
                user_id: "005000000000001AAA".into(),
                refresh_tokens: vec!["demo-refresh-token".into()],
            }],
            apps: vec![App {
                client_id: "demo".into(),
                client_secret: "demo".into(),
                run_as: Some("demo@example.com".into()),
                jwt_public_key_file: None,
                jwt_public_key: None,
            }],
            channels: vec![
                Channel {
                    name: "/event/Demo__e".into(),
                    kind: Some(ChannelKind::PlatformEvent),
                    id: None,
                },
                Channel {
                    name: "/topic/DemoTopic".into(),
                    kind: Some(ChannelKind::PushTopic),
                    id: None,
                },
                Channel {
                    name: "/u/Demo".into(),
                    kind: Some(ChannelKind::Generic),
                    id: Some("0M6000000000001AAA".into()),
                },
            ],
            ..SalesforceConfig::default()
        }
    }

    /// Checks values serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        if parse_version(&self.min_api_version).is_none() {
            return Err(format!(
                "salesforce.min_api_version {:?} is not a version like 37.0",
                self.min_api_version
            ));
        }
        for c in &self.channels {
            let base = c.name.split('?').next().unwrap_or("");
            bayeux_protocol::ChannelName::new(base)
                .map_err(|e| format!("salesforce channel {:?}: {e}", c.name))?;
        }
        for app in &self.apps {
            if let Some(run_as) = &app.run_as
                && !self.users.iter().any(|u| &u.username == run_as)
            {
                return Err(format!(
                    "salesforce app {:?} runs as unknown user {run_as:?}",
                    app.client_id
                ));
            }
        }
        Ok(())
    }

    /// The declared channel named `name` (without any `?filter`).
    pub fn channel(&self, name: &str) -> Option<&Channel> {
        self.channels.iter().find(|c| c.name == name)
    }
}

/// `"59.0"` → `Some(59.0)`.
pub fn parse_version(v: &str) -> Option<f64> {
    let (major, minor) = v.split_once('.')?;
    if major.is_empty() || !major.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if minor.is_empty() || !minor.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}
