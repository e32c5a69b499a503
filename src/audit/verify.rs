//! `audit verify`: walks every file of the log in order and names the first record that is
//! malformed, edited, missing, reordered or inserted, with its seq, file and line.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::file::{file_name, list};
use super::record::{Record, GENESIS};
use crate::error::{Error, IoContext, Result};

/// The first thing wrong with the log.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Problem {
    /// `malformed`, `edited`, `missing`, `reordered`, `inserted`, `broken_link`, `missing_file`.
    pub kind: String,
    /// The seq the problem is at (the missing seq for `missing`).
    pub seq: Option<u64>,
    pub file: String,
    /// 1-based line in `file`.
    pub line: usize,
    pub detail: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub files: Vec<String>,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub last_hash: Option<String>,
    pub problem: Option<Problem>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problem.is_none()
    }
}

struct Line {
    file: String,
    line: usize,
    parsed: std::result::Result<Record, String>,
}

/// Verify the log in `dir`, from its first file or from `from` (a file of the log: its first
/// record's `prev` is then trusted).
pub fn verify_dir(dir: &Path, from: Option<&Path>) -> Result<Report> {
    let mut files = list(dir)?;
    if let Some(f) = from {
        let name = f
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::BadRequest(format!("{} is not a log file", f.display())))?;
        let pos = files
            .iter()
            .position(|(i, _)| file_name(*i) == name)
            .ok_or_else(|| {
                Error::BadRequest(format!(
                    "{name} is not a file of the log in {}",
                    dir.display()
                ))
            })?;
        files.drain(..pos);
    }
    verify_files(
        &files.into_iter().map(|(_, p)| p).collect::<Vec<_>>(),
        from.is_none(),
    )
}

