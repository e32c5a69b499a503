//! Hostile and randomized input for every profile, at the library level: whatever a client
//! sends, `parse` → `build` → sign → `finish` returns `Err` or an output — never a panic.

use std::sync::OnceLock;

use keyward::backend::material;
use keyward::backend::soft::MemoryKey;
use keyward::model::KeyType;
use keyward::profile::{parse, ClientTime, Clock, KeyInfo, ProfileName};
use keyward::secret::SecretBytes;
use serde_json::{json, Map, Value};

const SECP_HEX: &str = "0x0123456789012345678901234567890123456789012345678901234567890123";
const ADDRESS: &str = "0x14dC79964da2C08b23698B3D3cc7Ca32193d9955";

struct TestKey {
    key: MemoryKey,
    info: KeyInfo,
}

fn pem(der: &[u8]) -> String {
    pem_rfc7468::encode_string("PRIVATE KEY", pem_rfc7468::LineEnding::LF, der).unwrap()
}

fn make(text: &[u8], kt: KeyType) -> TestKey {
    let m = material::parse(SecretBytes::from_slice(text), Some(kt)).unwrap();
    let address = if kt == KeyType::Secp256k1 {
        let spki = material::public_spki(&m).unwrap().unwrap();
        let raw = keyward::pubkey::raw_public_key(&spki).unwrap();
        Some(keyward::pubkey::eth_address(&raw).unwrap())
    } else {
        Some(ADDRESS.to_string())
    };
    TestKey {
        key: MemoryKey::from_material(&m).unwrap(),
        info: KeyInfo {
            key_type: Some(kt),
            api_key: Some("bound-api-key".into()),
            passphrase: Some("bound-passphrase".into()),
            address,
        },
    }
}

/// One key of every type keyward signs with (RSA generated once: it is the slow one).
fn keys() -> &'static Vec<TestKey> {
    static KEYS: OnceLock<Vec<TestKey>> = OnceLock::new();
    KEYS.get_or_init(|| {
        use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
        use aws_lc_rs::rsa::KeySize;
        use aws_lc_rs::signature::{EcdsaKeyPair, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let p256 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let rsa = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
        let rsa_der: Pkcs8V1Der = rsa.as_der().unwrap();
        let mut ed = hex::decode("302e020100300506032b657004220420").unwrap();
        ed.extend_from_slice(&[7u8; 32]);
        vec![
            make(b"hostile-test-secret", KeyType::HmacSha256),
            make(SECP_HEX.as_bytes(), KeyType::Secp256k1),
            make(pem(p256.as_ref()).as_bytes(), KeyType::P256),
            make(pem(&ed).as_bytes(), KeyType::Ed25519),
            make(pem(rsa_der.as_ref()).as_bytes(), KeyType::Rsa2048),
        ]
    })
}

