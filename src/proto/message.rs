//! Request and response messages. Requests are parsed strictly: unknown ops, unknown fields
//! and wrong types are `bad_request`; nesting deeper than 32 levels is refused before parsing.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::Error;
use crate::model::KeyName;

/// Deepest JSON nesting accepted in a request.
pub const MAX_DEPTH: usize = 32;
/// Longest free-text field (lock reasons, tokens, client labels).
pub const MAX_TEXT: usize = 256;

/// One request's operation and its arguments (the `op` field selects the variant).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    Hello {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    ListKeys {},
    PublicKey {
        key: KeyName,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        format: Option<String>,
    },
    Sign {
        key: KeyName,
        /// The message, base64 (standard alphabet).
        data: String,
        /// Signing scheme (`rsa-pss-sha256`, ...); default by key type.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scheme: Option<String>,
        /// Sign with this version of the key: the current one, or one in its grace period
        /// after a rotation (docs/lifecycle.md). Default: the current version.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u32>,
    },
    /// Sign an exchange request with a profile (PROFILES.md); the result is the profile's
    /// output object (`signature`, `headers`, …).
    SignRequest {
        key: KeyName,
        profile: String,
        request: Value,
        /// Sign with this version of the key (current, or in grace); default: current.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u32>,
    },
    Status {},
    Lock {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<KeyName>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        all: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    Unlock {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<KeyName>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        all: bool,
    },
    Reload {},
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Hello { .. } => "hello",
            Op::ListKeys {} => "list_keys",
            Op::PublicKey { .. } => "public_key",
            Op::Sign { .. } => "sign",
            Op::SignRequest { .. } => "sign_request",
            Op::Status {} => "status",
            Op::Lock { .. } => "lock",
            Op::Unlock { .. } => "unlock",
            Op::Reload {} => "reload",
        }
    }
}

/// A parsed request: its id (echoed in the response) and operation.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub id: Option<u64>,
    pub op: Op,
}

/// A request that could not be parsed, with whatever id could be recovered.
#[derive(Debug)]
pub struct Rejected {
    pub id: Option<u64>,
    pub error: Error,
}

/// Parse one frame body into a request.
pub fn parse_request(body: &[u8]) -> Result<Request, Rejected> {
    let reject = |id, msg: String| Rejected {
        id,
        error: Error::BadRequest(msg),
    };
    let text =
        std::str::from_utf8(body).map_err(|_| reject(None, "frame is not valid UTF-8".into()))?;
    if json_depth_exceeds(text.as_bytes(), MAX_DEPTH) {
        return Err(reject(
            None,
            format!("JSON nested deeper than {MAX_DEPTH} levels"),
        ));
    }
    let value: Value =
        serde_json::from_str(text).map_err(|e| reject(None, format!("invalid JSON: {e}")))?;
    let Value::Object(mut map) = value else {
        return Err(reject(None, "a request must be a JSON object".into()));
    };
    let id = match map.remove("id") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(id) => Some(id),
            None => return Err(reject(None, "id must be an unsigned 64-bit integer".into())),
        },
        Some(_) => return Err(reject(None, "id must be an unsigned 64-bit integer".into())),
    };
    match map.get("op") {
        Some(Value::String(_)) => {}
        Some(_) => return Err(reject(id, "op must be a string".into())),
        None => return Err(reject(id, "missing field `op`".into())),
    }
    check_text_lengths(&map).map_err(|m| reject(id, m))?;
    let op: Op = serde_json::from_value(Value::Object(map)).map_err(|e| {
        let msg = e.to_string();
        let msg = if msg.starts_with("unknown variant") {
            msg.replacen("unknown variant", "unknown op", 1)
        } else {
            msg
        };
        reject(id, msg)
    })?;
    Ok(Request { id, op })
}

fn check_text_lengths(map: &Map<String, Value>) -> Result<(), String> {
    for field in ["token", "reason", "scheme", "format", "profile"] {
        if let Some(Value::String(s)) = map.get(field) {
            if s.len() > MAX_TEXT {
                return Err(format!("field `{field}` is longer than {MAX_TEXT} bytes"));
            }
        }
    }
    Ok(())
}

