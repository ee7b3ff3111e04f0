//! Server configuration: a serde struct loaded from TOML, with the commented default file
//! embedded for `bayeux generate-config`.

use std::time::Duration;

use bayeux_engine::Retention;
use serde::{Deserialize, Serialize};

/// The commented default configuration file.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../bayeux.toml");

/// Which engine stores history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    /// Durable logs under `data_dir`, group-committed: survives restarts and crashes.
    #[default]
    Disk,
    /// In this process; nothing survives a restart (for tests).
    Memory,
    /// Shared by several nodes through Redis (`[redis]`): any node serves any client.
    Redis,
}

/// What to do when a session's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum QueueOverflow {
    /// Drop the oldest waiting message.
    #[default]
    DropOldest,
    /// End the session.
    Disconnect,
}

/// The whole server configuration. See `bayeux.toml` for every key with its default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on.
    pub bind: String,
    /// URL path of the Bayeux endpoint.
    pub path: String,
    /// Storage engine.
    pub engine: EngineKind,
    /// Where the disk engine keeps its data.
    pub data_dir: String,
    /// Connection types offered, in order of preference.
    pub transports: Vec<String>,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Limits on input and resources.
    pub limits: Limits,
    /// History kept per channel.
    pub retention: RetentionConfig,
    /// The Redis engine.
    pub redis: RedisConfig,
    /// The Salesforce emulator; present means on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub salesforce: Option<crate::salesforce::SalesforceConfig>,
}

/// `[timeouts]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// How long a connect is held (advice.timeout), ms.
    pub connect_timeout_ms: u64,
    /// advice.interval, ms.
    pub interval_ms: u64,
    /// Session expiry after the last connect reply, ms.
    pub max_interval_ms: u64,
    /// Batching delay for a held connect that has messages, ms.
    pub lazy_delay_ms: u64,
    /// How often expired sessions are swept, ms.
    pub sweep_interval_ms: u64,
    /// How long shutdown waits for open requests, ms.
    pub shutdown_grace_ms: u64,
    /// How long reading one HTTP request may take once its first byte arrived, ms.
    pub request_read_timeout_ms: u64,
}

/// `[limits]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest HTTP body, bytes.
    pub max_body_bytes: usize,
    /// Largest HTTP request head (request line and header fields), bytes.
    pub max_header_bytes: usize,
    /// Largest WebSocket message, bytes.
    pub max_frame_bytes: usize,
    /// Most messages per HTTP body or WebSocket frame.
    pub max_messages_per_request: usize,
    /// Most messages waiting in one session's queue.
    pub max_queue: usize,
    /// What happens when a queue is full.
    pub queue_overflow: QueueOverflow,
    /// Most live sessions.
    pub max_sessions: usize,
    /// Most subscriptions per session.
    pub max_subscriptions_per_session: usize,
    /// Longest JSONP callback name.
    pub jsonp_callback_max_len: usize,
}

/// `[redis]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db`.
    pub url: String,
    /// Prefix of every key, so several clusters can share one Redis.
    pub prefix: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379/0".into(),
            prefix: "bayeux:".into(),
        }
    }
}

