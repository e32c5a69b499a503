//! A second uid is refused by peer credentials (SO_PEERCRED), even when file permissions would
//! let it reach the socket; the agent's own uid (root here) is served. Also: the agent refuses
//! a socket directory others can write to or that another user owns.
//!
//! These tests run as root (they create the user `kwtest2` if it does not exist).

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::{key_name, run_command, TestHome};
use serde_json::Value;

const OTHER_USER: &str = "kwtest2";

/// A stdlib-only Python client: connects to argv[1], sends hello, sign and list_keys, prints
/// `connected`, then each response as one JSON line (or `EOF` / an error line).
const CLIENT_PY: &str = r#"
import json, socket, struct, sys
def send(s, obj):
    b = json.dumps(obj).encode()
    s.sendall(struct.pack('>I', len(b)) + b)
def recv(s):
    def exact(n):
        buf = b''
        while len(buf) < n:
            c = s.recv(n - len(buf))
            if not c:
                return None
            buf += c
        return buf
    hdr = exact(4)
    if hdr is None:
        return None
    body = exact(struct.unpack('>I', hdr)[0])
    return None if body is None else json.loads(body)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
print('connected', flush=True)
try:
    send(s, {'id': 1, 'op': 'hello'})
    send(s, {'id': 2, 'op': 'sign', 'key': 'hm', 'data': 'aGk='})
    send(s, {'id': 3, 'op': 'list_keys'})
except OSError as e:
    print('send-error', e, flush=True)
for _ in range(3):
    try:
        r = recv(s)
    except OSError as e:
        print('recv-error', e, flush=True)
        break
    if r is None:
        print('EOF', flush=True)
        break
    print(json.dumps(r), flush=True)
"#;

fn python() -> &'static str {
    // The system interpreter: a user-local one (pyenv under /root) is not reachable by kwtest2.
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Create the second user once (idempotent; "already exists" is fine).
fn ensure_other_user() -> u32 {
    static UID: OnceLock<u32> = OnceLock::new();
    *UID.get_or_init(|| {
        let id = |who: &str| {
            let mut c = Command::new("id");
            c.args(["-u", who]);
            run_command(c, None)
        };
        if !id(OTHER_USER).success() {
            let mut c = Command::new("useradd");
            c.args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                OTHER_USER,
            ]);
            let out = run_command(c, None);
            // Exit 9: the user was created concurrently.
            assert!(
                out.success() || out.status.code() == Some(9),
                "useradd failed:\n{out}"
            );
        }
        let out = id(OTHER_USER);
        assert!(out.success(), "{out}");
        out.stdout.trim().parse().expect("numeric uid")
    })
}

/// Run the Python client, optionally as the other user; returns (stdout lines, full output).
fn run_client(sock: &std::path::Path, as_other: bool) -> (Vec<String>, common::Output) {
    let mut c;
    if as_other {
        c = Command::new("setpriv");
        c.args([
            &format!("--reuid={OTHER_USER}"),
            &format!("--regid={OTHER_USER}"),
            "--clear-groups",
            python(),
        ]);
    } else {
        c = Command::new(python());
    }
    c.args(["-c", CLIENT_PY]).arg(sock).current_dir("/");
    let out = run_command(c, None);
    let lines = out.stdout.lines().map(str::to_owned).collect();
    (lines, out)
}

fn responses(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(Value::is_object)
        .collect()
}

