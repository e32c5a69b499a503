//! The audit log through the real agent and CLI: what is recorded, tamper detection by
//! `audit verify`, SIGKILL during bursts, and a full disk (tmpfs) with fail-closed/fail-open keys.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::TestHome;
use keyward::audit::Record;
use keyward::model::KeyName;
use serde_json::Value;

const HMAC_SECRET: &[u8] = b"audit-test-hmac-secret-7c1f0e9a44b2d8";

fn records(h: &TestHome) -> Vec<Record> {
    let out = h.ok(&["--json", "audit", "query"]);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("query output: {e}\n{out}"))
}

fn sha256_hex(b: &[u8]) -> String {
    keyward::audit::sha256_hex(b)
}

fn audit_files(h: &TestHome) -> Vec<PathBuf> {
    common::files_under(&h.home.join("audit"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect()
}

fn audit_text(h: &TestHome) -> String {
    audit_files(h)
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("reading the audit log"))
        .collect()
}

#[test]
fn every_request_denial_and_admin_action_is_recorded_without_secrets() {
    let h = TestHome::new();
    h.generate("ed", "ed25519");
    h.import_ok("mac", Some("hmac-sha256"), HMAC_SECRET);
    let agent = h.agent();
    let mut c = agent.client();
    let ed = KeyName::new("ed").unwrap();
    let mac = KeyName::new("mac").unwrap();
    let body = b"POST /api/v3/order symbol=BTCUSDT&side=BUY&quantity=1";
    let s1 = c.sign(&ed, body, None).expect("sign ed");
    let s2 = c.sign(&mac, b"hello", None).expect("sign mac");
    h.ok(&["lock", "--key", "mac", "--reason", "incident-42"]);
    let denied = c.sign(&mac, b"after lock", None).unwrap_err();
    assert_eq!(denied.code(), "locked");
    h.ok(&["unlock", "--key", "mac"]);
    let unknown = c
        .sign(&KeyName::new("nope").unwrap(), b"x", None)
        .unwrap_err();
    assert_eq!(unknown.code(), "unknown_key");
    drop(c);
    agent.stop();

    h.ok(&["audit", "verify"]);
    let recs = records(&h);
    let events: Vec<&str> = recs.iter().map(|r| r.event.as_str()).collect();
    // The CLI's key generate and import come first, then the agent's start.
    let ops: Vec<&str> = recs
        .iter()
        .filter_map(|r| r.op.as_deref())
        .take(2)
        .collect();
    assert_eq!(ops, ["key_generate", "key_import"], "{events:?}");
    assert_eq!(events.get(2), Some(&"agent_start"), "{events:?}");
    assert_eq!(events.last(), Some(&"agent_stop"), "{events:?}");
    let signs: Vec<&Record> = recs.iter().filter(|r| r.event == "sign").collect();
    assert_eq!(signs.len(), 4, "{signs:#?}");
    assert_eq!(signs[0].key.as_deref(), Some("ed"));
    assert_eq!(signs[0].decision.as_deref(), Some("allow"));
    assert_eq!(signs[0].version, Some(1));
    assert_eq!(
        signs[0].request_sha256.as_deref(),
        Some(sha256_hex(body).as_str())
    );
    let client = signs[0].client.as_ref().expect("client");
    assert_eq!(client.name, "owner");
    assert_eq!(client.uid, keyward::sys::effective_uid());
    assert!(client.pid.is_some_and(|p| p > 0));
    assert!(signs[0].latency_us.is_some());
    assert_eq!(signs[2].decision.as_deref(), Some("deny"));
    assert_eq!(signs[2].code.as_deref(), Some("locked"));
    assert_eq!(signs[3].decision.as_deref(), Some("error"));
    assert_eq!(signs[3].code.as_deref(), Some("unknown_key"));
    let admin: Vec<(&str, Option<&str>)> = recs
        .iter()
        .filter(|r| r.event == "admin")
        .map(|r| (r.op.as_deref().unwrap_or(""), r.key.as_deref()))
        .collect();
    assert!(admin.contains(&("lock", Some("mac"))), "{admin:?}");
    assert!(admin.contains(&("unlock", Some("mac"))), "{admin:?}");
    let lock = recs
        .iter()
        .find(|r| r.op.as_deref() == Some("lock"))
        .unwrap();
    assert_eq!(lock.reason.as_deref(), Some("incident-42"));

    // Query filters.
    let out = h.ok(&[
        "--json",
        "audit",
        "query",
        "--key",
        "mac",
        "--decision",
        "deny",
    ]);
    let v: Vec<Record> = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].code.as_deref(), Some("locked"));
    let out = h.ok(&["audit", "query", "--key", "ed"]);
    assert!(out.stdout.contains("allow"), "{out}");
    let out = h.ok(&[
        "--json", "audit", "query", "--since", "1h", "--event", "sign",
    ]);
    assert_eq!(
        serde_json::from_str::<Vec<Value>>(&out.stdout)
            .unwrap()
            .len(),
        4
    );
    let out = h.ok(&[
        "--json",
        "audit",
        "query",
        "--until",
        "2000-01-01T00:00:00Z",
    ]);
    assert_eq!(
        serde_json::from_str::<Vec<Value>>(&out.stdout)
            .unwrap()
            .len(),
        0
    );
    let out = h.ok(&["audit", "tail", "-n", "2"]);
    assert_eq!(out.stdout.lines().count(), 2, "{out}");
    assert!(out.stdout.contains("agent_stop"), "{out}");

    // No secret, passphrase, signature or body in the log.
    let text = audit_text(&h);
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    for (what, needle) in [
        (
            "hmac secret",
            String::from_utf8_lossy(HMAC_SECRET).to_string(),
        ),
        ("hmac secret (hex)", hex::encode(HMAC_SECRET)),
        ("passphrase", common::PASSPHRASE.to_string()),
        ("signature", s1.signature.clone()),
        ("signature", s2.signature.clone()),
        (
            "signature (hex)",
            hex::encode(b64.decode(&s2.signature).unwrap()),
        ),
        ("body", String::from_utf8_lossy(body).to_string()),
        ("body (base64)", b64.encode(body)),
        ("data", "after lock".to_string()),
    ] {
        assert!(!text.contains(&needle), "the audit log contains the {what}");
    }
}

