//! What `bayeux subscribe` and `bayeux publish` share: where the server is (`--url`, or a
//! Salesforce login whose `instance_url` names it), how to authenticate, and how to report.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bayeux_client::auth::{AuthError, Flow, SalesforceAuth, StaticToken, Token, TokenProvider};
use bayeux_client::{ClientBuilder, Event, TransportKind};
use clap::{Args, ValueEnum};

/// Why a client command stopped early: bad arguments (exit 2) or a failure at run time (exit 1).
#[derive(Debug)]
pub(crate) enum Failure {
    /// Exit status 2: the command line (or its input) is wrong.
    Usage(String),
    /// Exit status 1: the server refused, the client gave up, I/O failed.
    Runtime(String),
}

impl Failure {
    /// Prints the message and turns it into the exit status.
    pub(crate) fn report(self) -> ExitCode {
        match self {
            Failure::Usage(m) => {
                eprintln!("bayeux: {m}");
                ExitCode::from(2)
            }
            Failure::Runtime(m) => {
                eprintln!("bayeux: {m}");
                ExitCode::from(1)
            }
        }
    }
}

/// A plain Bayeux endpoint.
#[derive(Args, Debug)]
#[command(next_help_heading = "Bayeux endpoint")]
pub(crate) struct EndpointArgs {
    /// The Bayeux endpoint, e.g. http://127.0.0.1:8080/cometd (instead of the Salesforce
    /// login flags).
    #[arg(long, env = "BAYEUX_URL", value_name = "URL")]
    pub(crate) url: Option<String>,
    /// A bearer token for --url, sent as `Authorization: Bearer TOKEN` on every request.
    #[arg(
        long,
        env = "BAYEUX_ACCESS_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub(crate) access_token: Option<String>,
    /// An extra HTTP header on every request (repeatable).
    #[arg(long = "header", value_name = "NAME:VALUE")]
    pub(crate) headers: Vec<String>,
}

/// A Salesforce login: the OAuth flow is chosen by the flags given.
#[derive(Args, Debug)]
#[command(next_help_heading = "Salesforce login (instead of --url)")]
pub(crate) struct SalesforceArgs {
    /// Log in here (`https://login.salesforce.com`, `https://test.salesforce.com`, a My Domain
    /// URL, or the emulator's base URL); the streaming URL is then
    /// `{instance_url}/cometd/{api-version}`. The flow: --jwt-key → JWT bearer (with --client-id,
    /// --username); --refresh-token → refresh token; --username/--password → password;
    /// otherwise client credentials (--client-id, --client-secret).
    #[arg(long, env = "BAYEUX_SF_LOGIN_URL", value_name = "URL")]
    pub(crate) sf_login_url: Option<String>,
    /// The connected app's consumer key.
    #[arg(long, env = "BAYEUX_SF_CLIENT_ID", value_name = "KEY")]
    pub(crate) client_id: Option<String>,
    /// The connected app's consumer secret (prefer the environment variable).
    #[arg(
        long,
        env = "BAYEUX_SF_CLIENT_SECRET",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    pub(crate) client_secret: Option<String>,
    /// The user (password flow; the JWT subject with --jwt-key).
    #[arg(long, env = "BAYEUX_SF_USERNAME", value_name = "USER")]
    pub(crate) username: Option<String>,
    /// The password, with the security token appended when the org wants one (prefer the
    /// environment variable).
    #[arg(
        long,
        env = "BAYEUX_SF_PASSWORD",
        hide_env_values = true,
        value_name = "PASSWORD"
    )]
    pub(crate) password: Option<String>,
    /// A refresh token: the refresh-token flow (prefer the environment variable).
    #[arg(
        long,
        env = "BAYEUX_SF_REFRESH_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub(crate) refresh_token: Option<String>,
    /// A PEM file with the connected app's RSA private key: the JWT bearer flow (read again
    /// at every login, so a rotated key is picked up).
    #[arg(long, env = "BAYEUX_SF_JWT_KEY", value_name = "FILE")]
    pub(crate) jwt_key: Option<PathBuf>,
    /// The JWT audience [default: the login URL].
    #[arg(long, env = "BAYEUX_SF_JWT_AUDIENCE", value_name = "URL")]
    pub(crate) jwt_audience: Option<String>,
    /// The API version in the streaming URL (/cometd/VERSION) and the REST publish route.
    #[arg(
        long,
        env = "BAYEUX_SF_API_VERSION",
        default_value = "66.0",
        value_name = "VERSION"
    )]
    pub(crate) api_version: String,
}

