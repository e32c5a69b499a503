//! The native wire protocol: 4-byte big-endian length + one UTF-8 JSON object per frame.
//! docs/protocol.md is the normative description; this module is its only implementation.

pub mod frame;
pub mod message;

use std::path::{Path, PathBuf};

pub use frame::{FrameError, MAX_FRAME};
pub use message::*;

/// Protocol version spoken by this build (`hello` reports it).
pub const PROTOCOL_VERSION: u32 = 1;

/// The socket path: `$KEYWARD_SOCK`, else the configured one, else
/// `$XDG_RUNTIME_DIR/keyward/agent.sock`, else `<home>/run/agent.sock`.
pub fn socket_path(configured: Option<&Path>, home_root: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("KEYWARD_SOCK").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = configured {
        return p.to_path_buf();
    }
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        return Path::new(&x).join("keyward").join("agent.sock");
    }
    home_root.join("run").join("agent.sock")
}
