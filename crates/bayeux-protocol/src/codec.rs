//! The batch codec: a request body is a JSON array of messages or a single message object.

use crate::Message;

/// Why a body could not be decoded into messages.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The body is empty.
    #[error("empty body")]
    Empty,
    /// The body is not JSON, or not messages (for example `42` or `"hello"`).
    #[error("invalid message: {0}")]
    Json(#[from] serde_json::Error),
    /// The body is an empty array.
    #[error("empty batch")]
    EmptyBatch,
    /// The body is a JSON value other than an object or an array of objects.
    #[error("a batch must be a JSON object or an array of objects")]
    NotMessages,
}

/// Decodes a request body: an array of message objects, or one message object.
///
/// ```
/// use bayeux_protocol::decode_batch;
/// assert_eq!(decode_batch(br#"{"channel":"/a"}"#).unwrap().len(), 1);
/// assert_eq!(decode_batch(br#"[{"channel":"/a"},{"channel":"/b"}]"#).unwrap().len(), 2);
/// assert!(decode_batch(b"42").is_err());
/// ```
pub fn decode_batch(body: &[u8]) -> Result<Vec<Message>, DecodeError> {
    let first = body
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .ok_or(DecodeError::Empty)?;
    match first {
        b'[' => {
            let messages: Vec<Message> =
                serde_json::from_slice(body).map_err(|e| syntax_first(body, e))?;
            if messages.is_empty() {
                return Err(DecodeError::EmptyBatch);
            }
            Ok(messages)
        }
        b'{' => Ok(vec![
            serde_json::from_slice(body).map_err(|e| syntax_first(body, e))?,
        ]),
        _ => {
            // Report a JSON syntax error when there is one, else say what is wrong.
            serde_json::from_slice::<serde::de::IgnoredAny>(body)?;
            Err(DecodeError::NotMessages)
        }
    }
}

/// A body that is not JSON at all must be reported as such, even when decoding into messages
/// stopped earlier at a wrong type (`[[[…` or `[42, {"chan…`): prefer the syntax error.
fn syntax_first(body: &[u8], error: serde_json::Error) -> serde_json::Error {
    if error.is_data()
        && let Err(syntax) = serde_json::from_slice::<serde::de::IgnoredAny>(body)
    {
        return syntax;
    }
    error
}

/// Encodes messages as a JSON array.
pub fn encode_batch(messages: &[Message]) -> Vec<u8> {
    // Serializing these types cannot fail: every key is a string and every value is JSON.
    serde_json::to_vec(messages).expect("messages always serialize")
}

/// Encodes one message as a JSON object.
pub fn encode_message(message: &Message) -> Vec<u8> {
    serde_json::to_vec(message).expect("messages always serialize")
}

/// Builds one JSON array in one buffer, out of messages (encoded in place) and pre-serialized
/// JSON objects (copied as they are): a response body without a buffer per element.
///
/// ```
/// use bayeux_protocol::{Message, codec::ArrayBuilder};
/// let mut array = ArrayBuilder::with_capacity(64);
/// array.raw(br#"{"a":1}"#);
/// array.message(&Message { channel: "/b".into(), ..Message::default() });
/// assert_eq!(array.finish(), br#"[{"a":1},{"channel":"/b"}]"#);
/// ```
#[derive(Debug)]
pub struct ArrayBuilder {
    out: Vec<u8>,
}

impl ArrayBuilder {
    /// An empty array in a buffer of `capacity` bytes (it grows if that was too little).
    pub fn with_capacity(capacity: usize) -> Self {
        let mut out = Vec::with_capacity(capacity.max(2));
        out.push(b'[');
        ArrayBuilder { out }
    }

    /// Appends a message, encoded.
    pub fn message(&mut self, message: &Message) {
        self.separate();
        // Serializing a message cannot fail: every key is a string and every value is JSON.
        serde_json::to_writer(&mut self.out, message).expect("messages always serialize");
    }

    /// Appends a JSON value that is already encoded.
    pub fn raw(&mut self, json: &[u8]) {
        self.separate();
        self.out.extend_from_slice(json);
    }

