//! The native protocol against the real agent: pipelining with out-of-order answers, many
//! concurrent connections, and a matrix of malformed input after each of which the agent must
//! keep serving.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::verify::Verifier;
use common::{
    b64, error_code, frame, key_name, read_frame, read_response, roundtrip, unb64, write_frame,
    Agent, Read1, TestHome,
};
use serde_json::{json, Value};

const HMAC_SECRET: &[u8] = b"kw-protocol-test-hmac-secret-31415";

/// A home with a fast (HMAC, Ed25519, secp256k1) and a slow (RSA) key, and a running agent.
struct Fixture {
    _home: TestHome,
    agent: Agent,
    keys: HashMap<&'static str, Verifier>,
}

fn fixture() -> Fixture {
    let home = TestHome::new();
    home.import_ok("hm", Some("hmac-sha256"), HMAC_SECRET);
    home.generate("ed", "ed25519");
    home.generate("k1", "secp256k1");
    home.generate("rsa", "rsa-2048");
    let agent = home.agent();
    let mut c = agent.client();
    let mut keys = HashMap::new();
    keys.insert("hm", Verifier::Hmac(HMAC_SECRET.to_vec()));
    for (name, ty) in [("ed", "ed25519"), ("k1", "secp256k1"), ("rsa", "rsa-2048")] {
        let pk = c.public_key(&key_name(name), "pem").expect("public_key");
        let pem = pk.public_key.as_str().expect("pem string");
        keys.insert(name, Verifier::from_spki_pem(ty, pem));
    }
    Fixture {
        _home: home,
        agent,
        keys,
    }
}

/// (key, scheme) for request number `i`: fast and slow keys interleaved.
fn key_for(i: u64) -> (&'static str, &'static str) {
    match i % 5 {
        0 => ("rsa", "rsa-pss-sha256"),
        1 => ("hm", "hmac-sha256"),
        2 => ("ed", "ed25519"),
        3 => ("rsa", "rsa-pkcs1-sha512"),
        _ => ("hm", "hmac-sha512"),
    }
}

fn check_sign_response(f: &Fixture, resp: &Value, key: &str, scheme: &str, msg: &[u8]) {
    assert_eq!(resp["ok"], true, "sign failed: {resp}");
    let r = &resp["result"];
    assert_eq!(r["key"], key, "{resp}");
    assert_eq!(r["scheme"], scheme, "{resp}");
    let sig = unb64(r["signature"].as_str().expect("signature string"));
    f.keys[key]
        .verify(scheme, msg, &sig)
        .unwrap_or_else(|e| panic!("signature for {key}/{scheme} does not verify: {e}: {resp}"));
}

