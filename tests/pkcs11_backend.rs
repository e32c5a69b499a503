//! The PKCS#11 backend as a library (`keyward::backend::pkcs11`) against a REAL SoftHSM 2
//! token: every key type generates on the token, signs and verifies with independent verifiers
//! (RustCrypto, openssl-made keys, pkcs11-tool); imports match the original keys; keys are not
//! extractable; keys made by pkcs11-tool are adopted; failures are fast and coded; a token that
//! disappears and comes back is served again by the same backend object; 8 threads share it.
//!
//! All tests of this binary share one SoftHSM configuration (SOFTHSM2_CONF is read once per
//! process, see tests/common/softhsm.rs) and each uses its own token (label = test). The
//! device-loss test needs the module to itself and runs in a child process.

mod common;

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use hmac::Mac;

use common::softhsm::{run_in_child, SoftHsm, Token};
use common::verify::{self, Verifier};
use common::{key_name, random_bytes, run_command};
use keyward::backend::pkcs11::{list_tokens, Pkcs11Backend};
use keyward::backend::{material, Backend, Health, KeySpec, NewKey, Signature};
use keyward::config::TokenConfig;
use keyward::model::{BackendKind, KeyRef};
use keyward::secret::SecretBytes;
use keyward::{Algorithm, Error, KeyType};

/// Every failure must be answered within the device timeout (2 s default); most take µs.
const ANSWER_LIMIT: Duration = Duration::from_secs(2);

fn hsm() -> &'static SoftHsm {
    SoftHsm::shared()
}

fn connect(tok: &Token) -> Pkcs11Backend {
    Pkcs11Backend::connect(tok.label(), tok.token_config(), tok.pin())
        .unwrap_or_else(|e| panic!("connecting to token {}: {e}", tok.label()))
}

fn spec(name: &str, key_type: KeyType) -> KeySpec {
    KeySpec {
        name: key_name(name),
        version: 1,
        key_type,
    }
}

/// The schemes keyward allows for a key type (and the test helper agrees).
fn schemes(t: KeyType) -> Vec<Algorithm> {
    let algs: Vec<Algorithm> = Algorithm::ALL
        .into_iter()
        .filter(|a| t.supports(*a))
        .collect();
    let names: Vec<&str> = algs.iter().map(|a| a.as_str()).collect();
    assert_eq!(names, verify::schemes(t.as_str()), "schemes of {t}");
    algs
}

/// Messages to sign: empty, short, long; a 32-byte digest for the prehashed scheme.
fn messages(alg: Algorithm) -> Vec<Vec<u8>> {
    if alg == Algorithm::EcdsaSecp256k1Prehashed {
        return vec![random_bytes(32), verify::keccak256(b"order 42").to_vec()];
    }
    vec![
        Vec::new(),
        b"GET /trade-api/v2/portfolio/balance".to_vec(),
        random_bytes(1000),
    ]
}

/// A signature as a verifier takes it: secp256k1 gets v = 27 + recovery id appended.
fn wire(t: KeyType, sig: &Signature) -> Vec<u8> {
    let mut out = sig.bytes.clone();
    if t == KeyType::Secp256k1 {
        let rid = sig
            .recovery_id
            .expect("secp256k1 signatures carry a recovery id");
        assert!(rid <= 1, "recovery id {rid}");
        out.push(27 + rid);
    } else {
        assert_eq!(sig.recovery_id, None, "only secp256k1 has a recovery id");
    }
    out
}

/// Sign every message with every scheme of the key on the token and verify each signature,
/// and that a different message does not verify (the verifier is not vacuous).
fn sign_and_verify_all(b: &Pkcs11Backend, key: &KeyRef, t: KeyType, v: &Verifier) {
    for alg in schemes(t) {
        for msg in messages(alg) {
            let sig = b
                .sign(key, alg, &msg)
                .unwrap_or_else(|e| panic!("{t} {alg} on the token: {e}"));
            let w = wire(t, &sig);
            v.verify_strict(alg.as_str(), &msg, &w, &format!("{t} {alg} on the token"));
        }
    }
}

fn soft_hmac(alg: Algorithm, key: &[u8], msg: &[u8]) -> Vec<u8> {
    match alg {
        Algorithm::HmacSha256 => {
            let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("hmac key");
            m.update(msg);
            m.finalize().into_bytes().to_vec()
        }
        Algorithm::HmacSha512 => {
            let mut m = hmac::Hmac::<sha2::Sha512>::new_from_slice(key).expect("hmac key");
            m.update(msg);
            m.finalize().into_bytes().to_vec()
        }
        other => panic!("{other} is not HMAC"),
    }
}

/// The CKA_ID in a locator `alias:hex`.
fn locator_id(key: &KeyRef, alias: &str) -> Vec<u8> {
    assert_eq!(key.backend, BackendKind::Pkcs11);
    let (a, id) = key
        .locator
        .split_once(':')
        .unwrap_or_else(|| panic!("locator {:?} is not alias:id", key.locator));
    assert_eq!(a, alias, "locator alias");
    hex::decode(id).unwrap_or_else(|_| panic!("locator id {id:?} is not hex"))
}

fn assert_code<T>(r: keyward::Result<T>, code: &str, what: &str) -> Error {
    match r {
        Ok(_) => panic!("{what}: expected {code}, got success"),
        Err(e) => {
            assert_eq!(e.code(), code, "{what}: {e}");
            e
        }
    }
}

/// A cryptoki session of our own on `tok` (the same process module keyward uses), logged in as
/// the user. Never logs out: PKCS#11 login state is per process and token, so logging out
/// would log keyward's sessions out too. Call it only while a backend on the token is alive
/// (keyward then owns the module's initialisation; this context never finalises it).
struct RawToken {
    _ctx: Pkcs11,
    session: Session,
}

