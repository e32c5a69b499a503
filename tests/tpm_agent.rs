//! TPM keys through the REAL agent socket and the REAL CLI, each test with its own swtpm
//! (tests/common/swtpm.rs): keys generated, imported or adopted with `keyward key …
//! --backend tpm` sign through the agent and verify with independent verifiers (RustCrypto,
//! PSS salt exactly 32); swtpm killed and restarted under a running agent; a wrong auth value is
//! tried once; four clients share the TPM.
//!
//! The test process itself never opens a TPM connection (only the CLI and agent children do),
//! so its children cannot inherit TPM sockets; tpm2-tools run through the fixture, which closes
//! inherited descriptors anyway.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::Mac;
use serde_json::json;

use common::swtpm::Swtpm;
use common::verify::Verifier;
use common::{key_name, unb64, write_private, Agent, Output, TestHome};
use keyward::client::Client;
use keyward::Error;

/// Every failure must be answered within the device timeout (2 s default) plus slack for
/// the socket round trip.
const ANSWER_LIMIT: Duration = Duration::from_millis(2500);
/// The TPM alias every test configures.
const ALIAS: &str = "tpm0";

/// Binance's documented HMAC example (API docs, "SIGNED endpoint examples").
const BINANCE_SECRET: &str = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j";
const BINANCE_QUERY: &str = "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559";
const BINANCE_SIGNATURE: &str = "c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71";

/// A test home whose keyward.toml configures `[tpm.tpm0]` for a private swtpm.
struct Fixture {
    home: TestHome,
    tpm: Swtpm,
}

impl Fixture {
    fn new() -> Fixture {
        let f = Fixture {
            home: TestHome::new(),
            tpm: Swtpm::start(),
        };
        f.set_tpm_config("");
        f
    }

    /// Replace keyward.toml with `[tpm.tpm0]` for this swtpm plus `extra` lines.
    fn set_tpm_config(&self, extra: &str) {
        let text = format!("[tpm.{ALIAS}]\ntcti = \"{}\"\n{extra}", self.tpm.tcti());
        write_private(&self.home.home.join("keyward.toml"), text.as_bytes());
    }

    /// tpm2-tss prints its own errors on stderr while swtpm is down; keep logs readable.
    fn env() -> [(&'static str, &'static str); 1] {
        [("TSS2_LOG", "all+none")]
    }

    /// Run the CLI. swtpm has no resource manager (the kernel's /dev/tpmrm0 flushes a
    /// client's objects when it closes), so each CLI process must flush what it loaded before
    /// it exits (TpmBackend's Drop); otherwise a few commands fill swtpm's three transient
    /// slots and the agent fails — which these tests, running many commands, would show.
    fn run(&self, args: &[&str]) -> Output {
        self.home.run_full(args, None, &Fixture::env())
    }

    fn ok(&self, args: &[&str]) -> Output {
        let out = self.run(args);
        assert!(out.success(), "command failed:\n{out}");
        out
    }

    fn generate(&self, name: &str, key_type: &str) {
        self.ok(&[
            "key",
            "generate",
            name,
            "--type",
            key_type,
            "--backend",
            "tpm",
            "--token",
            ALIAS,
        ]);
    }

    fn agent(&self) -> Agent {
        self.home.agent_with_env(&Fixture::env())
    }

    /// Run a tpm2-tools program on this swtpm; panics unless it succeeds.
    fn tpm2(&self, program: &str, args: &[&str]) -> String {
        let out = self.tpm2_raw(program, args);
        assert!(out.success(), "{program} failed:\n{out}");
        out.stdout
    }

    fn tpm2_raw(&self, program: &str, args: &[&str]) -> Output {
        self.tpm.tpm2(program, args)
    }

    /// TPM2_PT_LOCKOUT_COUNTER: failed authorisations the TPM has counted.
    fn lockout_counter(&self) -> u64 {
        let out = self.tpm2("tpm2_getcap", &["properties-variable"]);
        let i = out
            .find("TPM2_PT_LOCKOUT_COUNTER")
            .expect("lockout counter in tpm2_getcap");
        let v = out[i..].split_whitespace().nth(1).expect("value");
        u64::from_str_radix(v.trim_start_matches("0x"), 16).expect("hex")
    }

