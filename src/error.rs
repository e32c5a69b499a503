//! The one error type of keyward: every failure is a variant with a stable `code()`.
//! Codes are part of the protocol and the CLI contract; messages never carry secrets.

use std::fmt;

/// Every error keyward can report. The string returned by [`Error::code`] is stable.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("unknown key `{0}`")]
    UnknownKey(String),
    #[error("unknown profile `{0}`")]
    UnknownProfile(String),
    #[error("{0}")]
    PolicyDenied(String),
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after_ms: u64,
    },
    #[error("{0}")]
    Locked(String),
    #[error("key `{0}` is disabled")]
    KeyDisabled(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    BackendUnavailable(String),
    #[error("{0}")]
    AuditUnavailable(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    InsecurePermissions(String),
    #[error("{0}")]
    BadPassphrase(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    NotInitialized(String),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    InvalidKeyMaterial(String),
    #[error("{0}")]
    AgentUnreachable(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The stable, machine-readable code of this error (see docs/protocol.md).
    pub fn code(&self) -> &'static str {
        match self {
            Error::BadRequest(_) => "bad_request",
            Error::TooLarge(_) => "too_large",
            Error::Unauthorized(_) => "unauthorized",
            Error::Forbidden(_) => "forbidden",
            Error::UnknownKey(_) => "unknown_key",
            Error::UnknownProfile(_) => "unknown_profile",
            Error::PolicyDenied(_) => "policy_denied",
            Error::RateLimited { .. } => "rate_limited",
            Error::Locked(_) => "locked",
            Error::KeyDisabled(_) => "key_disabled",
            Error::Busy(_) => "busy",
            Error::BackendUnavailable(_) => "backend_unavailable",
            Error::AuditUnavailable(_) => "audit_unavailable",
            Error::Unsupported(_) => "unsupported",
            Error::InsecurePermissions(_) => "insecure_permissions",
            Error::BadPassphrase(_) => "bad_passphrase",
            Error::AlreadyExists(_) => "already_exists",
            Error::NotInitialized(_) => "not_initialized",
            Error::Config(_) => "config",
            Error::InvalidKeyMaterial(_) => "invalid_key_material",
            Error::AgentUnreachable(_) => "agent_unreachable",
            Error::Io { .. } => "io",
            Error::Internal(_) => "internal",
        }
    }

    /// Build an error from a wire code and message (client side). Unknown codes become
    /// `internal` so a newer agent never breaks an older client.
    pub fn from_code(code: &str, message: String, retry_after_ms: Option<u64>) -> Error {
        match code {
            "bad_request" => Error::BadRequest(message),
            "too_large" => Error::TooLarge(message),
            "unauthorized" => Error::Unauthorized(message),
            "forbidden" => Error::Forbidden(message),
            "unknown_key" => Error::UnknownKey(strip_quoted(&message)),
            "unknown_profile" => Error::UnknownProfile(strip_quoted(&message)),
            "policy_denied" => Error::PolicyDenied(message),
            "rate_limited" => Error::RateLimited {
                message,
                retry_after_ms: retry_after_ms.unwrap_or(0),
            },
            "locked" => Error::Locked(message),
            "key_disabled" => Error::KeyDisabled(strip_quoted(&message)),
            "busy" => Error::Busy(message),
            "backend_unavailable" => Error::BackendUnavailable(message),
            "audit_unavailable" => Error::AuditUnavailable(message),
            "unsupported" => Error::Unsupported(message),
            "insecure_permissions" => Error::InsecurePermissions(message),
            "bad_passphrase" => Error::BadPassphrase(message),
            "already_exists" => Error::AlreadyExists(message),
            "not_initialized" => Error::NotInitialized(message),
            "config" => Error::Config(message),
            "invalid_key_material" => Error::InvalidKeyMaterial(message),
            _ => Error::Internal(message),
        }
    }

    /// Seconds-free retry hint carried by `rate_limited`.
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            Error::RateLimited { retry_after_ms, .. } => Some(*retry_after_ms),
            _ => None,
        }
    }

    /// A one-line suggestion printed by the CLI under the error.
    pub fn hint(&self) -> &'static str {
        match self {
            Error::BadRequest(_) => "check the arguments (socket clients: docs/protocol.md)",
            Error::TooLarge(_) => "frames are limited to 1 MiB",
            Error::Unauthorized(_) => {
                "connect as the agent's user (or root), or ask an operator to add a client"
            }
            Error::Forbidden(_) => "admin operations need an admin client; raw signing of a profile-bound key needs allow_raw (see `keyward policy explain`)",
            Error::UnknownKey(_) => "run `keyward key list` to see the keys this home holds",
            Error::UnknownProfile(_) => "see docs/profiles.md for the profile names",
            Error::PolicyDenied(_) => "see `keyward policy explain`",
            Error::RateLimited { .. } => "retry after the given delay",
            Error::Locked(_) => "an operator locked signing; `keyward unlock` lifts it",
            Error::KeyDisabled(_) => "`keyward key enable NAME` re-enables it",
            Error::Busy(_) => "the agent's signing queue is full; retry shortly",
            Error::BackendUnavailable(_) => "check the device or token, then retry",
            Error::AuditUnavailable(_) => "free space or fix permissions of the audit directory",
            Error::Unsupported(_) => {
                "choose another key type or scheme (docs/keys-and-backends.md)"
            }
            Error::InsecurePermissions(_) => {
                "chmod 600 files and 700 directories, owned by the agent user"
            }
            Error::BadPassphrase(_) => {
                "check the passphrase source (env:NAME, file:PATH or the prompt)"
            }
            Error::AlreadyExists(_) => "choose another name, or delete the existing one first",
            Error::NotInitialized(_) => "run `keyward init` first (or pass --home)",
            Error::Config(_) => "fix keyward.toml at the reported line and column",
            Error::InvalidKeyMaterial(_) => "check the key file format (docs/keys-and-backends.md)",
            Error::AgentUnreachable(_) => "start it with `keyward agent`, or set KEYWARD_SOCK",
            Error::Io { .. } => "check the path and its permissions",
            Error::Internal(_) => "this is a bug; the agent log has details",
        }
    }

    pub fn io(context: impl fmt::Display, source: std::io::Error) -> Error {
        Error::Io {
            context: context.to_string(),
            source,
        }
    }
}