/// Whether JSON text nests arrays/objects deeper than `max` (strings are skipped correctly).
pub fn json_depth_exceeds(text: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_str = false;
    let mut escaped = false;
    for &b in text {
        if in_str {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// The error object of a failed response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl From<&Error> for ErrorBody {
    fn from(e: &Error) -> Self {
        ErrorBody {
            code: e.code().to_string(),
            message: e.to_string(),
            retry_after_ms: e.retry_after_ms(),
        }
    }
}

impl From<ErrorBody> for Error {
    fn from(b: ErrorBody) -> Self {
        Error::from_code(&b.code, b.message, b.retry_after_ms)
    }
}

/// A response frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub id: Option<u64>,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl Response {
    pub fn ok(id: Option<u64>, result: Value) -> Response {
        Response {
            id,
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    pub fn err(id: Option<u64>, e: &Error) -> Response {
        Response {
            id,
            ok: false,
            result: None,
            error: Some(e.into()),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising these types cannot fail (string keys, no non-finite floats).
        serde_json::to_vec(self).unwrap_or_else(|_| b"{\"id\":null,\"ok\":false,\"error\":{\"code\":\"internal\",\"message\":\"response encoding failed\"}}".to_vec())
    }

    /// The result, or the error it carries.
    pub fn into_result(self) -> Result<Value, Error> {
        match (self.ok, self.result, self.error) {
            (true, Some(v), _) => Ok(v),
            (true, None, _) => Ok(Value::Null),
            (false, _, Some(e)) => Err(e.into()),
            (false, _, None) => Err(Error::Internal("error response without error".into())),
        }
    }
}

/// `hello` result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HelloResult {
    pub protocol: u32,
    pub agent_version: String,
    pub client: String,
    pub uid: u32,
    pub admin: bool,
}

/// One entry of `list_keys`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub key_type: String,
    pub backend: String,
    pub env: String,
    pub version: u32,
    pub fingerprint: String,
    pub disabled: bool,
    pub locked: bool,
    #[serde(default)]
    pub profiles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

/// `sign` result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SignResult {
    pub key: String,
    pub version: u32,
    pub scheme: String,
    /// Base64 of the native signature (secp256k1: r‖s‖v with v ∈ {27, 28}).
    pub signature: String,
    /// secp256k1 only: the 0x-hex digest that was signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// `public_key` result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PublicKeyResult {
    pub key: String,
    #[serde(rename = "type")]
    pub key_type: String,
    pub version: u32,
    pub format: String,
    pub fingerprint: String,
    pub public_key: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

/// One active lock.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LockInfo {
    /// `None` = every key.
    pub key: Option<String>,
    pub reason: Option<String>,
    pub since: String,
    pub by_uid: u32,
}

/// `status` result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusResult {
    pub agent_version: String,
    pub protocol: u32,
    pub pid: u32,
    pub uptime_ms: u64,
    pub socket: String,
    pub home: String,
    pub keys: usize,
    pub connections: usize,
    pub requests: u64,
    pub queue_depth: usize,
    pub workers: usize,
    pub dumpable: bool,
    /// Whether the agent's memory is locked against swapping (mlockall).
    #[serde(default)]
    pub memory_locked: bool,
    pub locks: Vec<LockInfo>,
    pub backends: Vec<BackendStatus>,
    /// The audit writer's state (absent from agents before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditStatus>,
    /// The agent's metrics in Prometheus text exposition format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditStatus {
    pub enabled: bool,
    /// False after a write failed, until one works again.
    pub available: bool,
    pub written: u64,
    /// Records that could not be written (fail-open keys kept signing).
    pub dropped: u64,
    /// Records handed to the writer and not yet durable.
    pub queued: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub kind: String,
    pub up: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_parsing() {
        let r = parse_request(br#"{"id":7,"op":"sign","key":"k1","data":"aGk="}"#).unwrap();
        assert_eq!(r.id, Some(7));
        assert!(matches!(r.op, Op::Sign { .. }));
        let cases: &[&[u8]] = &[
            b"\xff\xfe",
            b"{",
            b"[1,2]",
            br#"{"id":"x","op":"status"}"#,
            br#"{"id":-1,"op":"status"}"#,
            br#"{"id":1,"op":"nope"}"#,
            br#"{"id":1}"#,
            br#"{"id":1,"op":5}"#,
            br#"{"id":1,"op":"status","extra":1}"#,
            br#"{"id":1,"op":"sign","key":"k1","data":5}"#,
            br#"{"id":1,"op":"sign","key":"../x","data":""}"#,
            br#"{"id":1,"op":"sign","key":"k1"}"#,
        ];
        for c in cases {
            let e = parse_request(c).unwrap_err();
            assert_eq!(
                e.error.code(),
                "bad_request",
                "{}",
                String::from_utf8_lossy(c)
            );
        }
        let e = parse_request(br#"{"id":3,"op":"nope"}"#).unwrap_err();
        assert_eq!(e.id, Some(3));
        assert!(e.error.to_string().contains("unknown op"), "{}", e.error);
    }

    #[test]
    fn depth_limit_counts_only_structure() {
        let deep = format!("{}{}", "[".repeat(33), "]".repeat(33));
        assert!(json_depth_exceeds(deep.as_bytes(), 32));
        let ok = format!("{}{}", "[".repeat(32), "]".repeat(32));
        assert!(!json_depth_exceeds(ok.as_bytes(), 32));
        assert!(!json_depth_exceeds(
            br#"{"a":"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\"["}"#,
            2
        ));
    }
}
