//! The key registry: one metadata file `keys/<name>.toml` per key, listing its versions.
//! The metadata file is the commit point: a key exists once its metadata is written.

use std::fs;
use std::path::PathBuf;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::error::{Error, IoContext, Result};
use crate::home::{self, Home, TMP_PREFIX};
use crate::model::{BackendKind, Env, KeyName, KeyRef, KeyType};

/// Largest metadata file read (guards against a planted huge file).
const MAX_META: u64 = 256 * 1024;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyMeta {
    pub name: KeyName,
    #[serde(rename = "type")]
    pub key_type: KeyType,
    pub backend: BackendKind,
    #[serde(default)]
    pub env: Env,
    pub created: String,
    /// The version `sign` uses.
    pub current: u32,
    #[serde(default)]
    pub disabled: bool,
    /// Exchange profiles the key is bound to (enforced by policy).
    #[serde(default)]
    pub profiles: Vec<String>,
    /// The exchange's API key id, sent in headers by profiles.
    #[serde(default)]
    pub api_key: Option<String>,
    /// Address sent by profiles that need one beside the key (Polymarket L2 `POLY_ADDRESS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    pub versions: Vec<KeyVersion>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyVersion {
    pub version: u32,
    pub locator: String,
    pub created: String,
    pub fingerprint: String,
    /// Base64 SPKI DER; absent for HMAC keys.
    #[serde(default)]
    pub public_key: Option<String>,
    /// Set on the version that was current when another was activated (RFC 3339): it still
    /// signs when a request names it, until then (docs/lifecycle.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_until: Option<String>,
    /// A disabled version never signs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
}

impl KeyMeta {
    pub fn version(&self, v: u32) -> Result<&KeyVersion> {
        self.versions
            .iter()
            .find(|x| x.version == v)
            .ok_or_else(|| Error::Internal(format!("key {} has no version {v}", self.name)))
    }

    pub fn current_version(&self) -> Result<&KeyVersion> {
        self.version(self.current)
    }

    pub fn key_ref(&self, v: &KeyVersion) -> KeyRef {
        KeyRef {
            backend: self.backend,
            locator: v.locator.clone(),
        }
    }

    /// Version `v` for an operator's command: an unknown version is bad input (`bad_request`)
    /// naming the versions that exist, not an internal error like [`KeyMeta::version`].
    pub fn find_version(&self, v: u32) -> Result<&KeyVersion> {
        self.versions
            .iter()
            .find(|x| x.version == v)
            .ok_or_else(|| self.no_such_version(v))
    }

    pub fn find_version_mut(&mut self, v: u32) -> Result<&mut KeyVersion> {
        let err = self.no_such_version(v);
        self.versions.iter_mut().find(|x| x.version == v).ok_or(err)
    }

    fn no_such_version(&self, v: u32) -> Error {
        let have: Vec<String> = self
            .versions
            .iter()
            .map(|x| x.version.to_string())
            .collect();
        Error::BadRequest(format!(
            "key {} has no version {v} (versions: {})",
            self.name,
            have.join(", ")
        ))
    }

    /// The number a new version gets: one above the highest listed (numbers of deleted
    /// versions below it stay unused; a deleted highest one is given out again).
    pub fn next_version(&self) -> Result<u32> {
        self.versions
            .iter()
            .map(|v| v.version)
            .max()
            .unwrap_or(0)
            .checked_add(1)
            .ok_or_else(|| {
                Error::BadRequest(format!("key {} has no version numbers left", self.name))
            })
    }

    /// Where version `v` stands at `now` (see [`VersionState`]). The key-wide `disabled` flag
    /// is separate: it stops every version whatever its state.
    pub fn version_state(&self, v: &KeyVersion, now: OffsetDateTime) -> VersionState {
        if v.disabled {
            return VersionState::Disabled;
        }
        if v.version == self.current {
            return VersionState::Current;
        }
        if v.grace_until.is_some() {
            // An unreadable time counts as passed: a hand-edited file must not extend a grace.
            return match v.grace_end() {
                Some(t) if t > now => VersionState::Grace,
                _ => VersionState::Retired,
            };
        }
        if v.version > self.current {
            VersionState::Pending
        } else {
            VersionState::Retired
        }
    }
}

