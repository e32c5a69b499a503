//! Parsing key material as exchanges and tools issue it (PEM PKCS#8/PKCS#1/SEC1, OpenSSH
//! Ed25519, 0x-hex secp256k1, HMAC secret strings) into one canonical, zeroized form.

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
use aws_lc_rs::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING,
    ECDSA_P384_SHA384_FIXED_SIGNING,
};
use pkcs8::der::Decode;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::model::KeyType;
use crate::secret::SecretBytes;

/// Longest HMAC secret accepted (exchange secrets are tens of bytes).
pub const MAX_HMAC_SECRET: usize = 1024;

const OID_RSA: &str = "1.2.840.113549.1.1.1";
const OID_EC: &str = "1.2.840.10045.2.1";
const OID_ED25519: &str = "1.3.101.112";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_SECP256K1: &str = "1.3.132.0.10";

/// Key material in canonical form: PKCS#8 v1 DER for asymmetric keys, the secret bytes as
/// issued for HMAC keys. No Debug: it must never be formatted.
pub struct SecretKeyMaterial {
    key_type: KeyType,
    bytes: SecretBytes,
}

impl SecretKeyMaterial {
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// PKCS#8 DER (asymmetric) or the HMAC secret.
    pub fn expose(&self) -> &[u8] {
        self.bytes.expose()
    }

    /// HMAC key bytes already decoded by a profile's rule (Kraken base64, Polymarket base64url).
    pub fn hmac(key_type: KeyType, bytes: SecretBytes) -> Result<SecretKeyMaterial> {
        if !key_type.is_hmac() || bytes.expose().is_empty() {
            return Err(bad("an HMAC key needs an HMAC type and a non-empty secret"));
        }
        Ok(SecretKeyMaterial::new(key_type, bytes))
    }

    pub(crate) fn new(key_type: KeyType, bytes: SecretBytes) -> SecretKeyMaterial {
        SecretKeyMaterial { key_type, bytes }
    }

    /// The text stored (encrypted) in a soft key file: PKCS#8 PEM, or the HMAC secret.
    /// `age -d` of the file therefore yields something `openssl` or the exchange accepts.
    pub fn to_storage(&self) -> Result<SecretBytes> {
        if self.key_type.is_hmac() {
            return Ok(SecretBytes::from_slice(self.expose()));
        }
        let pem = Zeroizing::new(
            pem_rfc7468::encode_string("PRIVATE KEY", pem_rfc7468::LineEnding::LF, self.expose())
                .map_err(|e| Error::Internal(format!("PEM encoding: {e}")))?,
        );
        Ok(SecretBytes::from_slice(pem.as_bytes()))
    }

    /// Inverse of [`to_storage`](Self::to_storage) for a key of known type.
    pub fn from_storage(key_type: KeyType, stored: SecretBytes) -> Result<SecretKeyMaterial> {
        if key_type.is_hmac() {
            return Ok(SecretKeyMaterial::new(key_type, stored));
        }
        let parsed = parse(stored, Some(key_type))?;
        Ok(parsed)
    }
}

fn bad(msg: impl Into<String>) -> Error {
    Error::InvalidKeyMaterial(msg.into())
}

/// Parse key material. `expected` is the type the operator named (`--type`); for non-PEM input
/// it decides the interpretation (HMAC secret or secp256k1 hex), for PEM it must match.
pub fn parse(input: SecretBytes, expected: Option<KeyType>) -> Result<SecretKeyMaterial> {
    let text = input.expose();
    let start = text
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(text.len());
    let parsed = if text[start..].starts_with(b"-----BEGIN") {
        parse_pem(&text[start..], expected)?
    } else {
        match expected {
            Some(t) if t.is_hmac() => {
                let secret = input.trim_one_newline();
                if secret.is_empty() {
                    return Err(bad("the HMAC secret is empty"));
                }
                if secret.len() > MAX_HMAC_SECRET {
                    return Err(bad(format!(
                        "the HMAC secret is longer than {MAX_HMAC_SECRET} bytes"
                    )));
                }
                return Ok(SecretKeyMaterial::new(t, secret));
            }
            Some(KeyType::Secp256k1) => parse_secp256k1_hex(text)?,
            Some(t) => {
                return Err(bad(format!(
                    "a {t} key must be PEM (-----BEGIN ... PRIVATE KEY-----)"
                )))
            }
            None => {
                return Err(bad(
                    "input is not PEM; for an exchange secret pass --type hmac-sha256 (or hmac-sha512), for a 0x-hex wallet key --type secp256k1",
                ))
            }
        }
    };
    if let Some(t) = expected {
        let compatible = t == parsed.key_type || (t.is_hmac() && parsed.key_type.is_hmac());
        if !compatible {
            return Err(bad(format!("the key is {}, not {t}", parsed.key_type)));
        }
    }
    Ok(parsed)
}

