//! `keyward bench`: measure signing through the running agent, in-process and through an
//! ssh-agent with the same loop; prints tables (or JSON) and can write docs/benchmarks.md.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keyward::bench::{self, report, CaseResult, Limit, Machine, Plan, PlanOptions, Report, Target};
use keyward::config::Config;
use keyward::home::Home;
use keyward::model::KeyName;
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

const MAX_CLIENTS: usize = 256;
const MAX_DURATION_S: f64 = 3600.0;

impl BenchArgs {
    fn limit(&self) -> Result<Limit> {
        match self.requests {
            Some(0) => Err(Error::BadRequest("--requests must be at least 1".into())),
            Some(n) => Ok(Limit::Requests(n)),
            None if self.duration.is_finite()
                && self.duration > 0.0
                && self.duration <= MAX_DURATION_S =>
            {
                Ok(Limit::Duration(Duration::from_secs_f64(self.duration)))
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
    let limit = args.limit()?;
    let clients = args.client_counts()?;
    // Read the machine (load average) before the benchmark itself loads it.
    let machine = Machine::detect();
    let configured = Config::load(&home.config_path())
        .ok()
        .and_then(|c| c.agent.socket);
    let socket = keyward::proto::socket_path(configured.as_deref(), home.root());
    let plan = bench::plan(&PlanOptions {
        socket: &socket,
        keys: &args.keys,
        in_process: &args.in_process,
        ssh_agent: args.ssh_agent.as_deref(),
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
    let results = run_cases(&plan, &cases, limit, json)?;
    let command = args.report_command.clone().or_else(|| {
        let argv: Vec<String> = std::env::args().skip(1).collect();
        Some(format!("keyward {}", argv.join(" ")))
    });
    let rep = Report::new(
        &plan,
        machine,
        limit,
        &clients,
        results,
        Some(floor),
        command,
    );

    if let Some(path) = &args.report {
        let written = match &args.append_section {
            Some(title) => std::fs::OpenOptions::new()
                .append(true)
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

fn case_label(plan: &Plan, c: &bench::Case) -> String {
    let k = &plan.keys[c.key];
    format!("{} {} ×{}", k.key_type, c.target.label(), c.clients)
}

/// Run every case; progress on a terminal (indicatif), else one line per case on stderr
/// (not with --json, whose consumers read stdout only).
fn run_cases(
    plan: &Plan,
    cases: &[bench::Case],
    limit: Limit,
    json: bool,
) -> Result<Vec<CaseResult>> {
    let bar = super::is_tty().then(|| {
        let pb = indicatif::ProgressBar::new(cases.len() as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{bar:20}] {pos}/{len} {wide_msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        pb.enable_steady_tick(Duration::from_millis(120));
        pb
    });
    let mut results = Vec::with_capacity(cases.len());
    for (i, case) in cases.iter().enumerate() {
        let label = case_label(plan, case);
        let progress = AtomicU64::new(0);
        let r = std::thread::scope(|s| {
            let h = s.spawn(|| plan.run(case, limit, &progress));
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
        let line = format!(
            "[{}/{}] {label}: {} ops/s, p50 {} µs, p99 {} µs",
            i + 1,
            cases.len(),
            report::fmt_ops(r.stats.ops_per_sec),
            report::fmt_us(r.stats.p50_us),
            report::fmt_us(r.stats.p99_us)
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
        results.push(r);
    }
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    Ok(results)
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
