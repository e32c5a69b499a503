//! `keyward.toml`: the operator's configuration, parsed strictly (unknown keys are errors).
//! A file that fails to parse is reported with line and column and never half-applied.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::policy::engine::Policy;
use crate::policy::rules::{ClientRule, KeyPolicy};
use crate::secret::SecretSource;

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub agent: AgentConfig,
    /// PKCS#11 tokens by alias: `[pkcs11.<alias>]`.
    #[serde(default)]
    pub pkcs11: BTreeMap<String, TokenConfig>,
    /// TPMs by alias: `[tpm.<alias>]` (docs/tpm.md).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tpm: BTreeMap<String, TpmConfig>,
    /// Named clients: `[clients.<name>]` (ARCHITECTURE §6, docs/policy.md).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub clients: BTreeMap<String, ClientRule>,
    /// Per-key policy: `[keys.<name>]`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub keys: BTreeMap<String, KeyPolicy>,
    /// The audit log (docs/audit.md).
    #[serde(default)]
    pub audit: AuditConfig,
    /// The Prometheus listener (docs/operations.md).
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// `[audit]`: the hash-chained log in `<home>/audit/`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// `false` turns the audit log off (benchmarks only; `doctor` warns).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Whether a signature waits for its record to be durable. Unset: prod keys do
    /// (fail-closed), other keys do not (fail-open). `true`/`false` applies to every key.
    pub fail_closed: Option<bool>,
    /// A file is closed and a new one started past this size.
    #[serde(default = "default_audit_max_file_bytes")]
    pub max_file_bytes: u64,
    /// Longest a fail-closed request waits for its record to be durable.
    #[serde(default = "default_audit_timeout_ms")]
    pub timeout_ms: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            enabled: true,
            fail_closed: None,
            max_file_bytes: default_audit_max_file_bytes(),
            timeout_ms: default_audit_timeout_ms(),
        }
    }
}

impl AuditConfig {
    /// Whether a key of `env` releases a signature only after its record is durable.
    pub fn fail_closed_for(&self, env: crate::model::Env) -> bool {
        self.fail_closed.unwrap_or(env == crate::model::Env::Prod)
    }
}

fn yes() -> bool {
    true
}
fn default_audit_max_file_bytes() -> u64 {
    64 << 20
}
fn default_audit_timeout_ms() -> u64 {
    2000
}

/// `[metrics]`: Prometheus text exposition on a loopback listener (off unless `listen` is set).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `127.0.0.1:9464`-style address; only loopback addresses are accepted.
    pub listen: Option<String>,
}

/// Debian's SoftHSM module; any vendor module is configured the same way.
pub const DEFAULT_PKCS11_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// One PKCS#11 token. Selected by label or serial, never by slot number (which changes).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    #[serde(default = "default_module")]
    pub module: PathBuf,
    pub label: Option<String>,
    pub serial: Option<String>,
    /// User PIN source: `env:NAME`, `file:PATH` (0600) or `prompt` — never the PIN itself.
    pub pin: String,
    /// Sessions (one per concurrent signer); 0 = number of cores.
    #[serde(default)]
    pub sessions: usize,
    /// Longest a request waits on the device before `backend_unavailable`.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

/// One TPM 2.0, reached through a TCTI (docs/tpm.md).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TpmConfig {
    /// `device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=N`, … Unset: `$TPM2TOOLS_TCTI`, then
    /// `$TCTI`, then `device:/dev/tpmrm0`.
    pub tcti: Option<String>,
    /// Owner-hierarchy auth source (`env:`/`file:`/`prompt`), if the owner has a password.
    pub owner_auth: Option<String>,
    /// Usage auth source for this TPM's keys: set on keys keyward creates or imports, and
    /// presented for adopted persistent keys. Unset: keys have no auth value.
    pub key_auth: Option<String>,
    /// Longest a request waits on the TPM before `backend_unavailable`.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Requests that may wait for the TPM's worker before new ones are answered `busy`.
    #[serde(default = "default_tpm_queue")]
    pub queue: usize,
    /// Keys kept loaded between requests (transient slots; the storage key takes one more).
    #[serde(default = "default_tpm_loaded_keys")]
    pub loaded_keys: usize,
}

