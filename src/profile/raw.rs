//! Profile `raw` (PROFILES.md §11): signs arbitrary base64 bytes with the key's native scheme;
//! policy denies it for exchange-bound keys unless `allow_raw` is set.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::Deserialize;

use super::util;
use super::{unsupported_key, Clock, KeyInfo, Output, Plan, ProfileName, RequestView};
use crate::error::{Error, Result};
use crate::model::{Algorithm, KeyType};

/// Largest message `raw` signs (decoded bytes).
pub const MAX_DATA: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Hmac {
    Sha256,
    Sha512,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Padding {
    Pkcs1v15,
    Pss,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Hash {
    Keccak256,
    Sha256,
    None,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Standard base64 with padding.
    data: String,
    #[serde(default)]
    hmac: Option<Hmac>,
    #[serde(default)]
    padding: Option<Padding>,
    #[serde(default)]
    hash: Option<Hash>,
}

impl Request {
    fn data(&self) -> Result<Vec<u8>> {
        // Check the encoded size first so a huge string is refused before it is decoded.
        if self.data.len() > MAX_DATA.div_ceil(3) * 4 {
            return Err(Error::BadRequest(format!(
                "`data` is larger than {MAX_DATA} bytes"
            )));
        }
        let bytes = STANDARD
            .decode(&self.data)
            .map_err(|_| Error::BadRequest("`data` is not standard base64".into()))?;
        if bytes.len() > MAX_DATA {
            return Err(Error::BadRequest(format!(
                "`data` is larger than {MAX_DATA} bytes"
            )));
        }
        Ok(bytes)
    }

    pub fn view(&self) -> Result<RequestView> {
        Ok(RequestView {
            body_len: self.data()?.len(),
            ..RequestView::default()
        })
    }

    pub fn build(self, key: &KeyInfo, _clock: &mut Clock<'_>) -> Result<Plan> {
        let key_type = key.key_type()?;
        let data = self.data()?;
        let misplaced = |field: &str| {
            Err(Error::BadRequest(format!(
                "`{field}` does not apply to {key_type} keys"
            )))
        };
        let is_secp = key_type == KeyType::Secp256k1;
        if self.hmac.is_some() && !key_type.is_hmac() {
            return misplaced("hmac");
        }
        if self.padding.is_some() && !key_type.is_rsa() {
            return misplaced("padding");
        }
        if self.hash.is_some() && !is_secp {
            return misplaced("hash");
        }
        let alg = match key_type {
            t if t.is_hmac() => match self.hmac.unwrap_or(Hmac::Sha256) {
                Hmac::Sha256 => Algorithm::HmacSha256,
                Hmac::Sha512 => Algorithm::HmacSha512,
            },
            t if t.is_rsa() => match self.padding.unwrap_or(Padding::Pkcs1v15) {
                Padding::Pkcs1v15 => Algorithm::RsaPkcs1Sha256,
                Padding::Pss => Algorithm::RsaPssSha256,
            },
            KeyType::Secp256k1 => match self.hash.unwrap_or(Hash::Keccak256) {
                Hash::Keccak256 => Algorithm::EcdsaSecp256k1Keccak256,
                Hash::Sha256 => Algorithm::EcdsaSecp256k1Sha256,
                Hash::None => {
                    if data.len() != 32 {
                        return Err(Error::BadRequest(
                            "`data` must be a 32-byte digest with \"hash\": \"none\"".into(),
                        ));
                    }
                    Algorithm::EcdsaSecp256k1Prehashed
                }
            },
            KeyType::Ed25519 => Algorithm::Ed25519,
            KeyType::P256 => Algorithm::EcdsaP256Sha256,
            KeyType::P384 => Algorithm::EcdsaP384Sha384,
            other => return Err(unsupported_key(ProfileName::Raw, other)),
        };
        Ok(Plan::new(alg, data, move |sig| {
            if !is_secp {
                return Ok(Output::new(util::b64(&sig.bytes), &[]));
            }
            let (recid, digest) = match (sig.recovery_id, sig.digest) {
                (Some(r), Some(d)) if r <= 1 && sig.bytes.len() == 64 => (r, d),
                _ => {
                    return Err(Error::Internal(
                        "secp256k1 signature without recovery id or digest".into(),
                    ))
                }
            };
            let mut native = sig.bytes.clone();
            native.push(27 + recid);
            Ok(Output::new(util::b64(&native), &[])
                .with("digest", format!("0x{}", hex::encode(digest))))
        }))
    }
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde_json::json;

    use super::super::util::test_keys::*;
    use super::super::util::test_support::*;
    use super::super::ProfileName;
    use crate::backend::material;
    use crate::backend::soft::MemoryKey;
    use crate::model::KeyType;
    use crate::secret::SecretBytes;

    const P: ProfileName = ProfileName::Raw;

    fn sig_hex(out: &serde_json::Value) -> String {
        hex::encode(STANDARD.decode(out["signature"].as_str().unwrap()).unwrap())
    }

    // RFC 8032 §7.1, TEST 1 (empty message) and TEST 2 (one byte 0x72).
    #[test]
    fn kat_rfc8032_ed25519() {
        let k = ed25519_seed(RFC8032_TEST1_SEED);
        let out = run(P, &json!({"data": ""}), &k);
        assert_eq!(
            sig_hex(&out),
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
        );
        assert_eq!(out["headers"], json!({}));
        let k = ed25519_seed("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb");
        let out = run(P, &json!({"data": STANDARD.encode([0x72])}), &k);
        assert_eq!(
            sig_hex(&out),
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"
        );
    }

    // RFC 4231 §4.3, test case 2 (key "Jefe").
    #[test]
    fn kat_rfc4231_hmac() {
        let k = hmac(b"Jefe", KeyType::HmacSha256);
        let data = STANDARD.encode("what do ya want for nothing?");
        let out = run(P, &json!({"data": data}), &k);
        assert_eq!(
            sig_hex(&out),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let out = run(P, &json!({"data": data, "hmac": "sha512"}), &k);
        assert_eq!(
            sig_hex(&out),
            "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea2505549758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737"
        );
    }

    // web3.js documentation, `web3.eth.accounts.sign('Some data', '0x4c0883a6…')`: the
    // personal_sign digest of "Some data" signed raw (hash none) and via keccak256 of the
    // prefixed message give the published signature 0xb91467e5…1c.
    #[test]
    fn kat_secp256k1_web3_docs() {
        let m = material::parse(
            SecretBytes::from_slice(
                b"0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318",
            ),
            Some(KeyType::Secp256k1),
        )
        .unwrap();
        let k = MemoryKey::from_material(&m).unwrap();
        let expected = "b91467e570a6466aa9e9876cbcd013baba02900b8979d43fe208a4a4f339f5fd6007e74cd82e037b800186422fc2da167c747ef045e5d18a5f5d4300f8e1a0291c";
        let prefixed = STANDARD.encode(b"\x19Ethereum Signed Message:\n9Some data");
        let out = run(P, &json!({"data": prefixed}), &k);
        assert_eq!(sig_hex(&out), expected);
        assert_eq!(
            out["digest"],
            "0x1da44b586eb0729ff70a73c326926f6ed5a25f5b056e7f47fbc6e58d86871655"
        );
        let digest =
            hex::decode("1da44b586eb0729ff70a73c326926f6ed5a25f5b056e7f47fbc6e58d86871655")
                .unwrap();
        let out = run(
            P,
            &json!({"data": STANDARD.encode(&digest), "hash": "none"}),
            &k,
        );
        assert_eq!(sig_hex(&out), expected);
        let out = run(P, &json!({"data": prefixed, "hash": "sha256"}), &k);
        assert_ne!(sig_hex(&out), expected);
    }

    #[test]
    fn rsa_padding_choices_verify() {
        let k = pem(RSA_2048_PKCS8);
        let data = b"raw bytes";
        let out = run(P, &json!({"data": STANDARD.encode(data)}), &k);
        verify_rsa_pkcs1v15(RSA_2048_PKCS8, data, out["signature"].as_str().unwrap());
        let out = run(
            P,
            &json!({"data": STANDARD.encode(data), "padding": "pss"}),
            &k,
        );
        verify_rsa_pss(RSA_2048_PKCS8, data, out["signature"].as_str().unwrap());
    }

    #[test]
    fn p256_is_raw_r_s() {
        use p256::ecdsa::signature::Verifier;
        use p256::pkcs8::DecodePrivateKey;
        let (k, m) = generated(KeyType::P256);
        let out = run(P, &json!({"data": STANDARD.encode(b"m")}), &k);
        let raw = STANDARD.decode(out["signature"].as_str().unwrap()).unwrap();
        assert_eq!(raw.len(), 64);
        let sk = p256::ecdsa::SigningKey::from_pkcs8_der(m.expose()).unwrap();
        let sig = p256::ecdsa::Signature::from_slice(&raw).unwrap();
        sk.verifying_key().verify(b"m", &sig).unwrap();
    }

    #[test]
    fn error_paths() {
        let ed = pem(ED25519_PKCS8);
        let h = hmac(b"k", KeyType::HmacSha256);
        bad(P, &json!({"data": "AA==", "extra": true}), &ed);
        bad(P, &json!({"data": "not base64!"}), &ed);
        bad(P, &json!({"data": 5}), &ed);
        bad(P, &json!({}), &ed);
        bad(P, &json!({"data": "AA==", "hmac": "sha256"}), &ed);
        bad(P, &json!({"data": "AA==", "padding": "pss"}), &h);
        bad(P, &json!({"data": "AA==", "hash": "none"}), &h);
        bad(P, &json!({"data": "AA==", "hmac": "md5"}), &h);
        let huge = "A".repeat(200_000);
        assert!(bad(P, &json!({"data": huge}), &h).contains("larger"));
        let just_over = STANDARD.encode(vec![0u8; super::MAX_DATA + 1]);
        bad(P, &json!({"data": just_over}), &h);
        let (secp, _) = generated(KeyType::Secp256k1);
        bad(P, &json!({"data": "AA==", "hash": "none"}), &secp);
    }
}
