//! A benchmark run's results with the derived ratios and target verdicts, and their rendering
//! as the markdown of docs/benchmarks.md (returned as a string; the CLI writes it).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::{AgentInfo, CaseResult, Limit, Machine, Plan, Target, MESSAGE_LEN, WARMUP};

/// Target: keyward p50 − in-process p50, HMAC-SHA256, one client (ARCHITECTURE.md §11).
pub const TARGET_OVERHEAD_P50_US: f64 = 30.0;
/// Target: keyward p99 − in-process p99, same case.
pub const TARGET_OVERHEAD_P99_US: f64 = 150.0;
/// Target: keyward ops/s ÷ ssh-agent ops/s, Ed25519, four clients.
pub const TARGET_VS_SSH_AGENT: f64 = 2.0;
/// Target (issue 4): keyward ops/s ÷ raw cryptoki ops/s on the same token, equal concurrency;
/// issue 6: the same against raw tss-esapi calls on the same TPM.
pub const TARGET_VS_RAW: f64 = 0.9;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeySummary {
    pub name: String,
    pub key_type: String,
    pub scheme: String,
    pub fingerprint: String,
    pub in_process: bool,
    pub ssh_agent: bool,
    #[serde(default)]
    pub raw_pkcs11: bool,
    #[serde(default)]
    pub raw_tpm: bool,
}

/// keyward against the other two paths, for one key at one concurrency.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub key: String,
    pub key_type: String,
    pub clients: usize,
    pub keyward_ops_per_sec: f64,
    /// keyward ops/s ÷ ssh-agent ops/s.
    pub vs_ssh_agent: Option<f64>,
    /// keyward p50 − in-process p50 (µs).
    pub overhead_p50_us: Option<f64>,
    /// keyward p99 − in-process p99 (µs).
    pub overhead_p99_us: Option<f64>,
    /// Raw cryptoki ops/s on the same token at the same concurrency.
    #[serde(default)]
    pub raw_ops_per_sec: Option<f64>,
    /// keyward ops/s ÷ raw cryptoki ops/s.
    #[serde(default)]
    pub vs_raw: Option<f64>,
    /// Which raw path `raw_ops_per_sec` is (raw cryptoki or raw tss-esapi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_target: Option<Target>,
}

/// One performance target and whether this run met it (`None`: not measured in this run).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetCheck {
    pub target: String,
    pub measured: String,
    pub met: Option<bool>,
}

fn one() -> u32 {
    1
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub keyward_version: String,
    /// UTC, RFC 3339.
    pub date: String,
    pub machine: Machine,
    pub agent: Option<AgentInfo>,
    pub limit: String,
    /// Slices each case was split into, run round-robin with the other cases.
    #[serde(default = "one")]
    pub rounds: u32,
    pub message_bytes: usize,
    pub warmup_ms: u64,
    pub clients: Vec<usize>,
    pub keys: Vec<KeySummary>,
    pub checks: Vec<String>,
    pub notes: Vec<String>,
    pub results: Vec<CaseResult>,
    pub comparisons: Vec<Comparison>,
    pub targets: Vec<TargetCheck>,
    /// One client's round trip over a bare Unix socket pair to an echo thread (the floor).
    pub socket_floor: Option<super::Stats>,
    /// How the run was started (for the "reproduce" line).
    pub command: Option<String>,
}

impl Report {
    pub fn new(
        plan: &Plan,
        machine: Machine,
        limit: Limit,
        clients: &[usize],
        results: Vec<CaseResult>,
        socket_floor: Option<super::Stats>,
        command: Option<String>,
    ) -> Report {
        let keys = plan
            .keys
            .iter()
            .map(|k| KeySummary {
                name: k.name.to_string(),
                key_type: k.key_type.to_string(),
                scheme: k.scheme.to_string(),
                fingerprint: k.fingerprint.clone(),
                in_process: k.in_process.is_some(),
                ssh_agent: k.ssh.is_some(),
                raw_pkcs11: k.raw.is_some(),
                raw_tpm: k.raw_tpm.is_some(),
            })
            .collect::<Vec<_>>();
        let comparisons = comparisons(&keys, clients, &results);
        let targets = targets(&comparisons);
        let date = time::OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default();
        Report {
            keyward_version: crate::VERSION.to_string(),
            date,
            machine,
            agent: plan.agent.clone(),
            limit: limit.describe(),
            rounds: 1,
            message_bytes: MESSAGE_LEN,
            warmup_ms: WARMUP.as_millis() as u64,
            clients: clients.to_vec(),
            keys,
            checks: plan.checks.clone(),
            notes: plan.notes.clone(),
            results,
            comparisons,
            targets,
            socket_floor,
            command,
        }
    }

