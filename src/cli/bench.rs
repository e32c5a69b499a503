//! `keyward bench`: measure signing through the running agent, in-process, through an
//! ssh-agent and (token keys) with raw cryptoki calls or (TPM keys) raw tss-esapi calls, all with
//! the same loop; prints tables (or JSON) and can write docs/benchmarks.md.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keyward::backend::pkcs11::Pkcs11Backend;
use keyward::backend::tpm::{TpmAuth, TpmBackend};
use keyward::bench::raw_pkcs11::{self, RawToken};
use keyward::bench::{
    self, report, CaseResult, Limit, Machine, Plan, PlanOptions, RawTpm, Report, Target, TokenKeys,
    TpmKeys,
};
use keyward::config::Config;
use keyward::home::Home;
use keyward::keystore::Keystore;
use keyward::model::{Algorithm, BackendKind, KeyName};
use keyward::secret::SecretSource;
use keyward::{Error, Result};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Key to benchmark (repeatable; default: every unlocked, enabled key the agent holds).
    #[arg(long = "key", value_name = "NAME")]
    keys: Vec<KeyName>,
    /// Concurrent clients per case, comma-separated; each client is a thread with its own
    /// connection doing sequential round trips.
    #[arg(long, value_name = "N,N", value_delimiter = ',', default_value = "1,4")]
    clients: Vec<usize>,
    /// Seconds each case runs (after a 200 ms warm-up).
    #[arg(long, value_name = "SECS", default_value_t = 3.0)]
    duration: f64,
    /// Split every case into N slices and run them round-robin (case 1, 2, …, 1, 2, …), so
    /// the paths compared share the machine's background noise; a case's statistics cover all
    /// its slices. --duration/--requests is the total per case.
    #[arg(long, value_name = "N", default_value_t = 1)]
    rounds: u32,
    /// Requests per client per case, instead of --duration.
    #[arg(long, value_name = "N", conflicts_with = "duration")]
    requests: Option<u64>,
    /// Also benchmark the OpenSSH ssh-agent at SOCK for keys it holds too (same public key).
    #[arg(long, value_name = "SOCK")]
    ssh_agent: Option<PathBuf>,
    /// Also sign in-process with KEY's secret from PATH (the baseline for the agent's
    /// overhead); repeatable. The file must hold the same key the agent holds.
    #[arg(long = "in-process", value_name = "KEY=PATH", value_parser = parse_in_process)]
    in_process: Vec<(KeyName, PathBuf)>,
    /// For the keys on token ALIAS (`[pkcs11.ALIAS]` in keyward.toml, PIN from its source):
    /// also sign with raw cryptoki calls on the same token (one session per thread, the
    /// mechanism keyward uses) and with keyward's pkcs11 backend in this process. Repeatable.
    /// The module reads its environment (e.g. SOFTHSM2_CONF) as the agent's does.
    #[arg(long = "raw-pkcs11", value_name = "ALIAS")]
    raw_pkcs11: Vec<String>,
    /// For the keys on TPM ALIAS (`[tpm.ALIAS]` in keyward.toml, auth values from their
    /// sources): also sign with raw tss-esapi calls on the same TPM (the key blob loaded once
    /// under the same storage key, one context per thread, the scheme keyward uses) and with
    /// keyward's tpm backend in this process. Repeatable. Every TPM case starts by flushing
    /// the TPM's transient objects (the paths take turns in its few slots).
    #[arg(long = "raw-tpm", value_name = "ALIAS")]
    raw_tpm: Vec<String>,
    /// Sign KEY with SCHEME instead of the key type's default (e.g.
    /// `--scheme rsa=rsa-pss-sha256`); repeatable.
    #[arg(long = "scheme", value_name = "KEY=SCHEME", value_parser = parse_scheme)]
    schemes: Vec<(KeyName, Algorithm)>,
    /// Write a markdown report (the format of docs/benchmarks.md) to PATH.
    #[arg(long, value_name = "PATH")]
    report: Option<PathBuf>,
    /// How the report says the run was started (scripts/bench.sh sets this).
    #[arg(long, value_name = "TEXT", hide = true)]
    report_command: Option<String>,
    /// Append a compact section with this title to the --report file instead of rewriting
    /// it (scripts/bench.sh uses it for its same-core diagnostic pass).
    #[arg(long, value_name = "TITLE", hide = true, requires = "report")]
    append_section: Option<String>,
    /// The explanatory paragraph under --append-section's title.
    #[arg(long, value_name = "TEXT", hide = true, requires = "append_section")]
    section_note: Option<String>,
    /// Compare audit off, fail-open and fail-closed: three agents on copies of this home, the
    /// largest --clients count each keeping --in-flight requests in flight on the one --key.
    #[arg(long, requires = "passphrase")]
    audit_modes: bool,
    /// Requests each client keeps in flight (--audit-modes).
    #[arg(long, value_name = "N", default_value_t = 16)]
    in_flight: usize,
    /// Identity passphrase source for the agents --audit-modes starts.
    #[arg(long, value_name = "SOURCE")]
    passphrase: Option<String>,
}

