//! Key lifecycle through the real binary: `key rotate`, `activate`, `disable`, `enable` and
//! `delete --version`, with a running agent picking each change up without a restart — also
//! while clients sign continuously — and bad input leaving the metadata untouched.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::verify::Verifier;
use common::{b64, error_code, key_name, random_bytes, roundtrip, unb64, Agent, TestHome};
use serde_json::Value;

/// The metadata file of `key`, as bytes (to show a refused command changed nothing).
fn meta_bytes(h: &TestHome, key: &str) -> Vec<u8> {
    std::fs::read(h.keys_dir().join(format!("{key}.toml"))).expect("reading key metadata")
}

fn show(h: &TestHome, key: &str) -> Value {
    h.ok(&["--json", "key", "show", key]).json()
}

/// `version -> state` from `key show --json`.
fn states(h: &TestHome, key: &str) -> HashMap<u64, String> {
    let v = show(h, key);
    v["versions"]
        .as_array()
        .unwrap_or_else(|| panic!("key show has no versions array: {v}"))
        .iter()
        .map(|x| {
            (
                x["version"].as_u64().expect("version number"),
                x["state"].as_str().expect("state").to_string(),
            )
        })
        .collect()
}

fn version_entry(h: &TestHome, key: &str, version: u64) -> Value {
    let v = show(h, key);
    v["versions"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["version"] == version).cloned())
        .unwrap_or_else(|| panic!("key show has no version {version}: {v}"))
}

fn export_pem(h: &TestHome, key: &str) -> String {
    let out = h.ok(&["--json", "key", "export-public", key, "--format", "pem"]);
    out.json()["public_key"]
        .as_str()
        .expect("public_key string")
        .to_string()
}

/// `SHA256:<base64 no pad>` of the SPKI in `pem`, as key metadata records it.
fn fingerprint_of_pem(pem: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    let der = common::verify::pem_to_der(pem, "PUBLIC KEY");
    format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(sha2::Sha256::digest(&der))
    )
}

/// Write `data` to a private file in the test dir and return its path as a string.
fn private_file(h: &TestHome, name: &str, data: &[u8]) -> String {
    let p = h.path(name);
    common::write_private(&p, data);
    p.display().to_string()
}

