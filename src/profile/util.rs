//! Checks and encodings several profiles share (PROFILES.md §0): method and path rules,
//! base64 flavours, error text that names the field but never echoes a value.

use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use serde_json::{Map, Value};

use super::{OrderView, RequestView};
use crate::error::{Error, Result};

/// `method` must match `^[A-Za-z-]{1,16}$`; used verbatim.
pub fn check_method(method: &str) -> Result<()> {
    if (1..=16).contains(&method.len())
        && method.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-')
    {
        Ok(())
    } else {
        Err(Error::BadRequest(
            "`method` must be 1 to 16 letters or '-' (e.g. GET, POST)".into(),
        ))
    }
}

/// `path` starts with `/` and carries neither query (`?`) nor fragment (`#`).
pub fn check_path(path: &str) -> Result<()> {
    if !path.starts_with('/') {
        return Err(Error::BadRequest("`path` must start with '/'".into()));
    }
    if path.contains('?') || path.contains('#') {
        return Err(Error::BadRequest(
            "`path` must not contain '?' or '#'; put the query string in `query`".into(),
        ));
    }
    if path.chars().any(char::is_control) {
        return Err(Error::BadRequest(
            "`path` must not contain control characters".into(),
        ));
    }
    Ok(())
}

/// RFC 4648 standard alphabet with padding.
pub fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// URL-safe alphabet, no padding (JWT).
pub fn b64url_nopad(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// URL-safe alphabet with `=` padding (Polymarket L2).
pub fn b64url_padded(bytes: &[u8]) -> String {
    URL_SAFE.encode(bytes)
}

/// A request's `api_key` (or `passphrase`, …): the request's value, else the key's bound
/// value; both present must agree (PROFILES.md §0).
pub fn bound_field(
    field: &str,
    from_request: Option<&str>,
    from_key: Option<&str>,
    required: bool,
) -> Result<Option<String>> {
    match (from_request, from_key) {
        (Some(r), Some(k)) if r != k => Err(Error::BadRequest(format!(
            "`{field}` differs from the one bound to the key"
        ))),
        (Some(v), _) | (None, Some(v)) => Ok(Some(v.to_string())),
        (None, None) if required => Err(Error::BadRequest(format!(
            "`{field}` is required (in the request or bound to the key)"
        ))),
        (None, None) => Ok(None),
    }
}

/// A field the profile cannot sign without: [`bound_field`] with `required` set.
pub fn required_field(
    field: &str,
    from_request: Option<&str>,
    from_key: Option<&str>,
) -> Result<String> {
    bound_field(field, from_request, from_key, true)?
        .ok_or_else(|| Error::Internal(format!("`{field}` missing after check")))
}

/// serde's message, cut to a sane length (it names the field and the expected type).
pub fn serde_message(e: &serde_json::Error) -> String {
    truncate(&redact_quoted_values(&e.to_string()), 200)
}

/// serde quotes a mistyped value (`invalid type: string "…", expected u64`); a request may hold
/// credentials (`passphrase`), so the quoted text is dropped and only its kind kept.
fn redact_quoted_values(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find("string \"") {
        out.push_str(&rest[..i + "string".len()]);
        let after = &rest[i + "string \"".len()..];
        // The quoted text ends at the last `"` before the next `, expected` (it may itself
        // contain quotes); without one, drop the remainder.
        match after.find("\", expected").or_else(|| after.rfind('"')) {
            Some(end) => rest = &after[end + 1..],
            None => rest = "",
        }
    }
    out.push_str(rest);
    out
}

/// At most `max` characters of `s`, marked when cut (for messages).
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max).collect();
        out.push('…');
        out
    }
}

/// `s` with every byte ≥ 0x80 replaced by `%XX` (upper-case hex), ASCII untouched
/// (Binance REST: non-ASCII must be percent-encoded before signing; the client owns ASCII).
pub fn percent_encode_non_ascii(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b < 0x80 {
            out.push(char::from(b));
        } else {
            push_pct(&mut out, b);
        }
    }
    out
}

/// `s` percent-encoded as a query-string value: everything but RFC 3986 unreserved
/// characters becomes `%XX` (so base64 `+`, `/`, `=` are escaped; hex passes unchanged).
pub fn percent_encode_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            push_pct(&mut out, b);
        }
    }
    out
}

fn push_pct(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 0x0f)]));
}