/// A plausible request for each profile, with every field PROFILES.md lists.
fn templates(p: ProfileName) -> Vec<Value> {
    match p {
        ProfileName::Kalshi => vec![json!({
            "method": "GET", "path": "/trade-api/v2/portfolio/balance", "query": "a=1",
            "body": "", "api_key": "bound-api-key", "timestamp": 1_700_000_000_000u64
        })],
        ProfileName::Binance => vec![
            json!({
                "mode": "rest", "method": "POST", "path": "/api/v3/order",
                "query": "symbol=BTCUSDT", "body": "side=BUY&quantity=1", "append_to": "body",
                "recv_window": 5000, "api_key": "bound-api-key", "timestamp": 1_700_000_000_000u64
            }),
            json!({
                "mode": "ws", "params": {"symbol": "BTCUSDT", "quantity": "0.01", "n": 1, "b": true},
                "recv_window": 5000, "api_key": "bound-api-key", "timestamp": 1_700_000_000_000u64
            }),
        ],
        ProfileName::Coinbase => vec![
            json!({
                "method": "GET", "path": "/api/v3/brokerage/accounts", "host": "api.coinbase.com",
                "api_key": "bound-api-key", "timestamp": 1_700_000_000u64, "jwt_nonce": "abcdef"
            }),
            json!({"websocket": true, "api_key": "bound-api-key", "timestamp": 1_700_000_000u64}),
        ],
        ProfileName::Kraken => vec![json!({
            "path": "/0/private/AddOrder", "body": "pair=XBTUSD&volume=1",
            "api_key": "bound-api-key", "nonce": 1_700_000_000_000u64
        })],
        ProfileName::Okx => vec![json!({
            "method": "GET", "path": "/api/v5/account/balance", "query": "ccy=BTC", "body": "",
            "api_key": "bound-api-key", "passphrase": "bound-passphrase", "simulated": true,
            "timestamp": 1_700_000_000_000u64
        })],
        ProfileName::Bybit => vec![json!({
            "method": "GET", "path": "/v5/order/realtime", "query": "category=linear",
            "body": "", "api_key": "bound-api-key", "recv_window": 5000,
            "timestamp": 1_700_000_000_000u64
        })],
        ProfileName::Polymarket => vec![
            json!({"auth": "l1", "chain_id": 137, "nonce": 0, "timestamp": 1_700_000_000u64}),
            json!({
                "auth": "l2", "method": "POST", "path": "/order", "body": "{}",
                "api_key": "bound-api-key", "passphrase": "bound-passphrase",
                "address": ADDRESS, "timestamp": 1_700_000_000u64
            }),
        ],
        ProfileName::Hyperliquid => vec![json!({
            "action": {
                "type": "order",
                "orders": [{"a": 1, "b": true, "p": "100", "s": "1", "r": false,
                            "t": {"limit": {"tif": "Gtc"}}}],
                "grouping": "na"
            },
            "nonce": 1_700_000_000_000u64,
            "vault_address": ADDRESS,
            "expires_after": 1_700_000_100_000u64,
            "network": "testnet"
        })],
        ProfileName::Eip191 => vec![json!({"message": "hello"}), json!({"message_hex": "0x68"})],
        ProfileName::Eip712 => vec![json!({"typed_data": {
            "types": {
                "Person": [{"name": "name", "type": "string"}, {"name": "wallets", "type": "address[]"}],
                "Mail": [{"name": "from", "type": "Person"}, {"name": "to", "type": "Person[2]"},
                         {"name": "amount", "type": "int64"}]
            },
            "primaryType": "Mail",
            "domain": {"name": "Ether Mail", "version": "1", "chainId": 1},
            "message": {
                "from": {"name": "Cow", "wallets": [ADDRESS]},
                "to": [{"name": "A", "wallets": []}, {"name": "B", "wallets": [ADDRESS, ADDRESS]}],
                "amount": -5
            }
        }})],
        ProfileName::Raw => vec![json!({"data": "aGVsbG8="})],
    }
}

#[derive(Debug)]
enum Outcome {
    Rejected(String),
    Signed,
}

/// parse → build → sign → finish with every key type and clock mode: `Signed` if any
/// combination produced an output, else the last error code. A panic anywhere fails the test.
fn exercise(p: ProfileName, req: &Value) -> Outcome {
    if let Err(e) = parse(p, req) {
        return Outcome::Rejected(e.code().into());
    }
    let mut signed = false;
    let mut last_err = String::new();
    for k in keys() {
        for client_time in [
            ClientTime::Any,
            ClientTime::Reject,
            ClientTime::Within(1_000),
        ] {
            let Ok(parsed) = parse(p, req) else {
                panic!("{p}: parse is not deterministic");
            };
            let mut nonces = |now: u64| Ok(now);
            let mut clock = Clock {
                now_ms: 1_700_000_000_000,
                client_time,
                nonces: &mut nonces,
            };
            let result = parsed.build(&k.info, &mut clock).and_then(|plan| {
                let sig = k.key.sign(plan.alg, &plan.message)?;
                plan.finish(&sig)
            });
            match result {
                Ok(out) => {
                    let v = out.into_value();
                    assert!(v.get("signature").is_some_and(Value::is_string), "{p}: {v}");
                    assert!(v.get("headers").is_some_and(Value::is_object), "{p}: {v}");
                    signed = true;
                }
                Err(e) => last_err = e.code().into(),
            }
        }
    }
    if signed {
        Outcome::Signed
    } else {
        Outcome::Rejected(last_err)
    }
}

fn set(req: &Value, field: &str, v: Value) -> Value {
    let mut r = req.clone();
    r[field] = v;
    r
}

