//! Secret-holding types: mlocked, zeroized on drop, and deliberately without Debug/Display,
//! so a secret cannot reach a log line, an error message or a panic by formatting.

use std::fs;
use std::io::{IsTerminal, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use zeroize::Zeroize;

use crate::error::{Error, IoContext, Result};

/// Owned secret bytes in a buffer that is locked in RAM and wiped when dropped.
/// The buffer never reallocates (a reallocation would leave an unwiped copy behind).
pub struct SecretBytes {
    buf: Box<[u8]>,
    locked: bool,
}

impl SecretBytes {
    /// Take ownership of `v`, wiping any spare capacity it had.
    pub fn new(mut v: Vec<u8>) -> SecretBytes {
        let boxed: Box<[u8]> = if v.len() == v.capacity() {
            v.into_boxed_slice()
        } else {
            let exact = v.as_slice().to_vec().into_boxed_slice();
            v.zeroize();
            exact
        };
        let locked = crate::sys::mlock(boxed.as_ptr(), boxed.len());
        SecretBytes { buf: boxed, locked }
    }

    pub fn from_slice(s: &[u8]) -> SecretBytes {
        SecretBytes::new(s.to_vec())
    }

    pub fn expose(&self) -> &[u8] {
        &self.buf
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The bytes without one trailing `\n` or `\r\n` (secrets pasted into files end in one).
    pub fn trim_one_newline(self) -> SecretBytes {
        let b = self.expose();
        let cut = if b.ends_with(b"\r\n") {
            2
        } else if b.ends_with(b"\n") {
            1
        } else {
            0
        };
        if cut == 0 {
            self
        } else {
            SecretBytes::from_slice(&b[..b.len() - cut])
        }
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        self.buf.zeroize();
        if self.locked {
            crate::sys::munlock(self.buf.as_ptr(), self.buf.len());
        }
    }
}

/// Read all of `r` into a secret buffer without leaving unwiped intermediate copies.
pub fn read_secret(mut r: impl Read, limit: usize) -> Result<SecretBytes> {
    let mut v = zeroize::Zeroizing::new(Vec::with_capacity(4096));
    let mut chunk = zeroize::Zeroizing::new([0u8; 4096]);
    loop {
        let n = r.read(&mut chunk[..]).ctx("reading secret input")?;
        if n == 0 {
            break;
        }
        if v.len() + n > limit {
            return Err(Error::InvalidKeyMaterial(format!(
                "secret input is larger than {limit} bytes"
            )));
        }
        if v.len() + n > v.capacity() {
            // Grow by hand so the old buffer is wiped rather than freed with data in it.
            let mut bigger = Vec::with_capacity((v.capacity() * 2).max(v.len() + n));
            bigger.extend_from_slice(&v);
            v.zeroize();
            *v = bigger;
        }
        v.extend_from_slice(&chunk[..n]);
    }
    Ok(SecretBytes::from_slice(&v))
}

/// Where a passphrase or PIN comes from. Never the secret itself: argv is readable by every
/// local user through /proc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    /// `env:NAME` — read once, then removed from the process environment.
    Env(String),
    /// `file:PATH` — must be a regular file, mode 0600 (or stricter), owned by this user.
    File(PathBuf),
    /// `stdin` — read standard input to its end (for scripts and for `keyward agent`, which
    /// hands a prompted passphrase to its background process this way).
    Stdin,
    /// `prompt` — ask on the terminal.
    Prompt,
}

impl FromStr for SecretSource {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if let Some(name) = s.strip_prefix("env:") {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(Error::BadRequest(format!(
                    "invalid environment variable name in {s:?}"
                )));
            }
            Ok(SecretSource::Env(name.to_owned()))
        } else if let Some(p) = s.strip_prefix("file:") {
            if p.is_empty() {
                return Err(Error::BadRequest("file: needs a path".into()));
            }
            Ok(SecretSource::File(PathBuf::from(p)))
        } else if s == "prompt" {
            Ok(SecretSource::Prompt)
        } else if s == "stdin" {
            Ok(SecretSource::Stdin)
        } else {
            Err(Error::BadRequest(format!(
                "secret source must be env:NAME, file:PATH, stdin or prompt, not {:?}",
                s.chars().take(40).collect::<String>()
            )))
        }
    }
}