/// Decodes `%XX` and `+` (space) of one form component. Malformed escapes stay literal and
/// invalid UTF-8 is replaced, so policy sees something and parsing never fails.
pub fn form_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => match (
                b.get(i + 1).and_then(hex_val),
                b.get(i + 2).and_then(hex_val),
            ) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_val(c: &u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// `application/x-www-form-urlencoded` text (a query string or form body) as decoded
/// `(name, value)` pairs in order; empty segments are skipped.
pub fn parse_form(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|seg| !seg.is_empty())
        .map(|seg| match seg.split_once('=') {
            Some((k, v)) => (form_decode(k), form_decode(v)),
            None => (form_decode(seg), String::new()),
        })
        .collect()
}

/// The first value of `name` among form pairs.
pub fn form_value(pairs: &[(String, String)], name: &str) -> Option<String> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

/// Names of form parameters (raw or decoded) that the profile sets itself and the client
/// must not send: the first one found, for the error message.
pub fn forbidden_form_param<'a>(s: &str, forbidden: &[&'a str]) -> Option<&'a str> {
    s.split('&').find_map(|seg| {
        let raw = seg.split_once('=').map_or(seg, |(k, _)| k);
        let decoded = form_decode(raw);
        forbidden
            .iter()
            .find(|f| raw == **f || decoded == **f)
            .copied()
    })
}

