//! Policy, rate limits, locks and reload through the real agent (issue 5's acceptance): a
//! profile-bound key signs only what its policy allows, denials name the rule and are logged
//! once, buckets refill at their rate, the kill switch stops busy clients, reload is atomic.

mod common;

use std::fs;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{key_name, TestHome};
use hmac::{Hmac, Mac};
use keyward::client::Client;
use keyward::proto::Op;
use keyward::Error;
use serde_json::{json, Value};

/// Binance's published HMAC example secret (developers.binance.com, request-security).
const BINANCE_SECRET: &[u8] = b"NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j";
const API_KEY: &str = "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A";

/// Import `name` as a binance-bound HMAC key.
fn import_binance(h: &TestHome, name: &str) {
    let out = h.run_stdin(
        &[
            "key",
            "import",
            name,
            "--type",
            "hmac-sha256",
            "--profile",
            "binance",
            "--api-key",
            API_KEY,
        ],
        BINANCE_SECRET,
    );
    assert!(out.success(), "import {name}:\n{out}");
}

fn append_config(h: &TestHome, text: &str) {
    let path = h.home.join("keyward.toml");
    let mut cur = fs::read_to_string(&path).unwrap_or_default();
    cur.push('\n');
    cur.push_str(text);
    fs::write(&path, cur).expect("writing keyward.toml");
}

fn order(query: &str) -> Value {
    json!({"method": "POST", "path": "/api/v3/order", "query": query})
}

fn sign_req(c: &mut Client, key: &str, profile: &str, req: Value) -> Result<Value, Error> {
    c.sign_request(&key_name(key), profile, req)
}

