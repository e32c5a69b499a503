//! `keyward key import --from-pem | --from-env-file | --from-fernet`: moving keys out of the
//! plaintext files trading teams keep them in today, shredding those, and naming leftover copies.

use std::collections::HashSet;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use keyward::secret::{read_secret, SecretBytes, SecretSource};
use keyward::{Error, Result};
use serde_json::{json, Value};
use zeroize::Zeroizing;

/// Largest .env file read. Dotenv files hold many small values; this only bounds memory.
const MAX_ENV_FILE: usize = 1 << 20;
/// Largest Fernet token file read (a token is ~1.4 times its plaintext, and keys are small).
const MAX_FERNET_FILE: usize = 1 << 20;
/// Files larger than this are not read when looking for other copies of the secret.
const MAX_SCANNED_FILE: u64 = 1 << 20;
/// Bounds on the copy scan, so a huge directory cannot stall an import.
const MAX_SCANNED_ENTRIES: usize = 10_000;
const MAX_SCANNED_BYTES: u64 = 64 << 20;
/// Shorter secrets match too much unrelated text to be worth reporting.
const MIN_NEEDLE: usize = 8;
/// The `fernet` crate refuses tokens dated further ahead than this (Python only with a ttl);
/// checked first so the error blames the clock, not the key.
const FERNET_MAX_CLOCK_SKEW: u64 = 60;

/// The new sources of `key import` (flattened into its arguments).
#[derive(clap::Args)]
pub struct SourceArgs {
    /// PEM key file to import (the same as --file).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["file", "from_env_file", "from_fernet"])]
    from_pem: Option<PathBuf>,
    /// Dotenv file to take one variable from (with --var), parsed as python-dotenv parses it.
    /// With --shred only that variable's line(s) are removed; the other variables stay.
    #[arg(
        long,
        value_name = "PATH",
        requires = "var",
        conflicts_with_all = ["file", "from_fernet"]
    )]
    from_env_file: Option<PathBuf>,
    /// The variable of --from-env-file that holds the key.
    #[arg(long, value_name = "NAME", requires = "from_env_file")]
    var: Option<String>,
    /// File holding a Fernet token (as Python's `cryptography.fernet` writes it) whose
    /// plaintext is the key.
    #[arg(
        long,
        value_name = "FILE",
        requires = "fernet_key",
        conflicts_with = "file"
    )]
    from_fernet: Option<PathBuf>,
    /// Where the Fernet key comes from: env:NAME or file:PATH (mode 0600).
    #[arg(long, value_name = "SOURCE", requires = "from_fernet")]
    fernet_key: Option<String>,
}

/// Where `key import` reads the key from.
pub enum Source {
    Stdin,
    /// `--file` or `--from-pem`: the file's content is the key material.
    KeyFile(PathBuf),
    EnvFile {
        path: PathBuf,
        var: String,
    },
    Fernet {
        path: PathBuf,
        key: SecretSource,
        /// The key source as given, for messages.
        key_arg: String,
    },
}

/// The shredding primitives of `key import`, passed in so every source uses the same ones.
pub struct Shredder {
    /// Refuse what cannot be shredded (not a plain file, several links); returns the size.
    pub check: fn(&Path) -> Result<u64>,
    /// Overwrite and remove a whole file.
    pub shred: fn(&Path) -> Result<()>,
}

impl Source {
    /// The one source the arguments name (clap already refused conflicting ones).
    pub fn select(file: Option<PathBuf>, a: SourceArgs) -> Result<Source> {
        if let Some(path) = a.from_env_file {
            let var = a.var.unwrap_or_default();
            if var.is_empty() || var.chars().any(|c| c == '=' || py_space(c)) {
                return Err(Error::BadRequest(format!(
                    "--var {var:?} is not a variable name"
                )));
            }
            return Ok(Source::EnvFile { path, var });
        }
        if let Some(path) = a.from_fernet {
            let key_arg = a.fernet_key.unwrap_or_default();
            let key: SecretSource = key_arg.parse()?;
            if !matches!(key, SecretSource::Env(_) | SecretSource::File(_)) {
                return Err(Error::BadRequest(
                    "--fernet-key must be env:NAME or file:PATH".into(),
                ));
            }
            return Ok(Source::Fernet { path, key, key_arg });
        }
        match file.or(a.from_pem) {
            Some(p) if p != Path::new("-") => Ok(Source::KeyFile(p)),
            _ => Ok(Source::Stdin),
        }
    }

    /// The file the key comes from (what --shred removes or rewrites).
    pub fn path(&self) -> Option<&Path> {
        match self {
            Source::Stdin => None,
            Source::KeyFile(p)
            | Source::EnvFile { path: p, .. }
            | Source::Fernet { path: p, .. } => Some(p),
        }
    }

