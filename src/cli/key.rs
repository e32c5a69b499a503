//! `keyward key …`: generate, import, list, show, delete keys and export public keys.
//! Works on the home directly (no passphrase: new keys are encrypted to identity.pub).

use std::io::{IsTerminal, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use keyward::backend::material;
use keyward::backend::soft::SoftBackend;
use keyward::backend::{Backend, KeySpec, NewKey};
use keyward::home::Home;
use keyward::keystore::{now_rfc3339, KeyMeta, KeyVersion, Keystore};
use keyward::model::{BackendKind, Env, KeyName, KeyType};
use keyward::secret::{read_secret, SecretSource};
use keyward::{pubkey, Error, Result};
use serde_json::json;

use super::{notify_agent, Ctx};

/// Largest key file read for import.
const MAX_KEY_INPUT: usize = 64 * 1024;

#[derive(clap::Subcommand)]
pub enum KeyCmd {
    /// Generate a new key (RSA takes a few seconds).
    Generate {
        name: KeyName,
        #[arg(long = "type", value_name = "TYPE")]
        key_type: KeyType,
        #[command(flatten)]
        common: Common,
    },
    /// Import key material from a file or standard input (never from the command line).
    Import {
        name: KeyName,
        /// Key type; required for non-PEM input (HMAC secrets, 0x-hex secp256k1).
        #[arg(long = "type", value_name = "TYPE")]
        key_type: Option<KeyType>,
        /// Key file; `-` (default) reads standard input.
        #[arg(long, default_value = "-")]
        file: PathBuf,
        /// After a verified import, overwrite and delete the source file.
        #[arg(long)]
        shred: bool,
        /// Identity passphrase source, needed by --shred to verify the stored copy.
        #[arg(long, value_name = "SOURCE")]
        passphrase: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// List keys.
    List,
    /// Show one key's metadata.
    Show { name: KeyName },
    /// Delete a key and all its versions.
    Delete {
        name: KeyName,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Print a key's public key.
    ExportPublic {
        name: KeyName,
        #[arg(long, value_parser = ["pem", "ssh", "jwk", "hex"], default_value = "pem")]
        format: String,
    },
}

#[derive(clap::Args)]
pub struct Common {
    /// prod or demo (a demo client can never use a prod key).
    #[arg(long, default_value = "prod")]
    env: Env,
    /// The exchange's API key id for this secret (sent in headers by profiles).
    #[arg(long, value_name = "ID")]
    api_key: Option<String>,
}

pub fn run(ctx: &Ctx, cmd: KeyCmd) -> Result<()> {
    let home = ctx.open_home()?;
    let store = Keystore::new(&home);
    match cmd {
        KeyCmd::Generate {
            name,
            key_type,
            common,
        } => {
            prepare_new(&store, &name)?;
            let backend = cli_backend(&home)?;
            let spec = KeySpec {
                name: name.clone(),
                version: 1,
                key_type,
            };
            let spinner = progress(
                &format!("generating {key_type} key {name}"),
                key_type.is_rsa(),
            );
            let nk = backend.generate(&spec);
            if let Some(s) = spinner {
                s.finish_and_clear();
            }
            let meta = commit(&store, &backend, &spec, nk?, &common)?;
            let note = notify_agent(ctx);
            ctx.emit(&meta_json(&meta), || {
                format!(
                    "generated {name} ({key_type}), fingerprint {}; {note}",
                    meta.versions[0].fingerprint
                )
            });
            Ok(())
        }
        KeyCmd::Import {
            name,
            key_type,
            file,
            shred,
            passphrase,
            common,
        } => {
            if shred {
                if file == Path::new("-") {
                    return Err(Error::BadRequest(
                        "--shred needs --file (standard input cannot be shredded)".into(),
                    ));
                }
                // Refuse before importing: a failed shred must not leave the key imported.
                check_shreddable(&file)?;
            }
            prepare_new(&store, &name)?;
            // Unlock first when verifying: a wrong passphrase must leave nothing behind.
            let identity = if shred {
                let source: SecretSource = passphrase.as_deref().unwrap_or("prompt").parse()?;
                let pass = source.read("identity passphrase")?;
                Some(keyward::identity::unlock(&home, &pass)?)
            } else {
                None
            };
            let input = if file == Path::new("-") {
                read_secret(std::io::stdin().lock(), MAX_KEY_INPUT)?
            } else {
                let f = std::fs::File::open(&file)
                    .map_err(|e| Error::io(format!("opening {}", file.display()), e))?;
                read_secret(f, MAX_KEY_INPUT)?
            };
            let m = material::parse(input, key_type)?;
            let spec = KeySpec {
                name: name.clone(),
                version: 1,
                key_type: m.key_type(),
            };
            let recipient = keyward::identity::recipient(&home)?;
            let backend = SoftBackend::new(&home.keys_dir(), recipient, identity);
            let reference =
                material::SecretKeyMaterial::from_storage(m.key_type(), m.to_storage()?)?;
            let nk = backend.import(&spec, m)?;
            let meta = commit(&store, &backend, &spec, nk, &common)?;
            let mut shredded = false;
            if shred {
                let stored = backend.decrypt(&meta.key_ref(&meta.versions[0]), spec.key_type)?;
                if stored.expose() != reference.expose() {
                    return Err(Error::Internal(
                        "the stored key does not match the input; the source was NOT shredded"
                            .into(),
                    ));
                }
                shred_file(&file)?;
                shredded = true;
            }
            let note = notify_agent(ctx);
            let mut v = meta_json(&meta);
            v["shredded"] = json!(shredded);
            ctx.emit(&v, || {
                format!(
                    "imported {name} ({}), fingerprint {}{}; {note}",
                    spec.key_type,
                    meta.versions[0].fingerprint,
                    if shredded {
                        format!("; {} shredded", file.display())
                    } else {
                        String::new()
                    }
                )
            });
            Ok(())
        }
        KeyCmd::List => {
            let keys = store.list()?;
            let v = json!(keys.iter().map(meta_json).collect::<Vec<_>>());
            ctx.emit(&v, || {
                if keys.is_empty() {
                    return "no keys".into();
                }
                let mut s = format!(
                    "{:<24} {:<12} {:<8} {:<5} {:>3}  {}",
                    "NAME", "TYPE", "BACKEND", "ENV", "VER", "FINGERPRINT"
                );
                for k in &keys {
                    let fp = k
                        .current_version()
                        .map(|v| v.fingerprint.clone())
                        .unwrap_or_default();
                    s.push_str(&format!(
                        "\n{:<24} {:<12} {:<8} {:<5} {:>3}  {}{}",
                        k.name,
                        k.key_type,
                        k.backend,
                        env_str(k.env),
                        k.current,
                        fp,
                        if k.disabled { "  (disabled)" } else { "" }
                    ));
                }
                s
            });
            Ok(())
        }
        KeyCmd::Show { name } => {
            let meta = store.get(&name)?;
            let v = meta_json(&meta);
            ctx.emit(&v, || toml::to_string_pretty(&meta).unwrap_or_default());
            Ok(())
        }
        KeyCmd::Delete { name, yes } => {
            let meta = store.get(&name)?;
            if !yes
                && !confirm(&format!(
                    "delete key {name} and all {} version(s)?",
                    meta.versions.len()
                ))?
            {
                return Err(Error::BadRequest(
                    "not deleted (pass --yes to skip the question)".into(),
                ));
            }
            let backend = cli_backend(&home)?;
            // Metadata first: once it is gone the key no longer exists, even if a crash
            // interrupts the removal of its material (swept as orphans later).
            store.remove(&name)?;
            for v in &meta.versions {
                backend.delete(&meta.key_ref(v))?;
            }
            let note = notify_agent(ctx);
            ctx.emit(&json!({"deleted": name.to_string()}), || {
                format!("deleted {name}; {note}")
            });
            Ok(())
        }
        KeyCmd::ExportPublic { name, format } => {
            let meta = store.get(&name)?;
            let v = meta.current_version()?;
            let spki = v.spki_der()?.ok_or_else(|| {
                Error::Unsupported(format!(
                    "{name} is an {} key: it has no public key",
                    meta.key_type
                ))
            })?;
            let fmt: pubkey::Format = format.parse()?;
            let out = pubkey::encode(meta.key_type, &spki, fmt, name.as_str())?;
            let text = match &out {
                serde_json::Value::String(s) => s.trim_end().to_string(),
                other => serde_json::to_string_pretty(other).unwrap_or_default(),
            };
            let result = json!({"key": name.to_string(), "format": format, "public_key": out, "fingerprint": v.fingerprint});
            ctx.emit(&result, || text);
            Ok(())
        }
    }
}

fn cli_backend(home: &Home) -> Result<SoftBackend> {
    Ok(SoftBackend::new(
        &home.keys_dir(),
        keyward::identity::recipient(home)?,
        None,
    ))
}

/// Refuse an existing name; clear material an interrupted earlier create left behind.
fn prepare_new(store: &Keystore, name: &KeyName) -> Result<()> {
    if store.exists(name) {
        return Err(Error::AlreadyExists(format!("key {name} exists")));
    }
    for orphan in store.orphan_files(name) {
        keyward::home::remove_durably(&orphan)?;
    }
    Ok(())
}

/// Write the metadata (the commit point). If that fails, remove the material just written.
fn commit(
    store: &Keystore,
    backend: &SoftBackend,
    spec: &KeySpec,
    nk: NewKey,
    common: &Common,
) -> Result<KeyMeta> {
    use base64::Engine;
    let now = now_rfc3339();
    let meta = KeyMeta {
        name: spec.name.clone(),
        key_type: spec.key_type,
        backend: BackendKind::Soft,
        env: common.env,
        created: now.clone(),
        current: spec.version,
        disabled: false,
        profiles: Vec::new(),
        api_key: common.api_key.clone(),
        versions: vec![KeyVersion {
            version: spec.version,
            locator: nk.key_ref.locator.clone(),
            created: now,
            fingerprint: nk.public.fingerprint.clone(),
            public_key: nk
                .public
                .spki_der
                .as_ref()
                .map(|d| base64::engine::general_purpose::STANDARD.encode(d)),
        }],
    };
    if let Err(e) = store.create(&meta) {
        let _ = backend.delete(&nk.key_ref);
        return Err(e);
    }
    Ok(meta)
}

fn env_str(e: Env) -> &'static str {
    match e {
        Env::Prod => "prod",
        Env::Demo => "demo",
    }
}

fn meta_json(m: &KeyMeta) -> serde_json::Value {
    let fp = m
        .current_version()
        .map(|v| v.fingerprint.clone())
        .unwrap_or_default();
    json!({
        "name": m.name.to_string(),
        "type": m.key_type.to_string(),
        "backend": m.backend.to_string(),
        "env": env_str(m.env),
        "version": m.current,
        "fingerprint": fp,
        "disabled": m.disabled,
        "created": m.created,
        "api_key": m.api_key,
        "versions": m.versions.iter().map(|v| json!({"version": v.version, "created": v.created, "fingerprint": v.fingerprint})).collect::<Vec<_>>(),
    })
}

fn progress(msg: &str, slow: bool) -> Option<indicatif::ProgressBar> {
    if !slow || !super::is_tty() {
        return None;
    }
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(100));
    Some(pb)
}

fn confirm(question: &str) -> Result<bool> {
    if !std::io::stdin().is_terminal() {
        return Err(Error::BadRequest(
            "refusing to delete without a terminal; pass --yes".into(),
        ));
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| Error::io("reading the answer", e))?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes"))
}

/// Only a regular file with a single link can be shredded meaningfully; returns its size.
fn check_shreddable(path: &Path) -> Result<u64> {
    let md = std::fs::symlink_metadata(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    if !md.file_type().is_file() || md.nlink() > 1 {
        return Err(Error::BadRequest(format!(
            "{} is not a plain file with one link, so --shred cannot erase it; nothing imported",
            path.display()
        )));
    }
    Ok(md.len())
}

/// Overwrite a file's blocks (zeros, then random), fsync, and remove it. On copy-on-write or
/// flash storage an overwrite is not guaranteed to reach the old blocks (docs/security.md).
fn shred_file(path: &Path) -> Result<()> {
    use std::io::{Seek, SeekFrom};
    let len = check_shreddable(path)? as usize;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(format!("opening {} for shredding", path.display()), e))?;
    let mut noise = vec![0u8; len];
    for pass in 0..2 {
        if pass == 1 {
            aws_lc_rs::rand::fill(&mut noise)
                .map_err(|_| Error::Internal("random fill failed".into()))?;
        }
        f.seek(SeekFrom::Start(0))
            .and_then(|_| f.write_all(&noise))
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::io(format!("overwriting {}", path.display()), e))?;
    }
    drop(f);
    keyward::home::remove_durably(path)
}
