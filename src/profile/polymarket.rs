//! Profile `polymarket` (PROFILES.md §7): L1 = EIP-712 `ClobAuth` wallet signature (creates or
//! derives API credentials); L2 = HMAC-SHA256 over ts‖method‖path‖body on every trading call.

use serde::Deserialize;
use serde_json::json;

use super::evm::{self, TypedData};
use super::{util, Clock, KeyInfo, Plan, ProfileName, RequestView, TypedDataView};
use crate::error::{Error, Result};
use crate::model::{Algorithm, KeyType};

const PROFILE: ProfileName = ProfileName::Polymarket;
const DOMAIN_NAME: &str = "ClobAuthDomain";
const PRIMARY_TYPE: &str = "ClobAuth";
const ATTESTATION: &str = "This message attests that I control the given wallet";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Auth {
    L1,
    L2,
}

/// One struct for both levels (serde cannot combine `deny_unknown_fields` with an internally
/// tagged enum); fields of the other level are refused in [`Request::view`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    auth: Auth,
    // L1
    chain_id: Option<u64>,
    nonce: Option<u64>,
    // L2
    method: Option<String>,
    path: Option<String>,
    body: Option<String>,
    api_key: Option<String>,
    passphrase: Option<String>,
    address: Option<String>,
    // both
    timestamp: Option<u64>,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::BadRequest(msg.into())
}

impl Request {
    fn check_fields(&self) -> Result<()> {
        let (level, foreign): (&str, &[(&str, bool)]) = match self.auth {
            Auth::L1 => (
                "l1",
                &[
                    ("method", self.method.is_some()),
                    ("path", self.path.is_some()),
                    ("body", self.body.is_some()),
                    ("api_key", self.api_key.is_some()),
                    ("passphrase", self.passphrase.is_some()),
                    ("address", self.address.is_some()),
                ],
            ),
            Auth::L2 => (
                "l2",
                &[
                    ("chain_id", self.chain_id.is_some()),
                    ("nonce", self.nonce.is_some()),
                ],
            ),
        };
        if let Some((name, _)) = foreign.iter().find(|(_, set)| *set) {
            return Err(bad(format!(
                "polymarket request: `{name}` is not a field of auth \"{level}\""
            )));
        }
        Ok(())
    }

    pub fn view(&self) -> Result<RequestView> {
        self.check_fields()?;
        match self.auth {
            Auth::L1 => Ok(RequestView {
                typed_data: Some(TypedDataView {
                    domain_name: Some(DOMAIN_NAME.into()),
                    primary_type: PRIMARY_TYPE.into(),
                }),
                ..RequestView::default()
            }),
            Auth::L2 => {
                let method = self
                    .method
                    .as_deref()
                    .ok_or_else(|| bad("`method` is required for auth \"l2\""))?;
                let path = self
                    .path
                    .as_deref()
                    .ok_or_else(|| bad("`path` is required for auth \"l2\""))?;
                let body = self.body.as_deref().unwrap_or("");
                util::http_view(method, path, body, Vec::new())
            }
        }
    }

    pub fn build(self, key: &KeyInfo, clock: &mut Clock<'_>) -> Result<Plan> {
        self.view()?;
        match self.auth {
            Auth::L1 => self.build_l1(key, clock),
            Auth::L2 => self.build_l2(key, clock),
        }
    }

    fn build_l1(self, key: &KeyInfo, clock: &mut Clock<'_>) -> Result<Plan> {
        evm::require_secp256k1(PROFILE, key)?;
        let address = key.address.clone().ok_or_else(|| {
            Error::Internal("the secp256k1 key has no address in its key info".into())
        })?;
        evm::parse_address("address", &address)?;
        let ts = clock.timestamp_s("timestamp", self.timestamp)?;
        // Not time-based: the client picks it (0 creates, others derive) — §7.
        let nonce = self.nonce.unwrap_or(0);
        let chain_id = self.chain_id.unwrap_or(137);
        let digest = clob_auth_digest(&address, ts, nonce, chain_id)?;
        Ok(evm::plan_digest(digest, Some(address), move |f| {
            let headers = [
                ("POLY_ADDRESS", f.address.clone()),
                ("POLY_SIGNATURE", f.signature.clone()),
                ("POLY_TIMESTAMP", ts.to_string()),
                ("POLY_NONCE", nonce.to_string()),
            ];
            Ok(f.output(&headers)
                .with("timestamp", ts)
                .with("nonce", nonce))
        }))
    }