fn default_tpm_queue() -> usize {
    64
}
fn default_tpm_loaded_keys() -> usize {
    1
}

fn default_module() -> PathBuf {
    PathBuf::from(DEFAULT_PKCS11_MODULE)
}
fn default_timeout_ms() -> u64 {
    2000
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Socket path; `$KEYWARD_SOCK` overrides it.
    pub socket: Option<PathBuf>,
    /// Where the identity passphrase comes from: `env:NAME`, `file:PATH` or `prompt`.
    pub passphrase: Option<String>,
    /// Signing worker threads for slow operations (RSA); 0 = number of cores.
    #[serde(default)]
    pub workers: usize,
    /// Signing jobs that may wait for a worker before new ones are answered `busy`.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Connections served at once; further ones are closed immediately.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Requests one connection may have in flight (pipelining window).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// `human` or `json`.
    #[serde(default = "default_log_format")]
    pub log_format: String,
}

fn default_queue() -> usize {
    1024
}
fn default_max_connections() -> usize {
    4096
}
fn default_max_in_flight() -> usize {
    256
}
fn default_log_format() -> String {
    "human".into()
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            socket: None,
            passphrase: None,
            workers: 0,
            queue: default_queue(),
            max_connections: default_max_connections(),
            max_in_flight: default_max_in_flight(),
            log_format: default_log_format(),
        }
    }
}

impl Config {
    /// Parse and validate; errors carry the file name, line and column.
    pub fn parse(text: &str, origin: &Path) -> Result<Config> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
            Error::Config(format!(
                "{}:{line}:{col}: {}",
                origin.display(),
                e.message()
            ))
        })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Load `path`; a missing file means all defaults.
    pub fn load(path: &Path) -> Result<Config> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(e).ctx(format!("reading {}", path.display())),
        }
    }

    fn validate(&self, origin: &Path) -> Result<()> {
        let a = &self.agent;
        if let Some(p) = &a.passphrase {
            p.parse::<SecretSource>().map_err(|e| {
                Error::Config(format!("{}: agent.passphrase: {e}", origin.display()))
            })?;
        }
        if !matches!(a.log_format.as_str(), "human" | "json") {
            return Err(Error::Config(format!(
                "{}: agent.log_format must be \"human\" or \"json\"",
                origin.display()
            )));
        }
        for (alias, t) in &self.pkcs11 {
            if crate::model::KeyName::new(alias).is_err() {
                return Err(Error::Config(format!(
                    "{}: pkcs11.{alias}: token aliases use [a-z0-9._-]",
                    origin.display()
                )));
            }
            if t.label.is_none() && t.serial.is_none() {
                return Err(Error::Config(format!(
                    "{}: pkcs11.{alias}: set `label` or `serial` to select the token",
                    origin.display()
                )));
            }
            t.pin.parse::<SecretSource>().map_err(|e| {
                Error::Config(format!("{}: pkcs11.{alias}.pin: {e}", origin.display()))
            })?;
            if t.timeout_ms == 0 {
                return Err(Error::Config(format!(
                    "{}: pkcs11.{alias}.timeout_ms must be > 0",
                    origin.display()
                )));
            }
        }
        for (alias, t) in &self.tpm {
            let at = |what: &str| Error::Config(format!("{}: tpm.{alias}{what}", origin.display()));
            if crate::model::KeyName::new(alias).is_err() {
                return Err(at(": TPM aliases use [a-z0-9._-]"));
            }
            if let Some(tcti) = &t.tcti {
                crate::backend::tpm::check_tcti(tcti).map_err(|e| at(&format!(".tcti: {e}")))?;
            }
            for (name, src) in [("owner_auth", &t.owner_auth), ("key_auth", &t.key_auth)] {
                if let Some(s) = src {
                    s.parse::<SecretSource>()
                        .map_err(|e| at(&format!(".{name}: {e}")))?;
                }
            }
            if t.timeout_ms == 0 || t.queue == 0 {
                return Err(at(": timeout_ms and queue must be > 0"));
            }
        }
        self.policy(0)
            .map_err(|e| Error::Config(format!("{}: {e}", origin.display())))?;
        if self.audit.max_file_bytes < 4096 || self.audit.timeout_ms == 0 {
            return Err(Error::Config(format!(
                "{}: audit.max_file_bytes must be at least 4096 and audit.timeout_ms > 0",
                origin.display()
            )));
        }
        if let Some(l) = &self.metrics.listen {
            let addr: std::net::SocketAddr = l.parse().map_err(|_| {
                Error::Config(format!(
                    "{}: metrics.listen must be an address like \"127.0.0.1:9464\"",
                    origin.display()
                ))
            })?;
            if !addr.ip().is_loopback() {
                return Err(Error::Config(format!(
                    "{}: metrics.listen must be a loopback address (the metrics are not authenticated)",
                    origin.display()
                )));
            }
        }
        if a.queue == 0 || a.max_connections == 0 || a.max_in_flight == 0 {
            return Err(Error::Config(format!(
                "{}: agent.queue, agent.max_connections and agent.max_in_flight must be > 0",
                origin.display()
            )));
        }
        Ok(())
    }

    /// The compiled policy of this config, for an agent running as `agent_uid`.
    pub fn policy(&self, agent_uid: u32) -> Result<Policy> {
        Policy::compile(&self.clients, &self.keys, agent_uid)
    }

    pub fn workers(&self) -> usize {
        if self.agent.workers > 0 {
            self.agent.workers
        } else {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        }
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, col)
}