/// The lifecycle state of one key version (docs/lifecycle.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionState {
    /// The version `sign` uses.
    Current,
    /// Was current until another version was activated; still signs when a request names it,
    /// until its `grace_until`.
    Grace,
    /// Created by a rotation and not activated yet (higher than the current version).
    Pending,
    /// Switched off by an operator; never signs.
    Disabled,
    /// Its grace period passed, or it was never activated and a later version was.
    Retired,
}

impl VersionState {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Current => "current",
            VersionState::Grace => "grace",
            VersionState::Pending => "pending",
            VersionState::Disabled => "disabled",
            VersionState::Retired => "retired",
        }
    }

    /// Whether a request naming this version explicitly may sign with it.
    pub fn signs_when_named(self) -> bool {
        matches!(self, VersionState::Current | VersionState::Grace)
    }
}

impl std::fmt::Display for VersionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl KeyVersion {
    /// `grace_until` as a time; `None` when unset or not RFC 3339.
    pub fn grace_end(&self) -> Option<OffsetDateTime> {
        self.grace_until
            .as_deref()
            .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
    }

    pub fn spki_der(&self) -> Result<Option<Vec<u8>>> {
        self.public_key
            .as_deref()
            .map(|b| {
                STANDARD
                    .decode(b)
                    .map_err(|_| Error::Internal("stored public key is not base64".into()))
            })
            .transpose()
    }
}

/// Now, as RFC 3339 UTC with seconds precision.
pub fn now_rfc3339() -> String {
    rfc3339(OffsetDateTime::now_utc())
}

/// `t` as RFC 3339 UTC with seconds precision (the form metadata stores).
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}

#[derive(Clone, Debug)]
pub struct Keystore {
    dir: PathBuf,
}

impl Keystore {
    pub fn new(home: &Home) -> Keystore {
        Keystore {
            dir: home.keys_dir(),
        }
    }

    fn meta_path(&self, name: &KeyName) -> PathBuf {
        self.dir.join(format!("{name}.toml"))
    }

    pub fn exists(&self, name: &KeyName) -> bool {
        self.meta_path(name).exists()
    }

