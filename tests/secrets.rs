//! Secrets never reach output, logs or plaintext files: keys with KNOWN material go through
//! init/import/agent/sign/status/list/export and failing commands, then everything the CLI
//! and the agent wrote is searched for the passphrase, the HMAC secret and the private key.
//! The agent must also be non-dumpable with core files disabled.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use common::verify::{der_to_pem, Verifier};
use common::{b64, files_under, key_name, unb64, write_private, TestHome, PASSPHRASE};
use sha2::Digest as _;

const HMAC_SECRET: &str = "kw-test-secret-9f8e7d6c5b4a";

/// A P-256 key with known material, as PKCS#8 PEM, and the scalar.
fn known_p256() -> (String, Vec<u8>) {
    let scalar = sha2::Sha256::digest(b"keyward secrets test: P-256 scalar").to_vec();
    let k = p256::SecretKey::from_slice(&scalar).expect("a valid P-256 scalar");
    let der = p256::pkcs8::EncodePrivateKey::to_pkcs8_der(&k).expect("PKCS#8");
    (der_to_pem(der.as_bytes(), "PRIVATE KEY"), scalar)
}

/// Strings that must appear nowhere: every encoding of every secret we know.
fn needles(pem: &str, scalar: &[u8]) -> Vec<(String, String)> {
    let mut n = vec![
        ("passphrase".to_string(), PASSPHRASE.to_string()),
        ("HMAC secret".into(), HMAC_SECRET.into()),
        ("HMAC secret (hex)".into(), hex::encode(HMAC_SECRET)),
        ("HMAC secret (base64)".into(), b64(HMAC_SECRET.as_bytes())),
        ("passphrase (base64)".into(), b64(PASSPHRASE.as_bytes())),
        ("P-256 scalar (hex)".into(), hex::encode(scalar)),
        (
            "P-256 scalar (HEX)".into(),
            hex::encode(scalar).to_uppercase(),
        ),
        ("P-256 scalar (base64)".into(), b64(scalar)),
    ];
    // The PEM body lines that carry private bytes (all but the last, which holds only the
    // tail of the public point), each one distinctive.
    let body: Vec<&str> = pem
        .lines()
        .filter(|l| !l.starts_with("-----") && !l.is_empty())
        .collect();
    for (i, line) in body.iter().take(body.len() - 1).enumerate() {
        n.push((format!("PEM body line {}", i + 1), line.to_string()));
    }
    n
}

fn find_leaks(what: &str, hay: &[u8], needles: &[(String, String)]) -> Vec<String> {
    needles
        .iter()
        .filter(|(_, s)| hay.windows(s.len()).any(|w| w == s.as_bytes()))
        .map(|(name, _)| format!("{name} found in {what}"))
        .collect()
}

