//! Profile `bybit` (PROFILES.md §6): Bybit v5, HMAC-SHA256 (hex) or RSA PKCS#1 v1.5 (base64)
//! over `ts ‖ api_key ‖ recv_window ‖ (GET ? query : body)`, sent as `X-BAPI-*` headers.

use serde::Deserialize;

use super::util::{self, required_field};
use super::{unsupported_key, Clock, KeyInfo, Plan, ProfileName, RequestView};
use crate::error::Result;
use crate::model::{Algorithm, KeyType};

const DEFAULT_RECV_WINDOW: u64 = 5000;
/// Order fields as Bybit names them: symbol, quantity, price.
const ORDER_FIELDS: [&str; 3] = ["symbol", "qty", "price"];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    method: String,
    path: String,
    #[serde(default)]
    query: Option<String>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    api_key: Option<String>,
    /// Milliseconds, default 5000.
    #[serde(default)]
    recv_window: Option<u64>,
    /// Milliseconds since the epoch.
    #[serde(default)]
    timestamp: Option<u64>,
}

impl Request {
    pub fn view(&self) -> Result<RequestView> {
        let body = self.body.as_deref().unwrap_or("");
        let orders = if self.method == "GET" {
            let pairs = util::parse_form(self.query.as_deref().unwrap_or(""));
            util::form_order(&pairs, ORDER_FIELDS)
        } else {
            // A batch body carries its orders in `request`.
            util::json_orders(body, Some("request"), |o| util::json_order(o, ORDER_FIELDS))
        };
        util::http_view(&self.method, &self.path, body, orders)
    }

