//! Profile `hyperliquid` (PROFILES.md §8): an L1 action is MessagePack-encoded like the Python
//! SDK, hashed with nonce/vault/expiry into a connection id, and signed as EIP-712 `Agent`.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::evm::{self, TypedData};
use super::{Clock, KeyInfo, OrderView, Plan, ProfileName, RequestView, TypedDataView};
use crate::error::{Error, Result};

/// Deepest nesting of arrays/maps in an action (real actions stay within about six).
const MAX_DEPTH: usize = 32;

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    #[default]
    Mainnet,
    Testnet,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    action: Map<String, Value>,
    nonce: Option<u64>,
    vault_address: Option<String>,
    expires_after: Option<u64>,
    #[serde(default)]
    network: Network,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::BadRequest(msg.into())
}

impl Request {
    pub fn view(&self) -> Result<RequestView> {
        let packed = pack_action(&self.action)?;
        if let Some(v) = &self.vault_address {
            evm::parse_address("vault_address", v)?;
        }
        Ok(RequestView {
            body_len: packed.len(),
            orders: orders(&self.action)?,
            typed_data: Some(TypedDataView {
                domain_name: Some("Exchange".into()),
                primary_type: "Agent".into(),
            }),
            ..RequestView::default()
        })
    }

    pub fn build(self, key: &KeyInfo, clock: &mut Clock<'_>) -> Result<Plan> {
        evm::require_secp256k1(ProfileName::Hyperliquid, key)?;
        let vault = self
            .vault_address
            .as_deref()
            .map(|v| evm::parse_address("vault_address", v))
            .transpose()?;
        let mut data = pack_action(&self.action)?;
        let nonce = clock.increasing_nonce("nonce", self.nonce)?;
        data.extend_from_slice(&nonce.to_be_bytes());
        match vault {
            None => data.push(0),
            Some(a) => {
                data.push(1);
                data.extend_from_slice(&a);
            }
        }
        if let Some(exp) = self.expires_after {
            data.push(0);
            data.extend_from_slice(&exp.to_be_bytes());
        }
        let connection_id = evm::keccak256(&data);
        let digest = agent_digest(&connection_id, self.network)?;
        Ok(evm::plan_digest(digest, key.address.clone(), move |f| {
            Ok(f.output(&[])
                .with("connection_id", evm::hex0x(&connection_id))
                .with("nonce", nonce))
        }))
    }
}

/// EIP-712 Agent{source, connectionId} in domain Exchange / 1 / 1337 / 0x0.
fn agent_digest(connection_id: &[u8; 32], network: Network) -> Result<[u8; 32]> {
    let source = match network {
        Network::Mainnet => "a",
        Network::Testnet => "b",
    };
    let td: TypedData = serde_json::from_value(json!({
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"}
            ],
            "Agent": [
                {"name": "source", "type": "string"},
                {"name": "connectionId", "type": "bytes32"}
            ]
        },
        "primaryType": "Agent",
        "domain": {
            "name": "Exchange", "version": "1", "chainId": 1337,
            "verifyingContract": "0x0000000000000000000000000000000000000000"
        },
        "message": {"source": source, "connectionId": evm::hex0x(connection_id)}
    }))
    .map_err(|e| Error::Internal(format!("Agent typed data: {e}")))?;
    td.digest()
}

/// MessagePack of the action exactly as Python `msgpack.packb(action, use_bin_type=True)`
/// produces it from the same JSON: key order kept, smallest encodings, no floats.
pub fn pack_action(action: &Map<String, Value>) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(256);
    pack_map(&mut out, action, "action", 0)?;
    Ok(out)
}

fn wfail<E>(_: E) -> Error {
    Error::Internal("msgpack write to memory failed".into())
}

fn len32(n: usize, path: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| bad(format!("`{}` is too large", short(path))))
}

fn short(s: &str) -> String {
    super::util::truncate(s, 80)
}

fn pack_map(out: &mut Vec<u8>, m: &Map<String, Value>, path: &str, depth: usize) -> Result<()> {
    rmp::encode::write_map_len(out, len32(m.len(), path)?).map_err(wfail)?;
    for (k, v) in m {
        rmp::encode::write_str(out, k).map_err(wfail)?;
        pack_value(out, v, &format!("{path}.{k}"), depth + 1)?;
    }
    Ok(())
}

