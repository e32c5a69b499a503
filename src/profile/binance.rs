//! Profile `binance` (PROFILES.md §2): Binance Spot SIGNED requests, REST (query/body with
//! `timestamp` and `signature` appended) and WebSocket API (sorted params), HMAC/RSA/Ed25519.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::util::{self, bound_field, required_field};
use super::{unsupported_key, Clock, KeyInfo, Output, Plan, ProfileName, RequestView};
use crate::backend::Signature;
use crate::error::{Error, Result};
use crate::model::{Algorithm, KeyType};

/// Parameters keyward adds itself; a request carrying them would be signed twice.
const REST_FORBIDDEN: [&str; 3] = ["timestamp", "recvWindow", "signature"];
const WS_FORBIDDEN: [&str; 4] = ["apiKey", "timestamp", "recvWindow", "signature"];
const MAX_RECV_WINDOW: u64 = 60_000;
/// Order fields as Binance names them (REST and WS alike): symbol, quantity, price.
const ORDER_FIELDS: [&str; 3] = ["symbol", "quantity", "price"];

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    #[default]
    Rest,
    Ws,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum AppendTo {
    #[default]
    Query,
    Body,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    #[serde(default)]
    mode: Mode,
    /// REST: used for policy only (Binance does not sign it).
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    query: Option<String>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    append_to: Option<AppendTo>,
    /// Milliseconds, 1..=60000.
    #[serde(default)]
    recv_window: Option<u64>,
    #[serde(default)]
    api_key: Option<String>,
    /// Milliseconds since the epoch.
    #[serde(default)]
    timestamp: Option<u64>,
    /// WebSocket API request params.
    #[serde(default)]
    params: Option<Map<String, Value>>,
}

impl Request {
    pub fn view(&self) -> Result<RequestView> {
        if let Some(rw) = self.recv_window {
            if !(1..=MAX_RECV_WINDOW).contains(&rw) {
                return Err(Error::BadRequest(format!(
                    "`recv_window` must be 1 to {MAX_RECV_WINDOW} ms"
                )));
            }
        }
        match self.mode {
            Mode::Rest => self.view_rest(),
            Mode::Ws => self.view_ws(),
        }
    }

    fn view_rest(&self) -> Result<RequestView> {
        if self.params.is_some() {
            return Err(Error::BadRequest(
                "`params` is for \"mode\": \"ws\"; REST requests use `query` / `body`".into(),
            ));
        }
        let method = self
            .method
            .as_deref()
            .ok_or_else(|| Error::BadRequest("`method` is required".into()))?;
        let path = self
            .path
            .as_deref()
            .ok_or_else(|| Error::BadRequest("`path` is required".into()))?;
        let query = self.query.as_deref().unwrap_or("");
        let body = self.body.as_deref().unwrap_or("");
        let mut pairs = util::parse_form(query);
        pairs.extend(util::parse_form(body));
        let view = util::http_view(method, path, body, util::form_order(&pairs, ORDER_FIELDS))?;
        for (field, text) in [("query", query), ("body", body)] {
            if let Some(name) = util::forbidden_form_param(text, &REST_FORBIDDEN) {
                return Err(Error::BadRequest(format!(
                    "`{field}` must not contain `{name}`: keyward adds it"
                )));
            }
        }
        Ok(view)
    }

    fn view_ws(&self) -> Result<RequestView> {
        for (field, present) in [
            ("method", self.method.is_some()),
            ("path", self.path.is_some()),
            ("query", self.query.is_some()),
            ("body", self.body.is_some()),
            ("append_to", self.append_to.is_some()),
        ] {
            if present {
                return Err(Error::BadRequest(format!(
                    "`{field}` is for REST requests; \"mode\": \"ws\" signs `params`"
                )));
            }
        }
        let params = self
            .params
            .as_ref()
            .ok_or_else(|| Error::BadRequest("`params` is required in \"mode\": \"ws\"".into()))?;
        for (name, value) in params {
            if WS_FORBIDDEN.contains(&name.as_str()) {
                return Err(Error::BadRequest(format!(
                    "`params` must not contain `{name}`: keyward adds it"
                )));
            }
            param_text(name, value)?;
        }
        Ok(RequestView {
            method: None,
            path: None,
            body_len: serde_json::to_string(params).map_or(0, |s| s.len()),
            orders: util::json_order(params, ORDER_FIELDS).into_iter().collect(),
            typed_data: None,
        })
    }

