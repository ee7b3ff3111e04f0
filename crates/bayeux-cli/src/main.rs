//! `bayeux`: the command-line tool.

use std::process::ExitCode;

use bayeux_server::Server;
use bayeux_server::config::EngineKind;
use bayeux_server::config::{DEFAULT_CONFIG_TOML, QueueOverflow, ServerConfig};
use bayeux_server::salesforce::SalesforceConfig;
use clap::{Args, Parser, Subcommand, ValueEnum};

mod publish;
mod remote;
mod subscribe;

#[derive(Parser)]
#[command(name = "bayeux", version, about = "Bayeux / CometD server and tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a Bayeux server. Prints `LISTENING http://HOST:PORT/PATH` on stdout once bound.
    Serve(Box<ServeArgs>),
    /// Print the commented default configuration file.
    GenerateConfig,
    /// Load-test any Bayeux server (this one, Faye, CometD); prints one JSON line of results.
    Bench(Box<bayeux_bench::BenchArgs>),
    /// Subscribe to channels of any Bayeux server or Salesforce org; one JSON line per event.
    Subscribe(Box<subscribe::SubscribeArgs>),
    /// Publish to a channel (Bayeux, or a Salesforce platform event through REST).
    Publish(Box<publish::PublishArgs>),
}

#[derive(Clone, Copy, ValueEnum)]
enum Overflow {
    DropOldest,
    Disconnect,
}

#[derive(Clone, Copy, ValueEnum)]
enum EngineArg {
    Disk,
    Memory,
    Redis,
}

