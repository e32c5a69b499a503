//! Profile `okx` (PROFILES.md §5): OKX API v5, base64 HMAC-SHA256 over
//! `iso_ts ‖ method ‖ path[?query] ‖ body`, sent as the `OK-ACCESS-*` headers.

use serde::Deserialize;

use super::util::{self, required_field};
use super::{Clock, KeyInfo, Plan, ProfileName, RequestView};
use crate::error::{Error, Result};
use crate::model::{Algorithm, KeyType};

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
    #[serde(default)]
    passphrase: Option<String>,
    /// Demo trading: adds `x-simulated-trading: 1`.
    #[serde(default)]
    simulated: Option<bool>,
    /// Milliseconds since the epoch.
    #[serde(default)]
    timestamp: Option<u64>,
}

impl Request {
    pub fn view(&self) -> Result<RequestView> {
        let body = self.body.as_deref().unwrap_or("");
        let orders = util::json_orders(body, None, |o| util::json_order(o, ["instId", "sz", "px"]));
        util::http_view(&self.method, &self.path, body, orders)
    }

    pub fn build(self, key: &KeyInfo, clock: &mut Clock<'_>) -> Result<Plan> {
        key.key_type_for(ProfileName::Okx, KeyType::is_hmac)?;
        let api_key = required_field("api_key", self.api_key.as_deref(), key.api_key.as_deref())?;
        let passphrase = required_field(
            "passphrase",
            self.passphrase.as_deref(),
            key.passphrase.as_deref(),
        )?;
        let ts = clock.timestamp_ms("timestamp", self.timestamp)?;
        let iso = iso_millis(ts)?;
        let query = self.query.unwrap_or_default();
        let request_path = if query.is_empty() {
            self.path
        } else {
            format!("{}?{query}", self.path)
        };
        let payload = format!(
            "{iso}{}{request_path}{}",
            self.method,
            self.body.unwrap_or_default()
        );
        let simulated = self.simulated.unwrap_or(false);
        Ok(Plan::text_with_headers(
            Algorithm::HmacSha256,
            payload,
            ts,
            util::b64,
            move |signature| {
                let mut headers = vec![
                    ("OK-ACCESS-KEY", api_key),
                    ("OK-ACCESS-SIGN", signature),
                    ("OK-ACCESS-TIMESTAMP", iso),
                    ("OK-ACCESS-PASSPHRASE", passphrase),
                ];
                if simulated {
                    headers.push(("x-simulated-trading", "1".into()));
                }
                headers
            },
        ))
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC, exactly three fractional digits).
fn iso_millis(ms: u64) -> Result<String> {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&fmt).ok())
        .filter(|s| s.len() == 24)
        .ok_or_else(|| Error::BadRequest("`timestamp` is out of range for an ISO 8601 date".into()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::util::test_keys::ED25519_PKCS8;
    use super::super::util::test_support::*;
    use super::super::{ClientTime, KeyInfo, ProfileName};
    use crate::model::KeyType;

    const P: ProfileName = ProfileName::Okx;
    // https://www.okx.com/docs-v5/en/#overview-rest-authentication-making-requests: the docs'
    // example SecretKey, timestamp 2020-12-08T09:08:57.715Z and request paths/body. OKX
    // publishes no resulting signature; the expected values were computed independently with
    // `printf '%s' "$prehash" | openssl dgst -sha256 -hmac "$secret" -binary | base64`.
    const SECRET: &[u8] = b"22582BD0CFF14C41EDBF1AB98506286D";
    const TS: u64 = 1607418537715;

    #[test]
    fn kat_get_with_query() {
        let out = run(
            P,
            &json!({
                "method": "GET", "path": "/api/v5/account/balance", "query": "ccy=BTC",
                "api_key": "ak", "passphrase": "pp", "timestamp": TS
            }),
            &hmac(SECRET, KeyType::HmacSha256),
        );
        let sig = "HiZhvSfMtWJA3uUIVXV3a/bSXNPCWvYFXoGCVS8V4zY=";
        assert_eq!(
            out,
            json!({
                "signature": sig,
                "headers": {
                    "OK-ACCESS-KEY": "ak",
                    "OK-ACCESS-SIGN": sig,
                    "OK-ACCESS-TIMESTAMP": "2020-12-08T09:08:57.715Z",
                    "OK-ACCESS-PASSPHRASE": "pp"
                },
                "payload": "2020-12-08T09:08:57.715ZGET/api/v5/account/balance?ccy=BTC",
                "timestamp": TS
            })
        );
    }

    #[test]
    fn kat_post_with_body_and_demo_header() {
        let body = r#"{"instId":"BTC-USDT","lever":"5","mgnMode":"isolated"}"#;
        let out = run(
            P,
            &json!({
                "method": "POST", "path": "/api/v5/account/set-leverage", "body": body,
                "api_key": "ak", "passphrase": "pp", "timestamp": TS, "simulated": true
            }),
            &hmac(SECRET, KeyType::HmacSha256),
        );
        assert_eq!(
            out["signature"],
            "eCnnCgWLjlQ9XnpUkrcny3qNq3WW/81KNrDr/XR6Xv8="
        );
        assert_eq!(out["headers"]["x-simulated-trading"], "1");
        assert_eq!(field_names(&out["headers"]).len(), 5);
    }

    #[test]
    fn timestamps_format_with_millis() {
        assert_eq!(super::iso_millis(0).unwrap(), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::iso_millis(1).unwrap(), "1970-01-01T00:00:00.001Z");
        assert!(super::iso_millis(u64::MAX).is_err());
    }

    #[test]
    fn bound_fields_and_orders() {
        let k = hmac(SECRET, KeyType::HmacSha256);
        let info = KeyInfo {
            key_type: Some(KeyType::HmacSha256),
            api_key: Some("ak".into()),
            passphrase: Some("pp".into()),
            ..KeyInfo::default()
        };
        let out = sign_with(
            P,
            &json!({"method": "GET", "path": "/api/v5/account/balance"}),
            &k,
            &info,
            NOW_MS,
            ClientTime::Reject,
        )
        .unwrap();
        assert_eq!(out.0["headers"]["OK-ACCESS-PASSPHRASE"], "pp");
        assert_eq!(out.0["timestamp"], NOW_MS);
        let batch = r#"[{"instId":"BTC-USDT","tdMode":"cash","side":"buy","ordType":"limit","px":"2.15","sz":"2"},{"instId":"ETH-USDT","sz":"1"}]"#;
        let v = view(
            P,
            &json!({"method":"POST","path":"/api/v5/trade/batch-orders","body":batch}),
        );
        assert_eq!(v.orders.len(), 2);
        assert_eq!(v.orders[0].price.as_deref(), Some("2.15"));
        assert_eq!(v.orders[1].quantity.as_deref(), Some("1"));
        let v = view(P, &json!({"method":"POST","path":"/x","body":"[[["}));
        assert!(v.orders.is_empty());
    }

    #[test]
    fn error_paths() {
        let k = hmac(SECRET, KeyType::HmacSha256);
        for r in [
            json!({"method": "GET", "path": "/a", "api_key": "a", "passphrase": "p", "x": 1}),
            json!({"method": "GET", "path": "/a#f", "api_key": "a", "passphrase": "p"}),
            json!({"method": "GET", "path": "/a", "api_key": "a"}),
            json!({"method": "GET", "path": "/a", "passphrase": "p"}),
            json!({"method": "GET", "path": "/a", "api_key": "a", "passphrase": "p", "simulated": "true"}),
            json!({"method": "GET", "path": "/a", "api_key": "a", "passphrase": "p", "timestamp": u64::MAX}),
        ] {
            bad(P, &r, &k);
        }
        let ts = json!({"method": "GET", "path": "/a", "api_key": "a", "passphrase": "p", "timestamp": NOW_MS});
        assert_eq!(
            err_with(P, &ts, &k, ClientTime::Reject).code(),
            "bad_request"
        );
        let ed = pem(ED25519_PKCS8);
        assert!(bad(P, &ts, &ed).contains("ed25519"));
    }
}