fn parse_pem(text: &[u8], expected: Option<KeyType>) -> Result<SecretKeyMaterial> {
    let s = std::str::from_utf8(text).map_err(|_| bad("PEM input is not UTF-8 text"))?;
    if s.contains("ENCRYPTED") {
        return Err(bad(
            "encrypted PEM is not accepted; decrypt it first (e.g. `openssl pkey -in key.pem -out plain.pem`) and import with --shred",
        ));
    }
    if s.contains("BEGIN OPENSSH PRIVATE KEY") {
        return parse_openssh(s);
    }
    let (label, der) = pem_rfc7468::decode_vec(s.trim().as_bytes())
        .map_err(|e| bad(format!("malformed PEM: {e}")))?;
    let der = SecretBytes::new(der);
    match label {
        "PRIVATE KEY" => parse_pkcs8(der.expose()),
        "RSA PRIVATE KEY" => {
            let kp = RsaKeyPair::from_der(der.expose())
                .map_err(|e| bad(format!("malformed PKCS#1 RSA key: {e}")))?;
            rsa_material(&kp)
        }
        "EC PRIVATE KEY" => parse_sec1(der.expose(), expected),
        other => Err(bad(format!(
            "PEM label `{other}` is not a private key keyward imports"
        ))),
    }
}

fn rsa_material(kp: &RsaKeyPair) -> Result<SecretKeyMaterial> {
    let bits = kp.public_modulus_len() * 8;
    let t = KeyType::rsa_for_bits(bits).ok_or_else(|| {
        Error::Unsupported(format!(
            "RSA-{bits} is not supported; use 2048, 3072 or 4096 bits"
        ))
    })?;
    let der: Pkcs8V1Der = kp
        .as_der()
        .map_err(|_| Error::Internal("RSA key could not be re-encoded".into()))?;
    Ok(SecretKeyMaterial::new(
        t,
        SecretBytes::from_slice(der.as_ref()),
    ))
}

fn parse_pkcs8(der: &[u8]) -> Result<SecretKeyMaterial> {
    let info =
        pkcs8::PrivateKeyInfo::from_der(der).map_err(|e| bad(format!("malformed PKCS#8: {e}")))?;
    let oid = info.algorithm.oid.to_string();
    match oid.as_str() {
        OID_RSA => {
            let kp =
                RsaKeyPair::from_pkcs8(der).map_err(|e| bad(format!("malformed RSA key: {e}")))?;
            rsa_material(&kp)
        }
        OID_ED25519 => {
            let kp = Ed25519KeyPair::from_pkcs8(der)
                .map_err(|e| bad(format!("malformed Ed25519 key: {e}")))?;
            ed25519_material(&kp)
        }
        OID_EC => {
            let curve = info
                .algorithm
                .parameters_oid()
                .map_err(|_| bad("EC key without a named curve"))?
                .to_string();
            match curve.as_str() {
                OID_P256 => ecdsa_material(KeyType::P256, der),
                OID_P384 => ecdsa_material(KeyType::P384, der),
                OID_SECP256K1 => {
                    use k256::pkcs8::DecodePrivateKey;
                    let sk = k256::SecretKey::from_pkcs8_der(der)
                        .map_err(|e| bad(format!("malformed secp256k1 key: {e}")))?;
                    secp256k1_material(&sk)
                }
                other => Err(Error::Unsupported(format!(
                    "EC curve {other} is not supported"
                ))),
            }
        }
        other => Err(Error::Unsupported(format!(
            "key algorithm {other} is not supported"
        ))),
    }
}

fn parse_sec1(der: &[u8], expected: Option<KeyType>) -> Result<SecretKeyMaterial> {
    let ec =
        sec1::EcPrivateKey::from_der(der).map_err(|e| bad(format!("malformed SEC1 key: {e}")))?;
    // RFC 5915 wants the curve named, but some tools omit it; the operator's --type decides.
    let curve = match ec.parameters.and_then(|p| p.named_curve()) {
        Some(oid) => oid.to_string(),
        None => match expected {
            Some(KeyType::P256) => OID_P256.to_string(),
            Some(KeyType::P384) => OID_P384.to_string(),
            Some(KeyType::Secp256k1) => OID_SECP256K1.to_string(),
            _ => {
                return Err(bad(
                    "SEC1 key without a named curve; pass --type p256, p384 or secp256k1",
                ))
            }
        },
    };
    match curve.as_str() {
        OID_P256 => ecdsa_material(KeyType::P256, der),
        OID_P384 => ecdsa_material(KeyType::P384, der),
        OID_SECP256K1 => {
            let sk = k256::SecretKey::from_sec1_der(der)
                .map_err(|e| bad(format!("malformed secp256k1 key: {e}")))?;
            secp256k1_material(&sk)
        }
        other => Err(Error::Unsupported(format!(
            "EC curve {other} is not supported"
        ))),
    }
}

fn ecdsa_material(t: KeyType, der: &[u8]) -> Result<SecretKeyMaterial> {
    let alg = if t == KeyType::P256 {
        &ECDSA_P256_SHA256_FIXED_SIGNING
    } else {
        &ECDSA_P384_SHA384_FIXED_SIGNING
    };
    let kp = EcdsaKeyPair::from_private_key_der(alg, der)
        .map_err(|e| bad(format!("malformed {t} key: {e}")))?;
    let doc = kp
        .to_pkcs8v1()
        .map_err(|_| Error::Internal("EC key could not be re-encoded".into()))?;
    Ok(SecretKeyMaterial::new(
        t,
        SecretBytes::from_slice(doc.as_ref()),
    ))
}

