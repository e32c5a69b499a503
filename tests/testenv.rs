//! `keyward testenv up|down` end to end with the real binary: a stdlib-only Python client signs
//! through the printed socket, Rust verifies independently, and `down` leaves nothing behind.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::verify::Verifier;
use common::{keyward_bin, run_command, unb64, write_private, Output};
use hmac::Mac;
use serde_json::Value;

/// A 16-byte exchange-style secret: shorter than SHA-256's digest, so the token stores an
/// equivalent padded key (the HMAC rule) and the tag must still equal a software HMAC's.
const HMAC_SECRET: &str = "exch-test-secret";

/// The Python client: only the stdlib (socket, struct, json, base64), one frame per request.
const PY_CLIENT: &str = r#"
import base64, json, socket, struct, sys
sock_path, msg = sys.argv[1], sys.argv[2].encode()
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
s.connect(sock_path)
def call(req):
    body = json.dumps(req).encode()
    s.sendall(struct.pack(">I", len(body)) + body)
    hdr = b""
    while len(hdr) < 4:
        chunk = s.recv(4 - len(hdr))
        if not chunk:
            raise SystemExit("agent closed the connection")
        hdr += chunk
    (n,) = struct.unpack(">I", hdr)
    data = b""
    while len(data) < n:
        data += s.recv(n - len(data))
    return json.loads(data)
out = {}
for i, key in enumerate(sys.argv[3:], 1):
    r = call({"id": i, "op": "sign", "key": key, "data": base64.b64encode(msg).decode()})
    if not r.get("ok"):
        raise SystemExit("sign %s failed: %r" % (key, r))
    out[key] = r["result"]["signature"]
print(json.dumps(out))
"#;

fn keyward(args: &[&str]) -> Output {
    let mut c = Command::new(keyward_bin());
    c.args(args)
        // testenv must bring its own SoftHSM config and home, whatever the caller has set.
        .env_remove("SOFTHSM2_CONF")
        .env_remove("KEYWARD_HOME")
        .env_remove("KEYWARD_SOCK")
        .env_remove("KEYWARD_TESTENV_DIR");
    run_command(c, None)
}

/// Running, not a zombie: PID 1 of this sandbox reaps orphans slowly.
fn running(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(str::to_owned))
        })
        .is_some_and(|state| state != "Z" && state != "X")
}

/// Live processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<(u64, String)> {
    let me = std::process::id() as u64;
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        if pid == me || !running(pid) {
            continue;
        }
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmd.contains(needle) {
            found.push((pid, cmd));
        }
    }
    found
}