    /// The result of one case, if it was measured.
    pub fn find(&self, key: &str, target: Target, clients: usize) -> Option<&CaseResult> {
        find(&self.results, key, target, clients)
    }
}

fn find<'a>(
    results: &'a [CaseResult],
    key: &str,
    target: Target,
    clients: usize,
) -> Option<&'a CaseResult> {
    results
        .iter()
        .find(|r| r.key == key && r.target == target && r.clients == clients)
}

pub fn comparisons(
    keys: &[KeySummary],
    clients: &[usize],
    results: &[CaseResult],
) -> Vec<Comparison> {
    let mut out = Vec::new();
    for k in keys {
        for &c in clients {
            let Some(kw) = find(results, &k.name, Target::Keyward, c) else {
                continue;
            };
            let ssh = find(results, &k.name, Target::SshAgent, c);
            let ip = find(results, &k.name, Target::InProcess, c);
            let raw = [Target::RawPkcs11, Target::RawTpm]
                .into_iter()
                .find_map(|t| find(results, &k.name, t, c));
            out.push(Comparison {
                key: k.name.clone(),
                key_type: k.key_type.clone(),
                clients: c,
                keyward_ops_per_sec: kw.stats.ops_per_sec,
                vs_ssh_agent: ssh
                    .filter(|s| s.stats.ops_per_sec > 0.0)
                    .map(|s| kw.stats.ops_per_sec / s.stats.ops_per_sec),
                overhead_p50_us: ip.map(|i| kw.stats.p50_us - i.stats.p50_us),
                overhead_p99_us: ip.map(|i| kw.stats.p99_us - i.stats.p99_us),
                raw_ops_per_sec: raw.map(|r| r.stats.ops_per_sec),
                vs_raw: raw
                    .filter(|r| r.stats.ops_per_sec > 0.0)
                    .map(|r| kw.stats.ops_per_sec / r.stats.ops_per_sec),
                raw_target: raw.map(|r| r.target),
            });
        }
    }
    out
}

pub fn targets(comparisons: &[Comparison]) -> Vec<TargetCheck> {
    let hmac = comparisons
        .iter()
        .find(|c| c.key_type == "hmac-sha256" && c.clients == 1 && c.overhead_p50_us.is_some());
    let ed = comparisons
        .iter()
        .find(|c| c.key_type == "ed25519" && c.clients == 4 && c.vs_ssh_agent.is_some());
    let mut out = Vec::new();
    out.push(TargetCheck {
        target: format!(
            "agent overhead p50 ≤ {TARGET_OVERHEAD_P50_US} µs (HMAC-SHA256, 1 client: keyward p50 − in-process p50)"
        ),
        measured: hmac
            .and_then(|c| c.overhead_p50_us)
            .map_or("not measured".into(), |v| format!("{v:.1} µs")),
        met: hmac
            .and_then(|c| c.overhead_p50_us)
            .map(|v| v <= TARGET_OVERHEAD_P50_US),
    });
    out.push(TargetCheck {
        target: format!(
            "agent overhead p99 ≤ {TARGET_OVERHEAD_P99_US} µs (same case: keyward p99 − in-process p99)"
        ),
        measured: hmac
            .and_then(|c| c.overhead_p99_us)
            .map_or("not measured".into(), |v| format!("{v:.1} µs")),
        met: hmac
            .and_then(|c| c.overhead_p99_us)
            .map(|v| v <= TARGET_OVERHEAD_P99_US),
    });
    out.push(TargetCheck {
        target: format!("≥ {TARGET_VS_SSH_AGENT}× ssh-agent's ops/s (Ed25519, 4 clients)"),
        measured: ed
            .and_then(|c| c.vs_ssh_agent)
            .map_or("not measured".into(), |v| format!("{v:.2}×")),
        met: ed
            .and_then(|c| c.vs_ssh_agent)
            .map(|v| v >= TARGET_VS_SSH_AGENT),
    });
    let lowest = comparisons
        .iter()
        .filter_map(|c| c.vs_ssh_agent.map(|v| (v, c)))
        .min_by(|a, b| a.0.total_cmp(&b.0));
    out.push(TargetCheck {
        target: format!(
            "≥ {TARGET_VS_SSH_AGENT}× ssh-agent's ops/s for every key type and client count measured"
        ),
        measured: lowest.map_or("not measured".into(), |(v, c)| {
            format!(
                "lowest {v:.2}× ({}, {} client{})",
                c.key_type,
                c.clients,
                if c.clients == 1 { "" } else { "s" }
            )
        }),
        met: lowest.map(|(v, _)| v >= TARGET_VS_SSH_AGENT),
    });
    // Only runs with token (TPM) keys measure these; soft-only runs do not list them.
    for raw in [Target::RawPkcs11, Target::RawTpm] {
        let lowest_raw = comparisons
            .iter()
            .filter(|c| c.raw_target == Some(raw))
            .filter_map(|c| c.vs_raw.map(|v| (v, c)))
            .min_by(|a, b| a.0.total_cmp(&b.0));
        let Some((v, c)) = lowest_raw else {
            continue;
        };
        let (device, keys) = match raw {
            Target::RawTpm => ("TPM", "TPM key"),
            _ => ("token", "token key"),
        };
        out.push(TargetCheck {
            target: format!(
                "keyward ≥ {:.0}% of {} ops/s on the same {device} at equal concurrency (every {keys} and client count)",
                TARGET_VS_RAW * 100.0,
                raw.label()
            ),
            measured: format!(
                "lowest {:.1}% ({}, {} client{})",
                v * 100.0,
                c.key_type,
                c.clients,
                if c.clients == 1 { "" } else { "s" }
            ),
            met: Some(v >= TARGET_VS_RAW),
        });
    }
    out
}

