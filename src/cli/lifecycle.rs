//! `keyward key rotate | activate | disable | enable` and `key delete --version`: the life of a
//! key's versions (docs/lifecycle.md). Each command is one function that changes metadata once.

use std::path::Path;
use std::time::Duration;

use keyward::backend::{material, KeySpec};
use keyward::home::Home;
use keyward::keystore::{rfc3339, KeyMeta, KeyVersion, Keystore, VersionState};
use keyward::model::{BackendKind, KeyName, KeyType};
use keyward::profile::ProfileName;
use keyward::secret::SecretBytes;
use keyward::{pubkey, Error, Result};
use serde_json::{json, Value};
use time::OffsetDateTime;

use super::key::{confirm, decode_for_profiles, locator_alias, progress, Target, MAX_KEY_INPUT};
use super::migrate::Source;
use super::{audit_change, notify_agent, Ctx};

/// Longest grace period `activate` accepts: beyond this an old key is not "in transition".
const MAX_GRACE: Duration = Duration::from_secs(365 * 24 * 3600);

/// `--grace`: a whole number with a unit (`s`, `m`, `h`, `d`), or several (`1h30m`); `0`
/// retires the old version at once.
pub(super) fn parse_grace(s: &str) -> Result<Duration> {
    let bad = || {
        Error::BadRequest(format!(
            "--grace {s:?} is not a duration: use a number and a unit, e.g. 30m, 2h, 7d (or 0)"
        ))
    };
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit: u64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(bad()),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        total = n
            .checked_mul(unit)
            .and_then(|x| total.checked_add(x))
            .ok_or_else(bad)?;
        digits.clear();
    }
    if t.is_empty() || !digits.is_empty() {
        return Err(bad());
    }
    let d = Duration::from_secs(total);
    if d > MAX_GRACE {
        return Err(Error::BadRequest(format!(
            "--grace {s} is longer than 365 days"
        )));
    }
    Ok(d)
}

/// `key rotate`: a new version of the same type, from the backend or a file, left pending.
pub(super) fn rotate(
    ctx: &Ctx,
    home: &Home,
    store: &Keystore,
    name: &KeyName,
    import: Option<&Path>,
    backend: Option<&str>,
    token: Option<&str>,
) -> Result<()> {
    let before = store.get(name)?;
    let key_type = before.key_type;
    if key_type.is_hmac() && import.is_none() {
        return Err(Error::BadRequest(format!(
            "{name} is an {key_type} secret, which the exchange issues: rotate it with --import FILE"
        )));
    }
    if let Some(b) = backend {
        if b != before.backend.to_string() {
            return Err(Error::BadRequest(format!(
                "{name} lives on the {} backend; all versions of a key use one backend kind (make a new key to move to {b})",
                before.backend
            )));
        }
    }
    // Parse before anything is written: bad input must leave no version behind.
    let input = import.map(read_key_input).transpose()?;
    let parsed = match input {
        Some(bytes) => {
            let m = decode_for_profiles(material::parse(bytes, Some(key_type))?, &before.profiles)?;
            if m.key_type() != key_type {
                return Err(Error::InvalidKeyMaterial(format!(
                    "{name} is an {key_type} key; the file holds an {} key",
                    m.key_type()
                )));
            }
            Some(m)
        }
        None => None,
    };

    let lock = store.lock()?;
    let mut meta = store.get(name)?;
    if meta.key_type != key_type || meta.backend != before.backend {
        return Err(Error::BadRequest(format!(
            "{name} was replaced by another key while this command ran; nothing rotated"
        )));
    }
    let version = meta.next_version()?;
    let alias = match (meta.backend, token) {
        (BackendKind::Soft, Some(_)) => {
            return Err(Error::BadRequest(
                "--token goes with keys on a pkcs11 token or a TPM".into(),
            ))
        }
        (BackendKind::Soft, None) => String::new(),
        (_, Some(t)) => t.to_string(),
        // The token the key already uses: rotation normally stays on the same device.
        (_, None) => locator_alias(meta.current_version()?).to_string(),
    };
    let target = Target::at(home, meta.backend, &alias)?;
    // Key files no metadata lists were left by an interrupted create or rotate; one of them
    // could hold this version's file name.
    for orphan in store.orphan_files(name) {
        keyward::home::remove_durably(&orphan)?;
    }
    let spec = KeySpec {
        name: name.clone(),
        version,
        key_type,
    };
    let nk = match parsed {
        Some(m) => target.get().import(&spec, m)?,
        None => {
            let spinner = progress(
                &format!("generating {key_type} key {name} version {version}"),
                key_type.is_rsa(),
            );
            let nk = target.get().generate(&spec);
            if let Some(s) = spinner {
                s.finish_and_clear();
            }
            nk?
        }
    };
    // Everything the report needs is computed before the commit point, so a command that
    // reports failure has created nothing.
    let printed = nk
        .public
        .spki_der
        .as_ref()
        .map(|spki| Ok::<_, Error>((pem_of(key_type, spki, name)?, upload_form(&meta, spki)?)))
        .transpose()
        .inspect_err(|_| {
            let _ = target.get().delete(&nk.key_ref);
        })?;
    let (pem, upload) = printed.unzip();
    meta.versions.push(KeyVersion {
        version,
        locator: nk.key_ref.locator.clone(),
        created: keyward::keystore::now_rfc3339(),
        fingerprint: nk.public.fingerprint.clone(),
        public_key: nk.public.spki_der.as_ref().map(|d| pubkey::b64(d)),
        grace_until: None,
        disabled: false,
    });
    // The metadata is the commit point; without it the new material must not linger.
    store.save(&meta).inspect_err(|_| {
        let _ = target.get().delete(&nk.key_ref);
    })?;
    drop(lock);
    audit_change(
        ctx,
        "key_rotate",
        name.as_str(),
        Some(version),
        Some(format!(
            "version {version} created, pending until activated"
        )),
    );
    let note = notify_agent(ctx);

    let next = format!("keyward key activate {name} --version {version}");
    let v = json!({
        "key": name.to_string(),
        "type": key_type.to_string(),
        "version": version,
        "current": meta.current,
        "state": VersionState::Pending.as_str(),
        "fingerprint": nk.public.fingerprint,
        "public_key_pem": pem,
        "upload": upload.as_ref().map(|u| json!({"format": u.format, "value": u.value, "for": u.what})),
        "next": next,
        "agent": note,
    });
    ctx.emit(&v, || {
        let mut s = format!(
            "{name}: version {version} ({key_type}) created, fingerprint {}; version {} stays current until you activate the new one.",
            nk.public.fingerprint, meta.current
        );
        if let Some(p) = &pem {
            s.push_str(&format!("\n\nPublic key of version {version} (PEM):\n{}", p.trim_end()));
        }
        match &upload {
            Some(u) if u.format == "pem" => {
                s.push_str(&format!("\n\nRegister with the exchange: {}.", u.what))
            }
            Some(u) => s.push_str(&format!(
                "\n\nRegister with the exchange: {}:\n{}",
                u.what, u.value
            )),
            None => s.push_str(
                "\n\nThis is the secret the exchange issued; note the API key id it issued with it.",
            ),
        }
        s.push_str(&format!(
            "\n\nNext: once the exchange accepts it, run `{next}{}` \
             (version {} keeps signing for the grace period, default 24h: --grace). {note}.",
            if key_type.is_hmac() { " --api-key-id ID" } else { "" },
            meta.current
        ));
        s
    });
    Ok(())
}

