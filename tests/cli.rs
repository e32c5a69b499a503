//! The `keyward` CLI: refusals of bad passphrases, loose permissions, malformed key material and
//! unsafe key names (and that nothing is left behind), shred/delete, `--json` errors,
//! lock/unlock, reload, sign, completions and the background agent.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::verify::{der_to_pem, Verifier};
use common::{
    files_under, key_name, random_bytes, run_command, tool, unb64, wait_until, write_private,
    TestHome, PASSPHRASE,
};
use keyward::client::Client;

const SECRET: &[u8] = b"kw-cli-test-hmac-secret-a1b2c3";

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

/// Files under `dir` whose name does not start with `.tmp-` (temp files are not keys).
fn non_temp_files(dir: &Path) -> Vec<String> {
    common::list_dir(dir)
        .into_iter()
        .filter(|n| !n.starts_with(".tmp-"))
        .collect()
}

#[test]
fn a_wrong_passphrase_is_refused_by_the_agent_and_by_a_shredding_import() {
    let h = TestHome::new();
    let wrong = h.path("wrong-pass");
    write_private(&wrong, b"not-the-passphrase-at-all\n");
    let wrong_src = format!("file:{}", wrong.display());

    let mut p = h.spawn_agent_raw(&wrong_src, "agent-wrong-pass");
    let st = p.wait_exit(Duration::from_secs(30)).unwrap_or_else(|| {
        p.terminate();
        panic!(
            "the agent kept running with a wrong passphrase\n{}",
            p.log()
        )
    });
    assert!(!st.success(), "agent with a wrong passphrase exited 0");
    assert!(
        p.stderr().contains("bad_passphrase"),
        "agent stderr does not name bad_passphrase:\n{}",
        p.log()
    );
    assert!(
        Client::connect(&h.sock).is_err(),
        "something answers on the socket of an agent that refused to start"
    );

    // The background start reports the daemon's refusal too.
    let out = h.run(&["agent", "--passphrase", &wrong_src]);
    if out.success() {
        if let Ok(st) = Client::connect(&h.sock).and_then(|mut c| c.status()) {
            common::signal(st.pid, libc::SIGKILL);
        }
    }
    out.assert_error("bad_passphrase");

    let src = h.path("secret.txt");
    write_private(&src, SECRET);
    let src_s = src.display().to_string();
    let out = h.run(&[
        "key",
        "import",
        "shredded",
        "--type",
        "hmac-sha256",
        "--file",
        &src_s,
        "--shred",
        "--passphrase",
        &wrong_src,
    ]);
    out.assert_error("bad_passphrase");
    assert_eq!(
        fs::read(&src).expect("the source must survive a failed --shred import"),
        SECRET,
        "the source file was changed although the import failed"
    );
    assert!(
        !h.listed_keys().contains(&"shredded".to_string()),
        "a key whose --shred import failed verification is listed"
    );
}

#[test]
fn a_loose_passphrase_file_is_refused_and_nothing_is_created() {
    let h = TestHome::uninitialized();
    chmod(&h.pass_file, 0o644);
    let out = h.init();
    out.assert_error("insecure_permissions");
    assert!(
        !h.home.join("identity.age").exists(),
        "init left identity.age behind"
    );
    let left = files_under(&h.home);
    assert!(left.is_empty(), "init left files behind: {left:?}");
    assert!(
        !out.stderr.contains(PASSPHRASE),
        "the error printed the passphrase:\n{out}"
    );

    // Fixed permissions: init works; loosening them again stops the agent and --shred.
    chmod(&h.pass_file, 0o600);
    h.init().expect_success();
    let home_mode = fs::metadata(&h.home).expect("home").permissions().mode() & 0o777;
    assert_eq!(home_mode, 0o700, "home mode");
    let id_mode = fs::metadata(h.home.join("identity.age"))
        .expect("identity.age")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(id_mode & 0o077, 0, "identity.age readable by others");
    // A second init must not clobber the identity.
    let before = fs::read(h.home.join("identity.age")).expect("identity.age");
    h.init().assert_error("already_exists");
    assert_eq!(fs::read(h.home.join("identity.age")).expect("id"), before);

    chmod(&h.pass_file, 0o640);
    let mut p = h.spawn_agent_raw(&h.pass_source(), "agent-loose-pass");
    let st = p.wait_exit(Duration::from_secs(30)).unwrap_or_else(|| {
        p.terminate();
        panic!(
            "the agent accepted a group-readable passphrase file\n{}",
            p.log()
        )
    });
    assert!(!st.success());
    assert!(
        p.stderr().contains("insecure_permissions"),
        "agent stderr does not name insecure_permissions:\n{}",
        p.log()
    );

    let src = h.path("secret.txt");
    write_private(&src, SECRET);
    h.import_shred("s", &src, &h.pass_source())
        .assert_error("insecure_permissions");
    assert!(src.exists(), "--shred removed the source after a refusal");

    // A home others can read is refused too.
    chmod(&h.pass_file, 0o600);
    chmod(&h.home, 0o755);
    h.run(&["key", "generate", "k", "--type", "ed25519"])
        .assert_error("insecure_permissions");
    chmod(&h.home, 0o700);
}

