//! Software backend: keys encrypted with `age` to the home's X25519 identity, one file per
//! key version, decrypted only inside the agent into zeroized memory.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    EcdsaKeyPair, Ed25519KeyPair, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING,
    ECDSA_P384_SHA384_FIXED_SIGNING, RSA_PKCS1_SHA256, RSA_PKCS1_SHA512, RSA_PSS_SHA256,
    RSA_PSS_SHA512,
};

use super::material::{self, SecretKeyMaterial};
use super::{Backend, KeySpec, NewKey, PublicInfo, Signature};
use crate::error::{Error, IoContext, Result};
use crate::home;
use crate::model::{Algorithm, BackendKind, KeyRef, KeyType};
use crate::secret::{read_secret, SecretBytes};

/// Largest decrypted key file accepted (an RSA-4096 PEM is ~3.3 KiB).
const MAX_KEY_FILE: usize = 64 * 1024;

/// A key ready to sign. Holds parsed key objects, whose memory aws-lc and k256 wipe on drop.
enum SoftKey {
    Ed25519(Ed25519KeyPair),
    Ecdsa(EcdsaKeyPair),
    Rsa(RsaKeyPair),
    Secp256k1(k256::ecdsa::SigningKey),
    Hmac(Box<HmacKeys>),
}

/// Both digests' keys for one HMAC secret (an exchange issues one secret; the scheme picks).
struct HmacKeys {
    sha256: aws_lc_rs::hmac::Key,
    sha512: aws_lc_rs::hmac::Key,
}

impl SoftKey {
    fn from_material(m: &SecretKeyMaterial) -> Result<SoftKey> {
        let der = m.expose();
        let bad =
            |e: &dyn std::fmt::Display| Error::InvalidKeyMaterial(format!("{}: {e}", m.key_type()));
        Ok(match m.key_type() {
            KeyType::Ed25519 => {
                SoftKey::Ed25519(Ed25519KeyPair::from_pkcs8(der).map_err(|e| bad(&e))?)
            }
            KeyType::P256 => SoftKey::Ecdsa(
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
                    .map_err(|e| bad(&e))?,
            ),
            KeyType::P384 => SoftKey::Ecdsa(
                EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, der)
                    .map_err(|e| bad(&e))?,
            ),
            KeyType::Secp256k1 => {
                use k256::pkcs8::DecodePrivateKey;
                SoftKey::Secp256k1(
                    k256::ecdsa::SigningKey::from_pkcs8_der(der).map_err(|e| bad(&e))?,
                )
            }
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => {
                SoftKey::Rsa(RsaKeyPair::from_pkcs8(der).map_err(|e| bad(&e))?)
            }
            KeyType::HmacSha256 | KeyType::HmacSha512 => SoftKey::Hmac(Box::new(HmacKeys {
                sha256: aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, der),
                sha512: aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA512, der),
            })),
        })
    }

    fn sign(&self, alg: Algorithm, msg: &[u8]) -> Result<Signature> {
        let rng = SystemRandom::new();
        let plain = Signature::plain;
        let failed = || Error::Internal(format!("{alg} signing failed"));
        match (self, alg) {
            (SoftKey::Ed25519(kp), Algorithm::Ed25519) => Ok(plain(kp.sign(msg).as_ref().to_vec())),
            (SoftKey::Ecdsa(kp), Algorithm::EcdsaP256Sha256 | Algorithm::EcdsaP384Sha384) => {
                let sig = kp.sign(&rng, msg).map_err(|_| failed())?;
                Ok(plain(sig.as_ref().to_vec()))
            }
            (SoftKey::Rsa(kp), _) => {
                let padding: &'static dyn aws_lc_rs::signature::RsaEncoding = match alg {
                    Algorithm::RsaPkcs1Sha256 => &RSA_PKCS1_SHA256,
                    Algorithm::RsaPkcs1Sha512 => &RSA_PKCS1_SHA512,
                    Algorithm::RsaPssSha256 => &RSA_PSS_SHA256,
                    Algorithm::RsaPssSha512 => &RSA_PSS_SHA512,
                    _ => return Err(mismatch(alg)),
                };
                let mut out = vec![0u8; kp.public_modulus_len()];
                kp.sign(padding, &rng, msg, &mut out)
                    .map_err(|_| failed())?;
                Ok(plain(out))
            }
            (SoftKey::Secp256k1(sk), _) => {
                if !KeyType::Secp256k1.supports(alg) {
                    return Err(mismatch(alg));
                }
                secp256k1_sign(sk, &super::secp256k1_digest(alg, msg)?)
            }
            (SoftKey::Hmac(keys), Algorithm::HmacSha256 | Algorithm::HmacSha512) => {
                let key = if alg == Algorithm::HmacSha256 {
                    &keys.sha256
                } else {
                    &keys.sha512
                };
                Ok(plain(aws_lc_rs::hmac::sign(key, msg).as_ref().to_vec()))
            }
            _ => Err(mismatch(alg)),
        }
    }
}