impl SecretSource {
    /// Read the secret. `what` names it in prompts and errors ("identity passphrase").
    pub fn read(&self, what: &str) -> Result<SecretBytes> {
        match self {
            SecretSource::Env(name) => {
                let v = std::env::var_os(name).ok_or_else(|| {
                    Error::BadPassphrase(format!("{what}: environment variable {name} is not set"))
                })?;
                crate::sys::scrub_env(name);
                let bytes = std::os::unix::ffi::OsStringExt::into_vec(v);
                Ok(SecretBytes::new(bytes))
            }
            SecretSource::File(path) => {
                check_private_file(path)?;
                let f = fs::File::open(path).ctx(format!("opening {}", path.display()))?;
                Ok(read_secret(f, 64 * 1024)?.trim_one_newline())
            }
            SecretSource::Stdin => {
                Ok(read_secret(std::io::stdin().lock(), 64 * 1024)?.trim_one_newline())
            }
            SecretSource::Prompt => {
                if !std::io::stdin().is_terminal() {
                    return Err(Error::BadPassphrase(format!(
                        "{what}: no terminal to prompt on; use env:NAME or file:PATH"
                    )));
                }
                let s = rpassword::prompt_password(format!("{what}: "))
                    .ctx("reading from the terminal")?;
                Ok(SecretBytes::new(s.into_bytes()))
            }
        }
    }
}

/// A file holding a secret must be a regular file owned by us, not readable or writable by
/// group or others.
pub fn check_private_file(path: &Path) -> Result<()> {
    let md = fs::symlink_metadata(path).ctx(format!("reading {}", path.display()))?;
    if !md.file_type().is_file() {
        return Err(Error::InsecurePermissions(format!(
            "{} is not a regular file (symlinks are refused)",
            path.display()
        )));
    }
    let me = crate::sys::effective_uid();
    if md.uid() != me {
        return Err(Error::InsecurePermissions(format!(
            "{} is owned by uid {}, not by this user (uid {me})",
            path.display(),
            md.uid()
        )));
    }
    if md.mode() & 0o077 != 0 {
        return Err(Error::InsecurePermissions(format!(
            "{} has mode {:04o}; run `chmod 600 {}`",
            path.display(),
            md.mode() & 0o7777,
            path.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn sources_parse_and_reject_garbage() {
        assert_eq!(
            "env:KW_PASS".parse::<SecretSource>().unwrap(),
            SecretSource::Env("KW_PASS".into())
        );
        assert_eq!(
            "file:/x/y".parse::<SecretSource>().unwrap(),
            SecretSource::File("/x/y".into())
        );
        assert!("hunter2".parse::<SecretSource>().is_err());
        assert!("env:A-B".parse::<SecretSource>().is_err());
    }

    #[test]
    fn a_loose_secret_file_is_refused_and_the_message_has_no_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pass");
        fs::write(&p, "s3cret-value\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let e = SecretSource::File(p.clone())
            .read("passphrase")
            .err()
            .unwrap();
        assert_eq!(e.code(), "insecure_permissions");
        assert!(!e.to_string().contains("s3cret"));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        let s = SecretSource::File(p).read("passphrase").unwrap();
        assert_eq!(s.expose(), b"s3cret-value");
    }

    #[test]
    fn read_secret_enforces_its_limit() {
        let data = vec![7u8; 10_000];
        assert_eq!(read_secret(&data[..], 20_000).unwrap().len(), 10_000);
        assert!(read_secret(&data[..], 100).is_err());
    }
}
