//! Public-key encodings offered by `public_key` and `key export-public`: PEM (SPKI), OpenSSH,
//! JWK and hex, plus fingerprints and Ethereum addresses. Public data only.

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde_json::json;
use sha3::{Digest, Keccak256};
use spki::der::Decode;

use crate::error::{Error, Result};
use crate::model::KeyType;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Pem,
    Ssh,
    Jwk,
    Hex,
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "pem" => Ok(Format::Pem),
            "ssh" => Ok(Format::Ssh),
            "jwk" => Ok(Format::Jwk),
            "hex" => Ok(Format::Hex),
            _ => Err(Error::BadRequest(
                "format must be one of pem, ssh, jwk, hex".into(),
            )),
        }
    }
}

/// `SHA256:<base64 without padding>` of the SPKI DER.
pub fn fingerprint(spki_der: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, spki_der);
    format!("SHA256:{}", STANDARD_NO_PAD.encode(d.as_ref()))
}

/// The key bytes inside an SPKI: Ed25519 32 bytes, EC uncompressed point, RSA PKCS#1 DER.
pub fn raw_public_key(spki_der: &[u8]) -> Result<Vec<u8>> {
    let spki = spki::SubjectPublicKeyInfoRef::from_der(spki_der)
        .map_err(|e| Error::Internal(format!("stored public key is not SPKI DER: {e}")))?;
    spki.subject_public_key
        .as_bytes()
        .map(<[u8]>::to_vec)
        .ok_or_else(|| Error::Internal("SPKI bit string has unused bits".into()))
}

/// Encode an SPKI in the requested format. The result is a JSON value: a string for
/// pem/ssh/hex, an object for jwk.
pub fn encode(
    key_type: KeyType,
    spki_der: &[u8],
    format: Format,
    comment: &str,
) -> Result<serde_json::Value> {
    let raw = raw_public_key(spki_der)?;
    match format {
        Format::Pem => Ok(json!(pem_rfc7468::encode_string(
            "PUBLIC KEY",
            pem_rfc7468::LineEnding::LF,
            spki_der
        )
        .map_err(|e| Error::Internal(format!("PEM encoding: {e}")))?)),
        Format::Hex => Ok(json!(hex::encode(raw))),
        Format::Jwk => jwk(key_type, &raw),
        Format::Ssh => ssh(key_type, &raw, comment).map(|s| json!(s)),
    }
}

fn jwk(key_type: KeyType, raw: &[u8]) -> Result<serde_json::Value> {
    let b = |x: &[u8]| URL_SAFE_NO_PAD.encode(x);
    Ok(match key_type {
        KeyType::Ed25519 => json!({"kty": "OKP", "crv": "Ed25519", "x": b(raw)}),
        KeyType::P256 | KeyType::P384 | KeyType::Secp256k1 => {
            let crv = match key_type {
                KeyType::P256 => "P-256",
                KeyType::P384 => "P-384",
                _ => "secp256k1",
            };
            let (x, y) = split_point(raw)?;
            json!({"kty": "EC", "crv": crv, "x": b(x), "y": b(y)})
        }
        t if t.is_rsa() => {
            let (n, e) = rsa_components(raw)?;
            json!({"kty": "RSA", "n": b(n), "e": b(e)})
        }
        t => return Err(Error::Unsupported(format!("{t} keys have no public key"))),
    })
}

fn ssh(key_type: KeyType, raw: &[u8], comment: &str) -> Result<String> {
    use ssh_key::public::{EcdsaPublicKey, Ed25519PublicKey, KeyData, RsaPublicKey};
    let data = match key_type {
        KeyType::Ed25519 => {
            let bytes: [u8; 32] = raw
                .try_into()
                .map_err(|_| Error::Internal("Ed25519 public key is not 32 bytes".into()))?;
            KeyData::Ed25519(Ed25519PublicKey(bytes))
        }
        KeyType::P256 | KeyType::P384 => KeyData::Ecdsa(
            EcdsaPublicKey::from_sec1_bytes(raw)
                .map_err(|e| Error::Internal(format!("EC point: {e}")))?,
        ),
        t if t.is_rsa() => {
            let (n, e) = rsa_components(raw)?;
            KeyData::Rsa(RsaPublicKey {
                e: ssh_key::Mpint::from_positive_bytes(e)
                    .map_err(|e| Error::Internal(format!("RSA exponent: {e}")))?,
                n: ssh_key::Mpint::from_positive_bytes(n)
                    .map_err(|e| Error::Internal(format!("RSA modulus: {e}")))?,
            })
        }
        t => {
            return Err(Error::Unsupported(format!(
                "OpenSSH has no public key format for {t} keys"
            )))
        }
    };
    ssh_key::PublicKey::new(data, comment)
        .to_openssh()
        .map_err(|e| Error::Internal(format!("OpenSSH encoding: {e}")))
}

