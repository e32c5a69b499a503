//! The keyward home directory: where it is, what is in it, and safe file writes inside it.
//! Every write is atomic (temp file, fsync, rename, fsync dir) so a crash never leaves half a file.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, IoContext, Result};

/// Prefix of in-progress temp files; readers ignore them, `Home::open` sweeps leftovers.
pub const TMP_PREFIX: &str = ".tmp-";

#[derive(Clone, Debug)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// `--home`, else `$KEYWARD_HOME`, else `~/.keyward`.
    pub fn resolve(explicit: Option<&Path>) -> Result<Home> {
        if let Some(p) = explicit {
            return Ok(Home::at(p));
        }
        if let Some(p) = std::env::var_os("KEYWARD_HOME").filter(|v| !v.is_empty()) {
            return Ok(Home::at(Path::new(&p)));
        }
        let home = std::env::var_os("HOME")
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                Error::NotInitialized("HOME is not set; pass --home or set KEYWARD_HOME".into())
            })?;
        Ok(Home::at(&Path::new(&home).join(".keyward")))
    }

    pub fn at(p: &Path) -> Home {
        Home {
            root: p.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn config_path(&self) -> PathBuf {
        self.root.join("keyward.toml")
    }
    pub fn keys_dir(&self) -> PathBuf {
        self.root.join("keys")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }
    pub fn audit_dir(&self) -> PathBuf {
        self.root.join("audit")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    pub fn identity_path(&self) -> PathBuf {
        self.root.join("identity.age")
    }
    pub fn recipient_path(&self) -> PathBuf {
        self.root.join("identity.pub")
    }

    pub fn is_initialized(&self) -> bool {
        self.identity_path().is_file() && self.recipient_path().is_file()
    }

    /// Create the directory tree (0700). Existing directories are checked, not loosened.
    pub fn create_dirs(&self) -> Result<()> {
        for d in [
            self.root.clone(),
            self.keys_dir(),
            self.state_dir(),
            self.audit_dir(),
            self.run_dir(),
        ] {
            if !d.exists() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&d)
                    .ctx(format!("creating {}", d.display()))?;
                // The mode given to mkdir is filtered by the umask; set it exactly.
                fs::set_permissions(&d, fs::Permissions::from_mode(0o700))
                    .ctx(format!("chmod {}", d.display()))?;
            }
        }
        Ok(())
    }

    /// Open an existing home: it must be initialised and private. Leftover temp files from an
    /// interrupted write are removed.
    pub fn open(explicit: Option<&Path>) -> Result<Home> {
        let home = Home::resolve(explicit)?;
        if !home.is_initialized() {
            return Err(Error::NotInitialized(format!(
                "{} is not a keyward home",
                home.root.display()
            )));
        }
        home.check_permissions()?;
        Ok(home)
    }

    /// Refuse a home, key file or identity that group or others can read, or that another
    /// user owns. The message names the fix.
    pub fn check_permissions(&self) -> Result<()> {
        check_private_dir(&self.root)?;
        for d in [self.keys_dir(), self.state_dir()] {
            if d.exists() {
                check_private_dir(&d)?;
            }
        }
        crate::secret::check_private_file(&self.identity_path())?;
        if let Ok(rd) = fs::read_dir(self.keys_dir()) {
            for entry in rd.flatten() {
                let p = entry.path();
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with('.') {
                    continue;
                }
                crate::secret::check_private_file(&p)?;
            }
        }
        let cfg = self.config_path();
        if cfg.exists() {
            crate::secret::check_private_file(&cfg)?;
        }
        Ok(())
    }

    /// Remove temp files an interrupted write left behind (they were never visible as keys).
    pub fn sweep_temp_files(&self) {
        for d in [self.root.clone(), self.keys_dir(), self.state_dir()] {
            if let Ok(rd) = fs::read_dir(&d) {
                for entry in rd.flatten() {
                    if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                        let _ = fs::remove_file(entry.path());
                    }
                }
            }
        }
    }
}

/// A directory holding secrets: a real directory (not a symlink), ours, 0700 or stricter.
pub fn check_private_dir(dir: &Path) -> Result<()> {
    let md = fs::symlink_metadata(dir).ctx(format!("reading {}", dir.display()))?;
    if !md.file_type().is_dir() {
        return Err(Error::InsecurePermissions(format!(
            "{} is not a directory (symlinked homes are refused)",
            dir.display()
        )));
    }
    let me = crate::sys::effective_uid();
    if md.uid() != me {
        return Err(Error::InsecurePermissions(format!(
            "{} is owned by uid {}, not by this user (uid {me})",
            dir.display(),
            md.uid()
        )));
    }
    if md.mode() & 0o077 != 0 {
        return Err(Error::InsecurePermissions(format!(
            "{} has mode {:04o}; run `chmod 700 {}`",
            dir.display(),
            md.mode() & 0o7777,
            dir.display()
        )));
    }
    Ok(())
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Write `data` to `path` atomically with mode 0600: temp file in the same directory, fsync,
/// rename over the target, fsync the directory. Readers see the old file or the new one.
pub fn atomic_write(path: &Path, data: &[u8]) -> Result<()> {
    let dir = parent_of(path);
    let fname = path
        .file_name()
        .ok_or_else(|| Error::Internal(format!("{} has no file name", path.display())))?
        .to_string_lossy();
    let tmp = dir.join(format!(
        "{TMP_PREFIX}{fname}.{}.{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| -> Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .ctx(format!("creating {}", tmp.display()))?;
        f.write_all(data)
            .ctx(format!("writing {}", tmp.display()))?;
        f.sync_all().ctx(format!("fsync {}", tmp.display()))?;
        drop(f);
        fs::rename(&tmp, path).ctx(format!("renaming into {}", path.display()))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Write a file that must not exist yet (never overwrite a key).
pub fn atomic_create(path: &Path, data: &[u8]) -> Result<()> {
    if path.exists() {
        return Err(Error::AlreadyExists(format!("{} exists", path.display())));
    }
    atomic_write(path, data)
}

/// Remove a file and make the removal durable.
pub fn remove_durably(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("removing {}", path.display()), e)),
    }
    sync_dir(parent_of(path))
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(format!("fsync {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.toml");
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        let names: Vec<_> = fs::read_dir(d.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1);
        assert_eq!(
            atomic_create(&p, b"x").unwrap_err().code(),
            "already_exists"
        );
    }

    #[test]
    fn bare_file_names_use_the_current_directory() {
        assert_eq!(parent_of(Path::new("sec")), Path::new("."));
        assert_eq!(parent_of(Path::new("/a/b")), Path::new("/a"));
    }

    #[test]
    fn loose_home_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let h = Home::at(&d.path().join("h"));
        h.create_dirs().unwrap();
        check_private_dir(h.root()).unwrap();
        fs::set_permissions(h.root(), fs::Permissions::from_mode(0o755)).unwrap();
        let e = check_private_dir(h.root()).unwrap_err();
        assert_eq!(e.code(), "insecure_permissions");
        assert!(e.to_string().contains("chmod 700"));
    }
}
