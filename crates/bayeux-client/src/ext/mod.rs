//! Client extensions: hooks on every message in and out, the replay extension's helpers and
//! checkpoint stores, and the CometD ack extension.

pub mod ack;
pub mod replay;

use bayeux_protocol::Message;

/// A client-side extension, run by the state machine on every message: `outgoing` just before a
/// message is sent, `incoming` as soon as one is received. Extensions must not do I/O; they
/// see and may change the message (usually its `ext`).
pub trait Extension: Send + 'static {
    /// Called for each message about to be sent.
    fn outgoing(&mut self, message: &mut Message) {
        let _ = message;
    }

    /// Called for each message received; return `false` to drop it.
    fn incoming(&mut self, message: &mut Message) -> bool {
        let _ = message;
        true
    }
}
