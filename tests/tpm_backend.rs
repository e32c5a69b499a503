//! The TPM backend as a library (`keyward::backend::tpm`) against a REAL swtpm: keys generate
//! in the TPM and verify with independent verifiers; imports sign for the original keys; a
//! tpm2-tools persistent key is adopted; blobs are bound to their TPM; failures are fast.
//!
//! Every test starts its own swtpm (tests/common/swtpm.rs), so they run in parallel. The swtpm
//! TCTI connects once per command, so tpm2-tools and a backend can share one swtpm; children
//! are spawned without inherited descriptors (see tests/common/swtpm.rs for why).

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::Mac;

use common::swtpm::Swtpm;
use common::verify::Verifier;
use common::{key_name, random_bytes};
use keyward::backend::tpm::{TpmAuth, TpmBackend};
use keyward::backend::{material, Backend, Health, KeySpec, NewKey};
use keyward::config::TpmConfig;
use keyward::model::{BackendKind, KeyRef};
use keyward::secret::SecretBytes;
use keyward::{Algorithm, Error, KeyType};

/// Every failure must be answered within the device timeout (2 s default).
const ANSWER_LIMIT: Duration = Duration::from_millis(2500);

/// Binance's documented HMAC example (API docs, "SIGNED endpoint examples").
const BINANCE_SECRET: &str = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j";
const BINANCE_QUERY: &str = "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559";
const BINANCE_SIGNATURE: &str = "c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71";

struct Fixture {
    tpm: Swtpm,
    keys: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            tpm: Swtpm::start(),
            keys: tempfile::Builder::new()
                .prefix("keyward-tpm-keys-")
                .tempdir()
                .expect("keys dir"),
        }
    }

    fn keys_dir(&self) -> &Path {
        self.keys.path()
    }

    fn backend(&self) -> TpmBackend {
        self.backend_with(self.tpm.config(), TpmAuth::default())
    }

    fn backend_with(&self, cfg: TpmConfig, auth: TpmAuth) -> TpmBackend {
        TpmBackend::connect("tpm0", cfg, self.keys_dir(), auth)
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.tpm.tcti()))
    }
}

fn spec(name: &str, key_type: KeyType) -> KeySpec {
    KeySpec {
        name: key_name(name),
        version: 1,
        key_type,
    }
}

fn verifier(t: KeyType, new: &NewKey) -> Verifier {
    let der = new
        .public
        .spki_der
        .as_deref()
        .unwrap_or_else(|| panic!("{t} key without SPKI"));
    Verifier::from_spki_der(t.as_str(), der)
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

fn soft_hmac256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("hmac key");
    m.update(msg);
    m.finalize().into_bytes().to_vec()
}

fn soft_hmac512(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut m = hmac::Hmac::<sha2::Sha512>::new_from_slice(key).expect("hmac key");
    m.update(msg);
    m.finalize().into_bytes().to_vec()
}

fn messages() -> Vec<Vec<u8>> {
    vec![
        Vec::new(),
        b"1700000000000GET/trade-api/v2/portfolio/balance".to_vec(),
        random_bytes(3000),
    ]
}