/// Copy the home's audit dir into a fresh home, change one line with `edit`, and return what
/// `audit verify --json` said.
fn verify_tampered(src: &TestHome, edit: impl FnOnce(&mut Vec<String>)) -> (bool, Value) {
    let h = TestHome::new();
    let from = src.home.join("audit").join("audit-1.jsonl");
    let mut lines: Vec<String> = std::fs::read_to_string(&from)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    edit(&mut lines);
    std::fs::create_dir_all(h.home.join("audit")).unwrap();
    std::fs::write(
        h.home.join("audit").join("audit-1.jsonl"),
        lines.join("\n") + "\n",
    )
    .unwrap();
    let out = h.run(&["--json", "audit", "verify"]);
    let v: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}\n{out}"));
    (out.success(), v)
}

#[test]
fn audit_verify_names_each_kind_of_tampering_at_its_seq() {
    let h = TestHome::new();
    h.import_ok("mac", Some("hmac-sha256"), HMAC_SECRET);
    let agent = h.agent();
    let mut c = agent.client();
    let mac = KeyName::new("mac").unwrap();
    for i in 0..12u32 {
        c.sign(&mac, &i.to_be_bytes(), None).expect("sign");
    }
    drop(c);
    agent.stop();
    let out = h.ok(&["--json", "audit", "verify"]);
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(v["problem"].is_null(), "{v}");
    let n = v["records"].as_u64().unwrap();
    assert!(n >= 14, "{v}");

    let problem = |v: &Value| {
        (
            v["problem"]["kind"].as_str().unwrap_or("").to_string(),
            v["problem"]["seq"].as_u64(),
            v["problem"]["line"].as_u64(),
        )
    };
    let (ok, v) = verify_tampered(&h, |l| l[5] = l[5].replace("\"mac\"", "\"cam\""));
    assert!(!ok);
    assert_eq!(problem(&v), ("edited".into(), Some(6), Some(6)));
    let (ok, v) = verify_tampered(&h, |l| {
        l.remove(6);
    });
    assert!(!ok);
    assert_eq!(problem(&v), ("missing".into(), Some(7), Some(7)));
    let (ok, v) = verify_tampered(&h, |l| l.swap(7, 8));
    assert!(!ok);
    assert_eq!(problem(&v), ("reordered".into(), Some(9), Some(8)));
    let (ok, v) = verify_tampered(&h, |l| {
        let copy = l[2].clone();
        l.insert(9, copy);
    });
    assert!(!ok);
    assert_eq!(problem(&v), ("inserted".into(), Some(3), Some(10)));
    // Human output names the seq and file too.
    let (ok, _) = verify_tampered(&h, |_| {});
    assert!(ok, "an untouched copy verifies");
    let out = h.ok(&["audit", "verify"]);
    assert!(out.stdout.contains("audit log OK"), "{out}");
}

