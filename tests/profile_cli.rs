//! `keyward profile sign` / `profile list` through the real binary: published exchange
//! examples reproduced from key files, and errors reported as JSON on stderr.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{keyward_bin, Output};
use serde_json::{json, Value};

/// Runs `keyward args…` with `stdin`, in a directory of its own, without any home.
fn keyward(dir: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(keyward_bin())
        .args(args)
        .current_dir(dir)
        .env("KEYWARD_HOME", dir.join("no-home"))
        .env_remove("KEYWARD_SOCK")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning keyward");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("writing stdin");
    let out = child.wait_with_output().expect("waiting for keyward");
    Output {
        args: args.iter().map(|s| s.to_string()).collect(),
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn write(dir: &Path, name: &str, content: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, content).expect("writing test file");
    p.to_string_lossy().into_owned()
}

fn sign(dir: &Path, profile: &str, key: &str, request: &Value) -> Output {
    let key_file = write(dir, "key", key);
    let req_file = write(dir, "request.json", &request.to_string());
    keyward(
        dir,
        &[
            "profile",
            "sign",
            "--profile",
            profile,
            "--key-file",
            &key_file,
            "--request",
            &req_file,
        ],
        b"",
    )
}

// https://developers.binance.com/docs/binance-spot-api-docs/rest-api/request-security,
// SIGNED endpoint example (HMAC, all parameters in the query string).
#[test]
fn binance_hmac_published_example() {
    let dir = tempfile::tempdir().unwrap();
    let out = sign(
        dir.path(),
        "binance",
        "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j\n",
        &json!({
            "method": "POST", "path": "/api/v3/order",
            "query": "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1",
            "recv_window": 5000, "timestamp": 1499827319559u64,
            "api_key": "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A"
        }),
    )
    .expect_success();
    let sig = "c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71";
    let v = out.json();
    assert_eq!(v["signature"], sig);
    assert_eq!(
        v["query"],
        format!("symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559&signature={sig}")
    );
    assert_eq!(
        v["headers"],
        json!({"X-MBX-APIKEY": "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A"})
    );
}

// https://docs.kraken.com/api/docs/guides/spot-rest-auth, the worked API-Sign example; the
// request comes on standard input (`--request -`).
#[test]
fn kraken_published_example_from_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = write(
        dir.path(),
        "kraken.secret",
        "kQH5HW/8p1uGOVjbgWA7FunAmGO8lsSUXNsu3eow76sz84Q18fWxnyRzBHCd3pd5nE9qa99HAZtuZuj6F1huXg==\n",
    );
    let req = json!({
        "path": "/0/private/AddOrder",
        "body": "ordertype=limit&pair=XBTUSD&price=37500&type=buy&volume=1.25",
        "api_key": "my-api-key", "nonce": 1616492376594u64
    });
    let out = keyward(
        dir.path(),
        &[
            "profile",
            "sign",
            "--profile",
            "kraken",
            "--key-file",
            &key_file,
            "--request",
            "-",
        ],
        req.to_string().as_bytes(),
    )
    .expect_success();
    let sign =
        "4/dpxb3iT4tp/ZCVEwSnEsLxx0bqyhLpdfOpc6fn7OR8+UClSV5n9E6aSS8MPtnRfp32bAb0nmbRn6H8ndwLUQ==";
    assert_eq!(
        out.json(),
        json!({
            "signature": sign,
            "headers": {"API-Key": "my-api-key", "API-Sign": sign},
            "body": "nonce=1616492376594&ordertype=limit&pair=XBTUSD&price=37500&type=buy&volume=1.25",
            "nonce": 1616492376594u64
        })
    );
    assert!(!out.stderr.contains("kQH5HW"), "{out}");
}

#[test]
fn the_agent_clock_sets_the_timestamp_when_none_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let out = sign(
        dir.path(),
        "binance",
        "secret",
        &json!({"method": "GET", "path": "/api/v3/account"}),
    )
    .expect_success();
    let ts = out.json()["timestamp"].as_u64().unwrap();
    assert!(ts >= before && ts < before + 60_000, "{out}");
}

#[test]
fn unknown_field_is_a_json_bad_request_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let out = sign(
        dir.path(),
        "binance",
        "topsecret-hmac-value",
        &json!({"method": "GET", "path": "/api/v3/account", "recvWindow": 5000}),
    );
    out.assert_error("bad_request");
    assert!(out.stdout.trim().is_empty(), "{out}");
    let err = out.json_error().expect("a JSON error object");
    let msg = err["message"].as_str().unwrap();
    assert!(msg.contains("recvWindow"), "{out}");
    assert!(!out.stderr.contains("topsecret"), "{out}");
}