/// RSA-2048 generated in the TPM signs PKCS#1 v1.5 and PSS (salt = 32, what Kalshi requires,
/// checked exactly by the verifier) with SHA-256 and SHA-512; P-256 signs ECDSA as raw r‖s
/// with low s; the blob file holds the TPM2B blobs and the key is fixedTPM.
#[test]
fn generate_rsa_and_p256_sign_and_verify() {
    let f = Fixture::new();
    let b = f.backend();
    assert_eq!(b.kind(), BackendKind::Tpm);
    assert_eq!(b.timeout(), Some(Duration::from_millis(2000)));
    for (name, t, algs) in [
        (
            "rsa",
            KeyType::Rsa2048,
            vec![
                Algorithm::RsaPkcs1Sha256,
                Algorithm::RsaPssSha256,
                Algorithm::RsaPkcs1Sha512,
                Algorithm::RsaPssSha512,
            ],
        ),
        ("ec", KeyType::P256, vec![Algorithm::EcdsaP256Sha256]),
    ] {
        let new = b
            .generate(&spec(name, t))
            .unwrap_or_else(|e| panic!("generating {t}: {e}"));
        assert_eq!(new.key_ref.backend, BackendKind::Tpm);
        assert_eq!(new.key_ref.locator, format!("tpm0:{name}.1.tpm"));
        let blob = f.keys_dir().join(format!("{name}.1.tpm"));
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&blob).expect("blob file")).expect("json");
        assert_eq!(json["key_type"], t.as_str());
        assert_eq!(json["imported"], false);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&blob).expect("meta").permissions(),
        );
        assert_eq!(mode & 0o077, 0, "blob file mode {mode:o}");
        let v = verifier(t, &new);
        for alg in algs {
            for msg in messages() {
                let sig = b
                    .sign(&new.key_ref, alg, &msg)
                    .unwrap_or_else(|e| panic!("{t} {alg}: {e}"));
                v.verify_strict(alg.as_str(), &msg, &sig.bytes, &format!("TPM {t} {alg}"));
                if t == KeyType::P256 {
                    let s = p256::ecdsa::Signature::from_slice(&sig.bytes).expect("r||s");
                    assert!(s.normalize_s().is_none(), "high s");
                }
            }
        }
        // The public key the backend reports later is the one it reported at creation.
        let (t2, info) = b.public_info(&new.key_ref).expect("public info");
        assert_eq!((t2, info), (t, new.public.clone()));
        // Unsupported combinations are named, not attempted.
        let e = assert_code(
            b.sign(&new.key_ref, Algorithm::Ed25519, b"x"),
            "bad_request",
            "ed25519 on a TPM key",
        );
        assert!(e.to_string().contains("ed25519"), "{e}");
    }
    // Keys TPMs cannot hold are refused with `unsupported`.
    for t in [KeyType::Ed25519, KeyType::Secp256k1, KeyType::P384] {
        let e = assert_code(
            b.generate(&spec(&format!("no-{t}"), t)),
            "unsupported",
            &format!("{t}"),
        );
        assert!(e.to_string().contains("tpm"), "{e}");
    }
    // A blob is never overwritten.
    assert_code(
        b.generate(&spec("ec", KeyType::P256)),
        "already_exists",
        "second generate of ec.1",
    );
    assert_eq!(b.health(), Health::Up);
}

