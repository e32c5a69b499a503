//! Offline profile signing (`keyward profile sign`): a key file as the exchange issued it and a
//! request object in, the profile's output object out — no home, no agent, the real clock.

use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::Ed25519KeyPair;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde_json::Value;
use zeroize::Zeroizing;

use super::{parse, ClientTime, Clock, HmacKeyEncoding, KeyInfo, Output, ProfileName};
use crate::backend::material::{self, SecretKeyMaterial, MAX_HMAC_SECRET};
use crate::backend::soft::MemoryKey;
use crate::error::{Error, Result};
use crate::model::KeyType;
use crate::secret::SecretBytes;

/// Largest key file read (an RSA-4096 PEM is ~3.3 KiB).
pub const MAX_KEY_FILE: usize = 64 * 1024;

/// Turns an HMAC secret string as `profile`'s exchange issues it into HMAC key bytes
/// (PROFILES.md §0): one trailing `\n` / `\r\n` stripped, then raw bytes, standard base64
/// (Kraken) or base64url with optional padding, either alphabet (Polymarket).
/// Errors never contain the secret.
pub fn decode_hmac_secret(profile: ProfileName, secret: SecretBytes) -> Result<SecretBytes> {
    let secret = secret.trim_one_newline();
    if secret.is_empty() {
        return Err(Error::BadRequest("the HMAC secret is empty".into()));
    }
    if secret.len() > MAX_HMAC_SECRET {
        return Err(Error::BadRequest(format!(
            "the HMAC secret is longer than {MAX_HMAC_SECRET} bytes"
        )));
    }
    let undecodable = |what: &str| {
        Error::BadRequest(format!(
            "the {profile} secret is not valid {what} (expected the string exactly as the exchange issued it)"
        ))
    };
    let decoded = match profile.hmac_key_encoding() {
        HmacKeyEncoding::Raw => return Ok(secret),
        HmacKeyEncoding::Base64 => STANDARD
            .decode(secret.expose())
            .map_err(|_| undecodable("base64"))?,
        HmacKeyEncoding::Base64Url => {
            let text = secret.expose();
            let end = text.iter().rposition(|&b| b != b'=').map_or(0, |i| i + 1);
            let unified: Zeroizing<Vec<u8>> = Zeroizing::new(
                text[..end]
                    .iter()
                    .map(|&b| match b {
                        b'+' => b'-',
                        b'/' => b'_',
                        other => other,
                    })
                    .collect(),
            );
            URL_SAFE_NO_PAD
                .decode(&unified[..])
                .map_err(|_| undecodable("base64url"))?
        }
    };
    if decoded.is_empty() {
        return Err(Error::BadRequest(
            "the HMAC secret decodes to no bytes".into(),
        ));
    }
    Ok(SecretBytes::new(decoded))
}

/// What a non-PEM key file holds for a profile (PROFILES.md §0 "Detection").
enum Plain {
    Hmac(KeyType),
    Secp256k1Hex,
    CdpEd25519,
}

fn plain_kind(profile: ProfileName, text: &[u8], request: &Value) -> Result<Plain> {
    let field = |name: &str| request.get(name).and_then(Value::as_str);
    Ok(match profile {
        ProfileName::Binance | ProfileName::Okx | ProfileName::Bybit => {
            Plain::Hmac(KeyType::HmacSha256)
        }
        ProfileName::Kraken => Plain::Hmac(KeyType::HmacSha512),
        // L1 signs with the wallet, L2 with the API secret: the request says which.
        ProfileName::Polymarket => match field("auth") {
            Some("l1") => Plain::Secp256k1Hex,
            _ => Plain::Hmac(KeyType::HmacSha256),
        },
        ProfileName::Hyperliquid | ProfileName::Eip191 | ProfileName::Eip712 => Plain::Secp256k1Hex,
        ProfileName::Coinbase => Plain::CdpEd25519,
        ProfileName::Kalshi => {
            return Err(Error::BadRequest(
                "profile kalshi needs an RSA private key in PEM (-----BEGIN … PRIVATE KEY-----)"
                    .into(),
            ))
        }
        // `raw` takes any key: its options name the family, else a 0x-hex key is a wallet.
        ProfileName::Raw => {
            if request.get("hash").is_some() || looks_like_0x_key(text) {
                Plain::Secp256k1Hex
            } else if field("hmac") == Some("sha512") {
                Plain::Hmac(KeyType::HmacSha512)
            } else {
                Plain::Hmac(KeyType::HmacSha256)
            }
        }
    })
}

