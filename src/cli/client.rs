//! `keyward client add`: append a `[clients.<name>]` section to keyward.toml (comments kept),
//! optionally with a fresh token that is printed once and stored only as its SHA-256.

use keyward::config::Config;
use keyward::home;
use keyward::model::{Env, KeyName};
use keyward::{Error, Result};
use serde_json::json;

use super::Ctx;

#[derive(clap::Subcommand)]
pub enum ClientCmd {
    /// Add a client rule to keyward.toml (the running agent applies it on `keyward reload`).
    Add {
        /// Client name ([a-z0-9._-]).
        name: KeyName,
        /// Peer uid(s) that are this client.
        #[arg(long = "uid", value_name = "UID")]
        uids: Vec<u32>,
        /// Peer gid(s) that are this client.
        #[arg(long = "gid", value_name = "GID")]
        gids: Vec<u32>,
        /// Executable glob(s) /proc/<pid>/exe must match.
        #[arg(long, value_name = "GLOB")]
        exe: Vec<String>,
        /// prod or demo (a demo client can never use a prod key).
        #[arg(long)]
        env: Option<Env>,
        /// May lock, unlock and reload.
        #[arg(long)]
        admin: bool,
        /// Require a token in `hello`: a fresh one is printed once; only its SHA-256 is stored.
        #[arg(long)]
        token: bool,
    },
}

pub fn run(ctx: &Ctx, cmd: ClientCmd) -> Result<()> {
    let ClientCmd::Add {
        name,
        uids,
        gids,
        exe,
        env,
        admin,
        token,
    } = cmd;
    let home = ctx.open_home()?;
    let path = home.config_path();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    let current = Config::parse(&text, &path)?;
    if current.clients.contains_key(name.as_str()) {
        return Err(Error::AlreadyExists(format!(
            "client `{name}` is already in {}",
            path.display()
        )));
    }
    let secret = if token {
        let mut raw = [0u8; 32];
        aws_lc_rs::rand::fill(&mut raw)
            .map_err(|_| Error::Internal("the system random generator failed".into()))?;
        Some(format!("kwt_{}", hex::encode(raw)))
    } else {
        None
    };
    let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
    let mut section = format!("\n[clients.{name}]\n");
    if !uids.is_empty() {
        section.push_str(&format!("uids = [{}]\n", list(&uids)));
    }
    if !gids.is_empty() {
        section.push_str(&format!("gids = [{}]\n", list(&gids)));
    }
    if !exe.is_empty() {
        let quoted: Vec<String> = exe
            .iter()
            .map(|e| toml::Value::String(e.clone()).to_string())
            .collect();
        section.push_str(&format!("exe = [{}]\n", quoted.join(", ")));
    }
    if let Some(e) = env {
        section.push_str(&format!(
            "env = \"{}\"\n",
            if e == Env::Demo { "demo" } else { "prod" }
        ));
    }
    if admin {
        section.push_str("roles = [\"admin\"]\n");
    }
    if let Some(t) = &secret {
        let digest = keyward::policy::engine::token_hash(t);
        section.push_str(&format!("token_sha256 = \"{}\"\n", hex::encode(digest)));
    }
    let mut next = text.clone();
    if !next.is_empty() && !next.ends_with('\n') {
        next.push('\n');
    }
    next.push_str(&section);
    // Validate the whole new file before it replaces the old one.
    Config::parse(&next, &path)?;
    home::atomic_write(&path, next.as_bytes())?;
    let v = json!({"client": name.as_str(), "config": path.display().to_string(), "token": secret});
    ctx.emit(&v, || match &secret {
        Some(t) => format!(
            "added client {name} to {}\ntoken (shown once; pass it in hello): {t}",
            path.display()
        ),
        None => format!("added client {name} to {}", path.display()),
    });
    Ok(())
}