fn raw_session(tok: &Token) -> RawToken {
    let ctx = Pkcs11::new(tok.module()).expect("loading the SoftHSM module");
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("C_Initialize: {e}"),
    }
    let slot = ctx
        .get_slots_with_token()
        .expect("slots")
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .is_ok_and(|i| i.label().trim_end() == tok.label())
        })
        .unwrap_or_else(|| panic!("no slot with token {}", tok.label()));
    let session = ctx.open_rw_session(slot).expect("C_OpenSession");
    let pin = AuthPin::from(tok.hsm().pin_string());
    match session.login(UserType::User, Some(&pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("C_Login: {e}"),
    }
    RawToken { _ctx: ctx, session }
}

impl RawToken {
    /// The private or secret key object with CKA_ID `id`.
    fn key(&self, id: &[u8]) -> Option<ObjectHandle> {
        [ObjectClass::PRIVATE_KEY, ObjectClass::SECRET_KEY]
            .into_iter()
            .find_map(|class| {
                self.session
                    .find_objects(&[Attribute::Class(class), Attribute::Id(id.to_vec())])
                    .expect("C_FindObjects")
                    .into_iter()
                    .next()
            })
    }

    fn objects_with_id(&self, id: &[u8]) -> usize {
        self.session
            .find_objects(&[Attribute::Id(id.to_vec())])
            .expect("C_FindObjects")
            .len()
    }

    fn bool_attr(&self, h: ObjectHandle, t: AttributeType) -> bool {
        let attrs = self
            .session
            .get_attributes(h, &[t])
            .expect("C_GetAttributeValue");
        match attrs.as_slice() {
            [Attribute::Sensitive(v)]
            | [Attribute::Extractable(v)]
            | [Attribute::Token(v)]
            | [Attribute::Private(v)]
            | [Attribute::AlwaysSensitive(v)]
            | [Attribute::NeverExtractable(v)]
            | [Attribute::Sign(v)] => *v,
            other => panic!("{t:?}: unexpected {other:?}"),
        }
    }

    /// The key's secret parts cannot be read, and its attributes say so and stay so.
    fn assert_not_extractable(&self, id: &[u8], t: KeyType, generated: bool) {
        let h = self
            .key(id)
            .unwrap_or_else(|| panic!("{t}: no key object with id {}", hex::encode(id)));
        let secret_parts: &[AttributeType] = if t.is_rsa() {
            &[
                AttributeType::PrivateExponent,
                AttributeType::Prime1,
                AttributeType::Prime2,
                AttributeType::Exponent1,
                AttributeType::Exponent2,
                AttributeType::Coefficient,
            ]
        } else {
            &[AttributeType::Value]
        };
        for part in secret_parts {
            // C_GetAttributeValue answers CKR_ATTRIBUTE_SENSITIVE ...
            let info = self
                .session
                .get_attribute_info(h, &[*part])
                .expect("C_GetAttributeValue");
            assert!(
                matches!(info.as_slice(), [AttributeInfo::Sensitive]),
                "{t}: {part:?} must be CKR_ATTRIBUTE_SENSITIVE, got {info:?}"
            );
            // ... and a read returns no value.
            let got = self.session.get_attributes(h, &[*part]).expect("read");
            assert!(
                got.is_empty(),
                "{t}: {part:?} was returned: {} attrs",
                got.len()
            );
        }
        assert!(
            self.bool_attr(h, AttributeType::Sensitive),
            "{t}: CKA_SENSITIVE"
        );
        assert!(
            !self.bool_attr(h, AttributeType::Extractable),
            "{t}: CKA_EXTRACTABLE"
        );
        assert!(self.bool_attr(h, AttributeType::Token), "{t}: CKA_TOKEN");
        assert!(
            self.bool_attr(h, AttributeType::Private),
            "{t}: CKA_PRIVATE"
        );
        assert!(self.bool_attr(h, AttributeType::Sign), "{t}: CKA_SIGN");
        // Generated keys were never anything else; imported ones were once known outside
        // (C_CreateObject: CKA_ALWAYS_SENSITIVE and CKA_NEVER_EXTRACTABLE are false).
        assert_eq!(
            self.bool_attr(h, AttributeType::NeverExtractable),
            generated,
            "{t}: CKA_NEVER_EXTRACTABLE"
        );
        assert_eq!(
            self.bool_attr(h, AttributeType::AlwaysSensitive),
            generated,
            "{t}: CKA_ALWAYS_SENSITIVE"
        );
        // The flags cannot be turned back: SoftHSM refuses (CKR_ATTRIBUTE_READ_ONLY).
        for attr in [Attribute::Extractable(true), Attribute::Sensitive(false)] {
            let r = self
                .session
                .update_attributes(h, std::slice::from_ref(&attr));
            assert!(r.is_err(), "{t}: setting {attr:?} was accepted");
        }
        assert!(
            self.bool_attr(h, AttributeType::Sensitive),
            "{t}: still sensitive"
        );
        assert!(
            !self.bool_attr(h, AttributeType::Extractable),
            "{t}: still not extractable"
        );
    }
}