fn strip_quoted(message: &str) -> String {
    match (message.find('`'), message.rfind('`')) {
        (Some(a), Some(b)) if b > a => message[a + 1..b].to_string(),
        _ => message.to_string(),
    }
}

/// Attach a path or action to an `io::Error`.
pub trait IoContext<T> {
    fn ctx(self, context: impl fmt::Display) -> Result<T>;
}

impl<T> IoContext<T> for std::result::Result<T, std::io::Error> {
    fn ctx(self, context: impl fmt::Display) -> Result<T> {
        self.map_err(|e| Error::io(context, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_the_wire_form() {
        let all = [
            Error::BadRequest("x".into()),
            Error::TooLarge("x".into()),
            Error::Unauthorized("x".into()),
            Error::Forbidden("x".into()),
            Error::UnknownKey("k".into()),
            Error::UnknownProfile("p".into()),
            Error::PolicyDenied("x".into()),
            Error::RateLimited {
                message: "x".into(),
                retry_after_ms: 5,
            },
            Error::Locked("x".into()),
            Error::KeyDisabled("k".into()),
            Error::Busy("x".into()),
            Error::BackendUnavailable("x".into()),
            Error::AuditUnavailable("x".into()),
            Error::Unsupported("x".into()),
            Error::InsecurePermissions("x".into()),
            Error::BadPassphrase("x".into()),
            Error::AlreadyExists("x".into()),
            Error::NotInitialized("x".into()),
            Error::Config("x".into()),
            Error::InvalidKeyMaterial("x".into()),
        ];
        for e in all {
            let back = Error::from_code(e.code(), e.to_string(), e.retry_after_ms());
            assert_eq!(back.code(), e.code());
            assert_eq!(back.retry_after_ms(), e.retry_after_ms());
        }
        assert_eq!(
            Error::from_code("unknown_key", "unknown key `abc`".into(), None).to_string(),
            "unknown key `abc`"
        );
    }
}