/// Rotation by generation: version 2 appears pending and its public key is the one printed;
/// activation makes it current (version 1 gets a grace end about 24 h ahead) and the running
/// agent signs with it at once.
#[test]
fn rotate_generate_then_activate_switches_the_running_agent() {
    let h = TestHome::new();
    h.ok(&[
        "key",
        "generate",
        "ed",
        "--type",
        "ed25519",
        "--profile",
        "binance",
    ]);
    let v1_pem = export_pem(&h, "ed");
    // A profile-bound key signs raw bytes only with allow_raw; this test signs raw bytes.
    let cfg = h.home.join("keyward.toml");
    let mut text = std::fs::read_to_string(&cfg).expect("reading keyward.toml");
    text.push_str("\n[keys.ed]\nallow_raw = true\n");
    common::write_private(&cfg, text.as_bytes());
    let agent = h.agent();
    let mut c = agent.client();
    let r = c.sign(&key_name("ed"), b"before", None).expect("sign v1");
    assert_eq!(r.version, 1);

    let out = h.ok(&["--json", "key", "rotate", "ed", "--generate"]);
    let rot = out.json();
    assert_eq!(rot["version"], 2, "{rot}");
    assert_eq!(rot["current"], 1, "{rot}");
    assert_eq!(rot["state"], "pending", "{rot}");
    assert_eq!(rot["agent"], "agent reloaded", "{rot}");
    assert!(rot["next"]
        .as_str()
        .unwrap_or_default()
        .contains("key activate ed --version 2"));
    let v2_pem = rot["public_key_pem"]
        .as_str()
        .expect("PEM printed")
        .to_string();
    assert_eq!(
        rot["upload"]["format"], "pem",
        "binance takes the PEM: {rot}"
    );
    assert_eq!(rot["upload"]["value"], v2_pem.as_str());
    assert_ne!(v2_pem, v1_pem, "rotation printed the old public key");
    assert_eq!(
        fingerprint_of_pem(&v2_pem),
        version_entry(&h, "ed", 2)["fingerprint"]
            .as_str()
            .expect("fp"),
        "the printed public key is not version 2's"
    );
    assert!(
        h.keys_dir().join("ed.2.age").is_file(),
        "no material for version 2"
    );
    let st = states(&h, "ed");
    assert_eq!(st[&1], "current");
    assert_eq!(st[&2], "pending");
    assert_eq!(show(&h, "ed")["version"], 1, "rotate changed `current`");
    // The human form names the PEM and the next step too.
    let human = h.ok(&["key", "show", "ed"]).stdout;
    assert!(
        human.contains("pending") && human.contains("current"),
        "{human}"
    );

    // Pending: the running agent still signs with version 1.
    let v1 = Verifier::from_spki_pem("ed25519", &v1_pem);
    let v2 = Verifier::from_spki_pem("ed25519", &v2_pem);
    let r = c.sign(&key_name("ed"), b"still one", None).expect("sign");
    assert_eq!(r.version, 1);
    v1.verify_strict(
        "ed25519",
        b"still one",
        &unb64(&r.signature),
        "v1 while pending",
    );

    let started = time::OffsetDateTime::now_utc();
    let act = h
        .ok(&["--json", "key", "activate", "ed", "--version", "2"])
        .json();
    assert_eq!(act["current"], 2, "{act}");
    assert_eq!(act["previous"], 1, "{act}");
    assert_eq!(act["agent"], "agent reloaded", "{act}");
    let entry = version_entry(&h, "ed", 1);
    assert_eq!(entry["state"], "grace", "{entry}");
    let until = time::OffsetDateTime::parse(
        entry["grace_until"].as_str().expect("grace_until"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("grace_until is RFC 3339");
    let ahead = (until - started).whole_seconds();
    assert!(
        (24 * 3600 - 5..=24 * 3600 + 60).contains(&ahead),
        "default grace is 24h, got {ahead}s"
    );
    assert_eq!(states(&h, "ed")[&2], "current");
    let listed = h.ok(&["--json", "key", "list"]).json();
    assert_eq!(listed[0]["versions"][0]["state"], "grace", "{listed}");
    let human_list = h.ok(&["key", "list"]).stdout;
    assert!(human_list.contains("1 grace, 2 current"), "{human_list}");

    // Same connection, no restart: the next request is signed by version 2.
    let msg = random_bytes(300);
    let r = c
        .sign(&key_name("ed"), &msg, None)
        .expect("sign after activate");
    assert_eq!(r.version, 2, "the agent did not switch to version 2");
    let sig = unb64(&r.signature);
    v2.verify_strict("ed25519", &msg, &sig, "v2 after activate");
    assert!(
        v1.verify("ed25519", &msg, &sig).is_err(),
        "version 1 verifies a v2 signature"
    );
    assert_eq!(
        export_pem(&h, "ed"),
        v2_pem,
        "export-public shows the current version"
    );
    drop(agent);
}

/// HMAC secrets come from the exchange: rotation needs --import; activation records the new
/// API key id, and the agent signs with the new secret.
#[test]
fn hmac_rotates_by_import_and_activate_sets_the_api_key_id() {
    let h = TestHome::new();
    let old_secret = b"old-exchange-secret-5d1c0a9e77";
    let new_secret = b"new-exchange-secret-0b8f2e61c4";
    let src = private_file(&h, "old.secret", old_secret);
    h.ok(&[
        "key",
        "import",
        "mac",
        "--type",
        "hmac-sha256",
        "--file",
        &src,
        "--api-key",
        "OLD-ID",
    ]);
    let agent = h.agent();
    let before = meta_bytes(&h, "mac");

    h.run(&["key", "rotate", "mac", "--generate"])
        .assert_error("bad_request");
    assert_eq!(
        meta_bytes(&h, "mac"),
        before,
        "a refused rotate changed the metadata"
    );
    // A PEM is not an HMAC secret: refused before anything is written.
    let pem = private_file(
        &h,
        "ed.pem",
        b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF\n-----END PRIVATE KEY-----\n",
    );
    let wrong = h.run(&["key", "rotate", "mac", "--import", &pem]);
    assert!(
        !wrong.success(),
        "an Ed25519 PEM rotated an HMAC key:\n{wrong}"
    );
    assert_eq!(meta_bytes(&h, "mac"), before);
    assert!(!h.keys_dir().join("mac.2.age").exists());

    let new_src = private_file(&h, "new.secret", new_secret);
    let rot = h
        .ok(&["--json", "key", "rotate", "mac", "--import", &new_src])
        .json();
    assert_eq!(rot["version"], 2, "{rot}");
    assert_eq!(rot["public_key_pem"], Value::Null, "{rot}");
    assert!(rot["next"]
        .as_str()
        .unwrap_or_default()
        .contains("--version 2"));
    let human_next = h.run(&["key", "show", "mac"]).stdout;
    assert!(human_next.contains("pending"), "{human_next}");

    let mut c = agent.client();
    let r = c.sign(&key_name("mac"), b"m", None).expect("sign");
    assert_eq!(r.version, 1);
    Verifier::Hmac(old_secret.to_vec()).verify_strict(
        "hmac-sha256",
        b"m",
        &unb64(&r.signature),
        "old secret",
    );

    let act = h.ok(&[
        "--json",
        "key",
        "activate",
        "mac",
        "--version",
        "2",
        "--api-key-id",
        "NEW-ID",
        "--grace",
        "30m",
    ]);
    assert_eq!(act.json()["api_key"], "NEW-ID");
    let shown = show(&h, "mac");
    assert_eq!(shown["api_key"], "NEW-ID", "{shown}");
    assert_eq!(shown["version"], 2, "{shown}");
    assert_eq!(version_entry(&h, "mac", 1)["state"], "grace");

    let msg = b"GET/api/v3/account?timestamp=1";
    let r = c
        .sign(&key_name("mac"), msg, None)
        .expect("sign after activate");
    assert_eq!(r.version, 2);
    let sig = unb64(&r.signature);
    Verifier::Hmac(new_secret.to_vec()).verify_strict("hmac-sha256", msg, &sig, "new secret");
    assert!(Verifier::Hmac(old_secret.to_vec())
        .verify("hmac-sha256", msg, &sig)
        .is_err());
    // The secrets never appear in anything the CLI printed.
    let t = h.transcript();
    for s in [&old_secret[..], &new_secret[..]] {
        assert!(!t.windows(s.len()).any(|w| w == s), "a secret was printed");
    }
}

/// Disabling the key stops signing (`key_disabled`) until enabled; a version can be disabled
/// (then not activated) but not the current one alone; `delete --version` removes a version's
/// metadata and material and leaves the rest signing.
#[test]
fn disable_enable_and_delete_a_version() {
    let h = TestHome::new();
    h.generate("k", "ed25519");
    let agent = h.agent();
    let mut c = agent.client();

    h.ok(&["key", "disable", "k"]);
    assert_eq!(show(&h, "k")["disabled"], true);
    let e = c
        .sign(&key_name("k"), b"x", None)
        .expect_err("a disabled key signed");
    assert_eq!(e.code(), "key_disabled", "{e}");
    let again = h.ok(&["--json", "key", "disable", "k"]).json();
    assert_eq!(again["changed"], false, "{again}");
    h.ok(&["key", "enable", "k"]);
    assert_eq!(show(&h, "k")["disabled"], false);
    assert_eq!(
        c.sign(&key_name("k"), b"x", None).expect("enabled").version,
        1
    );

    // The current version alone cannot be disabled.
    let before = meta_bytes(&h, "k");
    let out = h.run(&["key", "disable", "k", "--version", "1"]);
    out.assert_error("bad_request");
    assert!(
        out.stderr.contains("disable the key") && out.stderr.contains("activate another version"),
        "{out}"
    );
    assert_eq!(meta_bytes(&h, "k"), before);

    let rot = h.ok(&["--json", "key", "rotate", "k", "--generate"]).json();
    let v2 = Verifier::from_spki_pem("ed25519", rot["public_key_pem"].as_str().expect("pem"));
    h.ok(&["key", "disable", "k", "--version", "2"]);
    assert_eq!(states(&h, "k")[&2], "disabled");
    assert_eq!(version_entry(&h, "k", 2)["disabled"], true);
    let before = meta_bytes(&h, "k");
    let out = h.run(&["key", "activate", "k", "--version", "2"]);
    out.assert_error("bad_request");
    assert!(out.stderr.contains("disabled"), "{out}");
    assert_eq!(
        meta_bytes(&h, "k"),
        before,
        "a refused activate changed the metadata"
    );
    h.ok(&["key", "enable", "k", "--version", "2"]);
    assert_eq!(states(&h, "k")[&2], "pending");
    h.ok(&["key", "activate", "k", "--version", "2", "--grace", "0"]);
    assert_eq!(states(&h, "k")[&1], "retired", "--grace 0 retires at once");

    // Delete: not the current version; not without --yes (no terminal); then version 1 goes.
    let before = meta_bytes(&h, "k");
    h.run(&["key", "delete", "k", "--version", "2", "--yes"])
        .assert_error("bad_request");
    h.run(&["key", "delete", "k", "--version", "1"])
        .assert_error("bad_request");
    assert_eq!(meta_bytes(&h, "k"), before);
    assert!(h.keys_dir().join("k.1.age").is_file());
    let del = h
        .ok(&["--json", "key", "delete", "k", "--version", "1", "--yes"])
        .json();
    assert_eq!(del["deleted_version"], 1, "{del}");
    assert!(
        !h.keys_dir().join("k.1.age").exists(),
        "version 1's material is still there"
    );
    assert!(
        h.keys_dir().join("k.2.age").is_file(),
        "version 2's material went too"
    );
    let st = states(&h, "k");
    assert_eq!(st.len(), 1, "{st:?}");
    assert_eq!(st[&2], "current");
    let msg = b"after delete";
    let r = c
        .sign(&key_name("k"), msg, None)
        .expect("sign after delete --version");
    assert_eq!(r.version, 2);
    v2.verify_strict("ed25519", msg, &unb64(&r.signature), "v2 after deleting v1");
    // Numbers are not reused: the next rotation is version 3.
    let rot = h.ok(&["--json", "key", "rotate", "k", "--generate"]).json();
    assert_eq!(rot["version"], 3, "{rot}");
    // Deleting the whole key removes every version's material.
    h.ok(&["key", "delete", "k", "--yes"]);
    assert!(
        !h.key_files().iter().any(|f| f.starts_with("k.")),
        "{:?}",
        h.key_files()
    );
}

/// Unknown keys and versions, a disabled version, bad --grace values, a foreign backend:
/// each is refused with its stable code and the metadata stays byte for byte the same.
#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let h = TestHome::new();
    h.generate("k", "p256");
    h.ok(&["key", "rotate", "k", "--generate"]);
    h.ok(&["key", "disable", "k", "--version", "2"]);
    let before = meta_bytes(&h, "k");
    let files = h.key_files();

    for args in [
        &["key", "rotate", "nope", "--generate"][..],
        &["key", "activate", "nope", "--version", "1"],
        &["key", "disable", "nope"],
        &["key", "enable", "nope", "--version", "1"],
        &["key", "delete", "nope", "--version", "1", "--yes"],
    ] {
        let out = h.run(args);
        out.assert_error("unknown_key");
        let j = h.run(&[&["--json"][..], args].concat());
        assert_eq!(
            j.json_error().expect("JSON error")["code"],
            "unknown_key",
            "{j}"
        );
    }
    for args in [
        &["key", "activate", "k", "--version", "9"][..],
        &["key", "disable", "k", "--version", "9"],
        &["key", "enable", "k", "--version", "0"],
        &["key", "delete", "k", "--version", "9", "--yes"],
        // Version 2 is disabled.
        &["key", "activate", "k", "--version", "2"],
        &["key", "rotate", "k", "--generate", "--backend", "pkcs11"],
        &["key", "rotate", "k", "--generate", "--token", "t1"],
    ] {
        h.run(args).assert_error("bad_request");
    }
    let unknown = h.run(&["key", "activate", "k", "--version", "9"]);
    assert!(unknown.stderr.contains("no version 9"), "{unknown}");
    for grace in [
        "",
        "5x",
        "h",
        "-1h",
        "1.5h",
        "24",
        "10y",
        "366d",
        "99999999999999999999d",
    ] {
        let out = h.run(&[
            "key",
            "activate",
            "k",
            "--version",
            "1",
            &format!("--grace={grace}"),
        ]);
        out.assert_error("bad_request");
    }
    for args in [
        &["key", "rotate", "k"][..],
        &["key", "rotate", "k", "--generate", "--import", "-"],
        &["key", "activate", "k"],
    ] {
        assert!(!h.run(args).success(), "{args:?} succeeded");
    }
    assert_eq!(
        meta_bytes(&h, "k"),
        before,
        "refused commands changed the metadata"
    );
    assert_eq!(h.key_files(), files, "refused commands changed key files");
    // Good durations are accepted (activating the current version changes no grace).
    for grace in ["30m", "2h", "7d", "1h30m", "0"] {
        h.ok(&["key", "activate", "k", "--version", "1", "--grace", grace]);
    }
    assert_eq!(states(&h, "k")[&1], "current");
}

/// One signed request: (activate had returned before it was sent, version, message, signature).
type Signed = (bool, u32, Vec<u8>, Vec<u8>);

/// One client on its own connection signing fresh messages until `stop`; the first error
/// ends it and fails the test.
fn signing_loop(
    agent: &Agent,
    key: &str,
    activated: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Result<Vec<Signed>, String>> {
    let mut c = agent.client();
    let key = key_name(key);
    thread::spawn(move || {
        let mut out = Vec::new();
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let after = activated.load(Ordering::SeqCst);
            let msg = format!("order {n} {}", b64(&random_bytes(12))).into_bytes();
            n += 1;
            match c.sign(&key, &msg, None) {
                Ok(r) => out.push((after, r.version, msg, unb64(&r.signature))),
                Err(e) => return Err(format!("request {n} failed: {} {e}", e.code())),
            }
        }
        Ok(out)
    })
}

/// A message and its signature, from the pinned client.
type Pinned = (Vec<u8>, Vec<u8>);

/// Sign fresh messages naming `version` on a raw connection until `stop`; any failure or a
/// result naming another version is an error.
fn pinned_loop(
    agent: &Agent,
    key: &str,
    version: u32,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Result<Vec<Pinned>, String>> {
    let mut s = agent.raw();
    let key = key.to_string();
    thread::spawn(move || {
        let mut out = Vec::new();
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            n += 1;
            let msg = format!("pinned {n}").into_bytes();
            let body = serde_json::json!({"id": n, "op": "sign", "key": key, "data": b64(&msg), "version": version});
            let r = roundtrip(&mut s, body.to_string().as_bytes());
            if r["ok"] != true || r["result"]["version"] != version {
                return Err(format!("pinned request {n} (version {version}): {r}"));
            }
            let sig = unb64(r["result"]["signature"].as_str().unwrap_or_default());
            out.push((msg, sig));
        }
        Ok(out)
    })
}

/// The main event: four clients sign continuously, each on its own connection, while the key
/// is rotated and the new version activated. No request fails, every signature verifies
/// with the version its result names, and once `activate` has returned (it reloads the agent)
/// every new request gets version 2.
#[test]
fn rotation_under_continuous_signing_loses_no_request() {
    let h = TestHome::new();
    h.generate("hot", "ed25519");
    let v1_pem = export_pem(&h, "hot");
    let agent = h.agent();
    let activated = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|_| signing_loop(&agent, "hot", activated.clone(), stop.clone()))
        .collect();
    // A fifth client pins version 1 throughout: current at first, then in grace, it must
    // keep signing.
    let pinned = Some(pinned_loop(&agent, "hot", 1, stop.clone()));

    thread::sleep(Duration::from_millis(300));
    let rot = h
        .ok(&["--json", "key", "rotate", "hot", "--generate"])
        .json();
    assert_eq!(rot["agent"], "agent reloaded", "{rot}");
    let v2_pem = rot["public_key_pem"].as_str().expect("pem").to_string();
    thread::sleep(Duration::from_millis(300));
    let act = h
        .ok(&["--json", "key", "activate", "hot", "--version", "2"])
        .json();
    assert_eq!(act["agent"], "agent reloaded", "{act}");
    activated.store(true, Ordering::SeqCst);
    let t = Instant::now();
    thread::sleep(Duration::from_millis(400));
    stop.store(true, Ordering::SeqCst);

    let verifiers: HashMap<u32, Verifier> = [
        (1, Verifier::from_spki_pem("ed25519", &v1_pem)),
        (2, Verifier::from_spki_pem("ed25519", &v2_pem)),
    ]
    .into_iter()
    .collect();
    let mut counts: HashMap<(bool, u32), usize> = HashMap::new();
    for w in workers {
        let signed = w
            .join()
            .expect("signing thread panicked")
            .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
        assert!(!signed.is_empty(), "a client signed nothing");
        for (after, version, msg, sig) in signed {
            let v = verifiers
                .get(&version)
                .unwrap_or_else(|| panic!("a result names version {version}"));
            v.verify("ed25519", &msg, &sig)
                .unwrap_or_else(|e| panic!("a version {version} signature does not verify: {e}"));
            *counts.entry((after, version)).or_default() += 1;
        }
    }
    if let Some(p) = pinned {
        let signed = p
            .join()
            .expect("pinned thread panicked")
            .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
        assert!(!signed.is_empty(), "the pinned client signed nothing");
        for (msg, sig) in signed {
            verifiers[&1]
                .verify("ed25519", &msg, &sig)
                .unwrap_or_else(|e| panic!("a pinned version 1 signature does not verify: {e}"));
        }
    }
    eprintln!("signed during the rotation (sent after activate, version): {counts:?}");
    let get = |k: (bool, u32)| counts.get(&k).copied().unwrap_or(0);
    assert!(
        get((false, 1)) > 0,
        "nothing was signed by version 1: {counts:?}"
    );
    assert_eq!(
        get((true, 1)),
        0,
        "requests sent after activate returned got version 1: {counts:?}"
    );
    assert!(
        get((true, 2)) > 0,
        "nothing signed after activate ({:?}): {counts:?}",
        t.elapsed()
    );
    assert!(
        agent.log().lines().all(|l| !l.contains("panicked")),
        "{}",
        agent.log()
    );
    // The audit log shows each step, in order, and every signature of both versions.
    let recs: Vec<Value> =
        serde_json::from_str(&h.ok(&["--json", "audit", "query", "--key", "hot"]).stdout)
            .expect("audit query output");
    let step = |op: &str| {
        recs.iter()
            .position(|r| r["event"] == "admin" && r["op"] == op)
            .unwrap_or_else(|| panic!("no {op} record in the audit log"))
    };
    assert!(step("key_generate") < step("key_rotate"));
    assert!(step("key_rotate") < step("key_activate"));
    assert_eq!(recs[step("key_activate")]["version"], 2);
    let signed = |v: u64| {
        recs.iter()
            .filter(|r| r["event"] == "sign" && r["decision"] == "allow" && r["version"] == v)
            .count()
    };
    assert!(signed(1) > 0 && signed(2) > 0);
    h.ok(&["audit", "verify"]);
}

