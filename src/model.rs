//! Validated domain types shared by every layer: key names, key types, algorithms, identities.
//! Constructing one of these is the validation; code that holds one never re-checks it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// A key name: `[a-z0-9][a-z0-9._-]{0,63}`. Safe to use as a file name component
/// (no `/`, no leading dot, so never `.` or `..`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyName(String);

impl KeyName {
    pub fn new(s: &str) -> Result<KeyName> {
        let bytes = s.as_bytes();
        let ok = !bytes.is_empty()
            && bytes.len() <= 64
            && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
            && bytes.iter().all(|&b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_' || b == b'-'
            });
        if ok {
            Ok(KeyName(s.to_owned()))
        } else {
            Err(Error::BadRequest(format!(
                "invalid key name {:?}: use 1-64 characters [a-z0-9._-], starting with a letter or digit",
                truncate_for_message(s)
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Names in error messages are attacker-controlled: keep them short.
fn truncate_for_message(s: &str) -> String {
    s.chars().take(80).collect()
}

impl fmt::Display for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl fmt::Debug for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyName({})", self.0)
    }
}

impl FromStr for KeyName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        KeyName::new(s)
    }
}

impl Serialize for KeyName {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for KeyName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        KeyName::new(&s).map_err(serde::de::Error::custom)
    }
}

/// The kind of key material, independent of where it lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyType {
    #[serde(rename = "ed25519")]
    Ed25519,
    #[serde(rename = "p256")]
    P256,
    #[serde(rename = "p384")]
    P384,
    #[serde(rename = "secp256k1")]
    Secp256k1,
    #[serde(rename = "rsa-2048")]
    Rsa2048,
    #[serde(rename = "rsa-3072")]
    Rsa3072,
    #[serde(rename = "rsa-4096")]
    Rsa4096,
    #[serde(rename = "hmac-sha256")]
    HmacSha256,
    #[serde(rename = "hmac-sha512")]
    HmacSha512,
}

impl KeyType {
    pub const ALL: [KeyType; 9] = [
        KeyType::Ed25519,
        KeyType::P256,
        KeyType::P384,
        KeyType::Secp256k1,
        KeyType::Rsa2048,
        KeyType::Rsa3072,
        KeyType::Rsa4096,
        KeyType::HmacSha256,
        KeyType::HmacSha512,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::Ed25519 => "ed25519",
            KeyType::P256 => "p256",
            KeyType::P384 => "p384",
            KeyType::Secp256k1 => "secp256k1",
            KeyType::Rsa2048 => "rsa-2048",
            KeyType::Rsa3072 => "rsa-3072",
            KeyType::Rsa4096 => "rsa-4096",
            KeyType::HmacSha256 => "hmac-sha256",
            KeyType::HmacSha512 => "hmac-sha512",
        }
    }

    pub fn is_rsa(self) -> bool {
        matches!(self, KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096)
    }

    pub fn is_hmac(self) -> bool {
        matches!(self, KeyType::HmacSha256 | KeyType::HmacSha512)
    }

    /// RSA key type for a modulus of `bits` bits, if keyward supports that size.
    pub fn rsa_for_bits(bits: usize) -> Option<KeyType> {
        match bits {
            2048 => Some(KeyType::Rsa2048),
            3072 => Some(KeyType::Rsa3072),
            4096 => Some(KeyType::Rsa4096),
            _ => None,
        }
    }

    /// The algorithm used when a `sign` request names none.
    pub fn default_algorithm(self) -> Algorithm {
        match self {
            KeyType::Ed25519 => Algorithm::Ed25519,
            KeyType::P256 => Algorithm::EcdsaP256Sha256,
            KeyType::P384 => Algorithm::EcdsaP384Sha384,
            KeyType::Secp256k1 => Algorithm::EcdsaSecp256k1Keccak256,
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => Algorithm::RsaPkcs1Sha256,
            KeyType::HmacSha256 => Algorithm::HmacSha256,
            KeyType::HmacSha512 => Algorithm::HmacSha512,
        }
    }

    /// Whether `alg` is a valid signing scheme for keys of this type.
    pub fn supports(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            KeyType::Ed25519 => alg == Ed25519,
            KeyType::P256 => alg == EcdsaP256Sha256,
            KeyType::P384 => alg == EcdsaP384Sha384,
            KeyType::Secp256k1 => matches!(
                alg,
                EcdsaSecp256k1Keccak256 | EcdsaSecp256k1Sha256 | EcdsaSecp256k1Prehashed
            ),
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => {
                matches!(
                    alg,
                    RsaPkcs1Sha256 | RsaPkcs1Sha512 | RsaPssSha256 | RsaPssSha512
                )
            }
            // An HMAC key may be used with either digest: exchanges issue one secret.
            KeyType::HmacSha256 | KeyType::HmacSha512 => matches!(alg, HmacSha256 | HmacSha512),
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        KeyType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                Error::BadRequest(format!(
                    "unknown key type {:?}; one of: {}",
                    truncate_for_message(s),
                    KeyType::ALL.map(|t| t.as_str()).join(", ")
                ))
            })
    }
}