fn deep(levels: usize) -> Value {
    let mut v = json!(1);
    for i in 0..levels {
        // Built by hand: `json!` would re-serialise `v` at every level (quadratic).
        v = if i % 2 == 0 {
            Value::Array(vec![v])
        } else {
            let mut m = Map::new();
            m.insert("k".into(), v);
            Value::Object(m)
        };
    }
    v
}

/// Values of every JSON type but the template value's own (null excepted: it means absent).
fn wrong_types(v: &Value) -> Vec<Value> {
    let all = [
        json!("1"),
        json!(1),
        json!(-1),
        json!(1.5),
        json!(true),
        json!([]),
        json!([1]),
        json!({}),
        json!({"a": 1}),
    ];
    all.into_iter()
        .filter(|w| match (v, w) {
            (Value::String(_), Value::String(_)) => false,
            (Value::Bool(_), Value::Bool(_)) => false,
            (Value::Array(_), Value::Array(_)) => false,
            (Value::Object(_), Value::Object(_)) => false,
            // Integers: another integer may be a valid value; -1 only for unsigned fields.
            (Value::Number(a), Value::Number(b)) => {
                b.is_f64() || (b.as_i64() == Some(-1) && a.as_u64().is_some()) && !a.is_f64()
            }
            _ => true,
        })
        .collect()
}

#[test]
fn templates_are_accepted() {
    for p in ProfileName::ALL {
        for t in templates(p) {
            // Raw is denied by policy, not here; every template must sign with some key.
            assert!(
                matches!(exercise(p, &t), Outcome::Signed),
                "{p} template was not signed: {t} → {:?}",
                exercise(p, &t)
            );
        }
    }
}

#[test]
fn wrong_types_in_every_field_are_rejected() {
    for p in ProfileName::ALL {
        for t in templates(p) {
            for (field, v) in t.as_object().unwrap() {
                for w in wrong_types(v) {
                    let req = set(&t, field, w.clone());
                    match exercise(p, &req) {
                        Outcome::Rejected(code) => assert!(
                            code == "bad_request" || code == "unsupported",
                            "{p}.{field} = {w}: code {code}"
                        ),
                        Outcome::Signed => panic!("{p}: `{field}` = {w} was accepted"),
                    }
                }
                // Deep nesting in any field is refused (a string/int/flat object expected).
                let req = set(&t, field, deep(1_000));
                assert!(
                    matches!(exercise(p, &req), Outcome::Rejected(_)),
                    "{p}.{field}: 1000-deep value accepted"
                );
            }
            // Unknown fields are refused.
            let req = set(&t, "unexpected_field", json!("x"));
            assert!(
                matches!(exercise(p, &req), Outcome::Rejected(_)),
                "{p}: unknown field"
            );
            // Not an object at all.
            for v in [json!(null), json!([]), json!("x"), json!(1), deep(1_000)] {
                assert!(matches!(exercise(p, &v), Outcome::Rejected(_)), "{p}: {v}");
            }
        }
    }
}

