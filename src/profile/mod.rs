//! Exchange signing profiles (../PROFILES.md): a request object becomes the exact bytes an
//! exchange expects signed, and the signature becomes the headers/fields it expects back.
//!
//! A profile never sees key material. The flow is three steps so the agent can check policy
//! before anything is committed and sign on a backend worker in between:
//! [`parse`] (strict, typed; yields a [`RequestView`] for policy) → [`Parsed::build`] (applies
//! the clock and nonces, returns a [`Plan`]: algorithm + message) → backend signs →
//! [`Plan::finish`] (encodes the [`Output`]).

pub mod binance;
pub mod bybit;
pub mod coinbase;
pub mod eip191;
pub mod eip712;
pub mod evm;
pub mod hyperliquid;
pub mod kalshi;
pub mod kraken;
pub mod offline;
pub mod okx;
pub mod polymarket;
pub mod raw;
pub mod util;

use std::fmt;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::backend::Signature;
use crate::error::{Error, Result};
use crate::model::{Algorithm, KeyType};

/// Every profile name PROFILES.md defines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProfileName {
    Kalshi,
    Binance,
    Coinbase,
    Kraken,
    Okx,
    Bybit,
    Polymarket,
    Hyperliquid,
    Eip191,
    Eip712,
    Raw,
}

impl ProfileName {
    pub const ALL: [ProfileName; 11] = [
        ProfileName::Kalshi,
        ProfileName::Binance,
        ProfileName::Coinbase,
        ProfileName::Kraken,
        ProfileName::Okx,
        ProfileName::Bybit,
        ProfileName::Polymarket,
        ProfileName::Hyperliquid,
        ProfileName::Eip191,
        ProfileName::Eip712,
        ProfileName::Raw,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ProfileName::Kalshi => "kalshi",
            ProfileName::Binance => "binance",
            ProfileName::Coinbase => "coinbase",
            ProfileName::Kraken => "kraken",
            ProfileName::Okx => "okx",
            ProfileName::Bybit => "bybit",
            ProfileName::Polymarket => "polymarket",
            ProfileName::Hyperliquid => "hyperliquid",
            ProfileName::Eip191 => "eip191",
            ProfileName::Eip712 => "eip712",
            ProfileName::Raw => "raw",
        }
    }

    /// How an HMAC secret string as issued by this exchange becomes HMAC key bytes
    /// (PROFILES.md §0): raw bytes, or base64 for Kraken / base64url for Polymarket.
    pub fn hmac_key_encoding(self) -> HmacKeyEncoding {
        match self {
            ProfileName::Kraken => HmacKeyEncoding::Base64,
            ProfileName::Polymarket => HmacKeyEncoding::Base64Url,
            _ => HmacKeyEncoding::Raw,
        }
    }
}

impl fmt::Display for ProfileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for ProfileName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ProfileName::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| Error::UnknownProfile(util::truncate(s, 64)))
    }
}

/// How an exchange's HMAC secret string maps to key bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HmacKeyEncoding {
    Raw,
    /// RFC 4648 standard alphabet, padding required (Kraken).
    Base64,
    /// URL-safe alphabet, padding optional; the standard alphabet is accepted too (Polymarket).
    Base64Url,
}

/// What a profile may know about the key: its type and public facts, never its material.
#[derive(Clone, Debug, Default)]
pub struct KeyInfo {
    pub key_type: Option<KeyType>,
    /// The exchange-issued API key id bound to the key (request `api_key` defaults to it).
    pub api_key: Option<String>,
    /// OKX / Polymarket passphrase bound to the key (request `passphrase` defaults to it).
    pub passphrase: Option<String>,
    /// EIP-55 address of a secp256k1 key (derived from its public key), or for HMAC keys the
    /// address bound in metadata (Polymarket L2 `POLY_ADDRESS`).
    pub address: Option<String>,
}

impl KeyInfo {
    pub fn key_type(&self) -> Result<KeyType> {
        self.key_type
            .ok_or_else(|| Error::Internal("profile called without a key type".into()))
    }

    /// The key type, if `profile` can sign with it.
    pub fn key_type_for(
        &self,
        profile: ProfileName,
        supported: impl Fn(KeyType) -> bool,
    ) -> Result<KeyType> {
        let t = self.key_type()?;
        if supported(t) {
            Ok(t)
        } else {
            Err(unsupported_key(profile, t))
        }
    }
}

/// Where timestamps and nonces come from, and whether the client may set them.
pub struct Clock<'a> {
    /// The agent's clock (or the offline CLI's), milliseconds since the Unix epoch.
    pub now_ms: u64,
    pub client_time: ClientTime,
    /// Strictly increasing per-key nonce source (Kraken, Hyperliquid): returns
    /// `max(now_ms, last + 1)` and persists it before returning.
    pub nonces: &'a mut dyn FnMut(u64) -> Result<u64>,
}