#[test]
fn testenv_up_python_signs_down_leaves_nothing() {
    let started = Instant::now();
    let tmp = tempfile::Builder::new()
        .prefix("kwte-")
        .tempdir()
        .expect("tempdir");
    let dir = tmp.path().join("env");
    let secret_file = tmp.path().join("hmac-secret.txt");
    write_private(&secret_file, format!("{HMAC_SECRET}\n").as_bytes());
    let spec = tmp.path().join("spec.toml");
    std::fs::write(
        &spec,
        format!(
            r#"
[[keys]]
name = "ed-token"
type = "ed25519"

[[keys]]
name = "hmac-token"
type = "hmac-sha256"
secret_file = "hmac-secret.txt"
api_key = "test-api-key"

[[keys]]
name = "hmac-inline"
type = "hmac-sha256"
backend = "soft"
secret = "{HMAC_SECRET}"
"#
        ),
    )
    .expect("writing the spec");

    let dir_s = dir.display().to_string();
    let up = keyward(&[
        "--json",
        "testenv",
        "up",
        "--dir",
        &dir_s,
        "--keys",
        &spec.display().to_string(),
    ]);
    assert!(up.success(), "testenv up failed:\n{up}");
    let info: Value = up.json();
    let sock = info["KEYWARD_SOCK"]
        .as_str()
        .expect("KEYWARD_SOCK")
        .to_string();
    let pid = info["agent_pid"].as_u64().expect("agent_pid");
    assert_eq!(info["KEYWARD_TESTENV_DIR"].as_str(), Some(dir_s.as_str()));
    assert!(info["SOFTHSM2_CONF"]
        .as_str()
        .is_some_and(|c| c.starts_with(&dir_s)));
    assert!(info["KEYWARD_HOME"]
        .as_str()
        .is_some_and(|c| c.starts_with(&dir_s)));
    assert_eq!(info["env"]["KEYWARD_SOCK"].as_str(), Some(sock.as_str()));
    assert!(running(pid), "the agent {pid} is not running");
    for f in ["so-pin", "user-pin", "passphrase"] {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(dir.join(f)).expect(f).mode() & 0o777;
        assert_eq!(m, 0o600, "{f} has mode {m:o}");
    }
    let keys = info["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 3, "{info}");
    let ed = keys
        .iter()
        .find(|k| k["name"] == "ed-token")
        .expect("ed-token listed");
    assert_eq!(ed["backend"], "pkcs11");
    let ed_pem = ed["public_key"].as_str().expect("ed25519 public key PEM");
    assert!(keys
        .iter()
        .all(|k| k["fingerprint"].as_str().is_some_and(|f| !f.is_empty())));

    // The Python stdlib speaks the protocol to the printed socket.
    let msg = "symbol=BTCUSDT&side=BUY&quantity=1&timestamp=1700000000000";
    let mut py = Command::new("python3");
    py.args([
        "-c",
        PY_CLIENT,
        &sock,
        msg,
        "ed-token",
        "hmac-token",
        "hmac-inline",
    ]);
    let out = run_command(py, None);
    assert!(out.success(), "python client failed:\n{out}");
    let sigs = out.json();

    let v = Verifier::from_spki_pem("ed25519", ed_pem);
    let sig = unb64(sigs["ed-token"].as_str().expect("ed sig"));
    v.verify("ed25519", msg.as_bytes(), &sig)
        .expect("the token's Ed25519 signature verifies against the printed public key");
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(HMAC_SECRET.as_bytes()).unwrap();
    mac.update(msg.as_bytes());
    let want = mac.finalize().into_bytes().to_vec();
    for k in ["hmac-token", "hmac-inline"] {
        let tag = unb64(sigs[k].as_str().expect("hmac sig"));
        assert_eq!(
            tag, want,
            "{k}: the agent's tag differs from a software HMAC"
        );
    }

    let down = keyward(&["testenv", "down", "--dir", &dir_s]);
    assert!(down.success(), "testenv down failed:\n{down}");
    assert!(!dir.exists(), "{} still exists after down", dir.display());
    assert!(
        !Path::new(&sock).exists(),
        "the socket survived `testenv down`"
    );
    // The agent may linger as a zombie until PID 1 reaps it; it must not be running.
    let gone = common::wait_until(Duration::from_secs(2), || !running(pid));
    assert!(gone, "agent {pid} still runs after down");
    let left = processes_mentioning(&dir_s);
    assert!(left.is_empty(), "processes still mention the dir: {left:?}");
    // A second `down` refuses (nothing to remove) instead of deleting something else.
    keyward(&["testenv", "down", "--dir", &dir_s]).assert_error("not_initialized");
    eprintln!("testenv round trip took {:?}", started.elapsed());
}

#[test]
fn bad_spec_is_refused_before_anything_is_created() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let spec = tmp.path().join("spec.toml");
    std::fs::write(
        &spec,
        "[[keys]]\nname = \"x\"\ntype = \"ed25519\"\ncolour = 1\n",
    )
    .unwrap();
    let dir = tmp.path().join("env");
    let out = keyward(&[
        "testenv",
        "up",
        "--dir",
        &dir.display().to_string(),
        "--keys",
        &spec.display().to_string(),
    ]);
    out.assert_error("config");
    assert!(
        !dir.exists(),
        "a refused spec left {} behind",
        dir.display()
    );

    // A key that fails to provision (RSA PEM declared as HMAC is fine; a bad type is not)
    // tears the half-built environment down again.
    std::fs::write(
        &spec,
        "[[keys]]\nname = \"bad\"\ntype = \"secp256k1\"\nsecret = \"0xnothex\"\n",
    )
    .unwrap();
    let out = keyward(&[
        "testenv",
        "up",
        "--dir",
        &dir.display().to_string(),
        "--keys",
        &spec.display().to_string(),
    ]);
    assert!(!out.success(), "a bad secret was accepted:\n{out}");
    assert!(
        !dir.exists() || common::list_dir(&dir).is_empty(),
        "a failed up left files: {:?}",
        common::list_dir(&dir)
    );
    assert!(processes_mentioning(&dir.display().to_string()).is_empty());
}