fn ed25519_material(kp: &Ed25519KeyPair) -> Result<SecretKeyMaterial> {
    let doc = kp
        .to_pkcs8v1()
        .map_err(|_| Error::Internal("Ed25519 key could not be re-encoded".into()))?;
    Ok(SecretKeyMaterial::new(
        KeyType::Ed25519,
        SecretBytes::from_slice(doc.as_ref()),
    ))
}

fn secp256k1_material(sk: &k256::SecretKey) -> Result<SecretKeyMaterial> {
    use k256::pkcs8::EncodePrivateKey;
    let doc = sk
        .to_pkcs8_der()
        .map_err(|e| Error::Internal(format!("secp256k1 re-encoding: {e}")))?;
    Ok(SecretKeyMaterial::new(
        KeyType::Secp256k1,
        SecretBytes::from_slice(doc.as_bytes()),
    ))
}

fn parse_secp256k1_hex(text: &[u8]) -> Result<SecretKeyMaterial> {
    let s = std::str::from_utf8(text).map_err(|_| bad("secp256k1 key is not text"))?;
    let s = s.trim();
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(
            "a secp256k1 key must be 64 hex digits (optionally 0x-prefixed)",
        ));
    }
    let mut raw = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(s, &mut raw[..]).map_err(|_| bad("invalid hex"))?;
    let sk = k256::SecretKey::from_slice(&raw[..])
        .map_err(|_| bad("not a valid secp256k1 private key (zero or ≥ the group order)"))?;
    secp256k1_material(&sk)
}

fn parse_openssh(s: &str) -> Result<SecretKeyMaterial> {
    let key = ssh_key::PrivateKey::from_openssh(s.trim())
        .map_err(|e| bad(format!("malformed OpenSSH private key: {e}")))?;
    if key.is_encrypted() {
        return Err(bad(
            "the OpenSSH key is passphrase-protected; remove it first (`ssh-keygen -p -N '' -f KEY` on a copy) and import with --shred",
        ));
    }
    match key.key_data() {
        ssh_key::private::KeypairData::Ed25519(kp) => {
            let pair = Ed25519KeyPair::from_seed_and_public_key(
                kp.private.as_ref(),
                kp.public.as_ref(),
            )
            .map_err(|_| bad("OpenSSH Ed25519 key: public half does not match the seed"))?;
            ed25519_material(&pair)
        }
        _ => Err(Error::Unsupported(
            "only Ed25519 OpenSSH keys are imported directly; convert others with `ssh-keygen -p -m PEM -f KEY` on a copy".into(),
        )),
    }
}

/// Check that parsing yields a key usable for signing, returning its public SPKI (if any).
pub fn public_spki(m: &SecretKeyMaterial) -> Result<Option<Vec<u8>>> {
    use aws_lc_rs::encoding::PublicKeyX509Der;
    let der = m.expose();
    Ok(match m.key_type() {
        KeyType::Ed25519 => {
            let kp = Ed25519KeyPair::from_pkcs8(der).map_err(|e| bad(e.to_string()))?;
            let d: PublicKeyX509Der = kp.public_key().as_der().map_err(|_| bad("public key"))?;
            Some(d.as_ref().to_vec())
        }
        KeyType::P256 | KeyType::P384 => {
            let alg = if m.key_type() == KeyType::P256 {
                &ECDSA_P256_SHA256_FIXED_SIGNING
            } else {
                &ECDSA_P384_SHA384_FIXED_SIGNING
            };
            let kp = EcdsaKeyPair::from_pkcs8(alg, der).map_err(|e| bad(e.to_string()))?;
            let d: PublicKeyX509Der = kp.public_key().as_der().map_err(|_| bad("public key"))?;
            Some(d.as_ref().to_vec())
        }
        KeyType::Secp256k1 => {
            use k256::pkcs8::{DecodePrivateKey, EncodePublicKey};
            let sk = k256::SecretKey::from_pkcs8_der(der).map_err(|e| bad(e.to_string()))?;
            let d = sk
                .public_key()
                .to_public_key_der()
                .map_err(|e| Error::Internal(e.to_string()))?;
            Some(d.as_bytes().to_vec())
        }
        t if t.is_rsa() => {
            let kp = RsaKeyPair::from_pkcs8(der).map_err(|e| bad(e.to_string()))?;
            let d: PublicKeyX509Der = kp.public_key().as_der().map_err(|_| bad("public key"))?;
            Some(d.as_ref().to_vec())
        }
        _ => None,
    })
}

/// A one-way tag identifying an HMAC secret (safe to display and store).
pub fn hmac_fingerprint(secret: &[u8]) -> String {
    let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    let tag = aws_lc_rs::hmac::sign(&k, b"keyward key fingerprint v1");
    format!("HMAC:{}", hex::encode(&tag.as_ref()[..16]))
}