fn pack_value(out: &mut Vec<u8>, v: &Value, path: &str, depth: usize) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(bad(format!(
            "`action` is nested deeper than {MAX_DEPTH} levels"
        )));
    }
    match v {
        Value::Null => rmp::encode::write_nil(out).map_err(wfail)?,
        Value::Bool(b) => rmp::encode::write_bool(out, *b).map_err(wfail)?,
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                rmp::encode::write_uint(out, u).map_err(wfail)?;
            } else if let Some(i) = n.as_i64() {
                rmp::encode::write_sint(out, i).map_err(wfail)?;
            } else {
                return Err(bad(format!(
                    "`{}` is not an integer: Hyperliquid prices and sizes are sent as strings (e.g. \"0.01\"), and integers must fit in 64 bits",
                    short(path)
                )));
            }
        }
        Value::String(s) => {
            len32(s.len(), path)?;
            rmp::encode::write_str(out, s).map_err(wfail)?;
        }
        Value::Array(items) => {
            rmp::encode::write_array_len(out, len32(items.len(), path)?).map_err(wfail)?;
            for (i, item) in items.iter().enumerate() {
                pack_value(out, item, &format!("{path}[{i}]"), depth + 1)?;
            }
        }
        Value::Object(m) => pack_map(out, m, path, depth)?,
    }
    Ok(())
}

/// Orders for policy guards: `order` (orders[]), `modify` (order), `batchModify`
/// (modifies[].order) and `twapOrder` (twap), each as asset index / size / price text.
fn orders(action: &Map<String, Value>) -> Result<Vec<OrderView>> {
    let ty = action.get("type").and_then(Value::as_str).unwrap_or("");
    let list = |field: &str| -> Result<&Vec<Value>> {
        action.get(field).and_then(Value::as_array).ok_or_else(|| {
            bad(format!(
                "`action.{field}` must be an array for type \"{ty}\""
            ))
        })
    };
    let single = |field: &str, has_price: bool| -> Result<Vec<OrderView>> {
        let path = format!("action.{field}");
        let o = action
            .get(field)
            .ok_or_else(|| bad(format!("`{path}` is required for type \"{ty}\"")))?;
        Ok(vec![order_view(o, &path, has_price)?])
    };
    match ty {
        "order" => list("orders")?
            .iter()
            .enumerate()
            .map(|(i, o)| order_view(o, &format!("action.orders[{i}]"), true))
            .collect(),
        "modify" => single("order", true),
        "batchModify" => list("modifies")?
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let path = format!("action.modifies[{i}].order");
                let o = m
                    .get("order")
                    .ok_or_else(|| bad(format!("`{path}` is required")))?;
                order_view(o, &path, true)
            })
            .collect(),
        // A TWAP order has no limit price.
        "twapOrder" => single("twap", false),
        _ => Ok(Vec::new()),
    }
}

fn order_view(v: &Value, path: &str, has_price: bool) -> Result<OrderView> {
    let o = v
        .as_object()
        .ok_or_else(|| bad(format!("`{path}` must be an object")))?;
    let asset = o.get("a").and_then(Value::as_u64).ok_or_else(|| {
        bad(format!(
            "`{path}.a` must be a non-negative integer asset index"
        ))
    })?;
    let text = |f: &str| -> Result<String> {
        o.get(f)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| bad(format!("`{path}.{f}` must be a decimal string")))
    };
    Ok(OrderView {
        symbol: Some(asset.to_string()),
        quantity: Some(text("s")?),
        price: if has_price { Some(text("p")?) } else { None },
    })
}

#[cfg(test)]
mod tests {
    use super::super::util::test_support::*;
    use super::super::{parse, ClientTime, Clock, OrderView, ProfileName};
    use super::pack_action;
    use serde_json::{json, Value};

    const P: ProfileName = ProfileName::Hyperliquid;
    /// hyperliquid-python-sdk tests/signing_test.py wallet.
    const PK: &str = "0x0123456789012345678901234567890123456789012345678901234567890123";

    fn pad(x: &str) -> String {
        // The SDK prints r/s via to_hex (no leading zeros); keyward zero-pads to 64 digits.
        format!("0x{:0>64}", x.trim_start_matches("0x"))
    }

