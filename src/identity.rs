//! The home's age identity: an X25519 key that every soft key file is encrypted to, stored
//! passphrase-encrypted (age scrypt) in `identity.age`, with its public half in `identity.pub`.
//! Optionally also sealed to a TPM in `identity.tpm` (docs/tpm.md §8), so the agent can start
//! without the passphrase on that host; `identity.age` then stays as the recovery copy.

use std::path::PathBuf;
use std::str::FromStr;

use age::secrecy::{ExposeSecret, SecretString};

use crate::backend::soft::{decrypt_with, encrypt_to_passphrase, parse_recipient};
use crate::backend::tpm_seal::{self, PcrPolicy, SealedBlob};
use crate::config::{Config, TpmConfig};
use crate::error::{Error, IoContext, Result};
use crate::home::{self, Home};
use crate::secret::SecretBytes;

/// Shortest passphrase `init` accepts.
pub const MIN_PASSPHRASE: usize = 8;

/// Create the identity in an empty home. `work_factor` is scrypt's log2(N) (None: age's
/// default, tuned to about a second).
pub fn create(home: &Home, passphrase: &SecretBytes, work_factor: Option<u8>) -> Result<()> {
    create_sealed(home, passphrase, work_factor, None)
}

/// [`create`], and with `seal` also seal the new identity to that TPM (`init --seal-to-tpm`).
/// The TPM is asked first, so a TPM failure leaves no identity behind and `init` can simply
/// be run again.
pub fn create_sealed(
    home: &Home,
    passphrase: &SecretBytes,
    work_factor: Option<u8>,
    seal: Option<(&str, &TpmConfig, Option<&PcrPolicy>)>,
) -> Result<()> {
    if home.identity_path().exists() {
        return Err(Error::AlreadyExists(format!(
            "{} already holds an identity",
            home.root().display()
        )));
    }
    if passphrase.len() < MIN_PASSPHRASE {
        return Err(Error::BadPassphrase(format!(
            "the passphrase must have at least {MIN_PASSPHRASE} characters"
        )));
    }
    let pass = to_secret_string(passphrase)?;
    let identity = age::x25519::Identity::generate();
    let secret_text = identity.to_string();
    let ciphertext =
        encrypt_to_passphrase(&pass, secret_text.expose_secret().as_bytes(), work_factor)?;
    let recipient = identity.to_public().to_string();
    let sealed = match seal {
        Some((alias, cfg, pcrs)) => {
            let secret = SecretBytes::from_slice(secret_text.expose_secret().as_bytes());
            Some(tpm_seal::seal(alias, cfg, &secret, pcrs, &recipient)?.to_json()?)
        }
        None => None,
    };
    // identity.tpm before identity.age: a crash in between leaves an uninitialised home (no
    // identity.age) whose leftovers the next `init` overwrites.
    match &sealed {
        Some(json) => home::atomic_write(&sealed_path(home), json)?,
        // A seal left by an interrupted sealed init belongs to another identity.
        None if is_sealed(home) => home::remove_durably(&sealed_path(home))?,
        None => {}
    }
    // identity.age is written last: it is the commit point (`is_initialized` needs both),
    // so a lone identity.pub is the leftover of an interrupted init and is overwritten.
    home::atomic_write(&home.recipient_path(), format!("{recipient}\n").as_bytes())?;
    home::atomic_create(&home.identity_path(), &ciphertext)
}

/// Where the TPM-sealed copy of the identity lives (next to identity.age).
pub fn sealed_path(home: &Home) -> PathBuf {
    home.root().join("identity.tpm")
}

/// Whether the home has a TPM-sealed identity.
pub fn is_sealed(home: &Home) -> bool {
    sealed_path(home).exists()
}

/// Seal an unlocked identity to the TPM `[tpm.<alias>]` of `config` and write identity.tpm
/// (replacing an older seal: resealing after a PCR change is the normal way to update it).
pub fn seal(
    home: &Home,
    config: &Config,
    alias: &str,
    identity: &age::x25519::Identity,
    pcrs: Option<&PcrPolicy>,
) -> Result<SealedBlob> {
    let cfg = tpm_config(config, alias)?;
    let secret_text = identity.to_string();
    let secret = SecretBytes::from_slice(secret_text.expose_secret().as_bytes());
    let blob = tpm_seal::seal(alias, cfg, &secret, pcrs, &identity.to_public().to_string())?;
    home::atomic_write(&sealed_path(home), &blob.to_json()?)?;
    Ok(blob)
}

/// Read identity.tpm (must be private, like identity.age).
pub fn read_sealed(home: &Home) -> Result<SealedBlob> {
    let p = sealed_path(home);
    crate::secret::check_private_file(&p)?;
    let text = std::fs::read(&p).ctx(format!("reading {}", p.display()))?;
    SealedBlob::from_json(&text).map_err(|e| Error::Config(format!("{}: {e}", p.display())))
}

