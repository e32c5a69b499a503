//! keyward-agent: the daemon that holds keys and answers signing requests on a local socket.
//! `run` hardens the process, unlocks the keys, binds the socket and serves until SIGTERM.
#![forbid(unsafe_code)]

// Explicit paths: the `keyward` binary compiles these same files as one of its modules
// (see docs/decisions.md), and must find them relative to this file.
#[path = "dispatch.rs"]
pub mod dispatch;
#[path = "metrics.rs"]
pub mod metrics;
#[path = "pool.rs"]
pub mod pool;
#[path = "server.rs"]
pub mod server;
#[path = "signals.rs"]
pub mod signals;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use keyward::backend::soft::SoftBackend;
use keyward::config::Config;
use keyward::home::Home;
use keyward::secret::SecretSource;
use keyward::{Error, Result};

/// How long SIGTERM waits for in-flight requests before closing connections.
const DRAIN: Duration = Duration::from_secs(10);
/// How long exiting waits for runtime threads after the drain (a hung device call holds one).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// How often backend health is looked at for up/down audit records.
const BACKEND_WATCH: Duration = Duration::from_secs(1);
/// How long exiting waits for the last audit records to be durable.
const AUDIT_FLUSH: Duration = Duration::from_secs(5);

/// Start-up options; everything else comes from keyward.toml.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Options {
    /// Identity passphrase source: env:NAME, file:PATH (mode 0600), stdin or prompt
    /// (default: agent.passphrase from keyward.toml, else prompt).
    #[arg(long, value_name = "SOURCE")]
    pub passphrase: Option<String>,
    /// Socket path (default: $KEYWARD_SOCK, agent.socket, $XDG_RUNTIME_DIR/keyward/agent.sock,
    /// <home>/run/agent.sock).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Log format: human or json (default: agent.log_format).
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
}

impl Options {
    /// `--passphrase`, else `agent.passphrase` from keyward.toml, else the prompt.
    pub fn passphrase_source(&self, config: &Config) -> Result<SecretSource> {
        match self
            .passphrase
            .as_deref()
            .or(config.agent.passphrase.as_deref())
        {
            Some(s) => s.parse(),
            None => Ok(SecretSource::Prompt),
        }
    }

    /// `--socket`, else `$KEYWARD_SOCK`, `agent.socket`, `$XDG_RUNTIME_DIR`, the home.
    pub fn socket_path(&self, config: &Config, home: &Home) -> PathBuf {
        self.socket.clone().unwrap_or_else(|| {
            keyward::proto::socket_path(config.agent.socket.as_deref(), home.root())
        })
    }
}

/// Run the agent in the foreground until SIGTERM/SIGINT. Blocks.
pub fn run(home: Option<PathBuf>, opts: Options) -> Result<()> {
    // Hardening first, before any secret is read.
    keyward::sys::set_private_umask();
    keyward::sys::disable_core_dumps().map_err(|e| Error::io("disabling core dumps", e))?;

    let home = Home::open(home.as_deref())?;
    home.sweep_temp_files();
    let config = Config::load(&home.config_path())?;
    init_logging(
        opts.log_format
            .as_deref()
            .unwrap_or(&config.agent.log_format),
    );
    lock_memory();

    // A TPM-sealed identity (identity.tpm) opens without input unless a passphrase source is
    // named (--passphrase or agent.passphrase): naming one is also the recovery path.
    let identity = if keyward::identity::is_sealed(&home)
        && opts.passphrase.is_none()
        && config.agent.passphrase.is_none()
    {
        let identity = keyward::identity::unlock_unattended(&home, &config)?;
        tracing::info!("identity unsealed by the TPM (no passphrase)");
        identity
    } else {
        let passphrase = opts
            .passphrase_source(&config)?
            .read("identity passphrase")?;
        let identity = keyward::identity::unlock(&home, &passphrase)?;
        drop(passphrase);
        identity
    };
    let recipient = identity.to_public();
    let soft = SoftBackend::new(&home.keys_dir(), recipient, Some(identity));

    let socket = opts.socket_path(&config, &home);
    let workers = config.workers();
    let state = Arc::new(dispatch::State::new(home, socket.clone(), config, soft)?);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("keyward-io")
        .build()
        .map_err(|e| Error::io("starting the runtime", e))?;
    let audited = state.clone();
    let served = rt.block_on(async move {
        let listener = server::bind(&socket)?;
        state.lifecycle_record("agent_start");
        if let Some(addr) = state.config().metrics.listen.clone() {
            let listener = std::net::TcpListener::bind(&addr)
                .map_err(|e| Error::Config(format!("metrics.listen {addr}: {e}")))?;
            let scraped = state.clone();
            metrics::serve(listener, move || scraped.metrics_text())
                .map_err(|e| Error::io("starting the metrics listener", e))?;
            tracing::info!(%addr, "metrics on http://{addr}/metrics");
        }
        let watched = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(BACKEND_WATCH);
            loop {
                tick.tick().await;
                watched.watch_backends();
            }
        });
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(signals::watch_signals(state.clone(), tx));
        tracing::info!(
            socket = %socket.display(),
            pid = std::process::id(),
            workers,
            keys = state.status_keys(),
            "keyward agent ready"
        );
        // A line on stdout for supervisors and scripts that wait for readiness.
        println!(
            "keyward-agent ready socket={} pid={}",
            socket.display(),
            std::process::id()
        );
        server::serve(listener, state, rx, DRAIN).await;
        tracing::info!("stopped");
        Ok(())
    });
    // Do not wait for threads still inside a device call that never returned (pool.rs
    // `Pool::sign_here`): their clients were answered and their connections closed.
    rt.shutdown_timeout(SHUTDOWN_GRACE);
    audited.lifecycle_record("agent_stop");
    audited.audit.flush(AUDIT_FLUSH);
    served
}

/// Keep key material out of swap: lock all memory when the limit allows, else rely on the
/// per-buffer locks of secret buffers and say what is not covered.
fn lock_memory() {
    if !keyward::sys::may_lock_all_memory() {
        tracing::warn!(
            "RLIMIT_MEMLOCK is limited: only secret buffers are locked, parsed key objects may be \
             swapped; run the agent with LimitMEMLOCK=infinity (systemd) to lock all its memory"
        );
        return;
    }
    if let Err(e) = keyward::sys::lock_all_memory() {
        tracing::warn!("mlockall failed ({e}); only secret buffers are locked");
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYWARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