/// The Binance documentation example: the secret imported into the TPM gives the documented
/// tag; secrets of other lengths (also longer than a block) match a software HMAC.
#[test]
fn hmac_import_matches_binance_example_and_software_hmac() {
    let f = Fixture::new();
    let b = f.backend();
    let m = material::parse(
        SecretBytes::from_slice(BINANCE_SECRET.as_bytes()),
        Some(KeyType::HmacSha256),
    )
    .expect("secret");
    let new = b
        .import(&spec("binance", KeyType::HmacSha256), m)
        .expect("importing the Binance secret");
    assert!(new.public.spki_der.is_none());
    assert_eq!(
        new.public.fingerprint,
        material::hmac_fingerprint(BINANCE_SECRET.as_bytes())
    );
    let tag = b
        .sign(
            &new.key_ref,
            Algorithm::HmacSha256,
            BINANCE_QUERY.as_bytes(),
        )
        .expect("hmac in the TPM");
    assert_eq!(hex::encode(&tag.bytes), BINANCE_SIGNATURE);
    // The blob holds no plaintext secret.
    let blob = std::fs::read(f.keys_dir().join("binance.1.tpm")).expect("blob");
    let text = String::from_utf8_lossy(&blob);
    assert!(!text.contains(BINANCE_SECRET));

    // Secrets of other lengths, also longer than the digest's block (hashed first, RFC 2104),
    // for both HMAC types. On a TPM an HMAC key is bound to its digest.
    let cases = [
        (
            KeyType::HmacSha256,
            vec![1usize, 16, 32, 63, 64, 65, 100, 200],
        ),
        (KeyType::HmacSha512, vec![16, 64, 100, 128, 129, 300]),
    ];
    for (t, lens) in cases {
        let (own, other) = if t == KeyType::HmacSha256 {
            (Algorithm::HmacSha256, Algorithm::HmacSha512)
        } else {
            (Algorithm::HmacSha512, Algorithm::HmacSha256)
        };
        for len in lens {
            let secret = random_bytes(len);
            let m = material::parse(SecretBytes::from_slice(&secret), Some(t)).expect("secret");
            let new = b
                .import(&spec(&format!("h{len}-{t}"), t), m)
                .unwrap_or_else(|e| panic!("importing a {len}-byte secret as {t}: {e}"));
            for msg in [&b""[..], b"GET/api/v3/account", &[0x5a; 1024]] {
                let tag = b
                    .sign(&new.key_ref, own, msg)
                    .unwrap_or_else(|e| panic!("{len}-byte {t} key: {e}"));
                let want = if own == Algorithm::HmacSha256 {
                    soft_hmac256(&secret, msg)
                } else {
                    soft_hmac512(&secret, msg)
                };
                assert_eq!(tag.bytes, want, "{len}-byte {t} secret");
            }
            let e = assert_code(
                b.sign(&new.key_ref, other, b"x"),
                "unsupported",
                "the other HMAC digest",
            );
            assert!(e.to_string().contains("bound to its digest"), "{e}");
            // TPM2_HMAC takes at most 1024 bytes: longer input is a clear bad_request.
            let e = assert_code(
                b.sign(&new.key_ref, own, &[1u8; 1025]),
                "bad_request",
                "1025-byte HMAC input",
            );
            assert!(e.to_string().contains("1024"), "{e}");
        }
    }
    // Generated HMAC keys work too (deterministic tags, different per message).
    let g = b
        .generate(&spec("hgen", KeyType::HmacSha256))
        .expect("generate hmac");
    let t1 = b.sign(&g.key_ref, Algorithm::HmacSha256, b"a").expect("t1");
    let t2 = b.sign(&g.key_ref, Algorithm::HmacSha256, b"a").expect("t2");
    let t3 = b.sign(&g.key_ref, Algorithm::HmacSha256, b"b").expect("t3");
    assert_eq!(t1, t2);
    assert_ne!(t1, t3);
    assert_eq!(t1.bytes.len(), 32);
}

/// openssl makes a private key PEM; returns it and the SPKI DER openssl derives.
fn openssl_key(dir: &Path, name: &str, args: &[&str]) -> (Vec<u8>, Vec<u8>) {
    let pem = dir.join(format!("{name}.pem"));
    let pem_s = pem.to_str().expect("utf-8 path");
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["-out", pem_s]);
    common::swtpm::tool("openssl", &all);
    let der = dir.join(format!("{name}.spki.der"));
    common::swtpm::tool(
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
    (
        std::fs::read(&pem).expect("pem"),
        std::fs::read(&der).expect("spki"),
    )
}