/// A client's record of what it received: (request data, signature).
type Received = Arc<Mutex<Vec<(Vec<u8>, String)>>>;

#[test]
fn sigkill_during_bursts_loses_no_record_of_a_released_signature() {
    let h = TestHome::new();
    // prod (the default): fail-closed, a signature is released only once its record is durable.
    h.import_ok("mac", Some("hmac-sha256"), HMAC_SECRET);
    let received: Received = Arc::new(Mutex::new(Vec::new()));
    for round in 0..20u32 {
        let agent = h.agent();
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for t in 0..3u32 {
            let sock = agent.sock.clone();
            let stop = stop.clone();
            let received = received.clone();
            threads.push(std::thread::spawn(move || {
                let Ok(mut c) = keyward::client::Client::connect(&sock) else {
                    return;
                };
                let _ = c.set_timeout(Some(Duration::from_secs(5)));
                let key = KeyName::new("mac").unwrap();
                let mut i = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let data = format!("round {round} thread {t} request {i}").into_bytes();
                    match c.sign(&key, &data, None) {
                        Ok(s) => received.lock().unwrap().push((data, s.signature)),
                        Err(_) => return,
                    }
                    i += 1;
                }
            }));
        }
        std::thread::sleep(Duration::from_millis(100 + u64::from(round % 5) * 40));
        agent.kill9();
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        if round % 5 == 4 {
            // A crash in the middle of a write: a torn last line.
            let f = audit_files(&h).into_iter().max().unwrap();
            let mut b = std::fs::read(&f).unwrap();
            b.extend_from_slice(b"{\"seq\":999999,\"ts\":\"2026-");
            std::fs::write(&f, b).unwrap();
        }
    }
    // The last restart repairs the last torn tail; stop it cleanly.
    h.agent().stop();
    let out = h.run(&["--json", "audit", "verify"]);
    assert!(
        out.success(),
        "the chain does not verify after the kills:\n{out}"
    );
    let recs = records(&h);
    let allowed: HashSet<&str> = recs
        .iter()
        .filter(|r| r.event == "sign" && r.decision.as_deref() == Some("allow"))
        .filter_map(|r| r.request_sha256.as_deref())
        .collect();
    let got = received.lock().unwrap();
    assert!(
        got.len() > 100,
        "too few signatures to mean anything: {}",
        got.len()
    );
    for (data, _) in got.iter() {
        assert!(
            allowed.contains(sha256_hex(data).as_str()),
            "a signature was released without a record: {}",
            String::from_utf8_lossy(data)
        );
    }
    let repairs = recs
        .iter()
        .filter(|r| r.event == "repair")
        .filter(|r| r.reason.as_deref().is_some_and(|s| s.contains("torn")))
        .count();
    assert_eq!(repairs, 4, "each torn tail is recorded once");
    assert_eq!(recs.iter().filter(|r| r.event == "agent_start").count(), 21);
}

/// A tmpfs mounted on the home's audit dir, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .expect("running mount");
        assert!(
            st.success(),
            "mounting a tmpfs for the disk-full test needs root (CAP_SYS_ADMIN)"
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fill the file system holding `dir` with a filler file.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    p
}

fn audit_status(agent: &common::Agent) -> keyward::proto::AuditStatus {
    agent
        .client()
        .status()
        .unwrap()
        .audit
        .expect("status has audit")
}

