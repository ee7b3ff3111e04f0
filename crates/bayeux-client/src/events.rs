//! What [`Client::events`](crate::Client::events) reports: the client's state changes, for the
//! application's logs and metrics.

use std::time::Duration;

/// A change in the client's state.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The first `/meta/connect` after a handshake succeeded: the client is live.
    Connected {
        /// The session.
        client_id: String,
        /// The connection type in use (`long-polling` or `websocket`).
        transport: String,
        /// True when this follows a re-handshake (the session was replaced).
        rehandshake: bool,
    },
    /// The client lost its connection or session and will try again after `delay`.
    Reconnecting {
        /// Why, in words (an error string, `advice: handshake`, a transport error…).
        reason: String,
        /// True when the next step is a new handshake (the session is gone), false for a
        /// plain re-connect.
        handshake: bool,
        /// Consecutive failures so far.
        attempt: u32,
        /// How long the client waits first.
        delay: Duration,
    },
    /// A fresh token was obtained after an authentication failure.
    Reauthenticated,
    /// The token provider failed; it is asked again after `retry_in`.
    AuthFailed {
        /// The provider's error.
        error: String,
        /// Consecutive failures so far.
        attempt: u32,
        /// Delay before the next attempt.
        retry_in: Duration,
    },
    /// After a re-handshake, a channel was subscribed again from replay ID `from`.
    Resumed {
        /// The channel.
        channel: String,
        /// The replay ID sent (`-1`: new events only, `-2`: all retained, `N`: after N).
        from: i64,
    },
    /// The server refused a replay ID (outside retention, or unknown); the subscribe was
    /// retried from `fallback`. Events may have been missed (`-1`) or may be delivered again
    /// (`-2`).
    ReplayFallback {
        /// The channel.
        channel: String,
        /// The refused replay ID.
        invalid: i64,
        /// What was used instead (`-1` or `-2`).
        fallback: i64,
    },
    /// A subscription was refused by the server and ended.
    SubscriptionFailed {
        /// The channel.
        channel: String,
        /// The server's error string.
        error: String,
    },
    /// The server told the client to switch transport, or WebSocket could not be opened and
    /// the client fell back to long-polling.
    TransportChanged {
        /// The connection type now in use.
        transport: String,
    },
    /// A `/meta/connect` did not answer within its deadline and was aborted.
    Stalled {
        /// Consecutive stalls.
        count: u32,
        /// True when this stall escalates to a fresh handshake.
        rehandshake: bool,
    },
    /// The server ended the session (`/meta/disconnect` sent by the server).
    ServerDisconnected,
    /// The client stopped for good: `advice.reconnect: none` with no token provider, or too
    /// many consecutive failures.
    GaveUp {
        /// Why.
        reason: String,
    },
    /// The application disconnected the client.
    Disconnected,
}
