//! A minimal client for OpenSSH's agent protocol (draft-miller-ssh-agent): list identities and
//! sign, so the benchmark can drive `ssh-agent` with the same loop it drives keyward with.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use base64::Engine;

use crate::error::{Error, Result};

const SSH_AGENT_FAILURE: u8 = 5;
const SSH2_AGENTC_REQUEST_IDENTITIES: u8 = 11;
const SSH2_AGENT_IDENTITIES_ANSWER: u8 = 12;
const SSH2_AGENTC_SIGN_REQUEST: u8 = 13;
const SSH2_AGENT_SIGN_RESPONSE: u8 = 14;

/// Sign-request flag asking for an `rsa-sha2-256` signature from an RSA key.
pub const SSH_AGENT_RSA_SHA2_256: u32 = 2;

/// Largest agent message accepted (OpenSSH's own limit is 256 KiB).
const MAX_MESSAGE: usize = 256 * 1024;

/// One key the agent holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The SSH public key blob (`string type, ...`), as in an `authorized_keys` line's base64.
    pub blob: Vec<u8>,
    pub comment: String,
}

impl Identity {
    /// The key type name inside the blob (`ssh-ed25519`, `ecdsa-sha2-nistp256`, `ssh-rsa`).
    pub fn key_type(&self) -> Option<String> {
        let mut r = Reader(&self.blob);
        r.string()
            .ok()
            .map(|s| String::from_utf8_lossy(s).into_owned())
    }
}

/// The sign-request flags OpenSSH needs for a key type: RSA keys would otherwise sign with SHA-1.
pub fn flags_for(blob: &[u8]) -> u32 {
    let mut r = Reader(blob);
    match r.string() {
        Ok(b"ssh-rsa") => SSH_AGENT_RSA_SHA2_256,
        _ => 0,
    }
}

/// The key blob of an OpenSSH public key line (`ssh-ed25519 AAAA... comment`).
pub fn blob_from_openssh(line: &str) -> Result<Vec<u8>> {
    let b64 = line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| Error::Internal("OpenSSH public key line has no key field".into()))?;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| Error::Internal(format!("OpenSSH public key is not base64: {e}")))
}

/// A connection to an ssh-agent.
pub struct SshAgent {
    stream: UnixStream,
    /// Reused request/response buffers: the loop under test allocates nothing per request.
    out: Vec<u8>,
    inp: Vec<u8>,
}

fn unreachable(path: &Path, e: std::io::Error) -> Error {
    Error::io(
        format!("connecting to the ssh-agent at {}", path.display()),
        e,
    )
}

impl SshAgent {
    pub fn connect(path: &Path) -> Result<SshAgent> {
        let stream = UnixStream::connect(path).map_err(|e| unreachable(path, e))?;
        Ok(SshAgent {
            stream,
            out: Vec::with_capacity(1024),
            inp: Vec::with_capacity(1024),
        })
    }