/// `key activate`: version `version` becomes current; the one it replaces signs (when named)
/// until now + `grace`.
pub(super) fn activate(
    ctx: &Ctx,
    store: &Keystore,
    name: &KeyName,
    version: u32,
    api_key_id: Option<String>,
    grace: Duration,
) -> Result<()> {
    let lock = store.lock()?;
    let mut meta = store.get(name)?;
    let chosen = meta.find_version(version)?;
    if chosen.disabled {
        return Err(Error::BadRequest(format!(
            "version {version} of {name} is disabled: `keyward key enable {name} --version {version}` first"
        )));
    }
    let now = OffsetDateTime::now_utc();
    let previous = meta.current;
    let mut grace_until = None;
    if previous != version {
        let until = time::Duration::try_from(grace)
            .ok()
            .and_then(|g| now.checked_add(g))
            .ok_or_else(|| Error::BadRequest("--grace is too long".into()))?;
        let until = rfc3339(until);
        if let Some(old) = meta.versions.iter_mut().find(|v| v.version == previous) {
            old.grace_until = Some(until.clone());
            grace_until = Some(until);
        }
    }
    // A version made current again (a rollback) is no longer winding down.
    meta.find_version_mut(version)?.grace_until = None;
    meta.current = version;
    let new_id = api_key_id.is_some();
    if let Some(id) = api_key_id {
        meta.api_key = Some(id);
    }
    store.save(&meta)?;
    drop(lock);
    audit_change(
        ctx,
        "key_activate",
        name.as_str(),
        Some(version),
        Some(format!(
            "version {version} current (was {previous}){}{}",
            grace_until
                .as_deref()
                .map(|g| format!("; version {previous} in grace until {g}"))
                .unwrap_or_default(),
            if new_id {
                "; new exchange API key id"
            } else {
                ""
            }
        )),
    );
    let note = notify_agent(ctx);

    let v = json!({
        "key": name.to_string(),
        "current": version,
        "previous": previous,
        "grace_until": grace_until,
        "api_key": meta.api_key,
        "disabled": meta.disabled,
        "versions": versions_json(&meta, now),
        "agent": note,
    });
    ctx.emit(&v, || {
        let mut s = if previous == version {
            format!("{name}: version {version} was already current")
        } else {
            format!("{name}: version {version} is now current")
        };
        if let Some(t) = &grace_until {
            s.push_str(&format!(
                "; version {previous} still signs when a request names it, until {t}"
            ));
        }
        if new_id {
            s.push_str(&format!(
                "; API key id {}",
                meta.api_key.as_deref().unwrap_or_default()
            ));
        } else if meta.key_type.is_hmac() && previous != version {
            // An exchange issues a new secret with a new id; keeping the old id is rarely right.
            s.push_str("; the API key id is unchanged (--api-key-id sets it)");
        }
        if meta.disabled {
            s.push_str(&format!(
                "; the key is disabled (`keyward key enable {name}`)"
            ));
        }
        format!("{s}; {note}")
    });
    Ok(())
}

