//! `keyward token list|init`: see the tokens a PKCS#11 module offers and the configured TPMs,
//! and initialise a token (a SoftHSM/dev convenience; production HSMs are initialised with
//! their vendor's tools).

use std::path::PathBuf;

use keyward::backend::pkcs11::{self, TokenSummary};
use keyward::backend::tpm::{self, TpmAuth, TpmBackend, TpmSummary};
use keyward::config::{Config, DEFAULT_PKCS11_MODULE};
use keyward::home::Home;
use keyward::secret::SecretSource;
use keyward::{Error, Result};
use serde_json::json;

use super::Ctx;

#[derive(clap::Subcommand)]
pub enum TokenCmd {
    /// List the tokens of the configured PKCS#11 modules (or of --module) and the configured
    /// TPMs (`[tpm.<alias>]`: manufacturer, firmware, algorithms, PCR banks).
    List {
        /// A PKCS#11 module to inspect instead of the configured ones.
        #[arg(long, value_name = "PATH")]
        module: Option<PathBuf>,
        /// Also list every mechanism with its flags.
        #[arg(long)]
        mechanisms: bool,
    },
    /// Initialise a free token slot (SoftHSM and development tokens).
    Init {
        /// Label of the new token.
        #[arg(long)]
        label: String,
        #[arg(long, value_name = "PATH", default_value = DEFAULT_PKCS11_MODULE)]
        module: PathBuf,
        /// Security officer PIN source: env:NAME, file:PATH (0600), stdin or prompt.
        #[arg(long, value_name = "SOURCE")]
        so_pin: String,
        /// User PIN source: env:NAME, file:PATH (0600), stdin or prompt.
        #[arg(long, value_name = "SOURCE")]
        pin: String,
    },
}

pub fn run(ctx: &Ctx, cmd: TokenCmd) -> Result<()> {
    match cmd {
        TokenCmd::List { module, mechanisms } => {
            let (modules, tpms): (Vec<PathBuf>, Vec<TpmEntry>) = match module {
                Some(m) => (vec![m], Vec::new()),
                None => {
                    let home = Home::resolve(ctx.home.as_deref())?;
                    let cfg = Config::load(&home.config_path())?;
                    let mut m: Vec<PathBuf> =
                        cfg.pkcs11.values().map(|t| t.module.clone()).collect();
                    // The default module only when nothing is configured: a TPM-only host
                    // need not have SoftHSM installed.
                    if m.is_empty() && cfg.tpm.is_empty() {
                        m.push(PathBuf::from(DEFAULT_PKCS11_MODULE));
                    }
                    m.sort();
                    m.dedup();
                    let tpms = cfg
                        .tpm
                        .iter()
                        .map(|(alias, t)| describe_tpm(&home, alias, t))
                        .collect();
                    (m, tpms)
                }
            };
            let mut all = Vec::new();
            for m in &modules {
                all.push((m.clone(), pkcs11::list_tokens(m)?));
            }
            let v = json!(all
                .iter()
                .map(|(m, t)| json!({"module": m.display().to_string(), "tokens": t}))
                .chain(tpms.iter().map(TpmEntry::to_json))
                .collect::<Vec<_>>());
            ctx.emit(&v, || {
                let mut s = String::new();
                for t in &tpms {
                    s.push_str(&t.describe());
                }
                for (m, tokens) in &all {
                    s.push_str(&format!("module {}\n", m.display()));
                    if tokens.is_empty() {
                        s.push_str("  no tokens\n");
                    }
                    for t in tokens {
                        s.push_str(&describe(t, mechanisms));
                    }
                }
                s.trim_end().to_string()
            });
            Ok(())
        }
        TokenCmd::Init {
            label,
            module,
            so_pin,
            pin,
        } => {
            if label.is_empty() || label.len() > 32 {
                return Err(Error::BadRequest(
                    "a token label has 1 to 32 characters".into(),
                ));
            }
            let so = so_pin.parse::<SecretSource>()?.read("SO PIN")?;
            let user = pin.parse::<SecretSource>()?.read("user PIN")?;
            let t = pkcs11::init_token(&module, &label, &so, &user)?;
            let v = serde_json::to_value(&t).map_err(|e| Error::Internal(e.to_string()))?;
            ctx.emit(&v, || {
                format!(
                    "initialised token {:?} (serial {}) in {}\n  add to keyward.toml:\n  [pkcs11.{}]\n  module = {:?}\n  label = {:?}\n  pin = \"file:/path/to/pin\"",
                    t.label,
                    t.serial,
                    module.display(),
                    alias_hint(&t.label),
                    module.display().to_string(),
                    t.label
                )
            });
            Ok(())
        }
    }
}