    fn persistent_key(&self, alg: &str, handle: &str, extra: &[&str]) -> String {
        self.tpm.persistent_key(alg, handle, extra)
    }
}

fn public_verifier(c: &mut Client, name: &str, key_type: &str) -> Verifier {
    let pk = c.public_key(&key_name(name), "pem").expect("public_key");
    let pem = pk.public_key.as_str().expect("PEM string").to_string();
    Verifier::from_spki_pem(key_type, &pem)
}

/// Sign and require `code`, answered within the limit; returns the error.
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

fn tpm_status(c: &mut Client) -> keyward::proto::BackendStatus {
    c.status()
        .expect("status")
        .backends
        .into_iter()
        .find(|b| b.kind == format!("tpm:{ALIAS}"))
        .expect("the TPM in status")
}

/// Lines of the agent's log saying its TPM worker connected.
fn tpm_connects(agent: &Agent) -> usize {
    agent.log().matches("TPM connected").count()
}

/// openssl makes a private key PEM in `dir`; returns its path and the public key as SPKI PEM
/// (derived by openssl from the original, independent of keyward).
fn openssl_key(dir: &Path, name: &str, args: &[&str]) -> (PathBuf, String) {
    let pem = dir.join(format!("{name}.pem"));
    let pem_s = pem.to_str().expect("utf-8 path");
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["-out", pem_s]);
    common::swtpm::tool("openssl", &all);
    let spki = dir.join(format!("{name}.pub.pem"));
    common::swtpm::tool(
        "openssl",
        &[
            "pkey",
            "-in",
            pem_s,
            "-pubout",
            "-out",
            spki.to_str().expect("path"),
        ],
    );
    (pem, std::fs::read_to_string(&spki).expect("public PEM"))
}

/// RSA-2048 and P-256 generated in the TPM with the CLI sign through the agent: PKCS#1 v1.5
/// and PSS (salt exactly 32) verify with the rsa crate, ECDSA with the p256 crate. `token
/// list` shows the TPM's facts; `status` shows the TPM up; `key delete` removes the blob.
#[test]
fn generated_rsa_and_p256_sign_through_the_agent_and_verify() {
    let f = Fixture::new();
    f.generate("rsa", "rsa-2048");
    f.generate("ec", "p256");
    for name in ["rsa", "ec"] {
        assert!(
            f.home.keys_dir().join(format!("{name}.1.tpm")).is_file(),
            "no blob for {name}: {:?}",
            f.home.key_files()
        );
    }
    let list = f.ok(&["--json", "token", "list"]).json();
    let entry = list
        .as_array()
        .and_then(|a| a.iter().find(|e| e["tpm"] == ALIAS))
        .unwrap_or_else(|| panic!("no TPM in token list: {list}"));
    let s = &entry["summary"];
    assert_eq!(s["manufacturer"], "IBM", "{entry}");
    assert!(s["firmware_version"]
        .as_str()
        .is_some_and(|v| !v.is_empty()));
    for field in ["algorithms", "pcr_banks"] {
        assert!(
            s[field].as_array().is_some_and(|a| !a.is_empty()),
            "{field}: {entry}"
        );
    }
    assert!(s["pcr_banks"]
        .as_array()
        .is_some_and(|a| a.iter().any(|b| b == "sha256")));
    let text = f.ok(&["token", "list"]).stdout;
    assert!(
        text.contains("manufacturer IBM") && text.contains("pcr banks"),
        "{text}"
    );
    // A TPM nothing answers for is listed with its error; it does not hide the others.
    f.set_tpm_config("[tpm.gone]\ntcti = \"swtpm:host=127.0.0.1,port=9\"\n");
    let list = f.ok(&["--json", "token", "list"]).json();
    let gone = list
        .as_array()
        .and_then(|a| a.iter().find(|e| e["tpm"] == "gone"))
        .unwrap_or_else(|| panic!("no entry for the dead TPM: {list}"));
    assert_eq!(gone["error"]["code"], "backend_unavailable", "{gone}");
    assert!(list.as_array().is_some_and(|a| a
        .iter()
        .any(|e| e["tpm"] == ALIAS && e["summary"].is_object())));
    f.set_tpm_config("");

    let agent = f.agent();
    let mut c = agent.client();
    let status = tpm_status(&mut c);
    assert!(status.up, "{status:?}");
    let msg = b"GET /trade-api/v2/portfolio/balance";
    let rsa = public_verifier(&mut c, "rsa", "rsa-2048");
    for scheme in [
        "rsa-pkcs1-sha256",
        "rsa-pss-sha256",
        "rsa-pkcs1-sha512",
        "rsa-pss-sha512",
    ] {
        let r = c
            .sign(&key_name("rsa"), msg, Some(scheme))
            .unwrap_or_else(|e| panic!("rsa/{scheme}: {e}\n{}", agent.log()));
        rsa.verify_strict(scheme, msg, &unb64(&r.signature), scheme);
    }
    let ec = public_verifier(&mut c, "ec", "p256");
    let r = c.sign(&key_name("ec"), msg, None).expect("p256 signs");
    assert_eq!(r.scheme, "ecdsa-p256-sha256");
    let sig = unb64(&r.signature);
    ec.verify_strict("ecdsa-p256-sha256", msg, &sig, "p256");
    let parsed = p256::ecdsa::Signature::from_slice(&sig).expect("raw r||s");
    assert!(parsed.normalize_s().is_none(), "high s from the agent");
    // Schemes that do not fit the key are refused before the TPM is asked.
    let e = c
        .sign(&key_name("ec"), msg, Some("rsa-pss-sha256"))
        .expect_err("rsa scheme on a p256 key");
    assert_eq!(e.code(), "bad_request", "{e}");

    // Deleting a TPM key removes its blob (the TPM keeps no copy).
    f.ok(&["key", "delete", "ec", "--yes"]);
    assert!(!f.home.keys_dir().join("ec.1.tpm").exists());
    let e = c.sign(&key_name("ec"), msg, None).expect_err("deleted key");
    assert_eq!(e.code(), "unknown_key", "{e}");
}