/// RSA (PKCS#8 and PKCS#1 PEM, like a Kalshi key) and P-256 (SEC1, like a Coinbase key) made
/// by openssl import into the TPM; PSS (salt 32) and ECDSA signatures verify under the public
/// key openssl derives from the ORIGINAL file; afterwards only the TPM-wrapped blob exists.
#[test]
fn pem_import_signs_for_the_original_key() {
    let f = Fixture::new();
    let b = f.backend();
    let dir = tempfile::tempdir().expect("tmp");
    let cases: Vec<(&str, KeyType, Vec<&str>, Algorithm)> = vec![
        (
            "kalshi-rsa",
            KeyType::Rsa2048,
            vec![
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ],
            Algorithm::RsaPssSha256,
        ),
        (
            "rsa-pkcs1",
            KeyType::Rsa2048,
            vec!["genrsa", "-traditional"],
            Algorithm::RsaPkcs1Sha256,
        ),
        (
            "coinbase-ec",
            KeyType::P256,
            vec!["ecparam", "-name", "prime256v1", "-genkey", "-noout"],
            Algorithm::EcdsaP256Sha256,
        ),
    ];
    for (name, t, args, alg) in cases {
        let (pem, spki) = openssl_key(dir.path(), name, &args);
        let m = material::parse(SecretBytes::new(pem), Some(t)).expect("pem");
        let new = b
            .import(&spec(name, t), m)
            .unwrap_or_else(|e| panic!("importing {name}: {e}"));
        assert_eq!(new.public.spki_der.as_deref(), Some(&spki[..]), "{name}");
        let v = Verifier::from_spki_der(t.as_str(), &spki);
        // A Kalshi request: timestamp ‖ method ‖ path.
        let msg = b"1703123456789GET/trade-api/v2/portfolio/balance";
        let sig = b
            .sign(&new.key_ref, alg, msg)
            .unwrap_or_else(|e| panic!("{name} {alg}: {e}"));
        v.verify_strict(alg.as_str(), msg, &sig.bytes, &format!("imported {name}"));
        let json: serde_json::Value = serde_json::from_slice(
            &std::fs::read(f.keys_dir().join(format!("{name}.1.tpm"))).expect("blob"),
        )
        .expect("json");
        assert_eq!(json["imported"], true);
    }
}

/// A key created and made persistent with tpm2-tools is adopted by handle and signs; an empty
/// handle and a non-persistent handle are refused clearly.
#[test]
fn tpm2_tools_persistent_key_is_adopted() {
    let f = Fixture::new();
    let rsa_pem = f.tpm.persistent_key("rsa2048", "0x81000001", &[]);
    f.tpm.persistent_key("ecc256", "0x81000002", &[]);

    let b = f.backend();
    let (key_ref, kt, info) = b.adopt(0x8100_0001).expect("adopting the RSA key");
    assert_eq!(kt, KeyType::Rsa2048);
    assert_eq!(key_ref.locator, "tpm0:0x81000001");
    let v = Verifier::from_spki_pem("rsa-2048", &rsa_pem);
    let msg = b"adopted key signs";
    for alg in [Algorithm::RsaPssSha256, Algorithm::RsaPkcs1Sha256] {
        let sig = b.sign(&key_ref, alg, msg).expect("adopted RSA signs");
        v.verify_strict(alg.as_str(), msg, &sig.bytes, &format!("adopted {alg}"));
        let v2 = verifier(
            kt,
            &NewKey {
                key_ref: key_ref.clone(),
                public: info.clone(),
            },
        );
        v2.verify_strict(alg.as_str(), msg, &sig.bytes, "adopted, reported SPKI");
    }
    let (ec_ref, ec_t, ec_info) = b.adopt(0x8100_0002).expect("adopting the EC key");
    assert_eq!(ec_t, KeyType::P256);
    let sig = b
        .sign(&ec_ref, Algorithm::EcdsaP256Sha256, msg)
        .expect("adopted EC signs");
    verifier(
        ec_t,
        &NewKey {
            key_ref: ec_ref.clone(),
            public: ec_info,
        },
    )
    .verify_strict("ecdsa-p256-sha256", msg, &sig.bytes, "adopted P-256");

    assert_code(
        b.adopt(0x8100_0003),
        "unknown_key",
        "empty persistent handle",
    );
    assert_code(b.adopt(0x8000_0000), "bad_request", "transient handle");
    // Forgetting an adopted key leaves the TPM object alone.
    b.delete(&key_ref).expect("delete adopted");
    b.sign(&key_ref, Algorithm::RsaPssSha256, msg)
        .expect("the persistent object is still there");
}