#[test]
fn huge_unicode_and_extreme_values_never_panic() {
    let huge = "a".repeat(1 << 20);
    let unicode = "ключ🔑\u{0}\u{7f}\u{202e}\u{feff}\"\\\r\n%ZZ%e2&=?#".to_string();
    for p in ProfileName::ALL {
        for t in templates(p) {
            for (field, v) in t.as_object().unwrap() {
                let candidates: Vec<Value> = match v {
                    Value::String(_) => vec![
                        json!(huge),
                        json!(unicode),
                        json!(""),
                        json!("NaN"),
                        json!("-1"),
                        json!("1e400"),
                    ],
                    Value::Number(_) => {
                        vec![json!(u64::MAX), json!(0), json!(i64::MIN), json!(1e300)]
                    }
                    _ => vec![],
                };
                for c in candidates {
                    let _ = exercise(p, &set(&t, field, c));
                }
            }
        }
    }
    // Hostile values inside nested structures.
    let hl = &templates(ProfileName::Hyperliquid)[0];
    for (k, v) in [
        ("s", json!("-5")),
        ("s", json!(-5)),
        ("s", json!(1.5)),
        ("p", json!("NaN")),
        ("a", json!(u64::MAX)),
        ("a", json!(-1)),
        ("p", json!(huge)),
    ] {
        let mut r = hl.clone();
        r["action"]["orders"][0][k] = v;
        let _ = exercise(ProfileName::Hyperliquid, &r);
    }
    let mut r = hl.clone();
    r["action"]["deep"] = deep(1_000);
    assert!(matches!(
        exercise(ProfileName::Hyperliquid, &r),
        Outcome::Rejected(_)
    ));
    let e = &templates(ProfileName::Eip712)[0];
    for (path, v) in [
        ("amount", json!(1.5)),
        ("amount", json!("NaN")),
        ("amount", json!(u64::MAX)),
        ("amount", json!("-9223372036854775809")),
        ("amount", json!(deep(1_000))),
        ("from", json!(deep(1_000))),
        ("to", json!([])),
    ] {
        let mut r = e.clone();
        r["typed_data"]["message"][path] = v;
        assert!(
            matches!(exercise(ProfileName::Eip712, &r), Outcome::Rejected(_)),
            "eip712 message.{path}"
        );
    }
    let b = &templates(ProfileName::Binance)[1];
    for v in [json!(1.5), json!(deep(1_000)), json!(null), json!([1])] {
        let mut r = b.clone();
        r["params"]["x"] = v.clone();
        assert!(
            matches!(exercise(ProfileName::Binance, &r), Outcome::Rejected(_)),
            "binance ws params {v}"
        );
    }
}

/// xorshift64*: a reproducible generator (no extra dev-dependency needed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn string(&mut self) -> String {
        const PIECES: [&str; 14] = [
            "a", "0", "0x", "-", ".", "?", "#", "&", "=", "%", "é", "🔑", "\u{0}", "ff",
        ];
        let n = self.below(12);
        (0..n)
            .map(|_| PIECES[self.below(PIECES.len() as u64) as usize])
            .collect()
    }
    fn value(&mut self, depth: u32) -> Value {
        match self.below(if depth == 0 { 6 } else { 8 }) {
            0 => Value::Null,
            1 => json!(self.below(2) == 1),
            2 => json!(self.next() >> self.below(64)),
            3 => json!(-((self.next() >> (1 + self.below(63))) as i64)),
            4 => json!((self.next() % 10_000) as f64 / 7.0),
            5 => json!(self.string()),
            6 => Value::Array((0..self.below(4)).map(|_| self.value(depth - 1)).collect()),
            _ => {
                let mut m = Map::new();
                for _ in 0..self.below(4) {
                    m.insert(self.string(), self.value(depth - 1));
                }
                Value::Object(m)
            }
        }
    }
    /// Replace, remove or add one value somewhere in `v`.
    fn mutate(&mut self, v: &mut Value) {
        match v {
            Value::Object(m) if !m.is_empty() && self.below(3) != 0 => {
                let i = self.below(m.len() as u64) as usize;
                let key = m.keys().nth(i).cloned().unwrap_or_default();
                match self.below(4) {
                    0 => {
                        m.remove(&key);
                    }
                    1 => {
                        let k = self.string();
                        let val = self.value(2);
                        m.insert(k, val);
                    }
                    _ => {
                        if let Some(child) = m.get_mut(&key) {
                            self.mutate(child);
                        }
                    }
                }
            }
            Value::Array(a) if !a.is_empty() && self.below(3) != 0 => {
                let i = self.below(a.len() as u64) as usize;
                if let Some(child) = a.get_mut(i) {
                    self.mutate(child);
                }
            }
            _ => *v = self.value(3),
        }
    }
}

#[test]
fn randomized_mutations_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let started = std::time::Instant::now();
    let mut signed = 0usize;
    let mut total = 0usize;
    for p in ProfileName::ALL {
        for t in templates(p) {
            for _ in 0..600 {
                let mut req = t.clone();
                for _ in 0..=rng.below(3) {
                    rng.mutate(&mut req);
                }
                total += 1;
                if matches!(exercise(p, &req), Outcome::Signed) {
                    signed += 1;
                }
            }
        }
    }
    eprintln!(
        "{total} mutated requests, {signed} signed, {:?}",
        started.elapsed()
    );
}
