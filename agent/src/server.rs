//! The local-socket front end: socket placement and permissions, SO_PEERCRED on every
//! connection, pipelined request handling with bounded in-flight work, graceful drain.

use std::collections::VecDeque;
use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use keyward::error::IoContext;
use keyward::model::ClientIdentity;
use keyward::proto::frame::{self, Buffered};
use keyward::proto::{self, Response};
use keyward::{Error, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;

use super::dispatch::{Deferred, Reply, State};
use super::pool;

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
        token_sha256: Default::default(),
    })
}

async fn connection(stream: UnixStream, state: Arc<State>, mut stop: watch::Receiver<bool>) {
    let Some(who) = identify(&stream) else {
        tracing::warn!("connection without peer credentials; closing");
        return;
    };
    let (mut rd, mut wr) = stream.into_split();
    if !state.admits(who.uid, who.gid) {
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
    let who = Arc::new(who);
    let window = state.config().agent.max_in_flight;
    // Only requests that wait for a worker (slow signing) leave this task; they hold a slot of
    // the window until their answer is queued, so a client that stops reading stalls only
    // itself and the agent's memory for it stays bounded (docs/decisions.md D9).
    let in_flight = Arc::new(Semaphore::new(window));
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(window);
    let mut inbuf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut outbuf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut chunk = vec![0u8; 16 * 1024];
    let mut closing = false;
    // A duplicate of the socket for the device watchdog (pool.rs), made at the first need.
    let mut dup = None;
    // Fail-closed signatures waiting for their audit records, oldest first (tickets rise).
    let mut held: VecDeque<Held> = VecDeque::new();
    let mut durable = state.audit.watch();

    'conn: loop {
        // Answer every complete frame already buffered. Fast requests are handled right here:
        // no task hand-off, so a round trip costs no extra thread wake-ups.
        let mut consumed = 0;
        while !closing {
            match frame::buffered(&inbuf[consumed..]) {
                Buffered::Complete(len) => {
                    let body = &inbuf[consumed + 4..consumed + 4 + len];
                    consumed += 4 + len;
                    match proto::parse_request(body) {
                        Err(rej) => {
                            tracing::debug!(
                                uid = who.uid,
                                code = rej.error.code(),
                                "rejected frame"
                            );
                            push(&mut outbuf, &Response::err(rej.id, &rej.error));
                        }
                        Ok(req) if state.is_slow(&req.op) => {
                            let lone = outbuf.is_empty()
                                && !matches!(
                                    frame::buffered(&inbuf[consumed..]),
                                    Buffered::Complete(_)
                                );
                            if lone {
                                // Nothing else buffered, no answer waiting to be written: this
                                // task answers the request itself, so a token signature with
                                // an idle session needs no hand-off to a worker thread and back
                                // (pool.rs `Pool::sign_here`); otherwise it waits for the pool
                                // here, bounded by the queue and the device timeout.
                                let resp = match watchdog_socket(&mut dup, &rd) {
                                    Some(socket) => {
                                        let lone = pool::Answer { id: req.id, socket };
                                        pool::LONE.scope(lone, answer(&state, &who, req)).await
                                    }
                                    None => answer(&state, &who, req).await,
                                };
                                push(&mut outbuf, &resp);
                                continue;
                            }
                            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                                break 'conn;
                            };
                            let (state, tx, who) = (state.clone(), tx.clone(), who.clone());
                            tokio::spawn(async move {
                                let resp = answer(&state, &who, req).await;
                                let _ = tx.send(frame::encode(&resp.to_bytes())).await;
                                drop(permit);
                            });
                        }
                        Ok(req) => {
                            let id = req.id;
                            let op_name = req.op.name();
                            match state.handle_reply(&who, req.op).await {
                                Reply::Ready(r) => {
                                    push(&mut outbuf, &response(&who, id, op_name, r))
                                }
                                Reply::AfterAudit(d) => held.push_back(Held {
                                    id,
                                    op: op_name,
                                    deadline: tokio::time::Instant::now() + state.audit.timeout(),
                                    deferred: d,
                                }),
                            }
                        }
                    }
                }
                Buffered::Partial => break,
                Buffered::TooLarge(n) => {
                    let e = Error::TooLarge(format!(
                        "frame of {n} bytes exceeds the {}-byte limit",
                        proto::MAX_FRAME
                    ));
                    push(&mut outbuf, &Response::err(None, &e));
                    closing = true;
                }
            }
        }
        inbuf.drain(..consumed);
        release(&state, &who, &mut held, &mut outbuf, false);
        while let Ok(more) = rx.try_recv() {
            outbuf.extend_from_slice(&more);
        }
        if !outbuf.is_empty() {
            if wr.write_all(&outbuf).await.is_err() {
                break;
            }
            outbuf.clear();
        }
        if closing {
            break;
        }
        let next_deadline = held.front().map(|h| h.deadline);
        tokio::select! {
            // Records became durable (or failed): answers held for them can go.
            r = durable.changed(), if !held.is_empty() => if r.is_err() {
                release(&state, &who, &mut held, &mut outbuf, true);
            },
            () = tokio::time::sleep_until(next_deadline.unwrap_or_else(tokio::time::Instant::now)), if next_deadline.is_some() => {
                release(&state, &who, &mut held, &mut outbuf, false);
            },
            // Reading is cancel-safe: bytes land in `inbuf` only when a read completes.
            r = rd.read(&mut chunk) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => inbuf.extend_from_slice(&chunk[..n]),
            },
            Some(answer) = rx.recv() => outbuf.extend_from_slice(&answer),
            _ = stop.changed() => break,
        }
    }
    // Answers held for their audit records are delivered (or refused) before closing.
    while !held.is_empty() {
        let deadline = held.front().map(|h| h.deadline);
        tokio::select! {
            r = durable.changed() => if r.is_err() {
                release(&state, &who, &mut held, &mut outbuf, true);
            },
            () = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)) => {},
        }
        release(&state, &who, &mut held, &mut outbuf, false);
    }
    if !outbuf.is_empty() {
        let _ = wr.write_all(&outbuf).await;
    }
    // Let requests still at a worker finish and deliver their answers before closing.
    drop(tx);
    while let Some(answer) = rx.recv().await {
        if wr.write_all(&answer).await.is_err() {
            break;
        }
    }
}

