//! The `Backend` trait every key store implements (soft now; PKCS#11, TPM, PIV later).
//! Methods default to `unsupported`, PARSEC-style, so a backend implements only what it can.

pub mod material;
pub mod pkcs11;
pub mod soft;
pub mod tpm;
pub mod tpm_seal;

use crate::error::{Error, Result};
use crate::model::{Algorithm, BackendKind, KeyName, KeyRef, KeyType};
pub use material::SecretKeyMaterial;

/// What to create: the key's name, version and type.
#[derive(Clone, Debug)]
pub struct KeySpec {
    pub name: KeyName,
    pub version: u32,
    pub key_type: KeyType,
}

/// Public information about a key version, recorded in its metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicInfo {
    /// SubjectPublicKeyInfo DER; `None` for symmetric (HMAC) keys.
    pub spki_der: Option<Vec<u8>>,
    /// `SHA256:<base64>` of the SPKI, or for HMAC a one-way tag of the secret.
    pub fingerprint: String,
}

/// A newly created or imported key version.
#[derive(Clone, Debug)]
pub struct NewKey {
    pub key_ref: KeyRef,
    pub public: PublicInfo,
}

/// A signature in its canonical form; profiles and the `sign` op encode it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    /// ECDSA: raw r‖s (fixed width); RSA: the signature bytes; Ed25519: 64 bytes; HMAC: the tag.
    pub bytes: Vec<u8>,
    /// secp256k1 only: recovery id 0 or 1 (of the low-s signature).
    pub recovery_id: Option<u8>,
    /// secp256k1 only: the 32-byte digest that was signed (reported to callers).
    pub digest: Option<[u8; 32]>,
}

impl Signature {
    /// A signature with nothing beyond its bytes (every scheme but secp256k1).
    pub fn plain(bytes: Vec<u8>) -> Signature {
        Signature {
            bytes,
            recovery_id: None,
            digest: None,
        }
    }
}

/// The 32-byte digest a secp256k1 scheme signs: keccak256 or SHA-256 of the message, or the
/// message itself when the caller hashed it. One definition for every backend.
pub fn secp256k1_digest(alg: Algorithm, msg: &[u8]) -> Result<[u8; 32]> {
    use sha3::Digest;
    match alg {
        Algorithm::EcdsaSecp256k1Keccak256 => Ok(sha3::Keccak256::digest(msg).into()),
        Algorithm::EcdsaSecp256k1Sha256 => Ok(sha2_256(msg)),
        Algorithm::EcdsaSecp256k1Prehashed => msg.try_into().map_err(|_| {
            Error::BadRequest(format!(
                "{alg} needs a 32-byte digest, got {} bytes",
                msg.len()
            ))
        }),
        other => Err(Error::BadRequest(format!(
            "scheme {other} is not a secp256k1 scheme"
        ))),
    }
}

fn sha2_256(msg: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, msg).as_ref());
    out
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    Up,
    Down(String),
}

pub trait Backend: Send + Sync {
    fn kind(&self) -> BackendKind;

    /// Cheap liveness check; drives reconnects and metrics.
    fn health(&self) -> Health {
        Health::Up
    }

    fn generate(&self, spec: &KeySpec) -> Result<NewKey> {
        Err(unsupported(
            self.kind(),
            &format!("generating {}", spec.key_type),
        ))
    }

    fn import(&self, spec: &KeySpec, secret: SecretKeyMaterial) -> Result<NewKey> {
        let _ = secret;
        Err(unsupported(
            self.kind(),
            &format!("importing {}", spec.key_type),
        ))
    }

    fn sign(&self, key: &KeyRef, alg: Algorithm, msg: &[u8]) -> Result<Signature> {
        let _ = (key, msg);
        Err(unsupported(self.kind(), &format!("signing with {alg}")))
    }

    /// Longest a request may wait for this backend before `backend_unavailable` (devices).
    fn timeout(&self) -> Option<std::time::Duration> {
        None
    }

    /// Whether `sign` for this algorithm finishes in microseconds (run inline rather than
    /// queued to a worker thread).
    fn is_fast(&self, alg: Algorithm) -> bool {
        let _ = alg;
        false
    }

    fn delete(&self, key: &KeyRef) -> Result<()> {
        let _ = key;
        Err(unsupported(self.kind(), "deleting keys"))
    }
}

/// Imported material must be of the type the key is declared with.
pub fn check_material(spec: &KeySpec, secret: &SecretKeyMaterial) -> Result<()> {
    if secret.key_type() == spec.key_type {
        Ok(())
    } else {
        Err(Error::InvalidKeyMaterial(format!(
            "the key is {}, not {}",
            secret.key_type(),
            spec.key_type
        )))
    }
}

pub fn unsupported(kind: BackendKind, what: &str) -> Error {
    Error::Unsupported(format!("backend {kind} does not support {what}"))
}
