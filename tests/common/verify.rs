//! Independent verification of the agent's signatures: RustCrypto crates (ed25519-dalek, p256,
//! p384, k256, rsa, hmac), none of which the agent uses to sign.

use ed25519_dalek::pkcs8::DecodePublicKey as _;
use hmac::Mac;
use sha2::Digest as _;

/// A public key (or, for HMAC, the known secret) to check signatures against.
#[derive(Clone, Debug)]
pub enum Verifier {
    Ed25519(ed25519_dalek::VerifyingKey),
    P256(p256::ecdsa::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
    Secp256k1(k256::ecdsa::VerifyingKey),
    Rsa(rsa::RsaPublicKey),
    Hmac(Vec<u8>),
}

/// Every key type keyward supports.
pub const KEY_TYPES: [&str; 9] = [
    "ed25519",
    "p256",
    "p384",
    "secp256k1",
    "rsa-2048",
    "rsa-3072",
    "rsa-4096",
    "hmac-sha256",
    "hmac-sha512",
];

/// The scheme the agent must use when a request names none.
pub fn default_scheme(key_type: &str) -> &'static str {
    match key_type {
        "ed25519" => "ed25519",
        "p256" => "ecdsa-p256-sha256",
        "p384" => "ecdsa-p384-sha384",
        "secp256k1" => "ecdsa-secp256k1-keccak256",
        "rsa-2048" | "rsa-3072" | "rsa-4096" => "rsa-pkcs1-sha256",
        "hmac-sha256" => "hmac-sha256",
        "hmac-sha512" => "hmac-sha512",
        t => panic!("unknown key type {t}"),
    }
}

/// Every scheme valid for a key type.
pub fn schemes(key_type: &str) -> Vec<&'static str> {
    match key_type {
        "secp256k1" => vec![
            "ecdsa-secp256k1-keccak256",
            "ecdsa-secp256k1-sha256",
            "ecdsa-secp256k1-prehashed",
        ],
        "rsa-2048" | "rsa-3072" | "rsa-4096" => vec![
            "rsa-pkcs1-sha256",
            "rsa-pkcs1-sha512",
            "rsa-pss-sha256",
            "rsa-pss-sha512",
        ],
        "hmac-sha256" | "hmac-sha512" => vec!["hmac-sha256", "hmac-sha512"],
        t => vec![default_scheme(t)],
    }
}

/// DER of a PEM document with the given label, decoded by hand (independent of keyward).
pub fn pem_to_der(pem: &str, label: &str) -> Vec<u8> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let pem = pem.trim();
    assert!(
        pem.starts_with(&begin),
        "PEM does not start with {begin}: {pem}"
    );
    assert!(pem.ends_with(&end), "PEM does not end with {end}: {pem}");
    let body: String = pem[begin.len()..pem.len() - end.len()]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    super::unb64(&body)
}