/// One configured TPM as `token list` shows it: its facts, or why they could not be read (a
/// TPM that is down must not hide the other TPMs and tokens).
struct TpmEntry {
    alias: String,
    tcti: String,
    facts: Result<TpmSummary>,
}

fn describe_tpm(home: &Home, alias: &str, cfg: &keyward::config::TpmConfig) -> TpmEntry {
    let tcti = tpm::effective_tcti(cfg);
    // Reading capabilities needs no authorisation: listing never prompts for or reads the
    // configured auth values.
    let facts = TpmBackend::connect(alias, cfg.clone(), &home.keys_dir(), TpmAuth::default())
        .and_then(|b| b.describe());
    TpmEntry {
        alias: alias.to_string(),
        tcti,
        facts,
    }
}

impl TpmEntry {
    fn to_json(&self) -> serde_json::Value {
        match &self.facts {
            Ok(f) => json!({"tpm": self.alias, "tcti": self.tcti, "summary": f}),
            Err(e) => json!({
                "tpm": self.alias,
                "tcti": self.tcti,
                "error": {"code": e.code(), "message": e.to_string()},
            }),
        }
    }

    fn describe(&self) -> String {
        let f = match &self.facts {
            Ok(f) => f,
            Err(e) => {
                return format!(
                    "tpm {} ({})\n  unavailable: error[{}] {e}\n",
                    self.alias,
                    self.tcti,
                    e.code()
                )
            }
        };
        let opt = |v: Option<u32>| v.map_or_else(|| "?".to_string(), |n| n.to_string());
        format!(
            "tpm {} ({})\n  manufacturer {} {}, firmware {}, spec {}\n  algorithms: {}\n  ecc curves: {}\n  pcr banks: {}\n  transient slots {}, input buffer {} bytes, lockout counter {}/{}{}\n",
            self.alias,
            self.tcti,
            f.manufacturer,
            f.vendor.trim(),
            f.firmware_version,
            f.spec,
            f.algorithms.join(" "),
            f.ecc_curves.join(" "),
            f.pcr_banks.join(" "),
            opt(f.transient_slots),
            opt(f.input_buffer),
            opt(f.lockout_counter),
            opt(f.max_auth_fail),
            if f.in_lockout { " (IN LOCKOUT)" } else { "" }
        )
    }
}

fn alias_hint(label: &str) -> String {
    let s: String = label
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if s.is_empty() {
        "token".into()
    } else {
        s
    }
}

fn describe(t: &TokenSummary, mechanisms: bool) -> String {
    let mut s = format!(
        "  slot {:#x}: {:?} serial {} — {} {}{}{}\n",
        t.slot,
        t.label,
        t.serial,
        t.manufacturer,
        t.model,
        if t.initialized {
            ""
        } else {
            " (not initialised)"
        },
        t.free_private_memory
            .map(|m| format!(", {m} bytes free"))
            .unwrap_or_default()
    );
    if mechanisms {
        for m in &t.mechanisms {
            s.push_str(&format!("      {m}\n"));
        }
    } else {
        s.push_str(&format!(
            "      {} mechanisms (--mechanisms lists them)\n",
            t.mechanisms.len()
        ));
    }
    s
}
