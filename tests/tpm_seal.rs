//! TPM-sealed identity (issue 6, point 2) against a REAL swtpm: `init --seal-to-tpm` and
//! `identity seal` write identity.tpm; the agent then starts with no passphrase source, no
//! passphrase environment and stdin closed, and signs with soft keys; against another TPM
//! (other seeds), an absent TPM or changed PCRs it refuses to start with a message naming
//! `--passphrase`, and with `--passphrase` it still starts.
//!
//! Each test has its own swtpm(s) and home. Only child processes talk to the TPM here.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::swtpm::Swtpm;
use common::verify::Verifier;
use common::{key_name, unb64, AgentProcess, TestHome, CALL_TIMEOUT};
use keyward::client::Client;

/// How long a refusing agent may take to exit (it must not hang on a missing TPM).
const REFUSE_LIMIT: Duration = Duration::from_secs(20);
const READY_LIMIT: Duration = Duration::from_secs(20);
const ALIAS: &str = "host";

/// `keyward agent --foreground` with NO passphrase option, stdin closed, and no passphrase
/// in the environment (TestHome::command removes KEYWARD_PASSPHRASE).
fn spawn_unattended(h: &TestHome, log_prefix: &str) -> AgentProcess {
    let stdout_path = h.path(&format!("{log_prefix}.stdout"));
    let stderr_path = h.path(&format!("{log_prefix}.stderr"));
    let mut c = h.command();
    c.args(["agent", "--foreground"])
        // tpm2-tss logs its own connection errors; the agent's message is what matters.
        .env("TSS2_LOG", "all+none")
        .stdin(Stdio::null())
        .stdout(fs::File::create(&stdout_path).expect("agent stdout file"))
        .stderr(fs::File::create(&stderr_path).expect("agent stderr file"));
    let child = c.spawn().expect("spawning keyward agent");
    AgentProcess {
        child,
        stdout_path,
        stderr_path,
    }
}