fn check_generated(label: &str, t: KeyType) {
    let tok = hsm().token(label);
    let b = connect(&tok);
    let started = Instant::now();
    let new = b
        .generate(&spec(&format!("gen-{label}"), t))
        .unwrap_or_else(|e| panic!("generating {t} on the token: {e}"));
    eprintln!("{t}: generated on SoftHSM in {:?}", started.elapsed());
    let id = locator_id(&new.key_ref, label);
    assert_eq!(id.len(), 16, "a random 16-byte CKA_ID");
    if t.is_hmac() {
        assert!(
            new.public.spki_der.is_none(),
            "HMAC keys have no public key"
        );
        // The secret never leaves the token, so no software HMAC can check these tags (the
        // import test does that); check length, determinism and key dependence.
        // Generated secrets are 64 bytes for both HMAC types: at least either digest's length
        // (SoftHSM refuses shorter HMAC-SHA512 keys), so one key serves both schemes.
        let len = 64u64;
        let msg = b"POST /api/v3/order";
        let (a256, a512) = (Algorithm::HmacSha256, Algorithm::HmacSha512);
        let t256 = b.sign(&new.key_ref, a256, msg).expect("hmac-sha256").bytes;
        let t512 = b.sign(&new.key_ref, a512, msg).expect("hmac-sha512").bytes;
        assert_eq!((t256.len(), t512.len()), (32, 64));
        assert_eq!(t256, b.sign(&new.key_ref, a256, msg).expect("again").bytes);
        assert_ne!(
            t256,
            b.sign(&new.key_ref, a256, b"other").expect("other").bytes
        );
        let second = b
            .generate(&spec(&format!("gen2-{label}"), t))
            .expect("second");
        assert_ne!(t256, b.sign(&second.key_ref, a256, msg).expect("k2").bytes);
        // The generated secret's length.
        let raw = raw_session(&tok);
        let h = raw.key(&id).expect("secret key object");
        let info = raw
            .session
            .get_attribute_info(h, &[AttributeType::ValueLen])
            .expect("CKA_VALUE_LEN");
        assert!(
            matches!(info.as_slice(), [AttributeInfo::Available(_)]),
            "{info:?}"
        );
        let got = raw
            .session
            .get_attributes(h, &[AttributeType::ValueLen])
            .expect("len");
        assert!(
            matches!(got.as_slice(), [Attribute::ValueLen(l)] if u64::from(*l) == len),
            "{t}: CKA_VALUE_LEN {got:?}"
        );
        return;
    }
    let spki = new
        .public
        .spki_der
        .as_deref()
        .expect("an asymmetric key has an SPKI");
    let v = Verifier::from_spki_der(t.as_str(), spki);
    assert_eq!(new.public.fingerprint, keyward::pubkey::fingerprint(spki));
    sign_and_verify_all(&b, &new.key_ref, t, &v);
    // A scheme of another key family is refused, not attempted.
    let foreign = Algorithm::ALL
        .into_iter()
        .find(|a| !t.supports(*a))
        .expect("some scheme does not fit");
    assert_code(
        b.sign(&new.key_ref, foreign, b"x"),
        "bad_request",
        "foreign scheme",
    );
}

#[test]
fn generate_ed25519() {
    check_generated("gen-ed25519", KeyType::Ed25519);
}

#[test]
fn generate_p256() {
    check_generated("gen-p256", KeyType::P256);
}

#[test]
fn generate_p384() {
    check_generated("gen-p384", KeyType::P384);
}

#[test]
fn generate_secp256k1_recoverable_low_s() {
    check_generated("gen-secp256k1", KeyType::Secp256k1);
}

#[test]
fn generate_rsa_2048() {
    check_generated("gen-rsa2048", KeyType::Rsa2048);
}

#[test]
fn generate_rsa_3072() {
    check_generated("gen-rsa3072", KeyType::Rsa3072);
}

/// RSA-4096 generation on SoftHSM takes about 2 s (it runs beside the 10 s concurrency test).
#[test]
fn generate_rsa_4096() {
    check_generated("gen-rsa4096", KeyType::Rsa4096);
}

#[test]
fn generate_hmac_sha256() {
    check_generated("gen-hmac256", KeyType::HmacSha256);
}

#[test]
fn generate_hmac_sha512() {
    check_generated("gen-hmac512", KeyType::HmacSha512);
}

/// An exchange-style ASCII secret of `len` bytes (never ending in a newline, which parsing
/// would trim).
fn ascii_secret(len: usize) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    random_bytes(len)
        .into_iter()
        .map(|b| ALPHABET[usize::from(b) % ALPHABET.len()])
        .collect()
}

/// Imported HMAC secrets of any length give the tags a software HMAC of the ORIGINAL secret
/// gives, for both digests — although SoftHSM only accepts keys at least as long as the digest
/// and keyward stores short secrets zero-padded to 64 bytes (docs/pkcs11.md).
#[test]
fn hmac_import_matches_software_hmac() {
    let tok = hsm().token("hmac-import");
    let b = connect(&tok);
    let mut trailing_zeros = ascii_secret(12);
    trailing_zeros.extend([0, 0, 0, 0]);
    let secrets: Vec<(String, Vec<u8>)> = vec![
        ("16-byte".into(), ascii_secret(16)),
        ("32-byte".into(), ascii_secret(32)),
        ("64-byte".into(), ascii_secret(64)),
        ("100-byte".into(), ascii_secret(100)),
        ("1-byte".into(), ascii_secret(1)),
        ("63-byte".into(), ascii_secret(63)),
        ("128-byte (SHA-512 block)".into(), ascii_secret(128)),
        (
            "129-byte (hashed for SHA-512 too)".into(),
            ascii_secret(129),
        ),
        ("16-byte ending in zero bytes".into(), trailing_zeros),
        ("48 binary bytes".into(), {
            let mut s = random_bytes(48);
            s[47] = 0x01; // not a newline
            s
        }),
    ];
    let msgs: [&[u8]; 3] = [b"", b"1700000000000GET/api/v3/account", &[0x5a; 300]];
    let raw = raw_session(&tok);
    for (i, (what, secret)) in secrets.iter().enumerate() {
        for t in [KeyType::HmacSha256, KeyType::HmacSha512] {
            let m = material::parse(SecretBytes::from_slice(secret), Some(t))
                .unwrap_or_else(|e| panic!("parsing the {what} secret: {e}"));
            let new = b
                .import(&spec(&format!("hmac-{i}-{t}"), t), m)
                .unwrap_or_else(|e| panic!("importing the {what} secret as {t}: {e}"));
            assert!(new.public.spki_der.is_none());
            for alg in [Algorithm::HmacSha256, Algorithm::HmacSha512] {
                for msg in msgs {
                    let tag = b.sign(&new.key_ref, alg, msg).expect("hmac on the token");
                    assert_eq!(
                        hex::encode(&tag.bytes),
                        hex::encode(soft_hmac(alg, secret, msg)),
                        "{what} secret imported as {t}, {alg}, {}-byte message",
                        msg.len()
                    );
                }
            }
            // What is stored: short secrets zero-padded to 64 bytes, others as they are.
            let h = raw
                .key(&locator_id(&new.key_ref, "hmac-import"))
                .expect("object");
            let got = raw
                .session
                .get_attributes(h, &[AttributeType::ValueLen])
                .expect("len");
            let want = secret.len().max(64) as u64;
            assert!(
                matches!(got.as_slice(), [Attribute::ValueLen(l)] if u64::from(*l) == want),
                "{what}: stored CKA_VALUE_LEN {got:?}, expected {want}"
            );
        }
    }
}

