//! Bayeux 1.0 wire types, shared by the bayeux server and client.
//!
//! This crate does no I/O. It holds:
//! - [`Message`] and [`Advice`] (serde; unknown fields are kept),
//! - [`ChannelName`] (validation, `/a/*` and `/a/**` matching, meta/service/broadcast kinds),
//! - [`ErrorKind`] and [`Dialect`]: every error string put on the wire, in one table,
//! - the batch codec ([`decode_batch`], [`encode_batch`]) that takes an array or a single object,
//! - the names of meta channels and connection types.
#![deny(unreachable_pub)]

pub mod channel;
pub mod codec;
pub mod error;
pub mod message;

pub use channel::{ChannelError, ChannelKind, ChannelName, Wildcard};
pub use codec::{DecodeError, decode_batch, encode_batch, encode_message};
pub use error::{Dialect, ErrorKind};
pub use message::{Advice, Message, Reconnect, Subscription};

/// The protocol version this crate speaks.
pub const VERSION: &str = "1.0";

/// Meta channel names.
pub mod meta {
    /// `/meta/handshake`
    pub const HANDSHAKE: &str = "/meta/handshake";
    /// `/meta/connect`
    pub const CONNECT: &str = "/meta/connect";
    /// `/meta/subscribe`
    pub const SUBSCRIBE: &str = "/meta/subscribe";
    /// `/meta/unsubscribe`
    pub const UNSUBSCRIBE: &str = "/meta/unsubscribe";
    /// `/meta/disconnect`
    pub const DISCONNECT: &str = "/meta/disconnect";
}

/// Connection type names.
pub mod connection_type {
    /// HTTP long-polling.
    pub const LONG_POLLING: &str = "long-polling";
    /// WebSocket.
    pub const WEBSOCKET: &str = "websocket";
    /// JSONP callback-polling.
    pub const CALLBACK_POLLING: &str = "callback-polling";
}