// The RSA key of sammchardy/python-binance tests/test_cryptography.py as published there:
// encrypted PKCS#8 (password "testpwd"). keyward refuses encrypted PEM with a hint.
const ENCRYPTED_RSA: &str = "-----BEGIN ENCRYPTED PRIVATE KEY-----
MIIFNTBfBgkqhkiG9w0BBQ0wUjAxBgkqhkiG9w0BBQwwJAQQWW+iEMYYCPUntrPq
Z2RCMAICCAAwDAYIKoZIhvcNAgkFADAdBglghkgBZQMEASoEEIw3ViSuTp8JeN43
5VGlHt0EggTQBvEzd2w2F561CzU+MDouZDOPj4RTIStC471z0/bxTgYqH3gYchoe
Ofi2lsLuD8B+ivIRuXB8GT66BIseIOMV8t/tiMe97rFI/cV4h6DrBO1xlmSrBG97
vFF9qPA5yPRlrHtWKkGxhXteNVsT3w/7Y7KsulO/gA2KpsOElMElOhUP462Yd0Wl
OxAIV3+knl2niozws2Kq3EdzTF3N6hlavUPryiU/w4RRsPN5qgjchVVLq/sYRYhx
N8uWJbkjhCcHsULkD5KkdgddR0VOhpQPXIdY+gPkSBJq1ltRWy/TYdXiU2fEBNZW
hFUVrxnS76+u2R3vukY2IAX8zTC6h2AbCBG+r4XXzgk/l/4peySKHsPQRzQ0in39
a9o5sctOmUNeD4uJ6cClXDdqyEwXhnPmRKZjJ8qeH4D9wl7HOG7iQsYiyfJe/igi
FEXVRZOtLBdbwX45rU6wiWWjxzY+mDnw4BXE31ZBPwgtoh+CLTyK8NI8LnCV/CgO
zOY4sm/KDWmbfTTZjLSdYRFj7wEpOdUWjZ13viDFZqnmy/o1auvLmBcqbRrCyW+B
OMI7aHE0mZ/52vEFQYU1tH0BxMmRfWXUCJj0TjwxDY6BQmmW4YlhsrgGNekLFDo1
6phFd0pA4UPqGXfNLzHp1dtLhUEb4YzcpDn+HMzMf1gfez7qeqU28nNFg/AwwqHZ
TWdGclCFjiah7SfvOslob4vdLGwkUhgCBKQUQoU1DltX2GOgIv9SNY3q6X0NwdZG
L5gqk225WVUwIRzmi5nfUEXlbaTvyHg3BuGedUKJ91IhRCW1ZjvU8GQcfVsu8bse
TCKMdr7wi/zEZXSldCza6vL4m3tmBLtWkHVOW8bcDWvoVwRswbFHfleHzckl7EeC
9C4TRa66gA5UOv14SrpC8noQUNpSegg+1KI4BSNvwaheiSUqjQbisb0qYCxML0ZP
mQodwVsXG6LYo+Y6y6CpHbT7UYkfa59q/CGOZByL1bEzzgd98ZHwjihOjHVaV6sY
BW018AvGxr7kjEU4LNqIteydTp0o31ZJN/qK78w5EQFfJxfImrx/E4nYKtg4higj
KOQCgJALKIveidqQEFsbGWsulYrMXwnu0nPThofR1D8eCJZpdTxvOh2nIrNrAeY8
ZMAwG1uQos5A0yEZ1auHxz+rb4errnk92OnVlWnElf1TwwlkFFNLdNDl8VpiMP40
6en9VtlOfgH8AwB03WsoeuEQsxYTIcRKWZZPRsLx3hd0BsOw0FcYDSX2XIGPkVVW
iYf9hzFSQsWV3d6utloIm4nG8XONfNaRimGECbUSZyHZimrO1m4Gga5pE3LKuDri
JKR2lR7b6XPR7+FS+lG1zq5KY7onAVQY1oABfTjpJRju6pQGWt70hairo6EaVC3u
rBy8UkLwBbfDuigSvsVk+sF2+Ic0IzX6IniU0F5kMe+MKqGB4aicXP6FFGBpPFTe
v6yHD+DYAu1rnlXrqmFL50CfutTF78uPPJ9D2Sm0DcGPFj+6IrCigj48uxoHR9Qb
FeNzfsmVwoFAWWq/MpkPbX6Aql8ddCbpMxDUUkybwVV9rJmEMTLil44FrxKAKFhP
0Av7JeFvdz15pfnf/IQ3IOvVhHGFChFS13sbYSvFHMQF3P0BiyvjhBI=
-----END ENCRYPTED PRIVATE KEY-----
";

#[test]
fn encrypted_pem_is_a_bad_request() {
    let dir = tempfile::tempdir().unwrap();
    let out = sign(
        dir.path(),
        "kalshi",
        ENCRYPTED_RSA,
        &json!({"method": "GET", "path": "/trade-api/v2/portfolio/balance", "api_key": "k"}),
    );
    out.assert_error("bad_request");
    let msg = out.json_error().unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.contains("decrypt"), "{out}");
    assert!(!out.stderr.contains("MIIFNTBf"), "{out}");
}

#[test]
fn wrong_key_type_is_a_bad_request_naming_profile_and_type() {
    let dir = tempfile::tempdir().unwrap();
    let ed25519 = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIPQmzwVKJETqVd7L9E/DFbkvrOigy1tLL+9QF0mSn6dV\n-----END PRIVATE KEY-----\n";
    let out = sign(
        dir.path(),
        "okx",
        ed25519,
        &json!({"method": "GET", "path": "/api/v5/account/balance", "api_key": "a", "passphrase": "p"}),
    );
    out.assert_error("bad_request");
    let msg = out.json_error().unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.contains("okx") && msg.contains("ed25519"), "{out}");
}

#[test]
fn unknown_profile_and_list() {
    let dir = tempfile::tempdir().unwrap();
    let out = sign(dir.path(), "bitmex", "s", &json!({}));
    out.assert_error("unknown_profile");
    let list = keyward(dir.path(), &["profile", "list"], b"").expect_success();
    let names: Vec<&str> = list.stdout.lines().collect();
    assert_eq!(names.first(), Some(&"kalshi"));
    assert!(names.contains(&"kraken") && names.contains(&"raw"));
    assert_eq!(names.len(), 11);
    let json_list = keyward(dir.path(), &["--json", "profile", "list"], b"").expect_success();
    assert_eq!(json_list.json().as_array().map(Vec::len), Some(11));
}
