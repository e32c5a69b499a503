//! The only place keyward calls libc directly: process hardening and memory locking.
//! Everything here is a thin, documented wrapper so the rest of the crate stays safe code.
#![allow(unsafe_code)]

use std::io;

/// Make the process non-dumpable and forbid core files, so key material in memory can neither
/// be written to a core dump nor read by a same-uid `ptrace`/`/proc/<pid>/mem`.
pub fn disable_core_dumps() -> io::Result<()> {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads a valid, initialised rlimit struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: PR_SET_DUMPABLE takes one integer argument; the unused ones are ignored.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Files and directories the agent creates are private to its user.
pub fn set_private_umask() {
    // SAFETY: umask cannot fail and touches only process state.
    unsafe {
        libc::umask(0o077);
    }
}

/// Whether the process is currently dumpable (read back for `status` and tests).
pub fn is_dumpable() -> bool {
    // SAFETY: PR_GET_DUMPABLE takes no pointer arguments.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) == 1 }
}

pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no failure mode and no arguments.
    unsafe { libc::geteuid() }
}

/// Whether the process may lock all of its memory without hitting RLIMIT_MEMLOCK (root, or an
/// unlimited limit as set by `LimitMEMLOCK=infinity`).
pub fn may_lock_all_memory() -> bool {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and reads nothing else.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } == 0;
    effective_uid() == 0 || (ok && lim.rlim_cur == libc::RLIM_INFINITY)
}

/// Lock every page the process has or will touch (MCL_ONFAULT: as it is touched, so reserved
/// but unused memory such as thread stacks is not populated). Covers key objects that live in
/// aws-lc's own heap, which per-buffer mlock cannot reach.
pub fn lock_all_memory() -> io::Result<()> {
    // SAFETY: mlockall takes only flags and changes page residency, not memory contents.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether all memory is locked (VmLck equals VmRSS is not required; the flag is what counts).
pub fn memory_locked() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmLck:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|n| n.parse::<u64>().ok())
            })
        })
        .is_some_and(|kb| kb > 0)
}

/// Send signal `sig` to process `pid` (`testenv down`).
pub fn send_signal(pid: u32, sig: i32) -> io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    if pid <= 0 {
        // 0 and negative pids address process groups: never what a caller here means.
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: kill(2) takes two integers and touches no memory of ours.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Lock `len` bytes at `ptr` into RAM so they are never swapped out. Best effort: the caller
/// decides what a failure (RLIMIT_MEMLOCK) means.
pub fn mlock(ptr: *const u8, len: usize) -> bool {
    if len == 0 {
        return true;
    }
    // SAFETY: mlock only changes page residency of an address range; it never dereferences
    // it, and the caller passes a range it owns.
    unsafe { libc::mlock(ptr.cast(), len) == 0 }
}

pub fn munlock(ptr: *const u8, len: usize) {
    if len == 0 {
        return;
    }
    // SAFETY: as for mlock; unlocking a range that was never locked is harmless.
    unsafe {
        libc::munlock(ptr.cast(), len);
    }
}

/// Remove an environment variable that carried a secret, before any other thread exists.
/// The value's bytes are overwritten in place first: `remove_var` alone only unlinks the entry,
/// and the original environment block stays readable in `/proc/<pid>/environ`.
pub fn scrub_env(name: &str) {
    if let Ok(cname) = std::ffi::CString::new(name) {
        // SAFETY: called during single-threaded start-up (no concurrent environment access).
        // getenv returns NULL or a pointer to the NUL-terminated value inside the process's
        // own, writable environment storage; we overwrite exactly strlen bytes of it.
        unsafe {
            let p = libc::getenv(cname.as_ptr());
            if !p.is_null() {
                let len = libc::strlen(p);
                std::ptr::write_bytes(p, 0, len);
            }
        }
    }
    std::env::remove_var(name);
}

#[cfg(test)]
mod tests {
    #[test]
    fn scrubbed_variables_are_gone() {
        std::env::set_var("KEYWARD_SYS_TEST_SCRUB", "value-to-wipe");
        super::scrub_env("KEYWARD_SYS_TEST_SCRUB");
        assert!(std::env::var_os("KEYWARD_SYS_TEST_SCRUB").is_none());
    }

    #[test]
    fn mlock_of_a_small_buffer_succeeds_or_reports_false() {
        let buf = [1u8; 64];
        let locked = super::mlock(buf.as_ptr(), buf.len());
        if locked {
            super::munlock(buf.as_ptr(), buf.len());
        }
    }
}