/// `--transport`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum TransportArg {
    /// WebSocket when the server offers it, else long-polling.
    Auto,
    /// WebSocket only.
    Websocket,
    /// Long-polling only.
    LongPolling,
}

impl From<TransportArg> for TransportKind {
    fn from(t: TransportArg) -> Self {
        match t {
            TransportArg::Auto => TransportKind::Auto,
            TransportArg::Websocket => TransportKind::WebSocket,
            TransportArg::LongPolling => TransportKind::LongPolling,
        }
    }
}

/// Where the server is and how to authenticate, once resolved.
pub(crate) struct Target {
    /// The Bayeux endpoint.
    pub(crate) url: String,
    /// Tokens, when there are any.
    pub(crate) provider: Option<Arc<dyn TokenProvider>>,
    /// Salesforce: the instance URL and API version (for the REST publish route).
    pub(crate) salesforce: Option<(String, String)>,
    headers: Vec<(String, String)>,
}

impl Target {
    /// A client builder for the target, with its headers and token provider.
    pub(crate) fn builder(&self) -> ClientBuilder {
        let mut b = bayeux_client::Client::builder(self.url.clone());
        for (name, value) in &self.headers {
            b = b.header(name, value);
        }
        if let Some(p) = &self.provider {
            b = b.token_provider(Shared(p.clone()));
        }
        b
    }
}

/// A shared provider behind the builder's `impl TokenProvider`.
struct Shared(Arc<dyn TokenProvider>);

#[async_trait]
impl TokenProvider for Shared {
    async fn token(&self) -> Result<Token, AuthError> {
        self.0.token().await
    }
}

/// Hands out the token of the login that found the instance first, then fresh ones: the
/// client's first handshake needs no second login.
struct Primed {
    first: Mutex<Option<Token>>,
    inner: SalesforceAuth,
}

#[async_trait]
impl TokenProvider for Primed {
    async fn token(&self) -> Result<Token, AuthError> {
        let first = self.first.lock().unwrap_or_else(|e| e.into_inner()).take();
        match first {
            Some(t) => Ok(t),
            None => self.inner.token().await,
        }
    }
}

fn require(value: &Option<String>, flag: &str, flow: &str) -> Result<String, Failure> {
    value
        .clone()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| Failure::Usage(format!("the {flow} flow needs {flag}")))
}

fn check_scheme(url: &str, what: &str) -> Result<(), Failure> {
    let parsed =
        url::Url::parse(url).map_err(|e| Failure::Usage(format!("{what} {url:?}: {e}")))?;
    match parsed.scheme() {
        "http" => Ok(()),
        "https" if cfg!(feature = "rustls") => Ok(()),
        "https" => Err(Failure::Usage(format!(
            "{what} {url} is https://, and this build has no TLS: rebuild with \
             `cargo build --release -p bayeux-cli --features rustls`"
        ))),
        other => Err(Failure::Usage(format!(
            "{what} {url}: the scheme must be http or https, not {other}"
        ))),
    }
}

