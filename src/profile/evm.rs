//! What the EVM profiles (eip191, eip712, polymarket L1, hyperliquid) share: the secp256k1
//! output encoding of PROFILES.md §0 and the EIP-712 hashing of §10.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha3::{Digest, Keccak256};

use super::{KeyInfo, Output, Plan, ProfileName, TypedDataView};
use crate::backend::Signature;
use crate::error::{Error, Result};
use crate::model::{Algorithm, KeyType};

pub fn keccak256(data: &[u8]) -> [u8; 32] {
    Keccak256::digest(data).into()
}

/// `0x` + lowercase hex.
pub fn hex0x(bytes: &[u8]) -> String {
    format!("0x{}", hex::encode(bytes))
}

fn bad(msg: impl Into<String>) -> Error {
    Error::BadRequest(msg.into())
}

/// Every EVM profile signs with the wallet key and nothing else.
pub fn require_secp256k1(profile: ProfileName, key: &KeyInfo) -> Result<()> {
    key.key_type_for(profile, |t| t == KeyType::Secp256k1)
        .map(drop)
}

/// Parses `0x` + 40 hex digits (any case) into the 20 address bytes.
pub fn parse_address(field: &str, s: &str) -> Result<[u8; 20]> {
    let digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .ok_or_else(|| bad(format!("`{field}` must be an address: 0x + 40 hex digits")))?;
    let mut out = [0u8; 20];
    if digits.len() != 40 || hex::decode_to_slice(digits, &mut out).is_err() {
        return Err(bad(format!(
            "`{field}` must be an address: 0x + 40 hex digits"
        )));
    }
    Ok(out)
}

/// Parses `0x` + an even number of hex digits (`0x` alone = empty).
pub fn parse_hex_bytes(field: &str, s: &str) -> Result<Vec<u8>> {
    let digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .ok_or_else(|| bad(format!("`{field}` must be 0x-prefixed hex")))?;
    hex::decode(digits).map_err(|_| {
        bad(format!(
            "`{field}` must be 0x + an even number of hex digits"
        ))
    })
}

/// The secp256k1 fields every EVM output carries (§0), already encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecpFields {
    /// `0x` ‖ r ‖ s ‖ v — 132 characters.
    pub signature: String,
    pub r: String,
    pub s: String,
    pub v: u8,
    pub digest: String,
    /// EIP-55 address of the signer (recovered from the signature).
    pub address: String,
}

impl SecpFields {
    /// `signature`, `headers`, then `r`, `s`, `v`, `digest`, `address`.
    pub fn output(self, headers: &[(&str, String)]) -> Output {
        Output::new(self.signature, headers)
            .with("r", self.r)
            .with("s", self.s)
            .with("v", self.v)
            .with("digest", self.digest)
            .with("address", self.address)
    }
}

/// A plan that signs `digest` with the wallet key and hands the encoded fields to `finish`.
/// `expected_address` (the key's bound address, if known) is checked against the address
/// recovered from the signature, so a backend answering with the wrong key is caught here.
pub fn plan_digest(
    digest: [u8; 32],
    expected_address: Option<String>,
    finish: impl FnOnce(SecpFields) -> Result<Output> + Send + 'static,
) -> Plan {
    Plan::new(
        Algorithm::EcdsaSecp256k1Prehashed,
        digest.to_vec(),
        move |sig: &Signature| finish(encode_signature(sig, &digest, expected_address.as_deref())?),
    )
}