    pub fn build(self, key: &KeyInfo, clock: &mut Clock<'_>) -> Result<Plan> {
        let (alg, encode): (Algorithm, fn(&[u8]) -> String) = match key.key_type()? {
            KeyType::HmacSha256 | KeyType::HmacSha512 => {
                (Algorithm::HmacSha256, |b| hex::encode(b))
            }
            t if t.is_rsa() => (Algorithm::RsaPkcs1Sha256, util::b64),
            other => return Err(unsupported_key(ProfileName::Bybit, other)),
        };
        let api_key = required_field("api_key", self.api_key.as_deref(), key.api_key.as_deref())?;
        let ts = clock.timestamp_ms("timestamp", self.timestamp)?;
        let rw = self.recv_window.unwrap_or(DEFAULT_RECV_WINDOW);
        // Bybit signs the query of a GET and the body of everything else, exactly as sent.
        let signed_part = if self.method == "GET" {
            self.query.unwrap_or_default()
        } else {
            self.body.unwrap_or_default()
        };
        let payload = format!("{ts}{api_key}{rw}{signed_part}");
        Ok(Plan::text_with_headers(
            alg,
            payload,
            ts,
            encode,
            move |signature| {
                vec![
                    ("X-BAPI-API-KEY", api_key),
                    ("X-BAPI-TIMESTAMP", ts.to_string()),
                    ("X-BAPI-RECV-WINDOW", rw.to_string()),
                    ("X-BAPI-SIGN", signature),
                ]
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::util::test_keys::*;
    use super::super::util::test_support::*;
    use super::super::ProfileName;
    use crate::model::KeyType;

    const P: ProfileName = ProfileName::Bybit;
    // https://bybit-exchange.github.io/docs/v5/guide#authentication: the docs' worked
    // parameters (GET `category=option&symbol=BTC-29JUL22-25000-C` at 1658384314791, POST
    // `{"category": "option"}` at 1658385579423, api key XXXXXXXXXX, recv_window 5000). Bybit
    // publishes no resulting signature; expected values were computed independently
    // (`openssl dgst -sha256 -hmac`, and Python `cryptography` PKCS1v15/SHA256 for RSA).
    const SECRET: &[u8] = b"YYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYY";

    /// The docs' GET example, signed with HMAC and with RSA.
    fn docs_get() -> serde_json::Value {
        json!({
            "method": "GET", "path": "/v5/order/realtime",
            "query": "category=option&symbol=BTC-29JUL22-25000-C",
            "api_key": "XXXXXXXXXX", "timestamp": 1658384314791u64
        })
    }

    #[test]
    fn kat_get_hmac() {
        let out = run(P, &docs_get(), &hmac(SECRET, KeyType::HmacSha256));
        let sig = "49c26b0f76e0bec6b926f119814d66c4bdf59de44adf2a1864b1ea0bfd9c710c";
        assert_eq!(
            out,
            json!({
                "signature": sig,
                "headers": {
                    "X-BAPI-API-KEY": "XXXXXXXXXX",
                    "X-BAPI-TIMESTAMP": "1658384314791",
                    "X-BAPI-RECV-WINDOW": "5000",
                    "X-BAPI-SIGN": sig
                },
                "payload": "1658384314791XXXXXXXXXX5000category=option&symbol=BTC-29JUL22-25000-C",
                "timestamp": 1658384314791u64
            })
        );
    }

    #[test]
    fn kat_post_hmac_signs_body_not_query() {
        let out = run(
            P,
            &json!({
                "method": "POST", "path": "/v5/order/cancel-all", "query": "ignored=1",
                "body": "{\"category\": \"option\"}",
                "api_key": "XXXXXXXXXX", "timestamp": 1658385579423u64, "recv_window": 5000
            }),
            &hmac(SECRET, KeyType::HmacSha256),
        );
        assert_eq!(
            out["payload"],
            "1658385579423XXXXXXXXXX5000{\"category\": \"option\"}"
        );
        assert_eq!(
            out["signature"],
            "9bada36eb7c33a2723028d84d0ee4b01d52abedd3ca9c79e2e8ba88a958b373a"
        );
    }

    #[test]
    fn kat_get_rsa() {
        let out = run(P, &docs_get(), &pem(RSA_2048_PKCS8));
        let sig = "PnP33MIMZ2copZyBn9jc0sBredQw3vdMRFmaIjIaFmawL/rI8ImlsEPTMrl0etO2n4ruEIn9pNBEN1Yode1RdaSwngtoLTDc+aAZXAQxmDKLZfoSzYjTG1Ji/0pG4HKAb5gWVzCRSk3XDJBYBC2KCdUcUJhZsY6sFPfnAS4R2tDsfTx8TGv/2YB43uzxPs6lBLX2UD7G20Cl5mgmnd/awwxOFxWBENeu+LPr4JxQ1Pti4elP+Y3fTeHYP41XbPCkK1w7hQb6BqSeXu3cd83i7+I+uA0WQCJRfdypb3z8GLNDVW1p1qV6Y1UshupVaYw64vAeMn8d+j6LPq45sfmONQ==";
        assert_eq!(out["signature"], sig);
        assert_eq!(out["headers"]["X-BAPI-SIGN"], sig);
    }

    #[test]
    fn orders_for_guards() {
        let body = r#"{"category":"spot","symbol":"BTCUSDT","side":"Buy","orderType":"Limit","qty":"0.1","price":"15600"}"#;
        let v = view(
            P,
            &json!({"method":"POST","path":"/v5/order/create","body":body}),
        );
        assert_eq!(v.orders.len(), 1);
        assert_eq!(v.orders[0].quantity.as_deref(), Some("0.1"));
        let batch = r#"{"category":"linear","request":[{"symbol":"A","qty":"1"},{"symbol":"B","qty":"2","price":"3"}]}"#;
        let v = view(
            P,
            &json!({"method":"POST","path":"/v5/order/create-batch","body":batch}),
        );
        assert_eq!(v.orders.len(), 2);
        assert_eq!(v.orders[1].price.as_deref(), Some("3"));
        let v = view(
            P,
            &json!({"method":"GET","path":"/v5/order/realtime","query":"category=linear&symbol=ETHUSDT"}),
        );
        assert_eq!(v.orders[0].symbol.as_deref(), Some("ETHUSDT"));
        let v = view(
            P,
            &json!({"method":"POST","path":"/v5/order/create","body":"qty=1"}),
        );
        assert!(v.orders.is_empty());
    }

    #[test]
    fn error_paths() {
        let k = hmac(SECRET, KeyType::HmacSha256);
        for r in [
            json!({"method": "GET", "path": "/a", "api_key": "a", "sign_type": 2}),
            json!({"method": "GET", "path": "a", "api_key": "a"}),
            json!({"method": "GET", "path": "/a"}),
            json!({"method": "GET", "path": "/a", "api_key": "a", "recv_window": -1}),
            json!({"method": "GET", "path": "/a", "api_key": "a", "recv_window": 5000.0}),
        ] {
            bad(P, &r, &k);
        }
        let ts = json!({"method": "GET", "path": "/a", "api_key": "a", "timestamp": NOW_MS + 1});
        check_client_time(P, &ts, &k, 1, None);
        assert!(bad(P, &ts, &pem(ED25519_PKCS8)).contains("bybit"));
    }
}