/// A key held in memory only, for the offline `keyward profile sign` (no home, no agent).
pub struct MemoryKey {
    key: SoftKey,
    key_type: KeyType,
}

impl MemoryKey {
    pub fn from_material(m: &SecretKeyMaterial) -> Result<MemoryKey> {
        Ok(MemoryKey {
            key: SoftKey::from_material(m)?,
            key_type: m.key_type(),
        })
    }

    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    pub fn sign(&self, alg: Algorithm, msg: &[u8]) -> Result<Signature> {
        self.key.sign(alg, msg)
    }
}

fn mismatch(alg: Algorithm) -> Error {
    Error::BadRequest(format!("scheme {alg} does not fit this key's type"))
}

/// Deterministic (RFC 6979) secp256k1 signature, normalised to low-s, with its recovery id.
pub fn secp256k1_sign(sk: &k256::ecdsa::SigningKey, digest: &[u8; 32]) -> Result<Signature> {
    let (sig, recid) = sk
        .sign_prehash_recoverable(digest)
        .map_err(|_| Error::Internal("secp256k1 signing failed".into()))?;
    let (sig, recid) = match sig.normalize_s() {
        Some(low) => (low, recid.to_byte() ^ 1),
        None => (sig, recid.to_byte()),
    };
    Ok(Signature {
        bytes: sig.to_bytes().to_vec(),
        recovery_id: Some(recid),
        digest: Some(*digest),
    })
}

/// The software backend. Constructed with the identity inside the agent (can sign), or with
/// only the public recipient in the CLI (can create keys, cannot read them).
pub struct SoftBackend {
    keys_dir: PathBuf,
    recipient: age::x25519::Recipient,
    identity: Option<age::x25519::Identity>,
    loaded: RwLock<HashMap<String, Arc<SoftKey>>>,
}

impl SoftBackend {
    pub fn new(
        keys_dir: &Path,
        recipient: age::x25519::Recipient,
        identity: Option<age::x25519::Identity>,
    ) -> SoftBackend {
        SoftBackend {
            keys_dir: keys_dir.to_path_buf(),
            recipient,
            identity,
            loaded: RwLock::new(HashMap::new()),
        }
    }

    fn path_of(&self, key: &KeyRef) -> Result<PathBuf> {
        // Locators are `<name>.<version>.age`, produced by keyward; refuse anything that could
        // leave the keys directory.
        let l = &key.locator;
        if key.backend != BackendKind::Soft
            || l.is_empty()
            || l.starts_with('.')
            || l.contains('/')
            || !l.ends_with(".age")
        {
            return Err(Error::Internal(format!("invalid soft key locator {l:?}")));
        }
        Ok(self.keys_dir.join(l))
    }

    /// Encrypt and store material as a new key version; the file appears atomically.
    fn store(&self, spec: &KeySpec, m: &SecretKeyMaterial) -> Result<NewKey> {
        let spki = material::public_spki(m)?;
        let fingerprint = match &spki {
            Some(d) => crate::pubkey::fingerprint(d),
            None => material::hmac_fingerprint(m.expose()),
        };
        let key_ref = KeyRef {
            backend: BackendKind::Soft,
            locator: format!("{}.{}.age", spec.name, spec.version),
        };
        let plaintext = m.to_storage()?;
        let ciphertext = encrypt_to(&self.recipient, plaintext.expose())?;
        home::atomic_create(&self.path_of(&key_ref)?, &ciphertext)?;
        Ok(NewKey {
            key_ref,
            public: PublicInfo {
                spki_der: spki,
                fingerprint,
            },
        })
    }

    /// Decrypt a key file into signing form and keep it for `sign`.
    pub fn load(&self, key: &KeyRef, key_type: KeyType) -> Result<()> {
        let m = self.decrypt(key, key_type)?;
        let k = SoftKey::from_material(&m)?;
        self.loaded
            .write()
            .map_err(|_| Error::Internal("key cache poisoned".into()))?
            .insert(key.locator.clone(), Arc::new(k));
        Ok(())
    }

    /// Forget every loaded key not in `keep` (after a reload removed keys).
    pub fn retain(&self, keep: &[KeyRef]) {
        if let Ok(mut map) = self.loaded.write() {
            map.retain(|loc, _| keep.iter().any(|k| &k.locator == loc));
        }
    }