/// Encodes a backend signature per §0: low-s, `v = 27 + recovery_id`, fixed-width hex.
pub fn encode_signature(
    sig: &Signature,
    digest: &[u8; 32],
    expected_address: Option<&str>,
) -> Result<SecpFields> {
    use k256::ecdsa::{RecoveryId, Signature as KSig, VerifyingKey};

    if let Some(d) = sig.digest {
        if &d != digest {
            return Err(Error::Internal(
                "the backend signed a different digest than the profile built".into(),
            ));
        }
    }
    let parsed = KSig::from_slice(&sig.bytes)
        .map_err(|_| Error::Internal("secp256k1 signature is not 64 bytes of valid r‖s".into()))?;
    // Backends already normalise; a device that does not would otherwise yield a signature
    // Ethereum rejects, so normalise here too (flipping the recovery id with s).
    let (parsed, flipped) = match parsed.normalize_s() {
        Some(low) => (low, true),
        None => (parsed, false),
    };
    let recover = |id: u8| -> Option<String> {
        let rid = RecoveryId::from_byte(id)?;
        let vk = VerifyingKey::recover_from_prehash(digest, &parsed, rid).ok()?;
        crate::pubkey::eth_address(vk.to_encoded_point(false).as_bytes()).ok()
    };
    let matches = |addr: &str| expected_address.is_none_or(|e| e.eq_ignore_ascii_case(addr));
    let (recid, address) = match sig.recovery_id {
        Some(id) if id <= 1 => {
            let id = if flipped { id ^ 1 } else { id };
            let addr = recover(id).ok_or_else(|| {
                Error::Internal("secp256k1 signature does not recover to a public key".into())
            })?;
            (id, addr)
        }
        Some(_) => return Err(Error::Internal("secp256k1 recovery id out of range".into())),
        None => {
            // A device that does not report the recovery id: find it from the known address.
            if expected_address.is_none() {
                return Err(Error::Internal(
                    "secp256k1 signature without recovery id and no address to find it".into(),
                ));
            }
            (0u8..=1)
                .find_map(|id| recover(id).filter(|a| matches(a)).map(|a| (id, a)))
                .ok_or_else(|| {
                    Error::Internal("signature does not recover to the key's address".into())
                })?
        }
    };
    if !matches(&address) {
        return Err(Error::Internal(
            "signature does not recover to the key's address".into(),
        ));
    }
    let rs = parsed.to_bytes();
    let v = 27 + recid;
    let mut full = Vec::with_capacity(65);
    full.extend_from_slice(&rs);
    full.push(v);
    Ok(SecpFields {
        signature: hex0x(&full),
        r: hex0x(&rs[..32]),
        s: hex0x(&rs[32..]),
        v,
        digest: hex0x(digest),
        address,
    })
}

// ---------------------------------------------------------------------------------------------
// EIP-712

/// Deepest nesting of structs and arrays hashed (real typed data stays within a handful).
const MAX_DEPTH: usize = 32;
/// Longest integer text accepted (78 decimal digits is 2^256; leading zeros are allowed).
const MAX_INT_TEXT: usize = 100;

/// `eth_signTypedData_v4` JSON.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TypedData {
    pub types: BTreeMap<String, Vec<Member>>,
    #[serde(rename = "primaryType")]
    pub primary_type: String,
    pub domain: Map<String, Value>,
    pub message: Map<String, Value>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: String,
}

impl TypedData {
    /// What policy sees: the domain's `name` (if a string) and the primary type.
    pub fn view(&self) -> TypedDataView {
        TypedDataView {
            domain_name: self
                .domain
                .get("name")
                .and_then(Value::as_str)
                .map(str::to_string),
            primary_type: self.primary_type.clone(),
        }
    }

    /// keccak256(0x19 0x01 ‖ domainSeparator ‖ hashStruct(primaryType, message)).
    pub fn digest(&self) -> Result<[u8; 32]> {
        let (domain_sep, message_hash) = self.hashes()?;
        let mut buf = Vec::with_capacity(66);
        buf.extend_from_slice(&[0x19, 0x01]);
        buf.extend_from_slice(&domain_sep);
        buf.extend_from_slice(&message_hash);
        Ok(keccak256(&buf))
    }

    /// (domainSeparator, hashStruct(primaryType, message)).
    pub fn hashes(&self) -> Result<([u8; 32], [u8; 32])> {
        let mut types = self.types.clone();
        if !types.contains_key("EIP712Domain") {
            types.insert("EIP712Domain".into(), infer_domain(&self.domain)?);
        }
        let mut enc = Encoder::new(&types)?;
        let domain = enc.hash_struct("EIP712Domain", &self.domain, "domain", 0)?;
        if !types.contains_key(&self.primary_type) {
            return Err(bad(format!(
                "typed_data.primaryType `{}` is not defined in types",
                short(&self.primary_type)
            )));
        }
        let message = enc.hash_struct(&self.primary_type, &self.message, "message", 0)?;
        Ok((domain, message))
    }
}