/// A signing scheme: key family, padding and digest together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Ed25519,
    EcdsaP256Sha256,
    EcdsaP384Sha384,
    /// secp256k1 over keccak256(msg), recoverable, low-s (Ethereum).
    EcdsaSecp256k1Keccak256,
    EcdsaSecp256k1Sha256,
    /// The message is already the 32-byte digest.
    EcdsaSecp256k1Prehashed,
    RsaPkcs1Sha256,
    RsaPkcs1Sha512,
    /// PSS with MGF1 of the same hash and salt length = digest length (what Kalshi requires).
    RsaPssSha256,
    RsaPssSha512,
    HmacSha256,
    HmacSha512,
}

impl Algorithm {
    pub const ALL: [Algorithm; 12] = [
        Algorithm::Ed25519,
        Algorithm::EcdsaP256Sha256,
        Algorithm::EcdsaP384Sha384,
        Algorithm::EcdsaSecp256k1Keccak256,
        Algorithm::EcdsaSecp256k1Sha256,
        Algorithm::EcdsaSecp256k1Prehashed,
        Algorithm::RsaPkcs1Sha256,
        Algorithm::RsaPkcs1Sha512,
        Algorithm::RsaPssSha256,
        Algorithm::RsaPssSha512,
        Algorithm::HmacSha256,
        Algorithm::HmacSha512,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Ed25519 => "ed25519",
            Algorithm::EcdsaP256Sha256 => "ecdsa-p256-sha256",
            Algorithm::EcdsaP384Sha384 => "ecdsa-p384-sha384",
            Algorithm::EcdsaSecp256k1Keccak256 => "ecdsa-secp256k1-keccak256",
            Algorithm::EcdsaSecp256k1Sha256 => "ecdsa-secp256k1-sha256",
            Algorithm::EcdsaSecp256k1Prehashed => "ecdsa-secp256k1-prehashed",
            Algorithm::RsaPkcs1Sha256 => "rsa-pkcs1-sha256",
            Algorithm::RsaPkcs1Sha512 => "rsa-pkcs1-sha512",
            Algorithm::RsaPssSha256 => "rsa-pss-sha256",
            Algorithm::RsaPssSha512 => "rsa-pss-sha512",
            Algorithm::HmacSha256 => "hmac-sha256",
            Algorithm::HmacSha512 => "hmac-sha512",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for Algorithm {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| {
                Error::BadRequest(format!(
                    "unknown scheme {:?}; one of: {}",
                    truncate_for_message(s),
                    Algorithm::ALL.map(|a| a.as_str()).join(", ")
                ))
            })
    }
}

/// Production or demo/testnet: a demo client can never use a prod key (enforced by policy).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Env {
    #[default]
    Prod,
    Demo,
}

impl FromStr for Env {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "prod" => Ok(Env::Prod),
            "demo" => Ok(Env::Demo),
            _ => Err(Error::BadRequest(format!(
                "unknown env {:?}; prod or demo",
                truncate_for_message(s)
            ))),
        }
    }
}

/// Which kind of backend holds a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Soft,
    Pkcs11,
    Tpm,
    Yubikey,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Soft => "soft",
            BackendKind::Pkcs11 => "pkcs11",
            BackendKind::Tpm => "tpm",
            BackendKind::Yubikey => "yubikey",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Where one version of a key lives inside its backend (soft: the `.age` file name).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyRef {
    pub backend: BackendKind,
    /// Backend-specific locator: file name, PKCS#11 label/id, TPM blob name, PIV slot.
    pub locator: String,
}

/// Who is on the other end of a connection, from the kernel (SO_PEERCRED), never from the client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClientIdentity {
    /// Configured client name, or `uid:<n>` until policy names it.
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    pub exe: Option<String>,
    /// SHA-256 of the token this connection presented in `hello` (set at most once; shared
    /// by the connection's tasks).
    #[serde(skip)]
    pub token_sha256: std::sync::Arc<std::sync::OnceLock<[u8; 32]>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_are_validated() {
        for ok in ["a", "binance-main", "k.1_2-3", "0abc", &"a".repeat(64)] {
            assert!(KeyName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "A",
            "-a",
            ".a",
            "_a",
            "a b",
            "ä",
            &"a".repeat(65),
            "a\0",
        ] {
            let e = KeyName::new(bad).unwrap_err();
            assert_eq!(e.code(), "bad_request", "{bad:?}");
        }
    }

    #[test]
    fn key_types_and_algorithms_parse_their_own_names() {
        for t in KeyType::ALL {
            assert_eq!(t.as_str().parse::<KeyType>().unwrap(), t);
            assert!(t.supports(t.default_algorithm()));
        }
        for a in Algorithm::ALL {
            assert_eq!(a.as_str().parse::<Algorithm>().unwrap(), a);
        }
        assert!(!KeyType::Ed25519.supports(Algorithm::RsaPssSha256));
        assert!("rsa-1024".parse::<KeyType>().is_err());
    }
}