/// The file `keyward init` writes: every setting, commented, at its default.
pub const DEFAULT_CONFIG: &str = r#"# keyward configuration. Unknown keys are errors; see docs/quickstart.md.

[agent]
# socket = "/run/user/1000/keyward/agent.sock"   # default: $KEYWARD_SOCK, else $XDG_RUNTIME_DIR/keyward/agent.sock, else <home>/run/agent.sock
# passphrase = "env:KEYWARD_PASSPHRASE"         # env:NAME | file:PATH (mode 0600) | prompt
# workers = 0                                   # signing threads for slow operations; 0 = cores
# queue = 1024                                  # queued signing jobs before new ones get `busy`
# max_connections = 4096
# max_in_flight = 256                           # pipelined requests per connection
# log_format = "human"                          # or "json"

[audit]
# enabled = true
# fail_closed = true                            # default: prod keys only (signature released once its record is durable)
# max_file_bytes = 67108864                     # start a new audit file past this size
# timeout_ms = 2000                             # longest a fail-closed request waits for the disk

[metrics]
# listen = "127.0.0.1:9464"                     # Prometheus text on GET /metrics; loopback only
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_parses_to_defaults() {
        let c = Config::parse(DEFAULT_CONFIG, Path::new("k.toml")).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn unknown_keys_are_reported_with_line_and_column() {
        let text = "[agent]\nqueue = 10\nqueu = 3\n";
        let e = Config::parse(text, Path::new("k.toml")).unwrap_err();
        assert_eq!(e.code(), "config");
        let m = e.to_string();
        assert!(m.starts_with("k.toml:3:1:"), "{m}");
        assert!(m.contains("queu"), "{m}");
    }

    #[test]
    fn wrong_types_and_bad_sources_are_errors() {
        assert!(Config::parse("[agent]\nqueue = \"x\"\n", Path::new("k")).is_err());
        assert!(Config::parse("[agent]\npassphrase = \"hunter2\"\n", Path::new("k")).is_err());
        assert!(Config::parse("[agent]\nqueue = 0\n", Path::new("k")).is_err());
    }
}