/// openssl makes a private key PEM (`args` for `openssl`, writing to -out FILE); returns the
/// PEM and the SPKI DER of its public key as openssl computes it.
fn openssl_key(dir: &Path, name: &str, args: &[&str]) -> (Vec<u8>, Vec<u8>) {
    let pem = dir.join(format!("{name}.pem"));
    let pem_s = pem.to_str().expect("utf-8 path");
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["-out", pem_s]);
    common::tool("openssl", &all);
    let der = dir.join(format!("{name}.spki.der"));
    common::tool(
        "openssl",
        &[
            "pkey",
            "-in",
            pem_s,
            "-pubout",
            "-outform",
            "DER",
            "-out",
            der.to_str().expect("path"),
        ],
    );
    (fs::read(&pem).expect("pem"), fs::read(&der).expect("spki"))
}

/// RSA (PKCS#8 and PKCS#1 PEM), P-256 (SEC1 and PKCS#8), P-384, secp256k1 and Ed25519 keys made
/// by openssl import onto the token and sign there; the signatures verify under the public key
/// openssl derives from the original file.
#[test]
fn pem_import_signs_for_the_original_key() {
    let tok = hsm().token("pem-import");
    let b = connect(&tok);
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let cases: Vec<(&str, KeyType, Vec<&str>, &str)> = vec![
        (
            "rsa-pkcs8",
            KeyType::Rsa2048,
            vec![
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ],
            "BEGIN PRIVATE KEY",
        ),
        (
            "rsa-pkcs1",
            KeyType::Rsa2048,
            vec!["genrsa", "-traditional"],
            "BEGIN RSA PRIVATE KEY",
        ),
        (
            "p256-sec1",
            KeyType::P256,
            vec!["ecparam", "-name", "prime256v1", "-genkey", "-noout"],
            "BEGIN EC PRIVATE KEY",
        ),
        (
            "p256-pkcs8",
            KeyType::P256,
            vec![
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ],
            "BEGIN PRIVATE KEY",
        ),
        (
            "p384-pkcs8",
            KeyType::P384,
            vec![
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-384",
            ],
            "BEGIN PRIVATE KEY",
        ),
        (
            "k1-sec1",
            KeyType::Secp256k1,
            vec!["ecparam", "-name", "secp256k1", "-genkey", "-noout"],
            "BEGIN EC PRIVATE KEY",
        ),
        (
            "ed25519",
            KeyType::Ed25519,
            vec!["genpkey", "-algorithm", "ed25519"],
            "BEGIN PRIVATE KEY",
        ),
    ];
    let raw = raw_session(&tok);
    for (name, t, args, header) in cases {
        let (pem, spki) = openssl_key(d, name, &args);
        assert!(
            String::from_utf8_lossy(&pem).contains(header),
            "{name}: openssl did not write {header}"
        );
        let original = Verifier::from_spki_der(t.as_str(), &spki);
        // Parsed without a declared type: the PEM says what it is.
        let m = material::parse(SecretBytes::new(pem), None)
            .unwrap_or_else(|e| panic!("{name}: parsing the PEM: {e}"));
        assert_eq!(m.key_type(), t, "{name}: detected type");
        let new = b
            .import(&spec(&format!("imp-{name}"), t), m)
            .unwrap_or_else(|e| panic!("{name}: importing onto the token: {e}"));
        let reported = Verifier::from_spki_der(
            t.as_str(),
            new.public
                .spki_der
                .as_deref()
                .expect("public key of an imported key"),
        );
        assert_eq!(
            reported.raw(),
            original.raw(),
            "{name}: reported public key"
        );
        sign_and_verify_all(&b, &new.key_ref, t, &original);
        // Imported objects are as locked down as generated ones.
        raw.assert_not_extractable(&locator_id(&new.key_ref, "pem-import"), t, false);
    }
}

/// Generated and imported keys cannot be read off the token: C_GetAttributeValue on the
/// secret parts answers CKR_ATTRIBUTE_SENSITIVE, CKA_SENSITIVE=true, CKA_EXTRACTABLE=false,
/// and neither flag can be changed back.
#[test]
fn keys_are_not_extractable() {
    let tok = hsm().token("non-extractable");
    let b = connect(&tok);
    let raw = raw_session(&tok);
    for t in [
        KeyType::Ed25519,
        KeyType::P256,
        KeyType::P384,
        KeyType::Secp256k1,
        KeyType::Rsa2048,
        KeyType::HmacSha256,
        KeyType::HmacSha512,
    ] {
        let new = b.generate(&spec(&format!("ne-{t}"), t)).expect("generate");
        raw.assert_not_extractable(&locator_id(&new.key_ref, "non-extractable"), t, true);
    }
    // Imported: a short HMAC secret (stored padded) and a full-length one.
    for (i, len) in [16usize, 64].into_iter().enumerate() {
        let m = material::parse(
            SecretBytes::new(ascii_secret(len)),
            Some(KeyType::HmacSha256),
        )
        .expect("secret");
        let new = b
            .import(&spec(&format!("ne-imp-{i}"), KeyType::HmacSha256), m)
            .expect("import");
        raw.assert_not_extractable(
            &locator_id(&new.key_ref, "non-extractable"),
            KeyType::HmacSha256,
            false,
        );
    }
}

/// Parse `pkcs11-tool --list-objects` output into (kind line, label, id, access) per object.
fn listed_objects(out: &str) -> Vec<(String, String, String, String)> {
    let mut v: Vec<(String, String, String, String)> = Vec::new();
    for line in out.lines() {
        if !line.starts_with(' ') && line.contains("Object") {
            v.push((
                line.to_string(),
                String::new(),
                String::new(),
                String::new(),
            ));
            continue;
        }
        let Some(cur) = v.last_mut() else { continue };
        let l = line.trim();
        if let Some(x) = l.strip_prefix("label:") {
            cur.1 = x.trim().to_string();
        } else if let Some(x) = l.strip_prefix("ID:") {
            cur.2 = x.trim().to_string();
        } else if let Some(x) = l.strip_prefix("Access:") {
            cur.3 = x.trim().to_string();
        }
    }
    v
}