impl SalesforceArgs {
    fn flow(&self) -> Result<Flow, Failure> {
        let exclusive = [
            self.jwt_key.is_some(),
            self.refresh_token.is_some(),
            self.password.is_some(),
        ];
        if exclusive.iter().filter(|x| **x).count() > 1 {
            return Err(Failure::Usage(
                "give one of --jwt-key, --refresh-token, --password".into(),
            ));
        }
        if let Some(key) = &self.jwt_key {
            return Ok(Flow::JwtBearer {
                client_id: require(&self.client_id, "--client-id", "JWT bearer")?,
                username: require(&self.username, "--username", "JWT bearer")?,
                key_file: key.clone(),
                audience: self.jwt_audience.clone(),
            });
        }
        let client_id = require(&self.client_id, "--client-id", "Salesforce")?;
        if let Some(refresh_token) = &self.refresh_token {
            return Ok(Flow::RefreshToken {
                client_id,
                client_secret: require(&self.client_secret, "--client-secret", "refresh token")?,
                refresh_token: refresh_token.clone(),
            });
        }
        if self.username.is_some() || self.password.is_some() {
            return Ok(Flow::Password {
                client_id,
                client_secret: require(&self.client_secret, "--client-secret", "password")?,
                username: require(&self.username, "--username", "password")?,
                password: require(&self.password, "--password", "password")?,
            });
        }
        Ok(Flow::ClientCredentials {
            client_id,
            client_secret: require(&self.client_secret, "--client-secret", "client credentials")?,
        })
    }

    fn any_given(&self) -> bool {
        self.sf_login_url.is_some()
    }
}

/// Resolves `--url` or the Salesforce login (logging in once to learn `instance_url`).
pub(crate) async fn resolve(
    endpoint: &EndpointArgs,
    sf: &SalesforceArgs,
    request_timeout: Duration,
) -> Result<Target, Failure> {
    let mut headers = Vec::new();
    for h in &endpoint.headers {
        let Some((name, value)) = h.split_once(':') else {
            return Err(Failure::Usage(format!("--header {h:?} is not NAME:VALUE")));
        };
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    match (&endpoint.url, sf.any_given()) {
        (Some(_), true) => Err(Failure::Usage(
            "give either --url or the Salesforce login flags (--sf-login-url …), not both".into(),
        )),
        (None, false) => Err(Failure::Usage(
            "where is the server? give --url URL, or --sf-login-url URL with the login flags"
                .into(),
        )),
        (Some(url), false) => {
            check_scheme(url, "--url")?;
            let provider = endpoint
                .access_token
                .as_ref()
                .map(|t| Arc::new(StaticToken::bearer(t.clone())) as Arc<dyn TokenProvider>);
            Ok(Target {
                url: url.clone(),
                provider,
                salesforce: None,
                headers,
            })
        }
        (None, true) => {
            let login_url = sf.sf_login_url.clone().unwrap_or_default();
            check_scheme(&login_url, "--sf-login-url")?;
            if endpoint.access_token.is_some() {
                return Err(Failure::Usage(
                    "--access-token goes with --url; the Salesforce login gets its own tokens"
                        .into(),
                ));
            }
            let version = sf.api_version.trim_start_matches('v').to_owned();
            if !version
                .split_once('.')
                .is_some_and(|(a, b)| a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok())
            {
                return Err(Failure::Usage(format!(
                    "--api-version {:?} is not a version like 66.0",
                    sf.api_version
                )));
            }
            let auth = SalesforceAuth::new(&login_url, sf.flow()?).with_timeout(request_timeout);
            let token = auth.token().await.map_err(|e| {
                Failure::Runtime(format!("Salesforce login at {login_url} failed: {e}"))
            })?;
            let Some(instance) = token.instance_url.clone().filter(|u| !u.is_empty()) else {
                return Err(Failure::Runtime(
                    "the Salesforce login answered without an instance_url".into(),
                ));
            };
            let instance = instance.trim_end_matches('/').to_owned();
            check_scheme(&instance, "instance_url")?;
            Ok(Target {
                url: format!("{instance}/cometd/{version}"),
                provider: Some(Arc::new(Primed {
                    first: Mutex::new(Some(token)),
                    inner: auth,
                })),
                salesforce: Some((instance, version)),
                headers,
            })
        }
    }
}

/// Parses a duration: plain seconds (`90`, `0.5`) or humantime (`2m`, `1h30m`, `500ms`).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Ok(Duration::from_secs_f64(secs));
        }
        return Err(format!("{s:?} is not a duration"));
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))
}