    /// Send the message in `self.out` (type byte + body; the length is prefixed here) and read
    /// the answer into `self.inp`; returns the answer's type byte.
    fn round_trip(&mut self) -> Result<u8> {
        let len = u32::try_from(self.out.len() - 4)
            .map_err(|_| Error::Internal("ssh-agent request too large".into()))?;
        self.out[..4].copy_from_slice(&len.to_be_bytes());
        let io = |e: std::io::Error| Error::io("talking to the ssh-agent", e);
        self.stream.write_all(&self.out).map_err(io)?;
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).map_err(io)?;
        let n = u32::from_be_bytes(len) as usize;
        if n == 0 || n > MAX_MESSAGE {
            return Err(Error::Internal(format!(
                "ssh-agent sent a message of {n} bytes"
            )));
        }
        self.inp.resize(n, 0);
        self.stream.read_exact(&mut self.inp).map_err(io)?;
        Ok(self.inp[0])
    }

    fn begin(&mut self, msg_type: u8) {
        self.out.clear();
        self.out.extend_from_slice(&[0, 0, 0, 0, msg_type]);
    }

    fn put_string(&mut self, s: &[u8]) -> Result<()> {
        let n = u32::try_from(s.len())
            .map_err(|_| Error::Internal("ssh-agent field too large".into()))?;
        self.out.extend_from_slice(&n.to_be_bytes());
        self.out.extend_from_slice(s);
        Ok(())
    }

    /// SSH2_AGENTC_REQUEST_IDENTITIES.
    pub fn identities(&mut self) -> Result<Vec<Identity>> {
        self.begin(SSH2_AGENTC_REQUEST_IDENTITIES);
        let t = self.round_trip()?;
        if t != SSH2_AGENT_IDENTITIES_ANSWER {
            return Err(Error::Internal(format!(
                "ssh-agent answered message type {t} to a request for identities"
            )));
        }
        let mut r = Reader(&self.inp[1..]);
        let count = r.u32()?;
        let mut out = Vec::new();
        for _ in 0..count {
            let blob = r.string()?.to_vec();
            let comment = String::from_utf8_lossy(r.string()?).into_owned();
            out.push(Identity { blob, comment });
        }
        Ok(out)
    }

    /// SSH2_AGENTC_SIGN_REQUEST; returns the raw signature bytes (the inner `string` of the
    /// SSH signature blob: Ed25519 64 bytes, RSA the PKCS#1 signature, ECDSA `mpint r, mpint s`).
    pub fn sign(&mut self, key_blob: &[u8], data: &[u8], flags: u32) -> Result<Vec<u8>> {
        self.sign_blob(key_blob, data, flags).map(|(_, sig)| sig)
    }

    /// Like [`sign`](Self::sign) but also returns the signature's algorithm name.
    pub fn sign_blob(
        &mut self,
        key_blob: &[u8],
        data: &[u8],
        flags: u32,
    ) -> Result<(String, Vec<u8>)> {
        self.sign_in_place(key_blob, data, flags)?;
        let mut r = Reader(&self.inp[1..]);
        let mut sig = Reader(r.string()?);
        let alg = String::from_utf8_lossy(sig.string()?).into_owned();
        Ok((alg, sig.string()?.to_vec()))
    }

    /// The benchmark's inner loop: sign and check the answer's type, without copying it out.
    pub fn sign_in_place(&mut self, key_blob: &[u8], data: &[u8], flags: u32) -> Result<()> {
        self.begin(SSH2_AGENTC_SIGN_REQUEST);
        self.put_string(key_blob)?;
        self.put_string(data)?;
        self.out.extend_from_slice(&flags.to_be_bytes());
        match self.round_trip()? {
            SSH2_AGENT_SIGN_RESPONSE => Ok(()),
            SSH_AGENT_FAILURE => Err(Error::Internal(
                "ssh-agent refused to sign (SSH_AGENT_FAILURE)".into(),
            )),
            t => Err(Error::Internal(format!(
                "ssh-agent answered message type {t} to a sign request"
            ))),
        }
    }
}

/// Cursor over SSH wire-format data (`uint32`, `string`).
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u32(&mut self) -> Result<u32> {
        if self.0.len() < 4 {
            return Err(truncated());
        }
        let (head, rest) = self.0.split_at(4);
        self.0 = rest;
        Ok(u32::from_be_bytes([head[0], head[1], head[2], head[3]]))
    }

    fn string(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        if self.0.len() < n {
            return Err(truncated());
        }
        let (s, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(s)
    }
}

fn truncated() -> Error {
    Error::Internal("truncated ssh-agent message".into())
}