#[test]
fn pipelined_requests_are_each_answered_once_and_correctly() {
    let f = fixture();
    let mut s = f.agent.raw();
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    const N: u64 = 200;
    let id_of = |i: u64| 5_000_000_000 + i * 7919;
    let msg_of = |id: u64| format!("pipelined request {id}").into_bytes();
    // All 200 frames in one buffer, written by another thread while this one reads, so the
    // test never deadlocks on full socket buffers — but no request waits for an answer.
    let mut all = Vec::new();
    for i in 0..N {
        let id = id_of(i);
        let (key, scheme) = key_for(i);
        let body = json!({"id": id, "op": "sign", "key": key, "scheme": scheme,
                          "data": b64(&msg_of(id))});
        all.extend(frame(body.to_string().as_bytes()));
    }
    let mut w = s.try_clone().expect("clone socket");
    let writer = std::thread::spawn(move || w.write_all(&all));

    let mut seen: HashMap<u64, Value> = HashMap::new();
    let mut order = Vec::new();
    for _ in 0..N {
        let resp = read_response(&mut s);
        let id = resp["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("response without a numeric id: {resp}"));
        order.push(id);
        assert!(
            seen.insert(id, resp.clone()).is_none(),
            "id {id} answered twice"
        );
    }
    writer
        .join()
        .expect("writer thread")
        .expect("writing pipelined requests");
    for i in 0..N {
        let id = id_of(i);
        let resp = seen
            .get(&id)
            .unwrap_or_else(|| panic!("id {id} never answered"));
        let (key, scheme) = key_for(i);
        check_sign_response(&f, resp, key, scheme, &msg_of(id));
    }
    // Nothing more arrives: exactly one answer per request.
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let mut probe = [0u8; 1];
    match std::io::Read::read(&mut s, &mut probe) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("unexpected data or close after the last answer: {other:?}"),
    }
    // The connection is still usable afterwards.
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let resp = roundtrip(&mut s, br#"{"id":1,"op":"status"}"#);
    assert_eq!(resp["ok"], true, "{resp}");
    assert_eq!(resp["id"], 1);
    let in_order = order.windows(2).all(|w| w[0] < w[1]);
    eprintln!(
        "pipelining: answers arrived {}",
        if in_order { "in order" } else { "out of order" }
    );
}

#[test]
fn a_hundred_concurrent_connections_all_get_correct_answers() {
    let f = Arc::new(fixture());
    const CONNS: usize = 100;
    let barrier = Arc::new(Barrier::new(CONNS));
    let mut handles = Vec::new();
    for t in 0..CONNS {
        let f = Arc::clone(&f);
        let barrier = Arc::clone(&barrier);
        handles.push(std::thread::spawn(move || -> Result<(), String> {
            // Every connection is open before any of them sends.
            let mut c = f.agent.client();
            barrier.wait();
            let hello = c.hello(None).map_err(|e| format!("hello: {e}"))?;
            if hello.uid != 0 && hello.uid != unsafe_geteuid() {
                return Err(format!("hello reports uid {}", hello.uid));
            }
            for (key, scheme) in [
                ("hm", "hmac-sha256"),
                ("ed", "ed25519"),
                ("rsa", "rsa-pss-sha512"),
            ] {
                let msg = format!("connection {t} key {key}").into_bytes();
                let r = c
                    .sign(&key_name(key), &msg, Some(scheme))
                    .map_err(|e| format!("conn {t} sign {key}: {} {e}", e.code()))?;
                f.keys[key]
                    .verify(scheme, &msg, &unb64(&r.signature))
                    .map_err(|e| format!("conn {t} {key}: {e}"))?;
            }
            Ok(())
        }));
    }
    let errors: Vec<String> = handles
        .into_iter()
        .filter_map(|h| h.join().expect("client thread panicked").err())
        .collect();
    assert!(
        errors.is_empty(),
        "{} of {CONNS} connections failed: {errors:?}\n{}",
        errors.len(),
        f.agent.log()
    );
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// Read until the agent closes the connection; it may send one error frame first, whose code
/// must then be `expect_code`.
fn expect_close(s: &mut UnixStream, expect_code: Option<&str>, what: &str) {
    match read_frame(s) {
        Read1::Closed => {}
        Read1::Frame(v) => {
            let code = error_code(&v);
            if let Some(c) = expect_code {
                assert_eq!(code, c, "{what}: {v}");
            }
            match read_frame(s) {
                Read1::Closed => {}
                Read1::Frame(v) => panic!("{what}: expected the connection closed, got {v}"),
            }
        }
    }
}

/// Send `body`, expect an error `code` (and id), then a `status` on the same connection works.
/// `id: None` = the error's id is not checked.
fn bad_then_usable(
    agent: &Agent,
    what: &str,
    body: &[u8],
    codes: &[&str],
    id: impl Into<Option<Value>>,
) {
    let mut s = agent.raw();
    let resp = roundtrip(&mut s, body);
    let code = error_code(&resp);
    assert!(
        codes.contains(&code.as_str()),
        "{what}: expected one of {codes:?}, got {resp}"
    );
    if let Some(id) = id.into() {
        assert_eq!(resp["id"], id, "{what}: id of the error response: {resp}");
    }
    let msg = resp["error"]["message"].as_str().unwrap_or_default();
    assert!(!msg.is_empty(), "{what}: error without a message: {resp}");
    let ok = roundtrip(&mut s, br#"{"id":424242,"op":"status"}"#);
    assert_eq!(
        ok["ok"], true,
        "{what}: connection unusable afterwards: {ok}"
    );
    assert_eq!(ok["id"], 424242, "{what}: {ok}");
}

#[test]
fn malformed_input_is_refused_and_the_agent_keeps_serving() {
    let mut f = fixture();

    // Truncated length prefix, then close.
    {
        let mut s = f.agent.raw();
        s.write_all(&[0, 0]).expect("write");
        s.shutdown(Shutdown::Write).expect("shutdown");
        expect_close(&mut s, None, "truncated length prefix");
    }
    f.agent.assert_serving("a truncated length prefix");

    // Length 100, 10 body bytes, then close.
    {
        let mut s = f.agent.raw();
        let mut b = 100u32.to_be_bytes().to_vec();
        b.extend_from_slice(b"{\"id\":1,\"o");
        s.write_all(&b).expect("write");
        s.shutdown(Shutdown::Write).expect("shutdown");
        expect_close(&mut s, None, "truncated body");
    }
    f.agent.assert_serving("a truncated body");

    // A stalled half frame on an open connection does not block other clients.
    let mut stalled = f.agent.raw();
    stalled.write_all(&[0, 0, 0, 50, b'{']).expect("write");
    f.agent.assert_serving("a stalled half frame");

    // 2 MiB length prefix: `too_large` (or nothing), then the connection is closed.
    {
        let mut s = f.agent.raw();
        s.write_all(&(2u32 * 1024 * 1024).to_be_bytes())
            .expect("write");
        s.write_all(&[b' '; 4096]).expect("write");
        expect_close(&mut s, Some("too_large"), "2 MiB frame");
    }
    f.agent.assert_serving("a 2 MiB length prefix");
    // 4 GiB - 1 as well.
    {
        let mut s = f.agent.raw();
        s.write_all(&u32::MAX.to_be_bytes()).expect("write");
        expect_close(&mut s, Some("too_large"), "4 GiB frame");
    }
    f.agent.assert_serving("a 4 GiB length prefix");

    let a = &f.agent;
    let null = Value::Null;
    bad_then_usable(
        a,
        "invalid UTF-8",
        b"\xff\xfe{\"op\":\"status\"}\xc3",
        &["bad_request"],
        null.clone(),
    );
    bad_then_usable(
        a,
        "invalid JSON",
        br#"{"id":5,"op":"#,
        &["bad_request"],
        null.clone(),
    );
    bad_then_usable(a, "empty frame", b"", &["bad_request"], null.clone());
    bad_then_usable(a, "JSON array", b"[1,2,3]", &["bad_request"], null.clone());
    bad_then_usable(
        a,
        "JSON string",
        b"\"status\"",
        &["bad_request"],
        null.clone(),
    );
    bad_then_usable(
        a,
        "unknown op",
        br#"{"id":6,"op":"frobnicate"}"#,
        &["bad_request"],
        json!(6),
    );
    bad_then_usable(
        a,
        "missing op",
        br#"{"id":61}"#,
        &["bad_request"],
        json!(61),
    );
    bad_then_usable(
        a,
        "op not a string",
        br#"{"id":62,"op":7}"#,
        &["bad_request"],
        json!(62),
    );
    bad_then_usable(
        a,
        "data is a number",
        br#"{"id":7,"op":"sign","key":"hm","data":5}"#,
        &["bad_request"],
        json!(7),
    );
    bad_then_usable(
        a,
        "id is a string",
        br#"{"id":"x","op":"status"}"#,
        &["bad_request"],
        null.clone(),
    );
    bad_then_usable(
        a,
        "id is negative",
        br#"{"id":-3,"op":"status"}"#,
        &["bad_request"],
        null.clone(),
    );
    bad_then_usable(
        a,
        "key is a number",
        br#"{"id":71,"op":"sign","key":5,"data":"aGk="}"#,
        &["bad_request"],
        json!(71),
    );
    bad_then_usable(
        a,
        "unknown key",
        br#"{"id":8,"op":"sign","key":"no-such-key","data":"aGk="}"#,
        &["unknown_key"],
        json!(8),
    );
    bad_then_usable(
        a,
        "public_key of an unknown key",
        br#"{"id":81,"op":"public_key","key":"no-such-key"}"#,
        &["unknown_key"],
        json!(81),
    );
    bad_then_usable(
        a,
        "extra field",
        br#"{"id":9,"op":"status","extra":1}"#,
        &["bad_request"],
        json!(9),
    );
    bad_then_usable(
        a,
        "extra field on sign",
        br#"{"id":91,"op":"sign","key":"hm","data":"aGk=","bogus":true}"#,
        &["bad_request"],
        json!(91),
    );
    let deep = format!(
        r#"{{"id":10,"op":"status","x":{}1{}}}"#,
        "[".repeat(1000),
        "]".repeat(1000)
    );
    bad_then_usable(a, "1000-deep JSON", deep.as_bytes(), &["bad_request"], None);
    let deep_obj = format!("{}1{}", r#"{"a":"#.repeat(1000), "}".repeat(1000));
    bad_then_usable(
        a,
        "1000-deep objects",
        deep_obj.as_bytes(),
        &["bad_request"],
        None,
    );
    bad_then_usable(
        a,
        "key ../x",
        br#"{"id":11,"op":"sign","key":"../x","data":"aGk="}"#,
        &["bad_request"],
        json!(11),
    );
    bad_then_usable(
        a,
        "key a/b",
        br#"{"id":111,"op":"public_key","key":"a/b"}"#,
        &["bad_request"],
        json!(111),
    );
    bad_then_usable(
        a,
        "bad base64",
        br#"{"id":12,"op":"sign","key":"hm","data":"***not base64***"}"#,
        &["bad_request"],
        json!(12),
    );
    bad_then_usable(
        a,
        "RSA scheme on an Ed25519 key",
        br#"{"id":13,"op":"sign","key":"ed","data":"aGk=","scheme":"rsa-pss-sha256"}"#,
        &["bad_request", "unsupported"],
        json!(13),
    );
    bad_then_usable(
        a,
        "Ed25519 scheme on an HMAC key",
        br#"{"id":14,"op":"sign","key":"hm","data":"aGk=","scheme":"ed25519"}"#,
        &["bad_request", "unsupported"],
        json!(14),
    );
    bad_then_usable(
        a,
        "HMAC scheme on an RSA key",
        br#"{"id":15,"op":"sign","key":"rsa","data":"aGk=","scheme":"hmac-sha256"}"#,
        &["bad_request", "unsupported"],
        json!(15),
    );
    bad_then_usable(
        a,
        "unknown scheme",
        br#"{"id":16,"op":"sign","key":"ed","data":"aGk=","scheme":"rot13"}"#,
        &["bad_request"],
        json!(16),
    );
    bad_then_usable(
        a,
        "prehashed digest of the wrong length",
        br#"{"id":17,"op":"sign","key":"k1","data":"aGk=","scheme":"ecdsa-secp256k1-prehashed"}"#,
        &["bad_request"],
        json!(17),
    );
    bad_then_usable(
        a,
        "unknown public key format",
        br#"{"id":18,"op":"public_key","key":"ed","format":"x509-der-please"}"#,
        &["bad_request"],
        json!(18),
    );

    bad_then_usable(
        a,
        "unsupported protocol version",
        br#"{"id":19,"op":"hello","version":999}"#,
        &["bad_request"],
        json!(19),
    );
    bad_then_usable(
        a,
        "lock without key or all",
        br#"{"id":20,"op":"lock"}"#,
        &["bad_request"],
        json!(20),
    );
    bad_then_usable(
        a,
        "lock with key and all",
        br#"{"id":21,"op":"lock","key":"hm","all":true}"#,
        &["bad_request"],
        json!(21),
    );
    bad_then_usable(
        a,
        "lock of an unknown key",
        br#"{"id":22,"op":"lock","key":"no-such-key"}"#,
        &["unknown_key"],
        json!(22),
    );
    let long_reason = json!({"id": 23, "op": "lock", "all": true, "reason": "x".repeat(5000)});
    bad_then_usable(
        a,
        "overlong lock reason",
        long_reason.to_string().as_bytes(),
        &["bad_request"],
        json!(23),
    );
    bad_then_usable(
        a,
        "control characters in a lock reason",
        br#"{"id":24,"op":"lock","all":true,"reason":"a\u001b[2Jb"}"#,
        &["bad_request"],
        json!(24),
    );
    // None of the refused lock requests locked anything.
    let st = f.agent.client().status().expect("status");
    assert!(
        st.locks.is_empty(),
        "a refused lock request left a lock: {:?}",
        st.locks
    );

    // Several bad frames back to back on one connection, then a good request.
    {
        let mut s = f.agent.raw();
        for body in [&b"\xff"[..], b"{", br#"{"id":1,"op":"nope"}"#] {
            write_frame(&mut s, body);
        }
        write_frame(&mut s, br#"{"id":2,"op":"sign","key":"hm","data":"aGk="}"#);
        let mut codes = Vec::new();
        for _ in 0..3 {
            codes.push(error_code(&read_response(&mut s)));
        }
        assert_eq!(codes, ["bad_request"; 3]);
        let ok = read_response(&mut s);
        check_sign_response(&f, &ok, "hm", "hmac-sha256", b"hi");
    }

    drop(stalled);
    f.agent.assert_serving("the whole matrix");
    let log = f.agent.log();
    assert!(
        !log.contains("panicked"),
        "the agent panicked while handling malformed input:\n{log}"
    );
}

/// A client that pipelines requests but never reads the answers must meet backpressure (the
/// agent stops reading its requests) instead of making the agent buffer answers without
/// bound: one misbehaving bot must not be able to exhaust the memory of the agent every other
/// trading process depends on.
#[test]
fn a_client_that_never_reads_cannot_grow_the_agent_without_bound() {
    let mut f = fixture();
    let before = f.agent.rss_kib();
    let mut s = f.agent.raw();
    s.set_write_timeout(Some(Duration::from_secs(2)))
        .expect("write timeout");
    let body = br#"{"op":"status"}"#;
    let chunk: Vec<u8> = std::iter::repeat_n(frame(body), 1000).flatten().collect();
    const MAX_REQUESTS: usize = 150_000;
    let mut sent = 0;
    let mut blocked = false;
    while sent < MAX_REQUESTS {
        match s.write_all(&chunk) {
            Ok(()) => sent += 1000,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                blocked = true;
                break;
            }
            Err(e) => panic!("writing requests: {e}"),
        }
    }
    // Let the agent work through whatever it accepted.
    std::thread::sleep(Duration::from_millis(500));
    let after = f.agent.rss_kib();
    let grown_mib = after.saturating_sub(before) / 1024;
    eprintln!(
        "never-reading client: {sent} requests accepted, backpressure: {blocked}, RSS {before} KiB -> {after} KiB"
    );
    assert!(
        grown_mib < 32,
        "the agent buffered answers for a client that never reads: RSS grew by {grown_mib} MiB \
         after {sent} unread requests (backpressure: {blocked})"
    );
    drop(s);
    f.agent.assert_serving("a client that never reads");
}

/// SIGTERM drains: requests the agent has already taken are answered before it exits, the
/// exit is clean and the socket file is removed.
#[test]
fn sigterm_answers_requests_in_flight_then_exits_cleanly() {
    let home = TestHome::new();
    home.generate("big", "rsa-4096");
    let agent = home.agent();
    let pem = agent
        .client()
        .public_key(&key_name("big"), "pem")
        .expect("public_key")
        .public_key;
    let v = Verifier::from_spki_pem("rsa-4096", pem.as_str().expect("pem"));
    let base = agent.client().status().expect("status").requests;

    const N: u64 = 40;
    let mut s = agent.raw();
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut all = Vec::new();
    for id in 0..N {
        let body = json!({"id": id, "op": "sign", "key": "big", "scheme": "rsa-pss-sha512",
                          "data": b64(format!("drain {id}").as_bytes())});
        all.extend(frame(body.to_string().as_bytes()));
    }
    s.write_all(&all).expect("writing requests");
    // Wait until the agent has taken all of them (the status call itself counts as one).
    let mut probe = agent.client();
    let taken = common::wait_until(Duration::from_secs(10), || {
        probe.status().map(|st| st.requests).unwrap_or(0) > base + N
    });
    assert!(taken, "the agent did not take the pipelined requests");
    drop(probe);
    common::signal(agent.pid, libc::SIGTERM);

    let mut answered = 0;
    while let Read1::Frame(resp) = read_frame(&mut s) {
        let id = resp["id"].as_u64().expect("id");
        check_sign_response_with(
            &v,
            &resp,
            "big",
            "rsa-pss-sha512",
            format!("drain {id}").as_bytes(),
        );
        answered += 1;
    }
    assert_eq!(answered, N, "requests taken before SIGTERM were dropped");
    let sock = agent.sock.clone();
    let st = agent.stop();
    assert!(st.success(), "the agent exited with {st} on SIGTERM");
    assert!(!sock.exists(), "the socket file is left after a clean exit");
}

fn check_sign_response_with(v: &Verifier, resp: &Value, key: &str, scheme: &str, msg: &[u8]) {
    assert_eq!(resp["ok"], true, "sign failed: {resp}");
    assert_eq!(resp["result"]["key"], key, "{resp}");
    assert_eq!(resp["result"]["scheme"], scheme, "{resp}");
    let sig = unb64(resp["result"]["signature"].as_str().expect("signature"));
    v.verify(scheme, msg, &sig)
        .unwrap_or_else(|e| panic!("{key}/{scheme}: {e}: {resp}"));
}

/// The limit is 1 MiB of body: exactly 1 MiB is served, one byte more is `too_large`.
#[test]
fn the_frame_limit_is_exactly_one_mebibyte() {
    let f = fixture();
    const MIB: usize = 1 << 20;
    let make = |total: usize| -> (Vec<u8>, Vec<u8>) {
        let prefix = br#"{"id":77,"op":"sign","key":"hm","data":""#;
        let suffix = br#""}"#;
        let room = total - prefix.len() - suffix.len();
        let b64_len = room / 4 * 4;
        let msg = vec![b'm'; b64_len / 4 * 3];
        let mut body = prefix.to_vec();
        body.extend(b64(&msg).into_bytes());
        body.extend_from_slice(suffix);
        body.resize(total, b' '); // trailing whitespace is valid JSON
        (body, msg)
    };
    let (body, msg) = make(MIB);
    assert_eq!(body.len(), MIB);
    let mut s = f.agent.raw();
    let resp = roundtrip(&mut s, &body);
    check_sign_response(&f, &resp, "hm", "hmac-sha256", &msg);

    let (body, _) = make(MIB + 1);
    let mut s = f.agent.raw();
    // The agent may close before reading all of it; a failed write is fine.
    let _ = s.write_all(&frame(&body));
    expect_close(&mut s, Some("too_large"), "1 MiB + 1 frame");
    let mut f = f;
    f.agent.assert_serving("a frame one byte over the limit");
}
