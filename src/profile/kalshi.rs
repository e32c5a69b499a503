//! Profile `kalshi` (PROFILES.md §1): Kalshi Trade API v2, RSA-PSS over
//! `timestamp_ms ‖ method ‖ path`, sent as the `KALSHI-ACCESS-*` headers.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::util::{self, required_field};
use super::{Clock, KeyInfo, OrderView, Plan, ProfileName, RequestView};
use crate::error::Result;
use crate::model::{Algorithm, KeyType};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    method: String,
    path: String,
    /// Accepted so clients can pass the whole request; Kalshi never signs the query.
    #[serde(default)]
    #[allow(dead_code)]
    query: Option<String>,
    /// Never signed either; parsed only for order guards.
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    api_key: Option<String>,
    /// Milliseconds since the epoch.
    #[serde(default)]
    timestamp: Option<u64>,
}

impl Request {
    pub fn view(&self) -> Result<RequestView> {
        let body = self.body.as_deref().unwrap_or("");
        util::http_view(&self.method, &self.path, body, orders(body))
    }

    pub fn build(self, key: &KeyInfo, clock: &mut Clock<'_>) -> Result<Plan> {
        key.key_type_for(ProfileName::Kalshi, KeyType::is_rsa)?;
        let api_key = required_field("api_key", self.api_key.as_deref(), key.api_key.as_deref())?;
        let ts = clock.timestamp_ms("timestamp", self.timestamp)?;
        let payload = format!("{ts}{}{}", self.method, self.path);
        // Salt length 32 (= SHA-256 output) is what RsaPssSha256 means; "max" is rejected by Kalshi.
        Ok(Plan::text_with_headers(
            Algorithm::RsaPssSha256,
            payload,
            ts,
            util::b64,
            move |signature| {
                vec![
                    ("KALSHI-ACCESS-KEY", api_key),
                    ("KALSHI-ACCESS-TIMESTAMP", ts.to_string()),
                    ("KALSHI-ACCESS-SIGNATURE", signature),
                ]
            },
        ))
    }
}

/// Orders in a create-order body (`{"ticker","count","yes_price"|"no_price",…}`) or a batch
/// (`{"orders":[…]}`). Quantity is the contract count; price is the limit in cents
/// (`yes_price`, else `no_price`), as Kalshi's integer text.
fn orders(body: &str) -> Vec<OrderView> {
    util::json_orders(body, Some("orders"), order)
}

