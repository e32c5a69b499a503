//! Profile `coinbase` (PROFILES.md §3): a CDP API-key JWT (ES256 with raw r‖s, or EdDSA) whose
//! header and claims are compact JSON in a fixed key order, one JWT per request.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{unsupported_key, util, Clock, KeyInfo, Output, Plan, ProfileName, RequestView};
use crate::backend::Signature;
use crate::error::{Error, Result};
use crate::model::{Algorithm, KeyType};

const PROFILE: ProfileName = ProfileName::Coinbase;
const DEFAULT_HOST: &str = "api.coinbase.com";
/// JWT lifetime Coinbase accepts.
const LIFETIME_S: u64 = 120;
/// Longest client-supplied `jwt_nonce` (the agent's is 32 hex digits).
const MAX_NONCE_LEN: usize = 128;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    method: Option<String>,
    path: Option<String>,
    host: Option<String>,
    api_key: Option<String>,
    #[serde(default)]
    websocket: bool,
    timestamp: Option<u64>,
    jwt_nonce: Option<String>,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::BadRequest(msg.into())
}

impl Request {
    pub fn view(&self) -> Result<RequestView> {
        if self.websocket {
            if let Some(f) = [
                ("method", self.method.is_some()),
                ("path", self.path.is_some()),
                ("host", self.host.is_some()),
            ]
            .iter()
            .find(|(_, set)| *set)
            {
                return Err(bad(format!(
                    "`{}` must be absent when `websocket` is true",
                    f.0
                )));
            }
            return Ok(RequestView::default());
        }
        let method = self
            .method
            .as_deref()
            .ok_or_else(|| bad("`method` is required (or set `websocket`: true)"))?;
        let path = self
            .path
            .as_deref()
            .ok_or_else(|| bad("`path` is required (or set `websocket`: true)"))?;
        // Nothing but the JWT is sent for signing: no body to measure or orders to guard.
        let view = util::http_view(method, path, "", Vec::new())?;
        if let Some(h) = &self.host {
            check_host(h)?;
        }
        if let Some(n) = &self.jwt_nonce {
            check_nonce(n)?;
        }
        Ok(view)
    }

    pub fn build(self, key: &KeyInfo, clock: &mut Clock<'_>) -> Result<Plan> {
        self.view()?;
        let (alg, jwt_alg) = match key.key_type()? {
            KeyType::P256 => (Algorithm::EcdsaP256Sha256, "ES256"),
            KeyType::Ed25519 => (Algorithm::Ed25519, "EdDSA"),
            other => return Err(unsupported_key(PROFILE, other)),
        };
        let api_key =
            util::required_field("api_key", self.api_key.as_deref(), key.api_key.as_deref())?;
        if api_key.is_empty() {
            return Err(bad("`api_key` must not be empty"));
        }
        let ts = clock.timestamp_s("timestamp", self.timestamp)?;
        let exp = ts
            .checked_add(LIFETIME_S)
            .ok_or_else(|| bad("`timestamp` is out of range"))?;
        let nonce = match self.jwt_nonce {
            Some(n) => {
                clock.client_value_allowed("jwt_nonce")?;
                check_nonce(&n)?;
                n
            }
            None => random_nonce()?,
        };

        let mut header = Map::new();
        header.insert("alg".into(), jwt_alg.into());
        header.insert("kid".into(), api_key.clone().into());
        header.insert("nonce".into(), nonce.into());
        header.insert("typ".into(), "JWT".into());
        let mut claims = Map::new();
        claims.insert("sub".into(), api_key.into());
        claims.insert("iss".into(), "cdp".into());
        claims.insert("nbf".into(), ts.into());
        claims.insert("exp".into(), exp.into());
        if !self.websocket {
            let host = self.host.as_deref().unwrap_or(DEFAULT_HOST);
            let uri = format!(
                "{} {host}{}",
                self.method.as_deref().unwrap_or_default(),
                self.path.as_deref().unwrap_or_default()
            );
            claims.insert("uri".into(), uri.into());
        }
        let header_json = compact(&header)?;
        let claims_json = compact(&claims)?;
        let signing_input = format!(
            "{}.{}",
            util::b64url_nopad(header_json.as_bytes()),
            util::b64url_nopad(claims_json.as_bytes())
        );
        let message = signing_input.as_bytes().to_vec();
        let websocket = self.websocket;
        Ok(Plan::new(alg, message, move |sig: &Signature| {
            if sig.bytes.len() != 64 {
                return Err(Error::Internal(format!(
                    "{alg} signature is {} bytes, expected 64 (raw r‖s / Ed25519)",
                    sig.bytes.len()
                )));
            }
            let signature = util::b64url_nopad(&sig.bytes);
            let jwt = format!("{signing_input}.{signature}");
            let headers: Vec<(&str, String)> = if websocket {
                Vec::new()
            } else {
                vec![("Authorization", format!("Bearer {jwt}"))]
            };
            Ok(Output::new(signature, &headers)
                .with("jwt", jwt)
                .with("payload", signing_input)
                .with("jwt_header", Value::Object(header))
                .with("jwt_claims", Value::Object(claims))
                .with("timestamp", ts))
        }))
    }
}