/// Thousands-separated integer.
pub fn fmt_ops(v: f64) -> String {
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

pub fn fmt_us(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "**met**",
        Some(false) => "**not met**",
        None => "not measured",
    }
}

fn opt(v: Option<&str>) -> &str {
    v.unwrap_or("unknown")
}

/// docs/benchmarks.md.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "# Benchmarks\n");
    let _ = writeln!(
        w,
        "Generated by `{}` on {} — every number below comes from that one run. \
         `scripts/bench.sh` (~{} min) measures again and rewrites this file; `scripts/bench.sh --quick` is a \
         short smoke run that leaves it alone.\n",
        r.command.as_deref().unwrap_or("keyward bench"),
        if r.date.is_empty() { "(unknown date)" } else { &r.date },
        estimate_minutes(r)
    );

    let _ = writeln!(w, "## Headline\n");
    let _ = writeln!(w, "| target (ARCHITECTURE.md §11) | this run | verdict |");
    let _ = writeln!(w, "|---|---|---|");
    for t in &r.targets {
        let _ = writeln!(w, "| {} | {} | {} |", t.target, t.measured, verdict(t.met));
    }
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "The machine is small ({} logical core{}, shared by the benchmark clients, the keyward agent and \
         ssh-agent) and noisy (other jobs run on it), so absolute numbers move by tens of percent between \
         runs. Compare the **ratios**: all paths were measured in the same run, minutes apart, on the same keys.\n",
        r.machine.cores,
        if r.machine.cores == 1 { "" } else { "s" }
    );

    if !r.comparisons.is_empty() {
        let _ = writeln!(w, "### keyward against ssh-agent and in-process signing\n");
        let _ = writeln!(
            w,
            "| key type | clients | keyward ops/s | keyward ÷ ssh-agent ops/s | overhead p50 (µs) | overhead p99 (µs) |"
        );
        let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|");
        for c in &r.comparisons {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} |",
                c.key_type,
                c.clients,
                fmt_ops(c.keyward_ops_per_sec),
                c.vs_ssh_agent.map_or("—".into(), |v| format!("{v:.2}×")),
                c.overhead_p50_us.map_or("—".into(), fmt_us),
                c.overhead_p99_us.map_or("—".into(), fmt_us),
            );
        }
        let _ = writeln!(
            w,
            "\nOverhead = keyward's latency minus in-process signing's latency at the same concurrency \
             (1 client vs 1 thread, 4 clients vs 4 threads): everything a signature through the agent costs \
             on top of the signing itself — the socket round trip, framing and JSON on both sides, and the \
             agent's per-request work. With more clients than cores it also includes waiting for a core. \
             — = not measured (HMAC has no ssh-agent equivalent).\n"
        );
    }

    let _ = writeln!(w, "## Machine and software\n");
    let m = &r.machine;
    let _ = writeln!(
        w,
        "- CPU: {} — {} logical core{} available",
        opt(m.cpu_model.as_deref()),
        m.cores,
        if m.cores == 1 { "" } else { "s" }
    );
    let _ = writeln!(w, "- Kernel: {}", opt(m.kernel.as_deref()));
    if let Some(l) = m.load_1m {
        let _ = writeln!(w, "- Load average (1 min) when the run started: {l:.2}");
    }
    if let Some(f) = &r.socket_floor {
        let _ = writeln!(
            w,
            "- Unix-socket round-trip floor (one thread echoing 250-byte frames over a socket pair, no parsing, \
             no signing, 1 client): p50 {} µs, p99 {} µs, {} round trips/s — the kernel's and scheduler's share \
             of every socket path below. It depends on whether the two threads happen to share a core, so it \
             varies between runs",
            fmt_us(f.p50_us),
            fmt_us(f.p99_us),
            fmt_ops(f.ops_per_sec)
        );
    }
    let _ = writeln!(w, "- Rust: {}", opt(m.rustc.as_deref()));
    let _ = writeln!(w, "- OpenSSH: {}", opt(m.openssh.as_deref()));
    match &r.agent {
        Some(a) => {
            let _ = writeln!(
                w,
                "- keyward {} (bench client), agent {} with {} signing worker{} (backends: {})",
                r.keyward_version,
                a.agent_version,
                a.workers,
                if a.workers == 1 { "" } else { "s" },
                if a.backends.is_empty() {
                    "—".to_string()
                } else {
                    a.backends.join(", ")
                }
            );
        }
        None => {
            let _ = writeln!(w, "- keyward {}", r.keyward_version);
        }
    }
    let _ = writeln!(w);

    let _ = writeln!(w, "## Method\n");
    let _ = writeln!(
        w,
        "- Every client is a thread with its own connection doing sequential round trips (no pipelining): \
         send a sign request for a {}-byte message (its first 8 bytes are a request counter), wait for the \
         complete answer, repeat. Latency is measured around each round trip with the monotonic clock; \
         ops/s is all clients' requests divided by the wall time of the case; p50/p99 are nearest-rank \
         percentiles over every request of the case.",
        r.message_bytes
    );
    let _ = writeln!(w, "- {}", duration_text(r));
    let _ = writeln!(
        w,
        "- **keyward socket**: the blocking `keyward::client::Client` (JSON frames) against the running agent, \
         `sign` op with the scheme below. The agent runs with its default configuration for the bench home, except `[audit] fail_closed = false` (scripts/bench.sh): the audit log is on and records every request, but answers do not wait for an fsync (the \"Audit\" section measures all three modes)."
    );
    let _ = writeln!(
        w,
        "- **in-process**: the same key file loaded into keyward's own soft backend inside the bench process \
         and signed with `Backend::sign` — the call the agent makes — from 1 or 4 threads. This is the \
         baseline the overhead is measured against."
    );
    let _ = writeln!(
        w,
        "- **ssh-agent**: OpenSSH's `ssh-agent` holding the same key (`ssh-add`), driven by the same loop \
         over the ssh-agent protocol (SSH2_AGENTC_SIGN_REQUEST; RSA with the rsa-sha2-256 flag, i.e. the \
         same RSA PKCS#1 v1.5 SHA-256 signature keyward makes)."
    );
    let _ = writeln!(
        w,
        "- Before measuring, one signature from every path is verified with the agent's public key (or, for \
         HMAC, compared with the in-process tag), so all three paths provably use the same key."
    );
    let _ = writeln!(
        w,
        "- Framing, request parsing and the client's JSON work alone: `cargo bench --bench framing` \
         (criterion micro-benchmarks; each is about a microsecond)."
    );
    let _ = writeln!(
        w,
        "- Reading the numbers: nothing is pinned to a core, as in real use. On a small virtual machine a \
         round trip costs noticeably more when the client and the agent run on different cores (waking a \
         thread on another virtual CPU goes through the hypervisor) than when they share one, and the \
         scheduler decides that anew in every case. That, plus other jobs on the machine, is most of the \
         run-to-run variation of the 1-client latencies and of the overhead; a negative overhead means the \
         in-process case was disturbed more than the socket case."
    );
    let _ = writeln!(w);

    let _ = writeln!(w, "## Results\n");
    for k in &r.keys {
        let _ = writeln!(
            w,
            "### {} — key `{}`, scheme `{}`\n",
            k.key_type, k.name, k.scheme
        );
        let _ = writeln!(
            w,
            "| path | clients | requests | ops/s | p50 (µs) | p90 (µs) | p99 (µs) | p99.9 (µs) | max (µs) |"
        );
        let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for t in Target::ALL {
            for &c in &r.clients {
                if let Some(x) = r.find(&k.name, t, c) {
                    let st = &x.stats;
                    let _ = writeln!(
                        w,
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        t.label(),
                        c,
                        fmt_ops(st.requests as f64),
                        fmt_ops(st.ops_per_sec),
                        fmt_us(st.p50_us),
                        fmt_us(st.p90_us),
                        fmt_us(st.p99_us),
                        fmt_us(st.p999_us),
                        fmt_us(st.max_us),
                    );
                }
            }
        }
        let _ = writeln!(w);
        for c in r.comparisons.iter().filter(|c| c.key == k.name) {
            let mut parts = Vec::new();
            if let Some(v) = c.vs_ssh_agent {
                parts.push(format!("{v:.2}× ssh-agent's ops/s"));
            }
            if let (Some(p50), Some(p99)) = (c.overhead_p50_us, c.overhead_p99_us) {
                parts.push(format!(
                    "overhead over in-process p50 {} µs, p99 {} µs",
                    fmt_us(p50),
                    fmt_us(p99)
                ));
            }
            if !parts.is_empty() {
                let _ = writeln!(
                    w,
                    "- {} client{}: {}",
                    c.clients,
                    if c.clients == 1 { "" } else { "s" },
                    parts.join("; ")
                );
            }
        }
        let _ = writeln!(w);
    }

    if !r.checks.is_empty() || !r.notes.is_empty() {
        let _ = writeln!(w, "## Checks and notes\n");
        for c in &r.checks {
            let _ = writeln!(w, "- {c}");
        }
        for n in &r.notes {
            let _ = writeln!(w, "- {n}");
        }
        let _ = writeln!(w);
    }
    s
}

