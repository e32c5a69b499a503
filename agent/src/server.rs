//! The local-socket front end: socket placement and permissions, SO_PEERCRED on every
//! connection, pipelined request handling with bounded in-flight work, graceful drain.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use keyward::error::IoContext;
use keyward::model::ClientIdentity;
use keyward::proto::{self, frame, FrameError, Response};
use keyward::{Error, Result};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;

use super::dispatch::State;

/// How long an unauthorised peer may take to send its first frame before we hang up.
const UNAUTHORIZED_GRACE: Duration = Duration::from_secs(2);

/// Create the socket's directory if needed, check it, and bind. Refuses a world-writable or
/// foreign-owned directory, and a socket path another live agent is serving.
pub fn bind(path: &Path) -> Result<UnixListener> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| Error::Config(format!("socket path {} has no directory", path.display())))?;
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .ctx(format!("creating {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .ctx(format!("chmod {}", dir.display()))?;
    }
    let md = fs::symlink_metadata(dir).ctx(format!("reading {}", dir.display()))?;
    let me = keyward::sys::effective_uid();
    if !md.file_type().is_dir() {
        return Err(Error::InsecurePermissions(format!(
            "socket directory {} is not a directory",
            dir.display()
        )));
    }
    if md.uid() != me {
        return Err(Error::InsecurePermissions(format!(
            "socket directory {} is owned by uid {}, not by the agent's user (uid {me})",
            dir.display(),
            md.uid()
        )));
    }
    if md.mode() & 0o022 != 0 {
        return Err(Error::InsecurePermissions(format!(
            "socket directory {} is writable by group or others (mode {:04o}); run `chmod 700 {}`",
            dir.display(),
            md.mode() & 0o7777,
            dir.display()
        )));
    }
    if let Ok(existing) = fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !existing.file_type().is_socket() {
            return Err(Error::AlreadyExists(format!(
                "{} exists and is not a socket; remove it or choose another path",
                path.display()
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::AlreadyExists(format!(
                "another agent is already listening on {}",
                path.display()
            )));
        }
        fs::remove_file(path).ctx(format!("removing stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).ctx(format!("binding {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o660))
        .ctx(format!("chmod {}", path.display()))?;
    Ok(listener)
}

/// Accept connections until `shutdown` flips, then wait for open connections to finish their
/// in-flight requests (bounded by `drain`).
pub async fn serve(
    listener: UnixListener,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let max = state.config().agent.max_connections;
    let slots = Arc::new(Semaphore::new(max));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    tracing::warn!(max, "connection limit reached; closing a new connection");
                    drop(stream);
                    continue;
                };
                let state = state.clone();
                let stop = shutdown.clone();
                conns.spawn(async move {
                    state.connections.fetch_add(1, Ordering::Relaxed);
                    connection(stream, state.clone(), stop).await;
                    state.connections.fetch_sub(1, Ordering::Relaxed);
                    drop(permit);
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    let _ = fs::remove_file(&state.socket);
    let waited =
        tokio::time::timeout(drain, async { while conns.join_next().await.is_some() {} }).await;
    if waited.is_err() {
        tracing::warn!("drain timed out; closing remaining connections");
        conns.abort_all();
    }
}

fn identify(stream: &UnixStream) -> Option<ClientIdentity> {
    let cred = stream.peer_cred().ok()?;
    let pid = cred.pid();
    let exe = pid
        .and_then(|p| fs::read_link(format!("/proc/{p}/exe")).ok())
        .map(|p| p.display().to_string());
    Some(ClientIdentity {
        name: format!("uid:{}", cred.uid()),
        uid: cred.uid(),
        gid: cred.gid(),
        pid,
        exe,
    })
}

async fn connection(stream: UnixStream, state: Arc<State>, mut stop: watch::Receiver<bool>) {
    let Some(who) = identify(&stream) else {
        tracing::warn!("connection without peer credentials; closing");
        return;
    };
    let (rd, mut wr) = stream.into_split();
    // Buffered: one read() usually brings a whole frame, or several pipelined ones.
    let mut rd = tokio::io::BufReader::with_capacity(16 * 1024, rd);
    if !state.admits(who.uid) {
        tracing::warn!(uid = who.uid, pid = ?who.pid, exe = ?who.exe, "refused connection from another user");
        let id = match tokio::time::timeout(UNAUTHORIZED_GRACE, frame::read_async(&mut rd)).await {
            Ok(Ok(Some(body))) => peek_id(&body),
            _ => None,
        };
        let e = Error::Unauthorized(format!("uid {} may not use this agent", who.uid));
        let _ = wr
            .write_all(&frame::encode(&Response::err(id, &e).to_bytes()))
            .await;
        return;
    }
    let window = state.config().agent.max_in_flight;
    let in_flight = Arc::new(Semaphore::new(window));
    // Bounded like the in-flight window, and a request's slot is held until its answer is
    // queued: a client that stops reading stalls only itself, never the agent's memory.
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(window);

    let writer = tokio::spawn(async move {
        let mut buf = Vec::with_capacity(8192);
        while let Some(first) = rx.recv().await {
            buf.clear();
            buf.extend_from_slice(&first);
            // Coalesce responses that are already waiting into one write.
            while let Ok(more) = rx.try_recv() {
                buf.extend_from_slice(&more);
                if buf.len() > 256 * 1024 {
                    break;
                }
            }
            if wr.write_all(&buf).await.is_err() {
                break;
            }
        }
    });

    let who = Arc::new(who);
    loop {
        let body = tokio::select! {
            r = frame::read_async(&mut rd) => r,
            _ = stop.changed() => break,
        };
        let body = match body {
            Ok(Some(b)) => b,
            Ok(None) => break,
            Err(FrameError::TooLarge(n)) => {
                let e = Error::TooLarge(format!(
                    "frame of {n} bytes exceeds the {}-byte limit",
                    proto::MAX_FRAME
                ));
                let _ = tx
                    .send(frame::encode(&Response::err(None, &e).to_bytes()))
                    .await;
                break;
            }
            Err(FrameError::Truncated) | Err(FrameError::Io(_)) => break,
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let req = match proto::parse_request(&body) {
            Ok(r) => r,
            Err(rej) => {
                tracing::debug!(uid = who.uid, code = rej.error.code(), "rejected frame");
                let _ = tx
                    .send(frame::encode(&Response::err(rej.id, &rej.error).to_bytes()))
                    .await;
                drop(permit);
                continue;
            }
        };
        let state = state.clone();
        let tx = tx.clone();
        let who = who.clone();
        tokio::spawn(async move {
            let op_name = req.op.name();
            let resp = match state.handle(&who, req.op).await {
                Ok(v) => Response::ok(req.id, v),
                Err(e) => {
                    tracing::info!(uid = who.uid, pid = ?who.pid, op = op_name, code = e.code(), "request failed: {e}");
                    Response::err(req.id, &e)
                }
            };
            let _ = tx.send(frame::encode(&resp.to_bytes())).await;
            drop(permit);
        });
    }
    // Let in-flight requests of this connection finish and flush their answers.
    let _ = in_flight.acquire_many(window as u32).await;
    drop(tx);
    let _ = writer.await;
}

/// Best-effort id of a frame we are going to refuse anyway.
fn peek_id(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()?
        .get("id")?
        .as_u64()
}