/// EIP712Domain from the keys present, in the order the EIP lists them.
fn infer_domain(domain: &Map<String, Value>) -> Result<Vec<Member>> {
    const KNOWN: [(&str, &str); 5] = [
        ("name", "string"),
        ("version", "string"),
        ("chainId", "uint256"),
        ("verifyingContract", "address"),
        ("salt", "bytes32"),
    ];
    if let Some(k) = domain.keys().find(|k| !KNOWN.iter().any(|(n, _)| n == k)) {
        return Err(bad(format!(
            "typed_data.domain field `{}` is not a standard domain field; declare types.EIP712Domain",
            short(k)
        )));
    }
    Ok(KNOWN
        .iter()
        .filter(|(n, _)| domain.contains_key(*n))
        .map(|(n, t)| Member {
            name: (*n).into(),
            ty: (*t).into(),
        })
        .collect())
}

/// A name cut short for error messages (type and field names, never values).
fn short(s: &str) -> String {
    super::util::truncate(s, 64)
}

/// The solidity atomic types EIP-712 knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Atomic {
    Bool,
    Address,
    Uint(u16),
    Int(u16),
    FixedBytes(usize),
    Bytes,
    String,
}

fn atomic(ty: &str) -> Option<Atomic> {
    match ty {
        "bool" => return Some(Atomic::Bool),
        "address" => return Some(Atomic::Address),
        "bytes" => return Some(Atomic::Bytes),
        "string" => return Some(Atomic::String),
        "uint" => return Some(Atomic::Uint(256)),
        "int" => return Some(Atomic::Int(256)),
        _ => {}
    }
    let bits = |n: &str| -> Option<u16> {
        if n.is_empty() || n.starts_with('0') || !n.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let v: u16 = n.parse().ok()?;
        (v.is_multiple_of(8) && (8..=256).contains(&v)).then_some(v)
    };
    if let Some(n) = ty.strip_prefix("uint") {
        return bits(n).map(Atomic::Uint);
    }
    if let Some(n) = ty.strip_prefix("int") {
        return bits(n).map(Atomic::Int);
    }
    if let Some(n) = ty.strip_prefix("bytes") {
        if n.is_empty() || n.starts_with('0') || !n.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let len: usize = n.parse().ok()?;
        return (1..=32).contains(&len).then_some(Atomic::FixedBytes(len));
    }
    None
}

/// Splits `T[k]` / `T[]` into (`T`, Some(k) / None); `None` when `ty` is not an array.
fn split_array(ty: &str) -> Result<Option<(&str, Option<usize>)>> {
    let Some(body) = ty.strip_suffix(']') else {
        return Ok(None);
    };
    let open = body
        .rfind('[')
        .ok_or_else(|| bad(format!("malformed array type `{}`", short(ty))))?;
    let (inner, dim) = (&body[..open], &body[open + 1..]);
    if inner.is_empty() {
        return Err(bad(format!("malformed array type `{}`", short(ty))));
    }
    if dim.is_empty() {
        return Ok(Some((inner, None)));
    }
    if !dim.bytes().all(|b| b.is_ascii_digit()) || dim.starts_with('0') || dim.len() > 9 {
        return Err(bad(format!("malformed array size in type `{}`", short(ty))));
    }
    let n: usize = dim
        .parse()
        .map_err(|_| bad(format!("malformed array size in type `{}`", short(ty))))?;
    Ok(Some((inner, Some(n))))
}

/// The struct or atomic name under any array suffixes.
fn base_type(ty: &str) -> &str {
    match ty.find('[') {
        Some(i) => &ty[..i],
        None => ty,
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && !s
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "()[],".contains(c))
}

struct Encoder<'a> {
    types: &'a BTreeMap<String, Vec<Member>>,
    type_hashes: HashMap<&'a str, [u8; 32]>,
}

