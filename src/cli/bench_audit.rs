//! `keyward bench --audit-modes`: the same pipelined load against three agents on copies of
//! the home — audit off, fail-open, fail-closed (group commit) — round-robin in one run.

use std::fmt::Write as _;
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyward::bench::pipelined;
use keyward::bench::report::{fmt_ops, fmt_us};
use keyward::bench::stats::Stats;
use keyward::bench::Machine;
use keyward::client::Client;
use keyward::home::Home;
use keyward::model::KeyName;
use keyward::{Error, Result};

/// The three configurations compared.
const MODES: [(&str, &str); 3] = [
    ("off", "enabled = false"),
    ("fail-open", "enabled = true\nfail_closed = false"),
    ("fail-closed", "enabled = true\nfail_closed = true"),
];

pub struct AuditBench<'a> {
    pub home: &'a Home,
    pub key: &'a KeyName,
    pub passphrase: &'a str,
    pub clients: usize,
    pub in_flight: usize,
    pub duration: Duration,
    pub rounds: u32,
    pub report: Option<(&'a Path, &'a str, &'a str)>,
    pub json: bool,
}

/// One agent on a copy of the home.
struct ModeAgent {
    name: &'static str,
    /// Removed when the agent is stopped.
    dir: PathBuf,
    child: Child,
    sock: PathBuf,
    metrics: String,
    latencies: Vec<u64>,
    elapsed: Duration,
    scrapes: Vec<u64>,
}

impl Drop for ModeAgent {
    fn drop(&mut self) {
        let _ = keyward::sys::send_signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                self.remove_dir();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.remove_dir();
    }
}