#[test]
fn a_full_disk_stops_fail_closed_keys_only_and_service_resumes() {
    let h = TestHome::new();
    h.import_ok("prodmac", Some("hmac-sha256"), HMAC_SECRET);
    let out = h.run_stdin(
        &[
            "key",
            "import",
            "demomac",
            "--type",
            "hmac-sha256",
            "--env",
            "demo",
            "--file",
            "-",
        ],
        b"another-secret-for-the-demo-key-00",
    );
    assert!(out.success(), "{out}");
    let audit_dir = h.home.join("audit");
    // Whatever the CLI wrote so far moves onto the small file system.
    let saved: Vec<(PathBuf, Vec<u8>)> = audit_files(&h)
        .into_iter()
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();
    let _ = std::fs::remove_dir_all(&audit_dir);
    let _mnt = Tmpfs::mount(&audit_dir, "256k");
    for (p, b) in &saved {
        std::fs::write(p, b).unwrap();
    }
    let agent = h.agent();
    let mut c = agent.client();
    let prod = KeyName::new("prodmac").unwrap();
    let demo = KeyName::new("demomac").unwrap();
    c.sign(&prod, b"before", None)
        .expect("prod signs while there is space");

    let filler = fill(&audit_dir);
    // The log file's last page may still have room for a few records.
    let mut refused = None;
    for i in 0..40u32 {
        if let Err(e) = c.sign(&prod, format!("filling {i}").as_bytes(), None) {
            refused = Some(e);
            break;
        }
    }
    let e = refused.expect("a fail-closed key stops signing when the log cannot be written");
    assert_eq!(e.code(), "audit_unavailable", "{e}");
    let e = c.sign(&prod, b"disk full", None).unwrap_err();
    assert_eq!(e.code(), "audit_unavailable", "{e}");
    for i in 0..5u32 {
        c.sign(&demo, &i.to_be_bytes(), None)
            .expect("a fail-open key keeps signing");
    }
    let e = c.sign(&prod, b"still full", None).unwrap_err();
    assert_eq!(e.code(), "audit_unavailable");
    let st = audit_status(&agent);
    assert!(!st.available, "{st:?}");
    assert!(st.dropped >= 5, "dropped records are counted: {st:?}");
    let metrics = agent.client().status().unwrap().metrics.expect("metrics");
    let dropped: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("keyward_audit_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("keyward_audit_dropped_total");
    assert!(
        dropped >= 5.0,
        "the dropped-records metric rises:\n{metrics}"
    );
    assert!(metrics.contains("keyward_audit_available 0"), "{metrics}");
    // Nothing half-written: the log is still a verifiable prefix.
    let during = std::fs::read(audit_files(&h).into_iter().max().unwrap()).unwrap();
    assert!(
        during.ends_with(b"\n"),
        "a half-written record is left in the log"
    );
    assert!(h.run(&["audit", "verify"]).success());

    std::fs::remove_file(&filler).unwrap();
    let s = c
        .sign(&prod, b"space is back", None)
        .expect("service resumes");
    assert_eq!(s.version, 1);
    assert!(audit_status(&agent).available);
    drop(c);
    agent.stop();
    h.ok(&["audit", "verify"]);
    let recs = records(&h);
    let gap = recs
        .iter()
        .find(|r| r.event == "gap")
        .expect("a gap record");
    assert!(
        gap.reason
            .as_deref()
            .is_some_and(|r| r.contains("could not be written")),
        "{gap:?}"
    );
    let signed: Vec<&str> = recs
        .iter()
        .filter(|r| r.event == "sign" && r.decision.as_deref() == Some("allow"))
        .filter_map(|r| r.request_sha256.as_deref())
        .collect();
    assert!(signed.contains(&sha256_hex(b"space is back").as_str()));
    assert!(!signed.contains(&sha256_hex(b"disk full").as_str()));
}

#[test]
fn cli_admin_actions_join_the_agents_chain() {
    let h = TestHome::new();
    h.import_ok("mac", Some("hmac-sha256"), HMAC_SECRET);
    let agent = h.agent();
    let mut c = agent.client();
    c.sign(&KeyName::new("mac").unwrap(), b"x", None).unwrap();
    // While the agent runs, the CLI appends under the same lock.
    h.generate("ed2", "ed25519");
    c.sign(&KeyName::new("ed2").unwrap(), b"y", None).unwrap();
    drop(c);
    agent.stop();
    h.ok(&["audit", "verify"]);
    let recs = records(&h);
    let ops: Vec<String> = recs
        .iter()
        .map(|r| format!("{}:{}", r.event, r.op.as_deref().unwrap_or("")))
        .collect();
    let gen = ops.iter().position(|o| o == "admin:key_generate");
    let reload = ops.iter().position(|o| o == "admin:reload");
    assert!(gen.is_some() && reload.is_some() && gen < reload, "{ops:?}");
}
