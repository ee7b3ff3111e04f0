//! The Bayeux message and its advice.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// Deserializes a field that is present (even as `null`) as `Some`, so that
/// `"data": null` survives a round trip instead of vanishing.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// `subscription` in subscribe and unsubscribe messages: one channel or a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Subscription {
    /// A single channel name.
    One(String),
    /// Several channel names.
    Many(Vec<String>),
    /// Anything else (a number, an object, a list holding a non-string), kept as received so
    /// the server can answer `subscription_invalid` for this message alone instead of refusing
    /// the whole body.
    Invalid(Value),
}

impl Subscription {
    /// The channel names, whichever form was used (none for [`Subscription::Invalid`]).
    pub fn names(&self) -> &[String] {
        match self {
            Subscription::One(s) => std::slice::from_ref(s),
            Subscription::Many(v) => v,
            Subscription::Invalid(_) => &[],
        }
    }

    /// False for a value that is neither a string nor a list of strings.
    pub fn is_valid(&self) -> bool {
        !matches!(self, Subscription::Invalid(_))
    }
}

/// `advice.reconnect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reconnect {
    /// Connect again after `interval`.
    Retry,
    /// Handshake again; do not retry the connect.
    Handshake,
    /// Stop: no retry, no handshake.
    None,
}

/// The `advice` field.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Advice {
    /// What the client should do next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect: Option<Reconnect>,
    /// Milliseconds to wait before the next connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<i64>,
    /// Milliseconds the server holds a connect (from the server), or wants it held (from a
    /// client).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
    /// Milliseconds after which an unconnected session expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_interval: Option<i64>,
    /// Several clients share one browser.
    #[serde(
        default,
        rename = "multiple-clients",
        skip_serializing_if = "Option::is_none"
    )]
    pub multiple_clients: Option<bool>,
    /// Alternate servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    /// Anything else (for example per-transport advice), kept as received.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl Advice {
    /// `{reconnect: "handshake", interval: 0}`: what an unknown session is told.
    pub fn handshake() -> Self {
        Advice {
            reconnect: Some(Reconnect::Handshake),
            interval: Some(0),
            ..Advice::default()
        }
    }

    /// `{reconnect: "none", interval: 0}`.
    pub fn none() -> Self {
        Advice {
            reconnect: Some(Reconnect::None),
            interval: Some(0),
            ..Advice::default()
        }
    }

    /// `{reconnect: "retry", interval, timeout}`.
    pub fn retry(interval: i64, timeout: i64) -> Self {
        Advice {
            reconnect: Some(Reconnect::Retry),
            interval: Some(interval),
            timeout: Some(timeout),
            ..Advice::default()
        }
    }
}

/// One Bayeux message, in either direction. Fields this type does not know are kept in
/// [`Message::other`] and written back out unchanged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    /// The channel. Empty when the message had none (an error the server reports); an empty
    /// channel is not written out.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub channel: String,
    /// The message id, echoed exactly (a string or a number).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub id: Option<Value>,
    /// The session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Outcome of a meta message or a publish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub successful: Option<bool>,
    /// `code:args:message` when `successful` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The payload of a publish or a delivery.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub data: Option<Value>,
    /// Advice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advice: Option<Advice>,
    /// Extensions.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub ext: Option<Value>,
    /// Subscribe and unsubscribe target(s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscription: Option<Subscription>,
    /// Handshake: protocol version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Handshake: lowest protocol version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_version: Option<String>,
    /// Handshake: connection types, in preference order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supported_connection_types: Option<Vec<String>>,
    /// Connect: the transport in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_type: Option<String>,
    /// Optional timestamp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    /// Every other field, kept as received.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl Message {
    /// A message on `channel` with nothing else set.
    pub fn new(channel: impl Into<String>) -> Self {
        Message {
            channel: channel.into(),
            ..Message::default()
        }
    }

    /// The reply skeleton to this message: same channel and id.
    pub fn reply(&self) -> Message {
        Message {
            channel: self.channel.clone(),
            id: self.id.clone(),
            ..Message::default()
        }
    }

    /// `ext[key]`, if `ext` is an object holding it.
    pub fn ext_get(&self, key: &str) -> Option<&Value> {
        self.ext.as_ref()?.as_object()?.get(key)
    }

    /// Sets `ext[key]`, making `ext` an object if it was absent or not one.
    pub fn ext_insert(&mut self, key: impl Into<String>, value: Value) {
        let ext = self.ext.get_or_insert_with(|| Value::Object(Map::new()));
        if !ext.is_object() {
            *ext = Value::Object(Map::new());
        }
        if let Value::Object(map) = ext {
            map.insert(key.into(), value);
        }
    }

    /// Marks the message as a success.
    pub fn ok(mut self) -> Self {
        self.successful = Some(true);
        self
    }

    /// Marks the message as a failure with `error`.
    pub fn failed(mut self, error: impl Into<String>) -> Self {
        self.successful = Some(false);
        self.error = Some(error.into());
        self
    }

    /// Sets the advice.
    pub fn with_advice(mut self, advice: Advice) -> Self {
        self.advice = Some(advice);
        self
    }
}
