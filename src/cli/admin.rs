//! Agent administration through the socket: `status`, `lock`, `unlock`, `reload`.
//! Locks persist in the agent's state directory and survive restarts.

use keyward::model::KeyName;
use keyward::proto::Op;
use keyward::{Error, Result};

use super::Ctx;

#[derive(clap::Args)]
pub struct LockArgs {
    /// Lock only this key.
    #[arg(long, conflicts_with = "all", required_unless_present = "all")]
    key: Option<KeyName>,
    /// Lock every key (the kill switch).
    #[arg(long)]
    all: bool,
    /// Why (shown by `status` and in errors).
    #[arg(long, value_name = "TEXT")]
    reason: Option<String>,
}

#[derive(clap::Args)]
pub struct UnlockArgs {
    /// Unlock only this key.
    #[arg(long, conflicts_with = "all", required_unless_present = "all")]
    key: Option<KeyName>,
    /// Remove every lock.
    #[arg(long)]
    all: bool,
}

pub fn status(ctx: &Ctx) -> Result<()> {
    let st = ctx.connect()?.status()?;
    let v = serde_json::to_value(&st).map_err(|e| Error::Internal(e.to_string()))?;
    ctx.emit(&v, || {
        let mut s = format!(
            "keyward agent {} (pid {}), up {}s\n  socket:      {}\n  home:        {}\n  keys:        {}\n  connections: {}\n  requests:    {}\n  queue:       {} (workers {})\n  dumpable:    {}\n  mem locked:  {}",
            st.agent_version,
            st.pid,
            st.uptime_ms / 1000,
            st.socket,
            st.home,
            st.keys,
            st.connections,
            st.requests,
            st.queue_depth,
            st.workers,
            st.dumpable,
            st.memory_locked
        );
        if st.locks.is_empty() {
            s.push_str("\n  locks:       none");
        }
        for l in &st.locks {
            s.push_str(&format!(
                "\n  LOCKED:      {} since {} by uid {}{}",
                l.key.as_deref().map(|k| format!("key {k}")).unwrap_or_else(|| "all keys".into()),
                l.since,
                l.by_uid,
                l.reason.as_deref().map(|r| format!(" — {r}")).unwrap_or_default()
            ));
        }
        for b in &st.backends {
            s.push_str(&format!("\n  backend {}: {}", b.kind, if b.up { "up" } else { "DOWN" }));
        }
        s
    });
    Ok(())
}

pub fn lock(ctx: &Ctx, a: LockArgs) -> Result<()> {
    let v = ctx.connect()?.call(&Op::Lock {
        key: a.key.clone(),
        all: a.all,
        reason: a.reason,
    })?;
    ctx.emit(&v, || match &a.key {
        Some(k) => format!("key {k} locked"),
        None => "all signing locked".into(),
    });
    Ok(())
}

pub fn unlock(ctx: &Ctx, a: UnlockArgs) -> Result<()> {
    let v = ctx.connect()?.call(&Op::Unlock {
        key: a.key.clone(),
        all: a.all,
    })?;
    ctx.emit(&v, || match &a.key {
        Some(k) => format!("key {k} unlocked"),
        None => "all locks removed".into(),
    });
    Ok(())
}

pub fn reload(ctx: &Ctx) -> Result<()> {
    let v = ctx.connect()?.call(&Op::Reload {})?;
    let n = v.get("keys").and_then(|k| k.as_u64()).unwrap_or(0);
    ctx.emit(&v, || format!("agent reloaded: {n} keys"));
    Ok(())
}
