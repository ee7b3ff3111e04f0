//! Every error string the server puts on the wire, in one table.
//!
//! Bayeux errors have the form `code:args:message`. The plain endpoint speaks CometD's dialect
//! (`402::session_unknown`, `403::subscription_missing`, …); the Salesforce emulator speaks
//! Salesforce's exact texts (`403::Unknown client`, `401::Authentication invalid`, …). Code that
//! reports an error names an [`ErrorKind`] and the [`Dialect`] turns it into the string, so no
//! error text is written anywhere else.

use std::fmt;

/// Which server's error texts to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Dialect {
    /// CometD 5+ (and cometd-nodejs-server) texts.
    #[default]
    Cometd,
    /// The Salesforce Streaming API's texts.
    Salesforce,
}

/// Every error the server can report.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The clientId is unknown, expired or disconnected.
    SessionUnknown,
    /// The message has no `clientId` where one is required.
    ClientIdMissing,
    /// The security policy refused a handshake.
    HandshakeDenied,
    /// The client and server share no connection type (the args: the client's types).
    ConnectionTypesUnsupported(String),
    /// A connect names a connection type the server does not offer (the args: the type).
    ConnectionTypeUnsupported(String),
    /// The message has no `channel`.
    ChannelMissing,
    /// The channel name is not valid, or is a wildcard where one is not allowed.
    ChannelInvalid,
    /// A publish to a meta channel, or a message on an unknown meta channel.
    MetaChannelDenied,
    /// A publish without `data`.
    DataMissing,
    /// A subscribe or unsubscribe without `subscription`.
    SubscriptionMissing,
    /// `subscription` is not a string or a list of valid names.
    SubscriptionInvalid,
    /// A subscribe to a meta channel.
    SubscribeFailed,
    /// The security policy refused a subscribe (the args: the reason).
    SubscribeDenied(String),
    /// The security policy refused a publish (the args: the reason).
    PublishDenied(String),
    /// The session holds the most subscriptions allowed.
    SubscriptionLimit,
    /// The server holds the most sessions allowed.
    SessionLimit,
    /// An extension deleted the message.
    MessageDeleted,
    /// The engine failed to store a message.
    StorageFailed,
    /// The server is shutting down or overloaded.
    ServerBusy,
    /// The body is not JSON (HTTP 400).
    InvalidJson,
    /// The body is JSON but not Bayeux messages, or is empty (HTTP 400).
    MessageInvalid,
    /// More messages in one request than allowed (HTTP 400).
    TooManyMessages,
    /// The body or frame is larger than allowed (HTTP 413; WebSocket close 1009).
    MessageTooLarge,
    /// The request matches no transport, e.g. a GET without `message` (HTTP 400).
    UnknownTransport,
    /// An HTTP method other than GET, POST or a WebSocket upgrade (HTTP 405).
    MethodNotAllowed,
    /// A JSONP callback name that is too long or has characters outside `[A-Za-z0-9._-]`.
    CallbackInvalid,
    /// A replay ID that is malformed, never issued, or older than retention (the args: the ID
    /// as the client sent it). Salesforce's text in every dialect: the replay extension is
    /// Salesforce's.
    ReplayIdInvalid(String),
    /// A replay map that lacks the subscribed channel (or is not a map).
    ReplayChannelNotFound {
        /// The subscribed channel.
        channel: String,
        /// The map as Salesforce renders it (`{/a=1, /b=-1}`).
        map: String,
    },
    /// Salesforce: the token is dead (expired, revoked) on connect; the failure reason of a
    /// denied handshake.
    AuthenticationInvalid,
    /// Salesforce: no token on a handshake (a failure reason).
    AuthenticationRequired,
    /// Salesforce: `/cometd` without a version (the args: the latest version).
    ApiVersionMissing(String),
    /// Salesforce: a version older than the oldest supported (the args: oldest, latest).
    ApiVersionUnsupported(String, String),
    /// Salesforce: a subscribe to a channel the org does not have.
    ChannelNotFound(String),
    /// Salesforce: the org's daily delivery allocation is used up.
    DailyLimitExceeded,
    /// Salesforce: the server is too busy (a fault the emulator injects).
    TooBusy,
    /// A held connect was released because a newer connect for the same session arrived
    /// (HTTP 500; clients must not retry it at once).
    ConnectSuperseded,
    /// Something the table has no entry for: the full wire string is given.
    Custom(String),
}