/// Requests that name a version (the agent side of issue 7): during the grace period the old
/// version still signs when named, a pending or disabled version never does. Skips itself,
/// saying so, while the agent does not yet take `version` in `sign`.
#[test]
fn named_versions_sign_only_while_current_or_in_grace() {
    let h = TestHome::new();
    h.generate("nv", "ed25519");
    let v1_pem = export_pem(&h, "nv");
    let agent = h.agent();
    let rot = h
        .ok(&["--json", "key", "rotate", "nv", "--generate"])
        .json();
    let v2_pem = rot["public_key_pem"].as_str().expect("pem").to_string();
    let mut s = agent.raw();
    let named = |s: &mut std::os::unix::net::UnixStream, v: u32, msg: &[u8]| {
        let body =
            serde_json::json!({"id": 1, "op": "sign", "key": "nv", "data": b64(msg), "version": v});
        roundtrip(s, body.to_string().as_bytes())
    };
    let probe = named(&mut s, 1, b"probe");
    assert_eq!(probe["ok"], true, "naming the current version: {probe}");
    assert_eq!(probe["result"]["version"], 1, "{probe}");

    // Pending: refused when named.
    let pending = named(&mut s, 2, b"too early");
    assert_ne!(pending["ok"], true, "a pending version signed: {pending}");

    h.ok(&["key", "activate", "nv", "--version", "2", "--grace", "1h"]);
    let v1 = Verifier::from_spki_pem("ed25519", &v1_pem);
    let v2 = Verifier::from_spki_pem("ed25519", &v2_pem);
    let old = named(&mut s, 1, b"grace");
    assert_eq!(old["ok"], true, "a version in grace refused: {old}");
    assert_eq!(old["result"]["version"], 1, "{old}");
    v1.verify_strict(
        "ed25519",
        b"grace",
        &unb64(old["result"]["signature"].as_str().expect("sig")),
        "v1 in grace",
    );
    let new = named(&mut s, 2, b"current");
    assert_eq!(new["result"]["version"], 2, "{new}");
    v2.verify_strict(
        "ed25519",
        b"current",
        &unb64(new["result"]["signature"].as_str().expect("sig")),
        "v2 named",
    );

    // Disabled and expired versions do not sign, even when named.
    h.ok(&["key", "disable", "nv", "--version", "1"]);
    let disabled = named(&mut s, 1, b"disabled");
    assert_ne!(
        disabled["ok"], true,
        "a disabled version signed: {disabled}"
    );
    error_code(&disabled);
    // Roll back to version 1 with no grace: version 2 is then expired and refused by name.
    h.ok(&["key", "enable", "nv", "--version", "1"]);
    h.ok(&["key", "activate", "nv", "--version", "1", "--grace", "0"]);
    assert_eq!(states(&h, "nv")[&2], "retired");
    let expired = named(&mut s, 2, b"expired");
    assert_ne!(expired["ok"], true, "an expired version signed: {expired}");
    error_code(&expired);
    let back = named(&mut s, 1, b"rolled back");
    assert_eq!(back["result"]["version"], 1, "{back}");
    v1.verify_strict(
        "ed25519",
        b"rolled back",
        &unb64(back["result"]["signature"].as_str().expect("sig")),
        "v1 after rollback",
    );
}

