//! Salesforce OAuth 2.0 flows: each one POSTs a form to `{login_url}/services/oauth2/token` and
//! parses `{access_token, instance_url, id, token_type, issued_at, signature}`.
//!
//! | flow | `grant_type` | parameters |
//! |---|---|---|
//! | [`Flow::Password`] | `password` | client_id, client_secret, username, password (+ security token) |
//! | [`Flow::RefreshToken`] | `refresh_token` | client_id, client_secret, refresh_token |
//! | [`Flow::ClientCredentials`] | `client_credentials` | client_id, client_secret (send it to the My Domain host) |
//! | [`Flow::JwtBearer`] | `urn:ietf:params:oauth:grant-type:jwt-bearer` | assertion: an RS256 JWT signed with the connected app's key |
//!
//! A refusal (HTTP 400 `{"error":"invalid_grant","error_description":"authentication failure"}`)
//! becomes [`AuthError::Rejected`].

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{AuthError, Token, TokenProvider};

/// The JWT bearer grant type.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// The production login host.
pub const LOGIN_URL: &str = "https://login.salesforce.com";

/// Which OAuth flow to run.
#[derive(Clone)]
#[non_exhaustive]
pub enum Flow {
    /// Username-password (being retired by Salesforce; fine for test orgs).
    Password {
        /// The connected app's consumer key.
        client_id: String,
        /// The connected app's consumer secret.
        client_secret: String,
        /// The user.
        username: String,
        /// The password, with the security token appended when the org requires one.
        password: String,
    },
    /// Refresh token.
    RefreshToken {
        /// The connected app's consumer key.
        client_id: String,
        /// The connected app's consumer secret.
        client_secret: String,
        /// The refresh token.
        refresh_token: String,
    },
    /// Client credentials (the connected app runs as its configured user).
    ClientCredentials {
        /// The connected app's consumer key.
        client_id: String,
        /// The connected app's consumer secret.
        client_secret: String,
    },
    /// JWT bearer: an RS256 assertion signed with a PEM private key read from `key_file`
    /// each time a token is needed (so a rotated key is picked up).
    JwtBearer {
        /// The connected app's consumer key (the JWT `iss`).
        client_id: String,
        /// The user to act as (the JWT `sub`).
        username: String,
        /// A PEM file holding the RSA private key (PKCS#1 or PKCS#8).
        key_file: PathBuf,
        /// The JWT `aud`; the login URL when `None` (`https://login.salesforce.com` or
        /// `https://test.salesforce.com`).
        audience: Option<String>,
    },
}

impl std::fmt::Debug for Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets stay out of logs.
        match self {
            Flow::Password {
                client_id,
                username,
                ..
            } => f
                .debug_struct("Password")
                .field("client_id", client_id)
                .field("username", username)
                .finish_non_exhaustive(),
            Flow::RefreshToken { client_id, .. } => f
                .debug_struct("RefreshToken")
                .field("client_id", client_id)
                .finish_non_exhaustive(),
            Flow::ClientCredentials { client_id, .. } => f
                .debug_struct("ClientCredentials")
                .field("client_id", client_id)
                .finish_non_exhaustive(),
            Flow::JwtBearer {
                client_id,
                username,
                key_file,
                audience,
            } => f
                .debug_struct("JwtBearer")
                .field("client_id", client_id)
                .field("username", username)
                .field("key_file", key_file)
                .field("audience", audience)
                .finish(),
        }
    }
}

/// A [`TokenProvider`] running one of the Salesforce OAuth [`Flow`]s.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use bayeux_client::auth::{Flow, SalesforceAuth, TokenProvider};
/// let auth = SalesforceAuth::new(
///     "https://login.salesforce.com",
///     Flow::ClientCredentials { client_id: "key".into(), client_secret: "secret".into() },
/// );
/// let token = auth.token().await?;
/// println!("{:?}", token.instance_url);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SalesforceAuth {
    login_url: String,
    flow: Flow,
    http: reqwest::Client,
    timeout: Duration,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: u64,
}

#[derive(Deserialize)]
struct OAuthError {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

/// Token responses are small; anything bigger is not one.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;

impl SalesforceAuth {
    /// A provider posting to `{login_url}/services/oauth2/token`.
    pub fn new(login_url: impl Into<String>, flow: Flow) -> Self {
        SalesforceAuth {
            login_url: login_url.into().trim_end_matches('/').to_owned(),
            flow,
            http: reqwest::Client::new(),
            timeout: Duration::from_secs(30),
        }
    }

    /// Uses `http` for token requests (proxies, TLS roots…).
    pub fn with_http_client(mut self, http: reqwest::Client) -> Self {
        self.http = http;
        self
    }

    /// Bounds each token request (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The token endpoint.
    pub fn token_url(&self) -> String {
        format!("{}/services/oauth2/token", self.login_url)
    }