fn split_point(raw: &[u8]) -> Result<(&[u8], &[u8])> {
    if raw.first() != Some(&0x04) || raw.len() % 2 != 1 {
        return Err(Error::Internal(
            "EC public key is not an uncompressed point".into(),
        ));
    }
    let half = (raw.len() - 1) / 2;
    Ok((&raw[1..1 + half], &raw[1 + half..]))
}

/// (modulus, exponent) big-endian without leading zeros, from PKCS#1 RSAPublicKey DER.
pub fn rsa_components(pkcs1: &[u8]) -> Result<(&[u8], &[u8])> {
    let k = pkcs1::RsaPublicKey::from_der(pkcs1)
        .map_err(|e| Error::Internal(format!("RSA public key: {e}")))?;
    Ok((k.modulus.as_bytes(), k.public_exponent.as_bytes()))
}

/// The EIP-55 checksummed Ethereum address of a secp256k1 uncompressed point.
pub fn eth_address(uncompressed: &[u8]) -> Result<String> {
    if uncompressed.len() != 65 || uncompressed[0] != 0x04 {
        return Err(Error::Internal(
            "secp256k1 key is not an uncompressed point".into(),
        ));
    }
    let h = Keccak256::digest(&uncompressed[1..]);
    let addr = hex::encode(&h[12..]);
    let check = Keccak256::digest(addr.as_bytes());
    let mut out = String::from("0x");
    for (i, c) in addr.chars().enumerate() {
        let nibble = (check[i / 2] >> (if i % 2 == 0 { 4 } else { 0 })) & 0xf;
        out.push(if c.is_ascii_alphabetic() && nibble >= 8 {
            c.to_ascii_uppercase()
        } else {
            c
        });
    }
    Ok(out)
}

/// Base64 (standard, padded) of bytes: the one encoding signatures use on the wire.
pub fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// SPKI DER of an RSA public key from its modulus and exponent (big-endian; a device may
/// pad the exponent with leading zeros).
pub fn rsa_spki(n: &[u8], e: &[u8]) -> Result<Vec<u8>> {
    use spki::der::Encode;
    let e = &e[e.iter().take_while(|b| **b == 0).count()..];
    let key = pkcs1::RsaPublicKey {
        modulus: pkcs1::UintRef::new(n).map_err(|e| Error::Internal(e.to_string()))?,
        public_exponent: pkcs1::UintRef::new(e).map_err(|e| Error::Internal(e.to_string()))?,
    };
    let pkcs1_der = key.to_der().map_err(|e| Error::Internal(e.to_string()))?;
    spki_of(
        "1.2.840.113549.1.1.1",
        Some(spki::der::asn1::Null.into()),
        &pkcs1_der,
    )
}

/// SPKI DER of an Ed25519 key (32 raw bytes) or an EC key (uncompressed point) of type `t`.
pub fn ec_spki(t: KeyType, raw: &[u8]) -> Result<Vec<u8>> {
    if t == KeyType::Ed25519 {
        return spki_of("1.3.101.112", None, raw);
    }
    let curve = match t {
        KeyType::P256 => "1.2.840.10045.3.1.7",
        KeyType::P384 => "1.3.132.0.34",
        _ => "1.3.132.0.10",
    };
    let oid: spki::ObjectIdentifier = curve.parse().map_err(|_| Error::Internal("oid".into()))?;
    spki_of("1.2.840.10045.2.1", Some(spki::der::Any::from(oid)), raw)
}

fn spki_of(alg: &str, params: Option<spki::der::Any>, key: &[u8]) -> Result<Vec<u8>> {
    use spki::der::Encode;
    let info = spki::SubjectPublicKeyInfoOwned {
        algorithm: spki::AlgorithmIdentifierOwned {
            oid: alg.parse().map_err(|_| Error::Internal("oid".into()))?,
            parameters: params,
        },
        subject_public_key: spki::der::asn1::BitString::from_bytes(key)
            .map_err(|e| Error::Internal(e.to_string()))?,
    };
    info.to_der().map_err(|e| Error::Internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eip55_checksum_matches_the_eip_examples() {
        // EIP-55 test vector: the address of private key 1 is known.
        let sk = k256::SecretKey::from_slice(&{
            let mut b = [0u8; 32];
            b[31] = 1;
            b
        })
        .unwrap();
        let pt = sk.public_key().to_sec1_bytes();
        let uncompressed = k256::EncodedPoint::from_bytes(&pt)
            .map(|p| {
                use k256::elliptic_curve::sec1::ToEncodedPoint;
                k256::PublicKey::from_sec1_bytes(p.as_bytes())
                    .unwrap()
                    .to_encoded_point(false)
            })
            .unwrap();
        assert_eq!(
            eth_address(uncompressed.as_bytes()).unwrap(),
            "0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf"
        );
    }
}
