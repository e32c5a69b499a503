//! `keyward doctor` against real homes: a healthy soft home and a healthy SoftHSM token home
//! pass; each broken thing (loose key or PIN file, deleted token object, invalid config,
//! missing TPM blob or soft key file, loose socket directory) fails its own check with a fix.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde_json::Value;

use common::swtpm::Swtpm;
use common::token_home::{TokenHome, USER_PIN};
use common::{write_private, Output, TestHome, PASSPHRASE};

const STATUSES: [&str; 4] = ["pass", "warn", "fail", "info"];

/// `keyward --json doctor ARGS` in `h` with `env`; the report, checked for shape.
fn doctor_json(h: &TestHome, args: &[&str], env: &[(&str, &str)]) -> (Output, Value) {
    let mut full = vec!["--json", "doctor"];
    full.extend_from_slice(args);
    let out = h.run_full(&full, None, env);
    let v = out.json();
    let checks = v["checks"]
        .as_array()
        .unwrap_or_else(|| panic!("no checks array:\n{out}"));
    assert!(!checks.is_empty(), "{out}");
    for c in checks {
        assert!(c["id"].is_string(), "check without id: {c}");
        assert!(c["message"].is_string(), "check without message: {c}");
        assert!(c.get("fix").is_some(), "check without fix field: {c}");
        let st = c["status"].as_str().unwrap_or_default();
        assert!(STATUSES.contains(&st), "bad status in {c}");
        if st == "fail" || st == "warn" {
            assert!(c["fix"].is_string(), "{st} check without a fix: {c}");
        }
    }
    let fails = failing(&v).len();
    assert_eq!(v["ok"], Value::Bool(fails == 0), "{out}");
    assert_eq!(v["counts"]["fail"], fails, "{out}");
    assert_eq!(
        out.status.code(),
        Some(if fails == 0 { 0 } else { 1 }),
        "exit status must be 1 exactly when a check fails:\n{out}"
    );
    (out, v)
}

/// The checks with `id`.
fn with_id<'a>(v: &'a Value, id: &str) -> Vec<&'a Value> {
    v["checks"]
        .as_array()
        .map(|a| a.iter().filter(|c| c["id"] == id).collect())
        .unwrap_or_default()
}