impl ErrorKind {
    /// The wire string in `dialect`.
    pub fn wire(&self, dialect: Dialect) -> String {
        use Dialect::*;
        use ErrorKind::*;
        match (self, dialect) {
            (SessionUnknown, Cometd) => "402::session_unknown".into(),
            (SessionUnknown, Salesforce) => "403::Unknown client".into(),
            (ClientIdMissing, Cometd) => "402::client_id_missing".into(),
            (ClientIdMissing, Salesforce) => "403::Unknown client".into(),
            (HandshakeDenied, Cometd) => "403::handshake_denied".into(),
            (HandshakeDenied, Salesforce) => "403::Handshake denied".into(),
            (ConnectionTypesUnsupported(types), Cometd) => {
                format!("301:{types}:Connection types not supported")
            }
            (ConnectionTypeUnsupported(t), Cometd) => {
                format!("301:{t}:Connection types not supported")
            }
            (ConnectionTypesUnsupported(t) | ConnectionTypeUnsupported(t), Salesforce) => {
                format!("400::Invalid connection type {{{t}}}")
            }
            (ChannelMissing, Cometd) => "400::channel_missing".into(),
            (ChannelMissing, Salesforce) => "400::Channel name not specified".into(),
            (ChannelInvalid, Cometd) => "405::channel_invalid".into(),
            (ChannelInvalid, Salesforce) => {
                "400::Channel subscriptions must start with a leading '/'".into()
            }
            (MetaChannelDenied, Cometd) => "403::meta_channel_denied".into(),
            (MetaChannelDenied, Salesforce) => "403::Restricted channel".into(),
            (DataMissing, _) => "400::data_missing".into(),
            (SubscriptionMissing, Cometd) => "403::subscription_missing".into(),
            (SubscriptionMissing, Salesforce) => "400::Channel name not specified".into(),
            (SubscriptionInvalid, Cometd) => "403::subscription_invalid".into(),
            (SubscriptionInvalid, Salesforce) => {
                "400::Channel subscriptions must start with a leading '/'".into()
            }
            (SubscribeFailed, Cometd) => "403::subscribe_failed".into(),
            (SubscribeFailed, Salesforce) => "403::Restricted channel".into(),
            (SubscribeDenied(reason), Cometd) => format!("403:{reason}:subscribe_denied"),
            (SubscribeDenied(_), Salesforce) => "403::Restricted channel".into(),
            (PublishDenied(reason), Cometd) => format!("403:{reason}:publish_denied"),
            (PublishDenied(_), Salesforce) => "403::Restricted channel".into(),
            (SubscriptionLimit, Cometd) => "403::subscription_limit_exceeded".into(),
            (SubscriptionLimit, Salesforce) => {
                "403::Subscription limit exceeded for this topic".into()
            }
            (SessionLimit, Cometd) => "403::session_limit_exceeded".into(),
            (SessionLimit, Salesforce) => SF_CONNECTION_LIMIT.into(),
            (MessageDeleted, _) => "404::message_deleted".into(),
            (StorageFailed, Cometd) => "500::storage_failed".into(),
            (StorageFailed, Salesforce) => SF_SERVER_BUSY.into(),
            (ServerBusy, Cometd) => "503::server_busy".into(),
            (ServerBusy, Salesforce) => SF_SERVER_BUSY.into(),
            (InvalidJson, _) => "400::invalid_json".into(),
            (MessageInvalid, _) => "400::message_invalid".into(),
            (TooManyMessages, _) => "400::too_many_messages".into(),
            (MessageTooLarge, Cometd) => "413::message_too_large".into(),
            (MessageTooLarge, Salesforce) => "413::Maximum Request Size Exceeded".into(),
            (UnknownTransport, _) => "400::unknown_transport".into(),
            (MethodNotAllowed, _) => "405::method_not_allowed".into(),
            (CallbackInvalid, _) => "400::callback_invalid".into(),
            (ReplayIdInvalid(id), _) => format!(
                "400::The replayId {{{id}}} you provided was invalid.  Please provide a valid ID, -2 to replay all events, or -1 to replay only new events."
            ),
            (ReplayChannelNotFound { channel, map }, _) => format!(
                "400::The replayId for channel {{{channel}}} wasn't found using the provided replay ID map {{{map}}}. Ensure that the channel name you provided in the replay map is valid and matches the channel name used for subscribing."
            ),
            (AuthenticationInvalid, _) => SF_AUTH_INVALID.into(),
            (AuthenticationRequired, _) => SF_AUTH_REQUIRED.into(),
            (ApiVersionMissing(latest), _) => {
                format!("400::API version in the URI is mandatory. URI format: '/cometd/{latest}'")
            }
            (ApiVersionUnsupported(oldest, latest), _) => format!(
                "400::Unsupported API version. Only API versions '{oldest}' and later are supported. URI format: '/cometd/{latest}'"
            ),
            (ChannelNotFound(channel), _) => format!(
                "400::The channel you requested to subscribe to does not exist {{{channel}}}"
            ),
            (DailyLimitExceeded, _) => "403::Organization total events daily limit exceeded".into(),
            (TooBusy, _) => SF_SERVER_BUSY.into(),
            (ConnectSuperseded, _) => "500::connect_superseded".into(),
            (Custom(s), _) => s.clone(),
        }
    }

