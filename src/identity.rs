//! The home's age identity: an X25519 key that every soft key file is encrypted to, stored
//! passphrase-encrypted (age scrypt) in `identity.age`, with its public half in `identity.pub`.

use std::str::FromStr;

use age::secrecy::{ExposeSecret, SecretString};

use crate::backend::soft::{decrypt_with, encrypt_to_passphrase, parse_recipient};
use crate::error::{Error, IoContext, Result};
use crate::home::{self, Home};
use crate::secret::SecretBytes;

/// Shortest passphrase `init` accepts.
pub const MIN_PASSPHRASE: usize = 8;

/// Create the identity in an empty home. `work_factor` is scrypt's log2(N) (None: age's
/// default, tuned to about a second).
pub fn create(home: &Home, passphrase: &SecretBytes, work_factor: Option<u8>) -> Result<()> {
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
    // identity.age is written last: it is the commit point (`is_initialized` needs both),
    // so a lone identity.pub is the leftover of an interrupted init and is overwritten.
    home::atomic_write(
        &home.recipient_path(),
        format!("{}\n", identity.to_public()).as_bytes(),
    )?;
    home::atomic_create(&home.identity_path(), &ciphertext)
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