fn parse_in_process(s: &str) -> std::result::Result<(KeyName, PathBuf), String> {
    let (name, path) = s
        .split_once('=')
        .ok_or_else(|| "expected KEY=PATH".to_string())?;
    if path.is_empty() {
        return Err("expected KEY=PATH, the path is empty".into());
    }
    let name = KeyName::new(name).map_err(|e| e.to_string())?;
    Ok((name, PathBuf::from(path)))
}

fn parse_scheme(s: &str) -> std::result::Result<(KeyName, Algorithm), String> {
    let (name, scheme) = s
        .split_once('=')
        .ok_or_else(|| "expected KEY=SCHEME".to_string())?;
    let name = KeyName::new(name).map_err(|e| e.to_string())?;
    let alg = scheme.parse::<Algorithm>().map_err(|e| e.to_string())?;
    Ok((name, alg))
}

/// Open every `--raw-pkcs11` token twice — raw, and as keyward's backend — and list its keys.
fn token_keys(home: &Home, aliases: &[String]) -> Result<Vec<TokenKeys>> {
    if aliases.is_empty() {
        return Ok(Vec::new());
    }
    let config = Config::load(&home.config_path())?;
    let metas = Keystore::new(home).list()?;
    let mut out = Vec::new();
    for alias in aliases {
        let cfg = config.pkcs11.get(alias).cloned().ok_or_else(|| {
            Error::Config(format!(
                "--raw-pkcs11 {alias}: no [pkcs11.{alias}] section in {}",
                home.config_path().display()
            ))
        })?;
        let pin = cfg
            .pin
            .parse::<SecretSource>()?
            .read(&format!("PIN of token {alias}"))?;
        let raw = Arc::new(RawToken::open(alias, &cfg, &pin)?);
        let backend = Arc::new(Pkcs11Backend::connect(alias, cfg, pin)?);
        let mut keys = Vec::new();
        for m in &metas {
            if m.backend != BackendKind::Pkcs11 {
                continue;
            }
            let v = m.current_version()?;
            if let Some(id) = raw_pkcs11::id_in_locator(&v.locator, alias) {
                keys.push((m.name.clone(), m.key_ref(v), id));
            }
        }
        if keys.is_empty() {
            return Err(Error::UnknownKey(format!(
                "--raw-pkcs11 {alias}: no key of this home lives on token `{alias}`"
            )));
        }
        out.push(TokenKeys {
            raw,
            backend: Some(backend),
            keys,
        });
    }
    Ok(out)
}

