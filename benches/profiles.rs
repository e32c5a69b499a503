//! Criterion benchmarks of issue 5's request path: the policy + rate-limit + profile work the
//! agent adds to a signature (in-process, signing excluded), and `sign_request` against `sign`
//! through a real agent for binance-HMAC and kalshi-RSA on the software backend.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use keyward::backend::Signature;
use keyward::client::Client;
use keyward::model::{Env, KeyName};
use keyward::policy::engine::{Ask, KeyFacts, Peer, Policy};
use keyward::policy::rate::Limits;
use keyward::policy::rules::{ClientRule, KeyPolicy};
use keyward::profile::{self, ClientTime, Clock, KeyInfo, ProfileName};
use serde_json::{json, Value};

const BINANCE_SECRET: &[u8] = b"NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j";

/// A policy like ARCHITECTURE §6's example: a named client, a bound key with methods, paths,
/// body limit, guards and a rate (generous, so the benchmark never hits it).
const POLICY: &str = r#"
[clients.mm-bot]
uids = [0]
rate = { per_second = 1000000000, burst = 1000000000 }

[keys.bn]
clients = ["mm-bot"]
profiles = ["binance"]
methods = ["GET", "POST", "DELETE"]
allow_paths = ["/api/v3/*"]
deny_paths = ["/api/v3/userDataStream*"]
max_body_bytes = 8192
guards = { symbols = ["BTCUSDT", "ETHUSDT"], max_quantity = "5", max_notional = "500000" }
rate = { per_second = 1000000000, burst = 1000000000 }

[keys.ks]
clients = ["mm-bot"]
profiles = ["kalshi"]
methods = ["GET", "POST", "DELETE"]
allow_paths = ["/trade-api/v2/*"]
"#;

fn binance_order() -> Value {
    json!({
        "method": "POST",
        "path": "/api/v3/order",
        "query": "symbol=BTCUSDT&side=BUY&type=LIMIT&timeInForce=GTC&quantity=0.01000000&price=65000.00",
        "recv_window": 5000,
    })
}

fn kalshi_order() -> Value {
    json!({
        "method": "POST",
        "path": "/trade-api/v2/portfolio/orders",
        "body": r#"{"ticker":"KXBTC-25","action":"buy","side":"yes","count":3,"type":"limit","yes_price":45}"#,
        "api_key": "a952bcbe-ec3b-4b5b-b8f9-11dae589608c",
    })
}

/// Everything the agent does for one `sign_request` except the signature itself and the
/// socket: identify, profile parse, policy rules, rate buckets, build, finish.
fn overhead(c: &mut Criterion) {
    #[derive(serde::Deserialize)]
    struct T {
        clients: BTreeMap<String, ClientRule>,
        keys: BTreeMap<String, KeyPolicy>,
    }
    let t: T = toml::from_str(POLICY).expect("benchmark policy");
    let policy = Policy::compile(&t.clients, &t.keys, 0).expect("benchmark policy");
    let limits = Limits::default().rebuild(
        t.keys
            .iter()
            .filter_map(|(n, k)| k.rate.map(|r| (format!("key:{n}"), r)))
            .chain(
                t.clients
                    .iter()
                    .filter_map(|(n, c)| c.rate.map(|r| (format!("client:{n}"), r))),
            ),
    );
    let peer = Peer {
        uid: 0,
        gid: 0,
        exe: Some("/opt/mm/bin/bot".into()),
        token_sha256: None,
    };
    let cases: [(&str, &str, ProfileName, Value, keyward::KeyType, Signature); 2] = [
        (
            "binance_hmac",
            "bn",
            ProfileName::Binance,
            binance_order(),
            keyward::KeyType::HmacSha256,
            Signature::plain(vec![0x5a; 32]),
        ),
        (
            "kalshi_rsa",
            "ks",
            ProfileName::Kalshi,
            kalshi_order(),
            keyward::KeyType::Rsa2048,
            Signature::plain(vec![0x5a; 256]),
        ),
    ];
    let mut g = c.benchmark_group("policy_profile_overhead");
    for (label, key, p, request, key_type, sig) in cases {
        let name = KeyName::new(key).expect("key name");
        let bound = vec![p.as_str().to_string()];
        let info = KeyInfo {
            key_type: Some(key_type),
            // Binance's key id comes from the key's metadata; Kalshi's is in the request.
            api_key: (p == ProfileName::Binance)
                .then(|| "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A".into()),
            ..KeyInfo::default()
        };
        let mut last = 0u64;
        g.bench_function(label, |b| {
            b.iter(|| {
                let client = policy.identify(black_box(&peer)).expect("identified");
                let facts = KeyFacts {
                    name: &name,
                    env: Env::Prod,
                    bound_profiles: &bound,
                };
                let parsed = profile::parse(p, black_box(&request)).expect("parsed");
                policy
                    .check(&client, &facts, &Ask::Profile(p, &parsed.view))
                    .expect("allowed");
                limits.take("client:mm-bot").expect("rate");
                limits.take(&format!("key:{key}")).expect("rate");
                last += 1;
                let mut nonces = |now: u64| Ok(now.max(last));
                let mut clock = Clock {
                    now_ms: 1_700_000_000_000,
                    client_time: ClientTime::Reject,
                    nonces: &mut nonces,
                };
                let plan = parsed.build(&info, &mut clock).expect("plan");
                black_box(&plan.message);
                plan.finish(&sig).expect("output").into_value()
            })
        });
    }
    g.finish();
}

