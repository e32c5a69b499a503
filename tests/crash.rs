//! SIGKILL during `key generate` never leaves a partial key: after every kill a key is either
//! absent (no metadata) or complete (its metadata parses and its material decrypts and signs).

mod common;

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Instant;

use common::verify::{default_scheme, Verifier};
use common::{key_name, unb64, TestHome};

/// Check the keys directory: every metadata file parses and names material that exists and
/// looks like a complete age file; the CLI lists exactly the keys that have metadata.
fn check_consistent(h: &TestHome, when: &str) -> BTreeSet<String> {
    let dir = h.keys_dir();
    let mut with_meta = BTreeSet::new();
    for f in common::list_dir(&dir) {
        if f.starts_with(".tmp-") {
            continue;
        }
        let Some(stem) = f.strip_suffix(".toml") else {
            continue;
        };
        let text = std::fs::read_to_string(dir.join(&f))
            .unwrap_or_else(|e| panic!("{when}: reading {f}: {e}"));
        let meta: toml::Value = toml::from_str(&text)
            .unwrap_or_else(|e| panic!("{when}: {f} is not valid TOML ({e}):\n{text}"));
        assert_eq!(
            meta.get("name").and_then(|v| v.as_str()),
            Some(stem),
            "{when}: {f} names another key"
        );
        let versions = meta
            .get("versions")
            .and_then(|v| v.as_array())
            .unwrap_or_else(|| panic!("{when}: {f} has no versions:\n{text}"));
        assert!(!versions.is_empty(), "{when}: {f} lists no versions");
        for v in versions {
            let loc = v
                .get("locator")
                .and_then(|l| l.as_str())
                .unwrap_or_else(|| panic!("{when}: {f}: version without locator"));
            let data = std::fs::read(dir.join(loc))
                .unwrap_or_else(|e| panic!("{when}: {f} lists {loc}, which is missing: {e}"));
            assert!(
                data.starts_with(b"age-encryption.org/v1\n"),
                "{when}: {loc} is not an age file"
            );
        }
        with_meta.insert(stem.to_string());
    }
    let listed: BTreeSet<String> = h.listed_keys().into_iter().collect();
    assert_eq!(
        listed, with_meta,
        "{when}: `key list` differs from the metadata files present"
    );
    assert!(
        listed.iter().all(|n| !n.starts_with('.')),
        "{when}: a temp file is listed as a key: {listed:?}"
    );
    listed
}

#[test]
fn sigkill_during_key_generate_never_leaves_a_partial_key() {
    let h = TestHome::new();
    h.generate("before", "ed25519");
    h.import_ok("hm", Some("hmac-sha256"), b"kw-crash-test-secret");

    // How long one uninterrupted RSA-4096 generation takes here; the kills are spread over
    // that window so some land before, some during and some after the files are written.
    let t0 = Instant::now();
    h.generate("big-ref", "rsa-4096");
    let full = t0.elapsed();
    const RUNS: u32 = 12;
    let mut killed_absent = 0;
    let mut survived = 0;
    for i in 0..RUNS {
        let name = format!("big{i}");
        let delay = full.mul_f64(f64::from(i) / f64::from(RUNS - 1) * 1.3);
        let mut cmd = h.command();
        cmd.args(["key", "generate", &name, "--type", "rsa-4096"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("spawning key generate");
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL (fails harmlessly if it already exited)
        let st = child.wait().expect("waiting for key generate");
        let when = format!("after killing generate {name} at {delay:?} ({st})");
        let listed = check_consistent(&h, &when);
        assert!(listed.contains("before"), "{when}: an older key vanished");
        if listed.contains(&name) {
            survived += 1;
        } else {
            killed_absent += 1;
            assert!(
                !h.keys_dir().join(format!("{name}.toml")).exists(),
                "{when}: metadata exists but the key is not listed"
            );
            // The name is free again: a new generate of it succeeds.
            if i % 3 == 0 {
                h.generate(&name, "ed25519");
            }
        }
    }
    eprintln!(
        "crash test: {killed_absent} runs left no key, {survived} completed (one run ≈ {full:?})"
    );

    // Every listed key loads in the agent and signs verifiably.
    let listed = check_consistent(&h, "before starting the agent");
    let agent = h.agent();
    let mut c = agent.client();
    let from_agent: BTreeSet<String> = c
        .list_keys()
        .expect("list_keys")
        .into_iter()
        .map(|k| k.name)
        .collect();
    assert_eq!(from_agent, listed, "the agent loaded another set of keys");
    let infos = c.list_keys().expect("list_keys");
    for k in infos {
        let msg = format!("after the crashes: {}", k.name).into_bytes();
        let r = c.sign(&key_name(&k.name), &msg, None).unwrap_or_else(|e| {
            panic!(
                "{} does not sign: {} {e}\n{}",
                k.name,
                e.code(),
                agent.log()
            )
        });
        let sig = unb64(&r.signature);
        assert_eq!(r.scheme, default_scheme(&k.key_type));
        let v = if k.key_type.starts_with("hmac") {
            Verifier::Hmac(b"kw-crash-test-secret".to_vec())
        } else {
            let pk = c.public_key(&key_name(&k.name), "pem").expect("public_key");
            Verifier::from_spki_pem(&k.key_type, pk.public_key.as_str().expect("pem"))
        };
        v.verify(&r.scheme, &msg, &sig)
            .unwrap_or_else(|e| panic!("{}: {e}", k.name));
    }
}

/// `init` writes identity.pub, then identity.age. A crash between the two leaves a home that
/// is not initialised; running `init` again must then work (nothing can have been encrypted
/// to an identity whose secret half was never stored).
#[test]
fn an_init_interrupted_between_its_two_writes_can_be_rerun() {
    let h = TestHome::new();
    // The state a SIGKILL between the two atomic writes leaves.
    std::fs::remove_file(h.home.join("identity.age")).expect("removing identity.age");
    h.run(&["key", "list"]).assert_error("not_initialized");
    let out = h.init();
    assert!(
        out.success(),
        "a home left by an interrupted init cannot be initialised again:\n{out}"
    );
    h.import_ok("hm", Some("hmac-sha256"), b"kw-reinit-secret");
    let agent = h.agent();
    agent
        .client()
        .sign(&key_name("hm"), b"after re-init", None)
        .expect("sign after re-init");
}