/// `[retention]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Maximum age, seconds.
    pub max_age_secs: u64,
    /// Maximum messages per channel.
    pub max_messages: usize,
    /// Maximum payload bytes per channel.
    pub max_bytes: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind: "127.0.0.1:8080".into(),
            path: "/cometd".into(),
            engine: EngineKind::Disk,
            data_dir: "./data".into(),
            transports: vec![
                "websocket".into(),
                "long-polling".into(),
                "callback-polling".into(),
            ],
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            retention: RetentionConfig::default(),
            redis: RedisConfig::default(),
            salesforce: None,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect_timeout_ms: 30_000,
            interval_ms: 0,
            max_interval_ms: 10_000,
            lazy_delay_ms: 0,
            sweep_interval_ms: 1_000,
            shutdown_grace_ms: 5_000,
            request_read_timeout_ms: 30_000,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 64 * 1024,
            max_header_bytes: 64 * 1024,
            max_frame_bytes: 64 * 1024,
            max_messages_per_request: 1_000,
            max_queue: 10_000,
            queue_overflow: QueueOverflow::DropOldest,
            max_sessions: 1_000_000,
            max_subscriptions_per_session: 1_000,
            jsonp_callback_max_len: 64,
        }
    }
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            max_age_secs: 24 * 3600,
            max_messages: 10_000,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Configuration problems.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown keys.
    #[error("invalid configuration: {0}")]
    Parse(#[from] toml::de::Error),
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl ServerConfig {
    /// Parses a TOML document (missing keys take their defaults) and validates it.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: ServerConfig = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a TOML file.
    pub fn from_file(path: &str) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if !self.path.starts_with('/') || (self.path.len() > 1 && self.path.ends_with('/')) {
            return bad("path must start with '/' and not end with '/'");
        }
        if self.path == "/metrics" {
            return bad("path /metrics is taken by the metrics endpoint");
        }
        if self.transports.is_empty() {
            return bad("transports must list at least one connection type");
        }
        for t in &self.transports {
            if !["websocket", "long-polling", "callback-polling"].contains(&t.as_str()) {
                return bad(&format!(
                    "unknown transport {t:?} (websocket, long-polling, callback-polling)"
                ));
            }
        }
        if self.timeouts.sweep_interval_ms == 0 {
            return bad("timeouts.sweep_interval_ms must be positive");
        }
        if self.timeouts.request_read_timeout_ms == 0 {
            return bad("timeouts.request_read_timeout_ms must be positive");
        }
        if self.limits.max_header_bytes < 1024 {
            return bad("limits.max_header_bytes must be at least 1024");
        }
        if self.limits.max_queue == 0 {
            return bad("limits.max_queue must be positive");
        }
        if self.limits.max_messages_per_request == 0 {
            return bad("limits.max_messages_per_request must be positive");
        }
        if let Some(sf) = &self.salesforce {
            sf.validate().map_err(ConfigError::Invalid)?;
        }
        Ok(())
    }

    /// Does the server offer `connection_type`?
    pub fn offers(&self, connection_type: &str) -> bool {
        self.transports.iter().any(|t| t == connection_type)
    }

    /// The configuration the server really runs with: in Salesforce mode the endpoint behaves
    /// as Salesforce's does (long-polling only, its connect timeout, reconnect deadline and body
    /// limit).
    pub fn effective(&self) -> ServerConfig {
        let mut c = self.clone();
        if let Some(sf) = &self.salesforce {
            c.transports = vec!["long-polling".into()];
            c.timeouts.connect_timeout_ms = sf.connect_timeout_secs * 1000;
            c.timeouts.interval_ms = 0;
            c.timeouts.max_interval_ms = sf.reconnect_deadline_secs * 1000;
            c.limits.max_body_bytes = sf.max_body_bytes;
        }
        c
    }

    /// The retention as the engine takes it.
    pub fn retention(&self) -> Retention {
        Retention {
            max_age: Duration::from_secs(self.retention.max_age_secs),
            max_messages: self.retention.max_messages,
            max_bytes: self.retention.max_bytes,
        }
    }
}

impl Timeouts {
    /// advice.timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    /// Session expiry.
    pub fn max_interval(&self) -> Duration {
        Duration::from_millis(self.max_interval_ms + self.interval_ms)
    }
    /// Lazy delay.
    pub fn lazy_delay(&self) -> Duration {
        Duration::from_millis(self.lazy_delay_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_file_is_the_default() {
        assert_eq!(
            ServerConfig::from_toml(DEFAULT_CONFIG_TOML).unwrap(),
            ServerConfig::default()
        );
    }

    #[test]
    fn example_salesforce_config_is_valid() {
        let c = ServerConfig::from_toml(include_str!("../../../examples/salesforce.toml")).unwrap();
        let sf = c.salesforce.as_ref().unwrap();
        assert_eq!(sf.users.len(), 2);
        assert_eq!(sf.channels.len(), 5);
        assert_eq!(c.effective().timeouts.max_interval_ms, 40_000);
    }

    #[test]
    fn partial_and_invalid() {
        let c = ServerConfig::from_toml("[limits]\nmax_queue = 5\n").unwrap();
        assert_eq!(c.limits.max_queue, 5);
        assert_eq!(c.limits.max_body_bytes, 65536);
        assert!(ServerConfig::from_toml("nope = 1").is_err());
        assert!(ServerConfig::from_toml("path = \"cometd\"").is_err());
        assert!(ServerConfig::from_toml("transports = [\"smoke-signals\"]").is_err());
        assert!(ServerConfig::from_toml("[limits]\nqueue_overflow = \"explode\"").is_err());
    }
}