/// Whether a request may carry its own `timestamp` / `nonce` / `jwt_nonce` (PROFILES.md §0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientTime {
    /// Over the socket by default: any client-supplied time → `bad_request`.
    Reject,
    /// The key's policy sets `client_timestamp_skew_ms`: accepted within that many ms of now.
    Within(u64),
    /// Offline CLI: accepted as given (reproducible known-answer checks).
    Any,
}

impl Clock<'_> {
    /// The timestamp to sign, in milliseconds: the client's (if allowed) or now.
    pub fn timestamp_ms(&self, field: &str, client: Option<u64>) -> Result<u64> {
        match client {
            None => Ok(self.now_ms),
            Some(ts) => {
                self.check_client_time(field, ts)?;
                Ok(ts)
            }
        }
    }

    /// The timestamp to sign, in seconds (client value is in seconds).
    pub fn timestamp_s(&self, field: &str, client: Option<u64>) -> Result<u64> {
        match client {
            None => Ok(self.now_ms / 1000),
            Some(ts) => {
                self.check_client_time(field, ts.saturating_mul(1000))?;
                Ok(ts)
            }
        }
    }

    /// A strictly increasing per-key nonce in ms, or the client's (if allowed).
    pub fn increasing_nonce(&mut self, field: &str, client: Option<u64>) -> Result<u64> {
        match client {
            None => (self.nonces)(self.now_ms),
            Some(n) => {
                self.check_client_time(field, n)?;
                Ok(n)
            }
        }
    }

    /// A value the client may only supply where client time is allowed (e.g. `jwt_nonce`).
    pub fn client_value_allowed(&self, field: &str) -> Result<()> {
        match self.client_time {
            ClientTime::Reject => Err(Error::BadRequest(format!(
                "`{field}` is set by the agent; the key's policy does not allow client-supplied values (client_timestamp_skew_ms)"
            ))),
            ClientTime::Within(_) | ClientTime::Any => Ok(()),
        }
    }

    fn check_client_time(&self, field: &str, value_ms: u64) -> Result<()> {
        match self.client_time {
            ClientTime::Any => Ok(()),
            ClientTime::Reject => Err(Error::BadRequest(format!(
                "`{field}` is set by the agent's clock; the key's policy does not allow client-supplied time (client_timestamp_skew_ms)"
            ))),
            ClientTime::Within(skew) => {
                if value_ms.abs_diff(self.now_ms) <= skew {
                    Ok(())
                } else {
                    Err(Error::BadRequest(format!(
                        "`{field}` is more than {skew} ms from the agent's clock"
                    )))
                }
            }
        }
    }
}

/// What policy needs to see of a request before it is signed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RequestView {
    /// HTTP method as sent (None for non-HTTP profiles: eip191, eip712, hyperliquid, raw).
    pub method: Option<String>,
    /// Request path without query (None for non-HTTP profiles).
    pub path: Option<String>,
    /// Bytes of body (or equivalent payload: WS params, action JSON, typed data, raw data).
    pub body_len: usize,
    /// Orders found in the request, for symbol / quantity / notional guards.
    pub orders: Vec<OrderView>,
    /// eip712: the domain name and primary type (for allow-lists); polymarket L1 / hyperliquid
    /// fill these with their fixed domain and type.
    pub typed_data: Option<TypedDataView>,
}

/// One order's guarded fields, as the exchange's text (decimal strings, not floats).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OrderView {
    pub symbol: Option<String>,
    pub quantity: Option<String>,
    pub price: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TypedDataView {
    pub domain_name: Option<String>,
    pub primary_type: String,
}

/// A profile's output object (PROFILES.md §0): always `signature` and `headers`.
#[derive(Clone, Debug, PartialEq)]
pub struct Output(pub Map<String, Value>);

impl Output {
    /// Starts an output with `signature` and `headers` (in that order; headers in insertion
    /// order, names exactly as the exchange spells them).
    pub fn new(signature: impl Into<String>, headers: &[(&str, String)]) -> Output {
        let mut m = Map::new();
        m.insert("signature".into(), Value::String(signature.into()));
        let mut h = Map::new();
        for (k, v) in headers {
            h.insert((*k).to_string(), Value::String(v.clone()));
        }
        m.insert("headers".into(), Value::Object(h));
        Output(m)
    }

    pub fn with(mut self, field: &str, value: impl Into<Value>) -> Output {
        self.0.insert(field.to_string(), value.into());
        self
    }

    pub fn into_value(self) -> Value {
        Value::Object(self.0)
    }
}

type Finish = Box<dyn FnOnce(&Signature) -> Result<Output> + Send>;

/// The bytes to sign, the scheme, and how to encode the signature afterwards.
pub struct Plan {
    pub alg: Algorithm,
    pub message: Vec<u8>,
    finish: Finish,
}

impl Plan {
    pub fn new(
        alg: Algorithm,
        message: Vec<u8>,
        finish: impl FnOnce(&Signature) -> Result<Output> + Send + 'static,
    ) -> Plan {
        Plan {
            alg,
            message,
            finish: Box::new(finish),
        }
    }