impl<'a> Encoder<'a> {
    /// Checks every type definition once, so hashing only meets well-formed types.
    fn new(types: &'a BTreeMap<String, Vec<Member>>) -> Result<Encoder<'a>> {
        for (name, members) in types {
            if !valid_name(name) || atomic(name).is_some() {
                return Err(bad(format!(
                    "typed_data.types: `{}` is not a valid struct type name",
                    short(name)
                )));
            }
            let mut seen = BTreeSet::new();
            for m in members {
                if !valid_name(&m.name) {
                    return Err(bad(format!(
                        "typed_data.types.{}: invalid field name",
                        short(name)
                    )));
                }
                if !seen.insert(m.name.as_str()) {
                    return Err(bad(format!(
                        "typed_data.types.{}: field `{}` is declared twice",
                        short(name),
                        short(&m.name)
                    )));
                }
                check_type(types, &m.ty).map_err(|e| {
                    bad(format!(
                        "typed_data.types.{}.{}: {e}",
                        short(name),
                        short(&m.name)
                    ))
                })?;
            }
        }
        Ok(Encoder {
            types,
            type_hashes: HashMap::new(),
        })
    }

    /// encodeType(T): T's own signature followed by its dependencies sorted by name.
    fn encode_type(&self, name: &str) -> String {
        let mut deps = BTreeSet::new();
        let mut stack = vec![name];
        while let Some(t) = stack.pop() {
            for m in self.types.get(t).into_iter().flatten() {
                let b = base_type(&m.ty);
                if b != name && self.types.contains_key(b) && deps.insert(b) {
                    stack.push(b);
                }
            }
        }
        let mut out = String::new();
        for t in std::iter::once(name).chain(deps) {
            out.push_str(t);
            out.push('(');
            for (i, m) in self.types.get(t).into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&m.ty);
                out.push(' ');
                out.push_str(&m.name);
            }
            out.push(')');
        }
        out
    }

    fn type_hash(&mut self, name: &'a str) -> [u8; 32] {
        if let Some(h) = self.type_hashes.get(name) {
            return *h;
        }
        let h = keccak256(self.encode_type(name).as_bytes());
        self.type_hashes.insert(name, h);
        h
    }

    fn hash_struct(
        &mut self,
        name: &str,
        value: &Map<String, Value>,
        path: &str,
        depth: usize,
    ) -> Result<[u8; 32]> {
        if depth > MAX_DEPTH {
            return Err(bad(format!(
                "typed_data.{path}: nested deeper than {MAX_DEPTH} levels"
            )));
        }
        let types = self.types;
        let (tname, members) = types
            .get_key_value(name)
            .ok_or_else(|| bad(format!("typed_data.{path}: unknown type `{}`", short(name))))?;
        if let Some(extra) = value
            .keys()
            .find(|k| !members.iter().any(|m| &m.name == *k))
        {
            return Err(bad(format!(
                "typed_data.{path}: field `{}` is not declared in type {}",
                short(extra),
                short(name)
            )));
        }
        let mut buf = Vec::with_capacity(32 * (members.len() + 1));
        buf.extend_from_slice(&self.type_hash(tname));
        for m in members {
            let sub = format!("{path}.{}", m.name);
            let v = value
                .get(&m.name)
                .ok_or_else(|| bad(format!("typed_data.{}: missing", short(&sub))))?;
            buf.extend_from_slice(&self.encode_value(&m.ty, v, &sub, depth + 1)?);
        }
        Ok(keccak256(&buf))
    }

    fn encode_value(&mut self, ty: &str, v: &Value, path: &str, depth: usize) -> Result<[u8; 32]> {
        if depth > MAX_DEPTH {
            return Err(bad(format!(
                "typed_data.{}: nested deeper than {MAX_DEPTH} levels",
                short(path)
            )));
        }
        if let Some((inner, len)) = split_array(ty)? {
            let items = v.as_array().ok_or_else(|| {
                bad(format!(
                    "typed_data.{}: must be an array ({})",
                    short(path),
                    short(ty)
                ))
            })?;
            if let Some(n) = len {
                if items.len() != n {
                    return Err(bad(format!(
                        "typed_data.{}: must have exactly {n} elements",
                        short(path)
                    )));
                }
            }
            let mut buf = Vec::with_capacity(32 * items.len());
            for (i, item) in items.iter().enumerate() {
                let sub = format!("{path}[{i}]");
                buf.extend_from_slice(&self.encode_value(inner, item, &sub, depth + 1)?);
            }
            return Ok(keccak256(&buf));
        }
        if let Some(a) = atomic(ty) {
            return encode_atomic(a, v)
                .map_err(|msg| bad(format!("typed_data.{}: {msg}", short(path))));
        }
        let obj = v.as_object().ok_or_else(|| {
            bad(format!(
                "typed_data.{}: must be an object ({})",
                short(path),
                short(ty)
            ))
        })?;
        self.hash_struct(ty, obj, path, depth)
    }
}