/// serde_json's compact form: no whitespace, UTF-8 kept, `"` `\` and controls escaped.
fn compact(m: &Map<String, Value>) -> Result<String> {
    serde_json::to_string(m).map_err(|e| Error::Internal(format!("JWT JSON: {e}")))
}

/// 16 bytes from the OS CSPRNG as 32 lowercase hex digits.
fn random_nonce() -> Result<String> {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| Error::Internal("OS random source failed".into()))?;
    Ok(hex::encode(b))
}

fn check_nonce(n: &str) -> Result<()> {
    if n.is_empty()
        || n.len() > MAX_NONCE_LEN
        || !n
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad(format!(
            "`jwt_nonce` must be 1 to {MAX_NONCE_LEN} lowercase hex digits"
        )));
    }
    Ok(())
}

/// A host name with an optional port — what goes between the method and the path in `uri`.
fn check_host(h: &str) -> Result<()> {
    let ok = !h.is_empty()
        && h.len() <= 255
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(bad(
            "`host` must be a host name (letters, digits, '.', '-', optional :port), no scheme or path",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::util::test_keys::RFC8032_TEST1_SEED;
    use super::super::util::test_support::*;
    use super::super::{parse, ClientTime, KeyInfo, Output, ProfileName};
    use crate::backend::material;
    use crate::backend::soft::MemoryKey;
    use crate::model::KeyType;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use serde_json::{json, Value};

    const P: ProfileName = ProfileName::Coinbase;
    const KEY_NAME: &str = "organizations/org-id/apiKeys/key-id";

    /// A fresh P-256 key, with its SubjectPublicKeyInfo to verify against.
    fn p256() -> (MemoryKey, KeyInfo, Vec<u8>) {
        let (key, m) = generated(KeyType::P256);
        let spki = material::public_spki(&m).unwrap().unwrap();
        let info = info(&key);
        (key, info, spki)
    }

    fn ed25519() -> (MemoryKey, KeyInfo) {
        let key = ed25519_seed(RFC8032_TEST1_SEED);
        let info = info(&key);
        (key, info)
    }

    fn sign(
        req: &Value,
        key: &MemoryKey,
        info: &KeyInfo,
        client_time: ClientTime,
        now_ms: u64,
    ) -> crate::error::Result<Value> {
        sign_with(P, req, key, info, now_ms, client_time).map(Output::into_value)
    }

    fn segments(jwt: &str) -> (String, String, Vec<u8>) {
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let d = |s: &str| URL_SAFE_NO_PAD.decode(s).unwrap();
        (
            String::from_utf8(d(parts[0])).unwrap(),
            String::from_utf8(d(parts[1])).unwrap(),
            d(parts[2]),
        )
    }

    #[test]
    fn es256_rest_jwt_verifies_and_is_byte_exact() {
        use p256::ecdsa::signature::Verifier;
        use p256::pkcs8::DecodePublicKey;
        let (key, info, spki) = p256();
        let req = json!({
            "method": "GET", "path": "/api/v3/brokerage/accounts", "api_key": KEY_NAME,
            "timestamp": 1_700_000_000u64, "jwt_nonce": "0123456789abcdef0123456789abcdef"
        });
        let out = sign(&req, &key, &info, ClientTime::Any, 0).unwrap();
        let jwt = out["jwt"].as_str().unwrap();
        let (h, c, sig) = segments(jwt);
        assert_eq!(
            h,
            r#"{"alg":"ES256","kid":"organizations/org-id/apiKeys/key-id","nonce":"0123456789abcdef0123456789abcdef","typ":"JWT"}"#
        );
        assert_eq!(
            c,
            r#"{"sub":"organizations/org-id/apiKeys/key-id","iss":"cdp","nbf":1700000000,"exp":1700000120,"uri":"GET api.coinbase.com/api/v3/brokerage/accounts"}"#
        );
        assert_eq!(sig.len(), 64, "raw r‖s, not DER");
        let payload = out["payload"].as_str().unwrap();
        assert_eq!(
            jwt,
            format!("{payload}.{}", out["signature"].as_str().unwrap())
        );
        let vk = p256::ecdsa::VerifyingKey::from_public_key_der(&spki).unwrap();
        let s = p256::ecdsa::Signature::from_slice(&sig).unwrap();
        vk.verify(payload.as_bytes(), &s).unwrap();
        assert_eq!(
            out["headers"],
            json!({"Authorization": format!("Bearer {jwt}")})
        );
        assert_eq!(out["jwt_header"]["alg"], "ES256");
        assert_eq!(out["jwt_claims"]["exp"], 1_700_000_120u64);
        assert_eq!(out["timestamp"], 1_700_000_000u64);
        assert_eq!(
            field_names(&out),
            [
                "signature",
                "headers",
                "jwt",
                "payload",
                "jwt_header",
                "jwt_claims",
                "timestamp"
            ]
        );
    }

    #[test]
    fn eddsa_is_deterministic_and_matches_dalek() {
        use ed25519_dalek::Signer;
        let (key, info) = ed25519();
        let req = json!({
            "method": "POST", "path": "/platform/v1/wallets", "host": "api.cdp.coinbase.com",
            "api_key": "7ad0b9a4-6a8d-4a4b-9b9e-1e0e4a5c2f11", "timestamp": 1_700_000_000u64,
            "jwt_nonce": "00ff"
        });
        let a = sign(&req, &key, &info, ClientTime::Any, 0).unwrap();
        let b = sign(&req, &key, &info, ClientTime::Any, 0).unwrap();
        assert_eq!(a, b);
        let (h, c, sig) = segments(a["jwt"].as_str().unwrap());
        assert_eq!(
            h,
            r#"{"alg":"EdDSA","kid":"7ad0b9a4-6a8d-4a4b-9b9e-1e0e4a5c2f11","nonce":"00ff","typ":"JWT"}"#
        );
        assert_eq!(
            c,
            r#"{"sub":"7ad0b9a4-6a8d-4a4b-9b9e-1e0e4a5c2f11","iss":"cdp","nbf":1700000000,"exp":1700000120,"uri":"POST api.cdp.coinbase.com/platform/v1/wallets"}"#
        );
        // RFC 8032 TEST 1 key through ed25519-dalek over the same signing input.
        let seed: [u8; 32] = hex::decode(RFC8032_TEST1_SEED).unwrap().try_into().unwrap();
        let dalek = ed25519_dalek::SigningKey::from_bytes(&seed);
        let expect = dalek.sign(a["payload"].as_str().unwrap().as_bytes());
        assert_eq!(sig, expect.to_bytes().to_vec());
    }

    #[test]
    fn websocket_and_unicode() {
        let (key, info) = ed25519();
        let out = sign(
            &json!({"websocket": true, "api_key": "ключ\"\\", "timestamp": 5, "jwt_nonce": "ab"}),
            &key,
            &info,
            ClientTime::Any,
            0,
        )
        .unwrap();
        let (h, c, _) = segments(out["jwt"].as_str().unwrap());
        assert_eq!(
            h,
            "{\"alg\":\"EdDSA\",\"kid\":\"ключ\\\"\\\\\",\"nonce\":\"ab\",\"typ\":\"JWT\"}"
        );
        assert_eq!(
            c,
            "{\"sub\":\"ключ\\\"\\\\\",\"iss\":\"cdp\",\"nbf\":5,\"exp\":125}"
        );
        assert_eq!(out["headers"], json!({}));
        assert_eq!(
            parse(P, &json!({"websocket": true, "api_key": "k"}))
                .unwrap()
                .view
                .method,
            None
        );
    }

    #[test]
    fn agent_clock_random_nonce_and_bound_key() {
        let (key, mut info, _) = p256();
        info.api_key = Some(KEY_NAME.into());
        let req = json!({"method": "GET", "path": "/x"});
        let a = sign(&req, &key, &info, ClientTime::Reject, 1_700_000_000_999).unwrap();
        let b = sign(&req, &key, &info, ClientTime::Reject, 1_700_000_000_999).unwrap();
        let (na, nb) = (&a["jwt_header"]["nonce"], &b["jwt_header"]["nonce"]);
        assert_ne!(na, nb);
        let n = na.as_str().unwrap();
        assert_eq!(n.len(), 32);
        assert!(n
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
        assert_eq!(a["jwt_claims"]["nbf"], 1_700_000_000u64);
        assert_eq!(a["jwt_claims"]["sub"], KEY_NAME);
        assert_eq!(a["jwt_claims"]["uri"], "GET api.coinbase.com/x");
    }

    #[test]
    fn error_paths() {
        let (key, info, _) = p256();
        let base = json!({"method": "GET", "path": "/x", "api_key": "k"});
        let with = |k: &str, v: Value| {
            let mut r = base.clone();
            r[k] = v;
            r
        };
        // Client time / jwt_nonce rejected unless the policy allows them.
        for req in [with("timestamp", json!(1)), with("jwt_nonce", json!("ab"))] {
            let e = sign(&req, &key, &info, ClientTime::Reject, 1_000).unwrap_err();
            assert_eq!(e.code(), "bad_request", "{req}");
        }
        for (skew, ok) in [(2_000, true), (500, false)] {
            let r = sign(
                &with("timestamp", json!(1_700_000_000u64)),
                &key,
                &info,
                ClientTime::Within(skew),
                1_700_000_001_000,
            );
            assert_eq!(r.is_ok(), ok, "{skew}");
        }
        assert!(sign(
            &with("jwt_nonce", json!("ab")),
            &key,
            &info,
            ClientTime::Within(1),
            0
        )
        .is_ok());
        for req in [
            with("path", json!("/x?a=1")),
            with("path", json!("x")),
            with("method", json!("GET /")),
            with("host", json!("https://api.coinbase.com")),
            with("host", json!("api.coinbase.com/evil")),
            with("host", json!("")),
            with("jwt_nonce", json!("ABCDEF")),
            with("jwt_nonce", json!("")),
            with("jwt_nonce", json!("xyz")),
            with("timestamp", json!(u64::MAX)),
            with("timestamp", json!(-1)),
            with("timestamp", json!("1")),
            with("websocket", json!(true)),
            with("websocket", json!("true")),
            with("query", json!("a=1")),
            with("api_key", json!(5)),
            with("api_key", json!("")),
            json!({"path": "/x", "api_key": "k"}),
            json!({"method": "GET", "path": "/x"}),
        ] {
            let e = sign(&req, &key, &info, ClientTime::Any, 0).unwrap_err();
            assert_eq!(e.code(), "bad_request", "{req}");
        }
        assert!(bad(P, &base, &hmac(b"k", KeyType::HmacSha256)).contains("coinbase"));
    }
}
