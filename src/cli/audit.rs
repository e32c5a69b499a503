//! `keyward audit verify|query|tail`: check the hash chain, search records, follow the log.
//! Read-only: the agent (and CLI admin commands) are the only writers.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use keyward::audit::file::list;
use keyward::audit::query::{self, parse_lines, Filter};
use keyward::audit::verify::verify_dir;
use keyward::audit::Record;
use keyward::{Error, Result};

use super::Ctx;

#[derive(clap::Subcommand)]
pub enum AuditCmd {
    /// Verify the hash chain; names the first malformed, edited, missing, reordered or
    /// inserted record (seq, file, line) and exits 1.
    Verify {
        /// Start at this file of the log (its first record's link is trusted).
        #[arg(long, value_name = "FILE")]
        from: Option<PathBuf>,
    },
    /// Records matching every filter given, oldest first.
    Query(QueryArgs),
    /// The last records; `-f` keeps printing new ones.
    Tail {
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
        #[arg(short = 'f', long)]
        follow: bool,
    },
}

#[derive(clap::Args)]
pub struct QueryArgs {
    #[arg(long)]
    key: Option<String>,
    /// Client name as policy named it (`owner`, a `[clients.<name>]`, or `uid:<n>`).
    #[arg(long)]
    client: Option<String>,
    #[arg(long)]
    profile: Option<String>,
    /// allow, deny or error.
    #[arg(long, value_parser = ["allow", "deny", "error"])]
    decision: Option<String>,
    /// sign, sign_request, admin, agent_start, agent_stop, backend_up, backend_down, …
    #[arg(long)]
    event: Option<String>,
    /// RFC 3339 time or an age (15m, 2h, 7d).
    #[arg(long)]
    since: Option<String>,
    #[arg(long)]
    until: Option<String>,
}

/// Ok(false): verification found a problem (already printed).
pub fn run(ctx: &Ctx, cmd: AuditCmd) -> Result<bool> {
    let home = ctx.open_home()?;
    let dir = home.audit_dir();
    match cmd {
        AuditCmd::Verify { from } => {
            let from = from.map(|f| {
                if f.is_relative() && !f.exists() {
                    dir.join(f)
                } else {
                    f
                }
            });
            let report = verify_dir(&dir, from.as_deref())?;
            let v = serde_json::to_value(&report).map_err(|e| Error::Internal(e.to_string()))?;
            ctx.emit(&v, || match &report.problem {
                None => format!(
                    "audit log OK: {} record(s) in {} file(s), seq {}..{}",
                    report.records,
                    report.files.len(),
                    report.first_seq.unwrap_or(0),
                    report.last_seq.unwrap_or(0)
                ),
                Some(p) => format!(
                    "audit log BROKEN: {} at seq {} ({} line {}): {}\n  {} record(s) before it verified",
                    p.kind,
                    p.seq.map_or("?".into(), |s| s.to_string()),
                    p.file,
                    p.line,
                    p.detail,
                    report.records
                ),
            });
            Ok(report.ok())
        }
        AuditCmd::Query(q) => {
            let now = time::OffsetDateTime::now_utc();
            let filter = Filter {
                key: q.key,
                client: q.client,
                profile: q.profile,
                decision: q.decision,
                event: q.event,
                since: q.since.map(|s| query::parse_time(&s, now)).transpose()?,
                until: q.until.map(|s| query::parse_time(&s, now)).transpose()?,
            };
            let records = query::query(&dir, &filter)?;
            if ctx.json {
                let v =
                    serde_json::to_value(&records).map_err(|e| Error::Internal(e.to_string()))?;
                ctx.emit(&v, String::new);
            } else {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(
                    out,
                    "{:>7}  {:<24}  {:<12}  {:<16}  {:<16}  {:<8}  detail",
                    "seq", "time", "event", "client", "key", "decision"
                );
                for r in &records {
                    let _ = writeln!(out, "{}", row(r));
                }
            }
            Ok(true)
        }
        AuditCmd::Tail { lines, follow } => {
            // The last `lines` records: read files from the newest back only as far as needed.
            let mut newest: Vec<Record> = Vec::new();
            for (_, p) in list(&dir)?.iter().rev() {
                if newest.len() >= lines {
                    break;
                }
                let mut recs = parse_lines(&read_from(p, 0)?);
                recs.append(&mut newest);
                newest = recs;
            }
            let mut last = 0;
            for r in newest.iter().skip(newest.len().saturating_sub(lines)) {
                print_record(ctx, r);
                last = r.seq;
            }
            if !follow {
                return Ok(true);
            }
            // Follow from the end of the newest file: read only what is appended (a whole
            // line at a time), then move on when a newer file starts.
            let mut at = list(&dir)?.last().map(|(i, p)| {
                let len = std::fs::metadata(p).map_or(0, |m| m.len());
                (*i, len)
            });
            loop {
                std::thread::sleep(Duration::from_millis(200));
                for (i, p) in list(&dir)? {
                    let from = match at {
                        Some((cur, off)) if i == cur => off,
                        Some((cur, _)) if i < cur => continue,
                        _ => 0,
                    };
                    let new = read_from(&p, from)?;
                    let whole = new.iter().rposition(|&b| b == b'\n').map_or(0, |n| n + 1);
                    for r in parse_lines(&new[..whole]) {
                        if r.seq > last {
                            last = r.seq;
                            print_record(ctx, &r);
                        }
                    }
                    at = Some((i, from + whole as u64));
                }
            }
        }
    }
}

/// The bytes of `p` from offset `from` on.
fn read_from(p: &std::path::Path, from: u64) -> Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let io = |e| Error::io(format!("reading {}", p.display()), e);
    let mut f = std::fs::File::open(p).map_err(io)?;
    f.seek(SeekFrom::Start(from)).map_err(io)?;
    let mut out = Vec::new();
    f.read_to_end(&mut out).map_err(io)?;
    Ok(out)
}

fn print_record(ctx: &Ctx, r: &Record) {
    let mut out = std::io::stdout().lock();
    let _ = if ctx.json {
        writeln!(out, "{}", serde_json::to_string(r).unwrap_or_default())
    } else {
        writeln!(out, "{}", row(r))
    };
    let _ = out.flush();
}

fn row(r: &Record) -> String {
    let detail = [
        r.op.as_deref().filter(|o| *o != r.event),
        r.profile.as_deref(),
        r.method.as_deref(),
        r.path.as_deref(),
        r.code.as_deref(),
        r.reason.as_deref(),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(" ");
    format!(
        "{:>7}  {:<24}  {:<12}  {:<16}  {:<16}  {:<8}  {}",
        r.seq,
        r.ts.get(..24).unwrap_or(&r.ts),
        r.event,
        r.client.as_ref().map_or("-", |c| c.name.as_str()),
        r.key.as_deref().unwrap_or("-"),
        r.decision.as_deref().unwrap_or("-"),
        detail
    )
}
