//! PKCS#11 keys through the REAL agent socket, on a private SoftHSM token per test: every key
//! type verifies independently, RSA-PSS under 8 concurrent clients, and token failures answer fast.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::token_home::{TokenHome, USER_PIN};
use common::verify::{schemes, Verifier, KEY_TYPES};
use common::{key_name, unb64, write_private};
use keyward::client::Client;
use keyward::Error;

/// Every failure must be answered within the device timeout (2 s default).
const ANSWER_LIMIT: Duration = Duration::from_secs(2);

/// A test home with its own SoftHSM token (tests run in parallel).
type Hsm = TokenHome;

fn public_verifier(c: &mut Client, name: &str, key_type: &str) -> Verifier {
    let pk = c.public_key(&key_name(name), "pem").expect("public_key");
    let pem = pk.public_key.as_str().expect("PEM string").to_string();
    Verifier::from_spki_pem(key_type, &pem)
}

/// Sign and require an error code, answered within the limit.
fn expect_error(c: &mut Client, key: &str, code: &str) -> Error {
    let t = Instant::now();
    let e = c
        .sign(&key_name(key), b"probe", None)
        .expect_err("signing should fail");
    let took = t.elapsed();
    assert_eq!(e.code(), code, "{key}: {e}");
    assert!(took < ANSWER_LIMIT, "{key}: the error took {took:?}");
    e
}

#[test]
fn every_key_type_signs_on_the_token_and_verifies_independently() {
    let h = Hsm::new("all-types");
    for t in KEY_TYPES {
        h.generate(&format!("k-{t}"), t);
    }
    // Exchange secrets of 16 (shorter than the digest), 32 and 64 bytes.
    let secrets: Vec<(String, Vec<u8>)> = [16usize, 32, 64]
        .iter()
        .map(|n| (format!("imp-{n}"), common::random_bytes(*n)))
        .collect();
    for (name, s) in &secrets {
        h.import(name, "hmac-sha256", s);
    }
    let agent = h.agent();
    let mut c = agent.client();
    let msg = b"POST /api/v3/order symbol=BTCUSDT&side=BUY&quantity=1";
    for t in KEY_TYPES {
        let name = format!("k-{t}");
        if t.starts_with("hmac") {
            // Generated secrets never leave the token: check shape and determinism, with both
            // digests (a generated HMAC key serves both schemes, as in the soft backend).
            for scheme in ["hmac-sha256", "hmac-sha512"] {
                let a = c.sign(&key_name(&name), msg, Some(scheme)).expect("hmac");
                let b = c.sign(&key_name(&name), msg, Some(scheme)).expect("hmac");
                assert_eq!(a.signature, b.signature, "{name}/{scheme}");
                let want = if scheme.ends_with("512") { 64 } else { 32 };
                assert_eq!(unb64(&a.signature).len(), want, "{name}/{scheme}");
            }
            continue;
        }
        let v = public_verifier(&mut c, &name, t);
        for scheme in schemes(t) {
            // A prehashed scheme signs a 32-byte digest the caller computed.
            let digest = common::verify::keccak256(msg);
            let m: &[u8] = if scheme.ends_with("prehashed") {
                &digest
            } else {
                msg
            };
            let r = c
                .sign(&key_name(&name), m, Some(scheme))
                .unwrap_or_else(|e| panic!("{name}/{scheme}: {e}\n{}", agent.log()));
            v.verify(scheme, m, &unb64(&r.signature))
                .unwrap_or_else(|e| panic!("{name}/{scheme} does not verify: {e}"));
        }
    }
    for (name, secret) in &secrets {
        let v = Verifier::Hmac(secret.clone());
        for scheme in ["hmac-sha256", "hmac-sha512"] {
            let r = c.sign(&key_name(name), msg, Some(scheme)).expect("hmac");
            v.verify(scheme, msg, &unb64(&r.signature))
                .unwrap_or_else(|e| panic!("{name}/{scheme}: {e}"));
        }
    }
}