#[test]
fn malformed_key_material_is_refused_and_leaves_no_files() {
    let h = TestHome::new();
    let good_p256 = {
        let k = loop {
            if let Ok(k) = p256::SecretKey::from_slice(&random_bytes(32)) {
                break k;
            }
        };
        der_to_pem(
            p256::pkcs8::EncodePrivateKey::to_pkcs8_der(&k)
                .expect("PKCS#8")
                .as_bytes(),
            "PRIVATE KEY",
        )
    };
    let lines: Vec<&str> = good_p256.lines().collect();
    let truncated = format!("{}\n{}\n{}\n", lines[0], lines[1], lines[lines.len() - 1]);
    let cases: Vec<(&str, Option<&str>, Vec<u8>)> = vec![
        (
            "not base64",
            None,
            b"-----BEGIN PRIVATE KEY-----\n!!!! not base64 !!!!\n-----END PRIVATE KEY-----\n"
                .to_vec(),
        ),
        (
            "base64 but not DER",
            None,
            b"-----BEGIN PRIVATE KEY-----\naGVsbG8gd29ybGQgdGhpcyBpcyBub3QgREVS\n-----END PRIVATE KEY-----\n"
                .to_vec(),
        ),
        ("truncated PKCS#8", None, truncated.into_bytes()),
        (
            "no END line",
            None,
            good_p256.lines().take(2).collect::<Vec<_>>().join("\n").into_bytes(),
        ),
        (
            "certificate",
            None,
            b"-----BEGIN CERTIFICATE-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\n-----END CERTIFICATE-----\n"
                .to_vec(),
        ),
        (
            "encrypted PKCS#8",
            None,
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\n-----END ENCRYPTED PRIVATE KEY-----\n"
                .to_vec(),
        ),
        ("P-256 key imported as ed25519", Some("ed25519"), good_p256.clone().into_bytes()),
        ("P-256 key imported as hmac", Some("hmac-sha256"), good_p256.clone().into_bytes()),
        ("not PEM, no --type", None, b"just some text\n".to_vec()),
        ("empty", Some("hmac-sha256"), Vec::new()),
        ("only a newline", Some("hmac-sha512"), b"\n".to_vec()),
        ("short hex", Some("secp256k1"), b"0x1234abcd\n".to_vec()),
        (
            "zero secp256k1 scalar",
            Some("secp256k1"),
            format!("0x{}\n", "0".repeat(64)).into_bytes(),
        ),
        (
            "non-hex secp256k1",
            Some("secp256k1"),
            format!("0x{}\n", "g".repeat(64)).into_bytes(),
        ),
        ("raw bytes as p256", Some("p256"), random_bytes(32)),
    ];
    for (i, (what, ty, material)) in cases.iter().enumerate() {
        let name = format!("bad{i}");
        let out = h.import(&name, *ty, material);
        assert!(!out.success(), "{what}: import succeeded:\n{out}");
        assert_eq!(
            out.error_code().as_deref(),
            Some("invalid_key_material"),
            "{what}: wrong error:\n{out}"
        );
        let left = non_temp_files(&h.keys_dir());
        assert!(left.is_empty(), "{what}: files left in keys/: {left:?}");
    }
    // An RSA size keyward does not support is `unsupported`, and leaves nothing either.
    let rsa1024 = h.path("rsa1024.pem");
    tool(
        "openssl",
        &["genrsa", "-out", &rsa1024.display().to_string(), "1024"],
    );
    let out = h.import(
        "rsa-small",
        None,
        &fs::read(&rsa1024).expect("reading rsa1024.pem"),
    );
    assert!(!out.success(), "RSA-1024 import succeeded:\n{out}");
    assert!(
        matches!(
            out.error_code().as_deref(),
            Some("unsupported" | "invalid_key_material")
        ),
        "RSA-1024:\n{out}"
    );
    assert!(non_temp_files(&h.keys_dir()).is_empty());
    assert!(h.listed_keys().is_empty(), "a refused import is listed");
    // The good key still imports (the refusals were not about the home).
    h.import_ok("good", None, good_p256.as_bytes());
    assert_eq!(h.listed_keys(), vec!["good".to_string()]);
}

