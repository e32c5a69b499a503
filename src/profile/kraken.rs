//! Profile `kraken` (PROFILES.md §4): Kraken Spot REST private endpoints, HMAC-SHA512 over
//! `path ‖ SHA-256(nonce ‖ postdata)` with the nonce placed first in the POST body.

use serde::Deserialize;

use super::util::{self, required_field};
use super::{Clock, KeyInfo, Output, Plan, ProfileName, RequestView};
use crate::error::{Error, Result};
use crate::model::{Algorithm, KeyType};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    path: String,
    /// Form-urlencoded parameters without `nonce`.
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    api_key: Option<String>,
    #[serde(default)]
    nonce: Option<u64>,
}

impl Request {
    pub fn view(&self) -> Result<RequestView> {
        let body = self.body.as_deref().unwrap_or("");
        let orders = util::form_order(&util::parse_form(body), ["pair", "volume", "price"]);
        // Every Kraken private endpoint is a POST; naming it lets `methods` policies apply.
        let view = util::http_view("POST", &self.path, body, orders)?;
        if util::forbidden_form_param(body, &["nonce"]).is_some() {
            return Err(Error::BadRequest(
                "`body` must not contain `nonce`: keyward puts it first".into(),
            ));
        }
        Ok(view)
    }

    pub fn build(self, key: &KeyInfo, clock: &mut Clock<'_>) -> Result<Plan> {
        key.key_type_for(ProfileName::Kraken, KeyType::is_hmac)?;
        let api_key = required_field("api_key", self.api_key.as_deref(), key.api_key.as_deref())?;
        let nonce = clock.increasing_nonce("nonce", self.nonce)?;
        let body = self.body.unwrap_or_default();
        let postdata = if body.is_empty() {
            format!("nonce={nonce}")
        } else {
            format!("nonce={nonce}&{body}")
        };
        let mut message = self.path.into_bytes();
        message.extend_from_slice(&util::sha256(format!("{nonce}{postdata}").as_bytes()));
        Ok(Plan::new(Algorithm::HmacSha512, message, move |sig| {
            let signature = util::b64(&sig.bytes);
            Ok(Output::new(
                signature.clone(),
                &[("API-Key", api_key), ("API-Sign", signature)],
            )
            .with("body", postdata)
            .with("nonce", nonce))
        }))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::util::test_keys::RSA_2048_PKCS8;
    use super::super::util::test_support::*;
    use super::super::{offline, ClientTime, ProfileName};
    use crate::model::KeyType;
    use crate::secret::SecretBytes;

    const P: ProfileName = ProfileName::Kraken;
    // https://docs.kraken.com/api/docs/guides/spot-rest-auth ("Example"): private key,
    // nonce, URI path, post data and the resulting API-Sign.
    const SECRET: &str =
        "kQH5HW/8p1uGOVjbgWA7FunAmGO8lsSUXNsu3eow76sz84Q18fWxnyRzBHCd3pd5nE9qa99HAZtuZuj6F1huXg==";
    const API_SIGN: &str =
        "4/dpxb3iT4tp/ZCVEwSnEsLxx0bqyhLpdfOpc6fn7OR8+UClSV5n9E6aSS8MPtnRfp32bAb0nmbRn6H8ndwLUQ==";

    fn key() -> crate::backend::soft::MemoryKey {
        let bytes =
            offline::decode_hmac_secret(P, SecretBytes::from_slice(SECRET.as_bytes())).unwrap();
        assert_eq!(bytes.len(), 64);
        hmac(bytes.expose(), KeyType::HmacSha512)
    }

    #[test]
    fn kat_kraken_published_example() {
        let out = run(
            P,
            &json!({
                "path": "/0/private/AddOrder",
                "body": "ordertype=limit&pair=XBTUSD&price=37500&type=buy&volume=1.25",
                "api_key": "my-api-key",
                "nonce": 1616492376594u64
            }),
            &key(),
        );
        assert_eq!(
            out,
            json!({
                "signature": API_SIGN,
                "headers": {"API-Key": "my-api-key", "API-Sign": API_SIGN},
                "body": "nonce=1616492376594&ordertype=limit&pair=XBTUSD&price=37500&type=buy&volume=1.25",
                "nonce": 1616492376594u64
            })
        );
    }

    #[test]
    fn empty_body_and_agent_nonce() {
        let out = run(
            P,
            &json!({"path": "/0/private/Balance", "api_key": "k"}),
            &key(),
        );
        assert_eq!(out["body"], format!("nonce={NOW_MS}"));
        assert_eq!(out["nonce"], NOW_MS);
        // The nonce source is the clock's strictly increasing one, not `now` itself.
        let k = key();
        let mut last = NOW_MS + 10;
        let mut nonces = |now: u64| -> crate::error::Result<u64> {
            last = (last + 1).max(now);
            Ok(last)
        };
        let mut clock = super::super::Clock {
            now_ms: NOW_MS,
            client_time: ClientTime::Reject,
            nonces: &mut nonces,
        };
        let req = json!({"path": "/0/private/Balance", "api_key": "k"});
        let out = sign_on(P, &req, &k, &info(&k), &mut clock).unwrap();
        assert_eq!(out.0["nonce"], NOW_MS + 11);
    }

    #[test]
    fn orders_for_guards() {
        let v = view(
            P,
            &json!({"path": "/0/private/AddOrder",
                    "body": "ordertype=limit&pair=XBTUSD&price=37500&type=buy&volume=1.25"}),
        );
        assert_eq!(v.method.as_deref(), Some("POST"));
        assert_eq!(v.orders[0].symbol.as_deref(), Some("XBTUSD"));
        assert_eq!(v.orders[0].quantity.as_deref(), Some("1.25"));
        assert_eq!(v.orders[0].price.as_deref(), Some("37500"));
    }

    #[test]
    fn error_paths() {
        let k = key();
        for r in [
            json!({"path": "/0/private/Balance", "api_key": "k", "method": "POST"}),
            json!({"path": "/0/private/Balance?x=1", "api_key": "k"}),
            json!({"path": "/0/private/Balance", "api_key": "k", "body": "nonce=5&a=1"}),
            json!({"path": "/0/private/Balance", "api_key": "k", "nonce": "5"}),
            json!({"path": "/0/private/Balance", "api_key": "k", "nonce": -5}),
            json!({"path": "/0/private/Balance"}),
        ] {
            bad(P, &r, &k);
        }
        let with_nonce = json!({"path": "/0/private/Balance", "api_key": "k", "nonce": NOW_MS});
        check_client_time(P, &with_nonce, &k, 10, None);
        let rsa = pem(RSA_2048_PKCS8);
        assert!(bad(P, &with_nonce, &rsa).contains("kraken"));
    }
}
