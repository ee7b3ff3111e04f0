//! Transports: how batches of messages reach the server and replies come back. They know
//! nothing of sessions, advice or credentials: the driver hands them messages and the
//! `Authorization` value to send, and gets back messages or a [`Failure`].

pub(crate) mod long_polling;
pub(crate) mod websocket;

use bayeux_protocol::{DecodeError, Message, decode_batch};

use crate::state::Failure;

/// Decodes a reply body; anything that is not Bayeux messages is a [`Failure::Invalid`].
pub(crate) fn decode(body: &[u8]) -> Result<Vec<Message>, Failure> {
    decode_batch(body).map_err(|e: DecodeError| {
        let mut text = e.to_string();
        text.truncate(200);
        Failure::Invalid(text)
    })
}