    fn build_l2(self, key: &KeyInfo, clock: &mut Clock<'_>) -> Result<Plan> {
        key.key_type_for(PROFILE, KeyType::is_hmac)?;
        let api_key =
            util::required_field("api_key", self.api_key.as_deref(), key.api_key.as_deref())?;
        let passphrase = util::required_field(
            "passphrase",
            self.passphrase.as_deref(),
            key.passphrase.as_deref(),
        )?;
        let address =
            util::required_field("address", self.address.as_deref(), key.address.as_deref())?;
        header_value("api_key", &api_key)?;
        header_value("passphrase", &passphrase)?;
        evm::parse_address("address", &address)?;
        let ts = clock.timestamp_s("timestamp", self.timestamp)?;
        let (method, path) = (
            self.method.unwrap_or_default(),
            self.path.unwrap_or_default(),
        );
        let payload = format!("{ts}{method}{path}{}", self.body.unwrap_or_default());
        Ok(Plan::text_with_headers(
            Algorithm::HmacSha256,
            payload,
            ts,
            util::b64url_padded,
            move |signature| {
                vec![
                    ("POLY_ADDRESS", address),
                    ("POLY_SIGNATURE", signature),
                    ("POLY_TIMESTAMP", ts.to_string()),
                    ("POLY_API_KEY", api_key),
                    ("POLY_PASSPHRASE", passphrase),
                ]
            },
        ))
    }
}

/// Values that become HTTP header values: non-empty, no control characters.
fn header_value(field: &str, v: &str) -> Result<()> {
    if v.is_empty() || v.chars().any(char::is_control) {
        return Err(bad(format!(
            "`{field}` must be non-empty and free of control characters"
        )));
    }
    Ok(())
}

/// EIP-712 digest of ClobAuth{address, timestamp (decimal string), nonce, message} in
/// domain {name: ClobAuthDomain, version: 1, chainId} (no verifyingContract).
fn clob_auth_digest(address: &str, ts: u64, nonce: u64, chain_id: u64) -> Result<[u8; 32]> {
    let td: TypedData = serde_json::from_value(json!({
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"}
            ],
            "ClobAuth": [
                {"name": "address", "type": "address"},
                {"name": "timestamp", "type": "string"},
                {"name": "nonce", "type": "uint256"},
                {"name": "message", "type": "string"}
            ]
        },
        "primaryType": PRIMARY_TYPE,
        "domain": {"name": DOMAIN_NAME, "version": "1", "chainId": chain_id},
        "message": {
            "address": address,
            "timestamp": ts.to_string(),
            "nonce": nonce,
            "message": ATTESTATION
        }
    }))
    .map_err(|e| Error::Internal(format!("ClobAuth typed data: {e}")))?;
    td.digest()
}

#[cfg(test)]
mod tests {
    use super::super::util::test_support::*;
    use super::super::{ClientTime, Clock, KeyInfo, ProfileName, TypedDataView};
    use crate::backend::soft::MemoryKey;
    use crate::model::KeyType;
    use base64::Engine;
    use serde_json::{json, Value};

    const P: ProfileName = ProfileName::Polymarket;
    /// py-clob-client's "publicly known private key" (the Hardhat/Anvil account #0).
    const PK: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";

    #[test]
    fn l1_py_clob_client_amoy() {
        // Source: Polymarket/py-clob-client tests/signing/test_eip712.py (commit e724b467):
        // chain AMOY (80002), sign_clob_auth_message(signer, 10000000, 23).
        let (key, info) = secp_key(PK);
        let req = json!({"auth": "l1", "chain_id": 80002, "timestamp": 10000000, "nonce": 23});
        let out = run_as(P, &req, &key, &info).unwrap();
        let sig = "0xf62319a987514da40e57e2f4d7529f7bac38f0355bd88bb5adbb3768d80de6c1682518e0af677d5260366425f4361e7b70c25ae232aff0ab2331e2b164a1aedc1b";
        assert_eq!(out["signature"], sig);
        assert_eq!(out["address"], "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266");
        assert_eq!(out["timestamp"], 10000000);
        assert_eq!(out["nonce"], 23);
        assert_eq!(
            out["headers"],
            json!({
                "POLY_ADDRESS": "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266",
                "POLY_SIGNATURE": sig,
                "POLY_TIMESTAMP": "10000000",
                "POLY_NONCE": "23"
            })
        );
        assert_eq!(
            field_names(&out),
            [
                "signature",
                "headers",
                "r",
                "s",
                "v",
                "digest",
                "address",
                "timestamp",
                "nonce"
            ]
        );
    }