/// What `rotate` says to register depends on the key: an EVM key's address (checked against
/// the printed public key), the PEM for the PEM-taking exchanges, nothing for an HMAC secret.
#[test]
fn rotate_prints_the_form_the_exchange_takes() {
    let h = TestHome::new();
    h.ok(&[
        "key",
        "generate",
        "hl",
        "--type",
        "secp256k1",
        "--profile",
        "hyperliquid",
    ]);
    let rot = h
        .ok(&["--json", "key", "rotate", "hl", "--generate"])
        .json();
    assert_eq!(rot["upload"]["format"], "address", "{rot}");
    let pem = rot["public_key_pem"].as_str().expect("pem");
    let v = Verifier::from_spki_pem("secp256k1", pem);
    let Verifier::Secp256k1(k) = &v else {
        panic!("not a secp256k1 verifier")
    };
    assert_eq!(
        rot["upload"]["value"],
        common::verify::eth_address(k).as_str(),
        "{rot}"
    );
    let human = h.ok(&["key", "rotate", "hl", "--generate"]).stdout;
    assert!(
        human.contains("0x") && human.contains("hyperliquid"),
        "{human}"
    );
    assert!(human.contains("key activate hl --version 3"), "{human}");

    h.ok(&[
        "key",
        "generate",
        "cb",
        "--type",
        "p256",
        "--profile",
        "coinbase",
    ]);
    let rot = h
        .ok(&["--json", "key", "rotate", "cb", "--generate"])
        .json();
    assert_eq!(rot["upload"]["format"], "pem", "{rot}");
    assert!(
        rot["upload"]["for"]
            .as_str()
            .unwrap_or_default()
            .contains("coinbase"),
        "{rot}"
    );
    Verifier::from_spki_pem("p256", rot["upload"]["value"].as_str().expect("pem"));

    let src = private_file(&h, "s1", b"first-secret-value-8c1e");
    h.ok(&[
        "key",
        "import",
        "hm",
        "--type",
        "hmac-sha512",
        "--file",
        &src,
    ]);
    let src = private_file(&h, "s2", b"second-secret-value-4b7a");
    let rot = h
        .ok(&["--json", "key", "rotate", "hm", "--import", &src])
        .json();
    assert_eq!(rot["upload"], Value::Null, "{rot}");
    assert_eq!(rot["type"], "hmac-sha512", "{rot}");
}