    fn check(action: Value, vault: Option<&str>, cases: [(&str, &str, &str, u64); 2]) {
        let (key, info) = secp_key(PK);
        for ((network, r, s, v), net) in cases.into_iter().zip(["mainnet", "testnet"]) {
            assert_eq!(network, net);
            let mut req = json!({"action": action, "nonce": 0, "network": network});
            if let Some(a) = vault {
                req["vault_address"] = json!(a);
            }
            let out = run_as(P, &req, &key, &info).unwrap();
            assert_eq!(out["r"], pad(r), "{network} {action}");
            assert_eq!(out["s"], pad(s), "{network} {action}");
            assert_eq!(out["v"], v, "{network} {action}");
            assert_eq!(
                out["signature"].as_str().unwrap(),
                format!("{}{}{:02x}", pad(r), &pad(s)[2..], v)
            );
            assert_eq!(out["nonce"], 0);
            assert_eq!(out["headers"], json!({}));
        }
    }

    // Sources below: hyperliquid-dex/hyperliquid-python-sdk tests/signing_test.py (commit
    // 04f25f28, the msgpack-based signing). Actions are the JSON the SDK builds
    // (order_request_to_order_wire / order_wires_to_order_action, float_to_wire, to_raw).

    #[test]
    fn kat_l1_action_signing_matches() {
        // {"type": "dummy", "num": float_to_int_for_hashing(1000)} = 100000000000, nonce 0.
        check(
            json!({"type": "dummy", "num": 100000000000u64}),
            None,
            [
                (
                    "mainnet",
                    "0x53749d5b30552aeb2fca34b530185976545bb22d0b3ce6f62e31be961a59298",
                    "0x755c40ba9bf05223521753995abb2f73ab3229be8ec921f350cb447e384d8ed8",
                    27,
                ),
                (
                    "testnet",
                    "0x542af61ef1f429707e3c76c5293c80d01f74ef853e34b76efffcb57e574f9510",
                    "0x17b8b32f086e8cdede991f1e2c529f5dd5297cbe8128500e00cbaf766204a613",
                    28,
                ),
            ],
        );
    }

    #[test]
    fn kat_l1_action_signing_matches_with_vault() {
        check(
            json!({"type": "dummy", "num": 100000000000u64}),
            Some("0x1719884eb866cb12b2287399b15f7db5e7d775ea"),
            [
                (
                    "mainnet",
                    "0x3c548db75e479f8012acf3000ca3a6b05606bc2ec0c29c50c515066a326239",
                    "0x4d402be7396ce74fbba3795769cda45aec00dc3125a984f2a9f23177b190da2c",
                    28,
                ),
                (
                    "testnet",
                    "0xe281d2fb5c6e25ca01601f878e4d69c965bb598b88fac58e475dd1f5e56c362b",
                    "0x7ddad27e9a238d045c035bc606349d075d5c5cd00a6cd1da23ab5c39d4ef0f60",
                    27,
                ),
            ],
        );
    }

    fn order(t: Value, cloid: Option<&str>) -> Value {
        let mut o = json!({"a": 1, "b": true, "p": "100", "s": "100", "r": false, "t": t});
        if let Some(c) = cloid {
            o["c"] = json!(c);
        }
        json!({"type": "order", "orders": [o], "grouping": "na"})
    }

    #[test]
    fn kat_l1_action_signing_order_matches() {
        check(
            order(json!({"limit": {"tif": "Gtc"}}), None),
            None,
            [
                (
                    "mainnet",
                    "0xd65369825a9df5d80099e513cce430311d7d26ddf477f5b3a33d2806b100d78e",
                    "0x2b54116ff64054968aa237c20ca9ff68000f977c93289157748a3162b6ea940e",
                    28,
                ),
                (
                    "testnet",
                    "0x82b2ba28e76b3d761093aaded1b1cdad4960b3af30212b343fb2e6cdfa4e3d54",
                    "0x6b53878fc99d26047f4d7e8c90eb98955a109f44209163f52d8dc4278cbbd9f5",
                    27,
                ),
            ],
        );
    }