impl ModeAgent {
    fn remove_dir(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn run(b: &AuditBench<'_>) -> Result<()> {
    let machine = Machine::detect();
    let mut agents = Vec::new();
    for (name, audit) in MODES {
        agents.push(start(b, name, audit)?);
    }
    let slice = b.duration / b.rounds.max(1);
    for round in 0..b.rounds.max(1) {
        for a in agents.iter_mut() {
            if !b.json {
                eprintln!(
                    "[round {}/{}] {} ×{} clients, {} in flight each",
                    round + 1,
                    b.rounds.max(1),
                    a.name,
                    b.clients,
                    b.in_flight
                );
            }
            let until = Instant::now() + slice;
            let addr = a.metrics.clone();
            let scraper = std::thread::spawn(move || {
                // Start once the load is up.
                std::thread::sleep(Duration::from_millis(300));
                pipelined::scrape(&addr, Duration::from_millis(100), until)
            });
            let (mut l, e) = pipelined::run(&a.sock, b.key, b.clients, b.in_flight, slice)?;
            a.latencies.append(&mut l);
            a.elapsed += e;
            let mut s = scraper
                .join()
                .map_err(|_| Error::Internal("the scraper panicked".into()))??;
            a.scrapes.append(&mut s);
        }
    }
    let mut rows = Vec::new();
    for a in agents.iter_mut() {
        let stats = Stats::from_latencies(&mut a.latencies, a.elapsed);
        let mut sc = a.scrapes.clone();
        sc.sort_unstable();
        let status = Client::connect(&a.sock)?.status()?;
        let text = status.metrics.unwrap_or_default();
        let commits = series(&text, "keyward_audit_commit_seconds_count");
        let records = series(&text, "keyward_audit_records_total");
        rows.push(Row {
            mode: a.name,
            stats,
            commits,
            records,
            scrape_p50_us: pct(&sc, 0.5),
            scrape_p99_us: pct(&sc, 0.99),
            scrape_max_us: sc.last().map_or(0.0, |&v| v as f64 / 1000.0),
            scrapes: sc.len(),
        });
    }
    let text = render(b, &machine, &rows);
    if let Some((path, title, note)) = b.report {
        let section = markdown(b, &machine, &rows, title, note);
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .and_then(|mut f| f.write_all(section.as_bytes()))
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    }
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    Ok(())
}

struct Row {
    mode: &'static str,
    stats: Stats,
    commits: f64,
    records: f64,
    scrape_p50_us: f64,
    scrape_p99_us: f64,
    scrape_max_us: f64,
    scrapes: usize,
}

fn pct(sorted: &[u64], q: f64) -> f64 {
    keyward::bench::stats::percentile(sorted, q).map_or(0.0, |v| v as f64 / 1000.0)
}

fn series(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// Copy the home (config, identity, keys; not its audit log, state or socket) and start an
/// agent on it with this mode's `[audit]` and a metrics listener.
fn start(b: &AuditBench<'_>, name: &'static str, audit: &str) -> Result<ModeAgent> {
    let dir =
        std::env::temp_dir().join(format!("keyward-audit-bench-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let home = dir.join("home");
    copy_tree(b.home.root(), &home)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| Error::io("finding a free port", e))?
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let cfg_path = home.join("keyward.toml");
    let text = std::fs::read_to_string(&cfg_path).unwrap_or_default();
    let mut cfg: toml::Table =
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", cfg_path.display())))?;
    let audit: toml::Table = toml::from_str(audit).map_err(|e| Error::Internal(e.to_string()))?;
    cfg.insert("audit".into(), toml::Value::Table(audit));
    let mut m = toml::Table::new();
    m.insert("listen".into(), toml::Value::String(metrics.clone()));
    cfg.insert("metrics".into(), toml::Value::Table(m));
    let text = toml::to_string(&cfg).map_err(|e| Error::Internal(e.to_string()))?;
    std::fs::write(&cfg_path, text)
        .map_err(|e| Error::io(format!("writing {}", cfg_path.display()), e))?;
    let sock = dir.join("agent.sock");
    let exe = std::env::current_exe().map_err(|e| Error::io("finding keyward", e))?;
    let child = Command::new(exe)
        .arg("--home")
        .arg(&home)
        .args([
            "agent",
            "--foreground",
            "--passphrase",
            b.passphrase,
            "--socket",
        ])
        .arg(&sock)
        .env_remove("KEYWARD_SOCK")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Error::io("starting an agent", e))?;
    let agent = ModeAgent {
        name,
        dir,
        child,
        sock,
        metrics,
        latencies: Vec::new(),
        elapsed: Duration::ZERO,
        scrapes: Vec::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if Client::connect(&agent.sock)
            .and_then(|mut c| c.status())
            .is_ok()
        {
            return Ok(agent);
        }
        if Instant::now() > deadline {
            return Err(Error::AgentUnreachable(format!(
                "the {name} agent on {} did not start",
                agent.dir.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(format!("creating {}", to.display()), e))?;
    let rd =
        std::fs::read_dir(from).map_err(|e| Error::io(format!("reading {}", from.display()), e))?;
    for entry in rd.flatten() {
        let name = entry.file_name();
        if matches!(name.to_str(), Some("audit" | "run" | "state")) {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        let ft = entry
            .file_type()
            .map_err(|e| Error::io(format!("reading {}", src.display()), e))?;
        if ft.is_dir() {
            copy_tree(&src, &dst)?;
        } else if ft.is_file() {
            std::fs::copy(&src, &dst)
                .map_err(|e| Error::io(format!("copying {}", src.display()), e))?;
        }
    }
    Ok(())
}

fn ratio(rows: &[Row], mode: &str) -> Option<f64> {
    let off = rows.iter().find(|r| r.mode == "off")?.stats.ops_per_sec;
    let x = rows.iter().find(|r| r.mode == mode)?.stats.ops_per_sec;
    (off > 0.0).then(|| x / off)
}

fn render(b: &AuditBench<'_>, m: &Machine, rows: &[Row]) -> String {
    let mut s = format!(
        "audit modes — key {}, {} clients × {} in flight, {:.1} s per mode in {} round(s), {} cores\n",
        b.key, b.clients, b.in_flight, b.duration.as_secs_f64(), b.rounds.max(1), m.cores
    );
    let _ = writeln!(
        s,
        "  {:<12} {:>10} {:>8} {:>9} {:>9} {:>12} {:>14}",
        "mode", "ops/s", "÷ off", "p50 µs", "p99 µs", "recs/commit", "scrape p99 µs"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "  {:<12} {:>10} {:>8} {:>9} {:>9} {:>12} {:>14}",
            r.mode,
            fmt_ops(r.stats.ops_per_sec),
            ratio(rows, r.mode).map_or("—".into(), |x| format!("{:.1}%", x * 100.0)),
            fmt_us(r.stats.p50_us),
            fmt_us(r.stats.p99_us),
            per_commit(r),
            fmt_us(r.scrape_p99_us)
        );
    }
    for line in verdicts(rows) {
        let _ = writeln!(s, "  {line}");
    }
    s
}

fn per_commit(r: &Row) -> String {
    if r.commits > 0.0 {
        format!("{:.1}", r.records / r.commits)
    } else {
        "—".into()
    }
}

fn verdicts(rows: &[Row]) -> Vec<String> {
    let closed = ratio(rows, "fail-closed").unwrap_or(0.0);
    let worst = rows.iter().map(|r| r.scrape_max_us).fold(0.0, f64::max);
    vec![
        format!(
            "fail-closed ≥ 80% of audit-off ops/s: {:.1}% — {}",
            closed * 100.0,
            if closed >= 0.8 { "met" } else { "NOT met" }
        ),
        format!(
            "/metrics scrape under load < 5 ms: slowest {} µs — {}",
            fmt_us(worst),
            if worst < 5000.0 { "met" } else { "NOT met" }
        ),
    ]
}

fn markdown(b: &AuditBench<'_>, m: &Machine, rows: &[Row], title: &str, note: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## {title}\n");
    if !note.is_empty() {
        let _ = writeln!(s, "{note}\n");
    }
    let _ = writeln!(
        s,
        "Run details: `scripts/bench.sh` at {}; key `{}`; {} clients × {} requests in flight; {:.1} s per mode in {} round(s); {} logical cores ({}), load {:.2} at the start.\n",
        keyward::keystore::now_rfc3339(),
        b.key,
        b.clients,
        b.in_flight,
        b.duration.as_secs_f64(),
        b.rounds.max(1),
        m.cores,
        m.cpu_model.as_deref().unwrap_or("CPU unknown"),
        m.load_1m.unwrap_or(0.0)
    );
    let _ = writeln!(s, "| target | this run | verdict |\n|---|---|---|");
    let closed = ratio(rows, "fail-closed").unwrap_or(0.0);
    let worst = rows.iter().map(|r| r.scrape_max_us).fold(0.0, f64::max);
    let _ = writeln!(
        s,
        "| fail-closed (group commit) ≥ 80% of audit-off ops/s, 4 clients × 16 in flight | {:.1}% | {} |",
        closed * 100.0,
        if closed >= 0.8 { "met" } else { "**not met**" }
    );
    let _ = writeln!(
        s,
        "| `/metrics` scrape under load < 5 ms (slowest of every scrape, all modes) | {} µs | {} |\n",
        fmt_us(worst),
        if worst < 5000.0 { "met" } else { "**not met**" }
    );
    let _ = writeln!(s, "| audit | requests | ops/s | ÷ audit off | p50 (µs) | p99 (µs) | records per fsync | scrapes | scrape p50 / p99 / max (µs) |\n|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} / {} / {} |",
            r.mode,
            r.stats.requests,
            fmt_ops(r.stats.ops_per_sec),
            ratio(rows, r.mode).map_or("—".into(), |x| format!("{:.1}%", x * 100.0)),
            fmt_us(r.stats.p50_us),
            fmt_us(r.stats.p99_us),
            per_commit(r),
            r.scrapes,
            fmt_us(r.scrape_p50_us),
            fmt_us(r.scrape_p99_us),
            fmt_us(r.scrape_max_us)
        );
    }
    s.push('\n');
    s
}