/// Rotation on a PKCS#11 token (SoftHSM): the new version is generated on the token, the agent
/// signs with it after `activate`, and `delete --version` destroys the old token objects.
#[test]
fn rotate_on_a_pkcs11_token() {
    let h = TestHome::new();
    let tokens = h.path("tokens");
    std::fs::create_dir(&tokens).expect("token dir");
    let conf = h.path("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .expect("softhsm conf");
    let so = private_file(&h, "so-pin", b"so-pin-4821");
    let pin = private_file(&h, "user-pin", b"user-pin-7310");
    let conf_s = conf.display().to_string();
    let env = [("SOFTHSM2_CONF", conf_s.as_str())];
    let run = |args: &[&str]| {
        let out = h.run_full(args, None, &env);
        assert!(out.success(), "command failed:\n{out}");
        out
    };
    run(&[
        "token",
        "init",
        "--label",
        "life",
        "--so-pin",
        &format!("file:{so}"),
        "--pin",
        &format!("file:{pin}"),
    ]);
    common::write_private(
        &h.home.join("keyward.toml"),
        format!(
            "[pkcs11.tok]\nlabel = \"life\"\npin = \"file:{pin}\"\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\n"
        )
        .as_bytes(),
    );
    run(&[
        "key",
        "generate",
        "hk",
        "--type",
        "ed25519",
        "--backend",
        "pkcs11",
        "--token",
        "tok",
    ]);
    let agent = h.agent_with_env(&env);
    let mut c = agent.client();
    assert_eq!(c.sign(&key_name("hk"), b"a", None).expect("v1").version, 1);

    let rot = run(&["--json", "key", "rotate", "hk", "--generate"]).json();
    assert_eq!(rot["version"], 2, "{rot}");
    let v2 = Verifier::from_spki_pem("ed25519", rot["public_key_pem"].as_str().expect("pem"));
    let objects = |id: &str| {
        let out = std::process::Command::new("pkcs11-tool")
            .env("SOFTHSM2_CONF", &conf)
            .args([
                "--module",
                "/usr/lib/softhsm/libsofthsm2.so",
                "--token-label",
                "life",
            ])
            .args(["--login", "--pin", "user-pin-7310", "--list-objects"])
            .output()
            .expect("pkcs11-tool runs (opensc is installed by scripts/setup.sh)");
        assert!(out.status.success(), "pkcs11-tool: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.trim_start().starts_with("ID:") && l.contains(id))
            .count()
    };
    let locator = |n: u64| {
        version_entry(&h, "hk", n);
        let text = String::from_utf8(meta_bytes(&h, "hk")).expect("utf-8 metadata");
        let meta: toml::Value = toml::from_str(&text).expect("metadata TOML");
        meta["versions"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|v| v["version"].as_integer() == Some(n as i64))
            })
            .and_then(|v| v["locator"].as_str())
            .and_then(|l| l.split_once(':'))
            .map(|(_, id)| id.to_string())
            .expect("a pkcs11 locator")
    };
    let id1 = locator(1);
    let id2 = locator(2);
    assert!(
        objects(&id1) > 0 && objects(&id2) > 0,
        "token objects of both versions"
    );

    run(&["key", "activate", "hk", "--version", "2"]);
    let r = c.sign(&key_name("hk"), b"on the token", None).expect("v2");
    assert_eq!(r.version, 2);
    v2.verify_strict("ed25519", b"on the token", &unb64(&r.signature), "token v2");

    run(&["key", "delete", "hk", "--version", "1", "--yes"]);
    assert_eq!(objects(&id1), 0, "version 1's token objects remain");
    assert!(objects(&id2) > 0, "version 2's token objects went too");
    let r = c
        .sign(&key_name("hk"), b"still", None)
        .expect("v2 after delete");
    assert_eq!(r.version, 2);
}

/// Commands changing one key at the same time serialise on the registry lock: four parallel
/// rotations make four distinct versions, and none of them is lost from the metadata.
#[test]
fn parallel_rotations_lose_no_version() {
    let h = TestHome::new();
    h.generate("par", "ed25519");
    let outs: Vec<common::Output> = thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| h.run(&["--json", "key", "rotate", "par", "--generate"])))
            .collect();
        handles
            .into_iter()
            .map(|t| t.join().expect("rotate thread"))
            .collect()
    });
    let mut made: Vec<u64> = outs
        .iter()
        .map(|o| {
            assert!(o.success(), "a parallel rotate failed:\n{o}");
            o.json()["version"].as_u64().expect("version")
        })
        .collect();
    made.sort_unstable();
    assert_eq!(made, [2, 3, 4, 5]);
    let st = states(&h, "par");
    assert_eq!(st.len(), 5, "{st:?}");
    for n in 2..=5 {
        assert_eq!(st[&n], "pending", "{st:?}");
        assert!(h.keys_dir().join(format!("par.{n}.age")).is_file());
    }
}
