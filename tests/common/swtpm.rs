//! A private swtpm (software TPM 2.0) per test: its own temp state directory and a free pair
//! of loopback ports, killed when the guard drops, so tests run in parallel without sharing.
//!
//! Same set-up as scripts/swtpm.sh: `swtpm socket --tpm2` on 127.0.0.1 with the control
//! channel on port+1 (the swtpm TCTI expects that), `--flags not-need-init,startup-clear`.
//! Here swtpm runs as a child process (not `--daemon`), so the guard can kill and reap it.
//! [`Swtpm::stop`] and [`Swtpm::restart`] stop and start the same TPM (same state directory,
//! same port, so the same TCTI): the "TPM went away and came back" case.
//!
//! # Children must not inherit TPM sockets
//!
//! The swtpm TCTI of tpm2-tss opens one TCP connection per command, without close-on-exec.
//! A child spawned (by any thread of the test process) while a backend's worker has a command
//! in flight inherits that connection; swtpm serves one connection at a time and then waits
//! for the child's copy to close, so the TPM hangs for as long as the child lives (forever for
//! a child that is another swtpm). Every child this harness spawns therefore closes all
//! inherited descriptors above stderr first ([`no_inherit`]).

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyward::config::TpmConfig;

use super::{run_command, Output};

/// How long swtpm may take to accept connections after it was spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// One running (or stopped) swtpm; killed on drop, its state directory removed.
pub struct Swtpm {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Swtpm {
    /// A fresh TPM (new seeds) on a free port pair.
    pub fn start() -> Swtpm {
        assert!(
            Command::new("swtpm")
                .arg("--version")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "swtpm not found: apt-get install swtpm swtpm-tools"
        );
        let dir = tempfile::Builder::new()
            .prefix("keyward-swtpm-")
            .tempdir()
            .expect("temp dir for swtpm");
        std::fs::create_dir(dir.path().join("state")).expect("state dir");
        // A port pair can be taken between the probe and swtpm's bind: try a few.
        let mut t = Swtpm {
            dir,
            port: 0,
            child: None,
        };
        for _ in 0..20 {
            t.port = free_port_pair();
            if t.spawn() {
                return t;
            }
        }
        panic!("could not start swtpm on a free port pair after 20 tries");
    }

    /// Spawn swtpm on `self.port` and wait until it accepts connections.
    fn spawn(&mut self) -> bool {
        let state = self.state_dir();
        let mut cmd = Command::new("swtpm");
        no_inherit(&mut cmd);
        let child = cmd
            .args(["socket", "--tpm2"])
            .arg("--server")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", self.port))
            .arg("--ctrl")
            .arg(format!(
                "type=tcp,port={},bindaddr=127.0.0.1",
                self.port + 1
            ))
            .arg("--tpmstate")
            .arg(format!("dir={}", state.display()))
            .args(["--flags", "not-need-init,startup-clear"])
            .arg("--log")
            .arg(format!(
                "file={}",
                self.dir.path().join("swtpm.log").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning swtpm");
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    // Exited: most likely the port was taken.
                    self.child = None;
                    return false;
                }
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        false
    }

    /// The TCTI string for tss-esapi and tpm2-tools.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `[tpm.<alias>]` for this TPM with default timeout, queue and cache.
    pub fn config(&self) -> TpmConfig {
        TpmConfig {
            tcti: Some(self.tcti()),
            owner_auth: None,
            key_auth: None,
            timeout_ms: 2000,
            queue: 64,
            loaded_keys: 1,
        }
    }

    /// Kill swtpm (SIGKILL: a TPM that vanishes, not one that shuts down politely).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start the same TPM again: same state directory and port, so the same TCTI and seeds.
    pub fn restart(&mut self) {
        self.stop();
        // The port was ours a moment ago; retry briefly in case the kernel still holds it.
        for _ in 0..50 {
            if self.spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("swtpm did not restart on port {}", self.port);
    }

    /// Run a tpm2-tools program against this TPM (TPM2TOOLS_TCTI set explicitly, in the
    /// fixture's directory), then flush the transient objects it left loaded: swtpm has no
    /// resource manager and only three transient slots (context files still load later).
    pub fn tpm2(&self, program: &str, args: &[&str]) -> Output {
        let out = run_command(self.tpm2_command(program, args), None);
        let flush = run_command(self.tpm2_command("tpm2_flushcontext", &["-t"]), None);
        assert!(flush.success(), "tpm2_flushcontext -t failed:\n{flush}");
        out
    }

    /// A persistent key made the tpm2-tools way: primary, create, load, evictcontrol at
    /// `handle`. `extra` is passed to tpm2_create (e.g. `-p AUTH`). Returns the public key PEM.
    pub fn persistent_key(&self, alg: &str, handle: &str, extra: &[&str]) -> String {
        let run = |program: &str, args: &[&str]| {
            let out = self.tpm2(program, args);
            assert!(out.success(), "{program} failed:\n{out}");
        };
        run(
            "tpm2_createprimary",
            &["-C", "o", "-g", "sha256", "-G", "ecc", "-c", "primary.ctx"],
        );
        let (public, private, ctx) = (
            format!("{handle}.pub"),
            format!("{handle}.priv"),
            format!("{handle}.ctx"),
        );
        let mut args = vec![
            "-C",
            "primary.ctx",
            "-G",
            alg,
            "-u",
            &public,
            "-r",
            &private,
        ];
        args.extend_from_slice(extra);
        run("tpm2_create", &args);
        run(
            "tpm2_load",
            &[
                "-C",
                "primary.ctx",
                "-u",
                &public,
                "-r",
                &private,
                "-c",
                &ctx,
            ],
        );
        run("tpm2_evictcontrol", &["-C", "o", "-c", &ctx, handle]);
        let pem = format!("{handle}.pem");
        run("tpm2_readpublic", &["-c", handle, "-f", "pem", "-o", &pem]);
        std::fs::read_to_string(self.dir.path().join(&pem)).expect("public key PEM")
    }

    fn tpm2_command(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new(program);
        no_inherit(&mut c);
        c.args(args)
            .env("TPM2TOOLS_TCTI", self.tcti())
            .current_dir(self.dir.path());
        c
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Make `c` close every inherited descriptor above stderr before it execs (see the module
/// doc: tpm2-tss sockets are not close-on-exec). Stdio is set up by std before this runs.
pub fn no_inherit(c: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe system
    // calls (close_range, or close in a loop where close_range is missing).
    unsafe {
        c.pre_exec(|| {
            if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
                for fd in 3..4096 {
                    libc::close(fd);
                }
            }
            Ok(())
        });
    }
}

/// Run `program` (no inherited descriptors); panics unless it succeeds.
pub fn tool(program: &str, args: &[&str]) -> Output {
    let mut c = Command::new(program);
    no_inherit(&mut c);
    c.args(args);
    let out = run_command(c, None);
    assert!(out.success(), "{program} failed:\n{out}");
    out
}

/// An even port P with P and P+1 free on 127.0.0.1 right now.
fn free_port_pair() -> u16 {
    for _ in 0..200 {
        let Ok(l) = TcpListener::bind(("127.0.0.1", 0)) else {
            continue;
        };
        let Ok(addr) = l.local_addr() else {
            continue;
        };
        let p = addr.port() & !1;
        drop(l);
        if p < 1024 || p == u16::MAX - 1 {
            continue;
        }
        let a = TcpListener::bind(("127.0.0.1", p));
        let b = TcpListener::bind(("127.0.0.1", p + 1));
        if a.is_ok() && b.is_ok() {
            return p;
        }
    }
    panic!("no free port pair on 127.0.0.1");
}