fn looks_like_0x_key(text: &[u8]) -> bool {
    let t = text.trim_ascii();
    t.len() == 66 && t.starts_with(b"0x") && t[2..].iter().all(u8::is_ascii_hexdigit)
}

/// Key-file errors are bad input (`bad_request`); their messages never quote the file.
fn as_bad_request(e: Error) -> Error {
    match e {
        Error::InvalidKeyMaterial(m) | Error::Unsupported(m) => {
            Error::BadRequest(format!("key file: {m}"))
        }
        other => other,
    }
}

/// Reads key material from a key file's content for `profile` (the request disambiguates
/// profiles that accept two kinds of key, e.g. Polymarket L1 wallet vs L2 secret).
pub fn key_material(
    profile: ProfileName,
    file: SecretBytes,
    request: &Value,
) -> Result<SecretKeyMaterial> {
    let text = file.expose();
    let start = text
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(text.len());
    if text[start..].starts_with(b"-----BEGIN") {
        return material::parse(file, None).map_err(as_bad_request);
    }
    match plain_kind(profile, text, request)? {
        Plain::Hmac(t) => {
            let key = decode_hmac_secret(profile, file)?;
            Ok(SecretKeyMaterial::new(t, key))
        }
        Plain::Secp256k1Hex => {
            material::parse(file, Some(KeyType::Secp256k1)).map_err(as_bad_request)
        }
        Plain::CdpEd25519 => cdp_ed25519(file),
    }
}

/// A Coinbase CDP Ed25519 secret: base64 of seed(32) ‖ public key(32), the public half
/// checked against the seed.
fn cdp_ed25519(file: SecretBytes) -> Result<SecretKeyMaterial> {
    let file = file.trim_one_newline();
    let raw = Zeroizing::new(STANDARD.decode(file.expose()).map_err(|_| {
        Error::BadRequest(
            "the coinbase key file is neither PEM nor a CDP Ed25519 secret (base64)".into(),
        )
    })?);
    if raw.len() != 64 {
        return Err(Error::BadRequest(format!(
            "a CDP Ed25519 secret decodes to 64 bytes (seed ‖ public key), not {}",
            raw.len()
        )));
    }
    let pair = Ed25519KeyPair::from_seed_and_public_key(&raw[..32], &raw[32..]).map_err(|_| {
        Error::BadRequest("the CDP Ed25519 secret's public half does not match its seed".into())
    })?;
    let doc = pair
        .to_pkcs8v1()
        .map_err(|_| Error::Internal("Ed25519 key could not be re-encoded".into()))?;
    Ok(SecretKeyMaterial::new(
        KeyType::Ed25519,
        SecretBytes::from_slice(doc.as_ref()),
    ))
}

/// The public facts a profile may use: key type, and for secp256k1 the EIP-55 address.
fn key_info(m: &SecretKeyMaterial) -> Result<KeyInfo> {
    let address = if m.key_type() == KeyType::Secp256k1 {
        use k256::elliptic_curve::sec1::ToEncodedPoint;
        use k256::pkcs8::DecodePrivateKey;
        let sk = k256::SecretKey::from_pkcs8_der(m.expose())
            .map_err(|_| Error::Internal("secp256k1 key could not be read back".into()))?;
        let point = sk.public_key().to_encoded_point(false);
        Some(crate::pubkey::eth_address(point.as_bytes())?)
    } else {
        None
    };
    Ok(KeyInfo {
        key_type: Some(m.key_type()),
        api_key: None,
        passphrase: None,
        address,
    })
}

/// Signs `request` for `profile` with the key in `key_file` at time `now_ms` (client
/// `timestamp` / `nonce` values are used as given, for reproducible checks).
pub fn sign_at(
    profile: ProfileName,
    key_file: SecretBytes,
    request: &Value,
    now_ms: u64,
) -> Result<Output> {
    // Parse first: a malformed request is reported before the key is touched.
    let parsed = parse(profile, request)?;
    let m = key_material(profile, key_file, request)?;
    let info = key_info(&m)?;
    let key = MemoryKey::from_material(&m).map_err(as_bad_request)?;
    drop(m);
    let mut nonces = |now: u64| -> Result<u64> { Ok(now) };
    let mut clock = Clock {
        now_ms,
        client_time: ClientTime::Any,
        nonces: &mut nonces,
    };
    let plan = parsed.build(&info, &mut clock)?;
    let sig = key.sign(plan.alg, &plan.message)?;
    plan.finish(&sig)
}

