//! A Bayeux 1.0 / CometD client, with the Salesforce Streaming API's extras.
//!
//! ```no_run
//! # async fn demo() -> Result<(), bayeux_client::Error> {
//! use bayeux_client::{Client, Replay};
//! use futures::StreamExt;
//!
//! let client = Client::builder("http://127.0.0.1:8080/cometd").build()?;
//! let mut events = client.events();
//! let mut chat = client.subscribe("/chat", Replay::New).await?;
//! client.publish("/chat", serde_json::json!({"text": "hello"})).await?;
//! while let Some(message) = chat.next().await {
//!     println!("{:?}", message.data);
//! }
//! # Ok(()) }
//! ```
//!
//! Layers, from the bottom:
//! - [`state`]: the protocol state machine, a plain struct with no I/O (advice, errors,
//!   re-authentication, re-subscription with replay, de-duplication, stall escalation);
//! - `transport`: long-polling (a dedicated connection for the held connect, one cookie jar
//!   per client) and WebSocket;
//! - [`ext`]: extensions ([`ext::ack`]) and the replay extension's checkpoint stores
//!   ([`ext::replay`]);
//! - [`auth`]: [`auth::TokenProvider`], static tokens and the Salesforce OAuth flows;
//! - [`watchdog`]: connect deadlines and stall escalation;
//! - [`Client`]: the driver task that runs the state machine over a transport.
#![deny(unreachable_pub)]

pub mod auth;
mod backoff;
mod client;
mod error;
pub mod events;
pub mod ext;
pub mod options;
pub mod state;
mod transport;
pub mod watchdog;

pub use backoff::BackoffPolicy;
pub use bayeux_protocol::Message;
pub use client::{Client, Events, Status, Subscription};
pub use error::Error;
pub use events::Event;
pub use ext::replay::{Replay, ReplayFallback};
pub use options::ClientBuilder;
pub use state::TransportKind;