/// Key blobs are bound to their TPM: the same blob files used with another swtpm (other seeds)
/// fail with a clear message; with the original TPM they still sign.
#[test]
fn blobs_are_bound_to_their_tpm() {
    let f = Fixture::new();
    let b = f.backend();
    let rsa = b.generate(&spec("rsa", KeyType::Rsa2048)).expect("rsa");
    let ec = b.generate(&spec("ec", KeyType::P256)).expect("ec");
    let secret = random_bytes(32);
    let h = b
        .import(
            &spec("h", KeyType::HmacSha256),
            material::parse(SecretBytes::from_slice(&secret), Some(KeyType::HmacSha256))
                .expect("secret"),
        )
        .expect("hmac");
    let other = Swtpm::start();
    // The same keys directory, another TPM.
    let b2 = TpmBackend::connect("tpm0", other.config(), f.keys_dir(), TpmAuth::default())
        .expect("other TPM");
    for (k, alg) in [
        (&rsa.key_ref, Algorithm::RsaPssSha256),
        (&ec.key_ref, Algorithm::EcdsaP256Sha256),
        (&h.key_ref, Algorithm::HmacSha256),
    ] {
        let t = Instant::now();
        let e = b2
            .sign(k, alg, b"x")
            .err()
            .unwrap_or_else(|| panic!("{} signed on another TPM", k.locator));
        assert!(t.elapsed() < ANSWER_LIMIT);
        assert!(
            e.to_string().contains("does not belong to this TPM"),
            "{}: {e}",
            k.locator
        );
        // The other TPM is fine otherwise.
        assert_eq!(b2.health(), Health::Up);
        // And the key still works where it was made.
        b.sign(k, alg, b"x").expect("original TPM");
    }
}