/// Open every `--raw-tpm` TPM twice — raw, and as keyward's backend — and list its blob keys.
fn tpm_keys(home: &Home, aliases: &[String]) -> Result<Vec<TpmKeys>> {
    if aliases.is_empty() {
        return Ok(Vec::new());
    }
    let config = Config::load(&home.config_path())?;
    let metas = Keystore::new(home).list()?;
    let mut out = Vec::new();
    for alias in aliases {
        let cfg = config.tpm.get(alias).cloned().ok_or_else(|| {
            Error::Config(format!(
                "--raw-tpm {alias}: no [tpm.{alias}] section in {}",
                home.config_path().display()
            ))
        })?;
        let raw = Arc::new(RawTpm::open(
            alias,
            &cfg,
            &home.keys_dir(),
            &TpmAuth::read(alias, &cfg)?,
        )?);
        let backend = Arc::new(TpmBackend::connect(
            alias,
            cfg.clone(),
            &home.keys_dir(),
            TpmAuth::read(alias, &cfg)?,
        )?);
        let mut keys = Vec::new();
        for m in &metas {
            if m.backend != BackendKind::Tpm {
                continue;
            }
            let v = m.current_version()?;
            if let Some(blob) = raw.blob_of(&v.locator) {
                keys.push((m.name.clone(), m.key_ref(v), blob));
            }
        }
        if keys.is_empty() {
            return Err(Error::UnknownKey(format!(
                "--raw-tpm {alias}: no key blob of this home lives on TPM `{alias}` (adopted persistent keys are not benchmarked raw)"
            )));
        }
        out.push(TpmKeys {
            raw,
            backend: Some(backend),
            keys,
        });
    }
    Ok(out)
}

const MAX_CLIENTS: usize = 256;
const MAX_DURATION_S: f64 = 3600.0;

impl BenchArgs {
    fn limit(&self) -> Result<Limit> {
        match self.requests {
            Some(0) => Err(Error::BadRequest("--requests must be at least 1".into())),
            Some(n) => Ok(Limit::Requests(n.div_ceil(u64::from(self.rounds.max(1))))),
            None if self.duration.is_finite()
                && self.duration > 0.0
                && self.duration <= MAX_DURATION_S =>
            {
                Ok(Limit::Duration(Duration::from_secs_f64(
                    self.duration / f64::from(self.rounds.max(1)),
                )))
            }
            None => Err(Error::BadRequest(format!(
                "--duration must be between 0 and {MAX_DURATION_S} seconds"
            ))),
        }
    }

    fn client_counts(&self) -> Result<Vec<usize>> {
        let mut v = Vec::new();
        for &c in &self.clients {
            if c == 0 || c > MAX_CLIENTS {
                return Err(Error::BadRequest(format!(
                    "--clients values must be 1..={MAX_CLIENTS}"
                )));
            }
            if !v.contains(&c) {
                v.push(c);
            }
        }
        if v.is_empty() {
            return Err(Error::BadRequest(
                "--clients needs at least one value".into(),
            ));
        }
        Ok(v)
    }
}

pub fn run(args: &BenchArgs, home: &Home, json: bool) -> Result<()> {
    if args.rounds == 0 || args.rounds > 100 {
        return Err(Error::BadRequest("--rounds must be 1..=100".into()));
    }
    let limit = args.limit()?;
    let clients = args.client_counts()?;
    if args.audit_modes {
        return audit_modes(args, home, json, &clients);
    }
    // Read the machine (load average) before the benchmark itself loads it.
    let machine = Machine::detect();
    let configured = Config::load(&home.config_path())
        .ok()
        .and_then(|c| c.agent.socket);
    let socket = keyward::proto::socket_path(configured.as_deref(), home.root());
    let tokens = token_keys(home, &args.raw_pkcs11)?;
    let tpms = tpm_keys(home, &args.raw_tpm)?;
    let plan = bench::plan(&PlanOptions {
        socket: &socket,
        keys: &args.keys,
        in_process: &args.in_process,
        ssh_agent: args.ssh_agent.as_deref(),
        tokens: &tokens,
        tpms: &tpms,
        schemes: &args.schemes,
    })?;
    let cases = plan.cases(&clients);
    let floor = bench::socket_floor(limit, &AtomicU64::new(0))?;
    if !json {
        let _ = writeln!(
            std::io::stderr(),
            "Unix-socket round-trip floor: {} round trips/s, p50 {} µs, p99 {} µs",
            report::fmt_ops(floor.ops_per_sec),
            report::fmt_us(floor.p50_us),
            report::fmt_us(floor.p99_us)
        );
    }
    let results = run_cases(&plan, &cases, limit, args.rounds, json)?;
    let command = args.report_command.clone().or_else(|| {
        let argv: Vec<String> = std::env::args().skip(1).collect();
        Some(format!("keyward {}", argv.join(" ")))
    });
    let total = match (limit, args.requests) {
        (Limit::Duration(_), _) => Limit::Duration(Duration::from_secs_f64(args.duration)),
        (_, Some(n)) => Limit::Requests(n),
        (l, None) => l,
    };
    let mut rep = Report::new(
        &plan,
        machine,
        total,
        &clients,
        results,
        Some(floor),
        command,
    );
    rep.rounds = args.rounds;

    if let Some(path) = &args.report {
        let written = match &args.append_section {
            Some(title) => std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(path)
                .and_then(|mut f| {
                    f.write_all(
                        report::section(&rep, title, args.section_note.as_deref().unwrap_or(""))
                            .as_bytes(),
                    )
                }),
            None => std::fs::write(path, report::markdown(&rep)),
        };
        written.map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    }
    let mut out = std::io::stdout().lock();
    let text = if json {
        serde_json::to_string_pretty(&rep).map_err(|e| Error::Internal(e.to_string()))? + "\n"
    } else {
        human(&rep, args.report.as_ref())
    };
    out.write_all(text.as_bytes())
        .map_err(|e| Error::io("writing to standard output", e))
}

