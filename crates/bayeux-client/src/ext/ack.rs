//! The CometD acknowledgement extension, client side.
//!
//! The handshake asks for it with `ext.ack: true`; if the server echoes it (`true`, or the newer
//! `{enabled: true, …}`), every connect carries `ext.ack: <the last batch received>` and every
//! connect reply carries its batch number. The server re-sends unacknowledged batches, so a
//! connect reply lost in transit costs nothing; the client drops the repeats by replay ID.

use bayeux_protocol::{Message, meta};
use serde_json::Value;

use super::Extension;

/// The ack extension. Clients use it by default ([`ClientBuilder::ack`](crate::ClientBuilder::ack)).
#[derive(Debug, Default, Clone)]
pub struct AckExtension {
    enabled: bool,
    batch: u64,
}

impl AckExtension {
    /// A new, not yet negotiated, ack extension.
    pub fn new() -> Self {
        Self::default()
    }

    /// True once the server agreed to acknowledgements.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }
}

impl Extension for AckExtension {
    fn outgoing(&mut self, message: &mut Message) {
        match message.channel.as_str() {
            meta::HANDSHAKE => {
                self.enabled = false;
                self.batch = 0;
                message.ext_insert("ack", Value::Bool(true));
            }
            meta::CONNECT if self.enabled => {
                message.ext_insert("ack", Value::from(self.batch));
            }
            _ => {}
        }
    }

    fn incoming(&mut self, message: &mut Message) -> bool {
        match message.channel.as_str() {
            meta::HANDSHAKE if message.successful == Some(true) => {
                self.enabled = match message.ext_get("ack") {
                    Some(Value::Bool(b)) => *b,
                    Some(Value::Object(o)) => o.get("enabled") == Some(&Value::Bool(true)),
                    _ => false,
                };
            }
            meta::CONNECT if self.enabled => {
                if let Some(n) = message.ext_get("ack").and_then(Value::as_u64) {
                    self.batch = self.batch.max(n);
                }
            }
            _ => {}
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn negotiates_and_acks_the_last_batch() {
        let mut ack = AckExtension::new();
        let mut hs = Message::new(meta::HANDSHAKE);
        ack.outgoing(&mut hs);
        assert_eq!(hs.ext_get("ack"), Some(&json!(true)));
        let mut reply = Message::new(meta::HANDSHAKE).ok();
        reply.ext_insert("ack", json!({"enabled": true, "batch": 0}));
        ack.incoming(&mut reply);
        assert!(ack.is_enabled());
        let mut c = Message::new(meta::CONNECT);
        ack.outgoing(&mut c);
        assert_eq!(c.ext_get("ack"), Some(&json!(0)));
        let mut r = Message::new(meta::CONNECT).ok();
        r.ext_insert("ack", json!(3));
        ack.incoming(&mut r);
        let mut c = Message::new(meta::CONNECT);
        ack.outgoing(&mut c);
        assert_eq!(c.ext_get("ack"), Some(&json!(3)));
    }

    #[test]
    fn stays_off_when_the_server_does_not_echo() {
        let mut ack = AckExtension::new();
        ack.outgoing(&mut Message::new(meta::HANDSHAKE));
        ack.incoming(&mut Message::new(meta::HANDSHAKE).ok());
        let mut c = Message::new(meta::CONNECT);
        ack.outgoing(&mut c);
        assert_eq!(c.ext, None);
    }
}