/// Verify `paths` as consecutive files of one log. `from_genesis`: the first record must be
/// seq 1 after the genesis hash.
pub fn verify_files(paths: &[PathBuf], from_genesis: bool) -> Result<Report> {
    let mut lines = Vec::new();
    let mut report = Report::default();
    for p in paths {
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("?")
            .to_string();
        let text = std::fs::read(p).ctx(format!("reading {}", p.display()))?;
        report.files.push(name.clone());
        let mut parts: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
        let torn = !text.is_empty() && !text.ends_with(b"\n");
        if !torn {
            parts.pop();
        }
        for (i, l) in parts.iter().enumerate() {
            let parsed = if torn && i + 1 == parts.len() {
                Err("the last line is incomplete (torn write)".to_string())
            } else {
                Record::parse(l)
            };
            lines.push(Line {
                file: name.clone(),
                line: i + 1,
                parsed,
            });
        }
    }
    let all_seqs: HashSet<u64> = lines
        .iter()
        .filter_map(|l| l.parsed.as_ref().ok().map(|r| r.seq))
        .collect();
    let mut seen_seq = HashSet::new();
    // hash → index in `lines` of the record that has it.
    let mut by_hash: HashMap<String, usize> = HashMap::new();
    let mut expected: Option<u64> = from_genesis.then_some(1);
    let mut last_hash: Option<String> = from_genesis.then(|| GENESIS.to_string());
    let mut last_file: Option<String> = None;
    for (idx, l) in lines.iter().enumerate() {
        let problem = |kind: &str, seq: Option<u64>, detail: String| Problem {
            kind: kind.into(),
            seq,
            file: l.file.clone(),
            line: l.line,
            detail,
        };
        let r = match &l.parsed {
            Ok(r) => r,
            Err(e) => {
                report.problem = Some(problem(
                    "malformed",
                    expected,
                    format!("not a valid audit record: {e}"),
                ));
                break;
            }
        };
        if !r.hash_ok() {
            report.problem = Some(problem(
                "edited",
                Some(r.seq),
                "the record's content does not match its hash".into(),
            ));
            break;
        }
        let want = expected.unwrap_or(r.seq);
        let linked = last_hash.as_deref().is_none_or(|h| r.prev == h);
        if r.seq == want && linked {
            // In place.
        } else {
            let hash_at = |j: usize| lines[j].parsed.as_ref().ok().map(|x| x.hash.as_str());
            let p = match by_hash.get(&r.prev) {
                // It links to an earlier record: what lies between is not in the chain — unless
                // this record is itself a copy of the one after that link (a replay).
                Some(&j) if j + 1 < idx && !linked && hash_at(j + 1) != Some(r.hash.as_str()) => {
                    let ins = &lines[j + 1];
                    Problem {
                        kind: "inserted".into(),
                        seq: ins.parsed.as_ref().ok().map(|x| x.seq),
                        file: ins.file.clone(),
                        line: ins.line,
                        detail: format!(
                            "not part of the chain: seq {} (line {}) links to the record before it",
                            r.seq, l.line
                        ),
                    }
                }
                _ if r.seq > want && !all_seqs.contains(&want) => problem(
                    "missing",
                    Some(want),
                    format!("seq {want}..{} is missing before seq {}", r.seq - 1, r.seq),
                ),
                _ if seen_seq.contains(&r.seq) => problem(
                    "inserted",
                    Some(r.seq),
                    format!("seq {} appears a second time", r.seq),
                ),
                _ if r.seq != want => problem(
                    "reordered",
                    Some(r.seq),
                    format!("seq {} is where seq {want} should be", r.seq),
                ),
                _ => problem(
                    "broken_link",
                    Some(r.seq),
                    format!(
                        "prev does not match the hash of seq {}: that record was edited and re-hashed",
                        r.seq.saturating_sub(1)
                    ),
                ),
            };
            report.problem = Some(p);
            break;
        }
        if last_file.as_deref() != Some(&l.file) && last_file.is_some() {
            // The first record of every later file names the file it continues.
            if r.event != "file_start" || r.prev_file.as_deref() != last_file.as_deref() {
                report.problem = Some(problem(
                    "missing_file",
                    Some(r.seq),
                    format!(
                        "the file does not start by linking to {}",
                        last_file.as_deref().unwrap_or("?")
                    ),
                ));
                break;
            }
        }
        last_file = Some(l.file.clone());
        seen_seq.insert(r.seq);
        by_hash.insert(r.hash.clone(), idx);
        report.records += 1;
        report.first_seq.get_or_insert(r.seq);
        report.last_seq = Some(r.seq);
        expected = Some(r.seq + 1);
        last_hash = Some(r.hash.clone());
    }
    report.last_hash = last_hash.filter(|_| report.records > 0);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::file::append_once;

    /// A real log of `n` records (one append each, as CLI commands write) in a temp dir.
    fn log_of(n: u64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let audit = dir.path().join("audit");
        for i in 0..n {
            let mut r = Record::new("admin");
            r.ts = "2026-11-23T00:00:00Z".into();
            r.key = Some(format!("k{i}"));
            append_once(&audit, 1 << 20, &mut [r]).unwrap();
        }
        let file = audit.join(file_name(1));
        (dir, file)
    }

    fn lines(p: &Path) -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn write(p: &Path, l: &[String]) {
        std::fs::write(p, l.join("\n") + "\n").unwrap();
    }

    fn problem(p: &Path) -> Problem {
        let dir = p.parent().unwrap();
        verify_dir(dir, None).unwrap().problem.expect("a problem")
    }

    #[test]
    fn an_untouched_log_verifies() {
        let (_d, f) = log_of(8);
        let r = verify_dir(f.parent().unwrap(), None).unwrap();
        assert!(r.ok(), "{:?}", r.problem);
        assert_eq!((r.records, r.first_seq, r.last_seq), (8, Some(1), Some(8)));
    }

    #[test]
    fn edits_deletions_reorders_and_insertions_are_named_at_their_seq() {
        let (_d, f) = log_of(8);
        let orig = lines(&f);

        let mut edited = orig.clone();
        edited[4] = edited[4].replace("\"k4\"", "\"k9\"");
        write(&f, &edited);
        let p = problem(&f);
        assert_eq!((p.kind.as_str(), p.seq, p.line), ("edited", Some(5), 5));

        let mut deleted = orig.clone();
        deleted.remove(4);
        write(&f, &deleted);
        let p = problem(&f);
        assert_eq!((p.kind.as_str(), p.seq, p.line), ("missing", Some(5), 5));

        let mut swapped = orig.clone();
        swapped.swap(4, 5);
        write(&f, &swapped);
        let p = problem(&f);
        assert_eq!((p.kind.as_str(), p.seq, p.line), ("reordered", Some(6), 5));

        // A forged record with a valid hash after seq 5, claiming seq 6.
        let five = Record::parse(orig[4].as_bytes()).unwrap();
        let mut forged = Record::new("admin");
        forged.ts = "2026-11-23T00:00:00Z".into();
        forged.key = Some("forged".into());
        let line = forged.seal(6, &five.hash).unwrap();
        let mut inserted = orig.clone();
        inserted.insert(5, String::from_utf8(line).unwrap().trim_end().to_string());
        write(&f, &inserted);
        let p = problem(&f);
        assert_eq!((p.kind.as_str(), p.seq, p.line), ("inserted", Some(6), 6));

        // A replayed copy of seq 3.
        let mut replayed = orig.clone();
        replayed.insert(6, orig[2].clone());
        write(&f, &replayed);
        let p = problem(&f);
        assert_eq!((p.kind.as_str(), p.seq, p.line), ("inserted", Some(3), 7));

        // Edited and re-hashed (no key needed for a plain chain): the next link breaks.
        let mut rehashed = orig.clone();
        let mut r4 = Record::parse(orig[3].as_bytes()).unwrap();
        let prev = r4.prev.clone();
        r4.key = Some("changed".into());
        let line = r4.seal(4, &prev).unwrap();
        rehashed[3] = String::from_utf8(line).unwrap().trim_end().to_string();
        write(&f, &rehashed);
        let p = problem(&f);
        assert_eq!(
            (p.kind.as_str(), p.seq, p.line),
            ("broken_link", Some(5), 5)
        );

        write(&f, &orig);
        assert!(verify_dir(f.parent().unwrap(), None).unwrap().ok());
    }

    #[test]
    fn a_torn_tail_is_cut_kept_and_recorded_on_the_next_open() {
        let (_d, f) = log_of(3);
        let dir = f.parent().unwrap().to_path_buf();
        let mut bytes = std::fs::read(&f).unwrap();
        bytes.extend_from_slice(b"{\"seq\":4,\"ts\":\"2026-11-");
        std::fs::write(&f, &bytes).unwrap();
        assert_eq!(problem(&f).kind, "malformed");
        let mut r = Record::new("admin");
        r.ts = "2026-11-23T00:00:00Z".into();
        append_once(&dir, 1 << 20, &mut [r]).unwrap();
        let report = verify_dir(&dir, None).unwrap();
        assert!(report.ok(), "{:?}", report.problem);
        assert_eq!(report.last_seq, Some(5));
        let all = lines(&f);
        let repair = Record::parse(all[3].as_bytes()).unwrap();
        assert_eq!(repair.event, "repair");
        assert!(repair.reason.unwrap().contains("23 bytes"));
        let kept: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("torn-"))
            .collect();
        assert_eq!(kept.len(), 1);
        assert!(std::fs::read(kept[0].path())
            .unwrap()
            .starts_with(b"{\"seq\":4"));
    }

    #[test]
    fn rotation_links_files_and_a_missing_file_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let audit = dir.path().join("audit");
        for i in 0..40 {
            let mut r = Record::new("admin");
            r.ts = "2026-11-23T00:00:00Z".into();
            r.key = Some(format!("k{i}"));
            append_once(&audit, 4096, &mut [r]).unwrap();
        }
        let files = list(&audit).unwrap();
        assert!(files.len() >= 3, "{files:?}");
        let report = verify_dir(&audit, None).unwrap();
        assert!(report.ok(), "{:?}", report.problem);
        let second = Record::parse(lines(&files[1].1)[0].as_bytes()).unwrap();
        assert_eq!(second.event, "file_start");
        assert_eq!(second.prev_file.as_deref(), Some("audit-1.jsonl"));
        // Verifying from a later file trusts its first link.
        assert!(verify_dir(&audit, Some(&files[1].1)).unwrap().ok());
        std::fs::remove_file(&files[1].1).unwrap();
        let p = verify_dir(&audit, None).unwrap().problem.unwrap();
        assert_eq!(p.kind, "missing");
        assert_eq!(p.file, file_name(files[2].0));
    }
}
