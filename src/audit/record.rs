//! One audit record and its place in the hash chain: `hash = SHA-256(prev ‖ the line without
//! hash)`, so editing, dropping or moving any record breaks every link after it.

use aws_lc_rs::digest::{self, SHA256};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The `prev` of the very first record of a log.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Who asked (ARCHITECTURE §7 `client{name,uid,pid,exe}`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientInfo {
    pub name: String,
    pub uid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
}

/// One line of `audit-<n>.jsonl`. Fields in this order; absent ones are omitted. There is
/// deliberately no field that could carry a signature, a secret or a request body.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub seq: u64,
    pub ts: String,
    /// `sign`, `sign_request`, `admin`, `agent_start`, `agent_stop`, `backend_up`,
    /// `backend_down`, `file_start`, `repair`, `gap`.
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<ClientInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// The protocol op or admin action (`sign`, `lock`, `key_rotate`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// SHA-256 of the signed input (`sign`) or of the request object (`sign_request`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_sha256: Option<String>,
    /// `allow`, `deny` (policy, rate, lock, disabled) or `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// The stable error code of a denial or error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
    /// `file_start`: the file this one continues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_file: Option<String>,
    pub prev: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
}

impl Record {
    /// A record of `event`, stamped now, with every other field empty (filled by the caller).
    pub fn new(event: &str) -> Record {
        Record {
            ts: crate::keystore::now_rfc3339(),
            event: event.to_string(),
            ..Record::default()
        }
    }

    /// Give the record its place after `prev_hash` and return its line (with `\n`).
    pub fn seal(&mut self, seq: u64, prev_hash: &str) -> Result<Vec<u8>> {
        self.seq = seq;
        self.prev = prev_hash.to_string();
        self.hash.clear();
        let mut line = serde_json::to_vec(self)
            .map_err(|e| Error::Internal(format!("encoding an audit record: {e}")))?;
        self.hash = chain_hash(prev_hash, &line);
        // `hash` is the last field: the full line is the body with it appended (the same
        // bytes serde would write for the record with its hash, without encoding it twice).
        if line.pop() != Some(b'}') {
            return Err(Error::Internal(
                "an audit record is not a JSON object".into(),
            ));
        }
        line.extend_from_slice(b",\"hash\":\"");
        line.extend_from_slice(self.hash.as_bytes());
        line.extend_from_slice(b"\"}\n");
        Ok(line)
    }

    /// Parse one line (without its `\n`).
    pub fn parse(line: &[u8]) -> std::result::Result<Record, String> {
        serde_json::from_slice(line).map_err(|e| e.to_string())
    }

    /// Whether `hash` is the hash of this record's content after its `prev`.
    pub fn hash_ok(&self) -> bool {
        let mut bare = self.clone();
        bare.hash.clear();
        serde_json::to_vec(&bare).is_ok_and(|body| chain_hash(&self.prev, &body) == self.hash)
    }
}

fn chain_hash(prev: &str, body: &[u8]) -> String {
    let mut h = digest::Context::new(&SHA256);
    h.update(prev.as_bytes());
    h.update(body);
    lower_hex(h.finish().as_ref())
}

/// Lower-case hex without `hex::encode`'s per-char iterator: this runs for every record.
fn lower_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Hex SHA-256 of request bytes, the only trace of a request's content in the log.
pub fn sha256_hex(bytes: &[u8]) -> String {
    lower_hex(digest::digest(&SHA256, bytes).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_records_verify_and_any_edit_breaks_them() {
        let mut r = Record::new("sign");
        r.key = Some("k".into());
        let line = r.seal(1, GENESIS).unwrap();
        let back = Record::parse(&line[..line.len() - 1]).unwrap();
        let mut again = serde_json::to_vec(&back).unwrap();
        again.push(b'\n');
        assert_eq!(again, line, "the appended hash is what serde writes");
        assert!(back.hash_ok());
        assert_eq!(back.seq, 1);
        let mut edited = back.clone();
        edited.key = Some("other".into());
        assert!(!edited.hash_ok());
        let mut moved = back;
        moved.prev = "1".repeat(64);
        assert!(!moved.hash_ok());
    }

    #[test]
    fn lower_hex_is_hex() {
        assert_eq!(
            lower_hex(&[0x00, 0xab, 0x7f, 0xff]),
            hex::encode([0x00, 0xab, 0x7f, 0xff])
        );
    }

    #[test]
    fn unknown_fields_do_not_parse() {
        assert!(Record::parse(br#"{"seq":1,"ts":"t","event":"x","prev":"0","sig":"AA"}"#).is_err());
    }
}
