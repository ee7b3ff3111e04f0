//! Authentication: a [`TokenProvider`] hands the client an access token, sent as
//! `Authorization: <token_type> <access_token>` on every request (and on the WebSocket upgrade).
//!
//! The client asks the provider once before its first handshake and again whenever the server
//! says the token is no good: `401`/`403` in `error` or in `ext.sfdc.failureReason` of a
//! handshake or connect reply, `advice.reconnect: none` on a handshake or connect, or HTTP 401.
//! It then handshakes again and re-subscribes with its replay map. A provider that fails is
//! asked again with exponential backoff and jitter, up to a cap.

pub mod salesforce;

use async_trait::async_trait;
use serde::Deserialize;

pub use salesforce::{Flow, SalesforceAuth};

/// An access token, with what a Salesforce token endpoint returns beside it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
pub struct Token {
    /// The token itself.
    pub access_token: String,
    /// The scheme for the `Authorization` header; `Bearer` when the server gave none.
    #[serde(default = "bearer")]
    pub token_type: String,
    /// Salesforce: the org's instance, e.g. `https://acme.my.salesforce.com`.
    #[serde(default)]
    pub instance_url: Option<String>,
    /// Salesforce: the identity URL `…/id/<orgId>/<userId>`.
    #[serde(default)]
    pub id: Option<String>,
    /// Salesforce: when the token was issued, epoch milliseconds as a string.
    #[serde(default)]
    pub issued_at: Option<String>,
    /// Salesforce: HMAC of `id` and `issued_at`.
    #[serde(default)]
    pub signature: Option<String>,
    /// Granted scopes.
    #[serde(default)]
    pub scope: Option<String>,
    /// A refresh token, for the flows that return one.
    #[serde(default)]
    pub refresh_token: Option<String>,
}

fn bearer() -> String {
    "Bearer".into()
}

impl Token {
    /// A bearer token with nothing else.
    pub fn bearer(access_token: impl Into<String>) -> Self {
        Token {
            access_token: access_token.into(),
            token_type: bearer(),
            instance_url: None,
            id: None,
            issued_at: None,
            signature: None,
            scope: None,
            refresh_token: None,
        }
    }

    /// The `Authorization` header value: `<token_type> <access_token>`.
    ///
    /// ```
    /// use bayeux_client::auth::Token;
    /// assert_eq!(Token::bearer("abc").authorization(), "Bearer abc");
    /// ```
    pub fn authorization(&self) -> String {
        let scheme = if self.token_type.is_empty() {
            "Bearer"
        } else {
            &self.token_type
        };
        format!("{scheme} {}", self.access_token)
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never log a credential.
        f.debug_struct("Token")
            .field("access_token", &"<redacted>")
            .field("token_type", &self.token_type)
            .field("instance_url", &self.instance_url)
            .field("id", &self.id)
            .field("issued_at", &self.issued_at)
            .finish_non_exhaustive()
    }
}

/// Why a token could not be had.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The token endpoint could not be reached, or timed out.
    #[error("token endpoint unreachable: {0}")]
    Unreachable(String),
    /// The token endpoint refused (e.g. HTTP 400 `invalid_grant`).
    #[error("token request refused (HTTP {status}): {error}: {description}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// `error` from the body.
        error: String,
        /// `error_description` from the body.
        description: String,
    },
    /// The token endpoint answered something that is not a token.
    #[error("token endpoint answered something that is not a token: {0}")]
    InvalidResponse(String),
    /// The JWT signing key could not be read or used.
    #[error("JWT signing key: {0}")]
    Key(String),
    /// A user-supplied provider failed.
    #[error("{0}")]
    Other(String),
}

/// Supplies access tokens. Called before the first handshake and after every authentication
/// failure; it should fetch a **fresh** token each time (a cached one is what just failed).
#[async_trait]
pub trait TokenProvider: Send + Sync + 'static {
    /// A fresh token.
    async fn token(&self) -> Result<Token, AuthError>;
}

/// A token fixed at build time (for example from an environment variable). Re-authentication
/// hands out the same token, so a dead static token ends in backoff, not in a fix.
#[derive(Debug, Clone)]
pub struct StaticToken(pub Token);

impl StaticToken {
    /// A static bearer token.
    pub fn bearer(access_token: impl Into<String>) -> Self {
        StaticToken(Token::bearer(access_token))
    }
}

#[async_trait]
impl TokenProvider for StaticToken {
    async fn token(&self) -> Result<Token, AuthError> {
        Ok(self.0.clone())
    }
}
