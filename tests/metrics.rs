//! Metrics through the real agent: the loopback Prometheus listener and the `status` op count
//! requests, denials and audit commits, and carry no secret or request content.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::TestHome;
use keyward::model::KeyName;

const SECRET: &[u8] = b"metrics-test-hmac-secret-d41d8cd98f";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connecting to the metrics port");
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
}

#[test]
fn the_listener_and_status_count_requests_denials_and_audit() {
    let h = TestHome::new();
    h.import_ok("mac", Some("hmac-sha256"), SECRET);
    let port = free_port();
    let cfg = h.home.join("keyward.toml");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text = text.replace(
        "[metrics]\n",
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    std::fs::write(&cfg, text).unwrap();
    let agent = h.agent();
    let mut c = agent.client();
    let mac = KeyName::new("mac").unwrap();
    for i in 0..5u32 {
        c.sign(&mac, &i.to_be_bytes(), None).unwrap();
    }
    h.ok(&["lock", "--key", "mac"]);
    assert_eq!(c.sign(&mac, b"x", None).unwrap_err().code(), "locked");
    let hostile = KeyName::new("no-such-key-1").unwrap();
    assert!(c.sign(&hostile, b"x", None).is_err());

    let resp = get(port, "/metrics");
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
    assert!(resp.contains("text/plain; version=0.0.4"), "{resp}");
    let body = resp.split("\r\n\r\n").nth(1).unwrap();
    assert_eq!(
        value(
            body,
            r#"keyward_requests_total{op="sign",key="mac",profile="none",result="ok"}"#
        ),
        5.0
    );
    assert_eq!(value(body, r#"keyward_denied_total{reason="locked"}"#), 1.0);
    assert_eq!(value(body, "keyward_locks"), 1.0);
    assert_eq!(value(body, r#"keyward_backend_up{backend="soft"}"#), 1.0);
    assert_eq!(value(body, "keyward_audit_available"), 1.0);
    assert!(value(body, "keyward_audit_records_total") >= 6.0, "{body}");
    assert!(value(body, "keyward_audit_commit_seconds_count") >= 1.0);
    assert_eq!(
        value(body, r#"keyward_request_duration_seconds_count{op="sign"}"#),
        7.0
    );
    // A key name the agent does not hold is not a label value.
    assert!(!body.contains("no-such-key-1"), "{body}");
    assert!(body.contains(r#"key="_unknown""#));
    for needle in [
        String::from_utf8_lossy(SECRET).to_string(),
        hex::encode(SECRET),
        common::PASSPHRASE.to_string(),
    ] {
        assert!(!body.contains(&needle), "a secret is in the metrics");
    }
    assert!(get(port, "/other").starts_with("HTTP/1.1 404"));

    // The same exposition through the status op.
    let st = c.status().unwrap();
    let m = st.metrics.expect("status carries metrics");
    assert_eq!(value(&m, "keyward_denied_total{reason=\"locked\"}"), 1.0);
    agent.stop();
}

#[test]
fn a_non_loopback_metrics_address_is_a_config_error() {
    let h = TestHome::new();
    let cfg = h.home.join("keyward.toml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[metrics]\n", "[metrics]\nlisten = \"0.0.0.0:9464\"\n");
    std::fs::write(&cfg, text).unwrap();
    let out = h.run(&["policy", "check"]);
    out.assert_error("config");
    assert!(out.stderr.contains("loopback"), "{out}");
}
