//! The security policy: consulted on handshake, connect, subscribe and publish.
//!
//! The broker itself refuses what no policy may allow (subscribing to `/meta/*`, publishing to
//! `/meta/*` or to a wildcard) before a policy is asked, so a permissive policy cannot open those.
//! A policy sees the HTTP request (headers, peer address) and the session, and can keep
//! per-session state in [`Session::attributes`](crate::broker::Session::attributes), for
//! example the principal a bearer token named at handshake.

use std::net::SocketAddr;

use axum::http::HeaderMap;
use bayeux_protocol::{Advice, ChannelName, ErrorKind, Message};
use serde_json::Value;

use crate::broker::Session;

/// What the request carrying the message looked like.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    /// HTTP headers of the request (for WebSocket, of the upgrade request).
    pub headers: &'a HeaderMap,
    /// The peer, when known.
    pub remote: Option<SocketAddr>,
    /// `long-polling`, `callback-polling` or `websocket`.
    pub connection_type: &'a str,
}

/// What the message asks for.
#[derive(Debug, Clone, Copy)]
pub enum Operation<'a> {
    /// A new session. The session exists but is not yet registered.
    Handshake,
    /// A `/meta/connect`.
    Connect,
    /// A subscribe to one channel (once per channel of a list).
    Subscribe(&'a ChannelName),
    /// A publish to a broadcast or service channel.
    Publish(&'a ChannelName),
}

/// A refusal: the error to report, and optionally the advice and `ext` to send with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Denial {
    /// The error.
    pub error: ErrorKind,
    /// Advice for the client; when `None` the broker picks the usual advice for the channel.
    pub advice: Option<Advice>,
    /// Fields to merge into the reply's `ext`.
    pub ext: Option<Value>,
}

impl Denial {
    /// A denial with just an error.
    pub fn new(error: ErrorKind) -> Self {
        Denial {
            error,
            advice: None,
            ext: None,
        }
    }
}

/// Decides who may do what. Implementations must be cheap: they run on every message.
pub trait SecurityPolicy: Send + Sync + 'static {
    /// Allows (`Ok`) or refuses `operation`. `session` is `None` for a publish without a
    /// clientId.
    // A refusal is the rare path and carries a whole reply's worth of fields; boxing it would
    // only make implementations noisier.
    #[allow(clippy::result_large_err)]
    fn authorize(
        &self,
        request: &RequestInfo<'_>,
        session: Option<&Session>,
        operation: Operation<'_>,
        message: &Message,
    ) -> Result<(), Denial>;
}

/// Allows everything the broker itself allows.
#[derive(Debug, Default, Clone, Copy)]
pub struct AllowAll;

impl SecurityPolicy for AllowAll {
    #[allow(clippy::result_large_err)]
    fn authorize(
        &self,
        _request: &RequestInfo<'_>,
        _session: Option<&Session>,
        _operation: Operation<'_>,
        _message: &Message,
    ) -> Result<(), Denial> {
        Ok(())
    }
}