    /// Refuse `--shred` up front when it could not be done after the import.
    pub fn check_shreddable(&self, s: &Shredder) -> Result<()> {
        let path = self.path().ok_or_else(|| {
            Error::BadRequest(
                "--shred needs --file, --from-pem, --from-env-file or --from-fernet (standard input cannot be shredded)".into(),
            )
        })?;
        (s.check)(path)?;
        // Shredding writes to the file: find out now, not after the key is imported.
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map(drop)
            .map_err(|e| {
                Error::io(
                    format!(
                        "{} cannot be opened for writing, so --shred could not erase it; nothing imported",
                        path.display()
                    ),
                    e,
                )
            })
    }

    /// Read the key material (PEM text, HMAC secret, ...) the source holds.
    pub fn read(&self, key_file_limit: usize) -> Result<SecretBytes> {
        match self {
            Source::Stdin => read_secret(std::io::stdin().lock(), key_file_limit),
            Source::KeyFile(p) => read_secret(open(p)?, key_file_limit),
            Source::EnvFile { path, var } => {
                let text = read_secret(open(path)?, MAX_ENV_FILE)?;
                env_value(path, as_text(path, &text)?, var)
            }
            Source::Fernet { path, key, key_arg } => {
                let fkey = key.read("Fernet key")?;
                let token = read_secret(open(path)?, MAX_FERNET_FILE)?;
                fernet_decrypt(path, &token, &fkey, key_arg)
            }
        }
    }

    /// After a verified import: remove the key from its source. Returns what was done, for
    /// the report. `imported` is what [`read`](Self::read) returned.
    pub fn shred(&self, s: &Shredder, imported: &SecretBytes) -> Result<String> {
        match self {
            Source::Stdin => Err(Error::Internal("standard input cannot be shredded".into())),
            Source::KeyFile(p) | Source::Fernet { path: p, .. } => {
                (s.shred)(p)?;
                Ok(format!("{} shredded", p.display()))
            }
            Source::EnvFile { path, var } => {
                remove_env_var(path, var, imported, s)?;
                Ok(format!(
                    "{var} removed from {} (its old copy overwritten)",
                    path.display()
                ))
            }
        }
    }
}

fn open(p: &Path) -> Result<fs::File> {
    fs::File::open(p).map_err(|e| Error::io(format!("opening {}", p.display()), e))
}

fn as_text<'a>(path: &Path, b: &'a SecretBytes) -> Result<&'a str> {
    std::str::from_utf8(b.expose())
        .map_err(|_| Error::InvalidKeyMaterial(format!("{} is not UTF-8 text", path.display())))
}

// ---------------------------------------------------------------------------------------------
// Fernet

fn fernet_decrypt(
    path: &Path,
    token_file: &SecretBytes,
    key: &SecretBytes,
    key_arg: &str,
) -> Result<SecretBytes> {
    use base64::Engine;
    let not_token = |why: &str| {
        Error::InvalidKeyMaterial(format!("{} is not a Fernet token: {why}", path.display()))
    };
    let token = as_text(path, token_file)?.trim();
    // Check the framing ourselves: the crate reports every failure alike, and a wrong key
    // must be told apart from a file that never was a token.
    let raw = Zeroizing::new(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.trim_end_matches('='))
            .map_err(|_| not_token("not url-safe base64"))?,
    );
    // version (1) + timestamp (8) + IV (16) + at least one AES block (16) + HMAC (32)
    if raw.len() < 73 || (raw.len() - 57) % 16 != 0 {
        return Err(not_token("wrong length (truncated?)"));
    }
    if raw[0] != 0x80 {
        return Err(not_token("unknown version byte"));
    }
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&raw[1..9]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if u64::from_be_bytes(ts) > now.saturating_add(FERNET_MAX_CLOCK_SKEW) {
        return Err(Error::InvalidKeyMaterial(format!(
            "the Fernet token in {} is dated in the future; check this machine's clock",
            path.display()
        )));
    }
    let key_text = std::str::from_utf8(key.expose()).unwrap_or("").trim();
    let fernet = fernet::Fernet::new(key_text).ok_or_else(|| {
        Error::BadPassphrase(format!(
            "{key_arg} does not hold a Fernet key (32 bytes, url-safe base64)"
        ))
    })?;
    let plain = fernet.decrypt(token).map_err(|_| {
        Error::BadPassphrase(format!(
            "the Fernet token in {} does not decrypt with the key from {key_arg}: the key is wrong or the token was altered; nothing imported",
            path.display()
        ))
    })?;
    Ok(SecretBytes::new(plain))
}