    #[test]
    fn l1_py_clob_client_mumbai() {
        // Source: Polymarket/py-clob-client tests/signing/test_eip712.py, earlier revision with
        // chain MUMBAI (80001), same timestamp and nonce.
        let (key, info) = secp_key(PK);
        let req = json!({"auth": "l1", "chain_id": 80001, "timestamp": 10000000, "nonce": 23});
        let out = run_as(P, &req, &key, &info).unwrap();
        assert_eq!(
            out["signature"],
            "0xd91760ebcb14e814e9e12600b9bc7cd6bf13ebc175f6a28538b4925763f94f90012da34dd71290d441c28bc4f9b2281d3eb9ecfd1c9a63db1ce9ca85c89c914c1b"
        );
    }

    #[test]
    fn l1_defaults_and_clock() {
        let (key, info) = secp_key(PK);
        // Agent clock (seconds), nonce 0, chain 137 — nonce is allowed even with Reject.
        let mut nonces = |now: u64| Ok(now);
        let mut clock = Clock {
            now_ms: 1_700_000_000_123,
            client_time: ClientTime::Reject,
            nonces: &mut nonces,
        };
        let req = json!({"auth": "l1", "nonce": 5});
        assert_eq!(
            view(P, &req).typed_data,
            Some(TypedDataView {
                domain_name: Some("ClobAuthDomain".into()),
                primary_type: "ClobAuth".into()
            })
        );
        let out = sign_on(P, &req, &key, &info, &mut clock)
            .unwrap()
            .into_value();
        assert_eq!(out["timestamp"], 1_700_000_000u64);
        assert_eq!(out["headers"]["POLY_NONCE"], "5");
        let same = run_as(
            P,
            &json!({"auth": "l1", "nonce": 5, "chain_id": 137, "timestamp": 1_700_000_000u64}),
            &key,
            &info,
        )
        .unwrap();
        assert_eq!(same["signature"], out["signature"]);
        // Client timestamp refused with Reject, accepted within the skew window only.
        for (client_time, ok) in [
            (ClientTime::Reject, false),
            (ClientTime::Within(5_000), true),
            (ClientTime::Within(100), false),
        ] {
            let mut clock = Clock {
                now_ms: 1_700_000_003_000,
                client_time,
                nonces: &mut nonces,
            };
            let req = json!({"auth": "l1", "timestamp": 1_700_000_000u64});
            let r = sign_on(P, &req, &key, &info, &mut clock);
            assert_eq!(r.is_ok(), ok, "{client_time:?}");
            if let Err(e) = r {
                assert_eq!(e.code(), "bad_request");
            }
        }
    }

    fn hmac_key(secret_b64url: &str) -> (MemoryKey, KeyInfo) {
        // Polymarket secrets are base64url; the key store holds the decoded bytes (§0).
        let raw = base64::engine::general_purpose::URL_SAFE
            .decode(secret_b64url)
            .unwrap();
        let key = hmac(&raw, KeyType::HmacSha256);
        let info = info(&key);
        (key, info)
    }

    fn l2(body: Value) -> Value {
        let mut r = json!({
            "auth": "l2", "method": "test-sign", "path": "/orders", "timestamp": 1000000,
            "api_key": "000000000-0000-0000-0000-000000000000",
            "passphrase": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "address": "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
        });
        if !body.is_null() {
            r["body"] = body;
        }
        r
    }