#[test]
fn no_secret_reaches_output_logs_or_plaintext_files_and_the_agent_is_not_dumpable() {
    let h = TestHome::new();
    let (pem, scalar) = known_p256();
    let needles = needles(&pem, &scalar);
    // The scan itself finds what it looks for.
    for (name, n) in &needles {
        let hay = format!("prefix {n} suffix");
        assert!(
            !find_leaks("self-test", hay.as_bytes(), &needles).is_empty(),
            "the scan misses {name}"
        );
    }

    // Imports from files and stdin, with and without --shred.
    h.import_ok("hs", Some("hmac-sha256"), HMAC_SECRET.as_bytes());
    let out = h.run_stdin(
        &[
            "key",
            "import",
            "hs-stdin",
            "--type",
            "hmac-sha512",
            "--file",
            "-",
        ],
        format!("{HMAC_SECRET}\n").as_bytes(),
    );
    assert!(out.success(), "{out}");
    h.import_ok("pk", None, pem.as_bytes());
    let shred_src = h.path("pk2.pem");
    write_private(&shred_src, pem.as_bytes());
    h.ok(&[
        "key",
        "import",
        "pk2",
        "--file",
        &shred_src.display().to_string(),
        "--shred",
        "--passphrase",
        &h.pass_source(),
    ]);
    h.generate("gen", "ed25519");

    // Failing commands whose input is secret: their errors must not echo it.
    let failing: Vec<common::Output> = vec![
        h.import("bad1", Some("ed25519"), pem.as_bytes()),
        h.import("bad2", Some("p256"), HMAC_SECRET.as_bytes()),
        h.import("bad3", None, HMAC_SECRET.as_bytes()),
        h.import(
            "bad4",
            None,
            pem.replace("\n-----END", "x\n-----END").as_bytes(),
        ),
        h.import("hs", Some("hmac-sha256"), HMAC_SECRET.as_bytes()),
        h.run(&[
            "key",
            "import",
            "bad5",
            "--type",
            "hmac-sha256",
            "--file",
            "/nonexistent/secret",
        ]),
    ];
    for out in &failing {
        assert!(!out.success(), "expected a failure:\n{out}");
        assert!(out.error_code().is_some(), "no error code:\n{out}");
    }
    let wrong = h.path("wrong");
    write_private(&wrong, b"wrong-passphrase-123\n");
    let src = h.path("again");
    write_private(&src, HMAC_SECRET.as_bytes());
    h.import_shred("bad6", &src, &format!("file:{}", wrong.display()))
        .assert_error("bad_passphrase");

    // The agent, with the most verbose logging it may offer.
    let agent = h.agent_with_env(&[("RUST_LOG", "trace"), ("KEYWARD_LOG", "trace")]);
    let mut c = agent.client();
    let msg = b"GET /trade-api/v2/portfolio/balance";
    for (k, scheme) in [
        ("hs", "hmac-sha256"),
        ("hs-stdin", "hmac-sha512"),
        ("pk", "ecdsa-p256-sha256"),
        ("pk2", "ecdsa-p256-sha256"),
        ("gen", "ed25519"),
    ] {
        let r = c
            .sign(&key_name(k), msg, Some(scheme))
            .unwrap_or_else(|e| panic!("sign {k}: {e}"));
        if k.starts_with("hs") {
            Verifier::Hmac(HMAC_SECRET.as_bytes().to_vec())
                .verify(scheme, msg, &unb64(&r.signature))
                .unwrap_or_else(|e| panic!("{k}: {e}"));
        }
    }
    let _ = c.sign(&key_name("hs"), msg, Some("ed25519"));
    let _ = c.sign(&key_name("nope"), msg, None);
    for args in [
        &["status"][..],
        &["--json", "status"],
        &["key", "list"],
        &["--json", "key", "list"],
        &["key", "show", "hs"],
        &["--json", "key", "show", "pk"],
        &["key", "export-public", "pk", "--format", "pem"],
        &["key", "export-public", "pk", "--format", "jwk"],
        &["lock", "--key", "hs", "--reason", "test"],
        &["unlock", "--key", "hs"],
        &["reload"],
    ] {
        h.ok(args);
    }
    let f = h.path("msg");
    fs::write(&f, msg).expect("msg");
    h.ok(&["sign", "--key", "hs", "--file", &f.display().to_string()]);
    h.ok(&[
        "--json",
        "sign",
        "--key",
        "pk",
        "--file",
        &f.display().to_string(),
    ]);
    assert!(!h.run(&["key", "export-public", "hs"]).success());
    assert!(!h.run(&["sign", "--key", "nope", "--file", "-"]).success());

    // Hardening: not dumpable, no core files.
    let st = c.status().expect("status");
    assert!(!st.dumpable, "the agent reports itself dumpable");
    assert_eq!(st.pid, agent.pid);
    let limits = fs::read_to_string(format!("/proc/{}/limits", agent.pid)).expect("limits");
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("a core size line");
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(
        &fields[4..6],
        ["0", "0"],
        "core files are not disabled: {core}"
    );
    let cmdline = fs::read(format!("/proc/{}/cmdline", agent.pid)).expect("cmdline");
    let mut leaks = find_leaks("the agent's command line", &cmdline, &needles);
    drop(c);
    let agent_log = agent.log();
    agent.stop();
    assert!(
        agent_log.lines().count() > 4,
        "the agent logged (almost) nothing — nothing was really scanned:\n{agent_log}"
    );

    // Search everything written.
    let transcript = h.transcript();
    assert!(
        transcript.len() > 200,
        "the transcript is suspiciously short"
    );
    leaks.extend(find_leaks("CLI output", &transcript, &needles));
    leaks.extend(find_leaks(
        "the agent's output",
        agent_log.as_bytes(),
        &needles,
    ));
    let mut scanned = 0;
    for p in files_under(&h.home) {
        let name = p.file_name().expect("name").to_string_lossy().into_owned();
        let mode = fs::metadata(&p).expect("metadata").permissions().mode();
        assert_eq!(
            mode & 0o077,
            0,
            "{} is accessible to group/others ({:o})",
            p.display(),
            mode & 0o777
        );
        if name.ends_with(".age") {
            continue;
        }
        scanned += 1;
        let data = fs::read(&p).expect("reading a home file");
        leaks.extend(find_leaks(&p.display().to_string(), &data, &needles));
    }
    assert!(scanned >= 3, "only {scanned} plaintext files in the home");
    // The .age files are really encrypted: the secrets are not in them either.
    for p in files_under(&h.home) {
        if p.extension().is_some_and(|e| e == "age") {
            let data = fs::read(&p).expect("reading an age file");
            leaks.extend(find_leaks(&p.display().to_string(), &data, &needles));
        }
    }
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
    assert!(!shred_src.exists(), "--shred left the source");
}

/// `env:NAME` is read once and removed: the long-running daemon started by `keyward agent`
/// (background mode) must not carry the passphrase in its environment for its whole life
/// (readable in /proc/<pid>/environ and inherited by anything it spawns).
#[test]
fn the_background_agent_does_not_keep_an_env_passphrase() {
    let h = TestHome::new();
    h.import_ok("hs", Some("hmac-sha256"), HMAC_SECRET.as_bytes());
    let bg = h.background_agent(
        "env:KW_TEST_PASSPHRASE",
        &[("KW_TEST_PASSPHRASE", PASSPHRASE)],
    );
    assert!(!bg.printed.contains(PASSPHRASE), "printed the passphrase");
    let environ = fs::read(format!("/proc/{}/environ", bg.pid)).expect("environ");
    let found = environ
        .windows(PASSPHRASE.len())
        .any(|w| w == PASSPHRASE.as_bytes());
    common::signal(bg.pid, libc::SIGTERM);
    assert!(
        !found,
        "the background agent (pid {}) holds the passphrase in its environment",
        bg.pid
    );
}