// ---------------------------------------------------------------------------------------------
// .env files

/// One variable's value from a dotenv file. Errors name lines, never content.
fn env_value(path: &Path, text: &str, var: &str) -> Result<SecretBytes> {
    let bindings = dotenv::parse(text);
    let b = find_binding(path, &bindings, var)?;
    let value = b.value.as_ref().ok_or_else(|| {
        Error::InvalidKeyMaterial(format!(
            "{var} in {} (line {}) has no value",
            path.display(),
            b.line
        ))
    })?;
    let decoded = value.decode(text);
    if decoded.is_empty() {
        return Err(Error::InvalidKeyMaterial(format!(
            "{var} in {} (line {}) is empty",
            path.display(),
            b.line
        )));
    }
    if dotenv::has_interpolation(&decoded) {
        return Err(Error::InvalidKeyMaterial(format!(
            "{var} in {} (line {}) uses ${{...}} interpolation, which keyward does not expand; put the literal secret there (or import it from a file)",
            path.display(),
            b.line
        )));
    }
    Ok(SecretBytes::from_slice(decoded.as_bytes()))
}

/// The single binding of `var`: absent or repeated is an error (python-dotenv would silently
/// take the last one, which may not be the one the operator means).
fn find_binding<'b>(
    path: &Path,
    bindings: &'b [dotenv::Binding],
    var: &str,
) -> Result<&'b dotenv::Binding> {
    let found: Vec<&dotenv::Binding> = bindings
        .iter()
        .filter(|b| b.key.as_deref() == Some(var))
        .collect();
    match found.as_slice() {
        [one] => Ok(one),
        [] => {
            let bad: Vec<String> = bindings
                .iter()
                .filter(|b| b.error)
                .map(|b| b.line.to_string())
                .collect();
            Err(Error::InvalidKeyMaterial(format!(
                "{} has no variable {var}{}",
                path.display(),
                if bad.is_empty() {
                    String::new()
                } else {
                    format!(" (lines it could not parse: {})", bad.join(", "))
                }
            )))
        }
        many => Err(Error::InvalidKeyMaterial(format!(
            "{var} is defined {} times in {} (lines {}); keep one definition and retry",
            many.len(),
            path.display(),
            many.iter()
                .map(|b| b.line.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Remove `var` from a .env file, keeping everything else byte for byte, then overwrite the
/// old content.
///
/// The path always holds a complete file: the new content goes to a temp file in the same
/// directory (same owner and mode), is fsynced and renamed over the original, and the
/// directory is fsynced. The old inode is kept open across the rename, so once nothing names
/// it any more its bytes are overwritten (zeros, then random) through that descriptor and
/// fsynced before it is released. Overwriting in place *before* the rename would risk the
/// operator's other variables on a crash; unlinking without overwriting would leave the secret
/// in freed blocks.
fn remove_env_var(path: &Path, var: &str, imported: &SecretBytes, s: &Shredder) -> Result<()> {
    let ctx = |what: &str| format!("{what} {}", path.display());
    (s.check)(path)?;
    let before = fs::symlink_metadata(path).map_err(|e| Error::io(ctx("reading"), e))?;
    let mut old = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| Error::io(ctx("opening"), e))?;
    let md = old.metadata().map_err(|e| Error::io(ctx("reading"), e))?;
    if (md.dev(), md.ino()) != (before.dev(), before.ino()) || md.nlink() != 1 {
        return Err(Error::BadRequest(format!(
            "{} changed while it was being shredded; it was not rewritten",
            path.display()
        )));
    }
    let content = read_secret(&mut old, MAX_ENV_FILE)?;
    let text = as_text(path, &content)?;
    let bindings = dotenv::parse(text);
    let b = find_binding(path, &bindings, var)?;
    // The file may have been edited since the import read it: remove only what was imported.
    let same = b
        .value
        .as_ref()
        .is_some_and(|v| v.decode(text).as_bytes() == imported.expose());
    if !same {
        return Err(Error::BadRequest(format!(
            "{var} in {} changed after it was imported; the file was not rewritten",
            path.display()
        )));
    }
    let cut = b.span.clone();
    let mut new = Zeroizing::new(Vec::with_capacity(text.len() - cut.len()));
    new.extend_from_slice(&text.as_bytes()[..cut.start]);
    new.extend_from_slice(&text.as_bytes()[cut.end..]);
    check_only_var_removed(text, &bindings, cut.start, &new, var)?;

    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let fname = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{fname}.keyward-{}-{}.tmp",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| -> Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
        // Owner before mode: chown may clear set-id bits, and the umask narrowed the mode.
        let fresh = f
            .metadata()
            .map_err(|e| Error::io(format!("reading {}", tmp.display()), e))?;
        if (fresh.uid(), fresh.gid()) != (md.uid(), md.gid()) {
            std::os::unix::fs::fchown(&f, Some(md.uid()), Some(md.gid())).map_err(|e| {
                Error::io(
                    format!("giving {} the owner of the original", tmp.display()),
                    e,
                )
            })?;
        }
        f.set_permissions(fs::Permissions::from_mode(md.mode() & 0o7777))
            .and_then(|_| f.write_all(&new))
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
        let now = fs::symlink_metadata(path).map_err(|e| Error::io(ctx("reading"), e))?;
        if (now.dev(), now.ino()) != (md.dev(), md.ino()) {
            return Err(Error::BadRequest(format!(
                "{} was replaced while it was being shredded; it was not rewritten",
                path.display()
            )));
        }
        fs::rename(&tmp, path).map_err(|e| Error::io(ctx("replacing"), e))?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    keyward::home::sync_dir(dir)?;
    overwrite_unlinked(&mut old, md.len()).map_err(|e| {
        Error::io(
            format!(
                "{var} was removed from {}, but overwriting the old copy failed",
                path.display()
            ),
            e,
        )
    })
}

/// Overwrite the whole of a file that no longer has a name (zeros, then random), with fsync.
/// Same caveat as `--shred` of a whole file: copy-on-write and flash storage may keep old blocks.
fn overwrite_unlinked(f: &mut fs::File, len: u64) -> std::io::Result<()> {
    let len = usize::try_from(len).map_err(|_| std::io::Error::other("file too large"))?;
    let mut noise = vec![0u8; len];
    for pass in 0..2 {
        if pass == 1 {
            aws_lc_rs::rand::fill(&mut noise)
                .map_err(|_| std::io::Error::other("no randomness"))?;
        }
        f.seek(SeekFrom::Start(0))?;
        f.write_all(&noise)?;
        f.sync_all()?;
    }
    Ok(())
}

/// Parse the rewritten file again: exactly the other variables, with the same values, must
/// remain. A mismatch would mean the cut changed how the rest parses; refuse to write it.
fn check_only_var_removed(
    old_text: &str,
    old: &[dotenv::Binding],
    cut_at: usize,
    new: &[u8],
    var: &str,
) -> Result<()> {
    let bug = || {
        Error::Internal(format!(
            "removing {var} would change how the rest of the file parses; the file was not rewritten"
        ))
    };
    let new_text = std::str::from_utf8(new).map_err(|_| bug())?;
    let fresh = dotenv::parse(new_text);
    let kept: Vec<&dotenv::Binding> = old
        .iter()
        .filter(|b| b.key.is_some() && b.key.as_deref() != Some(var))
        .collect();
    let now: Vec<&dotenv::Binding> = fresh.iter().filter(|b| b.key.is_some()).collect();
    if kept.len() != now.len()
        || old.iter().filter(|b| b.error).count() != fresh.iter().filter(|b| b.error).count()
    {
        return Err(bug());
    }
    for (a, b) in kept.iter().zip(&now) {
        let va = a.value.as_ref().map(|v| v.decode(old_text));
        let vb = b.value.as_ref().map(|v| v.decode(new_text));
        if a.key != b.key
            || va.as_deref().map(|s| s.as_bytes()) != vb.as_deref().map(|s| s.as_bytes())
        {
            return Err(bug());
        }
    }
    // Nothing before the cut may have moved.
    if new.get(..cut_at) != old_text.as_bytes().get(..cut_at) {
        return Err(bug());
    }
    Ok(())
}

/// Python's `str.isspace` (what `\s` matches in python-dotenv's patterns).
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

/// A dotenv parser that follows python-dotenv 1.x (`dotenv/parser.py`) statement by
/// statement, so a file means here what it meant to the Python service that used it.
mod dotenv {
    use super::py_space;
    use std::ops::Range;
    use zeroize::Zeroizing;

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub enum Quote {
        None,
        Single,
        Double,
    }

    /// Where a value's text is and how it is quoted; decoded on demand so values the import
    /// does not need are never copied.
    pub struct Value {
        pub quote: Quote,
        pub raw: Range<usize>,
    }

    impl Value {
        pub fn decode(&self, text: &str) -> Zeroizing<String> {
            let raw = &text[self.raw.clone()];
            // Decoding never grows the text: reserve once so no partial copy is left behind.
            let mut out = Zeroizing::new(String::with_capacity(raw.len()));
            let mut chars = raw.chars().peekable();
            while let Some(c) = chars.next() {
                // Python reads the file with universal newlines before parsing.
                if c == '\r' {
                    if chars.peek() == Some(&'\n') {
                        chars.next();
                    }
                    out.push('\n');
                    continue;
                }
                if c == '\\' && self.quote != Quote::None {
                    let next = chars.peek().copied();
                    let decoded = match (self.quote, next) {
                        (_, Some(n @ ('\\' | '\''))) => Some(n),
                        (Quote::Double, Some('"')) => Some('"'),
                        (Quote::Double, Some('a')) => Some('\x07'),
                        (Quote::Double, Some('b')) => Some('\x08'),
                        (Quote::Double, Some('f')) => Some('\x0c'),
                        (Quote::Double, Some('n')) => Some('\n'),
                        (Quote::Double, Some('r')) => Some('\r'),
                        (Quote::Double, Some('t')) => Some('\t'),
                        (Quote::Double, Some('v')) => Some('\x0b'),
                        _ => None,
                    };
                    if let Some(d) = decoded {
                        chars.next();
                        out.push(d);
                        continue;
                    }
                }
                out.push(c);
            }
            out
        }
    }

    /// One statement of the file.
    pub struct Binding {
        /// None for comments, blank tails and unparseable statements.
        pub key: Option<String>,
        /// None for a bare `KEY` without `=`.
        pub value: Option<Value>,
        /// From the start of the statement's first line to the end of its last line
        /// (newline included): what removing the statement removes.
        pub span: Range<usize>,
        /// 1-based line the statement starts on.
        pub line: usize,
        /// python-dotenv could not parse it (and skips it with a warning).
        pub error: bool,
    }

    /// `${NAME}` or `${NAME:-default}`, which python-dotenv expands by default.
    pub fn has_interpolation(v: &str) -> bool {
        let b = v.as_bytes();
        let mut i = 0;
        while let Some(off) = v[i..].find("${") {
            let mut j = i + off + 2;
            while j < b.len() && b[j] != b'}' && b[j] != b':' {
                j += 1;
            }
            if j < b.len() && b[j] == b'}' {
                return true;
            }
            if j + 1 < b.len() && b[j] == b':' && b[j + 1] == b'-' && v[j..].contains('}') {
                return true;
            }
            i = i + off + 1;
        }
        false
    }

    struct Reader<'a> {
        s: &'a str,
        pos: usize,
        line: usize,
    }

    struct Fail;

    fn hspace(c: char) -> bool {
        py_space(c) && c != '\r' && c != '\n'
    }

    impl Reader<'_> {
        fn peek(&self) -> Option<char> {
            self.s[self.pos..].chars().next()
        }

        /// Move to `to`, counting lines as Python does after newline translation.
        fn advance_to(&mut self, to: usize) {
            let seg = &self.s.as_bytes()[self.pos..to];
            for (i, &c) in seg.iter().enumerate() {
                if c == b'\n' || (c == b'\r' && seg.get(i + 1) != Some(&b'\n')) {
                    self.line += 1;
                }
            }
            self.pos = to;
        }

        fn eat_while(&mut self, f: impl Fn(char) -> bool) -> Range<usize> {
            let start = self.pos;
            let len: usize = self.s[start..]
                .chars()
                .take_while(|&c| f(c))
                .map(char::len_utf8)
                .sum();
            self.advance_to(start + len);
            start..start + len
        }

        /// `'((?:\\'|[^'])*)'` / `"((?:\\"|[^"])*)"` with the regex engine's backtracking:
        /// the first unescaped quote closes; failing that, the quote of the last `\q`.
        fn quoted(&mut self, q: char) -> Result<Range<usize>, Fail> {
            let b = self.s.as_bytes();
            let qb = q as u8;
            let start = self.pos + 1;
            let mut i = start;
            let mut last_escaped = None;
            let close = loop {
                if i >= b.len() {
                    match last_escaped {
                        Some(at) => break at,
                        None => return Err(Fail),
                    }
                }
                if b[i] == b'\\' && b.get(i + 1) == Some(&qb) {
                    last_escaped = Some(i + 1);
                    i += 2;
                } else if b[i] == qb {
                    break i;
                } else {
                    i += 1;
                }
            };
            self.advance_to(close + 1);
            Ok(start..close)
        }

        fn value(&mut self) -> Result<Value, Fail> {
            match self.peek() {
                Some('\'') => Ok(Value {
                    quote: Quote::Single,
                    raw: self.quoted('\'')?,
                }),
                Some('"') => Ok(Value {
                    quote: Quote::Double,
                    raw: self.quoted('"')?,
                }),
                None | Some('\n') | Some('\r') => Ok(Value {
                    quote: Quote::None,
                    raw: self.pos..self.pos,
                }),
                Some(_) => {
                    let part = self.eat_while(|c| c != '\r' && c != '\n');
                    let text = &self.s[part.clone()];
                    // re.sub(r"\s+#.*", "", part).rstrip()
                    let mut end = text.len();
                    let mut prev_space = false;
                    for (i, c) in text.char_indices() {
                        if c == '#' && prev_space {
                            end = text[..i].trim_end_matches(py_space).len();
                            break;
                        }
                        prev_space = py_space(c);
                    }
                    let end = text[..end].trim_end_matches(py_space).len();
                    Ok(Value {
                        quote: Quote::None,
                        raw: part.start..part.start + end,
                    })
                }
            }
        }

        fn statement(&mut self) -> Result<(Option<String>, Option<Value>), Fail> {
            if self.s[self.pos..].starts_with("export")
                && self.s[self.pos + 6..].chars().next().is_some_and(hspace)
            {
                self.advance_to(self.pos + 6);
                self.eat_while(hspace);
            }
            let key = match self.peek() {
                Some('#') => None,
                Some('\'') => {
                    let rest = &self.s[self.pos + 1..];
                    let n = rest.find('\'').ok_or(Fail)?;
                    if n == 0 {
                        return Err(Fail);
                    }
                    // Python translated newlines before parsing; a quoted key may span lines.
                    let k = rest[..n].replace("\r\n", "\n").replace('\r', "\n");
                    self.advance_to(self.pos + n + 2);
                    Some(k)
                }
                _ => {
                    let r = self.eat_while(|c| c != '=' && c != '#' && !py_space(c));
                    if r.is_empty() {
                        return Err(Fail);
                    }
                    Some(self.s[r].to_string())
                }
            };
            self.eat_while(hspace);
            let value = if self.peek() == Some('=') {
                self.advance_to(self.pos + 1);
                self.eat_while(hspace);
                Some(self.value()?)
            } else {
                None
            };
            // (?:[^\S\r\n]*#[^\r\n]*)?
            let save = (self.pos, self.line);
            self.eat_while(hspace);
            if self.peek() == Some('#') {
                self.eat_while(|c| c != '\r' && c != '\n');
            } else {
                (self.pos, self.line) = save;
            }
            // [^\S\r\n]*(?:\r\n|\n|\r|$)
            self.eat_while(hspace);
            let rest = &self.s[self.pos..];
            if rest.starts_with("\r\n") {
                self.advance_to(self.pos + 2);
            } else if rest.starts_with('\n') || rest.starts_with('\r') {
                self.advance_to(self.pos + 1);
            } else if !rest.is_empty() {
                return Err(Fail);
            }
            Ok((key, value))
        }
    }

    pub fn parse(s: &str) -> Vec<Binding> {
        let mut r = Reader { s, pos: 0, line: 1 };
        let mut out = Vec::new();
        while r.pos < s.len() {
            let ws = r.eat_while(py_space);
            if r.pos >= s.len() {
                break;
            }
            // The statement owns its whole first line, not the blank lines before it.
            let line_start = s[ws.clone()]
                .rfind(['\n', '\r'])
                .map_or(ws.start, |i| ws.start + i + 1);
            let line = r.line;
            match r.statement() {
                Ok((key, value)) => out.push(Binding {
                    key,
                    value,
                    span: line_start..r.pos,
                    line,
                    error: false,
                }),
                Err(Fail) => {
                    // [^\r\n]*(?:\r|\n|\r\n)? from where parsing stopped, as Python does.
                    r.eat_while(|c| c != '\r' && c != '\n');
                    if matches!(r.peek(), Some('\r') | Some('\n')) {
                        r.advance_to(r.pos + 1);
                    }
                    out.push(Binding {
                        key: None,
                        value: None,
                        span: line_start..r.pos,
                        line,
                        error: true,
                    });
                }
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Other copies of the secret

/// Looks for files that still hold the imported secret in the source's directory and the
/// current directory (not recursively, no symlinks, nothing over 1 MiB).
pub struct CopyScan {
    needle: Option<SecretBytes>,
    /// PEM bodies are compared with whitespace and `\n` escapes removed (JSON, wrapped lines).
    pem: bool,
    dirs: Vec<PathBuf>,
    /// The source file itself (device, inode): it is not "another" copy.
    source: Option<(u64, u64)>,
}

impl CopyScan {
    /// Prepare from what the source yielded; call before the source is shredded.
    pub fn new(source: &Source, input: &SecretBytes) -> CopyScan {
        let (needle, pem) = needle_of(input.expose());
        let mut dirs = Vec::new();
        if let Some(p) = source.path() {
            dirs.push(match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            });
        }
        dirs.push(PathBuf::from("."));
        CopyScan {
            needle,
            pem,
            dirs,
            source: source
                .path()
                .and_then(|p| fs::metadata(p).ok())
                .map(|m| (m.dev(), m.ino())),
        }
    }

    /// Absolute paths of the files holding the secret, sorted; and whether the scan was cut
    /// short by its limits.
    pub fn run(&self) -> (Vec<PathBuf>, bool) {
        let Some(needle) = &self.needle else {
            return (Vec::new(), false);
        };
        let mut seen_dirs = HashSet::new();
        let mut seen_files = HashSet::new();
        if let Some(id) = self.source {
            seen_files.insert(id);
        }
        let mut found = Vec::new();
        let mut budget = MAX_SCANNED_BYTES;
        let mut truncated = false;
        for dir in &self.dirs {
            let Ok(dir) = fs::canonicalize(dir) else {
                continue;
            };
            let Ok(md) = fs::metadata(&dir) else { continue };
            if !seen_dirs.insert((md.dev(), md.ino())) {
                continue;
            }
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for (n, entry) in entries.flatten().enumerate() {
                if n >= MAX_SCANNED_ENTRIES {
                    truncated = true;
                    break;
                }
                let path = entry.path();
                let Ok(md) = fs::symlink_metadata(&path) else {
                    continue;
                };
                if !md.file_type().is_file()
                    || md.len() > MAX_SCANNED_FILE
                    || md.len() < needle.len() as u64
                    || !seen_files.insert((md.dev(), md.ino()))
                {
                    continue;
                }
                if md.len() > budget {
                    truncated = true;
                    break;
                }
                budget -= md.len();
                if self.file_holds(&path, &md, needle) {
                    found.push(path);
                }
            }
        }
        found.sort();
        (found, truncated)
    }

    fn file_holds(&self, path: &Path, expect: &fs::Metadata, needle: &SecretBytes) -> bool {
        // No following symlinks, no blocking on a FIFO swapped in after the lstat.
        let Ok(f) = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
        else {
            return false;
        };
        match f.metadata() {
            Ok(m) if m.is_file() && (m.dev(), m.ino()) == (expect.dev(), expect.ino()) => {}
            _ => return false,
        }
        let Ok(content) = read_secret(f, MAX_SCANNED_FILE as usize) else {
            return false;
        };
        if self.pem {
            contains(&pem_normalize(content.expose()), needle.expose())
        } else {
            contains(content.expose(), needle.expose())
        }
    }
}

/// What to look for: a PEM's base64 body (whitespace removed), or the secret text itself.
fn needle_of(input: &[u8]) -> (Option<SecretBytes>, bool) {
    let t = input.trim_ascii();
    let (needle, pem) = if t.starts_with(b"-----BEGIN") {
        let mut body = Zeroizing::new(Vec::with_capacity(t.len()));
        for line in t.split(|&c| c == b'\n') {
            let line = line.trim_ascii();
            if line.starts_with(b"-----") || line.contains(&b':') {
                continue;
            }
            body.extend(line.iter().filter(|c| !c.is_ascii_whitespace()));
        }
        (SecretBytes::from_slice(&body), true)
    } else {
        let hex = t
            .strip_prefix(b"0x")
            .or_else(|| t.strip_prefix(b"0X"))
            .filter(|h| h.len() >= 32 && h.iter().all(u8::is_ascii_hexdigit));
        (SecretBytes::from_slice(hex.unwrap_or(t)), false)
    };
    if needle.len() < MIN_NEEDLE {
        (None, pem)
    } else {
        (Some(needle), pem)
    }
}

/// Keep only base64 characters, dropping `\n`/`\r`/`\t` escapes first: a PEM pasted into JSON,
/// YAML or a dotenv value still matches its body.
fn pem_normalize(b: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(b.len()));
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'\\' && matches!(b.get(i + 1), Some(b'n' | b'r' | b't')) {
            i += 2;
            continue;
        }
        if c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=') {
            out.push(c);
        }
        i += 1;
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Add the `warnings` array to an import's JSON result and, for humans, print it on stderr.
pub fn report_copies(v: &mut Value, scan: (Vec<PathBuf>, bool), json: bool) {
    let (paths, truncated) = scan;
    let mut warnings = Vec::new();
    if !paths.is_empty() {
        warnings.push(json!({
            "code": "other_copies",
            "message": format!(
                "the same secret is still in {} other file(s); keyward did not change them: remove it from them",
                paths.len()
            ),
            "paths": paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        }));
    }
    if truncated {
        warnings.push(json!({
            "code": "copy_scan_incomplete",
            "message": "the directories hold too many files to check all of them for other copies of the secret",
            "paths": [],
        }));
    }
    if !json {
        let mut err = std::io::stderr().lock();
        for w in &warnings {
            let _ = writeln!(
                err,
                "warning: {}",
                w["message"].as_str().unwrap_or_default()
            );
            for p in w["paths"].as_array().into_iter().flatten() {
                let _ = writeln!(err, "  {}", p.as_str().unwrap_or_default());
            }
        }
    }
    v["warnings"] = Value::Array(warnings);
}

#[cfg(test)]
mod tests {
    use super::dotenv::{has_interpolation, parse};
    use super::*;

    fn values(text: &str) -> Vec<(String, Option<String>)> {
        parse(text)
            .iter()
            .filter_map(|b| {
                let k = b.key.clone()?;
                Some((k, b.value.as_ref().map(|v| v.decode(text).to_string())))
            })
            .collect()
    }

    fn kv(k: &str, v: &str) -> (String, Option<String>) {
        (k.into(), Some(v.into()))
    }

    #[test]
    fn dotenv_syntax_follows_python_dotenv() {
        let text = "# comment\n\nA=plain\nexport B = 'single \\' \\\\ \\n'\nC=\"dq\\nline\\t\\\"x\\\"\" # note\nD=a#b c #gone\n'E'=quoted key\nF\nG=\nH=\"multi\nline\"\r\nI=x  \n";
        assert_eq!(
            values(text),
            vec![
                kv("A", "plain"),
                kv("B", "single ' \\ \\n"),
                kv("C", "dq\nline\t\"x\""),
                kv("D", "a#b c"),
                kv("E", "quoted key"),
                ("F".into(), None),
                kv("G", ""),
                kv("H", "multi\nline"),
                kv("I", "x"),
            ]
        );
    }

    #[test]
    fn unparseable_statements_are_skipped_like_python_does() {
        // The cases python-dotenv 1.2 reports as "could not parse statement".
        let text = "=novalue\nA=\"open\nB=ok\n";
        let b = parse(text);
        assert!(b[0].error);
        assert_eq!(values(text), vec![kv("B", "ok")]);
        // An unterminated quote swallows up to the next quote, then fails there.
        let text = "E=\"a\\\"\nF=x\nG=\"y\"\nH=1\n";
        assert_eq!(values(text), vec![kv("H", "1")]);
        let text = "X='a\\\"b'\nY=\"a\\\\\"\nZ=\"x\\qy\"\n";
        assert_eq!(values(text), vec![kv("X", "a\\\"b")]);
    }

    #[test]
    fn spans_cover_whole_lines_and_removal_keeps_the_rest() {
        let text = "A=1\n\n  export S=\"x\ny\" # c\nB=2";
        let b = parse(text);
        let s = b.iter().find(|b| b.key.as_deref() == Some("S")).unwrap();
        assert_eq!(s.line, 3);
        let mut rest = text[..s.span.start].to_string();
        rest.push_str(&text[s.span.end..]);
        assert_eq!(rest, "A=1\n\nB=2");
        check_only_var_removed(text, &b, s.span.start, rest.as_bytes(), "S").unwrap();
    }

    #[test]
    fn interpolation_is_detected() {
        assert!(has_interpolation("a${B}c"));
        assert!(has_interpolation("${B:-x}"));
        assert!(!has_interpolation("$B"));
        assert!(!has_interpolation("${a:b}"));
        assert!(!has_interpolation("x${"));
    }

    #[test]
    fn env_errors_never_contain_the_value() {
        let p = Path::new("/x/.env");
        let text = "S=hunter2-value\nS=hunter2-value\n";
        let e = env_value(p, text, "S").err().unwrap();
        assert_eq!(e.code(), "invalid_key_material");
        assert!(e.to_string().contains("lines 1, 2"), "{e}");
        assert!(!e.to_string().contains("hunter2"));
        let e = env_value(p, "T=1\n", "S").err().unwrap();
        assert_eq!(e.code(), "invalid_key_material");
        let e = env_value(p, "S=a${T}\n", "S").err().unwrap();
        assert!(!e.to_string().contains("a$"));
    }

    #[test]
    fn pem_bodies_match_through_json_escapes() {
        let pem = b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIAbcdefghij\nklmnopqrstuv\n-----END PRIVATE KEY-----\n";
        let (needle, is_pem) = needle_of(pem);
        assert!(is_pem);
        let needle = needle.unwrap();
        let json = br#"{"k": "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIAbcdefghij\nklmnopqrstuv\n-----END PRIVATE KEY-----\n"}"#;
        assert!(contains(&pem_normalize(json), needle.expose()));
        assert!(!contains(
            &pem_normalize(b"MC4CAQAwBQYDK2VwBCIEIAbcdefghij"),
            needle.expose()
        ));
    }
}