/// A price alone is no order: Kalshi orders always name a ticker or a count.
fn order(o: &Map<String, Value>) -> Option<OrderView> {
    let order = OrderView {
        symbol: util::json_text(o.get("ticker")),
        quantity: util::json_text(o.get("count")),
        price: util::json_text(o.get("yes_price")).or_else(|| util::json_text(o.get("no_price"))),
    };
    (order.symbol.is_some() || order.quantity.is_some()).then_some(order)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::util::test_keys::*;
    use super::super::util::test_support::*;
    use super::super::{ClientTime, KeyInfo, ProfileName};
    use crate::model::KeyType;

    const P: ProfileName = ProfileName::Kalshi;

    // Kalshi publishes no fixed vector (PSS is randomised): the canonical string and headers
    // are checked field by field against https://docs.kalshi.com/getting_started/api_keys
    // ("timestamp + method + path, path without query") and the signature is verified with the
    // public key, salt length 32.
    #[test]
    fn signs_the_documented_string_and_verifies_with_the_public_key() {
        let key = pem(RSA_2048_PKCS8);
        let req = json!({
            "method": "GET",
            "path": "/trade-api/v2/portfolio/balance",
            "query": "limit=5",
            "api_key": "a952bcbe-ec3b-4b5b-b8f9-11dae589608c",
            "timestamp": 1703123456789u64
        });
        let out = run(P, &req, &key);
        let payload = "1703123456789GET/trade-api/v2/portfolio/balance";
        assert_eq!(out["payload"], payload);
        assert_eq!(out["timestamp"], 1703123456789u64);
        let sig = out["signature"].as_str().unwrap();
        assert_eq!(
            out["headers"],
            json!({
                "KALSHI-ACCESS-KEY": "a952bcbe-ec3b-4b5b-b8f9-11dae589608c",
                "KALSHI-ACCESS-TIMESTAMP": "1703123456789",
                "KALSHI-ACCESS-SIGNATURE": sig
            })
        );
        verify_rsa_pss(RSA_2048_PKCS8, payload.as_bytes(), sig);
        // Randomised: a second signature of the same payload differs and also verifies.
        let again = run(P, &req, &key);
        assert_eq!(again["payload"], payload);
        assert_ne!(again["signature"], out["signature"]);
        verify_rsa_pss(
            RSA_2048_PKCS8,
            payload.as_bytes(),
            again["signature"].as_str().unwrap(),
        );
    }

    #[test]
    fn websocket_handshake_and_agent_clock() {
        let key = pem(RSA_2048_PKCS8);
        let req = json!({"method": "GET", "path": "/trade-api/ws/v2", "api_key": "k"});
        let out = run(P, &req, &key);
        assert_eq!(out["payload"], format!("{NOW_MS}GET/trade-api/ws/v2"));
        assert_eq!(
            out["headers"]["KALSHI-ACCESS-TIMESTAMP"],
            NOW_MS.to_string()
        );
    }

    #[test]
    fn api_key_comes_from_the_key_when_not_given() {
        let key = pem(RSA_2048_PKCS8);
        let info = KeyInfo {
            key_type: Some(key.key_type()),
            api_key: Some("bound".into()),
            ..KeyInfo::default()
        };
        let req = json!({"method": "GET", "path": "/trade-api/v2/exchange/status"});
        let out = sign_with(P, &req, &key, &info, NOW_MS, ClientTime::Reject).unwrap();
        assert_eq!(out.0["headers"]["KALSHI-ACCESS-KEY"], "bound");
        let other = json!({"method": "GET", "path": "/x", "api_key": "other"});
        assert!(sign_with(P, &other, &key, &info, NOW_MS, ClientTime::Reject).is_err());
        // No key anywhere → bad_request.
        assert!(bad(P, &json!({"method": "GET", "path": "/x"}), &key).contains("api_key"));
    }

    #[test]
    fn orders_for_guards() {
        let body = r#"{"ticker":"KXBTC-25","action":"buy","side":"yes","count":10,"type":"limit","yes_price":55}"#;
        let v = view(
            P,
            &json!({"method":"POST","path":"/trade-api/v2/portfolio/orders","body":body}),
        );
        assert_eq!(v.orders.len(), 1);
        assert_eq!(v.orders[0].symbol.as_deref(), Some("KXBTC-25"));
        assert_eq!(v.orders[0].quantity.as_deref(), Some("10"));
        assert_eq!(v.orders[0].price.as_deref(), Some("55"));
        assert_eq!(v.body_len, body.len());
        let batch =
            r#"{"orders":[{"ticker":"A","count":1,"no_price":40},{"ticker":"B","count":2}]}"#;
        let v = view(P, &json!({"method":"POST","path":"/p","body":batch}));
        assert_eq!(v.orders.len(), 2);
        assert_eq!(v.orders[0].price.as_deref(), Some("40"));
        assert_eq!(v.orders[1].price, None);
        let v = view(P, &json!({"method":"POST","path":"/p","body":"{not json"}));
        assert!(v.orders.is_empty());
    }

    #[test]
    fn error_paths() {
        let key = pem(RSA_2048_PKCS8);
        let ok = json!({"method": "GET", "path": "/p", "api_key": "k"});
        for bad_req in [
            json!({"method": "GET", "path": "/p", "api_key": "k", "extra": 1}),
            json!({"method": "GET", "path": "/p?x=1", "api_key": "k"}),
            json!({"method": "GET", "path": "/p", "api_key": "k", "timestamp": "1"}),
            json!({"method": "GET", "path": "/p", "api_key": "k", "timestamp": -1}),
            json!({"method": "GET", "path": "/p", "api_key": "k", "timestamp": 1.5}),
            serde_json::from_str(
                r#"{"method":"GET","path":"/p","api_key":"k","timestamp":18446744073709551616}"#,
            )
            .unwrap(),
            json!({"method": "G E T", "path": "/p", "api_key": "k"}),
            json!({"path": "/p", "api_key": "k"}),
            json!(["not", "an", "object"]),
        ] {
            bad(P, &bad_req, &key);
        }
        // Client time: rejected over the socket by default, accepted within the skew.
        let mut with_ts = ok.clone();
        with_ts["timestamp"] = json!(NOW_MS + 500);
        check_client_time(P, &with_ts, &key, 1000, Some(100));
        // Wrong key type.
        let h = hmac(b"secret", KeyType::HmacSha256);
        assert!(bad(P, &ok, &h).contains("kalshi"));
    }
}