fn audit_modes(args: &BenchArgs, home: &Home, json: bool, clients: &[usize]) -> Result<()> {
    let [key] = args.keys.as_slice() else {
        return Err(Error::BadRequest(
            "--audit-modes needs exactly one --key".into(),
        ));
    };
    if args.requests.is_some() || args.in_flight == 0 {
        return Err(Error::BadRequest(
            "--audit-modes runs for --duration with --in-flight ≥ 1".into(),
        ));
    }
    let passphrase = args.passphrase.as_deref().unwrap_or("prompt");
    passphrase.parse::<SecretSource>()?;
    let report = match (&args.report, &args.append_section) {
        (Some(p), Some(t)) => Some((
            p.as_path(),
            t.as_str(),
            args.section_note.as_deref().unwrap_or(""),
        )),
        (Some(_), None) => {
            return Err(Error::BadRequest(
                "--audit-modes writes a section: give --append-section with --report".into(),
            ))
        }
        _ => None,
    };
    super::bench_audit::run(&super::bench_audit::AuditBench {
        home,
        key,
        passphrase,
        clients: clients.iter().copied().max().unwrap_or(4),
        in_flight: args.in_flight,
        duration: Duration::from_secs_f64(args.duration),
        rounds: args.rounds,
        report,
        json,
    })
}

fn case_label(plan: &Plan, c: &bench::Case) -> String {
    let k = &plan.keys[c.key];
    format!("{} {} ×{}", k.key_type, c.target.label(), c.clients)
}

