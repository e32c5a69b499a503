//! The key registry: one metadata file `keys/<name>.toml` per key, listing its versions.
//! The metadata file is the commit point: a key exists once its metadata is written.

use std::fs;
use std::path::PathBuf;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};

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
}

impl KeyVersion {
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
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
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