fn code<T>(r: Result<T, Error>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => e.code().into(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

#[test]
fn a_binance_key_signs_its_orders_and_nothing_else() {
    let h = TestHome::new();
    import_binance(&h, "bn");
    append_config(
        &h,
        r#"
[keys.bn]
methods = ["GET", "POST"]
guards = { symbols = ["LTCBTC", "BTCUSDT"], max_quantity = "5" }
"#,
    );
    let agent = h.agent();
    let mut c = agent.client();

    // The agent's clock sets the timestamp; the signature is HMAC-SHA256 over the payload.
    let before = now_ms();
    let out = sign_req(
        &mut c,
        "bn",
        "binance",
        order("symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1"),
    )
    .expect("an allowed order is signed");
    let ts = out["timestamp"].as_u64().expect("timestamp");
    assert!(
        ts >= before && ts <= now_ms(),
        "timestamp {ts} is not the agent's clock"
    );
    let payload = out["payload"].as_str().expect("payload");
    assert_eq!(
        payload,
        format!(
            "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1&timestamp={ts}"
        )
    );
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(BINANCE_SECRET).expect("hmac key");
    mac.update(payload.as_bytes());
    assert_eq!(out["signature"], hex::encode(mac.finalize().into_bytes()));
    assert_eq!(out["headers"]["X-MBX-APIKEY"], API_KEY);

    // A client may not choose the timestamp (no client_timestamp_skew_ms for this key).
    let mut pre = order("symbol=LTCBTC&side=BUY&quantity=1");
    pre["timestamp"] = json!(now_ms() + 60_000);
    assert_eq!(code(sign_req(&mut c, "bn", "binance", pre)), "bad_request");

    // Each denial: its code, the rule named in the message.
    let denied = [
        (
            "binance",
            json!({"method": "POST", "path": "/sapi/v1/capital/withdraw/apply", "query": "coin=BTC&amount=1"}),
            "rule default_deny",
        ),
        (
            "kraken",
            json!({"path": "/0/private/AddOrder", "body": "pair=XBTUSD"}),
            "rule profiles",
        ),
        (
            "binance",
            order("symbol=ETHBTC&side=BUY&quantity=1"),
            "rule guards",
        ),
        (
            "binance",
            order("symbol=BTCUSDT&side=BUY&quantity=5.5"),
            "rule guards",
        ),
        (
            "binance",
            json!({"method": "DELETE", "path": "/api/v3/order", "query": "symbol=LTCBTC"}),
            "rule methods",
        ),
    ];
    for (profile, req, rule) in &denied {
        let e = sign_req(&mut c, "bn", profile, req.clone()).expect_err("must be denied");
        assert_eq!(e.code(), "policy_denied", "{e}");
        assert!(e.to_string().starts_with(rule), "{e}");
    }
    let e = c
        .sign(&key_name("bn"), b"raw bytes", None)
        .expect_err("raw must be denied");
    assert_eq!(e.code(), "forbidden", "{e}");
    assert!(e.to_string().starts_with("rule raw"), "{e}");
    let n = denied.len() + 1;
    assert_eq!(
        code(sign_req(&mut c, "bn", "no-such-exchange", order(""))),
        "unknown_profile"
    );

    // One log line per denial, naming the rule.
    let log = agent.proc.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("policy_denied") || l.contains("\"forbidden\""))
        .collect();
    assert_eq!(lines.len(), n, "denial log lines:\n{log}");
    assert!(lines.iter().all(|l| l.contains("rule ")), "{log}");
}

#[test]
fn a_demo_client_cannot_use_a_prod_key_and_a_token_selects_the_client() {
    let h = TestHome::new();
    import_binance(&h, "prod-key");
    let out = h.run_stdin(
        &[
            "key",
            "import",
            "demo-key",
            "--type",
            "hmac-sha256",
            "--profile",
            "binance",
            "--env",
            "demo",
        ],
        BINANCE_SECRET,
    );
    assert!(out.success(), "{out}");
    // `client add --token` prints the token once and stores only its hash.
    let added = h.run(&[
        "--json", "client", "add", "demo-bot", "--uid", "0", "--env", "demo", "--token",
    ]);
    assert!(added.success(), "{added}");
    let token = added.json()["token"].as_str().expect("token").to_string();
    let cfg = fs::read_to_string(h.home.join("keyward.toml")).expect("config");
    assert!(
        !cfg.contains(&token) && cfg.contains("token_sha256"),
        "{cfg}"
    );
    let agent = h.agent();

    let mut demo = agent.client();
    let hello = demo.hello(Some(token.clone())).expect("hello with token");
    assert_eq!(hello.client, "demo-bot");
    assert!(!hello.admin);
    let e = sign_req(
        &mut demo,
        "prod-key",
        "binance",
        order("symbol=LTCBTC&quantity=1"),
    )
    .unwrap_err();
    assert_eq!(e.code(), "policy_denied");
    assert!(e.to_string().starts_with("rule env"), "{e}");
    sign_req(
        &mut demo,
        "demo-key",
        "binance",
        order("symbol=LTCBTC&quantity=1"),
    )
    .expect("a demo client signs with a demo key");
    // Not an admin: the kill switch is refused.
    assert_eq!(
        code(demo.call(&Op::Unlock {
            key: None,
            all: true
        })),
        "forbidden"
    );

    // Without the token the same uid is the owner (admin), who may use the prod key.
    let mut owner = agent.client();
    assert_eq!(owner.hello(None).expect("hello").client, "owner");
    sign_req(
        &mut owner,
        "prod-key",
        "binance",
        order("symbol=LTCBTC&quantity=1"),
    )
    .expect("owner signs");
}

#[test]
fn rate_limits_admit_the_burst_then_the_rate_and_leave_other_keys_alone() {
    let h = TestHome::new();
    import_binance(&h, "rl");
    import_binance(&h, "free");
    import_binance(&h, "capped");
    append_config(
        &h,
        r#"
[keys.rl]
rate = { per_second = 50, burst = 10 }

[keys.capped]
daily_max = 3
"#,
    );
    let agent = h.agent();
    let req = || json!({"method": "GET", "path": "/api/v3/account"});
    let op = |key: &str| Op::SignRequest {
        key: key_name(key),
        profile: "binance".into(),
        request: req(),
        version: None,
    };

    // A second client hammers another key at the same time: it must be unaffected.
    let sock = agent.sock.clone();
    let other = std::thread::spawn(move || {
        let mut c = Client::connect(&sock).expect("connect");
        (0..200).filter(|_| c.call(&op_free()).is_ok()).count()
    });
    fn op_free() -> Op {
        Op::SignRequest {
            key: key_name("free"),
            profile: "binance".into(),
            request: json!({"method": "GET", "path": "/api/v3/account"}),
            version: None,
        }
    }

    let mut c = agent.client();
    let start = Instant::now();
    for _ in 0..1000 {
        c.send(&op("rl")).expect("send");
    }
    c.flush().expect("flush");
    let (mut accepted, mut limited, mut retry) = (0u32, 0u32, Vec::new());
    for _ in 0..1000 {
        let r = c.recv().expect("response");
        if r.ok {
            accepted += 1;
        } else {
            let e = r.error.expect("error body");
            assert_eq!(e.code, "rate_limited", "{}", e.message);
            limited += 1;
            retry.push(e.retry_after_ms.expect("retry_after_ms"));
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    assert_eq!(accepted + limited, 1000);
    let most = 10.0 + 50.0 * elapsed + 2.0;
    assert!(
        accepted >= 10 && f64::from(accepted) <= most,
        "accepted {accepted} in {elapsed:.3} s (at most {most:.0} expected)"
    );
    // 50/s: the next token is never more than 20 ms away.
    assert!(
        retry.iter().all(|&ms| (1..=20).contains(&ms)),
        "retry_after_ms {retry:?}"
    );
    assert_eq!(
        other.join().expect("other client"),
        200,
        "another key was rate limited"
    );

    // The daily cap counts across a restart.
    for _ in 0..2 {
        c.call(&op("capped")).expect("under the daily cap");
    }
    drop(c);
    agent.stop();
    let agent = h.agent();
    let mut c = agent.client();
    c.call(&op("capped")).expect("third of three");
    match c.call(&op("capped")).unwrap_err() {
        Error::RateLimited { retry_after_ms, .. } => {
            assert!(retry_after_ms > 0 && retry_after_ms <= 86_400_000)
        }
        e => panic!("expected rate_limited, got {e}"),
    }
}

#[test]
fn the_kill_switch_stops_four_busy_clients_and_survives_sigkill() {
    let h = TestHome::new();
    import_binance(&h, "bn");
    let mut agent = h.agent();
    let barrier = Arc::new(Barrier::new(5));
    let stop_at = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let mut threads = Vec::new();
    for _ in 0..4 {
        let (sock, barrier, stop_at) = (agent.sock.clone(), barrier.clone(), stop_at.clone());
        threads.push(std::thread::spawn(move || {
            let mut c = Client::connect(&sock).expect("connect");
            let mut seen = Vec::new();
            barrier.wait();
            loop {
                let sent = Instant::now();
                let r = c.sign_request(
                    &key_name("bn"),
                    "binance",
                    json!({"method": "GET", "path": "/api/v3/account"}),
                );
                seen.push((sent, code(r)));
                if let Some(t) = *stop_at.lock().expect("stop_at") {
                    if sent > t + Duration::from_millis(200) {
                        return seen;
                    }
                }
            }
        }));
    }
    barrier.wait();
    std::thread::sleep(Duration::from_millis(200));
    h.ok(&["lock", "--all", "--reason", "drill"]);
    let locked_at = Instant::now();
    *stop_at.lock().expect("stop_at") = Some(locked_at);
    for t in threads {
        let seen = t.join().expect("client thread");
        assert!(
            seen.iter().any(|(_, c)| c == "ok"),
            "the client never signed before the lock"
        );
        for (sent, c) in &seen {
            if *sent >= locked_at {
                assert_eq!(
                    c, "locked",
                    "a request sent after `lock --all` returned was answered {c}"
                );
            }
        }
        let first_locked = seen
            .iter()
            .find(|(_, c)| c == "locked")
            .expect("a locked answer");
        assert!(first_locked.0 <= locked_at + Duration::from_millis(100));
    }

    // SIGKILL: no graceful shutdown; the lock is on disk already.
    common::signal(agent.pid, libc::SIGKILL);
    let _ = agent.proc.wait_exit(Duration::from_secs(10));
    let agent = h.agent();
    let mut c = agent.client();
    assert_eq!(
        code(c.sign_request(
            &key_name("bn"),
            "binance",
            json!({"method": "GET", "path": "/api/v3/account"})
        )),
        "locked"
    );
    let st = c.status().expect("status");
    assert_eq!(st.locks.len(), 1);
    assert_eq!(st.locks[0].reason.as_deref(), Some("drill"));
    h.ok(&["unlock", "--all"]);
    assert_eq!(
        code(c.sign_request(
            &key_name("bn"),
            "binance",
            json!({"method": "GET", "path": "/api/v3/account"})
        )),
        "ok"
    );
}

#[test]
fn a_key_locks_itself_after_repeated_denials() {
    let h = TestHome::new();
    import_binance(&h, "bn");
    append_config(
        &h,
        "[keys.bn]\nlock_after_denials = { count = 3, within_s = 60 }\n",
    );
    let agent = h.agent();
    let mut c = agent.client();
    let withdraw = || json!({"method": "POST", "path": "/sapi/v1/capital/withdraw/apply", "query": "coin=BTC"});
    for _ in 0..3 {
        assert_eq!(
            code(sign_req(&mut c, "bn", "binance", withdraw())),
            "policy_denied"
        );
    }
    let e = sign_req(&mut c, "bn", "binance", order("symbol=LTCBTC&quantity=1")).unwrap_err();
    assert_eq!(e.code(), "locked", "{e}");
    assert!(e.to_string().contains("auto-lock"), "{e}");
}

#[test]
fn reload_keeps_the_old_policy_on_error_and_applies_a_valid_one_without_dropping_connections() {
    let h = TestHome::new();
    import_binance(&h, "bn");
    let base = fs::read_to_string(h.home.join("keyward.toml")).expect("config");
    let write = |extra: &str| {
        fs::write(h.home.join("keyward.toml"), format!("{base}\n{extra}")).expect("write")
    };
    write("[keys.bn]\nmethods = [\"GET\"]\n");
    let agent = h.agent();
    let mut c = agent.client();
    let get = json!({"method": "GET", "path": "/api/v3/account"});
    let post = order("symbol=LTCBTC&quantity=1");
    assert_eq!(code(sign_req(&mut c, "bn", "binance", get.clone())), "ok");
    assert_eq!(
        code(sign_req(&mut c, "bn", "binance", post.clone())),
        "policy_denied"
    );

    // Broken: a typo'd key. The reload fails with line and column; the old policy stays.
    write("[keys.bn]\nmethods = [\"GET\", \"POST\"]\nmax_body_byte = 10\n");
    let out = h.run(&["reload"]);
    out.assert_error("config");
    let typo_line = format!("{base}\n").lines().count() + 3;
    assert!(
        out.stderr.contains(&format!("keyward.toml:{typo_line}:1:")),
        "no line/column in:\n{out}"
    );
    let check = h.run(&["policy", "check"]);
    check.assert_error("config");
    assert_eq!(code(sign_req(&mut c, "bn", "binance", get.clone())), "ok");
    assert_eq!(
        code(sign_req(&mut c, "bn", "binance", post.clone())),
        "policy_denied"
    );

    // Valid: POST allowed, on the same connection.
    write("[keys.bn]\nmethods = [\"GET\", \"POST\"]\n");
    h.ok(&["policy", "check"]);
    h.ok(&["reload"]);
    assert_eq!(code(sign_req(&mut c, "bn", "binance", post)), "ok");
    assert_eq!(code(sign_req(&mut c, "bn", "binance", get)), "ok");
}

#[test]
fn policy_explain_names_each_rule_offline() {
    let h = TestHome::new();
    import_binance(&h, "bn");
    append_config(&h, "[keys.bn]\nguards = { symbols = [\"LTCBTC\"] }\n");
    let req = h.path("req.json");
    fs::write(&req, order("symbol=ETHBTC&quantity=1").to_string()).expect("request");
    let out = h.run(&[
        "--json",
        "policy",
        "explain",
        "--client",
        "owner",
        "--key",
        "bn",
        "--profile",
        "binance",
        "--request",
        req.to_str().expect("utf-8"),
    ]);
    assert!(out.success(), "{out}");
    let v = out.json();
    assert_eq!(v["allowed"], false);
    assert_eq!(v["denied_by"], "guards");
    let rules: Vec<&str> = v["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .filter_map(|r| r["rule"].as_str())
        .collect();
    assert!(
        rules.contains(&"profiles") && rules.contains(&"default_deny") && rules.contains(&"guards")
    );
    let raw = h.run(&[
        "--json", "policy", "explain", "--client", "owner", "--key", "bn", "--raw",
    ]);
    assert_eq!(raw.json()["denied_by"], "raw");
}

/// Kraken's published example secret (docs.kraken.com, spot REST authentication).
const KRAKEN_SECRET: &[u8] =
    b"kQH5HW/8p1uGOVjbgWA7FunAmGO8lsSUXNsu3eow76sz84Q18fWxnyRzBHCd3pd5nE9qa99HAZtuZuj6F1huXg==";

#[test]
fn nonces_increase_per_key_and_survive_a_restart() {
    let h = TestHome::new();
    let out = h.run_stdin(
        &[
            "key",
            "import",
            "kr",
            "--type",
            "hmac-sha512",
            "--profile",
            "kraken",
            "--api-key",
            "kraken-key-id",
        ],
        KRAKEN_SECRET,
    );
    assert!(out.success(), "{out}");
    let agent = h.agent();
    let req = || json!({"path": "/0/private/AddOrder", "body": "ordertype=limit&pair=XBTUSD&price=37500&type=buy&volume=1.25"});
    let mut c = agent.client();
    // Pipelined on one connection and from a second one: never a repeated nonce.
    let ids: Vec<u64> = (0..50)
        .map(|_| {
            c.send(&Op::SignRequest {
                key: key_name("kr"),
                profile: "kraken".into(),
                request: req(),
                version: None,
            })
            .expect("send")
        })
        .collect();
    let mut c2 = agent.client();
    let mut nonces: Vec<u64> = (0..50)
        .map(|_| {
            sign_req(&mut c2, "kr", "kraken", req()).expect("signed")["nonce"]
                .as_u64()
                .expect("nonce")
        })
        .collect();
    for id in ids {
        let v = c.wait(id).expect("signed");
        let n = v["nonce"].as_u64().expect("nonce");
        assert_eq!(
            v["body"],
            format!("nonce={n}&ordertype=limit&pair=XBTUSD&price=37500&type=buy&volume=1.25")
        );
        assert_eq!(v["headers"]["API-Key"], "kraken-key-id");
        nonces.push(n);
    }
    let highest = *nonces.iter().max().expect("nonces");
    nonces.sort_unstable();
    nonces.dedup();
    assert_eq!(nonces.len(), 100, "a nonce was handed out twice");
    drop((c, c2));
    agent.stop();
    let agent = h.agent();
    let after = sign_req(&mut agent.client(), "kr", "kraken", req()).expect("signed")["nonce"]
        .as_u64()
        .expect("nonce");
    assert!(
        after > highest,
        "nonce {after} after restart is not above {highest}"
    );
    // A client-chosen nonce is refused without client_timestamp_skew_ms.
    let mut with_nonce = req();
    with_nonce["nonce"] = json!(after + 10);
    assert_eq!(
        code(sign_req(&mut agent.client(), "kr", "kraken", with_nonce)),
        "bad_request"
    );
}

#[test]
fn client_timestamps_are_accepted_only_within_the_configured_skew() {
    let h = TestHome::new();
    import_binance(&h, "bn");
    append_config(&h, "[keys.bn]\nclient_timestamp_skew_ms = 5000\n");
    let agent = h.agent();
    let mut c = agent.client();
    let with_ts = |ts: u64| {
        let mut r = json!({"method": "GET", "path": "/api/v3/account"});
        r["timestamp"] = json!(ts);
        r
    };
    let near = now_ms() - 1000;
    let out = sign_req(&mut c, "bn", "binance", with_ts(near)).expect("within the window");
    assert_eq!(out["timestamp"], near);
    assert!(out["payload"]
        .as_str()
        .expect("payload")
        .ends_with(&format!("timestamp={near}")));
    assert_eq!(
        code(sign_req(
            &mut c,
            "bn",
            "binance",
            with_ts(now_ms() + 60_000)
        )),
        "bad_request"
    );
    assert_eq!(
        code(sign_req(
            &mut c,
            "bn",
            "binance",
            with_ts(now_ms() - 60_000)
        )),
        "bad_request"
    );
}