/// A key pkcs11-tool generated (while keyward is connected) is adopted by label and by id,
/// signs, and verifies under the public key pkcs11-tool reads; a key keyward generated is
/// listed by pkcs11-tool under its name, non-extractable, and pkcs11-tool can sign with it.
#[test]
fn pkcs11_tool_interop_and_adopt() {
    let tok = hsm().token("interop");
    let b = connect(&tok);

    // Made by another tool, in another process, while keyward holds the token open.
    let out = tok.pkcs11_tool(
        true,
        &[
            "--keypairgen",
            "--key-type",
            "EC:prime256v1",
            "--label",
            "adopted",
            "--id",
            "0a0b",
        ],
    );
    assert!(out.success(), "pkcs11-tool --keypairgen:\n{out}");
    let dir = tempfile::tempdir().expect("tmp");
    let pub_der = dir.path().join("pub.der");
    let out = tok.pkcs11_tool(
        true,
        &[
            "--read-object",
            "--type",
            "pubkey",
            "--id",
            "0a0b",
            "-o",
            pub_der.to_str().expect("path"),
        ],
    );
    assert!(out.success(), "pkcs11-tool --read-object:\n{out}");
    let tool_key = Verifier::from_spki_der("p256", &fs::read(&pub_der).expect("pubkey"));

    let (by_label, t, public) = b.adopt(Some("adopted"), None).expect("adopt by label");
    assert_eq!(t, KeyType::P256);
    assert_eq!(by_label.locator, "interop:0a0b");
    let adopted_key = Verifier::from_spki_der("p256", public.spki_der.as_deref().expect("spki"));
    assert_eq!(
        adopted_key.raw(),
        tool_key.raw(),
        "adopt reports pkcs11-tool's public key"
    );
    let (by_id, t2, public2) = b.adopt(None, Some(&[0x0a, 0x0b])).expect("adopt by id");
    assert_eq!((by_id.clone(), t2), (by_label.clone(), KeyType::P256));
    assert_eq!(public2, public);
    let (both, _, _) = b
        .adopt(Some("adopted"), Some(&[0x0a, 0x0b]))
        .expect("label+id");
    assert_eq!(both, by_label);
    sign_and_verify_all(&b, &by_id, KeyType::P256, &tool_key);
    assert_code(
        b.adopt(Some("no-such-object"), None),
        "unknown_key",
        "adopt unknown label",
    );
    assert_code(
        b.adopt(None, Some(&[0xde, 0xad])),
        "unknown_key",
        "adopt unknown id",
    );
    assert_code(
        b.adopt(Some("adopted"), Some(&[0xde, 0xad])),
        "unknown_key",
        "adopt label with another id",
    );

    // keyward's key, seen by pkcs11-tool.
    let mine = b
        .generate(&spec("kw-listed", KeyType::P256))
        .expect("generate");
    let id_hex = hex::encode(locator_id(&mine.key_ref, "interop"));
    let out = tok.pkcs11_tool(true, &["--list-objects"]);
    assert!(out.success(), "pkcs11-tool --list-objects:\n{out}");
    let objects = listed_objects(&out.stdout);
    let private = objects
        .iter()
        .find(|o| o.0.starts_with("Private Key Object") && o.1 == "kw-listed")
        .unwrap_or_else(|| panic!("keyward's key is not listed:\n{out}"));
    assert_eq!(private.2, id_hex, "CKA_ID as pkcs11-tool sees it");
    for flag in ["sensitive", "always sensitive", "never extractable"] {
        assert!(
            private.3.contains(flag),
            "pkcs11-tool access {:?} lacks {flag}",
            private.3
        );
    }
    assert!(
        objects
            .iter()
            .any(|o| o.0.starts_with("Public Key Object") && o.1 == "kw-listed" && o.2 == id_hex),
        "keyward's public key object is not listed:\n{out}"
    );
    // pkcs11-tool signs with keyward's key (hash on the host, CKM_ECDSA, raw r||s).
    let msg = b"signed by pkcs11-tool with a keyward key";
    let hash = dir.path().join("hash.bin");
    fs::write(&hash, <sha2::Sha256 as sha2::Digest>::digest(msg)).expect("hash");
    let sig = dir.path().join("sig.bin");
    let out = tok.pkcs11_tool(
        true,
        &[
            "--sign",
            "--id",
            &id_hex,
            "-m",
            "ECDSA",
            "-i",
            hash.to_str().expect("path"),
            "-o",
            sig.to_str().expect("path"),
        ],
    );
    assert!(out.success(), "pkcs11-tool --sign:\n{out}");
    let mine_v = Verifier::from_spki_der("p256", mine.public.spki_der.as_deref().expect("spki"));
    mine_v
        .verify("ecdsa-p256-sha256", msg, &fs::read(&sig).expect("sig"))
        .expect("pkcs11-tool's signature with keyward's key verifies");
}

/// `delete` removes the private and the public object from the token.
#[test]
fn delete_removes_the_objects() {
    let tok = hsm().token("delete");
    let b = connect(&tok);
    let raw = raw_session(&tok);
    for t in [KeyType::P256, KeyType::Rsa2048, KeyType::HmacSha256] {
        let new = b.generate(&spec(&format!("del-{t}"), t)).expect("generate");
        let id = locator_id(&new.key_ref, "delete");
        let expected = if t.is_hmac() { 1 } else { 2 };
        assert_eq!(
            raw.objects_with_id(&id),
            expected,
            "{t}: objects before delete"
        );
        b.sign(&new.key_ref, t.default_algorithm(), b"m")
            .expect("sign before delete");
        b.delete(&new.key_ref).expect("delete");
        assert_eq!(raw.objects_with_id(&id), 0, "{t}: objects after delete");
        let e = b
            .sign(&new.key_ref, t.default_algorithm(), b"m")
            .expect_err("signing with a deleted key");
        eprintln!("{t}: sign after delete -> {}: {e}", e.code());
        let listed = tok.pkcs11_tool(true, &["--list-objects"]);
        assert!(
            !listed.stdout.contains(&hex::encode(&id)),
            "{t} still listed"
        );
    }
}