fn duration_text(r: &Report) -> String {
    if r.rounds > 1 {
        format!(
            "Each case runs for {} in total, as {} slices run round-robin with the other cases \
             (case 1, 2, …, then again), so the paths compared share the machine's background \
             noise; every slice starts with a {} ms warm-up per client that is not counted, and a \
             case's statistics cover all its slices.",
            r.limit, r.rounds, r.warmup_ms
        )
    } else {
        format!(
            "Each case runs for {} after a {} ms warm-up per client that is not counted.",
            r.limit, r.warmup_ms
        )
    }
}

fn cpu(v: Option<f64>) -> String {
    v.map_or("—".into(), |v| format!("{v:.0}"))
}

/// A compact extra section for an existing report (a second, differently configured run):
/// a heading, an explanatory note, one table of every case, and the overheads.
pub fn section(r: &Report, title: &str, note: &str) -> String {
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "## {title}\n");
    if !note.is_empty() {
        let _ = writeln!(w, "{note}\n");
    }
    if let Some(f) = &r.socket_floor {
        let _ = writeln!(
            w,
            "Unix-socket round trip in this configuration (echo thread, 1 client): p50 {} µs, p99 {} µs.\n",
            fmt_us(f.p50_us),
            fmt_us(f.p99_us)
        );
    }
    let raw: Vec<&Comparison> = r
        .comparisons
        .iter()
        .filter(|c| c.vs_raw.is_some())
        .collect();
    if !raw.is_empty() {
        let _ = writeln!(w, "| target | this run | verdict |");
        let _ = writeln!(w, "|---|---|---|");
        for t in r.targets.iter().filter(|t| t.met.is_some()) {
            let _ = writeln!(w, "| {} | {} | {} |", t.target, t.measured, verdict(t.met));
        }
        let _ = writeln!(w);
        let raw_label = raw
            .iter()
            .find_map(|c| c.raw_target)
            .unwrap_or(Target::RawPkcs11)
            .label();
        let _ = writeln!(
            w,
            "| key type | scheme | clients | {raw_label} ops/s | keyward ops/s | keyward ÷ raw | raw p50 / p99 (µs) | keyward p50 / p99 (µs) | ≥ {:.0}% |",
            TARGET_VS_RAW * 100.0
        );
        let _ = writeln!(w, "|---|---|---:|---:|---:|---:|---:|---:|---|");
        for c in raw {
            let (Some(rr), Some(kw)) = (
                r.find(&c.key, c.raw_target.unwrap_or(Target::RawPkcs11), c.clients),
                r.find(&c.key, Target::Keyward, c.clients),
            ) else {
                continue;
            };
            let v = c.vs_raw.unwrap_or(0.0);
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} | {:.1}% | {} / {} | {} / {} | {} |",
                c.key_type,
                kw.scheme,
                c.clients,
                fmt_ops(rr.stats.ops_per_sec),
                fmt_ops(kw.stats.ops_per_sec),
                v * 100.0,
                fmt_us(rr.stats.p50_us),
                fmt_us(rr.stats.p99_us),
                fmt_us(kw.stats.p50_us),
                fmt_us(kw.stats.p99_us),
                if v >= TARGET_VS_RAW {
                    "met"
                } else {
                    "**not met**"
                }
            );
        }
        let _ = writeln!(w);
        // Equal concurrency is the target; the best of each path at any concurrency is the
        // device's capacity against keyward's (for a serial TPM, raw at 1 thread may be best).
        for k in &r.keys {
            let best = |t: Target| {
                r.results
                    .iter()
                    .filter(|x| x.key == k.name && x.target == t)
                    .max_by(|a, b| a.stats.ops_per_sec.total_cmp(&b.stats.ops_per_sec))
            };
            let raw_best = [Target::RawPkcs11, Target::RawTpm]
                .into_iter()
                .find_map(best);
            if let (Some(rb), Some(kb)) = (raw_best, best(Target::Keyward)) {
                if rb.stats.ops_per_sec > 0.0 {
                    let _ = writeln!(
                        w,
                        "- {}: keyward's best ({} ops/s, {} client{}) = {:.1}% of {}'s best ({} ops/s, {} thread{})",
                        k.key_type,
                        fmt_ops(kb.stats.ops_per_sec),
                        kb.clients,
                        if kb.clients == 1 { "" } else { "s" },
                        kb.stats.ops_per_sec / rb.stats.ops_per_sec * 100.0,
                        rb.target.label(),
                        fmt_ops(rb.stats.ops_per_sec),
                        rb.clients,
                        if rb.clients == 1 { "" } else { "s" },
                    );
                }
            }
        }
        let _ = writeln!(w);
    }
    let with_cpu = r.results.iter().any(|x| x.client_cpu_us.is_some());
    if with_cpu {
        let _ = writeln!(
            w,
            "| key type | path | clients | ops/s | p50 (µs) | p99 (µs) | bench-process CPU µs/op | agent CPU µs/op |"
        );
        let _ = writeln!(w, "|---|---|---:|---:|---:|---:|---:|---:|");
    } else {
        let _ = writeln!(
            w,
            "| key type | path | clients | ops/s | p50 (µs) | p99 (µs) |"
        );
        let _ = writeln!(w, "|---|---|---:|---:|---:|---:|");
    }
    for k in &r.keys {
        for t in Target::ALL {
            for &c in &r.clients {
                if let Some(x) = r.find(&k.name, t, c) {
                    let extra = if with_cpu {
                        format!(" {} | {} |", cpu(x.client_cpu_us), cpu(x.agent_cpu_us))
                    } else {
                        String::new()
                    };
                    let _ = writeln!(
                        w,
                        "| {} | {} | {} | {} | {} | {} |{extra}",
                        k.key_type,
                        t.label(),
                        c,
                        fmt_ops(x.stats.ops_per_sec),
                        fmt_us(x.stats.p50_us),
                        fmt_us(x.stats.p99_us)
                    );
                }
            }
        }
    }
    let _ = writeln!(w);
    for c in &r.comparisons {
        if let (Some(p50), Some(p99)) = (c.overhead_p50_us, c.overhead_p99_us) {
            let _ = writeln!(
                w,
                "- {}, {} client{}: overhead over in-process p50 {} µs, p99 {} µs",
                c.key_type,
                c.clients,
                if c.clients == 1 { "" } else { "s" },
                fmt_us(p50),
                fmt_us(p99)
            );
        }
    }
    let _ = writeln!(w);
    if r.comparisons.iter().any(|c| c.vs_raw.is_some()) {
        let _ = writeln!(w, "Run details:\n");
        let _ = writeln!(
            w,
            "- Measured on {}{}",
            r.date,
            r.command
                .as_deref()
                .map(|c| format!(" by `{c}`"))
                .unwrap_or_default()
        );
        let _ = writeln!(w, "- {}", duration_text(r));
        let m = &r.machine;
        let _ = writeln!(
            w,
            "- Machine: {} — {} logical core{}, kernel {}",
            opt(m.cpu_model.as_deref()),
            m.cores,
            if m.cores == 1 { "" } else { "s" },
            opt(m.kernel.as_deref())
        );
        if let Some(l) = r.machine.load_1m {
            let _ = writeln!(w, "- Load average (1 min) when this run started: {l:.2}");
        }
        if let Some(a) = &r.agent {
            let _ = writeln!(
                w,
                "- Agent {} with {} signing worker{} (backends: {})",
                a.agent_version,
                a.workers,
                if a.workers == 1 { "" } else { "s" },
                a.backends.join(", ")
            );
        }
        for c in &r.checks {
            let _ = writeln!(w, "- Check: {c}");
        }
        for n in &r.notes {
            let _ = writeln!(w, "- Note: {n}");
        }
        let _ = writeln!(w);
    }
    s
}