    /// Decrypt a key file (needs the identity). Used by `load` and by verified imports.
    pub fn decrypt(&self, key: &KeyRef, key_type: KeyType) -> Result<SecretKeyMaterial> {
        let identity = self.identity.as_ref().ok_or_else(|| {
            Error::Locked("the software key identity is not unlocked in this process".into())
        })?;
        let path = self.path_of(key)?;
        let f = std::fs::File::open(&path).ctx(format!("opening {}", path.display()))?;
        let plaintext = decrypt_with(identity, f, MAX_KEY_FILE)
            .map_err(|e| Error::InvalidKeyMaterial(format!("{}: {e}", path.display())))?;
        SecretKeyMaterial::from_storage(key_type, plaintext)
    }

    fn loaded(&self, key: &KeyRef) -> Result<Arc<SoftKey>> {
        self.loaded
            .read()
            .map_err(|_| Error::Internal("key cache poisoned".into()))?
            .get(&key.locator)
            .cloned()
            .ok_or_else(|| Error::Internal(format!("key version {} is not loaded", key.locator)))
    }
}

impl Backend for SoftBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Soft
    }

    fn generate(&self, spec: &KeySpec) -> Result<NewKey> {
        let m = generate_material(spec.key_type)?;
        self.store(spec, &m)
    }

    fn import(&self, spec: &KeySpec, secret: SecretKeyMaterial) -> Result<NewKey> {
        super::check_material(spec, &secret)?;
        self.store(spec, &secret)
    }

    fn sign(&self, key: &KeyRef, alg: Algorithm, msg: &[u8]) -> Result<Signature> {
        self.loaded(key)?.sign(alg, msg)
    }

    fn is_fast(&self, alg: Algorithm) -> bool {
        !matches!(
            alg,
            Algorithm::RsaPkcs1Sha256
                | Algorithm::RsaPkcs1Sha512
                | Algorithm::RsaPssSha256
                | Algorithm::RsaPssSha512
        )
    }

    fn delete(&self, key: &KeyRef) -> Result<()> {
        let path = self.path_of(key)?;
        if let Ok(mut map) = self.loaded.write() {
            map.remove(&key.locator);
        }
        home::remove_durably(&path)
    }
}

/// Fresh key material of `t` from the OS CSPRNG.
pub fn generate_material(t: KeyType) -> Result<SecretKeyMaterial> {
    let fail = |what: &str| Error::Internal(format!("{what} key generation failed"));
    let der: SecretBytes = match t {
        KeyType::Ed25519 => {
            let kp = Ed25519KeyPair::generate().map_err(|_| fail("Ed25519"))?;
            SecretBytes::from_slice(kp.to_pkcs8v1().map_err(|_| fail("Ed25519"))?.as_ref())
        }
        KeyType::P256 | KeyType::P384 => {
            let alg = if t == KeyType::P256 {
                &ECDSA_P256_SHA256_FIXED_SIGNING
            } else {
                &ECDSA_P384_SHA384_FIXED_SIGNING
            };
            let kp = EcdsaKeyPair::generate(alg).map_err(|_| fail("ECDSA"))?;
            SecretBytes::from_slice(kp.to_pkcs8v1().map_err(|_| fail("ECDSA"))?.as_ref())
        }
        KeyType::Secp256k1 => {
            use k256::pkcs8::EncodePrivateKey;
            let mut seed = zeroize::Zeroizing::new([0u8; 32]);
            loop {
                aws_lc_rs::rand::fill(&mut seed[..]).map_err(|_| fail("secp256k1"))?;
                if let Ok(sk) = k256::SecretKey::from_slice(&seed[..]) {
                    let doc = sk.to_pkcs8_der().map_err(|_| fail("secp256k1"))?;
                    break SecretBytes::from_slice(doc.as_bytes());
                }
            }
        }
        KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => {
            let size = match t {
                KeyType::Rsa2048 => aws_lc_rs::rsa::KeySize::Rsa2048,
                KeyType::Rsa3072 => aws_lc_rs::rsa::KeySize::Rsa3072,
                _ => aws_lc_rs::rsa::KeySize::Rsa4096,
            };
            let kp = RsaKeyPair::generate(size).map_err(|_| fail("RSA"))?;
            let der: Pkcs8V1Der = kp.as_der().map_err(|_| fail("RSA"))?;
            SecretBytes::from_slice(der.as_ref())
        }
        KeyType::HmacSha256 | KeyType::HmacSha512 => {
            let len = if t == KeyType::HmacSha256 { 32 } else { 64 };
            let mut v = vec![0u8; len];
            aws_lc_rs::rand::fill(&mut v).map_err(|_| fail("HMAC"))?;
            SecretBytes::new(v)
        }
    };
    Ok(SecretKeyMaterial::new(t, der))
}