/// The Binance documentation secret, imported into the TPM with `--shred`, gives the
/// documented tag through the agent (and the same as a software HMAC); the source file is
/// gone. A TPM HMAC key is bound to its digest: hmac-sha512 is refused, naming why (D14).
#[test]
fn hmac_import_gives_the_binance_documentation_tag() {
    let f = Fixture::new();
    let src = f.home.path("binance-secret");
    write_private(&src, BINANCE_SECRET.as_bytes());
    let out = f.ok(&[
        "--json",
        "key",
        "import",
        "binance",
        "--type",
        "hmac-sha256",
        "--file",
        src.to_str().expect("path"),
        "--backend",
        "tpm",
        "--token",
        ALIAS,
        "--api-key",
        "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A",
        "--shred",
    ]);
    assert_eq!(out.json()["shredded"], true, "{out}");
    assert!(!src.exists(), "the secret file was not shredded");
    assert!(f.home.keys_dir().join("binance.1.tpm").is_file());

    let agent = f.agent();
    let mut c = agent.client();
    let r = c
        .sign(&key_name("binance"), BINANCE_QUERY.as_bytes(), None)
        .unwrap_or_else(|e| panic!("hmac: {e}\n{}", agent.log()));
    let tag = hex::encode(unb64(&r.signature));
    assert_eq!(tag, BINANCE_SIGNATURE);
    let mut soft =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(BINANCE_SECRET.as_bytes()).expect("hmac key");
    soft.update(BINANCE_QUERY.as_bytes());
    assert_eq!(tag, hex::encode(soft.finalize().into_bytes()));

    let e = c
        .sign(&key_name("binance"), b"x", Some("hmac-sha512"))
        .expect_err("a TPM hmac-sha256 key must not sign hmac-sha512");
    assert_eq!(e.code(), "unsupported", "{e}");
    assert!(e.to_string().contains("bound to its digest"), "{e}");
}