/// [`sign_at`] with the system clock.
pub fn sign(profile: ProfileName, key_file: SecretBytes, request: &Value) -> Result<Output> {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| Error::Internal("the system clock is before 1970".into()))?
        .as_millis();
    let now_ms = u64::try_from(now_ms)
        .map_err(|_| Error::Internal("the system clock is out of range".into()))?;
    sign_at(profile, key_file, request, now_ms)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use aws_lc_rs::signature::KeyPair;

    use super::*;
    use crate::profile::util::test_keys::*;

    fn secret(s: &str) -> SecretBytes {
        SecretBytes::from_slice(s.as_bytes())
    }

    #[test]
    fn hmac_secrets_decode_per_profile() {
        let raw = decode_hmac_secret(ProfileName::Binance, secret("abc\r\n")).unwrap();
        assert_eq!(raw.expose(), b"abc");
        let raw = decode_hmac_secret(ProfileName::Okx, secret("abc\n\n")).unwrap();
        assert_eq!(raw.expose(), b"abc\n", "only one newline is stripped");
        let k = decode_hmac_secret(ProfileName::Kraken, secret("AAEC/w==\n")).unwrap();
        assert_eq!(k.expose(), [0, 1, 2, 255]);
        assert!(decode_hmac_secret(ProfileName::Kraken, secret("AAEC_w==")).is_err());
        assert!(decode_hmac_secret(ProfileName::Kraken, secret("AAEC/w")).is_err());
        for s in ["AAEC_w==", "AAEC_w", "AAEC/w==", "AAEC/w"] {
            let k = decode_hmac_secret(ProfileName::Polymarket, secret(s)).unwrap();
            assert_eq!(k.expose(), [0, 1, 2, 255], "{s}");
        }
        let e = decode_hmac_secret(ProfileName::Kraken, secret("sekrit!value"))
            .err()
            .unwrap();
        assert_eq!(e.code(), "bad_request");
        assert!(!e.to_string().contains("sekrit"));
        assert!(decode_hmac_secret(ProfileName::Binance, secret("\n")).is_err());
    }

    #[test]
    fn kraken_published_example_offline() {
        let key = "kQH5HW/8p1uGOVjbgWA7FunAmGO8lsSUXNsu3eow76sz84Q18fWxnyRzBHCd3pd5nE9qa99HAZtuZuj6F1huXg==\n";
        let out = sign_at(
            ProfileName::Kraken,
            secret(key),
            &json!({"path": "/0/private/AddOrder", "api_key": "k", "nonce": 1616492376594u64,
                    "body": "ordertype=limit&pair=XBTUSD&price=37500&type=buy&volume=1.25"}),
            1,
        )
        .unwrap();
        assert_eq!(
            out.0["signature"],
            "4/dpxb3iT4tp/ZCVEwSnEsLxx0bqyhLpdfOpc6fn7OR8+UClSV5n9E6aSS8MPtnRfp32bAb0nmbRn6H8ndwLUQ=="
        );
    }

    #[test]
    fn pem_keys_and_clock() {
        let out = sign_at(
            ProfileName::Binance,
            secret(ED25519_PKCS8),
            &json!({"method": "GET", "path": "/api/v3/account"}),
            1234,
        )
        .unwrap();
        assert_eq!(out.0["payload"], "timestamp=1234");
        let now = sign(
            ProfileName::Binance,
            secret("s"),
            &json!({"method": "GET", "path": "/api/v3/account"}),
        )
        .unwrap();
        assert!(now.0["timestamp"].as_u64().unwrap() > 1_700_000_000_000);
    }

    #[test]
    fn key_type_errors_are_bad_requests() {
        let req = json!({"method": "GET", "path": "/p", "api_key": "k"});
        // An HMAC secret for Kalshi, an Ed25519 PEM for Kraken.
        let e = sign_at(ProfileName::Kalshi, secret("abc"), &req, 1).unwrap_err();
        assert_eq!(e.code(), "bad_request");
        let e = sign_at(
            ProfileName::Kraken,
            secret(ED25519_PKCS8),
            &json!({"path": "/0/private/Balance", "api_key": "k"}),
            1,
        )
        .unwrap_err();
        assert_eq!(e.code(), "bad_request");
        assert!(e.to_string().contains("kraken") && e.to_string().contains("ed25519"));
        let enc =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let e = sign_at(ProfileName::Kalshi, secret(enc), &req, 1).unwrap_err();
        assert_eq!(e.code(), "bad_request");
        assert!(e.to_string().contains("decrypt"));
        let e = sign_at(ProfileName::Kalshi, secret("-----BEGIN garbage"), &req, 1).unwrap_err();
        assert_eq!(e.code(), "bad_request");
        // The request is checked before the key.
        let e = sign_at(ProfileName::Kalshi, secret("x"), &json!({"bogus": 1}), 1).unwrap_err();
        assert!(e.to_string().contains("bogus"));
    }

    #[test]
    fn secp256k1_hex_and_address() {
        let m = key_material(
            ProfileName::Eip191,
            secret("0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318\n"),
            &json!({}),
        )
        .unwrap();
        assert_eq!(m.key_type(), KeyType::Secp256k1);
        // web3.js docs: this key's account is 0x2c7536E3605D9C16a7a3D7b1898e529396a65c23.
        assert_eq!(
            key_info(&m).unwrap().address.as_deref(),
            Some("0x2c7536E3605D9C16a7a3D7b1898e529396a65c23")
        );
        let bare = key_material(
            ProfileName::Hyperliquid,
            secret("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"),
            &json!({}),
        )
        .unwrap();
        assert_eq!(bare.key_type(), KeyType::Secp256k1);
        assert!(key_material(ProfileName::Eip712, secret("0x12"), &json!({})).is_err());
        // Polymarket: the request's `auth` picks wallet or API secret.
        let l1 = key_material(
            ProfileName::Polymarket,
            secret("0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"),
            &json!({"auth": "l1"}),
        )
        .unwrap();
        assert_eq!(l1.key_type(), KeyType::Secp256k1);
        let l2 = key_material(
            ProfileName::Polymarket,
            secret("AAEC_w"),
            &json!({"auth": "l2"}),
        )
        .unwrap();
        assert_eq!(l2.key_type(), KeyType::HmacSha256);
        assert_eq!(l2.expose(), [0, 1, 2, 255]);
        // raw: a 0x key is a wallet, anything else an HMAC secret.
        let r = key_material(
            ProfileName::Raw,
            secret("0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"),
            &json!({"data": ""}),
        )
        .unwrap();
        assert_eq!(r.key_type(), KeyType::Secp256k1);
        let r = key_material(ProfileName::Raw, secret("Jefe"), &json!({"hmac": "sha512"})).unwrap();
        assert_eq!(r.key_type(), KeyType::HmacSha512);
    }

    #[test]
    fn coinbase_cdp_ed25519_secret() {
        // RFC 8032 TEST 1 key pair as a CDP secret (seed ‖ public key).
        let seed = hex::decode(RFC8032_TEST1_SEED).unwrap();
        let public =
            hex::decode("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
                .unwrap();
        let good = STANDARD.encode([seed.clone(), public.clone()].concat());
        let m = key_material(
            ProfileName::Coinbase,
            secret(&format!("{good}\n")),
            &json!({}),
        )
        .unwrap();
        assert_eq!(m.key_type(), KeyType::Ed25519);
        let pair = Ed25519KeyPair::from_pkcs8(m.expose()).unwrap();
        assert_eq!(pair.public_key().as_ref(), &public[..]);
        let mut wrong = public.clone();
        wrong[0] ^= 1;
        let bad_pub = STANDARD.encode([seed.clone(), wrong].concat());
        let e = key_material(ProfileName::Coinbase, secret(&bad_pub), &json!({}))
            .err()
            .unwrap();
        assert_eq!(e.code(), "bad_request");
        let short = STANDARD.encode(&seed);
        assert!(key_material(ProfileName::Coinbase, secret(&short), &json!({})).is_err());
        assert!(key_material(ProfileName::Coinbase, secret("%%%"), &json!({})).is_err());
    }
}