fn estimate_minutes(r: &Report) -> u64 {
    let total_s: f64 = r
        .results
        .iter()
        .map(|x| x.stats.elapsed_s + WARMUP.as_secs_f64())
        .sum();
    ((total_s + 30.0) / 60.0).ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Stats;

    fn res(key: &str, kt: &str, target: Target, clients: usize, ops: f64, p50: f64) -> CaseResult {
        CaseResult {
            key: key.into(),
            key_type: kt.into(),
            scheme: kt.into(),
            target,
            clients,
            stats: Stats {
                requests: (ops * 5.0) as u64,
                elapsed_s: 5.0,
                ops_per_sec: ops,
                p50_us: p50,
                p90_us: p50 * 1.2,
                p99_us: p50 * 2.0,
                p999_us: p50 * 3.0,
                mean_us: p50,
                min_us: p50 / 2.0,
                max_us: p50 * 10.0,
            },
            agent_cpu_us: None,
            client_cpu_us: None,
        }
    }

    fn key(name: &str, kt: &str, ssh: bool) -> KeySummary {
        KeySummary {
            name: name.into(),
            key_type: kt.into(),
            scheme: kt.into(),
            fingerprint: "SHA256:x".into(),
            in_process: true,
            ssh_agent: ssh,
            raw_pkcs11: false,
            raw_tpm: false,
        }
    }

    #[test]
    fn ratios_and_verdicts() {
        let keys = vec![key("ed", "ed25519", true), key("h", "hmac-sha256", false)];
        let results = vec![
            res("ed", "ed25519", Target::InProcess, 4, 40000.0, 50.0),
            res("ed", "ed25519", Target::Keyward, 4, 9000.0, 400.0),
            res("ed", "ed25519", Target::SshAgent, 4, 3000.0, 1300.0),
            res("h", "hmac-sha256", Target::InProcess, 1, 900000.0, 1.0),
            res("h", "hmac-sha256", Target::Keyward, 1, 30000.0, 25.0),
        ];
        let c = comparisons(&keys, &[1, 4], &results);
        assert_eq!(c.len(), 2);
        let ed = &c[0];
        assert_eq!(ed.clients, 4);
        assert!((ed.vs_ssh_agent.unwrap() - 3.0).abs() < 1e-9);
        assert!((ed.overhead_p50_us.unwrap() - 350.0).abs() < 1e-9);
        let h = &c[1];
        assert_eq!(h.vs_ssh_agent, None);
        assert!((h.overhead_p50_us.unwrap() - 24.0).abs() < 1e-9);
        assert!((h.overhead_p99_us.unwrap() - 48.0).abs() < 1e-9);
        let t = targets(&c);
        assert_eq!(t.len(), 4);
        assert_eq!(t[0].met, Some(true));
        assert_eq!(t[1].met, Some(true));
        assert_eq!(t[2].met, Some(true));
        assert_eq!(t[2].measured, "3.00×");
        assert_eq!(t[3].measured, "lowest 3.00× (ed25519, 4 clients)");
        assert_eq!(t[3].met, Some(true));
        let none = targets(&[]);
        assert!(none.iter().all(|t| t.met.is_none()));
    }

    #[test]
    fn tpm_keys_compare_against_raw_tss_esapi() {
        let keys = vec![key("t", "p256", false)];
        let results = vec![
            res("t", "p256", Target::RawTpm, 1, 2000.0, 450.0),
            res("t", "p256", Target::RawTpm, 4, 1500.0, 900.0),
            res("t", "p256", Target::Keyward, 1, 1900.0, 480.0),
            res("t", "p256", Target::Keyward, 4, 1200.0, 1100.0),
        ];
        let c = comparisons(&keys, &[1, 4], &results);
        assert_eq!(c[0].raw_target, Some(Target::RawTpm));
        assert!((c[0].vs_raw.unwrap() - 0.95).abs() < 1e-9);
        assert!((c[1].vs_raw.unwrap() - 0.8).abs() < 1e-9);
        let t = targets(&c);
        let raw = t.last().unwrap();
        assert!(
            raw.target.contains("raw tss-esapi ops/s on the same TPM"),
            "{raw:?}"
        );
        assert_eq!(raw.measured, "lowest 80.0% (p256, 4 clients)");
        assert_eq!(raw.met, Some(false));
        // No pkcs11 line in a TPM-only run.
        assert!(!t.iter().any(|x| x.target.contains("raw cryptoki")));
        let r = Report {
            keyward_version: "0.1.0".into(),
            date: "2026-01-01T00:00:00Z".into(),
            machine: Machine::default(),
            agent: None,
            limit: Limit::Duration(std::time::Duration::from_secs(5)).describe(),
            rounds: 5,
            message_bytes: 100,
            warmup_ms: 200,
            clients: vec![1, 4],
            keys,
            checks: vec![],
            notes: vec![],
            results,
            comparisons: c,
            targets: t,
            socket_floor: None,
            command: None,
        };
        let sec = section(&r, "TPM", "");
        assert!(sec.contains("| raw tss-esapi ops/s |"), "{sec}");
        assert!(
            sec.contains("| p256 | p256 | 1 | 2,000 | 1,900 | 95.0% |"),
            "{sec}"
        );
        assert!(sec.contains(
            "- p256: keyward's best (1,900 ops/s, 1 client) = 95.0% of raw tss-esapi's best (2,000 ops/s, 1 thread)"
        ));
    }

    #[test]
    fn markdown_has_the_tables() {
        let keys = vec![key("ed", "ed25519", true)];
        let results = vec![
            res("ed", "ed25519", Target::InProcess, 1, 20000.0, 45.0),
            res("ed", "ed25519", Target::Keyward, 1, 12000.0, 80.0),
            res("ed", "ed25519", Target::SshAgent, 1, 1500.0, 650.0),
        ];
        let comparisons = comparisons(&keys, &[1], &results);
        let targets = targets(&comparisons);
        let r = Report {
            keyward_version: "0.1.0".into(),
            date: "2026-01-01T00:00:00Z".into(),
            machine: Machine {
                cores: 2,
                cpu_model: Some("Test CPU".into()),
                ..Machine::default()
            },
            agent: None,
            limit: Limit::Duration(std::time::Duration::from_secs(5)).describe(),
            rounds: 1,
            message_bytes: 100,
            warmup_ms: 200,
            clients: vec![1],
            keys,
            checks: vec!["`ed` (ed25519): keyward's signature verifies".into()],
            notes: vec![],
            results,
            comparisons,
            targets,
            socket_floor: None,
            command: Some("scripts/bench.sh".into()),
        };
        let md = markdown(&r);
        assert!(
            md.contains("| in-process | 1 | 100,000 | 20,000 | 45.0 |"),
            "{md}"
        );
        assert!(md.contains("| ssh-agent | 1 |"));
        assert!(
            md.contains("| ed25519 | 1 | 12,000 | 8.00× | 35.0 | 70.0 |"),
            "{md}"
        );
        assert!(md.contains("Test CPU — 2 logical cores"));
        assert!(md.contains("not measured"));
        assert!(md.contains("Each case runs for 5 s after"));
        let sec = section(&r, "Same core", "Pinned.");
        assert!(sec.starts_with("## Same core\n\nPinned.\n"), "{sec}");
        assert!(
            sec.contains("| ed25519 | keyward socket | 1 | 12,000 | 80.0 | 160.0 |"),
            "{sec}"
        );
        assert!(
            sec.contains("- ed25519, 1 client: overhead over in-process p50 35.0 µs, p99 70.0 µs")
        );
        assert_eq!(fmt_ops(1234567.4), "1,234,567");
        assert_eq!(fmt_ops(999.0), "999");
        assert_eq!(fmt_us(1234.56), "1235");
    }
}