#[test]
fn key_names_with_path_components_are_refused() {
    let h = TestHome::new();
    let bad_names = [
        "../evil",
        "a/b",
        "..",
        ".",
        ".hidden",
        "/tmp/evil",
        "Upper",
        "-flag",
        "sp ace",
        "",
    ];
    for name in bad_names {
        let out = h.run(&["key", "generate", name, "--type", "ed25519"]);
        // A name starting with '-' may be taken as a flag by clap (usage error, exit 2).
        if name.starts_with('-') && out.status.code() == Some(2) {
            continue;
        }
        out.assert_error("bad_request");
        let out = h.import(name, Some("hmac-sha256"), SECRET);
        assert!(!out.success(), "import {name:?} succeeded:\n{out}");
        if !(name.starts_with('-') && out.status.code() == Some(2)) {
            out.assert_error("bad_request");
        }
        for dir in [h.dir.path(), &h.keys_dir(), Path::new("/tmp")] {
            let stray: Vec<String> = common::list_dir(dir)
                .into_iter()
                .filter(|f| {
                    f == "evil"
                        || f.starts_with("evil.")
                        || f == "hidden"
                        || f.starts_with(".hidden")
                })
                .collect();
            assert!(stray.is_empty(), "{name:?} created {stray:?} in {dir:?}");
        }
        let left = non_temp_files(&h.keys_dir());
        assert!(left.is_empty(), "{name:?}: files in keys/: {left:?}");
    }
    // With --json the refusal is a JSON error too.
    let out = h.run(&["--json", "key", "generate", "../evil", "--type", "ed25519"]);
    out.assert_error("bad_request");
    assert!(out.json_error().is_some(), "not a JSON error:\n{out}");
    let too_long = "a".repeat(65);
    h.run(&["key", "generate", &too_long, "--type", "ed25519"])
        .assert_error("bad_request");
    // 64 characters is the limit, and is fine.
    h.generate(&"a".repeat(64), "ed25519");
}

#[test]
fn shred_removes_the_source_only_after_a_verified_import() {
    let h = TestHome::new();
    let src = h.path("exchange-secret");
    write_private(&src, SECRET);
    let out = h
        .import_shred("shredded", &src, &h.pass_source())
        .expect_success();
    assert!(
        !src.exists(),
        "--shred left the source file in place:\n{out}"
    );
    // A PEM source too.
    let k = loop {
        if let Ok(k) = k256::SecretKey::from_slice(&random_bytes(32)) {
            break k;
        }
    };
    let pem_src = h.path("wallet.pem");
    write_private(
        &pem_src,
        k256::pkcs8::EncodePrivateKey::to_pkcs8_pem(&k, k256::pkcs8::LineEnding::LF)
            .expect("PKCS#8")
            .as_bytes(),
    );
    h.ok(&[
        "key",
        "import",
        "wallet",
        "--file",
        &pem_src.display().to_string(),
        "--shred",
        "--passphrase",
        &h.pass_source(),
    ]);
    assert!(!pem_src.exists(), "--shred left the PEM source in place");

    let agent = h.agent();
    let mut c = agent.client();
    let msg = b"shredded but usable";
    let r = c
        .sign(&key_name("shredded"), msg, None)
        .expect("sign with the shredded-import key");
    Verifier::Hmac(SECRET.to_vec())
        .verify("hmac-sha256", msg, &unb64(&r.signature))
        .expect("tag of the shredded-import key");
    let r = c
        .sign(&key_name("wallet"), msg, None)
        .expect("sign with the wallet key");
    Verifier::Secp256k1(k.public_key().into())
        .verify("ecdsa-secp256k1-keccak256", msg, &unb64(&r.signature))
        .expect("wallet signature");
}