    pub fn build(self, key: &KeyInfo, clock: &mut Clock<'_>) -> Result<Plan> {
        let (alg, encoding) = scheme(key.key_type()?)?;
        match self.mode {
            Mode::Rest => self.build_rest(key, clock, alg, encoding),
            Mode::Ws => self.build_ws(key, clock, alg, encoding),
        }
    }

    fn build_rest(
        self,
        key: &KeyInfo,
        clock: &mut Clock<'_>,
        alg: Algorithm,
        encoding: Encoding,
    ) -> Result<Plan> {
        let api_key = bound_field(
            "api_key",
            self.api_key.as_deref(),
            key.api_key.as_deref(),
            false,
        )?;
        let ts = clock.timestamp_ms("timestamp", self.timestamp)?;
        let mut query = util::percent_encode_non_ascii(self.query.as_deref().unwrap_or(""));
        let mut body = util::percent_encode_non_ascii(self.body.as_deref().unwrap_or(""));
        let time_params = match self.recv_window {
            Some(rw) => format!("recvWindow={rw}&timestamp={ts}"),
            None => format!("timestamp={ts}"),
        };
        let append_to = self.append_to.unwrap_or_default();
        append_param(
            match append_to {
                AppendTo::Query => &mut query,
                AppendTo::Body => &mut body,
            },
            &time_params,
        );
        let payload = format!("{query}{body}");
        Ok(Plan::new(alg, payload.clone().into_bytes(), move |sig| {
            let signature = encoding.encode(sig);
            let param = format!("signature={}", util::percent_encode_value(&signature));
            append_param(
                match append_to {
                    AppendTo::Query => &mut query,
                    AppendTo::Body => &mut body,
                },
                &param,
            );
            let headers: Vec<(&str, String)> =
                api_key.map(|k| ("X-MBX-APIKEY", k)).into_iter().collect();
            Ok(Output::new(signature, &headers)
                .with("payload", payload)
                .with("query", query)
                .with("body", body)
                .with("timestamp", ts))
        }))
    }

    fn build_ws(
        self,
        key: &KeyInfo,
        clock: &mut Clock<'_>,
        alg: Algorithm,
        encoding: Encoding,
    ) -> Result<Plan> {
        let api_key = required_field("api_key", self.api_key.as_deref(), key.api_key.as_deref())?;
        let ts = clock.timestamp_ms("timestamp", self.timestamp)?;
        // BTreeMap<String, _> orders keys byte-wise, which is Binance's "sort by name".
        let mut sorted: BTreeMap<String, Value> =
            self.params.unwrap_or_default().into_iter().collect();
        sorted.insert("apiKey".into(), Value::String(api_key));
        sorted.insert("timestamp".into(), Value::from(ts));
        if let Some(rw) = self.recv_window {
            sorted.insert("recvWindow".into(), Value::from(rw));
        }
        let mut parts = Vec::with_capacity(sorted.len());
        for (name, value) in &sorted {
            parts.push(format!("{name}={}", param_text(name, value)?));
        }
        let payload = parts.join("&");
        Ok(Plan::new(alg, payload.clone().into_bytes(), move |sig| {
            let signature = encoding.encode(sig);
            let mut params: Map<String, Value> = sorted.into_iter().collect();
            params.insert("signature".into(), Value::String(signature.clone()));
            Ok(Output::new(signature, &[])
                .with("payload", payload)
                .with("params", Value::Object(params))
                .with("timestamp", ts))
        }))
    }
}

#[derive(Clone, Copy)]
enum Encoding {
    Hex,
    Base64,
}

impl Encoding {
    fn encode(self, sig: &Signature) -> String {
        match self {
            Encoding::Hex => hex::encode(&sig.bytes),
            Encoding::Base64 => util::b64(&sig.bytes),
        }
    }
}

fn scheme(t: KeyType) -> Result<(Algorithm, Encoding)> {
    match t {
        KeyType::HmacSha256 | KeyType::HmacSha512 => Ok((Algorithm::HmacSha256, Encoding::Hex)),
        t if t.is_rsa() => Ok((Algorithm::RsaPkcs1Sha256, Encoding::Base64)),
        KeyType::Ed25519 => Ok((Algorithm::Ed25519, Encoding::Base64)),
        other => Err(unsupported_key(ProfileName::Binance, other)),
    }
}

fn append_param(part: &mut String, param: &str) {
    if !part.is_empty() {
        part.push('&');
    }
    part.push_str(param);
}