    /// Signs the text `payload` for an exchange that authenticates with headers: the output
    /// is the encoded signature, the headers `headers` builds around it, `payload`, `timestamp`.
    pub fn text_with_headers(
        alg: Algorithm,
        payload: String,
        ts: u64,
        encode: fn(&[u8]) -> String,
        headers: impl FnOnce(String) -> Vec<(&'static str, String)> + Send + 'static,
    ) -> Plan {
        Plan::new(alg, payload.clone().into_bytes(), move |sig| {
            let signature = encode(&sig.bytes);
            Ok(Output::new(signature.clone(), &headers(signature))
                .with("payload", payload)
                .with("timestamp", ts))
        })
    }

    pub fn finish(self, sig: &Signature) -> Result<Output> {
        (self.finish)(sig)
    }
}

/// A request checked against its profile's schema, ready for policy and then [`Parsed::build`].
pub struct Parsed {
    pub profile: ProfileName,
    pub view: RequestView,
    req: ParsedReq,
}

enum ParsedReq {
    Kalshi(kalshi::Request),
    Binance(binance::Request),
    Coinbase(coinbase::Request),
    Kraken(kraken::Request),
    Okx(okx::Request),
    Bybit(bybit::Request),
    Polymarket(polymarket::Request),
    Hyperliquid(hyperliquid::Request),
    Eip191(eip191::Request),
    Eip712(eip712::Request),
    Raw(raw::Request),
}

/// Parses `request` strictly for `profile` (unknown fields, wrong types → `bad_request`).
pub fn parse(profile: ProfileName, request: &Value) -> Result<Parsed> {
    let req = match profile {
        ProfileName::Kalshi => ParsedReq::Kalshi(from_value(profile, request)?),
        ProfileName::Binance => ParsedReq::Binance(from_value(profile, request)?),
        ProfileName::Coinbase => ParsedReq::Coinbase(from_value(profile, request)?),
        ProfileName::Kraken => ParsedReq::Kraken(from_value(profile, request)?),
        ProfileName::Okx => ParsedReq::Okx(from_value(profile, request)?),
        ProfileName::Bybit => ParsedReq::Bybit(from_value(profile, request)?),
        ProfileName::Polymarket => ParsedReq::Polymarket(from_value(profile, request)?),
        ProfileName::Hyperliquid => ParsedReq::Hyperliquid(from_value(profile, request)?),
        ProfileName::Eip191 => ParsedReq::Eip191(from_value(profile, request)?),
        ProfileName::Eip712 => ParsedReq::Eip712(from_value(profile, request)?),
        ProfileName::Raw => ParsedReq::Raw(from_value(profile, request)?),
    };
    let view = match &req {
        ParsedReq::Kalshi(r) => r.view()?,
        ParsedReq::Binance(r) => r.view()?,
        ParsedReq::Coinbase(r) => r.view()?,
        ParsedReq::Kraken(r) => r.view()?,
        ParsedReq::Okx(r) => r.view()?,
        ParsedReq::Bybit(r) => r.view()?,
        ParsedReq::Polymarket(r) => r.view()?,
        ParsedReq::Hyperliquid(r) => r.view()?,
        ParsedReq::Eip191(r) => r.view()?,
        ParsedReq::Eip712(r) => r.view()?,
        ParsedReq::Raw(r) => r.view()?,
    };
    Ok(Parsed { profile, view, req })
}

impl Parsed {
    /// Applies the clock and the key's public facts; yields what to sign.
    pub fn build(self, key: &KeyInfo, clock: &mut Clock<'_>) -> Result<Plan> {
        match self.req {
            ParsedReq::Kalshi(r) => r.build(key, clock),
            ParsedReq::Binance(r) => r.build(key, clock),
            ParsedReq::Coinbase(r) => r.build(key, clock),
            ParsedReq::Kraken(r) => r.build(key, clock),
            ParsedReq::Okx(r) => r.build(key, clock),
            ParsedReq::Bybit(r) => r.build(key, clock),
            ParsedReq::Polymarket(r) => r.build(key, clock),
            ParsedReq::Hyperliquid(r) => r.build(key, clock),
            ParsedReq::Eip191(r) => r.build(key, clock),
            ParsedReq::Eip712(r) => r.build(key, clock),
            ParsedReq::Raw(r) => r.build(key, clock),
        }
    }
}

fn from_value<T: DeserializeOwned>(profile: ProfileName, request: &Value) -> Result<T> {
    if !request.is_object() {
        return Err(Error::BadRequest(format!(
            "the {profile} request must be a JSON object"
        )));
    }
    T::deserialize(request)
        .map_err(|e| Error::BadRequest(format!("{profile} request: {}", util::serde_message(&e))))
}

/// The error for a key type a profile cannot sign with.
pub fn unsupported_key(profile: ProfileName, key_type: KeyType) -> Error {
    Error::BadRequest(format!(
        "profile {profile} does not support {key_type} keys"
    ))
}
