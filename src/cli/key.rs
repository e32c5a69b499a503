//! `keyward key …`: generate, import, list, show, delete keys and export public keys.
//! Works on the home directly (no passphrase: new keys are encrypted to identity.pub).

use std::io::{IsTerminal, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use keyward::backend::material;
use keyward::backend::pkcs11::Pkcs11Backend;
use keyward::backend::soft::SoftBackend;
use keyward::backend::tpm::{TpmAuth, TpmBackend};
use keyward::backend::{Backend, KeySpec, NewKey};
use keyward::config::Config;
use keyward::home::Home;
use keyward::keystore::{now_rfc3339, KeyMeta, KeyVersion, Keystore};
use keyward::model::{Algorithm, BackendKind, Env, KeyName, KeyType};
use keyward::secret::SecretSource;
use keyward::{pubkey, Error, Result};
use serde_json::json;

use super::{audit_change, notify_agent, Ctx};

/// Largest key file read for import.
pub(super) const MAX_KEY_INPUT: usize = 64 * 1024;

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
        /// Key file; `-` (the default) reads standard input.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        #[command(flatten)]
        from: super::migrate::SourceArgs,
        /// After a verified import, overwrite and delete the source file (for --from-env-file:
        /// remove only that variable from the file).
        #[arg(long)]
        shred: bool,
        /// Identity passphrase source, needed by --shred to verify the stored copy.
        #[arg(long, value_name = "SOURCE")]
        passphrase: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Adopt a key another tool created: on a PKCS#11 token (by label or CKA_ID) or a TPM
    /// persistent key (by handle).
    // Exactly one way to name the object; which one fits the backend is checked in `run`,
    // so the message can name the right option.
    #[command(group = clap::ArgGroup::new("object").required(true).args(["label", "id", "handle"]))]
    Adopt {
        name: KeyName,
        /// Backend holding the object: pkcs11 (needs --label or --id) or tpm (needs --handle).
        #[arg(long, value_parser = ["pkcs11", "tpm"])]
        backend: String,
        /// Token or TPM alias from keyward.toml (`[pkcs11.<alias>]` / `[tpm.<alias>]`).
        #[arg(long)]
        token: String,
        /// The object's CKA_LABEL (pkcs11).
        #[arg(long)]
        label: Option<String>,
        /// The object's CKA_ID, hex (pkcs11).
        #[arg(long)]
        id: Option<String>,
        /// The TPM persistent handle, 0x81000000-0x81ffffff (tpm).
        #[arg(long, value_name = "0x81…")]
        handle: Option<String>,
        /// prod or demo.
        #[arg(long, default_value = "prod")]
        env: Env,
        /// The exchange's API key id for this secret.
        #[arg(long, value_name = "ID")]
        api_key: Option<String>,
    },
    /// List keys.
    List,
    /// Show one key's metadata.
    Show { name: KeyName },
    /// Delete a key and all its versions, or with --version one version that is not current.
    // `--version` here is the key version: the subcommand gives up clap's version flag.
    #[command(disable_version_flag = true)]
    Delete {
        name: KeyName,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Delete only this version (and its key material); it must not be the current one.
        #[arg(long, value_name = "N")]
        version: Option<u32>,
    },
    /// Add a new version (same type), pending until `key activate`; prints its public key.
    #[command(group = clap::ArgGroup::new("source").required(true).args(["generate", "import"]))]
    Rotate {
        name: KeyName,
        /// Generate the new version on the key's backend.
        #[arg(long)]
        generate: bool,
        /// Import the new version from this file (`-` reads standard input); HMAC secrets,
        /// which the exchange issues, rotate only this way.
        #[arg(long, value_name = "FILE")]
        import: Option<PathBuf>,
        /// The key's backend (soft, pkcs11, tpm); every version of a key uses the same kind.
        #[arg(long, value_parser = ["soft", "pkcs11", "tpm"])]
        backend: Option<String>,
        /// Token or TPM alias for the new version (default: the current version's).
        #[arg(long, value_name = "ALIAS")]
        token: Option<String>,
    },
    /// Make a version current; the one it replaces keeps signing (when named) for --grace.
    #[command(disable_version_flag = true)]
    Activate {
        name: KeyName,
        /// The version to make current (not a disabled one).
        #[arg(long, value_name = "N")]
        version: u32,
        /// The exchange's API key id for the new version (sets the key's api_key).
        #[arg(long, value_name = "ID")]
        api_key_id: Option<String>,
        /// How long the replaced version stays usable: 30m, 2h, 7d, 1h30m, or 0.
        #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = super::lifecycle::parse_grace)]
        grace: std::time::Duration,
    },
    /// Stop a key (every version) or one version from signing.
    #[command(disable_version_flag = true)]
    Disable {
        name: KeyName,
        /// Only this version (not the current one: activate another first).
        #[arg(long, value_name = "N")]
        version: Option<u32>,
    },
    /// Let a disabled key or version sign again.
    #[command(disable_version_flag = true)]
    Enable {
        name: KeyName,
        /// Only this version.
        #[arg(long, value_name = "N")]
        version: Option<u32>,
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
    /// Where the key lives: soft (encrypted file), pkcs11 (a token) or tpm (a TPM 2.0); the
    /// last two need --token.
    #[arg(long, value_parser = ["soft", "pkcs11", "tpm"], default_value = "soft")]
    backend: String,
    /// Alias from keyward.toml: `[pkcs11.<alias>]` for --backend pkcs11, `[tpm.<alias>]` for
    /// --backend tpm.
    #[arg(long, value_name = "ALIAS")]
    token: Option<String>,
    /// prod or demo (a demo client can never use a prod key).
    #[arg(long, default_value = "prod")]
    env: Env,
    /// The exchange's API key id for this secret (sent in headers by profiles).
    #[arg(long, value_name = "ID")]
    api_key: Option<String>,
    /// Bind the key to this exchange profile (repeatable). An HMAC secret is decoded the way
    /// the profile's exchange issues it (Kraken: base64, Polymarket: base64url).
    #[arg(long = "profile", value_name = "PROFILE", value_parser = parse_profile)]
    profiles: Vec<String>,
    /// Address profiles send beside the key (Polymarket L2 `POLY_ADDRESS`).
    #[arg(long, value_name = "0x…")]
    address: Option<String>,
}

fn parse_profile(s: &str) -> Result<String> {
    s.parse::<keyward::profile::ProfileName>()
        .map(|p| p.as_str().to_string())
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
            let backend = Target::open(&home, &common, None)?;
            let spec = KeySpec {
                name: name.clone(),
                version: 1,
                key_type,
            };
            let spinner = progress(
                &format!("generating {key_type} key {name}"),
                key_type.is_rsa(),
            );
            let nk = backend.get().generate(&spec);
            if let Some(s) = spinner {
                s.finish_and_clear();
            }
            let meta = commit(&store, backend.get(), &spec, nk?, &common)?;
            audit_change(
                ctx,
                "key_generate",
                name.as_str(),
                Some(1),
                Some(format!("{key_type} on {}", meta.backend)),
            );
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
            from,
            shred,
            passphrase,
            common,
        } => {
            let source = super::migrate::Source::select(file, from)?;
            let shredder = super::migrate::Shredder {
                check: check_shreddable,
                shred: shred_file,
            };
            if shred {
                // Refuse before importing: a failed shred must not leave the key imported.
                source.check_shreddable(&shredder)?;
            }
            prepare_new(&store, &name)?;
            // Unlock first when verifying: a wrong passphrase must leave nothing behind. Device
            // imports are verified by signing on the device instead.
            let identity = if shred && common.backend == "soft" {
                let source: SecretSource = passphrase.as_deref().unwrap_or("prompt").parse()?;
                let pass = source.read("identity passphrase")?;
                Some(keyward::identity::unlock(&home, &pass)?)
            } else {
                None
            };
            let input = source.read(MAX_KEY_INPUT)?;
            let copies = super::migrate::CopyScan::new(&source, &input);
            // Kept to check, before an .env file is rewritten, that it still holds this value.
            let imported = keyward::secret::SecretBytes::from_slice(input.expose());
            let m = decode_for_profiles(material::parse(input, key_type)?, &common.profiles)?;
            let spec = KeySpec {
                name: name.clone(),
                version: 1,
                key_type: m.key_type(),
            };
            let backend = Target::open(&home, &common, identity)?;
            let reference =
                material::SecretKeyMaterial::from_storage(m.key_type(), m.to_storage()?)?;
            let nk = backend.get().import(&spec, m)?;
            let meta = commit(&store, backend.get(), &spec, nk, &common)?;
            let mut shredded = None;
            if shred {
                backend.verify_import(&meta, &reference)?;
                shredded = Some(source.shred(&shredder, &imported)?);
            }
            drop(imported);
            audit_change(
                ctx,
                "key_import",
                meta.name.as_str(),
                Some(meta.current),
                Some(format!(
                    "{} on {}{}",
                    meta.key_type,
                    meta.backend,
                    if shredded.is_some() {
                        ", source shredded"
                    } else {
                        ""
                    }
                )),
            );
            let note = notify_agent(ctx);
            let mut v = meta_json(&meta);
            v["shredded"] = json!(shredded.is_some());
            super::migrate::report_copies(&mut v, copies.run(), ctx.json);
            ctx.emit(&v, || {
                format!(
                    "imported {name} ({}), fingerprint {}{}; {note}",
                    spec.key_type,
                    meta.versions[0].fingerprint,
                    shredded.map(|s| format!("; {s}")).unwrap_or_default()
                )
            });
            Ok(())
        }
        KeyCmd::Adopt {
            name,
            backend,
            token,
            label,
            id,
            handle,
            env,
            api_key,
        } => {
            prepare_new(&store, &name)?;
            let (key_ref, key_type, public) = if backend == "tpm" {
                if label.is_some() || id.is_some() {
                    return Err(Error::BadRequest(
                        "--backend tpm adopts by --handle; --label and --id are for pkcs11".into(),
                    ));
                }
                let handle = handle.as_deref().ok_or_else(|| {
                    Error::BadRequest("--backend tpm needs --handle 0x81xxxxxx".into())
                })?;
                open_tpm(&home, &token)?.adopt(parse_handle(handle)?)?
            } else {
                if handle.is_some() {
                    return Err(Error::BadRequest(
                        "--handle is for --backend tpm; pkcs11 adopts by --label or --id".into(),
                    ));
                }
                let id = id
                    .map(|h| hex::decode(h.trim_start_matches("0x")))
                    .transpose()
                    .map_err(|_| Error::BadRequest("--id must be hex".into()))?;
                open_token(&home, &token)?.adopt(label.as_deref(), id.as_deref())?
            };
            let spec = KeySpec {
                name: name.clone(),
                version: 1,
                key_type,
            };
            let common = Common {
                backend,
                token: Some(token),
                env,
                api_key,
                profiles: Vec::new(),
                address: None,
            };
            // Adopted objects belong to whoever made them: never delete them on failure.
            let meta = write_meta(&store, &spec, &NewKey { key_ref, public }, &common)?;
            audit_change(
                ctx,
                "key_adopt",
                meta.name.as_str(),
                Some(meta.current),
                Some(format!("{} on {}", meta.key_type, meta.backend)),
            );
            let note = notify_agent(ctx);
            ctx.emit(&meta_json(&meta), || {
                format!(
                    "adopted {name} ({key_type}) from {} {}, fingerprint {}; {note}",
                    if common.backend == "tpm" {
                        "TPM"
                    } else {
                        "token"
                    },
                    common.token.as_deref().unwrap_or_default(),
                    meta.versions[0].fingerprint
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
                        "\n{:<24} {:<12} {:<8} {:<5} {:>3}  {}{}{}",
                        k.name,
                        k.key_type,
                        k.backend,
                        env_str(k.env),
                        k.current,
                        fp,
                        if k.disabled { "  (disabled)" } else { "" },
                        // A rotation in progress shows every version's state.
                        if k.versions.len() > 1 {
                            format!(
                                "  [{}]",
                                super::lifecycle::versions_summary(
                                    k,
                                    time::OffsetDateTime::now_utc()
                                )
                            )
                        } else {
                            String::new()
                        }
                    ));
                }
                s
            });
            Ok(())
        }
        KeyCmd::Show { name } => {
            let meta = store.get(&name)?;
            let v = meta_json(&meta);
            ctx.emit(&v, || super::lifecycle::show_text(&meta));
            Ok(())
        }
        KeyCmd::Delete {
            name,
            yes,
            version: Some(n),
        } => super::lifecycle::delete_version(ctx, &home, &store, &name, n, yes),
        KeyCmd::Rotate {
            name,
            generate: _,
            import,
            backend,
            token,
        } => super::lifecycle::rotate(
            ctx,
            &home,
            &store,
            &name,
            import.as_deref(),
            backend.as_deref(),
            token.as_deref(),
        ),
        KeyCmd::Activate {
            name,
            version,
            api_key_id,
            grace,
        } => super::lifecycle::activate(ctx, &store, &name, version, api_key_id, grace),
        KeyCmd::Disable { name, version } => {
            super::lifecycle::set_disabled(ctx, &store, &name, version, true)
        }
        KeyCmd::Enable { name, version } => {
            super::lifecycle::set_disabled(ctx, &store, &name, version, false)
        }
        KeyCmd::Delete {
            name,
            yes,
            version: None,
        } => {
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
            // Each version's backend (rotations may have used other tokens), opened once per
            // token and before anything is removed, so an unreachable token changes nothing.
            let mut backends: Vec<(&str, Target)> = Vec::new();
            for v in &meta.versions {
                let alias = locator_alias(v);
                if !backends.iter().any(|(a, _)| *a == alias) {
                    backends.push((alias, Target::for_version(&home, &meta, v)?));
                }
            }
            // Metadata first: once it is gone the key no longer exists, even if a crash
            // interrupts the removal of its material (swept as orphans later).
            store.remove(&name)?;
            for v in &meta.versions {
                if let Some((_, backend)) = backends.iter().find(|(a, _)| *a == locator_alias(v)) {
                    backend.get().delete(&meta.key_ref(v))?;
                }
            }
            audit_change(ctx, "key_delete", name.as_str(), None, None);
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

/// The token or TPM alias a device locator starts with (`alias:…`); empty for soft keys.
pub(super) fn locator_alias(v: &KeyVersion) -> &str {
    v.locator.split_once(':').map_or("", |(a, _)| a)
}

/// The backend a key command works on: the soft store, one configured token or one TPM.
pub(super) enum Target {
    Soft(SoftBackend),
    Token(Box<Pkcs11Backend>),
    Tpm(Box<TpmBackend>),
}

impl Target {
    fn open(
        home: &Home,
        common: &Common,
        identity: Option<age::x25519::Identity>,
    ) -> Result<Target> {
        match (common.backend.as_str(), &common.token) {
            ("soft", None) => Ok(Target::Soft(SoftBackend::new(
                &home.keys_dir(),
                keyward::identity::recipient(home)?,
                identity,
            ))),
            ("soft", Some(_)) => Err(Error::BadRequest(
                "--token goes with --backend pkcs11 or --backend tpm".into(),
            )),
            ("tpm", Some(alias)) => Ok(Target::Tpm(Box::new(open_tpm(home, alias)?))),
            (_, Some(alias)) => Ok(Target::Token(Box::new(open_token(home, alias)?))),
            (b, None) => Err(Error::BadRequest(format!(
                "--backend {b} needs --token ALIAS"
            ))),
        }
    }

    /// The backend holding one version of a key: versions rotated with `--token` may sit on
    /// another token or TPM than the current one.
    pub(super) fn for_version(home: &Home, meta: &KeyMeta, v: &KeyVersion) -> Result<Target> {
        Target::at(home, meta.backend, locator_alias(v))
    }

    /// The soft store, or the token / TPM configured as `alias`.
    pub(super) fn at(home: &Home, kind: BackendKind, alias: &str) -> Result<Target> {
        match kind {
            BackendKind::Soft => Ok(Target::Soft(SoftBackend::new(
                &home.keys_dir(),
                keyward::identity::recipient(home)?,
                None,
            ))),
            BackendKind::Pkcs11 => Ok(Target::Token(Box::new(open_token(home, alias)?))),
            BackendKind::Tpm => Ok(Target::Tpm(Box::new(open_tpm(home, alias)?))),
            other => Err(Error::Unsupported(format!(
                "backend {other} is not available"
            ))),
        }
    }

    pub(super) fn get(&self) -> &dyn Backend {
        match self {
            Target::Soft(b) => b,
            Target::Token(b) => b.as_ref(),
            Target::Tpm(b) => b.as_ref(),
        }
    }

    /// Prove the stored key equals the input before the input is shredded: decrypt the soft
    /// copy and compare; on a device (non-extractable) sign there and check against the input.
    fn verify_import(&self, meta: &KeyMeta, reference: &material::SecretKeyMaterial) -> Result<()> {
        let key_ref = meta.key_ref(&meta.versions[0]);
        let same = match self {
            Target::Soft(b) => b.decrypt(&key_ref, meta.key_type)?.expose() == reference.expose(),
            Target::Token(_) | Target::Tpm(_) => {
                let b = self.get();
                let probe = b"keyward import verification";
                let alg = meta.key_type.default_algorithm();
                let sig = b.sign(&key_ref, alg, probe)?;
                verify_with_material(reference, alg, probe, &sig.bytes)?
            }
        };
        if same {
            Ok(())
        } else {
            Err(Error::Internal(
                "the stored key does not match the input; the source was NOT shredded".into(),
            ))
        }
    }
}

/// Check a signature made elsewhere against the original key material.
fn verify_with_material(
    m: &material::SecretKeyMaterial,
    alg: Algorithm,
    msg: &[u8],
    sig: &[u8],
) -> Result<bool> {
    use aws_lc_rs::signature::{self as s, UnparsedPublicKey};
    if m.key_type().is_hmac() {
        let algo = if alg == Algorithm::HmacSha512 {
            aws_lc_rs::hmac::HMAC_SHA512
        } else {
            aws_lc_rs::hmac::HMAC_SHA256
        };
        let k = aws_lc_rs::hmac::Key::new(algo, m.expose());
        return Ok(aws_lc_rs::hmac::verify(&k, msg, sig).is_ok());
    }
    let spki = material::public_spki(m)?.ok_or_else(|| Error::Internal("no public key".into()))?;
    let raw = pubkey::raw_public_key(&spki)?;
    let ok = match alg {
        Algorithm::Ed25519 => UnparsedPublicKey::new(&s::ED25519, &raw)
            .verify(msg, sig)
            .is_ok(),
        Algorithm::EcdsaP256Sha256 => UnparsedPublicKey::new(&s::ECDSA_P256_SHA256_FIXED, &raw)
            .verify(msg, sig)
            .is_ok(),
        Algorithm::EcdsaP384Sha384 => UnparsedPublicKey::new(&s::ECDSA_P384_SHA384_FIXED, &raw)
            .verify(msg, sig)
            .is_ok(),
        Algorithm::RsaPkcs1Sha256 => UnparsedPublicKey::new(&s::RSA_PKCS1_2048_8192_SHA256, &raw)
            .verify(msg, sig)
            .is_ok(),
        Algorithm::EcdsaSecp256k1Keccak256 => {
            use k256::ecdsa::signature::hazmat::PrehashVerifier;
            use sha3::Digest;
            let vk = k256::ecdsa::VerifyingKey::from_sec1_bytes(&raw)
                .map_err(|e| Error::Internal(e.to_string()))?;
            let sig = k256::ecdsa::Signature::from_slice(sig)
                .map_err(|e| Error::Internal(e.to_string()))?;
            vk.verify_prehash(&sha3::Keccak256::digest(msg), &sig)
                .is_ok()
        }
        other => return Err(Error::Unsupported(format!("verifying {other} imports"))),
    };
    Ok(ok)
}

/// Connect to a token configured as `[pkcs11.<alias>]`, reading its PIN from its source.
pub fn open_token(home: &Home, alias: &str) -> Result<Pkcs11Backend> {
    let config = Config::load(&home.config_path())?;
    let cfg = config.pkcs11.get(alias).cloned().ok_or_else(|| {
        Error::Config(format!(
            "no token `{alias}` in {}: add a [pkcs11.{alias}] section (docs/pkcs11.md)",
            home.config_path().display()
        ))
    })?;
    let source: SecretSource = cfg.pin.parse()?;
    let pin = source.read(&format!("PIN of token {alias}"))?;
    Pkcs11Backend::connect(alias, cfg, pin)
}

/// Connect to a TPM configured as `[tpm.<alias>]`, reading its auth values from their sources.
pub fn open_tpm(home: &Home, alias: &str) -> Result<TpmBackend> {
    let config = Config::load(&home.config_path())?;
    let cfg = config.tpm.get(alias).cloned().ok_or_else(|| {
        Error::Config(format!(
            "no TPM `{alias}` in {}: add a [tpm.{alias}] section (docs/tpm.md)",
            home.config_path().display()
        ))
    })?;
    let auth = TpmAuth::read(alias, &cfg)?;
    TpmBackend::connect(alias, cfg, &home.keys_dir(), auth)
}

/// A persistent handle as tpm2-tools prints it (`0x81000001`; decimal is accepted too).
fn parse_handle(s: &str) -> Result<u32> {
    let t = s.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => t.parse::<u32>(),
    };
    parsed.map_err(|_| {
        Error::BadRequest(format!(
            "--handle {s:?} is not a TPM handle (e.g. 0x81000001)"
        ))
    })
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

/// An HMAC secret bound to Kraken or Polymarket is stored as the key bytes their scheme uses
/// (the secret string is base64 / base64url of them); other material is kept as parsed.
pub(super) fn decode_for_profiles(
    m: material::SecretKeyMaterial,
    profiles: &[String],
) -> Result<material::SecretKeyMaterial> {
    use keyward::profile::{HmacKeyEncoding, ProfileName};
    if !m.key_type().is_hmac() {
        return Ok(m);
    }
    let decoding: Vec<ProfileName> = profiles
        .iter()
        .filter_map(|p| p.parse::<ProfileName>().ok())
        .filter(|p| p.hmac_key_encoding() != HmacKeyEncoding::Raw)
        .collect();
    match decoding.as_slice() {
        [] => Ok(m),
        [p] => {
            let bytes = keyward::profile::offline::decode_hmac_secret(
                *p,
                keyward::secret::SecretBytes::from_slice(m.expose()),
            )?;
            material::SecretKeyMaterial::hmac(m.key_type(), bytes)
        }
        _ => Err(Error::BadRequest(
            "an HMAC secret can be bound to only one of kraken and polymarket (their secrets are encoded differently)".into(),
        )),
    }
}

/// Write the metadata (the commit point). If that fails, remove the material just made.
fn commit(
    store: &Keystore,
    backend: &dyn Backend,
    spec: &KeySpec,
    nk: NewKey,
    common: &Common,
) -> Result<KeyMeta> {
    write_meta(store, spec, &nk, common).inspect_err(|_| {
        let _ = backend.delete(&nk.key_ref);
    })
}

fn write_meta(store: &Keystore, spec: &KeySpec, nk: &NewKey, common: &Common) -> Result<KeyMeta> {
    use base64::Engine;
    let now = now_rfc3339();
    let meta = KeyMeta {
        name: spec.name.clone(),
        key_type: spec.key_type,
        backend: nk.key_ref.backend,
        env: common.env,
        created: now.clone(),
        current: spec.version,
        disabled: false,
        profiles: common.profiles.clone(),
        api_key: common.api_key.clone(),
        address: common.address.clone(),
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
            grace_until: None,
            disabled: false,
        }],
    };
    store.create(&meta)?;
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
        "profiles": m.profiles,
        "address": m.address,
        "versions": super::lifecycle::versions_json(m, time::OffsetDateTime::now_utc()),
    })
}

pub(super) fn progress(msg: &str, slow: bool) -> Option<indicatif::ProgressBar> {
    if !slow || !super::is_tty() {
        return None;
    }
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(100));
    Some(pb)
}

pub(super) fn confirm(question: &str) -> Result<bool> {
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