/// A WS param's signed text: strings verbatim, integers in decimal, booleans as words.
fn param_text(name: &str, value: &Value) -> Result<String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        Value::Number(_) => Err(Error::BadRequest(format!(
            "`params.{}` is a float: send decimals as strings (their exact text is signed)",
            util::truncate(name, 64)
        ))),
        _ => Err(Error::BadRequest(format!(
            "`params.{}` must be a string, integer or boolean",
            util::truncate(name, 64)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use serde_json::{json, Value};

    use super::super::util::test_keys::*;
    use super::super::util::test_support::*;
    use super::super::ProfileName;
    use crate::model::KeyType;

    const P: ProfileName = ProfileName::Binance;
    // https://developers.binance.com/docs/binance-spot-api-docs/rest-api/request-security
    // ("SIGNED Endpoint Examples for POST /api/v3/order", HMAC Keys): example secretKey/apiKey.
    const SECRET: &[u8] = b"NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j";
    const API_KEY: &str = "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A";

    fn hmac_key() -> crate::backend::soft::MemoryKey {
        hmac(SECRET, KeyType::HmacSha256)
    }

    /// A POST /api/v3/order of the request-security doc (its recvWindow and timestamp) with
    /// `fields` added, signed with the doc's HMAC key.
    fn sign_docs_order(fields: Value) -> Value {
        let mut req = json!({
            "method": "POST", "path": "/api/v3/order",
            "recv_window": 5000, "timestamp": 1499827319559u64
        });
        for (name, value) in fields.as_object().unwrap() {
            req[name] = value.clone();
        }
        run(P, &req, &hmac_key())
    }

    /// The python-binance order, whose signatures it publishes for its Ed25519 and RSA keys.
    fn python_binance_order() -> Value {
        json!({
            "method": "POST", "path": "/api/v3/order",
            "query": "price=50000&quantity=1&side=BUY&symbol=BTCUSDT",
            "body": "&type=LIMIT", "timestamp": 1631234567890u64
        })
    }

    // Source: Binance REST request-security doc, HMAC example 1 (all parameters in the query
    // string): signature c8db5682…6b71.
    #[test]
    fn kat_rest_hmac_query_string() {
        let out = sign_docs_order(json!({
            "query": "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1",
            "api_key": API_KEY
        }));
        let sig = "c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71";
        let signed = "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559";
        assert_eq!(
            out,
            json!({
                "signature": sig,
                "headers": {"X-MBX-APIKEY": API_KEY},
                "payload": signed,
                "query": format!("{signed}&signature={sig}"),
                "body": "",
                "timestamp": 1499827319559u64
            })
        );
    }

    // Same doc, legacy example 2 (all parameters in the request body): same signature.
    #[test]
    fn kat_rest_hmac_body() {
        let out = sign_docs_order(json!({
            "body": "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1",
            "append_to": "body"
        }));
        assert_eq!(
            out["signature"],
            "c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71"
        );
        assert_eq!(out["query"], "");
        assert!(out["body"].as_str().unwrap().ends_with(
            "&timestamp=1499827319559&signature=c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71"
        ));
        assert_eq!(out["headers"], json!({}));
    }

    // Same doc, legacy example 3 (mixed query and body, concatenated without `&`):
    // signature 0fd168b8…9a77.
    #[test]
    fn kat_rest_hmac_mixed() {
        let out = sign_docs_order(json!({
            "query": "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC",
            "body": "quantity=1&price=0.1", "append_to": "body"
        }));
        assert_eq!(
            out["payload"],
            "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTCquantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559"
        );
        assert_eq!(
            out["signature"],
            "0fd168b8ddb4876a0358a8d14d0c9f3da0e9b20c5d52b2a00fcf7d1c602f9a77"
        );
    }

    // Same doc, HMAC example with non-ASCII symbol "１２３４５６": payload percent-encoded,
    // signature e1353ec6…3ef3.
    #[test]
    fn kat_rest_hmac_non_ascii() {
        let out = sign_docs_order(json!({
            "query": "symbol=１２３４５６&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1"
        }));
        assert_eq!(
            out["payload"],
            "symbol=%EF%BC%91%EF%BC%92%EF%BC%93%EF%BC%94%EF%BC%95%EF%BC%96&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559"
        );
        assert_eq!(
            out["signature"],
            "e1353ec6b14d888f1164ae9af8228a3dbd508bc82eb867db8ab6046442f33ef3"
        );
    }

    // Source: https://developers.binance.com/docs/binance-spot-api-docs/websocket-api/request-security
    // "SIGNED request example (HMAC)": order.place params, recvWindow 100, timestamp
    // 1645423376532 → cc154777…d08a.
    #[test]
    fn kat_ws_hmac() {
        let out = run(
            P,
            &json!({
                "mode": "ws",
                "params": {
                    "symbol": "BTCUSDT", "side": "SELL", "type": "LIMIT", "timeInForce": "GTC",
                    "quantity": "0.01000000", "price": "52000.00", "newOrderRespType": "ACK"
                },
                "recv_window": 100, "timestamp": 1645423376532u64, "api_key": API_KEY
            }),
            &hmac_key(),
        );
        let sig = "cc15477742bd704c29492d96c7ead9414dfd8e0ec4a00f947bb5bb454ddbd08a";
        assert_eq!(
            out["payload"],
            format!("apiKey={API_KEY}&newOrderRespType=ACK&price=52000.00&quantity=0.01000000&recvWindow=100&side=SELL&symbol=BTCUSDT&timeInForce=GTC&timestamp=1645423376532&type=LIMIT")
        );
        assert_eq!(out["signature"], sig);
        assert_eq!(out["headers"], json!({}));
        let params = &out["params"];
        assert_eq!(
            field_names(params),
            [
                "apiKey",
                "newOrderRespType",
                "price",
                "quantity",
                "recvWindow",
                "side",
                "symbol",
                "timeInForce",
                "timestamp",
                "type",
                "signature"
            ]
        );
        assert_eq!(params["recvWindow"], 100);
        assert_eq!(params["timestamp"], 1645423376532u64);
        assert_eq!(params["signature"], sig);
    }

    // Source: sammchardy/python-binance tests/test_cryptography.py, "Unencrypted PKCS8
    // ed22519 private key": params sorted by name, signature a4Pm3p02…ojCw==. The profile
    // reproduces that payload (timestamp between symbol and type) by appending the time to the
    // query and passing `&type=LIMIT` as the body, which Binance concatenates without separator.
    #[test]
    fn kat_rest_ed25519() {
        let out = run(P, &python_binance_order(), &pem(ED25519_PKCS8));
        assert_eq!(
            out["payload"],
            "price=50000&quantity=1&side=BUY&symbol=BTCUSDT&timestamp=1631234567890&type=LIMIT"
        );
        let sig = "a4Pm3p02D2HXtNfo3DBaVCe9Ov7kledewgYtGjekotFmZ5wXa3mC5AtLB7CpAphyNjeyovIuDP+9fyjYmsojCw==";
        assert_eq!(out["signature"], sig);
        // The base64 signature is URL-encoded where it is appended.
        assert_eq!(
            out["query"],
            "price=50000&quantity=1&side=BUY&symbol=BTCUSDT&timestamp=1631234567890&signature=a4Pm3p02D2HXtNfo3DBaVCe9Ov7kledewgYtGjekotFmZ5wXa3mC5AtLB7CpAphyNjeyovIuDP%2B9fyjYmsojCw%3D%3D"
        );
    }

    // Source: sammchardy/python-binance tests/test_cryptography.py, "Encrypted PKCS8 RSA
    // private key" (decrypted, see test_keys): RSASSA-PKCS1-v1_5/SHA-256, signature S4l9IONX….
    #[test]
    fn kat_rest_rsa() {
        let out = run(P, &python_binance_order(), &pem(RSA_2048_PKCS8));
        let sig = "S4l9IONXGHIdt4NjwmpCIhawDTitjUQls73d+mi0HJTSbTGyn95NabX5hC9+n6HsTqLcWPvxKgTvLFMnTaf6Jxl+xwQMbu9/6mw88KF7i1pEQizerKcr91rPUPVBQ4OY10Q018QEamIAymRgo/eoRYSm7CqCdeibGyO0XfXZBaJnVGFJ9hgrPIwSKHgeUnfK8qMenULvL0qKMEJ6ziYPiqh7k9xX3xIV7lGIpokk+ekqlFd01f/Lov45osJCFuccJO4xuUUZewZnVGF7Uw6Rim3UsKhXKZUN9WZWa5RT+dpBIJ5DTBIXBSvowwj3GZC3j+XvWw8Sn0Ls9836l89BXw==";
        assert_eq!(out["signature"], sig);
        let q = out["query"].as_str().unwrap();
        assert!(q.ends_with(&format!(
            "&signature={}",
            sig.replace('+', "%2B")
                .replace('/', "%2F")
                .replace('=', "%3D")
        )));
        // And the public key verifies it (independent check of the padding).
        verify_rsa_pkcs1v15(
            RSA_2048_PKCS8,
            out["payload"].as_str().unwrap().as_bytes(),
            sig,
        );
    }

    // WS mode with Ed25519: base64 stays raw in JSON params (no URL-encoding); non-ASCII raw.
    #[test]
    fn ws_ed25519_is_not_url_encoded() {
        let out = run(
            P,
            &json!({
                "mode": "ws",
                "params": {"symbol": "１２３", "quantity": "1", "test": true, "limit": -5},
                "api_key": "k", "timestamp": 1u64
            }),
            &pem(ED25519_PKCS8),
        );
        assert_eq!(
            out["payload"],
            "apiKey=k&limit=-5&quantity=1&symbol=１２３&test=true&timestamp=1"
        );
        let sig = out["signature"].as_str().unwrap();
        assert_eq!(out["params"]["signature"], sig);
        assert_eq!(out["params"]["test"], true);
        use ed25519_dalek::pkcs8::DecodePrivateKey;
        use ed25519_dalek::Verifier as _;
        let sk = ed25519_dalek::SigningKey::from_pkcs8_pem(ED25519_PKCS8).unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(sig)
            .unwrap();
        let s = ed25519_dalek::Signature::from_slice(&raw).unwrap();
        sk.verifying_key()
            .verify(out["payload"].as_str().unwrap().as_bytes(), &s)
            .unwrap();
    }

    #[test]
    fn agent_clock_and_no_recv_window() {
        let out = run(
            P,
            &json!({"method": "GET", "path": "/api/v3/account"}),
            &hmac_key(),
        );
        assert_eq!(out["payload"], format!("timestamp={NOW_MS}"));
        assert_eq!(out["timestamp"], NOW_MS);
    }

    #[test]
    fn orders_for_guards() {
        let v = view(
            P,
            &json!({"method": "POST", "path": "/api/v3/order",
                    "query": "symbol=%EF%BC%91&side=BUY", "body": "quantity=0.5&price=100.10"}),
        );
        assert_eq!(v.orders.len(), 1);
        assert_eq!(v.orders[0].symbol.as_deref(), Some("１"));
        assert_eq!(v.orders[0].quantity.as_deref(), Some("0.5"));
        assert_eq!(v.orders[0].price.as_deref(), Some("100.10"));
        let v = view(P, &json!({"method": "GET", "path": "/api/v3/account"}));
        assert!(v.orders.is_empty());
        let v = view(
            P,
            &json!({"mode": "ws", "params": {"symbol": "BTCUSDT", "quantity": "1", "price": 5}}),
        );
        assert_eq!(v.orders[0].price.as_deref(), Some("5"));
        assert_eq!(v.method, None);
    }

    #[test]
    fn error_paths() {
        let k = hmac_key();
        for r in [
            json!({"method": "GET", "path": "/a", "bogus": 1}),
            json!({"method": "GET", "path": "/a?b=1"}),
            json!({"method": "GET"}),
            json!({"method": "GET", "path": "/a", "query": "timestamp=1"}),
            json!({"method": "GET", "path": "/a", "body": "a=1&signature=x"}),
            json!({"method": "GET", "path": "/a", "query": "recvWindow=5"}),
            json!({"method": "GET", "path": "/a", "recv_window": 0}),
            json!({"method": "GET", "path": "/a", "recv_window": 60001}),
            json!({"method": "GET", "path": "/a", "recv_window": "5000"}),
            json!({"method": "GET", "path": "/a", "append_to": "header"}),
            json!({"method": "GET", "path": "/a", "mode": "fix"}),
            json!({"method": "GET", "path": "/a", "params": {}}),
            json!({"mode": "ws", "params": {"price": 1.5}, "api_key": "k"}),
            json!({"mode": "ws", "params": {"a": {"b": 1}}, "api_key": "k"}),
            json!({"mode": "ws", "params": {"a": null}, "api_key": "k"}),
            json!({"mode": "ws", "params": {"apiKey": "x"}, "api_key": "k"}),
            json!({"mode": "ws", "params": {"timestamp": 1}, "api_key": "k"}),
            json!({"mode": "ws", "params": {}}),
            json!({"mode": "ws", "api_key": "k"}),
            json!({"mode": "ws", "params": {}, "api_key": "k", "path": "/x"}),
        ] {
            bad(P, &r, &k);
        }
        let ts = json!({"method": "GET", "path": "/a", "timestamp": NOW_MS - 2000});
        check_client_time(P, &ts, &k, 5000, Some(1000));
        let (p256, _) = generated(KeyType::P256);
        assert!(bad(P, &json!({"method": "GET", "path": "/a"}), &p256).contains("p256"));
    }
}