#[test]
fn another_uid_is_refused_by_peer_credentials_and_our_uid_is_served() {
    assert_eq!(
        unsafe_geteuid(),
        0,
        "the multi-user test must run as root (it creates a user)"
    );
    let other_uid = ensure_other_user();
    let h = TestHome::new();
    h.import_ok("hm", Some("hmac-sha256"), b"kw-multiuser-secret");
    let agent = h.agent();

    // Our uid is served.
    let mut c = agent.client();
    let hello = c.hello(None).expect("hello as root");
    assert_eq!(hello.uid, 0, "hello reports uid {}", hello.uid);
    c.sign(&key_name("hm"), b"hi", None).expect("root signs");

    // Let the other uid reach the socket through the file system, so that only the agent's
    // peer-credential check can refuse it.
    let sock_dir = h.sock.parent().expect("socket dir");
    let sock_dir_mode = fs::metadata(sock_dir)
        .expect("socket dir")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(
        sock_dir_mode & 0o022,
        0,
        "the agent made its socket dir writable by others ({sock_dir_mode:o})"
    );
    let sock_mode = fs::metadata(&h.sock).expect("socket").permissions().mode() & 0o777;
    assert_eq!(
        sock_mode & 0o007,
        0,
        "the socket is accessible to others ({sock_mode:o})"
    );
    for (p, mode) in [
        (h.dir.path(), 0o711),
        (sock_dir, 0o711),
        (h.sock.as_path(), 0o666),
    ] {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    // The client script works (as root it is served) ...
    let (lines, out) = run_client(&h.sock, false);
    let ok = responses(&lines);
    assert_eq!(
        ok.len(),
        3,
        "the client script does not work as root:\n{out}"
    );
    assert!(ok.iter().all(|r| r["ok"] == true), "root refused:\n{out}");

    // ... and as the other uid it reaches the agent but is refused.
    let (lines, out) = run_client(&h.sock, true);
    assert!(
        lines.first().map(String::as_str) == Some("connected"),
        "{OTHER_USER} (uid {other_uid}) could not even connect — the test proves nothing:\n{out}"
    );
    let got = responses(&lines);
    assert!(
        !got.is_empty(),
        "no response to uid {other_uid}; expected an `unauthorized` error frame:\n{out}"
    );
    for r in &got {
        assert_eq!(r["ok"], false, "uid {other_uid} was served:\n{out}");
        assert_eq!(
            r["error"]["code"], "unauthorized",
            "uid {other_uid}: wrong refusal:\n{out}"
        );
    }
    assert!(
        !out.stdout.contains("signature"),
        "a signature went to the other uid:\n{out}"
    );

    // The agent is unharmed and still serves us.
    let mut c = agent.client();
    c.sign(&key_name("hm"), b"still here", None)
        .expect("root still served");
    assert!(c.status().expect("status").requests > 0);
}

/// Sends each request of the JSON array argv[2] in order on one connection and prints each
/// response as one JSON line.
const OPS_PY: &str = r#"
import json, socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
def exact(n):
    buf = b''
    while len(buf) < n:
        c = s.recv(n - len(buf))
        if not c:
            raise SystemExit('EOF')
        buf += c
    return buf
for i, op in enumerate(json.loads(sys.argv[2])):
    op['id'] = i
    b = json.dumps(op).encode()
    s.sendall(struct.pack('>I', len(b)) + b)
    body = exact(struct.unpack('>I', exact(4))[0])
    print(body.decode(), flush=True)
"#;

/// PARSEC-style multi-tenant check: a second uid named in `[clients]` is served for the key
/// its policy allows, refused for another key, and is not an admin (cannot unlock).
#[test]
fn a_configured_second_uid_is_served_within_its_policy_only() {
    let other_uid = ensure_other_user();
    let h = TestHome::new();
    h.import_ok("theirs", Some("hmac-sha256"), b"kw-tenant-secret-1");
    h.import_ok("ours", Some("hmac-sha256"), b"kw-tenant-secret-2");
    h.import_ok("spare", Some("hmac-sha256"), b"kw-tenant-secret-3");
    let cfg = h.home.join("keyward.toml");
    let mut text = fs::read_to_string(&cfg).expect("config");
    text.push_str(&format!(
        "\n[clients.tenant]\nuids = [{other_uid}]\n\n[keys.theirs]\nclients = [\"tenant\"]\n\n[keys.ours]\nclients = [\"owner\"]\n"
    ));
    fs::write(&cfg, text).expect("writing config");
    let agent = h.agent();
    h.ok(&["lock", "--key", "spare", "--reason", "tenant test"]);

    let sock_dir = h.sock.parent().expect("socket dir");
    for (p, mode) in [
        (h.dir.path(), 0o711),
        (sock_dir, 0o711),
        (h.sock.as_path(), 0o666),
    ] {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let ops = serde_json::json!([
        {"op": "hello"},
        {"op": "sign", "key": "theirs", "data": "aGk="},
        {"op": "sign", "key": "ours", "data": "aGk="},
        {"op": "unlock", "all": true},
    ]);
    let mut c = Command::new("setpriv");
    c.args([
        &format!("--reuid={OTHER_USER}"),
        &format!("--regid={OTHER_USER}"),
        "--clear-groups",
        python(),
        "-c",
        OPS_PY,
    ])
    .arg(&h.sock)
    .arg(ops.to_string())
    .current_dir("/");
    let out = run_command(c, None);
    let got = responses(&out.stdout.lines().map(str::to_owned).collect::<Vec<_>>());
    assert_eq!(got.len(), 4, "{out}");
    assert_eq!(got[0]["result"]["client"], "tenant", "{out}");
    assert_eq!(got[0]["result"]["admin"], false, "{out}");
    assert_eq!(got[1]["ok"], true, "tenant could not use its key:\n{out}");
    assert_eq!(got[2]["error"]["code"], "policy_denied", "{out}");
    assert_eq!(
        got[3]["error"]["code"], "forbidden",
        "a non-admin uid unlocked:\n{out}"
    );
    // The lock is still in force.
    let st = agent.client().status().expect("status");
    assert_eq!(st.locks.len(), 1, "unlock by a non-admin took effect");
}

/// The agent must refuse to put its socket in a directory others can write to or that another
/// user owns (anyone could replace the socket).
#[test]
fn an_unsafe_socket_directory_is_refused() {
    let other_uid = ensure_other_user();
    let h = TestHome::new();
    let sock_dir = h.sock.parent().expect("socket dir").to_path_buf();

    for (what, setup) in [
        ("world-writable", 0o777u32),
        ("group-writable", 0o770),
        ("owned by another user", 0o700),
    ] {
        fs::create_dir_all(&sock_dir).expect("creating the socket dir");
        fs::set_permissions(&sock_dir, fs::Permissions::from_mode(setup)).expect("chmod");
        if what.starts_with("owned") {
            std::os::unix::fs::chown(&sock_dir, Some(other_uid), None).expect("chown");
        }
        let mut p = h.spawn_agent_raw(&h.pass_source(), &format!("agent-unsafe-{setup:o}"));
        let exited = p.wait_exit(Duration::from_secs(15));
        let log = p.log();
        if exited.is_none() {
            p.terminate();
            panic!("the agent started with a {what} socket directory\n{log}");
        }
        assert!(
            !exited.expect("status").success(),
            "{what}: agent exited 0\n{log}"
        );
        assert!(
            log.contains("insecure_permissions"),
            "{what}: the refusal does not say insecure_permissions\n{log}"
        );
        fs::remove_dir_all(&sock_dir).expect("removing the socket dir");
    }
    // A fresh directory the agent creates itself is fine.
    let agent = h.agent();
    let mode = fs::metadata(&sock_dir).expect("dir").permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the agent's socket dir mode");
    drop(agent);
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() }
}