/// A Kalshi-style RSA PEM made by openssl is imported into the TPM (`--profile kalshi
/// --api-key X --shred`); `sign_request` builds the Kalshi headers, and the base64 signature
/// verifies as PSS-SHA256 with salt 32 over `payload` under the ORIGINAL PEM's public key.
#[test]
fn kalshi_pem_import_signs_a_request_for_the_original_key() {
    let f = Fixture::new();
    let (pem, public_pem) = openssl_key(
        f.home.dir.path(),
        "kalshi",
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ],
    );
    let out = f.ok(&[
        "--json",
        "key",
        "import",
        "kalshi",
        "--file",
        pem.to_str().expect("path"),
        "--backend",
        "tpm",
        "--token",
        ALIAS,
        "--profile",
        "kalshi",
        "--api-key",
        "X",
        "--shred",
    ]);
    assert_eq!(out.json()["type"], "rsa-2048", "{out}");
    assert_eq!(out.json()["shredded"], true, "{out}");
    assert!(!pem.exists(), "the PEM was not shredded");
    let blob: serde_json::Value = serde_json::from_slice(
        &std::fs::read(f.home.keys_dir().join("kalshi.1.tpm")).expect("blob"),
    )
    .expect("blob JSON");
    assert_eq!(blob["imported"], true);

    let agent = f.agent();
    let mut c = agent.client();
    let original = Verifier::from_spki_pem("rsa-2048", &public_pem);
    // The agent reports the original key's public key.
    assert_eq!(
        public_verifier(&mut c, "kalshi", "rsa-2048").raw(),
        original.raw()
    );
    let out = c
        .sign_request(
            &key_name("kalshi"),
            "kalshi",
            json!({"method":"GET","path":"/trade-api/v2/portfolio/balance"}),
        )
        .unwrap_or_else(|e| panic!("sign_request: {e}\n{}", agent.log()));
    let payload = out["payload"].as_str().expect("payload");
    assert!(
        payload.ends_with("GET/trade-api/v2/portfolio/balance"),
        "{out}"
    );
    let sig = unb64(out["signature"].as_str().expect("signature"));
    original.verify_strict(
        "rsa-pss-sha256",
        payload.as_bytes(),
        &sig,
        "Kalshi request signed in the TPM",
    );
    assert!(
        out.to_string().contains("KALSHI-ACCESS-KEY") && out.to_string().contains("\"X\""),
        "the headers lack the API key: {out}"
    );
}

/// A persistent key made with tpm2-tools is adopted with the CLI by handle and signs through
/// the agent for the public key tpm2-tools reports. Adopting an empty handle, a malformed
/// handle or with pkcs11 options is refused and leaves no key.
#[test]
fn tpm2_tools_persistent_key_is_adopted_via_the_cli_and_signs() {
    let f = Fixture::new();
    let rsa_pem = f.persistent_key("rsa2048", "0x81000001", &[]);
    let ec_pem = f.persistent_key("ecc256", "0x81000002", &[]);
    let adopt = |name: &str, extra: &[&str]| {
        let mut args = vec!["key", "adopt", name, "--backend", "tpm", "--token", ALIAS];
        args.extend_from_slice(extra);
        f.run(&args)
    };
    adopt("adopted-rsa", &["--handle", "0x81000001"]).expect_success();
    adopt("adopted-ec", &["--handle", "0x81000002"]).expect_success();
    adopt("none", &["--handle", "0x81000003"]).assert_error("unknown_key");
    adopt("bad", &["--handle", "0x8100zz"]).assert_error("bad_request");
    adopt("transient", &["--handle", "0x80000000"]).assert_error("bad_request");
    let mixed = adopt("mixed", &["--handle", "0x81000001", "--id", "0a"]);
    assert!(!mixed.success(), "adopt with --handle and --id:\n{mixed}");
    let no_handle = adopt("nohandle", &[]);
    assert!(!no_handle.success(), "adopt without a handle:\n{no_handle}");
    for gone in ["none", "bad", "transient", "mixed", "nohandle"] {
        assert!(
            !f.home.home.join(format!("keys/{gone}.toml")).exists(),
            "{gone} left metadata"
        );
    }
    let show = f.ok(&["--json", "key", "show", "adopted-rsa"]).json();
    assert_eq!(show["backend"], "tpm", "{show}");
    assert_eq!(show["type"], "rsa-2048", "{show}");

    let agent = f.agent();
    let mut c = agent.client();
    let rsa = Verifier::from_spki_pem("rsa-2048", &rsa_pem);
    for scheme in ["rsa-pss-sha256", "rsa-pkcs1-sha256"] {
        let msg = format!("adopted {scheme}");
        let r = c
            .sign(&key_name("adopted-rsa"), msg.as_bytes(), Some(scheme))
            .unwrap_or_else(|e| panic!("adopted rsa {scheme}: {e}\n{}", agent.log()));
        rsa.verify_strict(scheme, msg.as_bytes(), &unb64(&r.signature), scheme);
    }
    let ec = Verifier::from_spki_pem("p256", &ec_pem);
    let r = c
        .sign(&key_name("adopted-ec"), b"adopted ec", None)
        .expect("adopted ec signs");
    ec.verify_strict(
        "ecdsa-p256-sha256",
        b"adopted ec",
        &unb64(&r.signature),
        "adopted p256",
    );
    // Forgetting an adopted key leaves the TPM object alone.
    f.ok(&["key", "delete", "adopted-ec", "--yes"]);
    f.tpm2("tpm2_readpublic", &["-c", "0x81000002"]);
}