/// An ECDSA signature from ssh-agent (`mpint r, mpint s`) as fixed-width raw r‖s.
pub fn ecdsa_ssh_to_raw(sig: &[u8], scalar_len: usize) -> Result<Vec<u8>> {
    let mut r = Reader(sig);
    let mut out = Vec::with_capacity(2 * scalar_len);
    for _ in 0..2 {
        let mut v = r.string()?;
        while v.first() == Some(&0) {
            v = &v[1..];
        }
        if v.len() > scalar_len {
            return Err(Error::Internal("ECDSA signature component too long".into()));
        }
        out.extend(std::iter::repeat_n(0u8, scalar_len - v.len()));
        out.extend_from_slice(v);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// A private ssh-agent on a socket in a temp dir, killed on drop.
    struct TestAgent {
        child: Child,
        sock: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    impl TestAgent {
        fn start() -> TestAgent {
            let dir = tempfile::tempdir().unwrap();
            let sock = dir.path().join("agent.sock");
            let child = Command::new("ssh-agent")
                .arg("-D")
                .arg("-a")
                .arg(&sock)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("ssh-agent (package openssh-client, installed by scripts/setup.sh)");
            let t0 = Instant::now();
            while !sock.exists() {
                assert!(
                    t0.elapsed() < Duration::from_secs(5),
                    "ssh-agent did not start"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            TestAgent {
                child,
                sock,
                _dir: dir,
            }
        }

        fn add(&self, args: &[&str]) -> (std::path::PathBuf, String) {
            let key = self._dir.path().join(format!("k{}", args.join("")));
            let st = Command::new("ssh-keygen")
                .args(args)
                .args(["-q", "-N", "", "-C", "bench-test", "-f"])
                .arg(&key)
                .status()
                .unwrap();
            assert!(st.success());
            let st = Command::new("ssh-add")
                .arg("-q")
                .arg(&key)
                .env("SSH_AUTH_SOCK", &self.sock)
                .stderr(Stdio::null())
                .status()
                .unwrap();
            assert!(st.success());
            let pubkey = std::fs::read_to_string(key.with_extension("pub")).unwrap();
            (key, pubkey)
        }
    }

    impl Drop for TestAgent {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[test]
    fn lists_and_signs_with_a_real_ssh_agent() {
        let agent = TestAgent::start();
        let (ed_path, ed_pub) = agent.add(&["-t", "ed25519"]);
        let (_, ec_pub) = agent.add(&["-t", "ecdsa", "-b", "256"]);
        let (_, rsa_pub) = agent.add(&["-t", "rsa", "-b", "2048"]);

        let mut c = SshAgent::connect(&agent.sock).unwrap();
        let ids = c.identities().unwrap();
        assert_eq!(ids.len(), 3);
        let find = |line: &str| {
            let blob = blob_from_openssh(line).unwrap();
            ids.iter().find(|i| i.blob == blob).cloned().unwrap()
        };
        let ed = find(&ed_pub);
        let ec = find(&ec_pub);
        let rsa = find(&rsa_pub);
        assert_eq!(ed.comment, "bench-test");
        assert_eq!(ed.key_type().as_deref(), Some("ssh-ed25519"));
        assert_eq!(flags_for(&rsa.blob), SSH_AGENT_RSA_SHA2_256);
        assert_eq!(flags_for(&ed.blob), 0);

        let msg = [0x5au8; 100];
        // Ed25519: verify against the public key from the .pub file.
        let (alg, sig) = c.sign_blob(&ed.blob, &msg, 0).unwrap();
        assert_eq!(alg, "ssh-ed25519");
        let key = ssh_key::PrivateKey::read_openssh_file(&ed_path).unwrap();
        let ssh_key::public::KeyData::Ed25519(pk) = key.public_key().key_data() else {
            panic!("not ed25519")
        };
        aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ED25519, pk.0)
            .verify(&msg, &sig)
            .unwrap();

        // ECDSA: mpint pair, converted to raw r‖s and verified.
        let (alg, sig) = c.sign_blob(&ec.blob, &msg, 0).unwrap();
        assert_eq!(alg, "ecdsa-sha2-nistp256");
        let raw = ecdsa_ssh_to_raw(&sig, 32).unwrap();
        let mut r = Reader(&ec.blob);
        r.string().unwrap();
        r.string().unwrap();
        let point = r.string().unwrap();
        aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
            point,
        )
        .verify(&msg, &raw)
        .unwrap();

        // RSA with the SHA-256 flag.
        let (alg, sig) = c.sign_blob(&rsa.blob, &msg, flags_for(&rsa.blob)).unwrap();
        assert_eq!(alg, "rsa-sha2-256");
        assert_eq!(sig.len(), 256);

        // The connection stays usable, and an unknown key is a clean failure.
        c.sign_in_place(&ed.blob, &msg, 0).unwrap();
        let e = c.sign_in_place(
            b"\0\0\0\x0bssh-ed25519\0\0\0\x20aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            &msg,
            0,
        );
        assert!(e.is_err());
        c.sign_in_place(&ed.blob, &msg, 0).unwrap();
    }

    #[test]
    fn ecdsa_conversion_pads_and_strips() {
        // r = 0x00ff.. (positive mpint with a leading zero), s = 0x01 (short).
        let mut sig = Vec::new();
        let r = [0u8, 0xff, 0xee];
        sig.extend_from_slice(&(r.len() as u32).to_be_bytes());
        sig.extend_from_slice(&r);
        sig.extend_from_slice(&1u32.to_be_bytes());
        sig.push(1);
        let raw = ecdsa_ssh_to_raw(&sig, 4).unwrap();
        assert_eq!(raw, [0, 0, 0xff, 0xee, 0, 0, 0, 1]);
        assert!(ecdsa_ssh_to_raw(&sig[..5], 4).is_err());
        assert!(blob_from_openssh("ssh-ed25519").is_err());
    }
}
