//! Profile `eip712` (PROFILES.md §10): generic `eth_signTypedData_v4` typed data, hashed per
//! EIP-712 (evm.rs) and signed with the wallet key.

use serde::Deserialize;

use super::evm::{self, TypedData};
use super::{Clock, KeyInfo, Plan, ProfileName, RequestView};
use crate::error::Result;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    typed_data: TypedData,
}

impl Request {
    pub fn view(&self) -> Result<RequestView> {
        // Hashing here rejects malformed typed data before policy or a key is involved.
        self.typed_data.digest()?;
        Ok(RequestView {
            body_len: typed_data_len(&self.typed_data),
            typed_data: Some(self.typed_data.view()),
            ..RequestView::default()
        })
    }

    pub fn build(self, key: &KeyInfo, _clock: &mut Clock<'_>) -> Result<Plan> {
        evm::require_secp256k1(ProfileName::Eip712, key)?;
        let digest = self.typed_data.digest()?;
        Ok(evm::plan_digest(digest, key.address.clone(), |f| {
            Ok(f.output(&[]))
        }))
    }
}

/// Size of the typed data as compact JSON (what `max_body_bytes` limits).
fn typed_data_len(td: &TypedData) -> usize {
    serde_json::to_vec(td).map_or(0, |v| v.len())
}

#[cfg(test)]
mod tests {
    use super::super::util::test_keys::COW_KEY;
    use super::super::util::test_support::*;
    use super::super::{parse, ProfileName, TypedDataView};
    use serde_json::{json, Value};

    const P: ProfileName = ProfileName::Eip712;

    /// `typed_data` signed with the cow key.
    fn signed(typed_data: Value) -> Value {
        let (key, info) = secp_key(COW_KEY);
        run_as(P, &json!({ "typed_data": typed_data }), &key, &info).unwrap()
    }

    #[test]
    fn eip_mail_example() {
        // Source: ethereum/EIPs assets/eip-712/Example.js (commit 68b7c485): private key
        // keccak256("cow"), signHash 0xbe609aee…7bd2, v 28, r 0x4355c47d…1c9d, s 0x07299936…1562.
        let out = signed(eip712_mail(false));
        assert_eq!(
            out["digest"],
            "0xbe609aee343fb3c4b28e1df9e632fca64fcfaede20f02e86244efddf30957bd2"
        );
        assert_eq!(out["v"], 28);
        assert_eq!(
            out["r"],
            "0x4355c47d63924e8a72e509b65029052eb6c299d53a04e167c5775fd466751c9d"
        );
        assert_eq!(
            out["s"],
            "0x07299936d304c153f6443dfa05f40ff007d72911b6f72307f996231605b91562"
        );
        assert_eq!(
            out["signature"],
            "0x4355c47d63924e8a72e509b65029052eb6c299d53a04e167c5775fd466751c9d07299936d304c153f6443dfa05f40ff007d72911b6f72307f996231605b915621c"
        );
        assert_eq!(out["address"], "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826");
        assert_eq!(out["headers"], json!({}));
        assert_eq!(
            field_names(&out),
            ["signature", "headers", "r", "s", "v", "digest", "address"]
        );
    }

    #[test]
    fn eip_mail_example_with_custom_domain_field() {
        // Source: ethereum/EIPs assets/eip-712/Example.js (commit 18f02487, the revision whose
        // domain carries `string httpOrigin`): signHash 0xa5f5fa6b…593e, v 27,
        // r 0x24040eda…0480, s 0x42bbabf2…d057.
        let out = signed(eip712_mail(true));
        assert_eq!(
            out["digest"],
            "0xa5f5fa6b05af38f2e9d2889ac36f5a4ba31e20646781d23739de458d86d6593e"
        );
        assert_eq!(out["v"], 27);
        assert_eq!(
            out["r"],
            "0x24040eda35064d96c51f3308b5fae290edae563327348886a366ed604e0c0480"
        );
        assert_eq!(
            out["s"],
            "0x42bbabf2fae4b00598596a99d577dde56ff9d013e861f611cfe7b0728e1cd057"
        );
    }