/// `list_tokens` shows the token (label, serial, initialised, signing mechanisms); the token
/// can be selected by serial as well as by label; `init_token` (used by the fixture) made it.
#[test]
fn list_tokens_and_select_by_serial() {
    let tok = hsm().token("listed");
    let all = list_tokens(tok.module()).expect("list_tokens");
    let me = all
        .iter()
        .find(|s| s.label == "listed")
        .unwrap_or_else(|| panic!("token not listed: {all:?}"));
    assert!(me.initialized);
    assert!(!me.serial.is_empty());
    let has = |m: &str| {
        me.mechanisms
            .iter()
            .any(|x| x.starts_with(m) && x.contains("sign"))
    };
    for m in [
        "CKM_ECDSA",
        "CKM_EDDSA",
        "CKM_SHA256_RSA_PKCS_PSS",
        "CKM_SHA256_HMAC",
    ] {
        assert!(has(m), "{m} with the sign flag not in {:?}", me.mechanisms);
    }
    // SoftHSM always offers one free (uninitialised) slot.
    assert!(
        all.iter().any(|s| !s.initialized),
        "no free slot listed: {all:?}"
    );

    let cfg = TokenConfig {
        label: None,
        serial: Some(me.serial.clone()),
        ..tok.token_config()
    };
    let b = Pkcs11Backend::connect("by-serial", cfg, tok.pin()).expect("connect by serial");
    let s = b.summary().expect("summary");
    assert_eq!(
        (s.label.as_str(), s.serial.as_str()),
        ("listed", me.serial.as_str())
    );
    let cfg = TokenConfig {
        serial: Some("0000000000000000".into()),
        ..tok.token_config()
    };
    let e = assert_code(
        Pkcs11Backend::connect("bad-serial", cfg, tok.pin()),
        "backend_unavailable",
        "label with a serial that does not match",
    );
    assert!(e.to_string().contains("listed"), "{e}");
}

/// A wrong PIN fails `connect` with `bad_passphrase`, fast; a backend that saw the rejection
/// never logs in again on its own: even once the token is logged in in this process (where a
/// new C_Login would answer CKR_USER_ALREADY_LOGGED_IN and "succeed"), it keeps answering
/// `backend_unavailable` naming the PIN, without touching the token.
#[test]
fn wrong_pin_is_reported_and_never_retried() {
    let tok = hsm().token("wrong-pin");
    // A key to sign with, made while logged in correctly; the session then closes, and with
    // the last session of the token the login ends.
    let key = {
        let good = connect(&tok);
        good.generate(&spec("wp", KeyType::P256))
            .expect("generate")
            .key_ref
    };
    let wrong = || SecretBytes::from_slice(b"not-the-pin");

    let t = Instant::now();
    let e = assert_code(
        Pkcs11Backend::connect("wrong-pin", tok.token_config(), wrong()),
        "bad_passphrase",
        "connect with a wrong PIN",
    );
    assert!(
        t.elapsed() < ANSWER_LIMIT,
        "wrong PIN took {:?}",
        t.elapsed()
    );
    assert!(e.to_string().contains("PIN"), "{e}");

    // The agent's way: construct (tries once), then serve.
    let b = Pkcs11Backend::new("wrong-pin", tok.token_config(), wrong());
    assert!(b.pin_rejected(), "the rejection is remembered");
    assert!(matches!(b.health(), Health::Down(_)));

    // Now log the token in, in this process, with the right PIN.
    let raw = raw_session(&tok);
    for _ in 0..3 {
        let t = Instant::now();
        let e = assert_code(
            b.sign(&key, Algorithm::EcdsaP256Sha256, b"m"),
            "backend_unavailable",
            "sign after the PIN was rejected",
        );
        assert!(t.elapsed() < ANSWER_LIMIT, "took {:?}", t.elapsed());
        assert!(e.to_string().contains("rejected the PIN"), "{e}");
        std::thread::sleep(Duration::from_millis(250)); // past the first reconnect backoff
    }
    assert!(b.pin_rejected());
    // The right PIN through a new backend works (the token is not locked or damaged).
    drop(raw);
    let good = connect(&tok);
    good.sign(&key, Algorithm::EcdsaP256Sha256, b"m")
        .expect("right PIN signs");
}

fn config_for(module: &Path, label: &str) -> TokenConfig {
    TokenConfig {
        module: module.to_path_buf(),
        label: Some(label.into()),
        serial: None,
        pin: "env:UNUSED".into(),
        sessions: 1,
        timeout_ms: 2000,
    }
}