    #[test]
    fn kat_l1_action_signing_order_with_cloid_matches() {
        check(
            order(
                json!({"limit": {"tif": "Gtc"}}),
                Some("0x00000000000000000000000000000001"),
            ),
            None,
            [
                (
                    "mainnet",
                    "0x41ae18e8239a56cacbc5dad94d45d0b747e5da11ad564077fcac71277a946e3",
                    "0x3c61f667e747404fe7eea8f90ab0e76cc12ce60270438b2058324681a00116da",
                    27,
                ),
                (
                    "testnet",
                    "0xeba0664bed2676fc4e5a743bf89e5c7501aa6d870bdb9446e122c9466c5cd16d",
                    "0x7f3e74825c9114bc59086f1eebea2928c190fdfbfde144827cb02b85bbe90988",
                    28,
                ),
            ],
        );
    }

    #[test]
    fn kat_l1_action_signing_tpsl_order_matches() {
        check(
            order(
                json!({"trigger": {"isMarket": true, "triggerPx": "103", "tpsl": "sl"}}),
                None,
            ),
            None,
            [
                (
                    "mainnet",
                    "0x98343f2b5ae8e26bb2587daad3863bc70d8792b09af1841b6fdd530a2065a3f9",
                    "0x6b5bb6bb0633b710aa22b721dd9dee6d083646a5f8e581a20b545be6c1feb405",
                    27,
                ),
                (
                    "testnet",
                    "0x971c554d917c44e0e1b6cc45d8f9404f32172a9d3b3566262347d0302896a2e4",
                    "0x206257b104788f80450f8e786c329daa589aa0b32ba96948201ae556d5637eac",
                    28,
                ),
            ],
        );
    }

    #[test]
    fn kat_create_sub_account_action() {
        check(
            json!({"type": "createSubAccount", "name": "example"}),
            None,
            [
                (
                    "mainnet",
                    "0x51096fe3239421d16b671e192f574ae24ae14329099b6db28e479b86cdd6caa7",
                    "0xb71f7d293af92d3772572afb8b102d167a7cef7473388286bc01f52a5c5b423",
                    27,
                ),
                (
                    "testnet",
                    "0xa699e3ed5c2b89628c746d3298b5dc1cca604694c2c855da8bb8250ec8014a5b",
                    "0x53f1b8153a301c72ecc655b1c315d64e1dcea3ee58921fd7507e35818fcc1584",
                    28,
                ),
            ],
        );
    }

    #[test]
    fn kat_sub_account_transfer_action() {
        check(
            json!({
                "type": "subAccountTransfer",
                "subAccountUser": "0x1d9470d4b963f552e6f671a81619d395877bf409",
                "isDeposit": true,
                "usd": 10
            }),
            None,
            [
                (
                    "mainnet",
                    "0x43592d7c6c7d816ece2e206f174be61249d651944932b13343f4d13f306ae602",
                    "0x71a926cb5c9a7c01c3359ec4c4c34c16ff8107d610994d4de0e6430e5cc0f4c9",
                    28,
                ),
                (
                    "testnet",
                    "0xe26574013395ad55ee2f4e0575310f003c5bb3351b5425482e2969fa51543927",
                    "0xefb08999196366871f919fd0e138b3a7f30ee33e678df7cfaf203e25f0a4278",
                    28,
                ),
            ],
        );
    }

    #[test]
    fn kat_schedule_cancel_action() {
        check(
            json!({"type": "scheduleCancel"}),
            None,
            [
                (
                    "mainnet",
                    "0x6cdfb286702f5917e76cd9b3b8bf678fcc49aec194c02a73e6d4f16891195df9",
                    "0x6557ac307fa05d25b8d61f21fb8a938e703b3d9bf575f6717ba21ec61261b2a0",
                    27,
                ),
                (
                    "testnet",
                    "0xc75bb195c3f6a4e06b7d395acc20bbb224f6d23ccff7c6a26d327304e6efaeed",
                    "0x342f8ede109a29f2c0723bd5efb9e9100e3bbb493f8fb5164ee3d385908233df",
                    28,
                ),
            ],
        );
        check(
            json!({"type": "scheduleCancel", "time": 123456789}),
            None,
            [
                (
                    "mainnet",
                    "0x609cb20c737945d070716dcc696ba030e9976fcf5edad87afa7d877493109d55",
                    "0x16c685d63b5c7a04512d73f183b3d7a00da5406ff1f8aad33f8ae2163bab758b",
                    28,
                ),
                (
                    "testnet",
                    "0x4e4f2dbd4107c69783e251b7e1057d9f2b9d11cee213441ccfa2be63516dc5bc",
                    "0x706c656b23428c8ba356d68db207e11139ede1670481a9e01ae2dfcdb0e1a678",
                    27,
                ),
            ],
        );
    }