/// Poll `f` until it succeeds or `limit` passes; every failure must come back quickly.
fn poll<T>(limit: Duration, mut f: impl FnMut() -> keyward::Result<T>) -> keyward::Result<T> {
    let start = Instant::now();
    loop {
        let t = Instant::now();
        let r = f();
        assert!(
            t.elapsed() < ANSWER_LIMIT,
            "a request took {:?} (must answer within the timeout)",
            t.elapsed()
        );
        match r {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() > limit => return Err(e),
            Err(e) => {
                assert_eq!(e.code(), "backend_unavailable", "{e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// swtpm killed while the backend is in use: requests answer backend_unavailable fast (no
/// hang), health says down; swtpm restarted with the same state: the SAME backend object
/// reconnects (backoff) and signs again with the same key blobs.
#[test]
fn tpm_loss_and_recovery() {
    let mut f = Fixture::new();
    let b = f.backend();
    let rsa = b.generate(&spec("rsa", KeyType::Rsa2048)).expect("rsa");
    let ec = b.generate(&spec("ec", KeyType::P256)).expect("ec");
    let v = verifier(KeyType::P256, &ec);
    b.sign(&ec.key_ref, Algorithm::EcdsaP256Sha256, b"before")
        .expect("before");

    f.tpm.stop();
    for i in 0..5 {
        let t = Instant::now();
        let r = b.sign(&ec.key_ref, Algorithm::EcdsaP256Sha256, b"while down");
        assert!(
            t.elapsed() < ANSWER_LIMIT,
            "request {i} took {:?}",
            t.elapsed()
        );
        assert_code(r, "backend_unavailable", "sign while swtpm is down");
    }
    assert!(matches!(b.health(), Health::Down(_)), "{:?}", b.health());

    f.tpm.restart();
    let sig = poll(Duration::from_secs(40), || {
        b.sign(&ec.key_ref, Algorithm::EcdsaP256Sha256, b"after")
    })
    .expect("signing again after swtpm came back");
    v.verify_strict("ecdsa-p256-sha256", b"after", &sig.bytes, "after restart");
    let sig = b
        .sign(&rsa.key_ref, Algorithm::RsaPssSha256, b"after")
        .expect("rsa after restart");
    verifier(KeyType::Rsa2048, &rsa).verify_strict(
        "rsa-pss-sha256",
        b"after",
        &sig.bytes,
        "rsa after restart",
    );
    assert_eq!(b.health(), Health::Up);
}

/// A TPM that is absent at start: `new` still returns a backend (its keys answer
/// backend_unavailable), and it serves once the TPM appears. `connect` reports the error.
#[test]
fn tpm_absent_at_start_is_picked_up_later() {
    let mut f = Fixture::new();
    let cfg = f.tpm.config();
    f.tpm.stop();
    let e = assert_code(
        TpmBackend::connect("tpm0", cfg.clone(), f.keys_dir(), TpmAuth::default()),
        "backend_unavailable",
        "connect with swtpm down",
    );
    assert!(e.to_string().contains("tpm0"), "{e}");
    let b = TpmBackend::new("tpm0", cfg, f.keys_dir(), TpmAuth::default()).expect("new");
    assert!(matches!(b.health(), Health::Down(_)));
    f.tpm.restart();
    let new = poll(Duration::from_secs(40), || {
        b.generate(&spec("late", KeyType::P256))
    })
    .expect("generate after the TPM appeared");
    b.sign(&new.key_ref, Algorithm::EcdsaP256Sha256, b"x")
        .expect("sign");
}

/// A key with an auth value: the right value signs; a wrong one is a clear error, and the
/// backend does not try again (the TPM's failure counter moved by exactly one).
#[test]
fn wrong_auth_is_reported_and_never_retried() {
    let f = Fixture::new();
    let t = &f.tpm;
    let run = |prog: &str, args: &[&str]| -> String {
        let out = t.tpm2(prog, args);
        assert!(out.success(), "{prog} failed:\n{out}");
        out.stdout
    };
    f.tpm
        .persistent_key("ecc256", "0x81000010", &["-p", "right-auth"]);
    let counter = || -> u64 {
        let out = run("tpm2_getcap", &["properties-variable"]);
        let i = out
            .find("TPM2_PT_LOCKOUT_COUNTER")
            .expect("lockout counter in tpm2_getcap");
        let v = out[i..].split_whitespace().nth(1).expect("value");
        u64::from_str_radix(v.trim_start_matches("0x"), 16).expect("hex")
    };
    let before = counter();

    let auth = |s: &str| TpmAuth {
        owner: None,
        key: Some(SecretBytes::from_slice(s.as_bytes())),
    };
    {
        let good = f.backend_with(f.tpm.config(), auth("right-auth"));
        let (k, _, _) = good.adopt(0x8100_0010).expect("adopt");
        good.sign(&k, Algorithm::EcdsaP256Sha256, b"x")
            .expect("right auth signs");
    }
    {
        let bad = f.backend_with(f.tpm.config(), auth("wrong-auth"));
        let k = KeyRef {
            backend: BackendKind::Tpm,
            locator: "tpm0:0x81000010".into(),
        };
        let e = assert_code(
            bad.sign(&k, Algorithm::EcdsaP256Sha256, b"x"),
            "bad_passphrase",
            "wrong auth",
        );
        assert!(e.to_string().contains("rejected the auth value"), "{e}");
        for _ in 0..3 {
            let t0 = Instant::now();
            let e = assert_code(
                bad.sign(&k, Algorithm::EcdsaP256Sha256, b"x"),
                "backend_unavailable",
                "after a wrong auth",
            );
            assert!(t0.elapsed() < Duration::from_millis(100));
            assert!(e.to_string().contains("keyward reload"), "{e}");
        }
        assert!(bad.auth_rejected());
    }
    // Exactly one failed authorisation reached the TPM (backends are dropped: swtpm serves
    // tpm2-tools again once the worker has closed its connection).
    assert_eq!(
        counter(),
        before + 1,
        "the backend retried a wrong auth value"
    );
}

/// Dictionary-attack lockout: the error names the recovery command; after
/// `tpm2_dictionarylockout --clear-lockout` the key signs again.
#[test]
fn lockout_names_the_recovery_command() {
    let f = Fixture::new();
    let t = &f.tpm;
    let run = |prog: &str, args: &[&str]| {
        let out = t.tpm2(prog, args);
        assert!(out.success(), "{prog} failed:\n{out}");
    };
    run(
        "tpm2_dictionarylockout",
        &[
            "--setup-parameters",
            "--max-tries=1",
            "--recovery-time=600",
            "--lockout-recovery-time=1",
        ],
    );
    f.tpm
        .persistent_key("ecc256", "0x81000020", &["-p", "right-auth"]);
    let auth = |s: &str| TpmAuth {
        owner: None,
        key: Some(SecretBytes::from_slice(s.as_bytes())),
    };
    let k = KeyRef {
        backend: BackendKind::Tpm,
        locator: "tpm0:0x81000020".into(),
    };
    {
        let bad = f.backend_with(f.tpm.config(), auth("wrong"));
        assert_code(
            bad.sign(&k, Algorithm::EcdsaP256Sha256, b"x"),
            "bad_passphrase",
            "wrong auth",
        );
    }
    {
        let good = f.backend_with(f.tpm.config(), auth("right-auth"));
        let e = assert_code(
            good.sign(&k, Algorithm::EcdsaP256Sha256, b"x"),
            "backend_unavailable",
            "in lockout",
        );
        assert!(
            e.to_string()
                .contains("tpm2_dictionarylockout --clear-lockout"),
            "{e}"
        );
    }
    {
        // Keys without an auth value (noDA) keep working during lockout.
        let plain = f.backend();
        let ec = plain
            .generate(&spec("noda", KeyType::P256))
            .expect("generate");
        plain
            .sign(&ec.key_ref, Algorithm::EcdsaP256Sha256, b"x")
            .expect("noDA key during lockout");
    }
    run("tpm2_dictionarylockout", &["--clear-lockout"]);
    let good = f.backend_with(f.tpm.config(), auth("right-auth"));
    good.sign(&k, Algorithm::EcdsaP256Sha256, b"x")
        .expect("signs after clearing the lockout");
}

/// describe() reports what `keyward token list` shows.
#[test]
fn describe_reports_the_tpm() {
    let f = Fixture::new();
    let b = f.backend();
    let d = b.describe().expect("describe");
    assert_eq!(d.alias, "tpm0");
    assert_eq!(d.tcti, f.tpm.tcti());
    assert_eq!(d.manufacturer, "IBM");
    assert!(d.vendor.contains("SW"), "{d:?}");
    for alg in ["rsa", "ecc", "sha256", "hmac", "keyedhash"] {
        assert!(
            d.algorithms.iter().any(|a| a == alg),
            "{alg} missing from {:?}",
            d.algorithms
        );
    }
    assert!(d.ecc_curves.iter().any(|c| c.contains("p256")), "{d:?}");
    assert!(d.pcr_banks.iter().any(|p| p == "sha256"), "{d:?}");
    assert!(d.transient_slots.unwrap_or(0) >= 3, "{d:?}");
    assert!(!d.in_lockout);
}

/// Four threads share one backend for a few seconds (RSA-PSS and P-256 alternately, through
/// the one worker and its bounded queue): every signature verifies, nothing times out.
#[test]
fn four_threads_share_the_tpm() {
    let f = Fixture::new();
    let b = Arc::new(f.backend());
    let rsa = b.generate(&spec("rsa", KeyType::Rsa2048)).expect("rsa");
    let ec = b.generate(&spec("ec", KeyType::P256)).expect("ec");
    let vr = verifier(KeyType::Rsa2048, &rsa);
    let ve = verifier(KeyType::P256, &ec);
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for i in 0..4u8 {
        let (b, stop, count) = (b.clone(), stop.clone(), count.clone());
        let (rsa, ec, vr, ve) = (
            rsa.key_ref.clone(),
            ec.key_ref.clone(),
            vr.clone(),
            ve.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let msg = format!("thread {i} request {n}");
                let (k, alg, v) = if n.is_multiple_of(2) {
                    (&rsa, Algorithm::RsaPssSha256, &vr)
                } else {
                    (&ec, Algorithm::EcdsaP256Sha256, &ve)
                };
                let sig = b
                    .sign(k, alg, msg.as_bytes())
                    .unwrap_or_else(|e| panic!("thread {i} request {n}: {e}"));
                v.verify(alg.as_str(), msg.as_bytes(), &sig.bytes)
                    .unwrap_or_else(|e| panic!("thread {i} request {n}: {e}"));
                n += 1;
            }
            count.fetch_add(n, Ordering::Relaxed);
        }));
    }
    std::thread::sleep(Duration::from_secs(4));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("thread");
    }
    let n = count.load(Ordering::Relaxed);
    eprintln!("4 threads, 4 s: {n} signatures ({:.0}/s)", n as f64 / 4.0);
    assert!(n >= 40, "only {n} signatures in 4 s");
}

/// Configuration errors: an invalid TCTI is refused at once; a TCTI nothing listens on is
/// backend_unavailable quickly.
#[test]
fn configuration_errors_are_fast_and_coded() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut cfg = TpmConfig {
        tcti: Some("nonsense:foo".into()),
        owner_auth: None,
        key_auth: None,
        timeout_ms: 2000,
        queue: 4,
        loaded_keys: 1,
    };
    assert_code(
        TpmBackend::connect("t", cfg.clone(), dir.path(), TpmAuth::default()),
        "config",
        "bad TCTI",
    );
    cfg.tcti = Some("swtpm:host=127.0.0.1,port=9".into());
    let t = Instant::now();
    assert_code(
        TpmBackend::connect("t", cfg, dir.path(), TpmAuth::default()),
        "backend_unavailable",
        "nothing listening",
    );
    assert!(t.elapsed() < ANSWER_LIMIT);
    let text =
        "[tpm.main]\ntcti = \"swtpm:host=127.0.0.1,port=2321\"\nkey_auth = \"env:TPM_KEY_AUTH\"\n";
    let c = keyward::config::Config::parse(text, Path::new("k.toml")).expect("valid config");
    assert_eq!(c.tpm["main"].timeout_ms, 2000);
    for bad in [
        "[tpm.main]\ntcti = \"bogus\"\n",
        "[tpm.main]\nkey_auth = \"hunter2\"\n",
        "[tpm.Main]\n",
        "[tpm.main]\ntimeout_ms = 0\n",
        "[tpm.main]\nslot = 1\n",
    ] {
        assert!(
            keyward::config::Config::parse(bad, Path::new("k.toml")).is_err(),
            "accepted: {bad}"
        );
    }
}

/// delete removes the blob (the key is gone: the TPM keeps no copy).
#[test]
fn delete_removes_the_blob() {
    let f = Fixture::new();
    let b = f.backend();
    let k = b.generate(&spec("gone", KeyType::P256)).expect("gen");
    b.sign(&k.key_ref, Algorithm::EcdsaP256Sha256, b"x")
        .expect("sign");
    b.delete(&k.key_ref).expect("delete");
    assert!(!f.keys_dir().join("gone.1.tpm").exists());
    assert_code(
        b.sign(&k.key_ref, Algorithm::EcdsaP256Sha256, b"x"),
        "backend_unavailable",
        "deleted key",
    );
    // Locators of other backends or with paths are refused.
    for loc in ["tpm1:gone.1.tpm", "tpm0:../x.tpm", "tpm0:x", "tpm0:0xzz"] {
        let r = b.sign(
            &KeyRef {
                backend: BackendKind::Tpm,
                locator: loc.into(),
            },
            Algorithm::EcdsaP256Sha256,
            b"x",
        );
        assert_code(r, "internal", loc);
    }
}
