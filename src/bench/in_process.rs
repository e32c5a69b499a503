//! In-process signing for the benchmark baseline: a key file loaded into the agent's own soft
//! backend inside the bench process, so the baseline is exactly the `Backend::sign` the agent runs.
//! For token keys, keyward's pkcs11 backend connected to the token from the bench process; for
//! TPM keys, keyward's tpm backend.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::backend::material::{self, SecretKeyMaterial};
use crate::backend::pkcs11::Pkcs11Backend;
use crate::backend::soft::SoftBackend;
use crate::backend::tpm::TpmBackend;
use crate::backend::{Backend, KeySpec, Signature};
use crate::error::{Error, IoContext, Result};
use crate::model::{Algorithm, KeyName, KeyRef, KeyType};
use crate::secret::read_secret;

/// Largest key file read (an RSA-4096 PEM is ~3.3 KiB).
const MAX_KEY_FILE: usize = 64 * 1024;

/// A key loaded for signing in this process.
pub struct InProcessKey {
    backend: Arc<dyn Backend>,
    key_ref: KeyRef,
    key_type: KeyType,
    fingerprint: String,
}

/// A private scratch directory, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create() -> Result<ScratchDir> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let p =
            std::env::temp_dir().join(format!("keyward-bench-{}-{nanos:09}", std::process::id()));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&p)
            .ctx(format!("creating {}", p.display()))?;
        Ok(ScratchDir(p))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

impl InProcessKey {
    /// Load a key file as `keyward key import` reads it (PEM, OpenSSH Ed25519, HMAC secret).
    pub fn load(path: &Path, key_type: KeyType) -> Result<InProcessKey> {
        let f = fs::File::open(path).ctx(format!("opening {}", path.display()))?;
        let bytes = read_secret(f, MAX_KEY_FILE)?;
        let m = material::parse(bytes, Some(key_type))
            .map_err(|e| Error::InvalidKeyMaterial(format!("{}: {e}", path.display())))?;
        InProcessKey::from_material(m)
    }

    /// Put material into a soft backend: encrypted to a throw-away identity in a scratch
    /// directory, decrypted and loaded as the agent loads keys, then the file is removed.
    pub fn from_material(m: SecretKeyMaterial) -> Result<InProcessKey> {
        let key_type = m.key_type();
        let fingerprint = match material::public_spki(&m)? {
            Some(spki) => crate::pubkey::fingerprint(&spki),
            None => material::hmac_fingerprint(m.expose()),
        };
        let dir = ScratchDir::create()?;
        let id = age::x25519::Identity::generate();
        let backend = SoftBackend::new(&dir.0, id.to_public(), Some(id));
        let spec = KeySpec {
            name: KeyName::new("bench")?,
            version: 1,
            key_type,
        };
        let new = backend.import(&spec, m)?;
        backend.load(&new.key_ref, key_type)?;
        drop(dir);
        Ok(InProcessKey {
            backend: Arc::new(backend),
            key_ref: new.key_ref,
            key_type,
            fingerprint,
        })
    }

    /// A key on a token, signed through keyward's pkcs11 backend in this process (the same
    /// `Backend::sign` the agent's workers call; `fingerprint` is what the agent reports).
    pub fn on_token(
        backend: Arc<Pkcs11Backend>,
        key_ref: KeyRef,
        key_type: KeyType,
        fingerprint: String,
    ) -> Result<InProcessKey> {
        backend.probe(&key_ref, key_type)?;
        Ok(InProcessKey {
            backend,
            key_ref,
            key_type,
            fingerprint,
        })
    }

    /// A key on a TPM, signed through keyward's tpm backend in this process (its own worker
    /// thread and context, as in the agent; `fingerprint` is what the agent reports).
    pub fn on_tpm(
        backend: Arc<TpmBackend>,
        key_ref: KeyRef,
        key_type: KeyType,
        fingerprint: String,
    ) -> Result<InProcessKey> {
        backend.public_info(&key_ref)?;
        Ok(InProcessKey {
            backend,
            key_ref,
            key_type,
            fingerprint,
        })
    }

    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// The fingerprint keyward records for this key (`SHA256:...` or `HMAC:...`).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn sign(&self, alg: Algorithm, msg: &[u8]) -> Result<Signature> {
        self.backend.sign(&self.key_ref, alg, msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretBytes;
    use std::io::Write;

    #[test]
    fn signs_like_the_agent() {
        let m = crate::backend::soft::generate_material(KeyType::Ed25519).unwrap();
        let spki = material::public_spki(&m).unwrap().unwrap();
        let k = InProcessKey::from_material(m).unwrap();
        assert_eq!(k.fingerprint(), crate::pubkey::fingerprint(&spki));
        let sig = k.sign(Algorithm::Ed25519, b"hello").unwrap();
        let raw = crate::pubkey::raw_public_key(&spki).unwrap();
        aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ED25519, raw)
            .verify(b"hello", &sig.bytes)
            .unwrap();
        assert!(k.sign(Algorithm::HmacSha256, b"x").is_err());
    }

    #[test]
    fn the_scratch_dir_is_private_and_removed() {
        use std::os::unix::fs::PermissionsExt;
        let d = ScratchDir::create().unwrap();
        let p = d.0.clone();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o700
        );
        fs::write(p.join("f"), b"x").unwrap();
        drop(d);
        assert!(!p.exists());
    }

    #[test]
    fn loads_an_hmac_secret_file_and_matches_a_plain_hmac() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret");
        let mut f = fs::File::create(&p).unwrap();
        f.write_all(b"NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j\n")
            .unwrap();
        drop(f);
        let k = InProcessKey::load(&p, KeyType::HmacSha256).unwrap();
        let tag = k.sign(Algorithm::HmacSha256, b"msg").unwrap();
        let key = aws_lc_rs::hmac::Key::new(
            aws_lc_rs::hmac::HMAC_SHA256,
            b"NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j",
        );
        assert_eq!(tag.bytes, aws_lc_rs::hmac::sign(&key, b"msg").as_ref());
        let same = material::hmac_fingerprint(
            SecretBytes::from_slice(
                b"NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j",
            )
            .expose(),
        );
        assert_eq!(k.fingerprint(), same);
        assert_eq!(
            InProcessKey::load(&dir.path().join("missing"), KeyType::HmacSha256)
                .err()
                .map(|e| e.code()),
            Some("io")
        );
    }
}