/// `(id, subject)` of every failing check.
fn failing(v: &Value) -> Vec<(String, String)> {
    v["checks"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|c| c["status"] == "fail")
                .map(|c| {
                    (
                        c["id"].as_str().unwrap_or_default().to_string(),
                        c["subject"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The one check with `id` (and `subject`, if given), panicking with the report otherwise.
fn the_check<'a>(v: &'a Value, id: &str, subject: Option<&str>) -> &'a Value {
    let found: Vec<&Value> = with_id(v, id)
        .into_iter()
        .filter(|c| subject.is_none_or(|s| c["subject"] == s))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one check {id} {subject:?}, got {found:?}\nreport: {v:#}"
    );
    found[0]
}

fn assert_status(v: &Value, id: &str, subject: Option<&str>, status: &str) -> Value {
    let c = the_check(v, id, subject);
    assert_eq!(c["status"], status, "{id} {subject:?}: {c}\nreport: {v:#}");
    c.clone()
}

fn assert_all_pass_or_info(v: &Value, out: &Output) {
    assert!(failing(v).is_empty(), "unexpected failures:\n{out}");
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// The locator of `name`'s current version, from its metadata file.
fn locator(h: &TestHome, name: &str) -> String {
    let text = fs::read_to_string(h.keys_dir().join(format!("{name}.toml"))).expect("metadata");
    let meta: toml::Value = toml::from_str(&text).expect("metadata TOML");
    meta["versions"][0]["locator"]
        .as_str()
        .expect("locator")
        .to_string()
}

/// Give `name`'s metadata the public key and fingerprint of `other` (a registry that no
/// longer describes the key's material).
fn register_wrong_public_key(h: &TestHome, name: &str, other: &str) {
    let read = |n: &str| -> toml::Value {
        let text = fs::read_to_string(h.keys_dir().join(format!("{n}.toml"))).expect("metadata");
        toml::from_str(&text).expect("metadata TOML")
    };
    let donor = read(other);
    let mut meta = read(name);
    let v = &mut meta["versions"][0];
    for field in ["public_key", "fingerprint"] {
        v[field] = donor["versions"][0][field].clone();
    }
    let text = toml::to_string(&meta).expect("encoding metadata");
    write_private(&h.keys_dir().join(format!("{name}.toml")), text.as_bytes());
}

/// A test home with its own SoftHSM token, configured as `[pkcs11.tok]`.
type Hsm = TokenHome;

/// `keyward --json doctor ARGS` in a token home.
fn doctor_hsm(h: &Hsm, args: &[&str]) -> (Output, Value) {
    let env = h.env();
    let e: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    doctor_json(&h.home, args, &e)
}

fn import_hmac(h: &Hsm, name: &str) {
    h.import(name, "hmac-sha256", &common::random_bytes(32));
}

#[test]
fn a_healthy_soft_home_passes_and_reports_every_area() {
    let h = TestHome::new();
    h.generate("ed", "ed25519");
    h.generate("ec", "p256");
    h.import_ok("mac", Some("hmac-sha256"), &common::random_bytes(32));

    let (out, v) = doctor_json(&h, &[], &[]);
    assert_all_pass_or_info(&v, &out);
    assert_eq!(v["ok"], true);
    for id in [
        "home",
        "perm.home",
        "perm.identity",
        "perm.identity_pub",
        "perm.config",
        "config",
        "socket.dir",
        "agent",
        "mlock.limit",
        "clock",
        "identity.seal",
        "audit",
    ] {
        assert!(!with_id(&v, id).is_empty(), "no {id} check:\n{out}");
    }
    // One permission check per file in keys/ (3 metadata + 3 key files).
    assert_eq!(with_id(&v, "perm.key_file").len(), 6, "{out}");
    for k in ["ed v1", "ec v1", "mac v1"] {
        let c = assert_status(&v, "key", Some(k), "pass");
        assert!(
            c["message"].as_str().unwrap().contains("--passphrase"),
            "{c}"
        );
    }
    // No agent runs: said, not failed.
    assert_status(&v, "agent", None, "info");
    // The CLI's own admin records (key generate) make the log verifiable already.
    let audit = assert_status(&v, "audit", None, "pass");
    assert!(
        audit["message"].as_str().unwrap().contains("verifies"),
        "{audit}"
    );

    // With the passphrase every soft key is decrypted and its public key compared.
    let (out, v) = doctor_json(&h, &["--passphrase", &h.pass_source()], &[]);
    assert_all_pass_or_info(&v, &out);
    assert_status(&v, "identity.unlock", None, "pass");
    for k in ["ed v1", "ec v1", "mac v1"] {
        let c = assert_status(&v, "key", Some(k), "pass");
        assert!(
            c["message"]
                .as_str()
                .unwrap()
                .contains("decrypts; public key matches"),
            "{c}"
        );
    }

    // The human report: one PASS/INFO line per check, no FAIL, exit 0.
    let human = h.run(&["doctor"]);
    assert!(human.success(), "{human}");
    assert!(human.stdout.contains("PASS  perm.home"), "{human}");
    assert!(!human.stdout.contains("FAIL"), "{human}");
    assert!(human.stdout.contains("0 fail"), "{human}");
    assert!(
        !String::from_utf8_lossy(&h.transcript()).contains(PASSPHRASE),
        "the passphrase was printed"
    );
}

#[test]
fn a_soft_key_whose_public_key_differs_from_the_registry_fails_with_passphrase() {
    let h = TestHome::new();
    h.generate("a", "ed25519");
    h.generate("b", "ed25519");
    register_wrong_public_key(&h, "a", "b");
    // Without the passphrase only presence is visible.
    let (_, v) = doctor_json(&h, &[], &[]);
    assert_status(&v, "key", Some("a v1"), "pass");
    let (out, v) = doctor_json(&h, &["--passphrase", &h.pass_source()], &[]);
    let c = assert_status(&v, "key", Some("a v1"), "fail");
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("not the registered one"),
        "{c}"
    );
    assert_status(&v, "key", Some("b v1"), "pass");
    assert_eq!(
        failing(&v),
        [("key".to_string(), "a v1".to_string())],
        "{out}"
    );
}

#[test]
fn a_wrong_passphrase_fails_identity_unlock_without_printing_it() {
    let h = TestHome::new();
    h.generate("ed", "ed25519");
    let wrong = h.path("wrong-pass");
    write_private(&wrong, b"not-the-passphrase-at-all\n");
    let (out, v) = doctor_json(
        &h,
        &["--passphrase", &format!("file:{}", wrong.display())],
        &[],
    );
    let c = assert_status(&v, "identity.unlock", None, "fail");
    assert!(c["fix"].as_str().unwrap().contains("passphrase"), "{c}");
    // The keys are still checked for presence.
    assert_status(&v, "key", Some("ed v1"), "pass");
    assert!(!out.stdout.contains("not-the-passphrase"), "{out}");
}

#[test]
fn a_loose_key_file_fails_with_chmod_fix() {
    let h = TestHome::new();
    h.generate("ed", "ed25519");
    let file = h.keys_dir().join("ed.1.age");
    chmod(&file, 0o644);
    let (out, v) = doctor_json(&h, &[], &[]);
    let shown = file.display().to_string();
    let c = assert_status(&v, "perm.key_file", Some(&shown), "fail");
    assert!(c["message"].as_str().unwrap().contains("0644"), "{c}");
    assert_eq!(c["fix"], format!("chmod 600 {shown}"), "{c}");
    assert_eq!(
        failing(&v),
        [("perm.key_file".to_string(), shown.clone())],
        "{out}"
    );

    // The human report names it with its fix and exits 1.
    let human = h.run(&["doctor"]);
    assert_eq!(human.status.code(), Some(1), "{human}");
    assert!(human.stdout.contains("FAIL  perm.key_file"), "{human}");
    assert!(
        human.stdout.contains(&format!("fix: chmod 600 {shown}")),
        "{human}"
    );
    assert!(
        human.stderr.is_empty(),
        "a finding is not an error: {human}"
    );

    // A loose home directory is its own finding.
    chmod(&file, 0o600);
    chmod(&h.home, 0o755);
    let (_, v) = doctor_json(&h, &[], &[]);
    let c = assert_status(&v, "perm.home", None, "fail");
    assert_eq!(c["fix"], format!("chmod 700 {}", h.home.display()));
}

#[test]
fn a_deleted_soft_key_file_fails_the_key_check() {
    let h = TestHome::new();
    h.generate("ed", "ed25519");
    h.generate("ok", "ed25519");
    fs::remove_file(h.keys_dir().join("ed.1.age")).expect("remove");
    let (out, v) = doctor_json(&h, &[], &[]);
    let c = assert_status(&v, "key", Some("ed v1"), "fail");
    assert!(c["message"].as_str().unwrap().contains("missing"), "{c}");
    assert!(
        c["fix"].as_str().unwrap().contains("keyward key delete ed"),
        "{c}"
    );
    assert_status(&v, "key", Some("ok v1"), "pass");
    assert_eq!(
        failing(&v),
        [("key".to_string(), "ed v1".to_string())],
        "{out}"
    );
}

#[test]
fn an_invalid_config_fails_with_line_and_column() {
    let h = TestHome::new();
    h.generate("ed", "ed25519");
    let cfg = h.home.join("keyward.toml");
    write_private(&cfg, b"[agent]\nqueue = 10\nqueu = 3\n");
    let (out, v) = doctor_json(&h, &[], &[]);
    let c = assert_status(&v, "config", None, "fail");
    let m = c["message"].as_str().unwrap();
    assert!(m.contains(&format!("{}:3:1:", cfg.display())), "{m}");
    assert!(m.contains("queu"), "{m}");
    assert!(
        c["fix"].as_str().unwrap().contains("line and column"),
        "{c}"
    );
    // The rest still runs: soft keys need no config.
    assert_status(&v, "key", Some("ed v1"), "pass");
    assert_eq!(
        failing(&v),
        [("config".to_string(), String::new())],
        "{out}"
    );

    let human = h.run(&["doctor"]);
    assert_eq!(human.status.code(), Some(1), "{human}");
    assert!(human.stdout.contains("FAIL  config"), "{human}");
}

#[test]
fn an_uninitialised_home_fails_and_says_init() {
    let h = TestHome::uninitialized();
    let (_, v) = doctor_json(&h, &[], &[]);
    let c = assert_status(&v, "home", None, "fail");
    assert!(c["fix"].as_str().unwrap().contains("keyward init"), "{c}");
    // Host checks still run.
    assert!(!with_id(&v, "mlock.limit").is_empty());
    assert!(!with_id(&v, "clock").is_empty());
}

#[test]
fn a_group_writable_socket_directory_fails() {
    let h = TestHome::new();
    let dir = h.sock.parent().expect("socket dir").to_path_buf();
    fs::create_dir(&dir).expect("socket dir");
    chmod(&dir, 0o777);
    let (_, v) = doctor_json(&h, &[], &[]);
    let shown = dir.display().to_string();
    let c = assert_status(&v, "socket.dir", Some(&shown), "fail");
    assert_eq!(c["fix"], format!("chmod 700 {shown}"));
    chmod(&dir, 0o700);
    let (_, v) = doctor_json(&h, &[], &[]);
    assert_status(&v, "socket.dir", Some(&shown), "pass");
}

#[test]
fn a_running_agent_is_checked_for_dumpability_and_core_dumps() {
    let h = TestHome::new();
    h.generate("ed", "ed25519");
    let agent = h.agent();
    let (out, v) = doctor_json(&h, &[], &[]);
    assert_all_pass_or_info(&v, &out);
    let c = assert_status(&v, "agent", None, "pass");
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains(&format!("pid {}", agent.pid)),
        "{c}"
    );
    assert_status(&v, "agent.dumpable", None, "pass");
    assert_status(&v, "agent.core_dumps", None, "pass");
    // Root may lock all memory; the agent reports what it did.
    let locked = the_check(&v, "agent.memory_locked", None);
    assert!(
        locked["status"] == "pass" || locked["status"] == "warn",
        "{locked}"
    );
    drop(agent);
}

#[test]
fn a_healthy_token_home_passes() {
    let h = Hsm::new("doctor-ok");
    h.generate("tok-ed", "ed25519");
    h.generate("tok-ec", "p256");
    import_hmac(&h, "tok-mac");
    let (out, v) = doctor_hsm(&h, &[]);
    assert_all_pass_or_info(&v, &out);
    assert_status(&v, "backend.pkcs11", Some("tok"), "pass");
    let pin = h.pin_file.display().to_string();
    let c = assert_status(&v, "perm.secret_file", Some("pkcs11.tok.pin"), "pass");
    assert!(c["message"].as_str().unwrap().contains(&pin), "{c}");
    for k in ["tok-ed v1", "tok-ec v1"] {
        let c = assert_status(&v, "key", Some(k), "pass");
        assert!(
            c["message"]
                .as_str()
                .unwrap()
                .contains("public key matches"),
            "{c}"
        );
    }
    assert_status(&v, "key", Some("tok-mac v1"), "pass");
    assert!(
        !out.stdout.contains(USER_PIN),
        "the PIN was printed:\n{out}"
    );

    // The object on the token is not the key the registry (and the exchange) knows.
    register_wrong_public_key(&h.home, "tok-ed", "tok-ec");
    let (out, v) = doctor_hsm(&h, &[]);
    let c = assert_status(&v, "key", Some("tok-ed v1"), "fail");
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("not the registered one"),
        "{c}"
    );
    assert_eq!(
        failing(&v),
        [("key".to_string(), "tok-ed v1".to_string())],
        "{out}"
    );
}

#[test]
fn a_loose_pin_file_fails_with_chmod_fix() {
    let h = Hsm::new("doctor-pin");
    h.generate("tok-ed", "ed25519");
    chmod(&h.pin_file, 0o644);
    let (out, v) = doctor_hsm(&h, &[]);
    let c = assert_status(&v, "perm.secret_file", Some("pkcs11.tok.pin"), "fail");
    let pin = h.pin_file.display().to_string();
    assert_eq!(c["fix"], format!("chmod 600 {pin}"), "{c}");
    assert!(c["message"].as_str().unwrap().contains("0644"), "{c}");
    // The token cannot be opened with a PIN file keyward refuses to read.
    assert_status(&v, "backend.pkcs11", Some("tok"), "fail");
    assert!(
        !out.stdout.contains(USER_PIN),
        "the PIN was printed:\n{out}"
    );
}

#[test]
fn a_deleted_token_object_fails_the_key_check() {
    let h = Hsm::new("doctor-del");
    h.generate("gone", "ed25519");
    h.generate("kept", "ed25519");
    let loc = locator(&h.home, "gone");
    let id = loc.split_once(':').expect("alias:id").1.to_string();
    for kind in ["privkey", "pubkey"] {
        let out = h.pkcs11_tool(&["--delete-object", "--type", kind, "--id", &id]);
        assert!(out.success(), "pkcs11-tool --delete-object failed:\n{out}");
    }
    let (out, v) = doctor_hsm(&h, &[]);
    let c = assert_status(&v, "key", Some("gone v1"), "fail");
    let m = c["message"].as_str().unwrap();
    assert!(m.contains(&id) && m.contains("tok"), "{m}");
    assert!(
        c["fix"]
            .as_str()
            .unwrap()
            .contains("keyward key delete gone"),
        "{c}"
    );
    assert_status(&v, "key", Some("kept v1"), "pass");
    assert_status(&v, "backend.pkcs11", Some("tok"), "pass");
    assert_eq!(
        failing(&v),
        [("key".to_string(), "gone v1".to_string())],
        "{out}"
    );
}

/// A home with `[tpm.tpm0]` on a private swtpm.
fn tpm_home(tpm: &Swtpm) -> TestHome {
    let h = TestHome::new();
    let text = format!("[tpm.tpm0]\ntcti = \"{}\"\n", tpm.tcti());
    write_private(&h.home.join("keyward.toml"), text.as_bytes());
    h
}

const TSS_QUIET: [(&str, &str); 1] = [("TSS2_LOG", "all+none")];

#[test]
fn a_missing_tpm_blob_fails_the_key_check() {
    let tpm = Swtpm::start();
    let h = tpm_home(&tpm);
    for name in ["tpm-ec", "tpm-kept"] {
        let out = h.run_full(
            &[
                "key",
                "generate",
                name,
                "--type",
                "p256",
                "--backend",
                "tpm",
                "--token",
                "tpm0",
            ],
            None,
            &TSS_QUIET,
        );
        assert!(out.success(), "{out}");
    }
    let (out, v) = doctor_json(&h, &[], &TSS_QUIET);
    assert_all_pass_or_info(&v, &out);
    assert_status(&v, "backend.tpm", Some("tpm0"), "pass");
    let c = assert_status(&v, "key", Some("tpm-ec v1"), "pass");
    assert!(
        c["message"].as_str().unwrap().contains("loads in the TPM"),
        "{c}"
    );

    fs::remove_file(h.keys_dir().join("tpm-ec.1.tpm")).expect("remove blob");
    let (out, v) = doctor_json(&h, &[], &TSS_QUIET);
    let c = assert_status(&v, "key", Some("tpm-ec v1"), "fail");
    assert!(c["message"].as_str().unwrap().contains("blob"), "{c}");
    assert!(
        c["fix"]
            .as_str()
            .unwrap()
            .contains("keyward key delete tpm-ec"),
        "{c}"
    );
    assert_status(&v, "key", Some("tpm-kept v1"), "pass");
    assert_eq!(
        failing(&v),
        [("key".to_string(), "tpm-ec v1".to_string())],
        "{out}"
    );

    // Another TPM (as after a TPM clear): the blob is there but does not load.
    let other = Swtpm::start();
    let text = format!("[tpm.tpm0]\ntcti = \"{}\"\n", other.tcti());
    write_private(&h.home.join("keyward.toml"), text.as_bytes());
    let (_, v) = doctor_json(&h, &[], &TSS_QUIET);
    assert_status(&v, "backend.tpm", Some("tpm0"), "pass");
    let c = assert_status(&v, "key", Some("tpm-kept v1"), "fail");
    assert!(
        c["message"].as_str().unwrap().contains("does not load"),
        "{c}"
    );
    drop(tpm);

    // The TPM gone: its backend check fails, its keys are reported as not checked.
    drop(other);
    let (_, v) = doctor_json(&h, &[], &TSS_QUIET);
    assert_status(&v, "backend.tpm", Some("tpm0"), "fail");
    assert_status(&v, "key", Some("tpm-kept v1"), "warn");
}

#[test]
fn a_sealed_identity_is_unsealed_and_a_broken_seal_fails() {
    let mut tpm = Swtpm::start();
    let h = TestHome::uninitialized();
    let tcti = tpm.tcti();
    let out = h.run_full(
        &[
            "init",
            "--passphrase",
            &h.pass_source(),
            "--kdf-work-factor",
            "10",
            "--seal-to-tpm",
            "host",
            "--tpm-tcti",
            &tcti,
        ],
        None,
        &TSS_QUIET,
    );
    assert!(out.success(), "init --seal-to-tpm failed:\n{out}");
    let (out, v) = doctor_json(&h, &[], &TSS_QUIET);
    assert_all_pass_or_info(&v, &out);
    let c = assert_status(&v, "identity.seal", None, "pass");
    assert!(c["message"].as_str().unwrap().contains("host"), "{c}");
    assert_status(
        &v,
        "perm.identity",
        Some(&h.home.join("identity.tpm").display().to_string()),
        "pass",
    );

    tpm.stop();
    let (_, v) = doctor_json(&h, &[], &TSS_QUIET);
    let c = assert_status(&v, "identity.seal", None, "fail");
    assert!(
        c["fix"].as_str().unwrap().contains("keyward identity seal"),
        "{c}"
    );
}

#[test]
fn tpm_keys_in_use_by_a_running_agent_on_swtpm_are_not_reported_broken() {
    // swtpm has no resource manager and about three object slots; the agent holds its storage
    // key and one loaded key, so doctor may find no slot to load the key into.
    let tpm = Swtpm::start();
    let h = tpm_home(&tpm);
    let out = h.run_full(
        &[
            "key",
            "generate",
            "tk",
            "--type",
            "p256",
            "--backend",
            "tpm",
            "--token",
            "tpm0",
        ],
        None,
        &TSS_QUIET,
    );
    assert!(out.success(), "{out}");
    let agent = h.agent_with_env(&TSS_QUIET);
    agent
        .client()
        .sign(&common::key_name("tk"), b"probe", None)
        .expect("the agent signs with the TPM key");
    let (out, v) = doctor_json(&h, &[], &TSS_QUIET);
    assert_all_pass_or_info(&v, &out);
    let c = the_check(&v, "key", Some("tk v1"));
    assert!(c["status"] == "pass" || c["status"] == "warn", "{c}");
    // Doctor's visit leaves the agent working.
    agent
        .client()
        .sign(&common::key_name("tk"), b"probe", None)
        .expect("the agent still signs after doctor");
}

#[test]
fn a_tampered_audit_log_fails_the_audit_check() {
    let h = TestHome::new();
    h.generate("ed", "ed25519");
    let agent = h.agent();
    let mut c = agent.client();
    let ed = keyward::model::KeyName::new("ed").unwrap();
    for i in 0..3u8 {
        c.sign(&ed, &[i], None).expect("sign");
    }
    drop(c);
    agent.stop();
    let (_, v) = doctor_json(&h, &[], &[]);
    let ok = assert_status(&v, "audit", None, "pass");
    assert!(ok["message"].as_str().unwrap().contains("verifies"), "{ok}");

    let log = h.home.join("audit").join("audit-1.jsonl");
    let text = fs::read_to_string(&log).unwrap();
    let edited = text.replacen("\"decision\":\"allow\"", "\"decision\":\"deny\"", 1);
    assert_ne!(text, edited, "the log has an allowed request to edit");
    fs::write(&log, edited).unwrap();
    let (out, v) = doctor_json(&h, &[], &[]);
    let bad = assert_status(&v, "audit", None, "fail");
    assert!(bad["message"].as_str().unwrap().contains("edited"), "{bad}");
    assert!(
        bad["fix"]
            .as_str()
            .unwrap()
            .contains("keyward audit verify"),
        "{bad}"
    );
    assert!(!out.success());
    assert_eq!(failing(&v), [("audit".to_string(), String::new())], "{out}");
}