/// swtpm stopped (hung) and then killed while clients sign: every request is answered
/// (signature or `backend_unavailable`) within the device timeout, none hangs; `status` shows
/// the TPM down; swtpm restarted with the same state: the SAME agent process signs again with
/// the same blobs.
#[test]
fn swtpm_hung_or_killed_mid_run_answers_in_time_and_the_agent_serves_again() {
    let mut f = Fixture::new();
    f.generate("ec", "p256");
    f.generate("rsa", "rsa-2048");
    f.home.generate("soft-ed", "ed25519");
    let agent = f.agent();
    let mut c = agent.client();
    let pid = c.status().expect("status").pid;
    let v = public_verifier(&mut c, "ec", "p256");

    // A TPM that hangs (swtpm stopped, its socket open): answers come after the device
    // timeout (2 s), not never; once it resumes, the agent serves again.
    let swtpm_pid = f.tpm.pid().expect("swtpm runs");
    c.sign(&key_name("ec"), b"warm", None).expect("sign before");
    common::signal(swtpm_pid, libc::SIGSTOP);
    for _ in 0..2 {
        // A lone request may be signed on its connection's thread, which the hung TPM then
        // holds: the watchdog answers it and closes that connection (D14). So each try uses
        // a connection of its own; `c` stays for after the resume.
        let mut hung = agent.client();
        let t = Instant::now();
        let e = hung
            .sign(&key_name("ec"), b"hung", None)
            .expect_err("a hung TPM cannot sign");
        let took = t.elapsed();
        eprintln!("hung swtpm: answered {} after {took:?}", e.code());
        assert_eq!(e.code(), "backend_unavailable", "{e}");
        assert!(took < ANSWER_LIMIT, "a request to a hung TPM took {took:?}");
    }
    common::signal(swtpm_pid, libc::SIGCONT);
    let resumed = Instant::now();
    loop {
        match c.sign(&key_name("ec"), b"resumed", None) {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.code(), "backend_unavailable", "{e}");
                assert!(
                    resumed.elapsed() < Duration::from_secs(40),
                    "not served after swtpm resumed: {e}\n{}",
                    agent.log()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    eprintln!("served again {:?} after swtpm resumed", resumed.elapsed());

    // A client signing continuously while swtpm dies under it.
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (sock, stop, v) = (agent.sock.clone(), stop.clone(), v.clone());
        std::thread::spawn(move || -> (u64, u64, Duration) {
            let mut c = Client::connect(&sock).expect("connect");
            c.set_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            let (mut ok, mut down, mut slowest) = (0u64, 0u64, Duration::ZERO);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let msg = format!("request {n}");
                n += 1;
                let t = Instant::now();
                let r = c.sign(&key_name("ec"), msg.as_bytes(), None);
                slowest = slowest.max(t.elapsed());
                match r {
                    Ok(s) => {
                        v.verify("ecdsa-p256-sha256", msg.as_bytes(), &unb64(&s.signature))
                            .unwrap_or_else(|e| panic!("{msg}: {e}"));
                        ok += 1;
                    }
                    Err(e) => {
                        assert_eq!(e.code(), "backend_unavailable", "{msg}: {e}");
                        down += 1;
                    }
                }
            }
            (ok, down, slowest)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    f.tpm.stop();

    let mut worst = Duration::ZERO;
    for i in 0..5 {
        let t = Instant::now();
        expect_error(&mut c, "ec", "backend_unavailable");
        let e = c
            .sign(&key_name("rsa"), b"x", Some("rsa-pss-sha256"))
            .expect_err("rsa while swtpm is down");
        assert_eq!(e.code(), "backend_unavailable", "request {i}: {e}");
        worst = worst.max(t.elapsed() / 2);
    }
    // Other backends keep working.
    c.sign(&key_name("soft-ed"), b"m", None)
        .expect("soft keys work while the TPM is down");
    let st = tpm_status(&mut c);
    assert!(
        !st.up,
        "status shows the TPM up after swtpm was killed: {st:?}"
    );
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (ok, down, slowest) = worker.join().expect("signing client");
    eprintln!(
        "swtpm killed: slowest answer of the busy client {slowest:?} ({ok} signed, {down} backend_unavailable); worst answer after the kill {worst:?}; measured over {:?}",
        killed.elapsed()
    );
    assert!(ok > 0 && down > 0, "ok {ok}, down {down}");
    assert!(slowest < ANSWER_LIMIT, "a request took {slowest:?}");

    f.tpm.restart();
    let back = Instant::now();
    let msg = b"after restart";
    let sig = loop {
        let t = Instant::now();
        match c.sign(&key_name("ec"), msg, None) {
            Ok(s) => break s,
            Err(e) => {
                assert_eq!(e.code(), "backend_unavailable", "{e}");
                assert!(t.elapsed() < ANSWER_LIMIT, "took {:?}", t.elapsed());
                assert!(
                    back.elapsed() < Duration::from_secs(40),
                    "the TPM was not served again: {e}\n{}",
                    agent.log()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    eprintln!("served again {:?} after swtpm restarted", back.elapsed());
    v.verify_strict("ecdsa-p256-sha256", msg, &unb64(&sig.signature), "after");
    let rsa = public_verifier(&mut c, "rsa", "rsa-2048");
    let r = c
        .sign(&key_name("rsa"), msg, Some("rsa-pss-sha256"))
        .expect("rsa after restart");
    rsa.verify_strict("rsa-pss-sha256", msg, &unb64(&r.signature), "rsa after");
    assert!(tpm_status(&mut c).up);
    assert_eq!(c.status().expect("status").pid, pid, "the agent restarted");
}

/// A persistent key with an auth value and a wrong `key_auth`: the first request is a clear
/// `bad_passphrase`, later ones `backend_unavailable` naming `keyward reload` without asking
/// the TPM again — the TPM's lockout counter moves by exactly one. Each reload tries a refused
/// auth once more (never more); fixing the source and reloading signs. A reload with an
/// unchanged config keeps a healthy TPM backend (no new connection); a changed one replaces it.
#[test]
fn wrong_auth_is_reported_once_and_never_retried_and_reload_recovers() {
    let f = Fixture::new();
    f.persistent_key("ecc256", "0x81000010", &["-p", "right-auth"]);
    let auth_file = f.home.path("tpm-key-auth");
    write_private(&auth_file, b"wrong-auth");
    f.set_tpm_config(&format!("key_auth = \"file:{}\"\n", auth_file.display()));
    // Reading the public area needs no auth: adoption works with any key_auth.
    f.ok(&[
        "key",
        "adopt",
        "authed",
        "--backend",
        "tpm",
        "--token",
        ALIAS,
        "--handle",
        "0x81000010",
    ]);
    f.home.generate("soft-ed", "ed25519");
    let before = f.lockout_counter();

    let agent = f.agent();
    let mut c = agent.client();
    let e = expect_error(&mut c, "authed", "bad_passphrase");
    assert!(e.to_string().contains("rejected the auth value"), "{e}");
    for _ in 0..5 {
        let t = Instant::now();
        let e = expect_error(&mut c, "authed", "backend_unavailable");
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "a refused backend must answer without the TPM"
        );
        assert!(e.to_string().contains("keyward reload"), "{e}");
    }
    c.sign(&key_name("soft-ed"), b"m", None)
        .expect("other keys keep working");
    let st = tpm_status(&mut c);
    assert!(!st.up, "{st:?}");
    assert!(
        st.detail
            .as_deref()
            .is_some_and(|d| d.contains("rejected the auth value")),
        "{st:?}"
    );
    assert_eq!(
        f.lockout_counter(),
        before + 1,
        "the agent retried a wrong auth value\n{}",
        agent.log()
    );

    // A reload without fixing anything tries the auth once more (the operator asked for it)
    // but never more than once per reload.
    f.ok(&["reload"]);
    expect_error(&mut c, "authed", "bad_passphrase");
    expect_error(&mut c, "authed", "backend_unavailable");
    assert_eq!(f.lockout_counter(), before + 2);

    write_private(&auth_file, b"right-auth");
    f.ok(&["reload"]);
    let v = {
        let pem = std::fs::read_to_string(f.tpm.dir().join("0x81000010.pem")).expect("pem");
        Verifier::from_spki_pem("p256", &pem)
    };
    let r = c
        .sign(&key_name("authed"), b"fixed", None)
        .unwrap_or_else(|e| panic!("after fixing key_auth: {e}\n{}", agent.log()));
    v.verify_strict("ecdsa-p256-sha256", b"fixed", &unb64(&r.signature), "fixed");
    assert!(tpm_status(&mut c).up);
    assert_eq!(f.lockout_counter(), before + 2, "the right auth counted");

    // An unchanged config keeps the backend (and its connection); a changed one replaces it.
    let connects = tpm_connects(&agent);
    f.ok(&["reload"]);
    c.sign(&key_name("authed"), b"kept", None)
        .expect("after a no-op reload");
    assert_eq!(
        tpm_connects(&agent),
        connects,
        "a reload with an unchanged config reconnected\n{}",
        agent.log()
    );
    f.set_tpm_config(&format!(
        "key_auth = \"file:{}\"\ntimeout_ms = 3000\n",
        auth_file.display()
    ));
    f.ok(&["reload"]);
    c.sign(&key_name("authed"), b"replaced", None)
        .expect("after a reload with a changed config");
    assert!(
        tpm_connects(&agent) > connects,
        "a changed config kept the old backend\n{}",
        agent.log()
    );
}

/// Four clients sign through the agent for 10 s (RSA-2048 PSS and P-256 alternately, all
/// through the TPM's one worker): every signature verifies, nothing times out.
#[test]
fn four_clients_for_ten_seconds_every_signature_verifies() {
    let f = Fixture::new();
    f.generate("rsa", "rsa-2048");
    f.generate("ec", "p256");
    let agent = f.agent();
    let (vr, ve) = {
        let mut c = agent.client();
        (
            public_verifier(&mut c, "rsa", "rsa-2048"),
            public_verifier(&mut c, "ec", "p256"),
        )
    };
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(10);
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let sock = agent.sock.clone();
            let (stop, ok, vr, ve) = (stop.clone(), ok.clone(), vr.clone(), ve.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let mut c = Client::connect(&sock).map_err(|e| e.to_string())?;
                c.set_timeout(Some(Duration::from_secs(30)))
                    .map_err(|e| e.to_string())?;
                let mut n = 0u64;
                while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                    let msg = format!("client {i} request {n}");
                    let (key, scheme, v) = if n.is_multiple_of(2) {
                        ("rsa", "rsa-pss-sha256", &vr)
                    } else {
                        ("ec", "ecdsa-p256-sha256", &ve)
                    };
                    let r = c
                        .sign(&key_name(key), msg.as_bytes(), Some(scheme))
                        .map_err(|e| format!("client {i} #{n}: {} {e}", e.code()))?;
                    v.verify(scheme, msg.as_bytes(), &unb64(&r.signature))
                        .map_err(|e| format!("client {i} #{n} {scheme}: {e}"))?;
                    n += 1;
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    let mut errors = Vec::new();
    for h in handles {
        if let Err(e) = h.join().expect("client thread") {
            stop.store(true, Ordering::Relaxed);
            errors.push(e);
        }
    }
    let total = ok.load(Ordering::Relaxed);
    eprintln!(
        "4 clients, 10 s, TPM RSA-PSS + P-256: {total} signatures ({}/s)",
        total / 10
    );
    assert!(errors.is_empty(), "errors: {errors:?}\n{}", agent.log());
    assert!(total > 100, "only {total} signatures in 10 s");
}