/// Unlock the identity through the TPM named in identity.tpm (no passphrase). Every TPM-side
/// failure is `backend_unavailable`; the caller names the passphrase fallback.
pub fn unlock_sealed(home: &Home, config: &Config) -> Result<age::x25519::Identity> {
    let blob = read_sealed(home)?;
    let cfg = tpm_config(config, &blob.tpm)?;
    let secret = tpm_seal::unseal(&blob.tpm, cfg, &blob)?;
    let text = std::str::from_utf8(secret.expose())
        .map_err(|_| Error::InvalidKeyMaterial("the sealed identity is not text".into()))?;
    let identity = age::x25519::Identity::from_str(text.trim()).map_err(|_| {
        Error::InvalidKeyMaterial("identity.tpm does not hold an age identity".into())
    })?;
    let public = identity.to_public().to_string();
    if public != blob.recipient || public != recipient(home)?.to_string() {
        return Err(Error::InvalidKeyMaterial(
            "identity.tpm holds another identity than identity.pub; reseal with `keyward identity seal`"
                .into(),
        ));
    }
    Ok(identity)
}

/// What the agent adds to a failed unattended start: how to start anyway.
pub const SEALED_FALLBACK: &str = "start the agent with `--passphrase SOURCE` (env:NAME, file:PATH, stdin or prompt) to use the passphrase-protected identity.age instead, then reseal with `keyward identity seal --tpm ALIAS`";

/// [`unlock_sealed`] for the agent's start: a failure keeps its code and names the fallback.
pub fn unlock_unattended(home: &Home, config: &Config) -> Result<age::x25519::Identity> {
    unlock_sealed(home, config).map_err(|e| {
        let m =
            |m: String| format!("cannot unseal the TPM-sealed identity: {m}; {SEALED_FALLBACK}");
        match e {
            Error::BackendUnavailable(s) => Error::BackendUnavailable(m(s)),
            Error::Config(s) => Error::Config(m(s)),
            Error::InvalidKeyMaterial(s) => Error::InvalidKeyMaterial(m(s)),
            Error::InsecurePermissions(s) => Error::InsecurePermissions(m(s)),
            Error::BadPassphrase(s) => Error::BadPassphrase(m(s)),
            Error::Internal(s) => Error::Internal(m(s)),
            other => Error::BackendUnavailable(m(other.to_string())),
        }
    })
}

fn tpm_config<'a>(config: &'a Config, alias: &str) -> Result<&'a TpmConfig> {
    config.tpm.get(alias).ok_or_else(|| {
        Error::Config(format!(
            "keyward.toml has no [tpm.{alias}] section (the TPM the identity is sealed to)"
        ))
    })
}

/// The public recipient (no passphrase needed): lets the CLI create keys the agent can read.
pub fn recipient(home: &Home) -> Result<age::x25519::Recipient> {
    let p = home.recipient_path();
    let text = std::fs::read_to_string(&p).ctx(format!("reading {}", p.display()))?;
    parse_recipient(&text)
}

/// Decrypt the identity. A wrong passphrase is `bad_passphrase`; the identity must match
/// `identity.pub` (a swapped public file would make new keys unreadable).
pub fn unlock(home: &Home, passphrase: &SecretBytes) -> Result<age::x25519::Identity> {
    let pass = to_secret_string(passphrase)?;
    let mut ident = age::scrypt::Identity::new(pass);
    // Accept any work factor `init` may have chosen (age's default limit would refuse > ~2s).
    ident.set_max_work_factor(22);
    let p = home.identity_path();
    let f = std::fs::File::open(&p).ctx(format!("opening {}", p.display()))?;
    let plain = decrypt_with(&ident, f, 4096).map_err(|e| {
        if e.contains("No matching keys") || e.contains("ecrypt") {
            Error::BadPassphrase("wrong passphrase for the software key identity".into())
        } else {
            Error::BadPassphrase(format!("cannot decrypt {}: {e}", p.display()))
        }
    })?;
    let text = std::str::from_utf8(plain.expose())
        .map_err(|_| Error::InvalidKeyMaterial("identity is not text".into()))?;
    let identity = age::x25519::Identity::from_str(text.trim()).map_err(|_| {
        Error::InvalidKeyMaterial("identity.age does not hold an age identity".into())
    })?;
    if identity.to_public().to_string() != recipient(home)?.to_string() {
        return Err(Error::InvalidKeyMaterial(
            "identity.pub does not match identity.age; restore identity.pub from a backup".into(),
        ));
    }
    Ok(identity)
}

fn to_secret_string(p: &SecretBytes) -> Result<SecretString> {
    let s = std::str::from_utf8(p.expose())
        .map_err(|_| Error::BadPassphrase("the passphrase is not UTF-8".into()))?;
    Ok(SecretString::from(s.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_unlock_and_wrong_passphrase() {
        let d = tempfile::tempdir().unwrap();
        let h = Home::at(&d.path().join("h"));
        h.create_dirs().unwrap();
        let pass = SecretBytes::from_slice(b"correct horse battery");
        create(&h, &pass, Some(10)).unwrap();
        let id = unlock(&h, &pass).unwrap();
        assert_eq!(
            id.to_public().to_string(),
            recipient(&h).unwrap().to_string()
        );
        let e = unlock(&h, &SecretBytes::from_slice(b"wrong passphrase!"))
            .err()
            .unwrap();
        assert_eq!(e.code(), "bad_passphrase");
        assert_eq!(
            create(&h, &pass, Some(10)).unwrap_err().code(),
            "already_exists"
        );
        assert_eq!(
            create(
                &Home::at(&d.path().join("x")),
                &SecretBytes::from_slice(b"short"),
                None
            )
            .unwrap_err()
            .code(),
            "bad_passphrase"
        );
    }
}