/// A throw-away agent on a temporary home with the benchmark's keys and policy.
struct Agent {
    child: Child,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keyward(home: &Path, sock: &Path, args: &[&str], stdin: Option<&[u8]>) {
    use std::io::Write;
    let mut c = Command::new(env!("CARGO_BIN_EXE_keyward"));
    c.arg("--home")
        .arg(home)
        .args(args)
        .env("KEYWARD_SOCK", sock)
        .env("KW_BENCH_PASS", "bench-passphrase-1")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut child = c.spawn().expect("spawning keyward");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("writing stdin");
    }
    drop(child.stdin.take());
    assert!(
        child.wait().expect("keyward").success(),
        "keyward {args:?} failed"
    );
}

fn start_agent() -> Agent {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let sock = dir.path().join("s").join("agent.sock");
    let pass = ["--passphrase", "env:KW_BENCH_PASS"];
    keyward(
        &home,
        &sock,
        &[&["init", "--kdf-work-factor", "10"], &pass[..]].concat(),
        None,
    );
    keyward(
        &home,
        &sock,
        &[
            "key",
            "import",
            "bn",
            "--type",
            "hmac-sha256",
            "--profile",
            "binance",
        ],
        Some(BINANCE_SECRET),
    );
    keyward(
        &home,
        &sock,
        &[
            "key",
            "generate",
            "ks",
            "--type",
            "rsa-2048",
            "--profile",
            "kalshi",
        ],
        None,
    );
    let cfg = home.join("keyward.toml");
    let mut text = std::fs::read_to_string(&cfg).expect("config");
    // Raw `sign` on the same keys is the comparison: allow it.
    text.push_str(&POLICY.replace(
        "uids = [0]",
        &format!("uids = [{}]", keyward::sys::effective_uid()),
    ));
    text = text.replace("[keys.bn]\n", "[keys.bn]\nallow_raw = true\n");
    text = text.replace("[keys.ks]\n", "[keys.ks]\nallow_raw = true\n");
    std::fs::write(&cfg, text).expect("config");
    let child = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .arg("--home")
        .arg(&home)
        .args(["agent", "--foreground"])
        .args(pass)
        .env("KEYWARD_SOCK", &sock)
        .env("KW_BENCH_PASS", "bench-passphrase-1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning the agent");
    let start = Instant::now();
    while Client::connect(&sock).and_then(|mut c| c.status()).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the agent did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Agent {
        child,
        sock,
        _dir: dir,
    }
}

/// Round trips through the agent: `sign_request` (policy + profile + sign) against `sign`
/// (the same key and scheme, raw bytes of the payload's size), one client.
fn through_agent(c: &mut Criterion) {
    let agent = start_agent();
    let mut client = Client::connect(&agent.sock).expect("connect");
    let bn = KeyName::new("bn").expect("key");
    let ks = KeyName::new("ks").expect("key");
    let payload = vec![b'a'; 120];
    let mut g = c.benchmark_group("agent_round_trip");
    g.bench_function("binance_hmac_sign_request", |b| {
        b.iter(|| {
            client
                .sign_request(&bn, "binance", binance_order())
                .expect("signed")
        })
    });
    g.bench_function("binance_hmac_raw_sign", |b| {
        b.iter(|| {
            client
                .sign(&bn, &payload, Some("hmac-sha256"))
                .expect("signed")
        })
    });
    g.bench_function("kalshi_rsa_sign_request", |b| {
        b.iter(|| {
            client
                .sign_request(&ks, "kalshi", kalshi_order())
                .expect("signed")
        })
    });
    g.bench_function("kalshi_rsa_raw_sign", |b| {
        b.iter(|| {
            client
                .sign(&ks, &payload, Some("rsa-pss-sha256"))
                .expect("signed")
        })
    });
    g.finish();
}

criterion_group!(benches, overhead, through_agent);
criterion_main!(benches);