    fn separate(&mut self) {
        if self.out.len() > 1 {
            self.out.push(b',');
        }
    }

    /// The array's bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.out.push(b']');
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Advice, Reconnect, Subscription};
    use proptest::prelude::*;
    use serde_json::{Map, Value, json};

    #[test]
    fn shapes() {
        assert!(matches!(decode_batch(b""), Err(DecodeError::Empty)));
        assert!(matches!(decode_batch(b"  \n"), Err(DecodeError::Empty)));
        assert!(matches!(decode_batch(b"[]"), Err(DecodeError::EmptyBatch)));
        assert!(matches!(decode_batch(b"42"), Err(DecodeError::NotMessages)));
        assert!(matches!(
            decode_batch(br#""hello""#),
            Err(DecodeError::NotMessages)
        ));
        assert!(matches!(decode_batch(b"[42]"), Err(DecodeError::Json(_))));
        assert!(matches!(
            decode_batch(br#"[{"channel":"/a""#),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(decode_batch(b"nul"), Err(DecodeError::Json(_))));
        // A type error before a syntax error still reports the syntax error.
        for truncated in [&b"[[[["[..], b"[42,{\"chan", b"{\"channel\":42,\"da"] {
            match decode_batch(truncated) {
                Err(DecodeError::Json(e)) => assert!(e.is_syntax() || e.is_eof(), "{e}"),
                other => panic!("{other:?}"),
            }
        }
        match decode_batch(br#"[{"channel":42}]"#) {
            Err(DecodeError::Json(e)) => assert!(e.is_data(), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_fields_are_kept() {
        let body = br#"{"channel":"/a","custom":{"x":[1,2]},"advice":{"timeout":0,"long-polling":{"interval":5}}}"#;
        let m = &decode_batch(body).unwrap()[0];
        assert_eq!(m.other.get("custom"), Some(&json!({"x": [1, 2]})));
        let advice = m.advice.as_ref().unwrap();
        assert_eq!(advice.timeout, Some(0));
        assert_eq!(
            advice.other.get("long-polling"),
            Some(&json!({"interval": 5}))
        );
        let back: Value = serde_json::from_slice(&encode_message(m)).unwrap();
        assert_eq!(back, serde_json::from_slice::<Value>(body).unwrap());
    }

    #[test]
    fn hand_written_decoding_matches_the_derived_rules() {
        // A known field twice is an error; another field twice keeps the last value.
        assert!(matches!(
            decode_batch(br#"{"channel":"/a","channel":"/b"}"#),
            Err(DecodeError::Json(e)) if e.is_data()
        ));
        assert!(matches!(
            decode_batch(br#"{"channel":"/a","advice":{"timeout":1,"timeout":2}}"#),
            Err(DecodeError::Json(e)) if e.is_data()
        ));
        let m = &decode_batch(br#"{"channel":"/a","x":1,"x":2}"#).unwrap()[0];
        assert_eq!(m.other.get("x"), Some(&json!(2)));
        // null: absent for typed fields, present for id, data and ext.
        let m = &decode_batch(
            br#"{"channel":"/a","clientId":null,"advice":null,"id":null,"ext":null}"#,
        )
        .unwrap()[0];
        assert_eq!(m.client_id, None);
        assert_eq!(m.advice, None);
        assert_eq!(m.id, Some(Value::Null));
        assert_eq!(m.ext, Some(Value::Null));
        // Wrong types are data errors; a message must be an object.
        assert!(matches!(
            decode_batch(br#"{"channel":"/a","successful":"yes"}"#),
            Err(DecodeError::Json(e)) if e.is_data()
        ));
        assert!(matches!(decode_batch(br#"[["/a"]]"#), Err(DecodeError::Json(e)) if e.is_data()));
        // Also through serde_json::Value (keys arrive as owned strings).
        let v = json!({"channel":"/a","advice":{"interval":5,"x-y":true},"z":[1]});
        let m: Message = serde_json::from_value(v).unwrap();
        assert_eq!(m.advice.as_ref().unwrap().interval, Some(5));
        assert_eq!(m.advice.unwrap().other.get("x-y"), Some(&json!(true)));
        assert_eq!(m.other.get("z"), Some(&json!([1])));
    }

    #[test]
    fn id_is_echoed_exactly() {
        let m = &decode_batch(br#"[{"channel":"/meta/connect","id":7}]"#).unwrap()[0];
        assert_eq!(m.reply().id, Some(json!(7)));
        let m = &decode_batch(br#"[{"channel":"/meta/connect","id":"7"}]"#).unwrap()[0];
        assert_eq!(m.reply().id, Some(json!("7")));
    }

    #[test]
    fn null_data_survives() {
        let m = &decode_batch(br#"{"channel":"/a","data":null}"#).unwrap()[0];
        assert_eq!(m.data, Some(Value::Null));
        assert_eq!(encode_message(m), br#"{"channel":"/a","data":null}"#);
    }

    fn json_leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            "[a-zA-Z0-9 /_\\-\u{e9}\u{1F600}\"\\\\]{0,8}".prop_map(Value::String),
        ]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        json_leaf().prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn extra_fields() -> impl Strategy<Value = Map<String, Value>> {
        // Keys that no typed field claims.
        prop::collection::btree_map("x[a-z]{0,4}", json_value(), 0..3)
            .prop_map(|m| m.into_iter().collect())
    }

    fn advice() -> impl Strategy<Value = Advice> {
        (
            prop::option::of(prop_oneof![
                Just(Reconnect::Retry),
                Just(Reconnect::Handshake),
                Just(Reconnect::None)
            ]),
            prop::option::of(any::<i64>()),
            prop::option::of(0i64..1_000_000),
            prop::option::of(any::<bool>()),
            extra_fields(),
        )
            .prop_map(
                |(reconnect, interval, timeout, multiple_clients, other)| Advice {
                    reconnect,
                    interval,
                    timeout,
                    multiple_clients,
                    other,
                    ..Advice::default()
                },
            )
    }

    fn message() -> impl Strategy<Value = Message> {
        (
            "(/[a-z]{1,5}){1,3}",
            prop::option::of(prop_oneof![
                "[0-9a-z]{1,6}".prop_map(Value::String),
                any::<u32>().prop_map(|n| json!(n))
            ]),
            prop::option::of("[0-9a-z]{25}"),
            prop::option::of(any::<bool>()),
            prop::option::of(json_value()),
            prop::option::of(advice()),
            prop::option::of(json_value()),
            prop::option::of(prop_oneof![
                "/[a-z]{1,4}".prop_map(Subscription::One),
                prop::collection::vec("/[a-z]{1,4}", 0..3).prop_map(Subscription::Many),
            ]),
            prop::option::of(prop::collection::vec("[a-z-]{1,12}", 0..3)),
            extra_fields(),
        )
            .prop_map(
                |(
                    channel,
                    id,
                    client_id,
                    successful,
                    data,
                    advice,
                    ext,
                    subscription,
                    types,
                    other,
                )| Message {
                    channel,
                    id,
                    client_id,
                    successful,
                    data,
                    advice,
                    ext,
                    subscription,
                    supported_connection_types: types,
                    other,
                    ..Message::default()
                },
            )
    }

    proptest! {
        #[test]
        fn decode_encode_roundtrip(batch in prop::collection::vec(message(), 1..4)) {
            let bytes = encode_batch(&batch);
            prop_assert_eq!(decode_batch(&bytes).unwrap(), batch.clone());
            let single = encode_message(&batch[0]);
            prop_assert_eq!(&decode_batch(&single).unwrap()[0], &batch[0]);
        }

        #[test]
        fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_batch(&bytes);
        }

        #[test]
        fn decode_never_panics_on_jsonish(s in "[\\[\\]{}\",:0-9a-z\\\\ ]{0,64}") {
            let _ = decode_batch(s.as_bytes());
        }
    }
}