/// Run every case (`rounds` times, round-robin, folding each case's slices together);
/// progress on a terminal (indicatif), else one line per case on stderr (not with --json,
/// whose consumers read stdout only).
fn run_cases(
    plan: &Plan,
    cases: &[bench::Case],
    limit: Limit,
    rounds: u32,
    json: bool,
) -> Result<Vec<CaseResult>> {
    let steps = cases.len() as u64 * u64::from(rounds);
    let bar = super::is_tty().then(|| {
        let pb = indicatif::ProgressBar::new(steps);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{bar:20}] {pos}/{len} {wide_msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        pb.enable_steady_tick(Duration::from_millis(120));
        pb
    });
    let mut samples: Vec<bench::Samples> = vec![bench::Samples::default(); cases.len()];
    for round in 1..=rounds {
        for (i, case) in cases.iter().enumerate() {
            let label = case_label(plan, case);
            let progress = AtomicU64::new(0);
            let r = std::thread::scope(|s| {
                let h = s.spawn(|| plan.sample(case, limit, &progress));
                while !h.is_finished() {
                    if let Some(pb) = &bar {
                        pb.set_message(format!(
                            "{label}: {} req",
                            report::fmt_ops(progress.load(Ordering::Relaxed) as f64)
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                h.join()
                    .unwrap_or_else(|_| Err(Error::Internal("benchmark thread panicked".into())))
            });
            let r = match r {
                Ok(r) => r,
                Err(e) => {
                    if let Some(pb) = &bar {
                        pb.abandon();
                    }
                    if !json {
                        let _ = writeln!(std::io::stderr(), "benchmark case {label} failed");
                    }
                    return Err(e);
                }
            };
            samples[i].extend(r);
            if round < rounds {
                if let Some(pb) = &bar {
                    pb.inc(1);
                }
                continue;
            }
            let res = plan.result(case, &mut samples[i])?;
            let line = format!(
                "[{}/{}] {label}: {} ops/s, p50 {} µs, p99 {} µs",
                i + 1,
                cases.len(),
                report::fmt_ops(res.stats.ops_per_sec),
                report::fmt_us(res.stats.p50_us),
                report::fmt_us(res.stats.p99_us)
            );
            match &bar {
                Some(pb) => {
                    pb.println(line);
                    pb.inc(1);
                }
                None if !json => {
                    let _ = writeln!(std::io::stderr(), "{line}");
                }
                None => {}
            }
        }
    }
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    cases
        .iter()
        .zip(samples.iter_mut())
        .map(|(c, s)| plan.result(c, s))
        .collect()
}

fn human(r: &Report, report_path: Option<&PathBuf>) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    for k in &r.keys {
        let _ = writeln!(s, "{} — key {}, scheme {}", k.key_type, k.name, k.scheme);
        let _ = writeln!(
            s,
            "  {:<15} {:>7} {:>10} {:>10} {:>10}",
            "path", "clients", "ops/s", "p50 µs", "p99 µs"
        );
        for t in Target::ALL {
            for &c in &r.clients {
                if let Some(x) = r.find(&k.name, t, c) {
                    let _ = writeln!(
                        s,
                        "  {:<15} {:>7} {:>10} {:>10} {:>10}",
                        t.label(),
                        c,
                        report::fmt_ops(x.stats.ops_per_sec),
                        report::fmt_us(x.stats.p50_us),
                        report::fmt_us(x.stats.p99_us)
                    );
                }
            }
        }
        for c in r.comparisons.iter().filter(|c| c.key == k.name) {
            let mut parts = Vec::new();
            if let Some(v) = c.vs_raw {
                parts.push(format!(
                    "{:.1}% of {} ops/s",
                    v * 100.0,
                    c.raw_target.unwrap_or(Target::RawPkcs11).label()
                ));
            }
            if let Some(v) = c.vs_ssh_agent {
                parts.push(format!("{v:.2}× ssh-agent ops/s"));
            }
            if let (Some(a), Some(b)) = (c.overhead_p50_us, c.overhead_p99_us) {
                parts.push(format!(
                    "overhead p50 {} µs, p99 {} µs",
                    report::fmt_us(a),
                    report::fmt_us(b)
                ));
            }
            if !parts.is_empty() {
                let _ = writeln!(s, "  {} client(s): {}", c.clients, parts.join("; "));
            }
        }
        let _ = writeln!(s);
    }
    if let Some(f) = &r.socket_floor {
        let _ = writeln!(
            s,
            "Unix-socket round-trip floor (echo thread, 1 client): p50 {} µs, p99 {} µs\n",
            report::fmt_us(f.p50_us),
            report::fmt_us(f.p99_us)
        );
    }
    let _ = writeln!(s, "Targets:");
    for t in &r.targets {
        let _ = match t.met {
            Some(true) => writeln!(s, "  {}: {} — met", t.target, t.measured),
            Some(false) => writeln!(s, "  {}: {} — NOT met", t.target, t.measured),
            None => writeln!(s, "  {}: not measured", t.target),
        };
    }
    for n in &r.notes {
        let _ = writeln!(s, "note: {n}");
    }
    if let Some(p) = report_path {
        let _ = writeln!(s, "report written to {}", p.display());
    }
    s
}
