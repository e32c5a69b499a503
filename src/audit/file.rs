//! The log on disk: `audit-<n>.jsonl` files in `<home>/audit/`, appended under an exclusive
//! lock so the agent and CLI admin commands can both write one chain; repairs a torn tail.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::record::{sha256_hex, Record, GENESIS};
use crate::error::{Error, IoContext, Result};

/// How much of a file's end is read to find its last record.
const TAIL_BYTES: u64 = 256 * 1024;

/// `audit-<n>.jsonl`.
pub fn file_name(index: u32) -> String {
    format!("audit-{index}.jsonl")
}

/// The log's files, oldest first, as (index, path).
pub fn list(dir: &Path) -> Result<Vec<(u32, PathBuf)>> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).ctx(format!("reading {}", dir.display())),
    };
    for entry in rd {
        let entry = entry.ctx(format!("reading {}", dir.display()))?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|s| s.strip_prefix("audit-"))
            .and_then(|s| s.strip_suffix(".jsonl"))
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        out.push((n, entry.path()));
    }
    out.sort();
    Ok(out)
}

/// Holds the log's exclusive lock (`audit/.lock`) while alive.
pub struct Lock(File);

impl Lock {
    pub fn take(dir: &Path) -> Result<Lock> {
        let path = dir.join(".lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(unavailable(&path))?;
        f.lock().map_err(unavailable(&path))?;
        Ok(Lock(f))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

fn unavailable(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::AuditUnavailable(format!("{}: {e}", path.display()))
}

/// The newest file, open for appending, and where the chain stands.
pub struct LogFile {
    dir: PathBuf,
    index: u32,
    file: File,
    /// Bytes of the file that hold complete, written records.
    len: u64,
    seq: u64,
    hash: String,
    max_bytes: u64,
    /// Set when the current file is new and its first record must link to `prev_file`.
    pending_start: Option<String>,
    /// Records to write before the next batch (repairs found on open).
    pending: Vec<Record>,
    /// Records were written since the last fsync (fail-open batches wait for the next one).
    unsynced: bool,
}

impl LogFile {
    /// Open (or create) the log in `dir`; a torn last line is cut off, kept aside and recorded.
    /// Call with the lock held.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<LogFile> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(unavailable(dir))?;
        let files = list(dir)?;
        let (index, path) = files
            .last()
            .cloned()
            .unwrap_or_else(|| (1, dir.join(file_name(1))));
        let file = open_append(&path)?;
        let mut log = LogFile {
            dir: dir.to_path_buf(),
            index,
            file,
            len: 0,
            seq: 0,
            hash: GENESIS.to_string(),
            max_bytes,
            pending_start: None,
            pending: Vec::new(),
            unsynced: false,
        };
        log.read_tail()?;
        Ok(log)
    }

    /// The last written record's seq and hash.
    pub fn head(&self) -> (u64, &str) {
        (self.seq, &self.hash)
    }

    pub fn current_file(&self) -> PathBuf {
        self.dir.join(file_name(self.index))
    }

    /// Re-read where the chain stands from the file (another process may have appended).
    fn read_tail(&mut self) -> Result<()> {
        let path = self.current_file();
        let size = self.file.metadata().map_err(unavailable(&path))?.len();
        if size == 0 {
            self.len = 0;
            if self.index > 1 {
                // A new file: its first record links to the previous file's last one.
                let prev = self.dir.join(file_name(self.index - 1));
                let (seq, hash) = last_record_of(&prev)?;
                self.seq = seq;
                self.hash = hash;
                self.pending_start = Some(file_name(self.index - 1));
            }
            return Ok(());
        }
        let from = size.saturating_sub(TAIL_BYTES);
        let mut tail = Vec::new();
        let mut f = File::open(&path).map_err(unavailable(&path))?;
        f.seek(SeekFrom::Start(from)).map_err(unavailable(&path))?;
        f.read_to_end(&mut tail).map_err(unavailable(&path))?;
        let complete = match tail.iter().rposition(|&b| b == b'\n') {
            Some(i) => i + 1,
            None if from == 0 => 0,
            None => {
                return Err(Error::AuditUnavailable(format!(
                    "{}: no line end in the last {TAIL_BYTES} bytes",
                    path.display()
                )))
            }
        };
        if complete < tail.len() {
            self.cut_torn(&path, from + complete as u64, &tail[complete..])?;
        }
        self.len = from + complete as u64;
        let lines: Vec<&[u8]> = tail[..complete]
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        // The newest record that parses; anything after it stays in the file for `verify`.
        let mut found = None;
        for (i, line) in lines.iter().enumerate().rev() {
            if let Ok(r) = Record::parse(line) {
                found = Some((i, r));
                break;
            }
        }
        match found {
            Some((i, r)) => {
                if i + 1 < lines.len() || !r.hash_ok() {
                    let mut rep = Record::new("repair");
                    rep.reason = Some(format!(
                        "the end of {} does not verify ({} line(s) after seq {} do not parse, hash {}); \
                         the chain continues from seq {}; run `keyward audit verify`",
                        file_name(self.index),
                        lines.len() - i - 1,
                        r.seq,
                        if r.hash_ok() { "ok" } else { "broken" },
                        r.seq
                    ));
                    self.pending.push(rep);
                }
                self.seq = r.seq;
                self.hash = r.hash;
            }
            None if from == 0 && lines.is_empty() => {}
            None => {
                return Err(Error::AuditUnavailable(format!(
                    "{}: no readable record at its end; run `keyward audit verify`",
                    path.display()
                )))
            }
        }
        Ok(())
    }

    /// A crash mid-write left a partial last line: keep its bytes in a side file, cut the log
    /// back to its last complete record, and record the repair (never drop data silently).
    fn cut_torn(&mut self, path: &Path, at: u64, torn: &[u8]) -> Result<()> {
        let side = self.dir.join(format!("torn-{}-{at}.bin", self.index));
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&side)
            .map_err(unavailable(&side))?;
        f.write_all(torn).map_err(unavailable(&side))?;
        f.sync_all().map_err(unavailable(&side))?;
        self.file.set_len(at).map_err(unavailable(path))?;
        self.file.sync_all().map_err(unavailable(path))?;
        let mut rep = Record::new("repair");
        rep.reason = Some(format!(
            "torn last line of {} removed ({} bytes, sha256 {}), kept in {}",
            file_name(self.index),
            torn.len(),
            sha256_hex(torn),
            side.file_name().and_then(|n| n.to_str()).unwrap_or("?")
        ));
        self.pending.push(rep);
        Ok(())
    }

    /// Append `records` (sealed here, in order) with one write, and one fsync when `sync`.
    /// On failure the file is cut back to where it was, so no half record stays, and the
    /// chain does not move. Takes the lock itself.
    pub fn append(&mut self, records: &mut [Record], sync: bool) -> Result<()> {
        let _lock = Lock::take(&self.dir)?;
        let path = self.current_file();
        let size = self.file.metadata().map_err(unavailable(&path))?.len();
        if size != self.len {
            self.read_tail()?;
        }
        if self.len >= self.max_bytes {
            self.rotate()?;
        }
        let mut buf = Vec::with_capacity(records.len() * 320);
        let (mut seq, mut hash) = (self.seq, self.hash.clone());
        let mut head = Vec::new();
        if let Some(prev_file) = &self.pending_start {
            let mut r = Record::new("file_start");
            r.prev_file = Some(prev_file.clone());
            head.push(r);
        }
        head.extend(self.pending.iter().cloned());
        for r in head.iter_mut().chain(records.iter_mut()) {
            seq += 1;
            buf.extend_from_slice(&r.seal(seq, &hash)?);
            hash.clone_from(&r.hash);
        }
        let path = self.current_file();
        let written =
            self.file.write_all(&buf).and_then(
                |()| {
                    if sync {
                        self.file.sync_data()
                    } else {
                        Ok(())
                    }
                },
            );
        if let Err(e) = written {
            // Whatever part reached the file goes: a record is in the log whole or not at all.
            let _ = self.file.set_len(self.len);
            let _ = self.file.sync_data();
            return Err(Error::AuditUnavailable(format!(
                "writing {}: {e}",
                path.display()
            )));
        }
        self.len += buf.len() as u64;
        self.seq = seq;
        self.hash = hash;
        self.pending_start = None;
        self.pending.clear();
        self.unsynced = !sync;
        Ok(())
    }

    /// Whether records were written without an fsync since the last one.
    pub fn unsynced(&self) -> bool {
        self.unsynced
    }

    /// Make every written record durable.
    pub fn sync(&mut self) -> Result<()> {
        if self.unsynced {
            let path = self.current_file();
            self.file.sync_data().map_err(unavailable(&path))?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// Start the next file; its first record (written with the next batch) links back.
    fn rotate(&mut self) -> Result<()> {
        self.sync()?;
        let next = self.index + 1;
        let path = self.dir.join(file_name(next));
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(unavailable(&path))?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        self.pending_start = Some(file_name(self.index));
        self.index = next;
        self.file = file;
        self.len = 0;
        Ok(())
    }
}

fn open_append(path: &Path) -> Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o600)
        .open(path)
        .map_err(unavailable(path))?;
    Ok(f)
}

/// Seq and hash of the last record of a closed file.
fn last_record_of(path: &Path) -> Result<(u64, String)> {
    let text = fs::read(path).map_err(unavailable(path))?;
    let last = text
        .split(|&b| b == b'\n')
        .rev()
        .find(|l| !l.is_empty())
        .and_then(|l| Record::parse(l).ok())
        .ok_or_else(|| {
            Error::AuditUnavailable(format!(
                "{}: no readable last record to continue from",
                path.display()
            ))
        })?;
    Ok((last.seq, last.hash))
}

/// Append records from a short-lived process (CLI admin actions): open, write, fsync, close.
pub fn append_once(dir: &Path, max_bytes: u64, records: &mut [Record]) -> Result<()> {
    let mut log = {
        let _lock = Lock::take_creating(dir)?;
        LogFile::open(dir, max_bytes)?
    };
    log.append(records, true)
}

impl Lock {
    /// `take`, creating the directory first (a home whose log was never written).
    pub fn take_creating(dir: &Path) -> Result<Lock> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(unavailable(dir))?;
        Lock::take(dir)
    }
}