    #[test]
    fn kat_phantom_agent_creation_matches_production() {
        // test_phantom_agent_creation_matches_production: ETH (asset 4) buy 0.0147 @ 1670.1 Ioc,
        // nonce 1677777606040 → connectionId 0x0fcbeda5…2908.
        let (key, info) = secp_key(PK);
        let action = json!({
            "type": "order",
            "orders": [{"a": 4, "b": true, "p": "1670.1", "s": "0.0147", "r": false,
                        "t": {"limit": {"tif": "Ioc"}}}],
            "grouping": "na"
        });
        let out = run_as(
            P,
            &json!({"action": action, "nonce": 1677777606040u64}),
            &key,
            &info,
        )
        .unwrap();
        assert_eq!(
            out["connection_id"],
            "0x0fcbeda5ae3c4950a548021552a4fea2226858c4453571bf3f24ba017eac2908"
        );
        assert_eq!(out["nonce"], 1677777606040u64);
        assert_eq!(out["address"], info.address.clone().unwrap());
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
                "connection_id",
                "nonce"
            ]
        );
        let v = view(P, &json!({"action": action}));
        assert_eq!(
            v.orders,
            vec![OrderView {
                symbol: Some("4".into()),
                quantity: Some("0.0147".into()),
                price: Some("1670.1".into())
            }]
        );
        assert_eq!(
            v.typed_data.unwrap().domain_name.as_deref(),
            Some("Exchange")
        );
    }

    #[test]
    fn msgpack_matches_python_encodings() {
        // Expected bytes are what msgpack-python 1.x packb(..., use_bin_type=True) emits
        // (format tables of the MessagePack spec: fixint/uint8/16/32/64, fixstr/str8, …).
        let m = |v: Value| hex::encode(pack_action(v.as_object().unwrap()).unwrap());
        assert_eq!(m(json!({"a": 0})), "81a16100");
        assert_eq!(m(json!({"a": 127})), "81a1617f");
        assert_eq!(m(json!({"a": 128})), "81a161cc80");
        assert_eq!(m(json!({"a": 256})), "81a161cd0100");
        assert_eq!(m(json!({"a": 65536})), "81a161ce00010000");
        assert_eq!(m(json!({"a": 4294967296u64})), "81a161cf0000000100000000");
        assert_eq!(m(json!({"a": -1})), "81a161ff");
        assert_eq!(m(json!({"a": -32})), "81a161e0");
        assert_eq!(m(json!({"a": -33})), "81a161d0df");
        assert_eq!(m(json!({"a": -129})), "81a161d1ff7f");
        assert_eq!(m(json!({"a": i64::MIN})), "81a161d38000000000000000");
        assert_eq!(
            m(json!({"a": null, "b": true, "c": false})),
            "83a161c0a162c3a163c2"
        );
        assert_eq!(m(json!({"a": []})), "81a16190");
        let s31 = "x".repeat(31);
        let s32 = "x".repeat(32);
        assert_eq!(m(json!({"a": s31})), format!("81a161bf{}", "78".repeat(31)));
        assert_eq!(
            m(json!({"a": s32})),
            format!("81a161d920{}", "78".repeat(32))
        );
        let s256 = "x".repeat(256);
        assert!(m(json!({"a": s256})).starts_with("81a161da0100"));
        // Key order is the request's, not sorted.
        assert_eq!(m(json!({"b": 1, "a": 2})), "82a16201a16102");
        let arr: Vec<u8> = vec![0; 16];
        assert!(m(json!({"a": arr})).starts_with("81a161dc0010"));
        // Floats anywhere are refused.
        for bad in [
            json!({"a": 1.5}),
            json!({"a": [1.0]}),
            json!({"a": {"b": 1e3}}),
        ] {
            let e = pack_action(bad.as_object().unwrap()).unwrap_err();
            assert_eq!(e.code(), "bad_request");
        }
    }

    #[test]
    fn expires_after_and_agent_nonce() {
        let (key, info) = secp_key(PK);
        let action = json!({"type": "scheduleCancel"});
        let with = run_as(
            P,
            &json!({"action": action, "nonce": 5, "expires_after": 7}),
            &key,
            &info,
        )
        .unwrap();
        let mut data = pack_action(action.as_object().unwrap()).unwrap();
        data.extend_from_slice(&5u64.to_be_bytes());
        data.push(0);
        data.push(0);
        data.extend_from_slice(&7u64.to_be_bytes());
        assert_eq!(
            with["connection_id"],
            super::evm::hex0x(&super::evm::keccak256(&data))
        );
        // Without a client nonce the per-key increasing source is used, even with Reject.
        let mut calls = 0;
        let mut nonces = |now: u64| {
            calls += 1;
            Ok(now + 1)
        };
        let mut clock = Clock {
            now_ms: 1_700_000_000_000,
            client_time: ClientTime::Reject,
            nonces: &mut nonces,
        };
        let out = sign_on(P, &json!({"action": action}), &key, &info, &mut clock).unwrap();
        assert_eq!(out.0["nonce"], 1_700_000_000_001u64);
        // A client nonce is refused with Reject, accepted within the window.
        let e = parse(P, &json!({"action": action, "nonce": 1_700_000_000_000u64}))
            .unwrap()
            .build(&info, &mut clock)
            .err()
            .unwrap();
        assert_eq!(e.code(), "bad_request");
        let mut clock = Clock {
            now_ms: 1_700_000_000_000,
            client_time: ClientTime::Within(1000),
            nonces: &mut nonces,
        };
        assert!(
            parse(P, &json!({"action": action, "nonce": 1_700_000_000_500u64}))
                .unwrap()
                .build(&info, &mut clock)
                .is_ok()
        );
        assert!(
            parse(P, &json!({"action": action, "nonce": 1_700_000_002_000u64}))
                .unwrap()
                .build(&info, &mut clock)
                .is_err()
        );
        assert_eq!(calls, 1);
    }

    #[test]
    fn request_errors() {
        for req in [
            json!({}),
            json!({"action": []}),
            json!({"action": {"type": "order", "orders": [{"a": 1, "s": 1.5, "p": "1", "b": true}]}}),
            json!({"action": {"type": "order", "orders": [{"a": -1, "s": "1", "p": "1"}]}}),
            json!({"action": {"type": "order", "orders": [{"a": "1", "s": "1", "p": "1"}]}}),
            json!({"action": {"type": "order", "orders": "x"}}),
            json!({"action": {"type": "order"}}),
            json!({"action": {"type": "modify", "oid": 1}}),
            json!({"action": {"type": "batchModify", "modifies": [{"oid": 1}]}}),
            json!({"action": {"type": "x"}, "nonce": -1}),
            json!({"action": {"type": "x"}, "nonce": 1.5}),
            json!({"action": {"type": "x"}, "nonce": "1"}),
            json!({"action": {"type": "x"}, "vault_address": "0x12"}),
            json!({"action": {"type": "x"}, "network": "devnet"}),
            json!({"action": {"type": "x"}, "expires_after": -5}),
            json!({"action": {"type": "x"}, "vaultAddress": "0x1719884eb866cb12b2287399b15f7db5e7d775ea"}),
        ] {
            let e = parse(P, &req).err().unwrap();
            assert_eq!(e.code(), "bad_request", "{req}");
        }
        // Deep nesting stops at the limit instead of recursing.
        let mut v = json!(1);
        for _ in 0..100 {
            v = json!([v]);
        }
        assert!(parse(P, &json!({"action": {"type": "x", "deep": v}})).is_err());
        // Views of modify / batchModify / twap orders.
        let v = view(
            P,
            &json!({"action": {"type": "batchModify", "modifies": [
                {"oid": 1, "order": {"a": 3, "b": true, "p": "2", "s": "5", "r": false, "t": {"limit": {"tif": "Gtc"}}}}
            ]}}),
        );
        assert_eq!(v.orders[0].symbol.as_deref(), Some("3"));
        let v = view(
            P,
            &json!({"action": {"type": "twapOrder", "twap": {"a": 2, "b": true, "s": "9", "r": false, "m": 5, "t": false}}}),
        );
        assert_eq!(
            v.orders,
            vec![OrderView {
                symbol: Some("2".into()),
                quantity: Some("9".into()),
                price: None
            }]
        );
    }
}
