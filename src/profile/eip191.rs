//! Profile `eip191` (PROFILES.md §9): Ethereum `personal_sign` — keccak256 of the EIP-191
//! version 0x45 prefix, the decimal byte length and the message, signed with the wallet key.

use serde::Deserialize;

use super::evm;
use super::{Clock, KeyInfo, Plan, ProfileName, RequestView};
use crate::error::{Error, Result};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    message: Option<String>,
    message_hex: Option<String>,
}

impl Request {
    fn bytes(&self) -> Result<Vec<u8>> {
        match (&self.message, &self.message_hex) {
            (Some(m), None) => Ok(m.as_bytes().to_vec()),
            (None, Some(h)) => evm::parse_hex_bytes("message_hex", h),
            _ => Err(Error::BadRequest(
                "exactly one of `message` or `message_hex` is required".into(),
            )),
        }
    }

    pub fn view(&self) -> Result<RequestView> {
        Ok(RequestView {
            body_len: self.bytes()?.len(),
            ..RequestView::default()
        })
    }

    pub fn build(self, key: &KeyInfo, _clock: &mut Clock<'_>) -> Result<Plan> {
        evm::require_secp256k1(ProfileName::Eip191, key)?;
        let digest = digest(&self.bytes()?);
        Ok(evm::plan_digest(digest, key.address.clone(), |f| {
            Ok(f.output(&[]))
        }))
    }
}

/// keccak256("\x19Ethereum Signed Message:\n" ‖ decimal(len) ‖ message).
pub fn digest(message: &[u8]) -> [u8; 32] {
    let mut buf = Vec::with_capacity(message.len() + 48);
    buf.extend_from_slice(b"\x19Ethereum Signed Message:\n");
    buf.extend_from_slice(message.len().to_string().as_bytes());
    buf.extend_from_slice(message);
    evm::keccak256(&buf)
}

#[cfg(test)]
mod tests {
    use super::super::util::test_keys::COW_KEY;
    use super::super::util::test_support::*;
    use super::super::ProfileName;
    use crate::model::KeyType;
    use serde_json::json;

    const P: ProfileName = ProfileName::Eip191;

    #[test]
    fn cow_key_is_keccak_of_cow() {
        assert_eq!(
            crate::profile::evm::hex0x(&crate::profile::evm::keccak256(b"cow")),
            COW_KEY
        );
    }

    #[test]
    fn personal_sign_known_answers() {
        // Source: MetaMask/eth-sig-util src/personal-sign.test.ts (personalSign; the hex cases
        // are kumavis' vectors generated from geth's internals). `data` given as 0x-hex there is
        // taken as bytes, which is our `message_hex`.
        let cases = [
            (
                "0x4af1bceebf7f3634ec3cff8a2c38e51178d5d4ce585c52d6043e5e2cc3418bb0",
                json!({"message": "Hello, world!"}),
                "0x90a938f7457df6e8f741264c32697fc52f9a8f867c52dd70713d9d2d472f2e415d9c94148991bbe1f4a1818d1dff09165782749c877f5cf1eff4ef126e55714d1c",
                None,
            ),
            (
                "0x6969696969696969696969696969696969696969696969696969696969696969",
                json!({"message_hex": "0x68656c6c6f20776f726c64"}),
                "0xce909e8ea6851bc36c007a0072d0524b07a3ff8d4e623aca4c71ca8e57250c4d0a3fc38fa8fbaaa81ead4b9f6bd03356b6f8bf18bccad167d78891636e1d69561b",
                Some("0xbe93f9bacbcffc8ee6663f2647917ed7a20a57bb"),
            ),
            (
                "0x6969696969696969696969696969696969696969696969696969696969696969",
                json!({"message_hex": "0x0cc175b9c0f1b6a831c399e26977266192eb5ffee6ae2fec3ad71c777531578f"}),
                "0x9ff8350cc7354b80740a3580d0e0fd4f1f02062040bc06b893d70906f8728bb5163837fd376bf77ce03b55e9bd092b32af60e86abce48f7b8d3539988ee5a9be1c",
                Some("0xbe93f9bacbcffc8ee6663f2647917ed7a20a57bb"),
            ),
            (
                "0x4545454545454545454545454545454545454545454545454545454545454545",
                json!({"message_hex": "0x0cc175b9c0f1b6a831c399e26977266192eb5ffee6ae2fec3ad71c777531578f"}),
                "0xa2870db1d0c26ef93c7b72d2a0830fa6b841e0593f7186bc6c7cc317af8cf3a42fda03bd589a49949aa05db83300cdb553116274518dbe9d90c65d0213f4af491b",
                Some("0xe0da1edcea030875cd0f199d96eb70f6ab78faf2"),
            ),
        ];
        for (k, req, sig, addr) in cases {
            let (key, info) = secp_key(k);
            let out = run_as(P, &req, &key, &info).unwrap();
            assert_eq!(out["signature"], sig, "{req}");
            assert_eq!(out["r"], &sig[..66]);
            assert_eq!(out["s"], format!("0x{}", &sig[66..130]));
            assert_eq!(
                out["v"].as_u64().unwrap(),
                u64::from_str_radix(&sig[130..], 16).unwrap()
            );
            if let Some(a) = addr {
                assert_eq!(out["address"].as_str().unwrap().to_lowercase(), a);
            }
            assert_eq!(out["headers"], json!({}));
        }
        // The digest is the EIP-191 hash: "hello world" as text and as hex agree.
        let (key, info) = secp_key(COW_KEY);
        let text = run_as(P, &json!({"message": "hello world"}), &key, &info).unwrap();
        let hex = run_as(
            P,
            &json!({"message_hex": "0x68656c6c6f20776f726c64"}),
            &key,
            &info,
        )
        .unwrap();
        assert_eq!(text, hex);
        let mut pre = b"\x19Ethereum Signed Message:\n11".to_vec();
        pre.extend_from_slice(b"hello world");
        assert_eq!(
            text["digest"],
            crate::profile::evm::hex0x(&crate::profile::evm::keccak256(&pre))
        );
        assert_eq!(
            text["address"],
            "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826"
        );
    }

    #[test]
    fn request_errors() {
        let (key, info) = secp_key(COW_KEY);
        for req in [
            json!({}),
            json!({"message": "a", "message_hex": "0x61"}),
            json!({"message": 1}),
            json!({"message_hex": "61"}),
            json!({"message_hex": "0x6"}),
            json!({"message": "a", "extra": 1}),
            json!({"message": null, "message_hex": null}),
        ] {
            let e = run_as(P, &req, &key, &info).unwrap_err();
            assert_eq!(e.code(), "bad_request", "{req}");
        }
        // Empty message is allowed: "0x" and "".
        assert!(run_as(P, &json!({"message_hex": "0x"}), &key, &info).is_ok());
        // A non-secp256k1 key is refused.
        bad(
            P,
            &json!({"message": "a"}),
            &hmac(b"k", KeyType::HmacSha256),
        );
    }
}
