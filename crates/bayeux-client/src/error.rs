//! The client's error type.

use crate::ext::replay::StoreError;

/// What can go wrong in the client's API calls. Connection trouble is not an error of any
/// call: the client recovers by itself and reports it through
/// [`Client::events`](crate::Client::events).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The endpoint URL is not valid.
    #[error("invalid URL: {0}")]
    InvalidUrl(String),
    /// An option is not valid (for example a header).
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// The channel name is not valid.
    #[error("invalid channel {channel:?}: {reason}")]
    InvalidChannel {
        /// The name given.
        channel: String,
        /// Why it is not valid.
        reason: String,
    },
    /// The server refused the subscribe.
    #[error("subscribe to {channel} refused: {error}")]
    SubscribeRefused {
        /// The channel.
        channel: String,
        /// The server's error string (or why the client gave up).
        error: String,
    },
    /// The server refused the publish, or it could not be delivered.
    #[error("publish refused: {0}")]
    PublishRefused(String),
    /// The server did not answer within the operation timeout.
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The client has stopped (disconnected, gave up, or dropped).
    #[error("the client is closed")]
    Closed,
    /// The replay store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Http(String),
}