    #[test]
    fn eth_sig_util_v4_arrays() {
        // Source: MetaMask/eth-sig-util test "signedTypeData_v4" (arrays of structs and of
        // addresses, an unused type `Group`): digest 0xa85c2e2b…9cc2, signature 0x65cbd956…061b.
        let td = json!({
            "types": {
                "EIP712Domain": [
                    {"name": "name", "type": "string"},
                    {"name": "version", "type": "string"},
                    {"name": "chainId", "type": "uint256"},
                    {"name": "verifyingContract", "type": "address"}
                ],
                "Person": [{"name": "name", "type": "string"}, {"name": "wallets", "type": "address[]"}],
                "Mail": [
                    {"name": "from", "type": "Person"},
                    {"name": "to", "type": "Person[]"},
                    {"name": "contents", "type": "string"}
                ],
                "Group": [{"name": "name", "type": "string"}, {"name": "members", "type": "Person[]"}]
            },
            "domain": {
                "name": "Ether Mail", "version": "1", "chainId": 1,
                "verifyingContract": "0xCcCCccccCCCCcCCCCCCcCcCccCcCCCcCcccccccC"
            },
            "primaryType": "Mail",
            "message": {
                "from": {
                    "name": "Cow",
                    "wallets": [
                        "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826",
                        "0xDeaDbeefdEAdbeefdEadbEEFdeadbeEFdEaDbeeF"
                    ]
                },
                "to": [{
                    "name": "Bob",
                    "wallets": [
                        "0xbBbBBBBbbBBBbbbBbbBbbbbBBbBbbbbBbBbbBBbB",
                        "0xB0BdaBea57B0BDABeA57b0bdABEA57b0BDabEa57",
                        "0xB0B0b0b0b0b0B000000000000000000000000000"
                    ]
                }],
                "contents": "Hello, Bob!"
            }
        });
        let out = signed(td.clone());
        assert_eq!(
            out["digest"],
            "0xa85c2e2b118698e88db68a8105b794a8cc7cec074e89ef991cb4f5f533819cc2"
        );
        assert_eq!(
            out["signature"],
            "0x65cbd956f2fae28a601bebc9b906cea0191744bd4c4247bcd27cd08f8eb6b71c78efdf7a31dc9abee78f492292721f362d296cf86b4538e07b51303b67f749061b"
        );
        // Intermediate hashes from the same test.
        let t: super::TypedData = serde_json::from_value(td).unwrap();
        let (dom, msg) = t.hashes().unwrap();
        assert_eq!(
            super::evm::hex0x(&dom),
            "0xf2cee375fa42b42143804025fc449deafd50cc031ca257e0b194a650a912090f"
        );
        assert_eq!(
            super::evm::hex0x(&msg),
            "0xeb4221181ff3f1a83ea7313993ca9218496e424604ba9492bb4052c03d5c3df8"
        );
    }

    #[test]
    fn view_and_errors() {
        let v = view(P, &json!({"typed_data": eip712_mail(false)}));
        assert_eq!(
            v.typed_data,
            Some(TypedDataView {
                domain_name: Some("Ether Mail".into()),
                primary_type: "Mail".into()
            })
        );
        assert!(v.body_len > 100);
        assert_eq!(v.method, None);
        let mut extra = eip712_mail(false);
        extra["extra"] = json!(1);
        let mut bad_int = eip712_mail(false);
        bad_int["domain"]["chainId"] = json!(1.5);
        let mut big_num = eip712_mail(false);
        big_num["domain"]["chainId"] = json!(1e30);
        let mut neg = eip712_mail(false);
        neg["domain"]["chainId"] = json!(-1);
        let mut bad_addr = eip712_mail(false);
        bad_addr["message"]["to"]["wallet"] = json!("0x1234");
        let mut missing = eip712_mail(false);
        missing["message"]["to"]
            .as_object_mut()
            .unwrap()
            .remove("wallet");
        for req in [
            json!({}),
            json!({"typed_data": eip712_mail(false), "x": 1}),
            json!({"typed_data": extra}),
            json!({"typed_data": bad_int}),
            json!({"typed_data": big_num}),
            json!({"typed_data": neg}),
            json!({"typed_data": bad_addr}),
            json!({"typed_data": missing}),
            json!({"typed_data": "str"}),
        ] {
            let e = parse(P, &req).err().unwrap();
            assert_eq!(e.code(), "bad_request", "{req}");
        }
        // Large integers as decimal and 0x strings are accepted.
        let mut s = eip712_mail(false);
        s["domain"]["chainId"] = json!("0x1");
        let out = signed(s);
        assert_eq!(
            out["digest"],
            "0xbe609aee343fb3c4b28e1df9e632fca64fcfaede20f02e86244efddf30957bd2"
        );
        let msg = parse(P, &json!({"typed_data": big_num_msg()}))
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("decimal or 0x string"), "{msg}");
    }

    fn big_num_msg() -> Value {
        let mut v = eip712_mail(false);
        v["domain"]["chainId"] = json!(18446744073709551616.0_f64);
        v
    }
}