/// `key disable` / `key enable`: the whole key, or one version.
pub(super) fn set_disabled(
    ctx: &Ctx,
    store: &Keystore,
    name: &KeyName,
    version: Option<u32>,
    disabled: bool,
) -> Result<()> {
    let lock = store.lock()?;
    let mut meta = store.get(name)?;
    let was = match version {
        None => std::mem::replace(&mut meta.disabled, disabled),
        Some(n) => {
            if disabled && n == meta.current {
                return Err(Error::BadRequest(format!(
                    "version {n} is the current version of {name}: disable the key (`keyward key disable {name}`) or activate another version first"
                )));
            }
            std::mem::replace(&mut meta.find_version_mut(n)?.disabled, disabled)
        }
    };
    if was != disabled {
        store.save(&meta)?;
    }
    drop(lock);
    let note = if was != disabled {
        audit_change(
            ctx,
            if disabled {
                "key_disable"
            } else {
                "key_enable"
            },
            name.as_str(),
            version,
            None,
        );
        notify_agent(ctx)
    } else {
        "nothing changed"
    };
    let what = match version {
        Some(n) => format!("{name} version {n}"),
        None => name.to_string(),
    };
    let verb = if disabled { "disabled" } else { "enabled" };
    let v = json!({
        "key": name.to_string(),
        "version": version,
        "disabled": disabled,
        "changed": was != disabled,
        "versions": versions_json(&meta, OffsetDateTime::now_utc()),
        "agent": note,
    });
    ctx.emit(&v, || {
        if was == disabled {
            format!("{what} was already {verb}")
        } else {
            format!("{what} {verb}; {note}")
        }
    });
    Ok(())
}

/// `key delete K --version N`: one non-current version, metadata and material.
pub(super) fn delete_version(
    ctx: &Ctx,
    home: &Home,
    store: &Keystore,
    name: &KeyName,
    version: u32,
    yes: bool,
) -> Result<()> {
    let lock = store.lock()?;
    let mut meta = store.get(name)?;
    let v = meta.find_version(version)?.clone();
    if version == meta.current {
        return Err(Error::BadRequest(format!(
            "version {version} is the current version of {name}: activate another version first, or delete the whole key (without --version)"
        )));
    }
    let state = meta.version_state(&v, OffsetDateTime::now_utc());
    if !yes
        && !confirm(&format!(
            "delete version {version} ({state}) of key {name} and its key material?"
        ))?
    {
        return Err(Error::BadRequest(
            "not deleted (pass --yes to skip the question)".into(),
        ));
    }
    // Opened before the metadata changes, so a token that cannot be reached changes nothing.
    let target = Target::for_version(home, &meta, &v)?;
    let key_ref = meta.key_ref(&v);
    // Metadata first, as `key delete` does: once the version is unlisted it cannot sign, even
    // if the removal of its material is interrupted (soft files are swept as orphans later).
    meta.versions.retain(|x| x.version != version);
    store.save(&meta)?;
    drop(lock);
    target.get().delete(&key_ref)?;
    audit_change(
        ctx,
        "key_delete_version",
        name.as_str(),
        Some(version),
        None,
    );
    let note = notify_agent(ctx);
    let v = json!({
        "key": name.to_string(),
        "deleted_version": version,
        "versions": versions_json(&meta, OffsetDateTime::now_utc()),
        "agent": note,
    });
    ctx.emit(&v, || {
        format!("deleted version {version} of {name} and its key material; {note}")
    });
    Ok(())
}