/// A field type must be atomic, a declared struct, or an array of either.
fn check_type(types: &BTreeMap<String, Vec<Member>>, ty: &str) -> std::result::Result<(), String> {
    let mut t = ty;
    loop {
        match split_array(t) {
            Ok(Some((inner, _))) => t = inner,
            Ok(None) => break,
            Err(_) => return Err(format!("malformed type `{}`", short(ty))),
        }
    }
    if atomic(t).is_some() || types.contains_key(t) {
        Ok(())
    } else {
        Err(format!("unknown type `{}`", short(ty)))
    }
}

fn encode_atomic(a: Atomic, v: &Value) -> std::result::Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    match a {
        Atomic::Bool => match v {
            Value::Bool(b) => out[31] = u8::from(*b),
            _ => return Err("must be true or false".into()),
        },
        Atomic::Address => {
            let s = v
                .as_str()
                .ok_or("must be an address string (0x + 40 hex digits)")?;
            let a = parse_address("address", s)
                .map_err(|_| "must be 0x + 40 hex digits".to_string())?;
            out[12..].copy_from_slice(&a);
        }
        Atomic::String => {
            let s = v.as_str().ok_or("must be a string")?;
            out = keccak256(s.as_bytes());
        }
        Atomic::Bytes => {
            let s = v.as_str().ok_or("must be 0x-hex bytes")?;
            let b = parse_hex_bytes("bytes", s)
                .map_err(|_| "must be 0x + an even number of hex digits".to_string())?;
            out = keccak256(&b);
        }
        Atomic::FixedBytes(n) => {
            let s = v.as_str().ok_or("must be 0x-hex bytes")?;
            let b = parse_hex_bytes("bytes", s)
                .map_err(|_| "must be 0x + an even number of hex digits".to_string())?;
            if b.len() != n {
                return Err(format!("must be exactly {n} bytes"));
            }
            out[..n].copy_from_slice(&b);
        }
        Atomic::Uint(bits) => {
            let (neg, mag) = parse_int(v)?;
            if neg && mag != [0u8; 32] {
                return Err(format!("uint{bits} must not be negative"));
            }
            if bit_len(&mag) > usize::from(bits) {
                return Err(format!("out of range for uint{bits}"));
            }
            out = mag;
        }
        Atomic::Int(bits) => {
            let (neg, mag) = parse_int(v)?;
            let limit = usize::from(bits) - 1;
            let len = bit_len(&mag);
            let fits = len <= limit || (neg && len == limit + 1 && is_power_of_two(&mag));
            if !fits {
                return Err(format!("out of range for int{bits}"));
            }
            out = if neg { negate(&mag) } else { mag };
        }
    }
    Ok(out)
}

/// Integer forms: JSON number (within u64/i64), decimal string, `0x` hex string; `-` allowed.
/// Returns (negative, magnitude as 32 big-endian bytes).
fn parse_int(v: &Value) -> std::result::Result<(bool, [u8; 32]), String> {
    match v {
        Value::Number(n) => {
            let mut out = [0u8; 32];
            if let Some(u) = n.as_u64() {
                out[24..].copy_from_slice(&u.to_be_bytes());
                Ok((false, out))
            } else if let Some(i) = n.as_i64() {
                out[24..].copy_from_slice(&i.unsigned_abs().to_be_bytes());
                Ok((true, out))
            } else {
                Err("must be an integer; a JSON number with a fraction or outside the u64/i64 range is not accepted — send large values as a decimal or 0x string".into())
            }
        }
        Value::String(s) => parse_int_text(s),
        _ => Err("must be an integer (JSON number, decimal string or 0x hex string)".into()),
    }
}

fn parse_int_text(s: &str) -> std::result::Result<(bool, [u8; 32]), String> {
    if s.len() > MAX_INT_TEXT {
        return Err("integer text is too long".into());
    }
    let (neg, body) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let mut out = [0u8; 32];
    if let Some(h) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        let h = h.trim_start_matches('0');
        if !body[2..].bytes().all(|b| b.is_ascii_hexdigit()) || body.len() == 2 {
            return Err("must be 0x followed by hex digits".into());
        }
        if h.len() > 64 {
            return Err("out of range for 256 bits".into());
        }
        let padded = format!("{h:0>64}");
        hex::decode_to_slice(&padded, &mut out).map_err(|_| "invalid hex".to_string())?;
        return Ok((neg, out));
    }
    if body.is_empty() || !body.bytes().all(|b| b.is_ascii_digit()) {
        return Err("must be an integer (decimal digits, optional leading '-', or 0x hex)".into());
    }
    for d in body.bytes() {
        // out = out * 10 + d, big-endian, failing on overflow past 256 bits
        let mut carry = u16::from(d - b'0');
        for byte in out.iter_mut().rev() {
            let x = u16::from(*byte) * 10 + carry;
            *byte = (x & 0xff) as u8;
            carry = x >> 8;
        }
        if carry != 0 {
            return Err("out of range for 256 bits".into());
        }
    }
    Ok((neg, out))
}

