//! The Bayeux message and its advice.

use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

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

/// The `advice` field. Deserialized by hand, in one pass, like [`Message`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Advice {
    /// What the client should do next.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconnect: Option<Reconnect>,
    /// Milliseconds to wait before the next connect.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<i64>,
    /// Milliseconds the server holds a connect (from the server), or wants it held (from a
    /// client).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
    /// Milliseconds after which an unconnected session expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_interval: Option<i64>,
    /// Several clients share one browser.
    #[serde(rename = "multiple-clients", skip_serializing_if = "Option::is_none")]
    pub multiple_clients: Option<bool>,
    /// Alternate servers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    /// Anything else (for example per-transport advice), kept as received.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// A field name of [`Advice`]: the index of a known one in [`ADVICE_FIELDS`], or another name.
enum AdviceKey {
    Known(usize),
    Other(String),
}

const ADVICE_FIELDS: [&str; 6] = [
    "reconnect",
    "interval",
    "timeout",
    "maxInterval",
    "multiple-clients",
    "hosts",
];

impl<'de> Deserialize<'de> for AdviceKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = AdviceKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<AdviceKey, E> {
                Ok(match ADVICE_FIELDS.iter().position(|n| *n == s) {
                    Some(i) => AdviceKey::Known(i),
                    None => AdviceKey::Other(s.to_owned()),
                })
            }
        }
        d.deserialize_identifier(KeyVisitor)
    }
}

impl<'de> Deserialize<'de> for Advice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct AdviceVisitor;
        impl<'de> Visitor<'de> for AdviceVisitor {
            type Value = Advice;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("struct Advice")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Advice, A::Error> {
                let mut a = Advice::default();
                let mut seen = [false; ADVICE_FIELDS.len()];
                while let Some(key) = map.next_key::<AdviceKey>()? {
                    let i = match key {
                        AdviceKey::Known(i) => i,
                        AdviceKey::Other(name) => {
                            let value: Value = map.next_value()?;
                            a.other.insert(name, value);
                            continue;
                        }
                    };
                    if seen[i] {
                        return Err(de::Error::duplicate_field(ADVICE_FIELDS[i]));
                    }
                    seen[i] = true;
                    match i {
                        0 => a.reconnect = map.next_value()?,
                        1 => a.interval = map.next_value()?,
                        2 => a.timeout = map.next_value()?,
                        3 => a.max_interval = map.next_value()?,
                        4 => a.multiple_clients = map.next_value()?,
                        _ => a.hosts = map.next_value()?,
                    }
                }
                Ok(a)
            }
        }
        d.deserialize_map(AdviceVisitor)
    }
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
///
/// Deserialization is written by hand, in one pass: `#[serde(flatten)]` would buffer
/// every field of every message before sorting them, which made decoding two to three times
/// slower.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    /// The channel. Empty when the message had none (an error the server reports); an empty
    /// channel is not written out.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub channel: String,
    /// The message id, echoed exactly (a string or a number). Present as `null` is `Some(Null)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    /// The session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Outcome of a meta message or a publish.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub successful: Option<bool>,
    /// `code:args:message` when `successful` is false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The payload of a publish or a delivery. Present as `null` is `Some(Null)`, so that
    /// `"data": null` survives a round trip instead of vanishing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// Advice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advice: Option<Advice>,
    /// Extensions. Present as `null` is `Some(Null)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ext: Option<Value>,
    /// Subscribe and unsubscribe target(s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscription: Option<Subscription>,
    /// Handshake: protocol version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Handshake: lowest protocol version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minimum_version: Option<String>,
    /// Handshake: connection types, in preference order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub supported_connection_types: Option<Vec<String>>,
    /// Connect: the transport in use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_type: Option<String>,
    /// Optional timestamp.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    /// Every other field, kept as received.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// The keys of [`Message`]; anything else is [`Key::Other`].