#[test]
fn eight_clients_rsa_pss_for_ten_seconds_all_verify() {
    let h = Hsm::new("pss-load");
    h.generate("rsa", "rsa-2048");
    let agent = h.agent();
    let verifier = {
        let mut c = agent.client();
        public_verifier(&mut c, "rsa", "rsa-2048")
    };
    let Verifier::Rsa(pk) = verifier else {
        panic!("not an RSA key")
    };
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(10);
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let sock = agent.sock.clone();
            let (stop, ok, pk) = (stop.clone(), ok.clone(), pk.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let mut c = Client::connect(&sock).map_err(|e| e.to_string())?;
                c.set_timeout(Some(Duration::from_secs(30)))
                    .map_err(|e| e.to_string())?;
                let mut n = 0u64;
                while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                    let msg = format!("client {i} request {n}");
                    let r = c
                        .sign(&key_name("rsa"), msg.as_bytes(), Some("rsa-pss-sha256"))
                        .map_err(|e| format!("client {i} #{n}: {} {e}", e.code()))?;
                    let sig = unb64(&r.signature);
                    // Salt = hash length (32), as exchanges (Kalshi) require.
                    let digest = <sha2::Sha256 as sha2::Digest>::digest(msg.as_bytes());
                    pk.verify(rsa::Pss::new_with_salt::<sha2::Sha256>(32), &digest, &sig)
                        .map_err(|e| format!("client {i} #{n}: bad PSS signature: {e}"))?;
                    n += 1;
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    let mut errors = Vec::new();
    for hd in handles {
        if let Err(e) = hd.join().expect("client thread") {
            stop.store(true, Ordering::Relaxed);
            errors.push(e);
        }
    }
    let total = ok.load(Ordering::Relaxed);
    eprintln!(
        "8 clients, 10 s: {total} RSA-2048 PSS signatures ({}/s)",
        total / 10
    );
    assert!(errors.is_empty(), "errors: {errors:?}\n{}", agent.log());
    assert!(total > 100, "only {total} signatures in 10 s");
}

#[test]
fn token_failures_answer_backend_unavailable_fast_and_recover_on_reload() {
    let h = Hsm::new("fail-tok");
    h.generate("tok-ed", "ed25519");
    h.generate("tok-rsa", "rsa-2048");
    h.home.generate("soft-ed", "ed25519");

    // Wrong PIN in the configured source: the agent starts, soft keys work, token keys don't.
    write_private(&h.pin_file, b"wrong-pin-0000");
    let agent = h.agent();
    let mut c = agent.client();
    for k in ["tok-ed", "tok-rsa"] {
        expect_error(&mut c, k, "backend_unavailable");
    }
    c.sign(&key_name("soft-ed"), b"m", None)
        .expect("soft keys work while the token is down");
    let st = c.status().expect("status");
    let b = st
        .backends
        .iter()
        .find(|b| b.kind == "pkcs11:tok")
        .expect("pkcs11 backend in status");
    assert!(!b.up, "status shows the token up with a wrong PIN: {b:?}");

    // Fix the PIN and reload: the token keys serve without an agent restart.
    write_private(&h.pin_file, USER_PIN.as_bytes());
    h.ok(&["reload"]);
    for k in ["tok-ed", "tok-rsa"] {
        c.sign(&key_name(k), b"m", None)
            .unwrap_or_else(|e| panic!("{k} after fixing the PIN: {e}\n{}", agent.log()));
    }

    // Unknown label: the answer names it.
    h.set_token_config("label = \"no-such-label\"");
    h.ok(&["reload"]);
    let e = expect_error(&mut c, "tok-ed", "backend_unavailable");
    assert!(e.to_string().contains("no-such-label"), "{e}");

    // A module path that does not exist.
    h.set_token_config("label = \"fail-tok\"\nmodule = \"/nonexistent/libpkcs11.so\"");
    h.ok(&["reload"]);
    expect_error(&mut c, "tok-ed", "backend_unavailable");

    // Files that are not PKCS#11 libraries: garbage, and a real shared library without
    // C_GetFunctionList.
    let garbage = h.home.path("not-a-module.so");
    fs::write(&garbage, b"this is not an ELF file").unwrap();
    let mut fakes = vec![garbage];
    if let Some(lib) = real_non_pkcs11_library() {
        fakes.push(lib);
    }
    for fake in &fakes {
        h.set_token_config(&format!(
            "label = \"fail-tok\"\nmodule = \"{}\"",
            fake.display()
        ));
        h.ok(&["reload"]);
        expect_error(&mut c, "tok-ed", "backend_unavailable");
        expect_error(&mut c, "tok-rsa", "backend_unavailable");
    }

    // The key's token alias is not configured at all.
    h.set_token_config("");
    h.ok(&["reload"]);
    let e = expect_error(&mut c, "tok-ed", "backend_unavailable");
    assert!(e.to_string().contains("tok"), "{e}");

    // Back to the good configuration: serving again, same agent process.
    h.set_token_config("label = \"fail-tok\"");
    h.ok(&["reload"]);
    c.sign(&key_name("tok-ed"), b"m", None).unwrap_or_else(|e| {
        panic!(
            "token keys after restoring the config: {e}\n{}",
            agent.log()
        )
    });
    c.sign(&key_name("soft-ed"), b"m", None).expect("soft key");
    let mut agent = agent;
    agent.assert_serving("the failure sequence");
}

/// A shared library that surely is not a PKCS#11 module (libz or libm).
fn real_non_pkcs11_library() -> Option<PathBuf> {
    [
        "/lib/x86_64-linux-gnu/libz.so.1",
        "/usr/lib/x86_64-linux-gnu/libz.so.1",
        "/lib/aarch64-linux-gnu/libz.so.1",
        "/lib/x86_64-linux-gnu/libm.so.6",
    ]
    .iter()
    .map(Path::new)
    .find(|p| p.exists())
    .map(Path::to_path_buf)
}

/// The token goes away while the agent runs: its directory is moved out of SoftHSM's token
/// directory (SoftHSM then answers CKR_OBJECT_HANDLE_INVALID for the loaded key and
/// CKR_GENERAL_ERROR for token info — what a pulled HSM token looks like to the agent), and
/// later moved back. The same agent process must answer `backend_unavailable` in time while it
/// is gone and serve again once it is back, re-initialising the module by itself.
#[test]
fn token_removed_while_the_agent_runs_then_restored_serves_again() {
    let h = Hsm::new("removable");
    h.generate("p", "p256");
    let agent = h.agent();
    let mut c = agent.client();
    let pid = c.status().expect("status").pid;
    let v = public_verifier(&mut c, "p", "p256");
    let msg = b"before removal";
    let sig = c
        .sign(&key_name("p"), msg, None)
        .expect("sign before removal");
    v.verify("ecdsa-p256-sha256", msg, &unb64(&sig.signature))
        .expect("signature verifies with the key's public key");

    let tokens = h.home.path("tokens");
    let dirs: Vec<PathBuf> = fs::read_dir(&tokens)
        .expect("token dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(dirs.len(), 1, "one token directory expected: {dirs:?}");
    let away = h.home.path("token-away");
    fs::rename(&dirs[0], &away).expect("remove the token");

    // Gone: every answer is backend_unavailable, in time, and status says the token is down.
    for _ in 0..3 {
        expect_error(&mut c, "p", "backend_unavailable");
    }
    let st = c.status().expect("status while gone");
    let tok = st
        .backends
        .iter()
        .find(|b| b.kind == "pkcs11:tok")
        .expect("token backend in status");
    assert!(!tok.up, "token reported up while removed: {tok:?}");

    fs::rename(&away, &dirs[0]).expect("restore the token");
    let deadline = Instant::now() + Duration::from_secs(15);
    let msg = b"after restore";
    let sig = loop {
        match c.sign(&key_name("p"), msg, None) {
            Ok(s) => break s,
            Err(e) => {
                assert_eq!(e.code(), "backend_unavailable", "{e}");
                assert!(Instant::now() < deadline, "token not served again: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    v.verify("ecdsa-p256-sha256", msg, &unb64(&sig.signature))
        .expect("signature verifies with the key's public key");
    assert_eq!(
        c.status().expect("status").pid,
        pid,
        "the agent was restarted"
    );
}

/// A key made by another tool (OpenSC's pkcs11-tool) is adopted with the CLI, by label and
/// by id, and signs through the agent for the public key pkcs11-tool created.
#[test]
fn a_pkcs11_tool_key_is_adopted_through_the_cli_and_signs() {
    let h = Hsm::new("adopt");
    let out = std::process::Command::new("pkcs11-tool")
        .args([
            "--module",
            "/usr/lib/softhsm/libsofthsm2.so",
            "--token-label",
            "adopt",
            "--login",
            "--pin",
            USER_PIN,
            "--keypairgen",
            "--key-type",
            "EC:prime256v1",
            "--label",
            "made-elsewhere",
            "--id",
            "0a0b",
        ])
        .env("SOFTHSM2_CONF", &h.conf)
        .output()
        .expect("pkcs11-tool runs (opensc is installed by scripts/setup.sh)");
    assert!(
        out.status.success(),
        "pkcs11-tool keypairgen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    h.ok(&[
        "key",
        "adopt",
        "by-label",
        "--backend",
        "pkcs11",
        "--token",
        "tok",
        "--label",
        "made-elsewhere",
    ]);
    h.ok(&[
        "key",
        "adopt",
        "by-id",
        "--backend",
        "pkcs11",
        "--token",
        "tok",
        "--id",
        "0a0b",
    ]);
    // Adopting what is not there is an error naming it, and leaves no key behind.
    let missing = h.run(&[
        "key",
        "adopt",
        "nothing",
        "--backend",
        "pkcs11",
        "--token",
        "tok",
        "--label",
        "absent",
    ]);
    assert!(!missing.success(), "adopting a missing object succeeded");
    assert!(!h.home.home.join("keys/nothing.toml").exists());

    let agent = h.agent();
    let mut c = agent.client();
    let a = public_verifier(&mut c, "by-label", "p256");
    let b = c.public_key(&key_name("by-id"), "hex").expect("public key");
    let a_hex = c
        .public_key(&key_name("by-label"), "hex")
        .expect("public key");
    assert_eq!(
        a_hex.public_key, b.public_key,
        "both names adopt one object"
    );
    for name in ["by-label", "by-id"] {
        let msg = format!("adopted {name}");
        let sig = c
            .sign(&key_name(name), msg.as_bytes(), None)
            .expect("adopted key signs");
        a.verify("ecdsa-p256-sha256", msg.as_bytes(), &unb64(&sig.signature))
            .expect("adopted key's signature verifies with pkcs11-tool's public key");
    }
}