/// A source `--shred` cannot shred (here: it has a second hard link) must be refused before
/// anything is imported: an error exit must not leave a half-done import behind (a retry would
/// then fail with `already_exists`).
#[test]
fn a_shred_that_cannot_shred_imports_nothing() {
    let h = TestHome::new();
    let src = h.path("linked-secret");
    write_private(&src, SECRET);
    let other_link = h.path("second-link");
    fs::hard_link(&src, &other_link).expect("hard link");
    let out = h.import_shred("linked", &src, &h.pass_source());
    assert!(!out.success(), "a hard-linked source was shredded:\n{out}");
    assert_eq!(fs::read(&src).expect("source kept"), SECRET);
    assert!(
        h.listed_keys().is_empty(),
        "the import failed (exit {:?}) but the key was imported anyway:\n{out}",
        out.status.code()
    );
    // --shred of standard input is refused up front too.
    let out = h.run_stdin(
        &[
            "key",
            "import",
            "stdin-shred",
            "--type",
            "hmac-sha256",
            "--shred",
            "--passphrase",
            &h.pass_source(),
        ],
        SECRET,
    );
    out.assert_error("bad_request");
    assert!(h.listed_keys().is_empty());
}

#[test]
fn key_delete_removes_metadata_and_material() {
    let h = TestHome::new();
    h.generate("doomed", "p256");
    h.generate("kept", "ed25519");
    h.run(&["key", "generate", "doomed", "--type", "p256"])
        .assert_error("already_exists");
    let files = non_temp_files(&h.keys_dir());
    let doomed: Vec<&String> = files.iter().filter(|f| f.starts_with("doomed.")).collect();
    assert!(
        doomed.iter().any(|f| f.ends_with(".toml")) && doomed.iter().any(|f| f.ends_with(".age")),
        "expected doomed.toml and a doomed.*.age: {files:?}"
    );
    let shown = h.ok(&["key", "show", "doomed"]);
    assert!(shown.stdout.contains("p256"), "key show:\n{shown}");

    // Without --yes and without a terminal, nothing is deleted.
    let out = h.run(&["key", "delete", "doomed"]);
    assert!(!out.success(), "delete without --yes and no tty succeeded");
    assert_eq!(
        non_temp_files(&h.keys_dir()),
        files,
        "delete without --yes removed files"
    );

    h.ok(&["key", "delete", "doomed", "--yes"]);
    let after = non_temp_files(&h.keys_dir());
    assert!(
        !after.iter().any(|f| f.starts_with("doomed.")),
        "delete left files: {after:?}"
    );
    assert!(
        after.iter().any(|f| f == "kept.toml"),
        "delete removed another key: {after:?}"
    );
    assert_eq!(h.listed_keys(), vec!["kept".to_string()]);
    h.run(&["key", "show", "doomed"])
        .assert_error("unknown_key");
    h.run(&["key", "delete", "doomed", "--yes"])
        .assert_error("unknown_key");
    // The name can be reused, and is a new key.
    h.generate("doomed", "p256");
}