/// Every flag overrides the config file; every flag can also be set by its BAYEUX_* variable.
#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file (see `bayeux generate-config`).
    #[arg(long, env = "BAYEUX_CONFIG")]
    config: Option<String>,
    /// Address to listen on (port 0 picks a free port) [default: 127.0.0.1:8080].
    #[arg(long, env = "BAYEUX_BIND")]
    bind: Option<String>,
    /// URL path of the Bayeux endpoint [default: /cometd].
    #[arg(long, env = "BAYEUX_PATH")]
    path: Option<String>,
    /// Storage engine: disk (durable, under --data-dir), redis (several nodes share one Redis)
    /// or memory (tests) [default: disk].
    #[arg(long, env = "BAYEUX_ENGINE", value_enum)]
    engine: Option<EngineArg>,
    /// Where the disk engine keeps its data [default: ./data].
    #[arg(long, env = "BAYEUX_DATA_DIR")]
    data_dir: Option<String>,
    /// The Redis of --engine redis [default: redis://127.0.0.1:6379/0].
    #[arg(long, env = "BAYEUX_REDIS_URL")]
    redis_url: Option<String>,
    /// Prefix of every Redis key, so several clusters can share one Redis [default: bayeux:].
    #[arg(long, env = "BAYEUX_REDIS_PREFIX")]
    redis_prefix: Option<String>,
    /// Connection types offered, comma-separated [default: websocket,long-polling,callback-polling].
    #[arg(long, env = "BAYEUX_TRANSPORTS", value_delimiter = ',')]
    transports: Option<Vec<String>>,
    /// How long a /meta/connect is held (advice.timeout), ms [default: 30000].
    #[arg(long, env = "BAYEUX_CONNECT_TIMEOUT_MS")]
    connect_timeout_ms: Option<u64>,
    /// advice.interval, ms [default: 0].
    #[arg(long, env = "BAYEUX_INTERVAL_MS")]
    interval_ms: Option<u64>,
    /// A session without a connect for this long expires, ms [default: 10000].
    #[arg(long, env = "BAYEUX_MAX_INTERVAL_MS")]
    max_interval_ms: Option<u64>,
    /// Batching delay before answering a held connect that has messages, ms [default: 0].
    #[arg(long, env = "BAYEUX_LAZY_DELAY_MS")]
    lazy_delay_ms: Option<u64>,
    /// How often expired sessions are swept, ms [default: 1000].
    #[arg(long, env = "BAYEUX_SWEEP_INTERVAL_MS")]
    sweep_interval_ms: Option<u64>,
    /// How long shutdown waits for open requests, ms [default: 5000].
    #[arg(long, env = "BAYEUX_SHUTDOWN_GRACE_MS")]
    shutdown_grace_ms: Option<u64>,
    /// How long reading one HTTP request may take once its first byte arrived, ms [default: 30000].
    #[arg(long, env = "BAYEUX_REQUEST_READ_TIMEOUT_MS")]
    request_read_timeout_ms: Option<u64>,
    /// Largest HTTP request body, bytes (larger: HTTP 413) [default: 65536].
    #[arg(long, env = "BAYEUX_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// Largest HTTP request head, bytes (longer request line: HTTP 414, longer headers: 431) [default: 65536].
    #[arg(long, env = "BAYEUX_MAX_HEADER_BYTES")]
    max_header_bytes: Option<usize>,
    /// Largest WebSocket message, bytes (larger: close 1009) [default: 65536].
    #[arg(long, env = "BAYEUX_MAX_FRAME_BYTES")]
    max_frame_bytes: Option<usize>,
    /// Most messages in one request or frame [default: 1000].
    #[arg(long, env = "BAYEUX_MAX_MESSAGES_PER_REQUEST")]
    max_messages_per_request: Option<usize>,
    /// Most messages waiting in one session's queue [default: 10000].
    #[arg(long, env = "BAYEUX_MAX_QUEUE")]
    max_queue: Option<usize>,
    /// What a full queue does [default: drop-oldest].
    #[arg(long, env = "BAYEUX_QUEUE_OVERFLOW", value_enum)]
    queue_overflow: Option<Overflow>,
    /// Most live sessions [default: 1000000].
    #[arg(long, env = "BAYEUX_MAX_SESSIONS")]
    max_sessions: Option<usize>,
    /// Most subscriptions per session [default: 1000].
    #[arg(long, env = "BAYEUX_MAX_SUBSCRIPTIONS_PER_SESSION")]
    max_subscriptions_per_session: Option<usize>,
    /// Longest JSONP callback name [default: 64].
    #[arg(long, env = "BAYEUX_JSONP_CALLBACK_MAX_LEN")]
    jsonp_callback_max_len: Option<usize>,
    /// History kept per channel: maximum age, seconds [default: 86400].
    #[arg(long, env = "BAYEUX_RETENTION_MAX_AGE_SECS")]
    retention_max_age_secs: Option<u64>,
    /// History kept per channel: maximum messages [default: 10000].
    #[arg(long, env = "BAYEUX_RETENTION_MAX_MESSAGES")]
    retention_max_messages: Option<usize>,
    /// History kept per channel: maximum payload bytes [default: 67108864].
    #[arg(long, env = "BAYEUX_RETENTION_MAX_BYTES")]
    retention_max_bytes: Option<u64>,
    /// Play the Salesforce Streaming API (OAuth, `/cometd/<version>`, REST publish, faults).
    /// Without a `[salesforce]` config section, a demo org is used and printed on stderr.
    #[arg(long, env = "BAYEUX_SALESFORCE")]
    salesforce: bool,
    /// Salesforce mode: how long access tokens live, seconds [default: 7200].
    #[arg(long, env = "BAYEUX_SF_TOKEN_LIFETIME")]
    sf_token_lifetime: Option<u64>,
    /// Salesforce mode: connect hold and advice.timeout, seconds [default: 110].
    #[arg(long, env = "BAYEUX_SF_CONNECT_TIMEOUT")]
    sf_connect_timeout: Option<u64>,
    /// Salesforce mode: a session without a request for this long is swept, seconds [default: 40].
    #[arg(long, env = "BAYEUX_SF_RECONNECT_DEADLINE")]
    sf_reconnect_deadline: Option<u64>,
}

macro_rules! set {
    ($target:expr, $value:expr) => {
        if let Some(v) = $value {
            $target = v;
        }
    };
}

