//! A Bayeux 1.0 / CometD server: long-polling, WebSocket and callback-polling transports over
//! one broker, with a pluggable [`Engine`] and
//! [`SecurityPolicy`](policy::SecurityPolicy).
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use bayeux_server::{Server, config::ServerConfig};
//! let mut config = ServerConfig::default();
//! config.bind = "127.0.0.1:0".into();
//! let server = Server::builder(config).bind().await?;
//! println!("LISTENING {}", server.url());
//! server.run(async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```
#![deny(unreachable_pub)]

pub mod broker;
pub mod config;
pub mod front;
pub mod http;
pub mod metrics;
pub mod policy;
pub mod salesforce;
pub mod transport;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bayeux_engine::Engine;
use bayeux_engine::memory::MemoryEngine;
use bayeux_protocol::Dialect;
use tokio::net::TcpListener;

pub use broker::Broker;
pub use config::ServerConfig;

/// Builds a [`Server`].
pub struct ServerBuilder {
    config: ServerConfig,
    engine: Option<Arc<dyn Engine>>,
    policy: Arc<dyn policy::SecurityPolicy>,
    dialect: Dialect,
}

impl ServerBuilder {
    /// Uses `engine` instead of the one the configuration names.
    pub fn engine(mut self, engine: Arc<dyn Engine>) -> Self {
        self.engine = Some(engine);
        self
    }

    /// Uses `policy` (the default allows everything the broker allows).
    pub fn policy(mut self, policy: Arc<dyn policy::SecurityPolicy>) -> Self {
        self.policy = policy;
        self
    }

    /// Answers errors in `dialect`.
    pub fn dialect(mut self, dialect: Dialect) -> Self {
        self.dialect = dialect;
        self
    }

    /// Validates the configuration, binds the listener and starts the broker's tasks. With a
    /// `[salesforce]` section the server plays Salesforce: its policy, dialect and routes.
    pub async fn bind(mut self) -> std::io::Result<Server> {
        self.config
            .validate()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let emulator = self
            .config
            .salesforce
            .clone()
            .map(salesforce::Emulator::new);
        if let Some(e) = &emulator {
            self.policy = Arc::new(salesforce::SalesforcePolicy::new(e.clone()));
            self.dialect = Dialect::Salesforce;
        }
        self.config = self.config.effective();
        let engine = match self.engine {
            Some(e) => e,
            None => match self.config.engine {
                config::EngineKind::Memory => {
                    Arc::new(MemoryEngine::new(self.config.retention())) as Arc<dyn Engine>
                }
                config::EngineKind::Disk => {
                    let dir = std::path::Path::new(&self.config.data_dir);
                    let engine =
                        bayeux_engine::disk::DiskEngine::open(dir, self.config.retention())
                            .map_err(|e| {
                                std::io::Error::other(format!(
                                    "cannot open the disk engine in {}: {e}",
                                    dir.display()
                                ))
                            })?;
                    Arc::new(engine) as Arc<dyn Engine>
                }
                #[cfg(feature = "redis")]
                config::EngineKind::Redis => {
                    let options = bayeux_engine::redis::RedisOptions {
                        prefix: self.config.redis.prefix.clone(),
                        ..Default::default()
                    };
                    let engine = bayeux_engine::redis::RedisEngine::connect(
                        &self.config.redis.url,
                        self.config.retention(),
                        options,
                    )
                    .await
                    .map_err(|e| std::io::Error::other(format!("cannot use Redis: {e}")))?;
                    Arc::new(engine) as Arc<dyn Engine>
                }
                #[cfg(not(feature = "redis"))]
                config::EngineKind::Redis => {
                    return Err(std::io::Error::other(
                        "this build has no Redis engine (the \"redis\" feature is off)",
                    ));
                }
            },
        };
        let listener = TcpListener::bind(&self.config.bind).await?;
        let local_addr = listener.local_addr()?;
        let broker = Broker::new(self.config, engine, self.policy, self.dialect);
        broker.start();
        if let Some(e) = &emulator {
            e.attach(&format!("http://{local_addr}"), &broker);
        }
        Ok(Server {
            broker,
            listener,
            local_addr,
            emulator,
        })
    }
}

/// A bound server, ready to [`run`](Server::run).
pub struct Server {
    broker: Arc<Broker>,
    listener: TcpListener,
    local_addr: SocketAddr,
    emulator: Option<Arc<salesforce::Emulator>>,
}

impl Server {
    /// A builder over `config` with the default policy and the CometD error dialect.
    pub fn builder(config: ServerConfig) -> ServerBuilder {
        ServerBuilder {
            config,
            engine: None,
            policy: Arc::new(policy::AllowAll),
            dialect: Dialect::Cometd,
        }
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The Bayeux endpoint URL, `http://HOST:PORT/cometd`.
    pub fn url(&self) -> String {
        let path = &self.broker.config().path;
        format!(
            "http://{}{}",
            self.local_addr,
            if path == "/" { "" } else { path }
        )
    }

    /// The Salesforce emulator, when the server plays Salesforce.
    pub fn emulator(&self) -> Option<&Arc<salesforce::Emulator>> {
        self.emulator.as_ref()
    }

    /// The broker, for server-side publishing and service listeners.
    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// Serves until `shutdown` resolves, then shuts down gracefully.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let extra = self
            .emulator
            .map(|e| salesforce::routes(e, self.broker.clone()));
        http::serve(self.listener, self.broker, extra, shutdown).await
    }
}