#[test]
fn json_errors_parse_and_human_errors_have_code_and_hint() {
    let h = TestHome::new();
    let out = h.run(&["--json", "key", "show", "nope"]);
    out.assert_error("unknown_key");
    let e = out
        .json_error()
        .unwrap_or_else(|| panic!("--json error output is not JSON:\n{out}"));
    assert_eq!(e["code"], "unknown_key");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    assert!(e["hint"].as_str().is_some_and(|m| !m.is_empty()), "{e}");

    let out = h.run(&["key", "show", "nope"]);
    out.assert_error("unknown_key");
    assert!(
        out.stderr.starts_with("error[unknown_key]: "),
        "human error format:\n{out}"
    );
    assert!(out.stderr.contains("\n  hint: "), "no hint line:\n{out}");

    let fresh = TestHome::uninitialized();
    let out = fresh.run(&["--json", "key", "list"]);
    out.assert_error("not_initialized");
    assert!(out.json_error().is_some(), "not JSON:\n{out}");

    // No agent: agent_unreachable, as JSON too.
    let out = h.run(&["--json", "status"]);
    out.assert_error("agent_unreachable");

    // Usage errors are clap's (exit 2).
    let out = h.run(&["key", "generate", "x"]);
    assert_eq!(out.status.code(), Some(2), "missing --type:\n{out}");
    let out = h.run(&["key", "generate", "x", "--type", "rsa-1024"]);
    assert!(!out.success());
    assert!(matches!(out.status.code(), Some(1) | Some(2)));
}

fn sign_code(c: &mut Client, key: &str) -> Result<(), String> {
    c.sign(&key_name(key), b"lock test", None)
        .map(|_| ())
        .map_err(|e| e.code().to_string())
}

#[test]
fn lock_and_unlock_through_the_cli() {
    let h = TestHome::new();
    h.import_ok("a", Some("hmac-sha256"), SECRET);
    h.generate("b", "ed25519");
    let agent = h.agent();
    let mut c = agent.client();
    assert_eq!(sign_code(&mut c, "a"), Ok(()));

    h.ok(&["lock", "--all", "--reason", "incident drill"]);
    assert_eq!(sign_code(&mut c, "a"), Err("locked".into()));
    assert_eq!(sign_code(&mut c, "b"), Err("locked".into()));
    let st = c.status().expect("status");
    assert!(
        st.locks
            .iter()
            .any(|l| l.key.is_none() && l.reason.as_deref() == Some("incident drill")),
        "status does not show the global lock: {:?}",
        st.locks
    );
    h.ok(&["unlock", "--all"]);
    assert_eq!(sign_code(&mut c, "a"), Ok(()));
    assert_eq!(sign_code(&mut c, "b"), Ok(()));
    assert!(c.status().expect("status").locks.is_empty());

    h.ok(&["lock", "--key", "a"]);
    assert_eq!(sign_code(&mut c, "a"), Err("locked".into()));
    assert_eq!(
        sign_code(&mut c, "b"),
        Ok(()),
        "locking key a also locked key b"
    );
    let keys = c.list_keys().expect("list_keys");
    let locked: Vec<(&str, bool)> = keys.iter().map(|k| (k.name.as_str(), k.locked)).collect();
    assert_eq!(locked, [("a", true), ("b", false)]);
    h.ok(&["unlock", "--key", "a"]);
    assert_eq!(sign_code(&mut c, "a"), Ok(()));

    // Unknown key: an error, not a silent no-op.
    let out = h.run(&["lock", "--key", "nope"]);
    out.assert_error("unknown_key");
}

#[test]
fn locks_survive_an_agent_restart() {
    let h = TestHome::new();
    h.import_ok("a", Some("hmac-sha256"), SECRET);
    let agent = h.agent();
    h.ok(&["lock", "--key", "a", "--reason", "persist me"]);
    assert_eq!(sign_code(&mut agent.client(), "a"), Err("locked".into()));
    agent.stop();
    let agent = h.agent();
    assert_eq!(
        sign_code(&mut agent.client(), "a"),
        Err("locked".into()),
        "a lock did not survive a restart"
    );
    h.ok(&["unlock", "--key", "a"]);
    assert_eq!(sign_code(&mut agent.client(), "a"), Ok(()));
}