/// A JSON scalar as the exchange's text: strings verbatim, numbers in their JSON spelling.
/// Other values (objects, arrays, bool, null) yield nothing — guards see only decimals.
pub fn json_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The JSON objects of a body that is one object or an array of objects (batch orders);
/// anything else (not JSON, scalars) yields none.
pub fn json_objects(body: &str) -> Vec<Map<String, Value>> {
    match serde_json::from_str::<Value>(body) {
        Ok(Value::Object(m)) => vec![m],
        Ok(Value::Array(items)) => items
            .into_iter()
            .filter_map(|v| match v {
                Value::Object(m) => Some(m),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The orders of a JSON body (one object, or an array of objects); an object whose
/// `batch_key` holds an array contributes that array's objects instead of itself. `order` maps
/// one object and skips it with `None`.
pub fn json_orders(
    body: &str,
    batch_key: Option<&str>,
    order: impl Fn(&Map<String, Value>) -> Option<OrderView>,
) -> Vec<OrderView> {
    let mut out = Vec::new();
    for obj in json_objects(body) {
        match batch_key.and_then(|k| obj.get(k)) {
            Some(Value::Array(items)) => {
                out.extend(items.iter().filter_map(Value::as_object).filter_map(&order))
            }
            _ => out.extend(order(&obj)),
        }
    }
    out
}

/// An order from a JSON object, fields named `[symbol, quantity, price]` in the exchange's
/// spelling; `None` when it names none of them (the request is not an order).
pub fn json_order(
    o: &Map<String, Value>,
    [symbol, quantity, price]: [&str; 3],
) -> Option<OrderView> {
    non_empty(OrderView {
        symbol: json_text(o.get(symbol)),
        quantity: json_text(o.get(quantity)),
        price: json_text(o.get(price)),
    })
}

/// The order form pairs (query and/or form body) name, fields as for [`json_order`].
pub fn form_order(
    pairs: &[(String, String)],
    [symbol, quantity, price]: [&str; 3],
) -> Vec<OrderView> {
    non_empty(OrderView {
        symbol: form_value(pairs, symbol),
        quantity: form_value(pairs, quantity),
        price: form_value(pairs, price),
    })
    .into_iter()
    .collect()
}

fn non_empty(o: OrderView) -> Option<OrderView> {
    (o != OrderView::default()).then_some(o)
}

/// Checks `method` and `path` (§0) and describes an HTTP request for policy.
pub fn http_view(
    method: &str,
    path: &str,
    body: &str,
    orders: Vec<OrderView>,
) -> Result<RequestView> {
    check_method(method)?;
    check_path(path)?;
    Ok(RequestView {
        method: Some(method.to_string()),
        path: Some(path.to_string()),
        body_len: body.len(),
        orders,
        typed_data: None,
    })
}

/// SHA-256 of `data` (Kraken hashes the nonce and post data before the HMAC).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_messages_do_not_quote_values() {
        let e = serde_json::from_str::<u64>("\"my-secret-passphrase\"").unwrap_err();
        let m = serde_message(&e);
        assert!(!m.contains("my-secret"), "{m}");
        assert!(m.contains("invalid type: string, expected u64"), "{m}");
        assert_eq!(redact_quoted_values("no quotes here"), "no quotes here");
        assert_eq!(
            redact_quoted_values("invalid value: string \"a\"b\", expected x"),
            "invalid value: string, expected x"
        );
    }

    #[test]
    fn method_and_path_rules() {
        assert!(check_method("GET").is_ok());
        assert!(check_method("get").is_ok());
        assert!(check_method("M-SEARCH").is_ok());
        assert!(check_method("").is_err());
        assert!(check_method("GET ").is_err());
        assert!(check_method("AAAAAAAAAAAAAAAAA").is_err());
        assert!(check_path("/api/v3/order").is_ok());
        assert!(check_path("api").is_err());
        assert!(check_path("/a?b=1").is_err());
        assert!(check_path("/a#x").is_err());
        assert!(check_path("/a\nb").is_err());
    }

    #[test]
    fn bound_fields() {
        assert_eq!(
            bound_field("api_key", None, Some("k"), true).unwrap(),
            Some("k".into())
        );
        assert!(bound_field("api_key", Some("a"), Some("b"), true).is_err());
        assert!(bound_field("api_key", None, None, true).is_err());
        assert_eq!(bound_field("api_key", None, None, false).unwrap(), None);
    }

    #[test]
    fn required_fields_and_json_orders() {
        assert_eq!(required_field("api_key", None, Some("k")).unwrap(), "k");
        assert!(required_field("api_key", None, None).is_err());
        let fields = ["s", "q", "p"];
        let batch = r#"{"list":[{"s":"A"},1,{"x":1},{"q":"2"}],"s":"outer"}"#;
        let orders = json_orders(batch, Some("list"), |o| json_order(o, fields));
        assert_eq!(orders.len(), 2);
        assert_eq!(orders[1].quantity.as_deref(), Some("2"));
        // A batch key that holds no array leaves the object itself as the order.
        let single = json_orders(r#"{"list":"x","s":"B"}"#, Some("list"), |o| {
            json_order(o, fields)
        });
        assert_eq!(single[0].symbol.as_deref(), Some("B"));
        let pairs = parse_form("s=C&p=1");
        assert_eq!(form_order(&pairs, fields)[0].price.as_deref(), Some("1"));
        assert!(form_order(&parse_form("x=1"), fields).is_empty());
    }

    #[test]
    fn percent_encodings() {
        assert_eq!(
            percent_encode_non_ascii("symbol=１&a=b c"),
            "symbol=%EF%BC%91&a=b c"
        );
        assert_eq!(percent_encode_value("a+b/c=="), "a%2Bb%2Fc%3D%3D");
        assert_eq!(percent_encode_value("00ff"), "00ff");
    }

    #[test]
    fn form_parsing_never_fails() {
        let p = parse_form("symbol=%EF%BC%91&qty=1+2&bad=%zz&&flag&x=%e2%28");
        assert_eq!(p[0], ("symbol".into(), "１".into()));
        assert_eq!(p[1], ("qty".into(), "1 2".into()));
        assert_eq!(p[2], ("bad".into(), "%zz".into()));
        assert_eq!(p[3], ("flag".into(), String::new()));
        assert_eq!(p.len(), 5);
        assert_eq!(form_value(&p, "qty").as_deref(), Some("1 2"));
        assert_eq!(
            forbidden_form_param("a=1&time%73tamp=2", &["timestamp"]),
            Some("timestamp")
        );
        assert_eq!(forbidden_form_param("timestampx=1", &["timestamp"]), None);
        assert!(json_objects("[1,{\"a\":2}]").len() == 1);
        assert!(json_objects("{not json").is_empty());
    }
}

/// Drives a profile the way the agent and the offline CLI do, for the profile modules' tests.
#[cfg(test)]
pub(crate) mod test_support {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use rsa::pkcs8::DecodePrivateKey;
    use rsa::signature::Verifier;
    use serde_json::Value;

    use super::super::{parse, ClientTime, Clock, KeyInfo, Output, ProfileName, RequestView};
    use crate::backend::material::{self, SecretKeyMaterial};
    use crate::backend::soft::MemoryKey;
    use crate::error::{Error, Result};
    use crate::model::KeyType;
    use crate::secret::SecretBytes;

    pub const NOW_MS: u64 = 1_700_000_000_000;

    pub fn pem(text: &str) -> MemoryKey {
        let m = material::parse(SecretBytes::from_slice(text.as_bytes()), None).unwrap();
        MemoryKey::from_material(&m).unwrap()
    }

    /// An HMAC key holding exactly `key_bytes`.
    pub fn hmac(key_bytes: &[u8], t: KeyType) -> MemoryKey {
        let m = SecretKeyMaterial::new(t, SecretBytes::from_slice(key_bytes));
        MemoryKey::from_material(&m).unwrap()
    }

    /// An Ed25519 key from its 32-byte seed (hex), as PKCS#8.
    pub fn ed25519_seed(seed_hex: &str) -> MemoryKey {
        let mut der = hex::decode("302e020100300506032b657004220420").unwrap();
        der.extend(hex::decode(seed_hex).unwrap());
        let m = SecretKeyMaterial::new(KeyType::Ed25519, SecretBytes::new(der));
        MemoryKey::from_material(&m).unwrap()
    }

    /// A fresh key of type `t`, with its material (for the public key).
    pub fn generated(t: KeyType) -> (MemoryKey, SecretKeyMaterial) {
        let m = crate::backend::soft::generate_material(t).unwrap();
        (MemoryKey::from_material(&m).unwrap(), m)
    }

    /// A secp256k1 key from hex text, with its KeyInfo (EIP-55 address derived).
    pub fn secp_key(hex_key: &str) -> (MemoryKey, KeyInfo) {
        let m = material::parse(
            SecretBytes::from_slice(hex_key.as_bytes()),
            Some(KeyType::Secp256k1),
        )
        .unwrap();
        let spki = material::public_spki(&m).unwrap().unwrap();
        let raw = crate::pubkey::raw_public_key(&spki).unwrap();
        let info = KeyInfo {
            key_type: Some(KeyType::Secp256k1),
            address: Some(crate::pubkey::eth_address(&raw).unwrap()),
            ..KeyInfo::default()
        };
        (MemoryKey::from_material(&m).unwrap(), info)
    }

    pub fn info(k: &MemoryKey) -> KeyInfo {
        KeyInfo {
            key_type: Some(k.key_type()),
            ..KeyInfo::default()
        }
    }

    /// parse → build on `clock` → sign → finish.
    pub fn sign_on(
        profile: ProfileName,
        req: &Value,
        key: &MemoryKey,
        info: &KeyInfo,
        clock: &mut Clock<'_>,
    ) -> Result<Output> {
        let plan = parse(profile, req)?.build(info, clock)?;
        let sig = key.sign(plan.alg, &plan.message)?;
        plan.finish(&sig)
    }

    pub fn sign_with(
        profile: ProfileName,
        req: &Value,
        key: &MemoryKey,
        info: &KeyInfo,
        now_ms: u64,
        client_time: ClientTime,
    ) -> Result<Output> {
        let mut nonces = |now: u64| -> Result<u64> { Ok(now) };
        let mut clock = Clock {
            now_ms,
            client_time,
            nonces: &mut nonces,
        };
        sign_on(profile, req, key, info, &mut clock)
    }

    /// Signs offline-style (client time accepted) and returns the output object.
    pub fn run(profile: ProfileName, req: &Value, key: &MemoryKey) -> Value {
        run_as(profile, req, key, &info(key)).unwrap()
    }

    /// [`run`] with the key's public facts as given (bound `api_key`, wallet address, …).
    pub fn run_as(
        profile: ProfileName,
        req: &Value,
        key: &MemoryKey,
        info: &KeyInfo,
    ) -> Result<Value> {
        sign_with(profile, req, key, info, NOW_MS, ClientTime::Any).map(Output::into_value)
    }

    /// The error a request produces (client time as given).
    pub fn err_with(
        profile: ProfileName,
        req: &Value,
        key: &MemoryKey,
        client_time: ClientTime,
    ) -> Error {
        match sign_with(profile, req, key, &info(key), NOW_MS, client_time) {
            Ok(o) => panic!("expected an error, got {:?}", o.into_value()),
            Err(e) => e,
        }
    }

    /// The error a request produces; must be `bad_request`. Returns its message.
    pub fn bad(profile: ProfileName, req: &Value, key: &MemoryKey) -> String {
        let e = err_with(profile, req, key, ClientTime::Any);
        assert_eq!(e.code(), "bad_request", "{e}");
        e.to_string()
    }

    /// `req` carries client time: refused over the socket by default (`bad_request`), accepted
    /// within `accepted` ms of skew and, if given, refused within `refused` ms.
    pub fn check_client_time(
        profile: ProfileName,
        req: &Value,
        key: &MemoryKey,
        accepted: u64,
        refused: Option<u64>,
    ) {
        assert_eq!(
            err_with(profile, req, key, ClientTime::Reject).code(),
            "bad_request"
        );
        let within = |skew| {
            sign_with(
                profile,
                req,
                key,
                &info(key),
                NOW_MS,
                ClientTime::Within(skew),
            )
        };
        assert!(within(accepted).is_ok());
        if let Some(skew) = refused {
            assert!(within(skew).is_err());
        }
    }

    /// The view policy sees of a request that parses.
    pub fn view(profile: ProfileName, req: &Value) -> RequestView {
        parse(profile, req).unwrap().view
    }

    /// An object's field names in order (output fields, headers, params).
    pub fn field_names(v: &Value) -> Vec<&str> {
        v.as_object().unwrap().keys().map(String::as_str).collect()
    }

    fn rsa_public(pem_text: &str) -> rsa::RsaPublicKey {
        rsa::RsaPrivateKey::from_pkcs8_pem(pem_text)
            .unwrap()
            .to_public_key()
    }

    /// Checks a base64 RSASSA-PKCS1-v1_5/SHA-256 signature with the public key, and that it
    /// does not verify another message.
    pub fn verify_rsa_pkcs1v15(pem_text: &str, message: &[u8], sig_b64: &str) {
        let vk = rsa::pkcs1v15::VerifyingKey::<sha2::Sha256>::new(rsa_public(pem_text));
        let raw = STANDARD.decode(sig_b64).unwrap();
        let sig = rsa::pkcs1v15::Signature::try_from(raw.as_slice()).unwrap();
        vk.verify(message, &sig).unwrap();
        assert!(vk.verify(b"tampered", &sig).is_err());
    }

    /// As [`verify_rsa_pkcs1v15`] for RSASSA-PSS/SHA-256 with salt length 32.
    pub fn verify_rsa_pss(pem_text: &str, message: &[u8], sig_b64: &str) {
        let vk =
            rsa::pss::VerifyingKey::<sha2::Sha256>::new_with_salt_len(rsa_public(pem_text), 32);
        let raw = STANDARD.decode(sig_b64).unwrap();
        let sig = rsa::pss::Signature::try_from(raw.as_slice()).unwrap();
        vk.verify(message, &sig).unwrap();
        assert!(vk.verify(b"tampered", &sig).is_err());
    }

    /// The EIP's Mail example (ethereum/EIPs assets/eip-712/Example.js); `with_http_origin`
    /// adds the `string httpOrigin` domain field of its earlier revision.
    pub fn eip712_mail(with_http_origin: bool) -> Value {
        use serde_json::json;
        let mut domain_type = vec![
            json!({"name": "name", "type": "string"}),
            json!({"name": "version", "type": "string"}),
            json!({"name": "chainId", "type": "uint256"}),
        ];
        let mut domain = json!({"name": "Ether Mail", "version": "1", "chainId": 1});
        if with_http_origin {
            domain_type.push(json!({"name": "httpOrigin", "type": "string"}));
            domain["httpOrigin"] = json!("https://ether-mail.eth");
        }
        domain_type.push(json!({"name": "verifyingContract", "type": "address"}));
        domain["verifyingContract"] = json!("0xCcCCccccCCCCcCCCCCCcCcCccCcCCCcCcccccccC");
        json!({
            "types": {
                "EIP712Domain": domain_type,
                "Person": [{"name": "name", "type": "string"}, {"name": "wallet", "type": "address"}],
                "Mail": [
                    {"name": "from", "type": "Person"},
                    {"name": "to", "type": "Person"},
                    {"name": "contents", "type": "string"}
                ]
            },
            "primaryType": "Mail",
            "domain": domain,
            "message": {
                "from": {"name": "Cow", "wallet": "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826"},
                "to": {"name": "Bob", "wallet": "0xbBbBBBBbbBBBbbbBbbBbbbbBBbBbbbbBbBbbBBbB"},
                "contents": "Hello, Bob!"
            }
        })
    }
}

/// Published test keys the profile tests share (never used outside tests).
#[cfg(test)]
pub(crate) mod test_keys {
    /// RSA-2048 test key of sammchardy/python-binance `tests/test_cryptography.py`, published
    /// there encrypted (PKCS#8, password `testpwd`); this is the same key
    /// decrypted to PKCS#8 (`openssl pkcs8 -in enc.pem -passin pass:testpwd`).
    pub const RSA_2048_PKCS8: &str = "-----BEGIN PRIVATE KEY-----
MIIEvAIBADANBgkqhkiG9w0BAQEFAASCBKYwggSiAgEAAoIBAQCHaszglOHdEQZn
t3ufMUa+D0LICBxJ/BGHfRwniogWApHymhBaLmYxfOzY8Ltr1Ns7EWa/sVXUZ2KJ
vW0TbXohdB9YJ9j5YPR0UUL4ZgzplT9sEeZOGluFAhCvBIA1zxP9tewXfV+WoJix
QmIUsU8Y/TxuPj5gpMCCIaiavQi8If24qv/KBtSron7rRd5TuF+BC9NcqtY9schn
+mRDahLU+y4dMrn88Hd2nPbih6an44t6HR0YG9df0LYt6iVEZdyCAnjj0X5+aXTg
NVzOJ7II1+gcL3UGDKkqacWuN9K6aMMNTmxbn8WcAwIAO1rTpuyjhXE4u7nfsSpc
2zWcoywlAgMBAAECggEADfEa+CGb7MIB93pWie9C1J0xnPKTfF0tWNZdUweE4e87
I3plJe5nqxSs4IZNutkGsTAmH0+crJTwT4oRyXxDT1/AkmJCiSTy8L7PtvnwE7m/
9oUT7FqeWDVRjmis4ogCtjjyqQB0Gkfyhd11x6JG/dBPVnJQwxZzPh1FBJljECtc
DdK0jHdhTvMCvALdZKiIwQG++y68IVsOgmdTJnXYyrcEp9pNFw9+C8wwkVjfWfWb
p+Rm7kKBxUzcZ3xAg1XgIhvKuw1CRBawe5yUKB3/ueYa5r0qSczFYCbLz7i30NwP
LjdxC445PDIeBQjzSU7kkOv3j+IQ9Z+33e1ZdE1gCQKBgQC6f8vq+IZGia0rX5PI
h5AhlcTYkP0uoYAjPWPMB2MjKwW/u8EHQudsOTdUHxUa0VQujxJZMAG2vIYQ6fiX
pbhLbF0QChKiWJeqioEqR48cMleldlE1sYarSI5j7ZMdOJNhmiEi7TpuJM6JCdHT
3YkfC9hrbc1AnsshkxnxUEHtBwKBgQC54bryjRwsDjeIWJEF9M6sSz+yClEhWLCg
Oq52umiMcJLvZbUyfD7T0ovkRF3axjWCGAmr9BZiATWWQMHF46PMUtXD2fk9LL00
Z/n3g44LLi0dNMbCy/jIGP3B+fB7X1ZaW2111bldCil8nJtx+5+qvpVA1Z6jqG0f
kOyEgfI+cwKBgGUFzMPfE30qHq+b+kVpiV1n71UQVNTpjquIGYLvjXgDWf3eClWQ
nCM3aw0aOShps5v0zA+bvZHq1QRceNhMYGQast55VlayfpVWqVjpok+3xVpPmPXo
z/YAO4FNs57kgpEgGEr/DeOT9Hyu4QZOvnQeyoCG3ePfIFFziV36B3wJAoGABS0d
CJ4XV765mylkOHc9vhyGVI3m/ne6y2t26kV8ndSQsuvxJMvC8CEf1iZ1Op9kZBAJ
TOmKKgaAmIOLIdiZ+hmgbEjIoQR67Fes5VCbhwItLXAHzOrjLadMgbdVFApunCuJ
m8ts0wNybk7qIT1xj86o11pbhZEuIL/nZjU8KrMCgYAj0cIxR4I4XabcpmwaHmsL
r4hXow8+HUEBg9TcU1Rlja9/mrRy/HZZ4+qBwW6z7xwQZ0RnkjmtkKWRb6TVnF6z
XoNV+qUU1r+RGlgn17xPLWmfsOfvWV8hG3MGuDzClMaTZ5l/kWB/+7ZI/RiN36vU
H85tz89CnQc921FHX8zz7g==
-----END PRIVATE KEY-----
";

    /// RFC 8032 §7.1 TEST 1 Ed25519 secret key (seed).
    pub const RFC8032_TEST1_SEED: &str =
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";

    /// keccak256("cow"): the key of the EIP-712 and eth-sig-util examples.
    pub const COW_KEY: &str = "0xc85ef7d79691fe79573b1a7064c19c1a9819ebdbd1faaab1a8ec92344438aaf4";

    /// Ed25519 test key of sammchardy/python-binance `tests/test_cryptography.py`.
    pub const ED25519_PKCS8: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIPQmzwVKJETqVd7L9E/DFbkvrOigy1tLL+9QF0mSn6dV
-----END PRIVATE KEY-----
";
}