    /// The form this flow posts (the JWT is signed now).
    pub fn form(&self) -> Result<Vec<(&'static str, String)>, AuthError> {
        Ok(match &self.flow {
            Flow::Password {
                client_id,
                client_secret,
                username,
                password,
            } => vec![
                ("grant_type", "password".into()),
                ("client_id", client_id.clone()),
                ("client_secret", client_secret.clone()),
                ("username", username.clone()),
                ("password", password.clone()),
            ],
            Flow::RefreshToken {
                client_id,
                client_secret,
                refresh_token,
            } => vec![
                ("grant_type", "refresh_token".into()),
                ("client_id", client_id.clone()),
                ("client_secret", client_secret.clone()),
                ("refresh_token", refresh_token.clone()),
            ],
            Flow::ClientCredentials {
                client_id,
                client_secret,
            } => vec![
                ("grant_type", "client_credentials".into()),
                ("client_id", client_id.clone()),
                ("client_secret", client_secret.clone()),
            ],
            Flow::JwtBearer {
                client_id,
                username,
                key_file,
                audience,
            } => {
                let pem = std::fs::read(key_file)
                    .map_err(|e| AuthError::Key(format!("{}: {e}", key_file.display())))?;
                let aud = audience.as_deref().unwrap_or(&self.login_url);
                let assertion = sign_jwt(client_id, username, aud, &pem)?;
                vec![
                    ("grant_type", JWT_BEARER_GRANT.into()),
                    ("assertion", assertion),
                ]
            }
        })
    }
}

/// Signs the Salesforce JWT bearer assertion: RS256 over `{iss, sub, aud, exp: now + 3 min}`.
pub fn sign_jwt(
    client_id: &str,
    username: &str,
    aud: &str,
    pem: &[u8],
) -> Result<String, AuthError> {
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(pem)
        .map_err(|e| AuthError::Key(format!("not an RSA private key in PEM: {e}")))?;
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        + 180;
    let claims = Claims {
        iss: client_id,
        sub: username,
        aud,
        exp,
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims,
        &key,
    )
    .map_err(|e| AuthError::Key(e.to_string()))
}

/// Parses a token endpoint's answer.
pub fn parse_token_response(status: u16, body: &[u8]) -> Result<Token, AuthError> {
    if status == 200 {
        let token: Token = serde_json::from_slice(body)
            .map_err(|e| AuthError::InvalidResponse(format!("{e}: {}", snippet(body))))?;
        if token.access_token.is_empty() {
            return Err(AuthError::InvalidResponse("empty access_token".into()));
        }
        return Ok(token);
    }
    match serde_json::from_slice::<OAuthError>(body) {
        Ok(e) if !e.error.is_empty() => Err(AuthError::Rejected {
            status,
            error: e.error,
            description: e.error_description,
        }),
        _ => Err(AuthError::Rejected {
            status,
            error: "http_error".into(),
            description: snippet(body),
        }),
    }
}

fn snippet(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(&body[..body.len().min(200)]);
    s.into_owned()
}

#[async_trait]
impl TokenProvider for SalesforceAuth {
    async fn token(&self) -> Result<Token, AuthError> {
        let form = self.form()?;
        let request = async {
            let mut response = self
                .http
                .post(self.token_url())
                .header("accept", "application/json")
                .form(&form)
                .send()
                .await
                .map_err(|e| AuthError::Unreachable(e.to_string()))?;
            let status = response.status().as_u16();
            let mut body = Vec::new();
            while let Some(chunk) = response
                .chunk()
                .await
                .map_err(|e| AuthError::Unreachable(e.to_string()))?
            {
                if body.len() + chunk.len() > MAX_TOKEN_RESPONSE {
                    return Err(AuthError::InvalidResponse(
                        "token response larger than 64 KiB".into(),
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            parse_token_response(status, &body)
        };
        tokio::time::timeout(self.timeout, request)
            .await
            .map_err(|_| AuthError::Unreachable(format!("no answer within {:?}", self.timeout)))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_success_and_refusal() {
        let ok = br#"{"access_token":"00Dxx!AR8","instance_url":"https://acme.my.salesforce.com","id":"https://login.salesforce.com/id/00Dxx/005xx","token_type":"Bearer","issued_at":"1278448832702","signature":"0Cmx="}"#;
        let t = parse_token_response(200, ok).unwrap();
        assert_eq!(t.authorization(), "Bearer 00Dxx!AR8");
        assert_eq!(
            t.instance_url.as_deref(),
            Some("https://acme.my.salesforce.com")
        );
        assert_eq!(t.issued_at.as_deref(), Some("1278448832702"));
        let refused = br#"{"error":"invalid_grant","error_description":"authentication failure"}"#;
        match parse_token_response(400, refused) {
            Err(AuthError::Rejected {
                status: 400,
                error,
                description,
            }) => {
                assert_eq!(error, "invalid_grant");
                assert_eq!(description, "authentication failure");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_token_response(200, b"<html>"),
            Err(AuthError::InvalidResponse(_))
        ));
        assert!(matches!(
            parse_token_response(500, b""),
            Err(AuthError::Rejected { status: 500, .. })
        ));
    }

    #[test]
    fn forms_name_their_grant() {
        let auth = SalesforceAuth::new(
            "https://login.salesforce.com/",
            Flow::Password {
                client_id: "id".into(),
                client_secret: "s".into(),
                username: "u".into(),
                password: "p".into(),
            },
        );
        assert_eq!(
            auth.token_url(),
            "https://login.salesforce.com/services/oauth2/token"
        );
        let form = auth.form().unwrap();
        assert!(form.contains(&("grant_type", "password".into())));
        assert!(!format!("{auth:?}").contains("\"p\""), "{auth:?}");
        let missing = SalesforceAuth::new(
            LOGIN_URL,
            Flow::JwtBearer {
                client_id: "id".into(),
                username: "u".into(),
                key_file: "/nonexistent/key.pem".into(),
                audience: None,
            },
        );
        assert!(matches!(missing.form(), Err(AuthError::Key(_))));
    }

    #[test]
    fn bad_pem_is_a_key_error() {
        assert!(matches!(
            sign_jwt(
                "id",
                "u",
                LOGIN_URL,
                b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n"
            ),
            Err(AuthError::Key(_))
        ));
    }
}