fn bit_len(mag: &[u8; 32]) -> usize {
    match mag.iter().position(|b| *b != 0) {
        Some(i) => (32 - i) * 8 - mag[i].leading_zeros() as usize,
        None => 0,
    }
}

fn is_power_of_two(mag: &[u8; 32]) -> bool {
    mag.iter().map(|b| b.count_ones()).sum::<u32>() == 1
}

/// Two's complement of a magnitude in 256 bits.
fn negate(mag: &[u8; 32]) -> [u8; 32] {
    let mut out = [0u8; 32];
    let mut carry = 1u16;
    for i in (0..32).rev() {
        let x = u16::from(!mag[i]) + carry;
        out[i] = (x & 0xff) as u8;
        carry = x >> 8;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::util::test_support::eip712_mail;
    use super::*;
    use serde_json::json;

    fn td(v: Value) -> TypedData {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn mail_intermediate_values() {
        // Expected values from ethereum/EIPs assets/eip-712/Example.js.
        let t = td(eip712_mail(false));
        let enc = Encoder::new(&t.types).unwrap();
        assert_eq!(
            enc.encode_type("Mail"),
            "Mail(Person from,Person to,string contents)Person(string name,address wallet)"
        );
        let (dom, msg) = t.hashes().unwrap();
        assert_eq!(
            hex0x(&dom),
            "0xf2cee375fa42b42143804025fc449deafd50cc031ca257e0b194a650a912090f"
        );
        assert_eq!(
            hex0x(&msg),
            "0xc52c0ee5d84264471806290a3f2c4cecfc5490626bf912d01f240d7a274b371e"
        );
        assert_eq!(
            hex0x(&t.digest().unwrap()),
            "0xbe609aee343fb3c4b28e1df9e632fca64fcfaede20f02e86244efddf30957bd2"
        );
    }

    #[test]
    fn inferred_domain_matches_declared() {
        let declared = td(eip712_mail(false));
        let mut v = eip712_mail(false);
        v["types"].as_object_mut().unwrap().remove("EIP712Domain");
        assert_eq!(td(v).digest().unwrap(), declared.digest().unwrap());
        let mut v = eip712_mail(false);
        v["types"].as_object_mut().unwrap().remove("EIP712Domain");
        v["domain"]["foo"] = json!("x");
        assert!(td(v).digest().is_err());
    }

    #[test]
    fn integer_forms_and_ranges() {
        let enc = |ty: &str, v: Value| encode_atomic(atomic(ty).unwrap(), &v);
        let one = {
            let mut o = [0u8; 32];
            o[31] = 1;
            o
        };
        assert_eq!(enc("uint256", json!(1)).unwrap(), one);
        assert_eq!(enc("uint256", json!("1")).unwrap(), one);
        assert_eq!(enc("uint256", json!("0x01")).unwrap(), one);
        assert_eq!(enc("uint8", json!(255)).unwrap()[31], 255);
        assert!(enc("uint8", json!(256)).is_err());
        assert!(enc("uint8", json!(-1)).is_err());
        assert!(enc("uint256", json!(1.5)).is_err());
        assert!(enc("uint256", json!("1.5")).is_err());
        assert!(enc("uint256", json!("")).is_err());
        assert!(enc("uint256", json!("0x")).is_err());
        assert!(enc("uint256", json!(" 1")).is_err());
        assert!(enc("uint256", json!(true)).is_err());
        let max = "115792089237316195423570985008687907853269984665640564039457584007913129639935";
        assert_eq!(enc("uint256", json!(max)).unwrap(), [0xff; 32]);
        assert!(enc(
            "uint256",
            json!("115792089237316195423570985008687907853269984665640564039457584007913129639936")
        )
        .is_err());
        assert_eq!(enc("int8", json!(-128)).unwrap(), {
            let mut o = [0xff; 32];
            o[31] = 0x80;
            o
        });
        assert!(enc("int8", json!(-129)).is_err());
        assert!(enc("int8", json!(128)).is_err());
        assert_eq!(enc("int8", json!(127)).unwrap()[31], 127);
        assert_eq!(enc("int256", json!("-1")).unwrap(), [0xff; 32]);
        assert_eq!(enc("int", json!("-0x01")).unwrap(), [0xff; 32]);
        let min = "-57896044618658097711785492504343953926634992332820282019728792003956564819968";
        let mut expect = [0u8; 32];
        expect[0] = 0x80;
        assert_eq!(enc("int256", json!(min)).unwrap(), expect);
        assert!(enc(
            "int256",
            json!("57896044618658097711785492504343953926634992332820282019728792003956564819968")
        )
        .is_err());
        assert_eq!(enc("uint64", json!(u64::MAX)).unwrap()[24..], [0xff; 8]);
        assert_eq!(enc("int64", json!(i64::MIN)).unwrap()[24], 0x80);
        assert!(atomic("uint7").is_none());
        assert!(atomic("uint264").is_none());
        assert!(atomic("uint08").is_none());
        assert!(atomic("bytes33").is_none());
        assert!(atomic("bytes0").is_none());
    }

    #[test]
    fn bytes_and_addresses() {
        let enc = |ty: &str, v: Value| encode_atomic(atomic(ty).unwrap(), &v);
        let mut expect = [0u8; 32];
        expect[0] = 0x11;
        expect[1] = 0x22;
        assert_eq!(enc("bytes2", json!("0x1122")).unwrap(), expect);
        assert!(enc("bytes2", json!("0x11")).is_err());
        assert!(enc("bytes2", json!("1122")).is_err());
        assert_eq!(enc("bytes", json!("0x")).unwrap(), keccak256(b""));
        assert!(enc("bytes", json!("0x123")).is_err());
        assert!(enc(
            "address",
            json!("0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD82")
        )
        .is_err());
        assert!(enc("address", json!("CD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826")).is_err());
        assert_eq!(
            enc(
                "address",
                json!("0xcd2a3d9f938e13cd947ec05abc7fe734df8dd826")
            )
            .unwrap(),
            enc(
                "address",
                json!("0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826")
            )
            .unwrap()
        );
    }

    #[test]
    fn structure_errors() {
        let mut v = eip712_mail(false);
        v["message"]["extra"] = json!(1);
        assert!(td(v).digest().is_err());
        let mut v = eip712_mail(false);
        v["message"].as_object_mut().unwrap().remove("contents");
        assert!(td(v).digest().is_err());
        let mut v = eip712_mail(false);
        v["types"]["Mail"][0]["type"] = json!("Persona");
        assert!(td(v).digest().is_err());
        let mut v = eip712_mail(false);
        v["primaryType"] = json!("Nope");
        assert!(td(v).digest().is_err());
        let mut v = eip712_mail(false);
        v["types"]["Mail"][2]["type"] = json!("string[2]");
        v["message"]["contents"] = json!(["a"]);
        assert!(td(v).digest().is_err());
        // A type that can only be satisfied by infinite nesting stops at the depth limit.
        let t = json!({
            "types": {"EIP712Domain": [], "A": [{"name": "a", "type": "A"}]},
            "primaryType": "A", "domain": {}, "message": {"a": {"a": {"a": {}}}}
        });
        assert!(td(t).digest().is_err());
    }

    #[test]
    fn dependency_order_is_sorted_and_transitive() {
        let t = td(json!({
            "types": {
                "EIP712Domain": [],
                "Zed": [{"name": "b", "type": "Beta"}, {"name": "a", "type": "Alpha[][2]"}],
                "Beta": [{"name": "g", "type": "Gamma"}],
                "Alpha": [{"name": "x", "type": "uint8"}],
                "Gamma": [{"name": "z", "type": "Zed[]"}, {"name": "y", "type": "bool"}]
            },
            "primaryType": "Zed", "domain": {}, "message": {}
        }));
        let enc = Encoder::new(&t.types).unwrap();
        assert_eq!(
            enc.encode_type("Zed"),
            "Zed(Beta b,Alpha[][2] a)Alpha(uint8 x)Beta(Gamma g)Gamma(Zed[] z,bool y)"
        );
    }
}