enum Key {
    Channel,
    Id,
    ClientId,
    Successful,
    Error,
    Data,
    Advice,
    Ext,
    Subscription,
    Version,
    MinimumVersion,
    SupportedConnectionTypes,
    ConnectionType,
    Timestamp,
    Other(String),
}

impl Key {
    const NAMES: [&'static str; 14] = [
        "channel",
        "id",
        "clientId",
        "successful",
        "error",
        "data",
        "advice",
        "ext",
        "subscription",
        "version",
        "minimumVersion",
        "supportedConnectionTypes",
        "connectionType",
        "timestamp",
    ];

    /// A known key, without allocating.
    fn known(s: &str) -> Option<Key> {
        Some(match s {
            "channel" => Key::Channel,
            "id" => Key::Id,
            "clientId" => Key::ClientId,
            "successful" => Key::Successful,
            "error" => Key::Error,
            "data" => Key::Data,
            "advice" => Key::Advice,
            "ext" => Key::Ext,
            "subscription" => Key::Subscription,
            "version" => Key::Version,
            "minimumVersion" => Key::MinimumVersion,
            "supportedConnectionTypes" => Key::SupportedConnectionTypes,
            "connectionType" => Key::ConnectionType,
            "timestamp" => Key::Timestamp,
            _ => return None,
        })
    }

    /// Position in [`Key::NAMES`] (for duplicate detection); `None` for [`Key::Other`].
    fn index(&self) -> Option<usize> {
        Some(match self {
            Key::Channel => 0,
            Key::Id => 1,
            Key::ClientId => 2,
            Key::Successful => 3,
            Key::Error => 4,
            Key::Data => 5,
            Key::Advice => 6,
            Key::Ext => 7,
            Key::Subscription => 8,
            Key::Version => 9,
            Key::MinimumVersion => 10,
            Key::SupportedConnectionTypes => 11,
            Key::ConnectionType => 12,
            Key::Timestamp => 13,
            Key::Other(_) => return None,
        })
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Key, E> {
                Ok(Key::known(s).unwrap_or_else(|| Key::Other(s.to_owned())))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Key, E> {
                Ok(Key::known(&s).unwrap_or(Key::Other(s)))
            }
        }
        d.deserialize_identifier(KeyVisitor)
    }
}

/// Reads a [`Message`] from a map in one pass: known fields straight into their types, every
/// other field into [`Message::other`]. A known field given twice is an error (as the derived
/// implementation); for other fields the last one wins.
struct MessageVisitor;

impl<'de> Visitor<'de> for MessageVisitor {
    type Value = Message;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("struct Message")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Message, A::Error> {
        let mut m = Message::default();
        let mut seen = [false; Key::NAMES.len()];
        while let Some(key) = map.next_key::<Key>()? {
            if let Some(i) = key.index() {
                if seen[i] {
                    return Err(de::Error::duplicate_field(Key::NAMES[i]));
                }
                seen[i] = true;
            }
            match key {
                Key::Channel => m.channel = map.next_value()?,
                Key::Id => m.id = Some(map.next_value()?),
                Key::ClientId => m.client_id = map.next_value()?,
                Key::Successful => m.successful = map.next_value()?,
                Key::Error => m.error = map.next_value()?,
                Key::Data => m.data = Some(map.next_value()?),
                Key::Advice => m.advice = map.next_value()?,
                Key::Ext => m.ext = Some(map.next_value()?),
                Key::Subscription => m.subscription = map.next_value()?,
                Key::Version => m.version = map.next_value()?,
                Key::MinimumVersion => m.minimum_version = map.next_value()?,
                Key::SupportedConnectionTypes => m.supported_connection_types = map.next_value()?,
                Key::ConnectionType => m.connection_type = map.next_value()?,
                Key::Timestamp => m.timestamp = map.next_value()?,
                Key::Other(name) => {
                    let value: Value = map.next_value()?;
                    m.other.insert(name, value);
                }
            }
        }
        Ok(m)
    }
}

impl<'de> Deserialize<'de> for Message {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(MessageVisitor)
    }
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