impl ServeArgs {
    fn into_config(self) -> Result<ServerConfig, String> {
        let mut c = match &self.config {
            Some(path) => ServerConfig::from_file(path).map_err(|e| e.to_string())?,
            None => ServerConfig::default(),
        };
        set!(c.bind, self.bind);
        set!(c.path, self.path);
        match self.engine {
            Some(EngineArg::Memory) => c.engine = EngineKind::Memory,
            Some(EngineArg::Disk) => c.engine = EngineKind::Disk,
            Some(EngineArg::Redis) => c.engine = EngineKind::Redis,
            None => {}
        }
        set!(c.data_dir, self.data_dir);
        set!(c.redis.url, self.redis_url);
        set!(c.redis.prefix, self.redis_prefix);
        set!(c.transports, self.transports);
        let t = &mut c.timeouts;
        set!(t.connect_timeout_ms, self.connect_timeout_ms);
        set!(t.interval_ms, self.interval_ms);
        set!(t.max_interval_ms, self.max_interval_ms);
        set!(t.lazy_delay_ms, self.lazy_delay_ms);
        set!(t.sweep_interval_ms, self.sweep_interval_ms);
        set!(t.shutdown_grace_ms, self.shutdown_grace_ms);
        set!(t.request_read_timeout_ms, self.request_read_timeout_ms);
        let l = &mut c.limits;
        set!(l.max_body_bytes, self.max_body_bytes);
        set!(l.max_header_bytes, self.max_header_bytes);
        set!(l.max_frame_bytes, self.max_frame_bytes);
        set!(l.max_messages_per_request, self.max_messages_per_request);
        set!(l.max_queue, self.max_queue);
        if let Some(o) = self.queue_overflow {
            l.queue_overflow = match o {
                Overflow::DropOldest => QueueOverflow::DropOldest,
                Overflow::Disconnect => QueueOverflow::Disconnect,
            };
        }
        set!(l.max_sessions, self.max_sessions);
        set!(
            l.max_subscriptions_per_session,
            self.max_subscriptions_per_session
        );
        set!(l.jsonp_callback_max_len, self.jsonp_callback_max_len);
        let r = &mut c.retention;
        set!(r.max_age_secs, self.retention_max_age_secs);
        set!(r.max_messages, self.retention_max_messages);
        set!(r.max_bytes, self.retention_max_bytes);
        if self.salesforce && c.salesforce.is_none() {
            c.salesforce = Some(SalesforceConfig::demo());
        }
        if let Some(sf) = &mut c.salesforce {
            set!(sf.token_lifetime_secs, self.sf_token_lifetime);
            set!(sf.connect_timeout_secs, self.sf_connect_timeout);
            set!(sf.reconnect_deadline_secs, self.sf_reconnect_deadline);
        } else if self.sf_token_lifetime.is_some()
            || self.sf_connect_timeout.is_some()
            || self.sf_reconnect_deadline.is_some()
        {
            return Err("--sf-* flags need --salesforce or a [salesforce] config section".into());
        }
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }
}

async fn shutdown_signal() {
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

async fn serve(args: ServeArgs) -> Result<(), String> {
    let config = args.into_config()?;
    let bind = config.bind.clone();
    let server = Server::builder(config)
        .bind()
        .await
        .map_err(|e| format!("cannot listen on {bind}: {e}"))?;
    // The first line on stdout, for scripts and tests that start the server on port 0.
    println!("LISTENING {}", server.url());
    if let Some(emulator) = server.emulator() {
        eprintln!("{}", bayeux_server::salesforce::describe(emulator));
    }
    tracing::info!(url = %server.url(), "listening");
    server
        .run(shutdown_signal())
        .await
        .map_err(|e| format!("server failed: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::GenerateConfig => {
            print!("{DEFAULT_CONFIG_TOML}");
            ExitCode::SUCCESS
        }
        Command::Bench(args) => bayeux_bench::run_cli(*args),
        Command::Subscribe(args) => subscribe::run(*args),
        Command::Publish(args) => publish::run(*args),
        Command::Serve(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                .init();
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("bayeux: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(serve(*args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("bayeux: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