/// Unknown token label, missing module file, files that are not PKCS#11 libraries: each is
/// `backend_unavailable`, names the cause, and comes back fast — from `connect`, from a
/// backend constructed anyway (`new` + `sign`), and from `list_tokens`.
#[test]
fn configuration_errors_are_fast_and_coded() {
    let tok = hsm().token("config-errors");
    // Hold the module, as an agent would with its other tokens.
    let _live = connect(&tok);
    let dir = tempfile::tempdir().expect("tmp");
    let text = dir.path().join("libnot-pkcs11.so");
    fs::write(&text, "this is not a shared library\n").expect("text file");
    let key = KeyRef {
        backend: BackendKind::Pkcs11,
        locator: "bad:0a0b".into(),
    };
    let mut cases: Vec<(String, TokenConfig, String)> = vec![
        (
            "unknown label".into(),
            config_for(tok.module(), "no-such-token-label"),
            "no-such-token-label".into(),
        ),
        (
            "missing module".into(),
            config_for(Path::new("/nonexistent/libvendor-pkcs11.so"), "x"),
            "/nonexistent/libvendor-pkcs11.so".into(),
        ),
        (
            "text file".into(),
            config_for(&text, "x"),
            "libnot-pkcs11.so".into(),
        ),
        (
            "executable".into(),
            config_for(Path::new("/bin/true"), "x"),
            "/bin/true".into(),
        ),
    ];
    let libz = Path::new("/lib/x86_64-linux-gnu/libz.so.1");
    if libz.exists() {
        // A real shared library without C_GetFunctionList.
        cases.push((
            "non-PKCS#11 library".into(),
            config_for(libz, "x"),
            "libz".into(),
        ));
    }
    for (what, cfg, names) in cases {
        let t = Instant::now();
        let e = assert_code(
            Pkcs11Backend::connect("bad", cfg.clone(), SecretBytes::from_slice(b"1234")),
            "backend_unavailable",
            &what,
        );
        assert!(
            t.elapsed() < ANSWER_LIMIT,
            "{what}: connect took {:?}",
            t.elapsed()
        );
        assert!(
            e.to_string().contains(&names),
            "{what}: message does not name {names}: {e}"
        );
        eprintln!("{what}: {e}");

        let t = Instant::now();
        let b = Pkcs11Backend::new("bad", cfg.clone(), SecretBytes::from_slice(b"1234"));
        assert!(matches!(b.health(), Health::Down(_)), "{what}: health");
        for _ in 0..3 {
            assert_code(
                b.sign(&key, Algorithm::EcdsaP256Sha256, b"m"),
                "backend_unavailable",
                &format!("{what}: sign"),
            );
        }
        assert!(t.elapsed() < ANSWER_LIMIT, "{what}: took {:?}", t.elapsed());
        if what != "unknown label" {
            let t = Instant::now();
            assert_code(list_tokens(&cfg.module), "backend_unavailable", &what);
            assert!(t.elapsed() < ANSWER_LIMIT);
        }
    }
}

/// A token that is absent when the backend is configured (agent start) is picked up once it
/// exists, by the same backend object, after its reconnect backoff.
#[test]
fn token_absent_at_start_is_picked_up_later() {
    let h = hsm();
    let label = "late-token";
    let cfg = TokenConfig {
        label: Some(label.into()),
        ..h.token_config()
    };
    let b = Pkcs11Backend::new(label, cfg, h.pin());
    assert!(matches!(b.health(), Health::Down(_)));
    let t = Instant::now();
    let e = assert_code(
        b.generate(&spec("late", KeyType::P256)),
        "backend_unavailable",
        "token not there yet",
    );
    assert!(t.elapsed() < ANSWER_LIMIT);
    assert!(e.to_string().contains(label), "{e}");

    let tok = h.token(label); // "plugged in"
    let t = Instant::now();
    let new = poll(Duration::from_secs(10), || {
        b.generate(&spec("late", KeyType::P256))
    })
    .expect("the backend connects once the token exists");
    eprintln!("late token served {:?} after it appeared", t.elapsed());
    assert_eq!(b.health(), Health::Up);
    let v = Verifier::from_spki_der("p256", new.public.spki_der.as_deref().expect("spki"));
    sign_and_verify_all(&b, &new.key_ref, KeyType::P256, &v);
    drop(tok);
}

