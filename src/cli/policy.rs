//! `keyward policy check` (validate a keyward.toml without an agent) and `policy explain`
//! (every rule's verdict for one client, key and request), both offline.

use std::path::PathBuf;
use std::str::FromStr;

use keyward::config::Config;
use keyward::keystore::Keystore;
use keyward::model::KeyName;
use keyward::policy::engine::{Ask, KeyFacts, Outcome};
use keyward::profile::{self, ProfileName};
use keyward::{Error, Result};
use serde_json::{json, Value};

use super::Ctx;

/// Largest request file read by `explain`.
const MAX_REQUEST: usize = 1024 * 1024;

#[derive(clap::Subcommand)]
pub enum PolicyCmd {
    /// Validate a config file (default: the home's keyward.toml); errors name line and column.
    Check {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Show each rule's verdict for a client signing a request with a key.
    Explain {
        /// Client name from [clients.*], or `owner`.
        #[arg(long)]
        client: String,
        #[arg(long)]
        key: KeyName,
        /// Profile of the request; omit with --raw.
        #[arg(long, required_unless_present = "raw")]
        profile: Option<String>,
        /// The request object (JSON file, `-` for stdin).
        #[arg(long, value_name = "FILE", required_unless_present = "raw")]
        request: Option<PathBuf>,
        /// Judge raw signing (the `sign` op) instead of a profile request.
        #[arg(long, conflicts_with_all = ["profile", "request"])]
        raw: bool,
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

pub fn run(ctx: &Ctx, cmd: PolicyCmd) -> Result<()> {
    match cmd {
        PolicyCmd::Check { config } => {
            let path = config_path(ctx, config)?;
            let text = std::fs::read_to_string(&path)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            let cfg = Config::parse(&text, &path)?;
            let v = json!({
                "valid": true,
                "file": path.display().to_string(),
                "clients": cfg.clients.keys().collect::<Vec<_>>(),
                "keys": cfg.keys.keys().collect::<Vec<_>>(),
            });
            ctx.emit(&v, || {
                format!(
                    "{}: valid ({} clients, {} key policies)",
                    path.display(),
                    cfg.clients.len(),
                    cfg.keys.len()
                )
            });
            Ok(())
        }
        PolicyCmd::Explain {
            client,
            key,
            profile,
            request,
            raw,
            config,
        } => {
            let path = config_path(ctx, config)?;
            let cfg = Config::load(&path)?;
            let policy = cfg.policy(keyward::sys::effective_uid())?;
            let who = policy.client(&client).ok_or_else(|| {
                Error::BadRequest(format!("no client `{client}` in {}", path.display()))
            })?;
            let meta = Keystore::new(&ctx.open_home()?).get(&key)?;
            let facts = KeyFacts {
                name: &key,
                env: meta.env,
                bound_profiles: &meta.profiles,
            };
            let parsed;
            let ask = match (raw, profile, request) {
                (true, _, _) => Ask::Raw,
                (false, Some(p), Some(r)) => {
                    let p = ProfileName::from_str(&p)?;
                    let bytes = super::read_input(&r, MAX_REQUEST)?;
                    let v: Value = serde_json::from_slice(&bytes)
                        .map_err(|e| Error::BadRequest(format!("request: invalid JSON: {e}")))?;
                    parsed = profile::parse(p, &v)?;
                    Ask::Profile(p, &parsed.view)
                }
                _ => {
                    return Err(Error::BadRequest(
                        "give --profile and --request, or --raw".into(),
                    ))
                }
            };
            let verdicts = policy.explain(&who, &facts, &ask);
            let denied = verdicts.iter().find_map(|v| match &v.outcome {
                Outcome::Fail(m) => Some((v.rule, m.clone())),
                _ => None,
            });
            let rows: Vec<Value> = verdicts
                .iter()
                .map(|v| match &v.outcome {
                    Outcome::Pass => json!({"rule": v.rule, "verdict": "pass"}),
                    Outcome::NotSet => json!({"rule": v.rule, "verdict": "not_set"}),
                    Outcome::Fail(m) => json!({"rule": v.rule, "verdict": "fail", "reason": m}),
                })
                .collect();
            let out = json!({
                "client": who.name,
                "key": key.as_str(),
                "allowed": denied.is_none(),
                "denied_by": denied.as_ref().map(|d| d.0),
                "rules": rows,
            });
            ctx.emit(&out, || {
                let mut s = String::new();
                for v in &verdicts {
                    let line = match &v.outcome {
                        Outcome::Pass => format!("  pass     {}", v.rule),
                        Outcome::NotSet => format!("  not set  {}", v.rule),
                        Outcome::Fail(m) => format!("  FAIL     {}: {m}", v.rule),
                    };
                    s.push_str(&line);
                    s.push('\n');
                }
                match &denied {
                    None => {
                        s.push_str("verdict: allowed (rate limits and locks apply at run time)")
                    }
                    Some((rule, _)) => s.push_str(&format!("verdict: denied by rule {rule}")),
                }
                s
            });
            Ok(())
        }
    }
}

fn config_path(ctx: &Ctx, explicit: Option<PathBuf>) -> Result<PathBuf> {
    match explicit {
        Some(p) => Ok(p),
        None => Ok(keyward::home::Home::resolve(ctx.home.as_deref())?.config_path()),
    }
}
