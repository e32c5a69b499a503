//! `audit query` and `audit tail`: read records back with filters on key, client, profile,
//! decision and time; the log files are only read, never written.

use std::path::Path;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::file::list;
use super::record::Record;
use crate::error::{Error, IoContext, Result};

/// What `audit query` selects; unset fields match everything.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub key: Option<String>,
    pub client: Option<String>,
    pub profile: Option<String>,
    pub decision: Option<String>,
    pub event: Option<String>,
    pub since: Option<OffsetDateTime>,
    pub until: Option<OffsetDateTime>,
}

impl Filter {
    pub fn matches(&self, r: &Record) -> bool {
        let eq = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|w| have == Some(w))
        };
        if !eq(&self.key, r.key.as_deref())
            || !eq(&self.client, r.client.as_ref().map(|c| c.name.as_str()))
            || !eq(&self.profile, r.profile.as_deref())
            || !eq(&self.decision, r.decision.as_deref())
            || !eq(&self.event, Some(r.event.as_str()))
        {
            return false;
        }
        if self.since.is_none() && self.until.is_none() {
            return true;
        }
        let Ok(ts) = OffsetDateTime::parse(&r.ts, &Rfc3339) else {
            return false;
        };
        self.since.is_none_or(|s| ts >= s) && self.until.is_none_or(|u| ts <= u)
    }
}

/// A time bound: RFC 3339 (`2026-11-23T10:00:00Z`) or an age (`90s`, `15m`, `2h`, `7d`).
pub fn parse_time(s: &str, now: OffsetDateTime) -> Result<OffsetDateTime> {
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t);
    }
    let d = parse_duration(s).ok_or_else(|| {
        Error::BadRequest(format!(
            "`{s}` is neither an RFC 3339 time nor an age like 15m, 2h, 7d"
        ))
    })?;
    Ok(now - d)
}

/// `90s`, `15m`, `2h`, `7d`.
pub fn parse_duration(s: &str) -> Option<time::Duration> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: i64 = num.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86400)?,
        _ => return None,
    };
    Some(time::Duration::seconds(secs))
}

/// Every record of the log matching `filter`, oldest first. Lines that do not parse are
/// skipped here (`audit verify` reports them).
pub fn query(dir: &Path, filter: &Filter) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for (_, p) in list(dir)? {
        let text = std::fs::read(&p).ctx(format!("reading {}", p.display()))?;
        out.extend(parse_lines(&text).into_iter().filter(|r| filter.matches(r)));
    }
    Ok(out)
}

/// The records of the lines in `bytes`; lines that do not parse are skipped (`audit verify`
/// reports them).
pub fn parse_lines(bytes: &[u8]) -> Vec<Record> {
    bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| Record::parse(l).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_times_parse() {
        let now = OffsetDateTime::UNIX_EPOCH + time::Duration::days(10);
        assert_eq!(
            parse_time("2h", now).unwrap(),
            now - time::Duration::hours(2)
        );
        assert_eq!(
            parse_time("1970-01-02T00:00:00Z", now).unwrap(),
            OffsetDateTime::UNIX_EPOCH + time::Duration::days(1)
        );
        assert!(parse_time("yesterday", now).is_err());
        assert!(parse_duration("5w").is_none());
    }
}