#[test]
fn reload_makes_a_new_key_usable_and_generate_notifies_the_agent() {
    let h = TestHome::new();
    h.generate("first", "ed25519");
    let agent = h.agent();
    let mut c = agent.client();
    // Generated while the agent cannot be told (socket elsewhere): unknown until `reload`.
    let elsewhere = h.path("nowhere.sock").display().to_string();
    let out = h.run_full(
        &["key", "generate", "late", "--type", "hmac-sha512"],
        None,
        &[("KEYWARD_SOCK", &elsewhere)],
    );
    assert!(
        out.success(),
        "generate with no agent reachable failed:\n{out}"
    );
    assert_eq!(sign_code(&mut c, "late"), Err("unknown_key".into()));
    h.ok(&["reload"]);
    assert_eq!(
        sign_code(&mut c, "late"),
        Ok(()),
        "reload did not load the key"
    );
    assert_eq!(sign_code(&mut c, "first"), Ok(()), "reload lost a key");

    // With the agent reachable, generate tells it to reload.
    h.generate("auto", "p384");
    assert_eq!(
        sign_code(&mut c, "auto"),
        Ok(()),
        "generate did not reload the agent"
    );
    // And delete makes it unknown.
    h.ok(&["key", "delete", "auto", "--yes"]);
    let gone = wait_until(Duration::from_secs(2), || {
        sign_code(&mut c, "auto") == Err("unknown_key".into())
    });
    if !gone {
        h.ok(&["reload"]);
        assert_eq!(
            sign_code(&mut c, "auto"),
            Err("unknown_key".into()),
            "a deleted key still signs after reload"
        );
    }
}

#[test]
fn cli_sign_prints_a_verifiable_signature() {
    let h = TestHome::new();
    h.import_ok("hm", Some("hmac-sha256"), SECRET);
    h.generate("ed", "ed25519");
    let agent = h.agent();
    let msg = b"timestamp=1700000000000&symbol=ETHUSDT";
    let out = run_command(
        {
            let mut c = h.command();
            c.args(["sign", "--key", "hm"]);
            c
        },
        Some(msg),
    );
    assert!(out.success(), "{out}");
    Verifier::Hmac(SECRET.to_vec())
        .verify("hmac-sha256", msg, &unb64(out.stdout.trim()))
        .expect("CLI HMAC signature (stdin, base64)");

    let f = h.path("msg");
    fs::write(&f, msg).expect("writing msg");
    let out = h.ok(&[
        "sign",
        "--key",
        "hm",
        "--scheme",
        "hmac-sha512",
        "--file",
        &f.display().to_string(),
        "--encoding",
        "hex",
    ]);
    let tag = hex::decode(out.stdout.trim()).expect("hex signature");
    Verifier::Hmac(SECRET.to_vec())
        .verify("hmac-sha512", msg, &tag)
        .expect("CLI HMAC-SHA512 signature (file, hex)");

    let mut c = agent.client();
    let pem = c.public_key(&key_name("ed"), "pem").expect("public_key");
    let v = Verifier::from_spki_pem("ed25519", pem.public_key.as_str().expect("pem"));
    let out = h.ok(&[
        "--json",
        "sign",
        "--key",
        "ed",
        "--file",
        &f.display().to_string(),
    ]);
    let j = out.json();
    assert_eq!(j["key"], "ed", "{j}");
    assert_eq!(j["scheme"], "ed25519", "{j}");
    v.verify(
        "ed25519",
        msg,
        &unb64(j["signature"].as_str().expect("signature")),
    )
    .expect("CLI ed25519 signature (--json)");

    h.run(&["sign", "--key", "nope", "--file", &f.display().to_string()])
        .assert_error("unknown_key");
}

#[test]
fn completions_are_printed_for_each_shell() {
    let h = TestHome::uninitialized();
    for shell in ["bash", "zsh", "fish"] {
        let out = h.ok(&["completions", shell]);
        assert!(
            out.stdout.len() > 100 && out.stdout.contains("keyward"),
            "{shell} completions look empty:\n{out}"
        );
    }
    let out = h.run(&["completions", "tcsh-from-1983"]);
    assert!(!out.success());
}