/// age-encrypt `plaintext` to one X25519 recipient (binary age format, readable by `age -d`).
pub fn encrypt_to(recipient: &age::x25519::Recipient, plaintext: &[u8]) -> Result<Vec<u8>> {
    encrypt(recipient, plaintext)
}

/// age-encrypt `plaintext` with a passphrase (scrypt); `work_factor` is log2(N).
pub fn encrypt_to_passphrase(
    pass: &age::secrecy::SecretString,
    plaintext: &[u8],
    work_factor: Option<u8>,
) -> Result<Vec<u8>> {
    let mut r = age::scrypt::Recipient::new(pass.clone());
    if let Some(w) = work_factor {
        r.set_work_factor(w);
    }
    encrypt(&r, plaintext)
}

fn encrypt(recipient: &dyn age::Recipient, plaintext: &[u8]) -> Result<Vec<u8>> {
    let age_err = |e: &dyn std::fmt::Display| Error::Internal(format!("age: {e}"));
    let enc =
        age::Encryptor::with_recipients(std::iter::once(recipient)).map_err(|e| age_err(&e))?;
    let mut out = Vec::with_capacity(plaintext.len() + 256);
    let mut w = enc.wrap_output(&mut out).map_err(|e| age_err(&e))?;
    w.write_all(plaintext)
        .and_then(|_| w.finish().map(|_| ()))
        .map_err(|e| age_err(&e))?;
    Ok(out)
}

/// Decrypt an age file with one identity into a secret buffer.
pub fn decrypt_with(
    identity: &dyn age::Identity,
    input: impl Read,
    limit: usize,
) -> std::result::Result<SecretBytes, String> {
    let dec = age::Decryptor::new(std::io::BufReader::new(input)).map_err(|e| e.to_string())?;
    let r = dec
        .decrypt(std::iter::once(identity))
        .map_err(|e| e.to_string())?;
    read_secret(r, limit).map_err(|e| e.to_string())
}

/// Parse the public recipient stored in `identity.pub`.
pub fn parse_recipient(text: &str) -> Result<age::x25519::Recipient> {
    age::x25519::Recipient::from_str(text.trim())
        .map_err(|e| Error::NotInitialized(format!("identity.pub is not an age recipient: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::KeyName;
    use sha3::Digest;

    fn backend(dir: &Path) -> SoftBackend {
        let id = age::x25519::Identity::generate();
        SoftBackend::new(dir, id.to_public(), Some(id))
    }

    #[test]
    fn generated_keys_round_trip_through_age_and_sign() {
        let d = tempfile::tempdir().unwrap();
        let b = backend(d.path());
        for (i, t) in [
            KeyType::Ed25519,
            KeyType::P256,
            KeyType::P384,
            KeyType::Secp256k1,
            KeyType::HmacSha256,
        ]
        .into_iter()
        .enumerate()
        {
            let spec = KeySpec {
                name: KeyName::new(&format!("k{i}")).unwrap(),
                version: 1,
                key_type: t,
            };
            let nk = b.generate(&spec).unwrap();
            assert_eq!(nk.public.spki_der.is_none(), t.is_hmac());
            b.load(&nk.key_ref, t).unwrap();
            let sig = b
                .sign(&nk.key_ref, t.default_algorithm(), b"hello")
                .unwrap();
            assert!(!sig.bytes.is_empty());
            // A second generate of the same version must not overwrite the file.
            assert_eq!(b.generate(&spec).unwrap_err().code(), "already_exists");
        }
    }

    #[test]
    fn secp256k1_signatures_are_low_s_and_recoverable() {
        let sk = k256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap();
        let half_n =
            hex::decode("7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0")
                .unwrap();
        for i in 0..50u8 {
            let digest: [u8; 32] = sha3::Keccak256::digest([i]).into();
            let sig = secp256k1_sign(&sk, &digest).unwrap();
            assert!(sig.bytes[32..] <= half_n[..], "high s");
            let s = k256::ecdsa::Signature::from_slice(&sig.bytes).unwrap();
            let rid = k256::ecdsa::RecoveryId::from_byte(sig.recovery_id.unwrap()).unwrap();
            let vk = k256::ecdsa::VerifyingKey::recover_from_prehash(&digest, &s, rid).unwrap();
            assert_eq!(&vk, sk.verifying_key());
        }
    }
}