    /// The three-digit code.
    pub fn code(&self, dialect: Dialect) -> u16 {
        error_code(&self.wire(dialect)).unwrap_or(500)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.wire(Dialect::Cometd))
    }
}

/// The code of a `code:args:message` string, if it starts with three digits.
pub fn error_code(error: &str) -> Option<u16> {
    let code = error.get(..3)?;
    if code.bytes().all(|b| b.is_ascii_digit()) {
        code.parse().ok()
    } else {
        None
    }
}

/// Salesforce: the `503` text it sends when overloaded (two spaces after the period).
pub const SF_SERVER_BUSY: &str = "503::Server is too busy.  Please try your request again later.";
/// Salesforce: the failure reason for too many simultaneous connections.
pub const SF_CONNECTION_LIMIT: &str = "403::To protect all customers from excessive use and Denial of Service attacks, we limit the number of simultaneous connections per server. Your request has been denied because this limit has been exceeded. Please try your request again later.";
/// Salesforce: a dead or revoked token on connect (and the failure reason on handshake).
pub const SF_AUTH_INVALID: &str = "401::Authentication invalid";
/// Salesforce: no Authorization header on handshake.
pub const SF_AUTH_REQUIRED: &str = "401::Request requires authentication";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cometd_strings() {
        assert_eq!(
            ErrorKind::SessionUnknown.wire(Dialect::Cometd),
            "402::session_unknown"
        );
        assert_eq!(
            ErrorKind::SubscribeDenied("denied_by_security_policy".into()).wire(Dialect::Cometd),
            "403:denied_by_security_policy:subscribe_denied"
        );
        assert_eq!(
            ErrorKind::SessionUnknown.wire(Dialect::Salesforce),
            "403::Unknown client"
        );
        assert_eq!(ErrorKind::ChannelInvalid.code(Dialect::Cometd), 405);
        assert_eq!(
            ErrorKind::ReplayIdInvalid("1553783".into()).wire(Dialect::Cometd),
            "400::The replayId {1553783} you provided was invalid.  Please provide a valid ID, -2 to replay all events, or -1 to replay only new events."
        );
        assert_eq!(
            ErrorKind::ReplayChannelNotFound {
                channel: "/topic/X".into(),
                map: "{}".into()
            }
            .wire(Dialect::Salesforce),
            "400::The replayId for channel {/topic/X} wasn't found using the provided replay ID map {{}}. Ensure that the channel name you provided in the replay map is valid and matches the channel name used for subscribing."
        );
    }

    #[test]
    fn codes() {
        assert_eq!(error_code("402::session_unknown"), Some(402));
        assert_eq!(error_code("40"), None);
        assert_eq!(error_code("abc::x"), None);
    }
}