/// PEM-encode DER with 64-character lines.
pub fn der_to_pem(der: &[u8], label: &str) -> String {
    let b = super::b64(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

impl Verifier {
    /// Parse a `PUBLIC KEY` (SPKI) PEM as a key of `key_type`.
    pub fn from_spki_pem(key_type: &str, pem: &str) -> Verifier {
        let der = pem_to_der(pem, "PUBLIC KEY");
        Verifier::from_spki_der(key_type, &der)
    }

    pub fn from_spki_der(key_type: &str, der: &[u8]) -> Verifier {
        let what = |e: &dyn std::fmt::Display| format!("{key_type} SPKI does not parse: {e}");
        match key_type {
            "ed25519" => Verifier::Ed25519(
                ed25519_dalek::VerifyingKey::from_public_key_der(der)
                    .unwrap_or_else(|e| panic!("{}", what(&e))),
            ),
            "p256" => Verifier::P256(
                p256::PublicKey::from_public_key_der(der)
                    .unwrap_or_else(|e| panic!("{}", what(&e)))
                    .into(),
            ),
            "p384" => Verifier::P384(
                p384::PublicKey::from_public_key_der(der)
                    .unwrap_or_else(|e| panic!("{}", what(&e)))
                    .into(),
            ),
            "secp256k1" => Verifier::Secp256k1(
                k256::PublicKey::from_public_key_der(der)
                    .unwrap_or_else(|e| panic!("{}", what(&e)))
                    .into(),
            ),
            "rsa-2048" | "rsa-3072" | "rsa-4096" => {
                let k = rsa::RsaPublicKey::from_public_key_der(der)
                    .unwrap_or_else(|e| panic!("{}", what(&e)));
                let bits: usize = key_type[4..].parse().expect("RSA size");
                use rsa::traits::PublicKeyParts;
                assert_eq!(k.size() * 8, bits, "RSA modulus size");
                Verifier::Rsa(k)
            }
            t => panic!("{t} has no SPKI"),
        }
    }

    /// The raw public key: Ed25519 32 bytes, EC uncompressed point, RSA modulus.
    pub fn raw(&self) -> Vec<u8> {
        match self {
            Verifier::Ed25519(k) => k.to_bytes().to_vec(),
            Verifier::P256(k) => k.to_encoded_point(false).as_bytes().to_vec(),
            Verifier::P384(k) => k.to_encoded_point(false).as_bytes().to_vec(),
            Verifier::Secp256k1(k) => k.to_encoded_point(false).as_bytes().to_vec(),
            Verifier::Rsa(k) => {
                use rsa::traits::PublicKeyParts;
                k.n().to_bytes_be()
            }
            Verifier::Hmac(_) => panic!("HMAC keys have no public key"),
        }
    }

    /// Check `sig` over `msg` under `scheme`. Errors say what was wrong.
    /// Verify, and show the verifier is not vacuous: the same signature must fail for a
    /// message that differs in one bit (or by one byte, for the empty message).
    pub fn verify_strict(&self, scheme: &str, msg: &[u8], sig: &[u8], what: &str) {
        self.verify(scheme, msg, sig)
            .unwrap_or_else(|e| panic!("{what}: signature does not verify: {e}"));
        let mut other = msg.to_vec();
        match other.first_mut() {
            Some(b) => *b ^= 1,
            None => other.push(0),
        }
        assert!(
            self.verify(scheme, &other, sig).is_err(),
            "{what}: signature also verifies for another message"
        );
    }

    pub fn verify(&self, scheme: &str, msg: &[u8], sig: &[u8]) -> Result<(), String> {
        match (self, scheme) {
            (Verifier::Ed25519(k), "ed25519") => {
                let s = ed25519_dalek::Signature::from_slice(sig).map_err(|e| e.to_string())?;
                k.verify_strict(msg, &s).map_err(|e| e.to_string())
            }
            (Verifier::P256(k), "ecdsa-p256-sha256") => {
                use p256::ecdsa::signature::Verifier as _;
                if sig.len() != 64 {
                    return Err(format!("P-256 r||s must be 64 bytes, got {}", sig.len()));
                }
                let s = p256::ecdsa::Signature::from_slice(sig).map_err(|e| e.to_string())?;
                k.verify(msg, &s).map_err(|e| e.to_string())
            }
            (Verifier::P384(k), "ecdsa-p384-sha384") => {
                use p384::ecdsa::signature::Verifier as _;
                if sig.len() != 96 {
                    return Err(format!("P-384 r||s must be 96 bytes, got {}", sig.len()));
                }
                let s = p384::ecdsa::Signature::from_slice(sig).map_err(|e| e.to_string())?;
                k.verify(msg, &s).map_err(|e| e.to_string())
            }
            (Verifier::Secp256k1(k), s) if s.starts_with("ecdsa-secp256k1-") => {
                let digest: [u8; 32] = match s {
                    "ecdsa-secp256k1-keccak256" => sha3::Keccak256::digest(msg).into(),
                    "ecdsa-secp256k1-sha256" => sha2::Sha256::digest(msg).into(),
                    "ecdsa-secp256k1-prehashed" => msg
                        .try_into()
                        .map_err(|_| "prehashed message must be 32 bytes".to_string())?,
                    other => return Err(format!("unknown scheme {other}")),
                };
                verify_secp256k1(k, &digest, sig, s == "ecdsa-secp256k1-keccak256")
            }
            (Verifier::Rsa(k), s) if s.starts_with("rsa-") => verify_rsa(k, s, msg, sig),
            (Verifier::Hmac(secret), "hmac-sha256") => {
                let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret)
                    .map_err(|e| e.to_string())?;
                m.update(msg);
                m.verify_slice(sig)
                    .map_err(|_| "HMAC-SHA256 tag mismatch".to_string())
            }
            (Verifier::Hmac(secret), "hmac-sha512") => {
                let mut m = hmac::Hmac::<sha2::Sha512>::new_from_slice(secret)
                    .map_err(|e| e.to_string())?;
                m.update(msg);
                m.verify_slice(sig)
                    .map_err(|_| "HMAC-SHA512 tag mismatch".to_string())
            }
            (v, s) => Err(format!("scheme {s} does not apply to {v:?}")),
        }
    }
}

/// secp256k1: r||s||v (v ∈ {27, 28}) must recover `k` from `digest`, and s must be low.
/// `require_v`: the signature must carry v (65 bytes); otherwise 64 or 65 bytes are accepted.
fn verify_secp256k1(
    k: &k256::ecdsa::VerifyingKey,
    digest: &[u8; 32],
    sig: &[u8],
    require_v: bool,
) -> Result<(), String> {
    use k256::ecdsa::signature::hazmat::PrehashVerifier;
    if !(sig.len() == 65 || (!require_v && sig.len() == 64)) {
        return Err(format!(
            "secp256k1 signature must be r||s||v (65 bytes), got {}",
            sig.len()
        ));
    }
    let rs = k256::ecdsa::Signature::from_slice(&sig[..64]).map_err(|e| e.to_string())?;
    if rs.normalize_s().is_some() {
        return Err("secp256k1 signature has a high s (not canonical)".into());
    }
    k.verify_prehash(digest, &rs)
        .map_err(|e| format!("secp256k1 verify: {e}"))?;
    if sig.len() == 65 {
        let v = sig[64];
        if v != 27 && v != 28 {
            return Err(format!("v must be 27 or 28, got {v}"));
        }
        let recid = k256::ecdsa::RecoveryId::from_byte(v - 27).ok_or("bad recovery id")?;
        let recovered = k256::ecdsa::VerifyingKey::recover_from_prehash(digest, &rs, recid)
            .map_err(|e| format!("recovery failed: {e}"))?;
        if &recovered != k {
            return Err("the recovered public key is not the key's public key (wrong v)".into());
        }
    }
    Ok(())
}

fn verify_rsa(k: &rsa::RsaPublicKey, scheme: &str, msg: &[u8], sig: &[u8]) -> Result<(), String> {
    use rsa::signature::Verifier as _;
    use rsa::traits::PublicKeyParts;
    if sig.len() != k.size() {
        return Err(format!(
            "RSA signature is {} bytes, modulus {} bytes",
            sig.len(),
            k.size()
        ));
    }
    match scheme {
        "rsa-pkcs1-sha256" => {
            let s = rsa::pkcs1v15::Signature::try_from(sig).map_err(|e| e.to_string())?;
            rsa::pkcs1v15::VerifyingKey::<sha2::Sha256>::new(k.clone())
                .verify(msg, &s)
                .map_err(|e| format!("PKCS#1 v1.5 SHA-256: {e}"))
        }
        "rsa-pkcs1-sha512" => {
            let s = rsa::pkcs1v15::Signature::try_from(sig).map_err(|e| e.to_string())?;
            rsa::pkcs1v15::VerifyingKey::<sha2::Sha512>::new(k.clone())
                .verify(msg, &s)
                .map_err(|e| format!("PKCS#1 v1.5 SHA-512: {e}"))
        }
        // Salt length must equal the digest length (Kalshi); the verifier checks it exactly.
        "rsa-pss-sha256" => {
            let s = rsa::pss::Signature::try_from(sig).map_err(|e| e.to_string())?;
            rsa::pss::VerifyingKey::<sha2::Sha256>::new_with_salt_len(k.clone(), 32)
                .verify(msg, &s)
                .map_err(|e| format!("PSS SHA-256 salt 32: {e}"))
        }
        "rsa-pss-sha512" => {
            let s = rsa::pss::Signature::try_from(sig).map_err(|e| e.to_string())?;
            rsa::pss::VerifyingKey::<sha2::Sha512>::new_with_salt_len(k.clone(), 64)
                .verify(msg, &s)
                .map_err(|e| format!("PSS SHA-512 salt 64: {e}"))
        }
        other => Err(format!("unknown RSA scheme {other}")),
    }
}

/// Keccak-256.
pub fn keccak256(data: &[u8]) -> [u8; 32] {
    sha3::Keccak256::digest(data).into()
}

/// The EIP-55 checksummed Ethereum address of a secp256k1 key (computed here, independently).
pub fn eth_address(k: &k256::ecdsa::VerifyingKey) -> String {
    let point = k.to_encoded_point(false);
    let h = keccak256(&point.as_bytes()[1..]);
    let lower = hex::encode(&h[12..]);
    let check = keccak256(lower.as_bytes());
    let mut out = String::from("0x");
    for (i, c) in lower.chars().enumerate() {
        let nibble = if i % 2 == 0 {
            check[i / 2] >> 4
        } else {
            check[i / 2] & 0xf
        };
        out.push(if c.is_ascii_alphabetic() && nibble >= 8 {
            c.to_ascii_uppercase()
        } else {
            c
        });
    }
    out
}

/// Parse an OpenSSH public key line into (type name, fields of the wire blob).
pub fn parse_ssh_public(line: &str) -> (String, Vec<Vec<u8>>) {
    let mut parts = line.split_whitespace();
    let kind = parts.next().expect("ssh key type").to_string();
    let blob = super::unb64(parts.next().expect("ssh key blob"));
    let mut fields = Vec::new();
    let mut rest = &blob[..];
    while !rest.is_empty() {
        assert!(rest.len() >= 4, "truncated ssh blob");
        let n = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        assert!(rest.len() >= 4 + n, "truncated ssh blob field");
        fields.push(rest[4..4 + n].to_vec());
        rest = &rest[4 + n..];
    }
    assert_eq!(
        fields.first().map(Vec::as_slice),
        Some(kind.as_bytes()),
        "blob's type name differs from the line's"
    );
    (kind, fields)
}

/// Strip leading zero bytes (ssh mpint / JWK big-endian integers).
pub fn strip_zeros(b: &[u8]) -> &[u8] {
    let i = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[i..]
}