/// One line describing an [`Event`], for stderr.
pub(crate) fn describe(event: &Event) -> String {
    match event {
        Event::Connected {
            client_id,
            transport,
            rehandshake,
        } => format!(
            "connected over {transport} (client {client_id}{})",
            if *rehandshake { ", new session" } else { "" }
        ),
        Event::Reconnecting {
            reason,
            handshake,
            attempt,
            delay,
        } => format!(
            "connection lost ({reason}); {} in {:.3}s (attempt {attempt})",
            if *handshake {
                "handshaking again"
            } else {
                "reconnecting"
            },
            delay.as_secs_f64()
        ),
        Event::Reauthenticated => "re-authenticated with a fresh token".into(),
        Event::AuthFailed {
            error,
            attempt,
            retry_in,
        } => format!(
            "could not get a token (attempt {attempt}): {error}; trying again in {:.3}s",
            retry_in.as_secs_f64()
        ),
        Event::Resumed { channel, from } => {
            format!("re-subscribed to {channel} from replay ID {from}")
        }
        Event::ReplayFallback {
            channel,
            invalid,
            fallback,
        } => format!(
            "the server refused replay ID {invalid} on {channel}; subscribed from {fallback} instead{}",
            if *fallback == -1 {
                " (events published meanwhile are missed)"
            } else {
                " (retained events are delivered again)"
            }
        ),
        Event::SubscriptionFailed { channel, error } => {
            format!("subscription to {channel} refused: {error}")
        }
        Event::TransportChanged { transport } => format!("transport changed to {transport}"),
        Event::Stalled { count, rehandshake } => format!(
            "a connect stalled ({count} in a row); {}",
            if *rehandshake {
                "handshaking again"
            } else {
                "connecting again"
            }
        ),
        Event::ServerDisconnected => {
            "the server ended the session (/meta/disconnect); handshaking again".into()
        }
        Event::GaveUp { reason } => format!("gave up: {reason}"),
        Event::Disconnected => "disconnected".into(),
        other => format!("{other:?}"),
    }
}

/// Writes progress lines on stderr, each stamped with the time since start.
#[derive(Clone)]
pub(crate) struct Log {
    start: std::time::Instant,
    quiet: bool,
}

impl Log {
    pub(crate) fn new(quiet: bool) -> Self {
        Log {
            start: std::time::Instant::now(),
            quiet,
        }
    }

    /// A progress or state line (suppressed by `--quiet`).
    pub(crate) fn info(&self, line: &str) {
        if !self.quiet {
            eprintln!(
                "bayeux: [{:>8.3}s] {line}",
                self.start.elapsed().as_secs_f64()
            );
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub(crate) async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// Logs on stderr at `warn` unless `RUST_LOG` says otherwise (the library logs at `info` on
/// every state change; those are reported in plain words instead).
pub(crate) fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("0.5").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
    }

    fn sf(f: impl FnOnce(&mut SalesforceArgs)) -> Result<Flow, Failure> {
        let mut a = SalesforceArgs {
            sf_login_url: Some("http://127.0.0.1:1".into()),
            client_id: Some("id".into()),
            client_secret: Some("s".into()),
            username: None,
            password: None,
            refresh_token: None,
            jwt_key: None,
            jwt_audience: None,
            api_version: "66.0".into(),
        };
        f(&mut a);
        a.flow()
    }

    #[test]
    fn the_flags_choose_the_flow() {
        assert!(matches!(sf(|_| {}), Ok(Flow::ClientCredentials { .. })));
        assert!(matches!(
            sf(|a| {
                a.username = Some("u".into());
                a.password = Some("p".into());
            }),
            Ok(Flow::Password { .. })
        ));
        assert!(matches!(
            sf(|a| a.username = Some("u".into())),
            Err(Failure::Usage(_))
        ));
        assert!(matches!(
            sf(|a| a.refresh_token = Some("r".into())),
            Ok(Flow::RefreshToken { .. })
        ));
        assert!(matches!(
            sf(|a| {
                a.jwt_key = Some("k.pem".into());
                a.username = Some("u".into());
            }),
            Ok(Flow::JwtBearer { .. })
        ));
        assert!(matches!(
            sf(|a| {
                a.jwt_key = Some("k.pem".into());
                a.refresh_token = Some("r".into());
            }),
            Err(Failure::Usage(_))
        ));
        assert!(matches!(sf(|a| a.client_id = None), Err(Failure::Usage(_))));
    }
}