/// Call `f` every 100 ms until it succeeds or `limit` passes; every failed call must be fast
/// and `backend_unavailable`. Returns the last result.
fn poll<T>(limit: Duration, mut f: impl FnMut() -> keyward::Result<T>) -> keyward::Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        let t = Instant::now();
        let r = f();
        let took = t.elapsed();
        match &r {
            Ok(_) => return r,
            Err(e) => {
                assert_eq!(e.code(), "backend_unavailable", "while waiting: {e}");
                assert!(took < ANSWER_LIMIT, "a failing call took {took:?}: {e}");
                if Instant::now() >= deadline {
                    return r;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

const DEVICE_LOSS_CHILD: &str = "KEYWARD_TEST_DEVICE_LOSS_CHILD";

/// Device loss and recovery with the same backend object, two ways, in a child process (the
/// module must be this test's alone: SoftHSM only rediscovers a token at C_Initialize, and
/// keyward re-initialises a module only when no other token of the process uses it).
///
/// 1. The token is pulled: its directory under `tokens/` is moved away while the backend is
///    connected. SoftHSM (file store) notices on the next call: C_SignInit answers
///    CKR_OBJECT_HANDLE_INVALID, the backend drops the connection, and reconnecting finds no
///    token with the label. The directory is moved back: the backend reconnects (backoff) and
///    serves again, no new backend.
/// 2. The token is re-initialised by another process (`softhsm2-util --delete-token`, then
///    `--init-token` with the same label and PINs): the backend answers backend_unavailable
///    (first the invalid handle, then "no token", then — token back, logged in — "no key
///    object with id"); once the key is restored with the same CKA_ID (`softhsm2-util
///    --import` of the original PEM, as from a backup), it signs again for the original key.
#[test]
fn device_loss_and_recovery() {
    if std::env::var_os(DEVICE_LOSS_CHILD).is_none() {
        let out = run_in_child("device_loss_and_recovery", DEVICE_LOSS_CHILD);
        eprintln!("{}", out.stderr);
        return;
    }
    let h = hsm();
    let tok = h.token("device-loss");
    let cfg = TokenConfig {
        sessions: 2,
        ..tok.token_config()
    };
    let b = Pkcs11Backend::connect("device-loss", cfg, tok.pin()).expect("connect");
    let generated = b
        .generate(&spec("loss-gen", KeyType::P256))
        .expect("generate");
    let gen_v =
        Verifier::from_spki_der("p256", generated.public.spki_der.as_deref().expect("spki"));
    let dir = tempfile::tempdir().expect("tmp");
    let (pem, spki) = openssl_key(
        dir.path(),
        "backup",
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ],
    );
    let imported = b
        .import(
            &spec("loss-imp", KeyType::P256),
            material::parse(SecretBytes::new(pem), Some(KeyType::P256)).expect("pem"),
        )
        .expect("import");
    let imp_v = Verifier::from_spki_der("p256", &spki);
    let signs = |key: &NewKey, v: &Verifier| -> keyward::Result<()> {
        let sig = b.sign(&key.key_ref, Algorithm::EcdsaP256Sha256, b"after")?;
        v.verify("ecdsa-p256-sha256", b"after", &sig.bytes)
            .expect("a signature of the restored token verifies");
        Ok(())
    };
    signs(&generated, &gen_v).expect("before");
    signs(&imported, &imp_v).expect("before");

    // 1. Pull the token: move its directory out of the token dir.
    let token_dir = tok.token_dir().to_path_buf();
    let away = h.dir().join("pulled-token");
    fs::rename(&token_dir, &away).expect("moving the token away");
    for i in 0..3 {
        let t = Instant::now();
        let e = assert_code(
            signs(&generated, &gen_v),
            "backend_unavailable",
            "token pulled",
        );
        assert!(t.elapsed() < ANSWER_LIMIT, "took {:?}", t.elapsed());
        eprintln!("pulled, call {i}: {:?}: {e}", t.elapsed());
        std::thread::sleep(Duration::from_millis(150));
    }
    assert!(matches!(b.health(), Health::Down(_)), "health while pulled");
    fs::rename(&away, &token_dir).expect("putting the token back");
    let t = Instant::now();
    poll(Duration::from_secs(10), || signs(&generated, &gen_v)).expect("served again");
    eprintln!("token back: served again after {:?}", t.elapsed());
    signs(&imported, &imp_v).expect("the other key too");
    assert_eq!(b.health(), Health::Up);

    // 2. Another process re-initialises the token (same label and PINs: a replacement HSM).
    let so = fs::read_to_string(h.so_pin_file()).expect("so pin");
    let pin = h.pin_string();
    let util = |args: &[&str]| {
        let mut c = h.command("softhsm2-util");
        c.args(args);
        let out = run_command(c, None);
        assert!(out.success(), "softhsm2-util {args:?}:\n{out}");
    };
    util(&["--delete-token", "--token", "device-loss"]);
    let t = Instant::now();
    let e = assert_code(
        signs(&imported, &imp_v),
        "backend_unavailable",
        "token deleted",
    );
    assert!(t.elapsed() < ANSWER_LIMIT);
    eprintln!("deleted: {e}");
    std::thread::sleep(Duration::from_millis(250));
    let e = assert_code(
        signs(&imported, &imp_v),
        "backend_unavailable",
        "still deleted",
    );
    eprintln!("deleted, again: {e}");
    util(&[
        "--init-token",
        "--free",
        "--label",
        "device-loss",
        "--so-pin",
        &so,
        "--pin",
        &pin,
    ]);
    // Back and logged in, but the key is not on the new token.
    let e = poll(Duration::from_secs(10), || -> keyward::Result<()> {
        match signs(&imported, &imp_v) {
            Err(e) if e.to_string().contains("no key object") => Ok(()),
            Err(e) => Err(e),
            Ok(()) => panic!("signed with a key that is not on the re-initialised token"),
        }
    });
    e.expect("the re-initialised token is reached");
    assert_eq!(b.health(), Health::Up);
    // Restore the key from "backup" with its CKA_ID.
    let id_hex = hex::encode(locator_id(&imported.key_ref, "device-loss"));
    let pem_path = dir.path().join("backup.pem");
    util(&[
        "--import",
        pem_path.to_str().expect("path"),
        "--token",
        "device-loss",
        "--label",
        "restored",
        "--id",
        &id_hex,
        "--pin",
        &pin,
    ]);
    let t = Instant::now();
    poll(Duration::from_secs(10), || signs(&imported, &imp_v)).expect("restored key signs");
    eprintln!("restored key: served after {:?}", t.elapsed());
    assert_code(
        signs(&generated, &gen_v),
        "backend_unavailable",
        "the lost key stays lost",
    );
}

/// 8 threads sign RSA-2048 PSS through ONE backend (a pool of `cores` sessions) for 10 s:
/// every signature verifies, no call fails.
#[test]
fn eight_threads_rsa_pss_for_ten_seconds() {
    let tok = hsm().token("concurrency");
    let b = Arc::new(connect(&tok));
    let new = b
        .generate(&spec("conc", KeyType::Rsa2048))
        .expect("generate");
    let v = Arc::new(Verifier::from_spki_der(
        "rsa-2048",
        new.public.spki_der.as_deref().expect("spki"),
    ));
    let key = Arc::new(new.key_ref);
    let stop = Arc::new(AtomicBool::new(false));
    let signed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|n| {
            let (b, v, key, stop, signed) = (
                b.clone(),
                v.clone(),
                key.clone(),
                stop.clone(),
                signed.clone(),
            );
            std::thread::spawn(move || {
                let mut mine = 0u64;
                let mut errors = Vec::new();
                let mut worst = Duration::ZERO;
                while !stop.load(Ordering::Relaxed) {
                    let msg = format!("{n}:{mine}:{}", hex::encode(random_bytes(8)));
                    let t = Instant::now();
                    match b.sign(&key, Algorithm::RsaPssSha256, msg.as_bytes()) {
                        Ok(sig) => {
                            worst = worst.max(t.elapsed());
                            if let Err(e) = v.verify("rsa-pss-sha256", msg.as_bytes(), &sig.bytes) {
                                errors.push(format!("does not verify: {e}"));
                            }
                            mine += 1;
                            signed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => errors.push(format!("{}: {e}", e.code())),
                    }
                    if errors.len() > 5 {
                        break;
                    }
                }
                (mine, errors, worst)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(10));
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for (n, t) in threads.into_iter().enumerate() {
        let (mine, errors, worst) = t.join().expect("signer thread");
        assert!(errors.is_empty(), "thread {n}: {errors:?}");
        assert!(mine > 0, "thread {n} never got a session");
        eprintln!("thread {n}: {mine} signatures, slowest {worst:?}");
        total += mine;
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "8 threads, {} sessions: {total} RSA-2048 PSS signatures in {secs:.1} s ({:.0}/s), all verified",
        std::thread::available_parallelism().map_or(2, |n| n.get()),
        total as f64 / secs
    );
    assert_eq!(total, signed.load(Ordering::Relaxed));
    assert!(total >= 100, "only {total} signatures in 10 s");
}