#[test]
fn the_background_agent_starts_reports_and_stops() {
    let h = TestHome::new();
    h.import_ok("hm", Some("hmac-sha256"), SECRET);
    let bg = h.background_agent(&h.pass_source(), &[]);
    assert!(
        bg.printed.contains(&h.sock.display().to_string()),
        "the socket path is not printed:\n{}",
        bg.printed
    );
    assert!(
        bg.printed.contains(&bg.pid.to_string()),
        "the pid is not printed:\n{}",
        bg.printed
    );
    let mut c = Client::connect(&h.sock).expect("the background agent answers");
    c.set_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    assert!(c.sign(&key_name("hm"), b"x", None).is_ok());
    let cli_status = h.ok(&["--json", "status"]).json();
    assert_eq!(cli_status["pid"], bg.pid, "{cli_status}");
    assert!(
        h.home.join("agent.log").exists(),
        "the background agent writes no agent.log"
    );
    drop(c);
    common::signal(bg.pid, libc::SIGTERM);
    let stopped = wait_until(Duration::from_secs(10), || !bg.alive());
    assert!(stopped, "the background agent ignored SIGTERM");
    assert!(
        Client::connect(&h.sock)
            .and_then(|mut c| c.status())
            .is_err(),
        "the socket still answers after SIGTERM"
    );
}

#[test]
fn agent_lifecycle_second_agent_sighup_and_stale_socket() {
    let h = TestHome::new();
    h.import_ok("a", Some("hmac-sha256"), SECRET);
    let mut first = h.agent();

    // A second agent on the same socket is refused; the first keeps serving.
    let mut second = h.spawn_agent_raw(&h.pass_source(), "agent-second");
    let st = second
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| {
            second.terminate();
            panic!("a second agent started on a live socket\n{}", second.log())
        });
    assert!(!st.success());
    assert!(
        second.stderr().contains("already_exists"),
        "second agent:\n{}",
        second.log()
    );
    first.assert_serving("a second agent tried the socket");

    // SIGHUP reloads keys.
    let elsewhere = h.path("nowhere.sock").display().to_string();
    let out = h.run_full(
        &["key", "generate", "hup", "--type", "ed25519"],
        None,
        &[("KEYWARD_SOCK", &elsewhere)],
    );
    assert!(out.success(), "{out}");
    let mut c = first.client();
    assert_eq!(sign_code(&mut c, "hup"), Err("unknown_key".into()));
    common::signal(first.pid, libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || sign_code(&mut c, "hup").is_ok()),
        "SIGHUP did not reload the keys\n{}",
        first.log()
    );
    drop(c);

    // SIGKILL leaves a stale socket file; the next agent replaces it.
    first.kill9();
    assert!(h.sock.exists(), "expected a stale socket after SIGKILL");
    let next = h.agent();
    let mut c = next.client();
    assert_eq!(sign_code(&mut c, "a"), Ok(()));
    assert_eq!(sign_code(&mut c, "hup"), Ok(()));
    drop(c);
    let st = next.stop();
    assert!(st.success(), "SIGTERM exit status {st}");
    assert!(!h.sock.exists(), "socket left after a clean stop");
}

#[test]
fn a_corrupt_key_file_disables_only_that_key() {
    let h = TestHome::new();
    h.import_ok("good", Some("hmac-sha256"), SECRET);
    h.generate("bad", "ed25519");
    let age = h
        .key_files()
        .into_iter()
        .find(|f| f.starts_with("bad.") && f.ends_with(".age"))
        .expect("bad's .age file");
    let p = h.keys_dir().join(&age);
    let mut data = fs::read(&p).expect("reading the age file");
    let n = data.len();
    data.truncate(n - 20);
    fs::write(&p, &data).expect("truncating the age file");

    let agent = h.agent();
    let mut c = agent.client();
    assert_eq!(
        sign_code(&mut c, "good"),
        Ok(()),
        "a good key stopped working"
    );
    assert_eq!(
        sign_code(&mut c, "bad"),
        Err("backend_unavailable".into()),
        "a key whose file does not decrypt"
    );
    assert!(
        agent.log().contains("bad"),
        "the agent does not log which key failed to load\n{}",
        agent.log()
    );
}