    #[test]
    fn l2_py_clob_client_hmac() {
        // Source: Polymarket/py-clob-client tests/signing/test_hmac.py (commit 043b1d68):
        // build_hmac_signature("AAAA…A=", "1000000", "test-sign", "/orders", '{"hash": "0x123"}')
        // == "ZwAdJKvoYRlEKDkNMwd5BuwNNtg93kNaR_oU2HrfVvc=" (body signed verbatim).
        let (key, info) = hmac_key("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=");
        let out = run_as(P, &l2(json!("{\"hash\": \"0x123\"}")), &key, &info).unwrap();
        let sig = "ZwAdJKvoYRlEKDkNMwd5BuwNNtg93kNaR_oU2HrfVvc=";
        assert_eq!(out["signature"], sig);
        assert_eq!(
            out["payload"],
            "1000000test-sign/orders{\"hash\": \"0x123\"}"
        );
        assert_eq!(out["timestamp"], 1000000);
        assert_eq!(
            out["headers"],
            json!({
                "POLY_ADDRESS": "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266",
                "POLY_SIGNATURE": sig,
                "POLY_TIMESTAMP": "1000000",
                "POLY_API_KEY": "000000000-0000-0000-0000-000000000000",
                "POLY_PASSPHRASE": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
            })
        );
        assert_eq!(
            field_names(&out["headers"]),
            [
                "POLY_ADDRESS",
                "POLY_SIGNATURE",
                "POLY_TIMESTAMP",
                "POLY_API_KEY",
                "POLY_PASSPHRASE"
            ]
        );
    }

    #[test]
    fn l2_py_clob_client_hmac_json_encoded_body() {
        // Source: Polymarket/py-clob-client tests/signing/test_hmac.py (current revision):
        // the client now JSON-encodes a string body before signing, so the bytes it sends are
        // "{\"hash\": \"0x123\"}" with quotes — signing those exact bytes gives its expected value.
        let (key, info) = hmac_key("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=");
        let out = run_as(
            P,
            &l2(json!("\"{\\\"hash\\\": \\\"0x123\\\"}\"")),
            &key,
            &info,
        )
        .unwrap();
        assert_eq!(
            out["signature"],
            "a3ZnZvcsH3ZwD7FuHGttDruLDurcl9PffnPSvac_bWQ="
        );
    }

    #[test]
    fn l2_view_defaults_and_errors() {
        let (key, mut info) = hmac_key("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=");
        let v = view(P, &l2(json!("{}")));
        assert_eq!(v.method.as_deref(), Some("test-sign"));
        assert_eq!(v.path.as_deref(), Some("/orders"));
        assert_eq!(v.body_len, 2);
        // Empty body: nothing appended.
        let out = run_as(P, &l2(Value::Null), &key, &info).unwrap();
        assert_eq!(out["payload"], "1000000test-sign/orders");
        // Bound values from the key.
        info.api_key = Some("k".into());
        info.passphrase = Some("p".into());
        info.address = Some("0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266".into());
        let out = run_as(
            P,
            &json!({"auth": "l2", "method": "GET", "path": "/x", "timestamp": 1}),
            &key,
            &info,
        )
        .unwrap();
        assert_eq!(out["headers"]["POLY_API_KEY"], "k");
        assert_eq!(out["headers"]["POLY_PASSPHRASE"], "p");
        let mut mismatched = l2(Value::Null);
        mismatched["api_key"] = json!("other");
        let mut bad_addr = l2(Value::Null);
        bad_addr["address"] = json!("0x12");
        let mut ctl = l2(Value::Null);
        ctl["passphrase"] = json!("a\r\nX-Injected: 1");
        let (skey, sinfo) = secp_key(PK);
        for (req, use_secp) in [
            (mismatched, false),
            (bad_addr, false),
            (ctl, false),
            (
                json!({"auth": "l2", "method": "GET", "path": "/x?a=1"}),
                false,
            ),
            (json!({"auth": "l2", "method": "GET"}), false),
            (json!({"auth": "l2", "method": "G T", "path": "/x"}), false),
            (
                json!({"auth": "l2", "method": "GET", "path": "/x", "nonce": 1}),
                false,
            ),
            (json!({"auth": "l1", "path": "/x"}), true),
            (json!({"auth": "l3"}), true),
            (json!({"auth": "l1", "nonce": -1}), true),
            (json!({"auth": "l1", "nonce": "1"}), true),
            (json!({"auth": "l1", "chain_id": 1.5}), true),
            (json!({"auth": "l1", "query": ""}), true),
            (json!({"auth": "l1", "timestamp": u64::MAX}), true),
            // Wrong key type for the level.
            (json!({"auth": "l1"}), false),
            (l2(Value::Null), true),
        ] {
            let r = if use_secp {
                run_as(P, &req, &skey, &sinfo)
            } else {
                run_as(P, &req, &key, &info)
            };
            let e = match r {
                Ok(_) if req["timestamp"] == json!(u64::MAX) => continue,
                Ok(v) => panic!("accepted {req}: {v}"),
                Err(e) => e,
            };
            assert_eq!(e.code(), "bad_request", "{req}: {e}");
        }
    }
}