/// Each version with its state, for `key show` / `key list` and the commands above.
pub(super) fn versions_json(meta: &KeyMeta, now: OffsetDateTime) -> Vec<Value> {
    meta.versions
        .iter()
        .map(|v| {
            json!({
                "version": v.version,
                "created": v.created,
                "fingerprint": v.fingerprint,
                "state": meta.version_state(v, now).as_str(),
                "current": v.version == meta.current,
                "grace_until": v.grace_until,
                "disabled": v.disabled,
            })
        })
        .collect()
}

/// `1 grace, 2 current` — the versions of a key in one cell of `key list`.
pub(super) fn versions_summary(meta: &KeyMeta, now: OffsetDateTime) -> String {
    meta.versions
        .iter()
        .map(|v| format!("{} {}", v.version, meta.version_state(v, now)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `key show` for a person: the key's settings, then one line per version with its state.
pub(super) fn show_text(meta: &KeyMeta) -> String {
    let now = OffsetDateTime::now_utc();
    let mut s = format!(
        "name:     {}\ntype:     {}\nbackend:  {}\nenv:      {}\ncreated:  {}\ncurrent:  version {}\n",
        meta.name,
        meta.key_type,
        meta.backend,
        match meta.env {
            keyward::Env::Prod => "prod",
            keyward::Env::Demo => "demo",
        },
        meta.created,
        meta.current,
    );
    if meta.disabled {
        s.push_str("disabled: yes (the whole key: no version signs)\n");
    }
    if !meta.profiles.is_empty() {
        s.push_str(&format!("profiles: {}\n", meta.profiles.join(", ")));
    }
    if let Some(k) = &meta.api_key {
        s.push_str(&format!("api_key:  {k}\n"));
    }
    if let Some(a) = &meta.address {
        s.push_str(&format!("address:  {a}\n"));
    }
    s.push_str(&format!(
        "versions:\n  {:>3}  {:<36} {:<21} {}",
        "VER", "STATE", "CREATED", "FINGERPRINT"
    ));
    for v in &meta.versions {
        let state = match meta.version_state(v, now) {
            VersionState::Grace => format!(
                "grace until {}",
                v.grace_until.as_deref().unwrap_or_default()
            ),
            other => other.to_string(),
        };
        s.push_str(&format!(
            "\n  {:>3}  {:<36} {:<21} {}",
            v.version, state, v.created, v.fingerprint
        ));
    }
    s
}

/// The form the key's exchanges take a new public key in.
struct Upload {
    format: &'static str,
    value: String,
    what: String,
}

fn upload_form(meta: &KeyMeta, spki: &[u8]) -> Result<Upload> {
    let profiles: Vec<ProfileName> = meta
        .profiles
        .iter()
        .filter_map(|p| p.parse().ok())
        .collect();
    if meta.key_type == KeyType::Secp256k1 {
        // EVM venues (Polymarket, Hyperliquid, EIP-191/712 signers) know a key by its address.
        let address = pubkey::eth_address(&pubkey::raw_public_key(spki)?)?;
        let venues = if profiles.is_empty() {
            "the EVM venue".to_string()
        } else {
            names(&profiles)
        };
        return Ok(Upload {
            format: "address",
            value: address,
            what: format!("{venues} know this key by its address (approve or register it)"),
        });
    }
    let what = if profiles.is_empty() {
        "upload the PEM public key above".to_string()
    } else {
        format!("upload the PEM public key above to {}", names(&profiles))
    };
    Ok(Upload {
        format: "pem",
        value: pem_of(meta.key_type, spki, &meta.name)?,
        what,
    })
}

fn names(profiles: &[ProfileName]) -> String {
    profiles
        .iter()
        .map(|p| p.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn pem_of(key_type: KeyType, spki: &[u8], name: &KeyName) -> Result<String> {
    match pubkey::encode(key_type, spki, pubkey::Format::Pem, name.as_str())? {
        Value::String(s) => Ok(s),
        other => Ok(other.to_string()),
    }
}

/// Key material from a file or `-` (standard input), read by `key import`'s own reader.
fn read_key_input(file: &Path) -> Result<SecretBytes> {
    let source = if file == Path::new("-") {
        Source::Stdin
    } else {
        Source::KeyFile(file.to_path_buf())
    };
    source.read(MAX_KEY_INPUT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grace_durations() {
        let ok = [
            ("0", 0),
            ("45s", 45),
            ("30m", 1800),
            ("2h", 7200),
            ("7d", 604_800),
            ("1h30m", 5400),
            ("365d", 31_536_000),
        ];
        for (s, secs) in ok {
            assert_eq!(parse_grace(s).unwrap(), Duration::from_secs(secs), "{s}");
        }
        for s in [
            "",
            "24",
            "h",
            "5x",
            "-1h",
            "1.5h",
            "1H",
            "366d",
            "99999999999999999999d",
        ] {
            assert_eq!(parse_grace(s).unwrap_err().code(), "bad_request", "{s:?}");
        }
    }
}