/// The connection's socket as the device watchdog writes to it: a duplicate descriptor, made
/// once per connection (`None` if the process is out of descriptors).
fn watchdog_socket(
    dup: &mut Option<Arc<std::os::unix::net::UnixStream>>,
    rd: &tokio::net::unix::OwnedReadHalf,
) -> Option<Arc<std::os::unix::net::UnixStream>> {
    if dup.is_none() {
        *dup = rd
            .as_ref()
            .as_fd()
            .try_clone_to_owned()
            .ok()
            .map(|fd| Arc::new(fd.into()));
    }
    dup.clone()
}

/// A fail-closed signature waiting for its audit record.
struct Held {
    id: Option<u64>,
    op: &'static str,
    deadline: tokio::time::Instant,
    deferred: Deferred,
}

/// Move every held answer whose record's fate is known (or whose wait is over) to `out`.
/// `stopped`: the audit writer is gone; nothing more will become durable.
fn release(
    state: &State,
    who: &ClientIdentity,
    held: &mut VecDeque<Held>,
    out: &mut Vec<u8>,
    stopped: bool,
) {
    let now = tokio::time::Instant::now();
    // Tickets rise along the queue, so the first one still in progress ends the scan — except
    // that expired waits further on are answered too.
    let mut i = 0;
    while i < held.len() {
        let outcome = match state.audit.outcome(held[i].deferred.ticket) {
            Some(o) => o,
            None if stopped || held[i].deadline <= now => Err(state.audit.timed_out()),
            None => {
                i += 1;
                continue;
            }
        };
        if let Some(h) = held.remove(i) {
            let r = state.settle(h.deferred, outcome);
            push(out, &response(who, h.id, h.op, r));
        }
    }
}

fn response(
    who: &ClientIdentity,
    id: Option<u64>,
    op_name: &str,
    r: Result<serde_json::Value>,
) -> Response {
    match r {
        Ok(v) => Response::ok(id, v),
        Err(e) => {
            tracing::info!(uid = who.uid, pid = ?who.pid, op = op_name, code = e.code(), "request failed: {e}");
            Response::err(id, &e)
        }
    }
}

fn push(out: &mut Vec<u8>, resp: &Response) {
    frame::encode_into(out, &resp.to_bytes());
}

async fn answer(state: &State, who: &ClientIdentity, req: proto::Request) -> Response {
    let op_name = req.op.name();
    response(who, req.id, op_name, state.handle(who, req.op).await)
}

/// Best-effort id of a frame we are going to refuse anyway.
fn peek_id(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()?
        .get("id")?
        .as_u64()
}
