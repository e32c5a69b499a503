//! The tamper-evident audit log (ARCHITECTURE §7): hash-chained JSON lines, group-committed by
//! the agent, appended under a lock by CLI admin commands, verified and queried by `keyward audit`.

pub mod file;
pub mod query;
pub mod record;
pub mod verify;
pub mod writer;

pub use record::{sha256_hex, ClientInfo, Record};
pub use writer::{AuditLog, Observer};

use crate::config::Config;
use crate::home::Home;
use crate::model::ClientIdentity;

/// Record an admin action taken by the CLI itself (key generate, import, rotate, …) as the
/// invoking user. A log that cannot be written fails the command: an unrecorded admin action
/// is what the log exists to prevent.
pub fn admin(
    home: &Home,
    op: &str,
    key: Option<&str>,
    version: Option<u32>,
    reason: Option<String>,
) -> crate::Result<()> {
    let cfg = Config::load(&home.config_path())?;
    if !cfg.audit.enabled {
        return Ok(());
    }
    let mut r = Record::new("admin");
    r.client = Some(cli_client());
    r.op = Some(op.to_string());
    r.key = key.map(str::to_string);
    r.version = version;
    r.decision = Some("allow".into());
    r.reason = reason;
    file::append_once(&home.audit_dir(), cfg.audit.max_file_bytes, &mut [r])
}

/// The CLI process as a client of the log.
fn cli_client() -> ClientInfo {
    let uid = crate::sys::effective_uid();
    ClientInfo {
        name: format!("cli:uid:{uid}"),
        uid,
        pid: i32::try_from(std::process::id()).ok(),
        exe: std::env::current_exe()
            .ok()
            .map(|p| p.display().to_string()),
    }
}

/// A connected peer as a client of the log.
pub fn client_info(who: &ClientIdentity, name: Option<&str>) -> ClientInfo {
    ClientInfo {
        name: name.unwrap_or(&who.name).to_string(),
        uid: who.uid,
        pid: who.pid,
        exe: who.exe.clone(),
    }
}