    pub fn get(&self, name: &KeyName) -> Result<KeyMeta> {
        let p = self.meta_path(name);
        match fs::metadata(&p) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::UnknownKey(name.to_string()))
            }
            Err(e) => return Err(Error::io(format!("reading {}", p.display()), e)),
        }
        read_meta(&p)
    }

    /// Every key, sorted by name. A metadata file that does not parse is an error naming it.
    pub fn list(&self) -> Result<Vec<KeyMeta>> {
        let mut out = Vec::new();
        let rd = fs::read_dir(&self.dir).ctx(format!("reading {}", self.dir.display()))?;
        for entry in rd {
            let entry = entry.ctx(format!("reading {}", self.dir.display()))?;
            let fname = entry.file_name();
            let fname = fname.to_string_lossy();
            if fname.starts_with(TMP_PREFIX) || fname.starts_with('.') {
                continue;
            }
            if let Some(stem) = fname.strip_suffix(".toml") {
                if KeyName::new(stem).is_ok() {
                    out.push(read_meta(&entry.path())?);
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Write the metadata of a new key; fails if the key exists.
    pub fn create(&self, meta: &KeyMeta) -> Result<()> {
        home::atomic_create(&self.meta_path(&meta.name), &encode(meta)?).map_err(|e| match e {
            Error::AlreadyExists(_) => Error::AlreadyExists(format!("key {} exists", meta.name)),
            e => e,
        })
    }

    /// Hold this while reading, changing and saving a key's metadata, so two commands
    /// changing keys at once (an `activate` and a `disable`, two `rotate`s) cannot lose one
    /// another's change. Released when the guard drops (or the process dies).
    pub fn lock(&self) -> Result<MetaLock> {
        use std::os::unix::fs::OpenOptionsExt;
        // A dot file: key listings and permission checks skip it.
        let p = self.dir.join(".lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&p)
            .ctx(format!("opening {}", p.display()))?;
        f.lock().ctx(format!("locking {}", p.display()))?;
        Ok(MetaLock { _file: f })
    }

    /// Replace the metadata of an existing key.
    pub fn save(&self, meta: &KeyMeta) -> Result<()> {
        home::atomic_write(&self.meta_path(&meta.name), &encode(meta)?)
    }

    /// Remove the metadata (the key stops existing); backends remove material first.
    pub fn remove(&self, name: &KeyName) -> Result<()> {
        home::remove_durably(&self.meta_path(name))
    }

    /// Material files of `name` that no metadata lists: left by a create that was interrupted
    /// before its commit point. They were never visible as keys.
    pub fn orphan_files(&self, name: &KeyName) -> Vec<PathBuf> {
        let listed: Vec<String> = self
            .get(name)
            .map(|m| m.versions.iter().map(|v| v.locator.clone()).collect())
            .unwrap_or_default();
        let prefix = format!("{name}.");
        fs::read_dir(&self.dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        let f = e.file_name().to_string_lossy().into_owned();
                        let rest = f.strip_prefix(&prefix)?;
                        let ver = rest.strip_suffix(".age")?;
                        (ver.parse::<u32>().is_ok() && !listed.contains(&f)).then(|| e.path())
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// An exclusive hold on the key registry, from [`Keystore::lock`].
#[derive(Debug)]
pub struct MetaLock {
    _file: fs::File,
}

fn read_meta(p: &std::path::Path) -> Result<KeyMeta> {
    let md = fs::metadata(p).ctx(format!("reading {}", p.display()))?;
    if md.len() > MAX_META {
        return Err(Error::Config(format!("{} is too large", p.display())));
    }
    let text = fs::read_to_string(p).ctx(format!("reading {}", p.display()))?;
    toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {}", p.display(), e.message())))
}

fn encode(meta: &KeyMeta) -> Result<Vec<u8>> {
    toml::to_string(meta)
        .map(String::into_bytes)
        .map_err(|e| Error::Internal(format!("encoding key metadata: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn version(n: u32, grace_until: Option<&str>, disabled: bool) -> KeyVersion {
        KeyVersion {
            version: n,
            locator: format!("k.{n}.age"),
            created: "2026-01-01T00:00:00Z".into(),
            fingerprint: "SHA256:x".into(),
            public_key: None,
            grace_until: grace_until.map(str::to_string),
            disabled,
        }
    }

    fn meta(current: u32, versions: Vec<KeyVersion>) -> KeyMeta {
        KeyMeta {
            name: KeyName::new("k").unwrap(),
            key_type: KeyType::Ed25519,
            backend: BackendKind::Soft,
            env: Env::Prod,
            created: "2026-01-01T00:00:00Z".into(),
            current,
            disabled: false,
            profiles: Vec::new(),
            api_key: None,
            address: None,
            versions,
        }
    }

    #[test]
    fn version_states_follow_current_grace_and_flags() {
        let now = datetime!(2026-06-01 12:00 UTC);
        let m = meta(
            3,
            vec![
                version(1, None, false),
                version(2, Some("2026-06-01T13:00:00Z"), false),
                version(3, None, false),
                version(4, None, false),
                version(5, None, true),
                version(6, Some("2026-06-01T12:00:00Z"), false),
                version(7, Some("not a time"), false),
                version(8, Some("2026-06-02T00:00:00Z"), true),
            ],
        );
        let got: Vec<VersionState> = m.versions.iter().map(|v| m.version_state(v, now)).collect();
        use VersionState::*;
        // 6: a grace that ends exactly now has ended; 7: an unreadable end has ended too.
        assert_eq!(
            got,
            [Retired, Grace, Current, Pending, Disabled, Retired, Retired, Disabled]
        );
        assert!(Grace.signs_when_named() && Current.signs_when_named());
        assert!(!Pending.signs_when_named() && !Retired.signs_when_named());
        assert_eq!(m.next_version().unwrap(), 9);
        assert_eq!(meta(1, Vec::new()).next_version().unwrap(), 1);
        assert_eq!(
            meta(1, vec![version(u32::MAX, None, false)])
                .next_version()
                .unwrap_err()
                .code(),
            "bad_request"
        );
        assert_eq!(m.find_version(9).unwrap_err().code(), "bad_request");
    }

    #[test]
    fn rfc3339_is_utc_seconds() {
        let t = datetime!(2026-06-01 12:00:00.75 +02:00);
        assert_eq!(rfc3339(t), "2026-06-01T10:00:00Z");
        let v = version(1, Some(&rfc3339(t)), false);
        assert_eq!(v.grace_end(), Some(datetime!(2026-06-01 10:00 UTC)));
    }
}