/// Wait until the agent answers `status`; panics (with its log) if it exits or times out.
fn wait_ready(h: &TestHome, p: &mut AgentProcess) -> Client {
    let deadline = Instant::now() + READY_LIMIT;
    loop {
        if let Some(st) = p.child.try_wait().expect("try_wait") {
            panic!("the agent exited during start-up with {st}\n{}", p.log());
        }
        if let Ok(mut c) = Client::connect(&h.sock) {
            c.set_timeout(Some(CALL_TIMEOUT)).expect("timeout");
            if c.status().is_ok() {
                return c;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not answer within {READY_LIMIT:?}\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The agent must exit non-zero by itself, quickly, saying why and naming `--passphrase`.
fn assert_refuses(h: &TestHome, prefix: &str, code: &str, why: &str) {
    let mut p = spawn_unattended(h, prefix);
    let st = p.wait_exit(REFUSE_LIMIT);
    let Some(st) = st else {
        p.terminate();
        panic!(
            "the agent neither started nor refused within {REFUSE_LIMIT:?}\n{}",
            p.log()
        );
    };
    assert!(!st.success(), "the agent exited 0\n{}", p.log());
    let err = p.stderr();
    assert!(
        err.contains(&format!("error[{code}]")),
        "expected error[{code}]\n{}",
        p.log()
    );
    assert!(err.contains(why), "expected {why:?} in\n{}", p.log());
    assert!(
        err.contains("--passphrase"),
        "the message must name the --passphrase fallback\n{}",
        p.log()
    );
    assert!(
        !h.sock.exists() || Client::connect(&h.sock).is_err(),
        "a refusing agent must not serve"
    );
}

/// Sign with `key` and verify with an independent verifier built from the agent's public key.
fn sign_and_verify(c: &mut Client, key: &str, key_type: &str) {
    let pk = c.public_key(&key_name(key), "pem").expect("public_key");
    let pem = pk.public_key.as_str().expect("pem string");
    let v = Verifier::from_spki_der(key_type, &common::verify::pem_to_der(pem, "PUBLIC KEY"));
    let msg = b"GET /trade-api/v2/portfolio/balance 1700000000000";
    let r = c.sign(&key_name(key), msg, None).expect("sign");
    v.verify_strict(&r.scheme, msg, &unb64(&r.signature), key);
}

/// The agent starts with no passphrase input and its Ed25519 key `ed` signs (verified).
fn starts_unattended_and_signs(h: &TestHome, log_prefix: &str) {
    let mut p = spawn_unattended(h, log_prefix);
    let mut c = wait_ready(h, &mut p);
    sign_and_verify(&mut c, "ed", "ed25519");
    drop(c);
    p.terminate();
}

/// A home initialised with `init --seal-to-tpm host --tpm-tcti <tpm>`.
fn sealed_home(tpm: &Swtpm) -> TestHome {
    let h = TestHome::uninitialized();
    let tcti = tpm.tcti();
    let out = h.run(&[
        "init",
        "--passphrase",
        &h.pass_source(),
        "--kdf-work-factor",
        "10",
        "--seal-to-tpm",
        ALIAS,
        "--tpm-tcti",
        &tcti,
    ]);
    assert!(out.success(), "init --seal-to-tpm failed:\n{out}");
    assert!(out.stdout.contains("sealed to TPM `host`"), "{out}");
    h
}

fn set_tcti(h: &TestHome, from: &str, to: &str) {
    let p = h.home.join("keyward.toml");
    let text = fs::read_to_string(&p).expect("keyward.toml");
    assert!(text.contains(from), "keyward.toml has no {from}:\n{text}");
    fs::write(&p, text.replace(from, to)).expect("writing keyward.toml");
}

#[test]
fn init_seal_to_tpm_starts_the_agent_without_passphrase_and_signs() {
    let tpm = Swtpm::start();
    let h = sealed_home(&tpm);

    // identity.tpm: private, JSON naming the TPM; identity.age stays for recovery.
    let sealed = h.home.join("identity.tpm");
    let mode = fs::metadata(&sealed)
        .expect("identity.tpm")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "identity.tpm mode {mode:o}");
    let blob: serde_json::Value =
        serde_json::from_slice(&fs::read(&sealed).expect("read")).expect("identity.tpm is JSON");
    assert_eq!(blob["tpm"], ALIAS);
    assert_eq!(blob["format"], "keyward-tpm-sealed-identity");
    assert!(h.home.join("identity.age").is_file());
    let config = fs::read_to_string(h.home.join("keyward.toml")).expect("config");
    assert!(config.contains("[tpm.host]") && config.contains(&tpm.tcti()));
    // The secret is not in the file (only TPM-encrypted blobs).
    let secret_file = fs::read_to_string(&sealed).expect("read");
    assert!(!secret_file.contains("AGE-SECRET-KEY"));

    h.generate("ed", "ed25519");
    h.generate("p256", "p256");
    let hmac = common::random_bytes(32);
    h.import_ok("hm", Some("hmac-sha256"), &hmac);

    h.ok(&["identity", "unseal-check"]);

    let mut p = spawn_unattended(&h, "unattended");
    let mut c = wait_ready(&h, &mut p);
    sign_and_verify(&mut c, "ed", "ed25519");
    sign_and_verify(&mut c, "p256", "p256");
    // HMAC: the tag equals a software HMAC of the imported secret.
    let r = c
        .sign(&key_name("hm"), b"symbol=BTCUSDT", None)
        .expect("hmac");
    use hmac::Mac;
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(&hmac).expect("hmac key");
    m.update(b"symbol=BTCUSDT");
    assert_eq!(unb64(&r.signature), m.finalize().into_bytes().to_vec());
    drop(c);
    assert!(
        p.stderr().contains("identity unsealed by the TPM"),
        "{}",
        p.log()
    );
    p.terminate();

    // An explicit passphrase source still works (and is then what is used).
    let a = h.agent();
    sign_and_verify(&mut a.client(), "ed", "ed25519");
    assert!(!a.log().contains("identity unsealed by the TPM"));
}

#[test]
fn another_tpm_or_no_tpm_refuses_with_the_passphrase_fallback() {
    let tpm = Swtpm::start();
    let h = sealed_home(&tpm);
    h.generate("ed", "ed25519");

    // Another swtpm: other seeds, so the storage key differs and the blob does not load.
    let other = Swtpm::start();
    set_tcti(&h, &tpm.tcti(), &other.tcti());
    assert_refuses(&h, "other", "backend_unavailable", "sealed by another TPM");
    let out = h.run(&["identity", "unseal-check"]);
    out.assert_error("backend_unavailable");

    // With the passphrase the agent starts on the other TPM's host all the same.
    {
        let a = h.agent();
        sign_and_verify(&mut a.client(), "ed", "ed25519");
    }

    // The TPM is absent (stopped): refused quickly, no hang.
    drop(other);
    let start = Instant::now();
    assert_refuses(&h, "absent", "backend_unavailable", "unreachable");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );

    // Back on the original TPM: unattended again.
    let now = fs::read_to_string(h.home.join("keyward.toml")).expect("config");
    let cur = now
        .lines()
        .find(|l| l.starts_with("tcti = "))
        .expect("tcti line")
        .trim_start_matches("tcti = ")
        .trim_matches('"')
        .to_string();
    set_tcti(&h, &cur, &tpm.tcti());
    starts_unattended_and_signs(&h, "back");
}

#[test]
fn identity_seal_on_an_existing_home_binds_to_pcrs() {
    let tpm = Swtpm::start();
    let h = TestHome::new();
    h.generate("ed", "ed25519");
    let tcti = tpm.tcti();
    let out = h.run(&[
        "--json",
        "identity",
        "seal",
        "--tpm",
        ALIAS,
        "--tpm-tcti",
        &tcti,
        "--pcrs",
        "sha256:0,7",
        "--passphrase",
        &h.pass_source(),
    ]);
    assert!(out.success(), "identity seal failed:\n{out}");
    assert_eq!(out.json()["pcrs"], "sha256:0,7");
    h.ok(&["identity", "unseal-check"]);
    {
        let mut p = spawn_unattended(&h, "pcr-ok");
        let mut c = wait_ready(&h, &mut p);
        sign_and_verify(&mut c, "ed", "ed25519");
        drop(c);
        p.terminate();
    }

    // A measured change (PCR 7 extended, as a Secure Boot change would): refused.
    let ext = tpm.tpm2(
        "tpm2_pcrextend",
        &[&format!("7:sha256={}", "ab".repeat(32))],
    );
    assert!(ext.success(), "tpm2_pcrextend failed:\n{ext}");
    h.run(&["identity", "unseal-check"])
        .assert_error("backend_unavailable");
    assert_refuses(
        &h,
        "pcr-changed",
        "backend_unavailable",
        "PCR values differ",
    );

    // Reseal (with the passphrase) to the new values: unattended again.
    let out = h.run(&[
        "identity",
        "seal",
        "--tpm",
        ALIAS,
        "--pcrs",
        "sha256:0,7",
        "--passphrase",
        &h.pass_source(),
    ]);
    assert!(out.success(), "reseal failed:\n{out}");
    starts_unattended_and_signs(&h, "resealed");
}

#[test]
fn seal_refuses_a_wrong_passphrase_and_a_bad_pcr_list() {
    let tpm = Swtpm::start();
    let h = TestHome::new();
    let bad = h.path("bad-pass");
    common::write_private(&bad, b"not the passphrase\n");
    let tcti = tpm.tcti();
    let out = h.run(&[
        "identity",
        "seal",
        "--tpm",
        ALIAS,
        "--tpm-tcti",
        &tcti,
        "--passphrase",
        &format!("file:{}", bad.display()),
    ]);
    out.assert_error("bad_passphrase");
    assert!(!h.home.join("identity.tpm").exists());
    let out = h.run(&[
        "identity",
        "seal",
        "--tpm",
        ALIAS,
        "--tpm-tcti",
        &tcti,
        "--pcrs",
        "sha256:31",
        "--passphrase",
        &h.pass_source(),
    ]);
    out.assert_error("bad_request");
    // No seal: the agent keeps needing its passphrase (and says so).
    let mut p = spawn_unattended(&h, "nosseal");
    let st = p
        .wait_exit(REFUSE_LIMIT)
        .expect("agent exits without a terminal");
    assert!(!st.success());
    assert!(p.stderr().contains("error[bad_passphrase]"), "{}", p.log());
}

#[test]
fn a_failed_init_seal_writes_nothing_and_can_be_retried() {
    let gone = Swtpm::start();
    let dead_tcti = gone.tcti();
    drop(gone);
    let h = TestHome::uninitialized();
    let init = |tcti: &str| {
        h.run(&[
            "init",
            "--passphrase",
            &h.pass_source(),
            "--kdf-work-factor",
            "10",
            "--seal-to-tpm",
            ALIAS,
            "--tpm-tcti",
            tcti,
        ])
    };
    let out = init(&dead_tcti);
    out.assert_error("backend_unavailable");
    assert!(out.stderr.contains("unreachable"), "{out}");
    for f in [
        "identity.age",
        "identity.pub",
        "identity.tpm",
        "keyward.toml",
    ] {
        assert!(!h.home.join(f).exists(), "{f} written by a failed init");
    }
    let tpm = Swtpm::start();
    init(&tpm.tcti()).expect_success();
    h.ok(&["identity", "unseal-check"]);

    // identity.tpm readable by others is refused like identity.age would be.
    let sealed = h.home.join("identity.tpm");
    fs::set_permissions(&sealed, fs::Permissions::from_mode(0o644)).expect("chmod");
    assert_refuses(&h, "loose", "insecure_permissions", "identity.tpm");
}

/// `keyward agent` (background mode) on a sealed home: no prompt, no passphrase handed to the
/// daemon, which unseals by itself.
#[test]
fn the_background_agent_starts_unattended_on_a_sealed_home() {
    let tpm = Swtpm::start();
    let h = sealed_home(&tpm);
    h.generate("ed", "ed25519");
    let mut c = h.command();
    c.arg("agent")
        .env("TSS2_LOG", "all+none")
        .stdin(Stdio::null())
        .stdout(fs::File::create(h.path("bg.stdout")).expect("stdout file"))
        .stderr(fs::File::create(h.path("bg.stderr")).expect("stderr file"));
    let status = c.status().expect("running keyward agent");
    let printed = || {
        format!(
            "{}{}",
            fs::read_to_string(h.path("bg.stdout")).unwrap_or_default(),
            fs::read_to_string(h.path("bg.stderr")).unwrap_or_default()
        )
    };
    assert!(status.success(), "background start failed: {}", printed());
    let mut client = Client::connect(&h.sock).expect("the background agent answers");
    client.set_timeout(Some(CALL_TIMEOUT)).expect("timeout");
    let pid = client.status().expect("status").pid;
    sign_and_verify(&mut client, "ed", "ed25519");
    common::signal(pid, libc::SIGTERM);
}
