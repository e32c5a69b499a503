//! Async client: cheap to clone, safe to call from many tasks at once; all calls share one
//! connection and responses are routed back by request id, in whatever order they arrive.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::model::KeyName;
use crate::proto::{frame, Op, Response, SignResult};

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>;

#[derive(Clone)]
pub struct AsyncClient {
    tx: mpsc::Sender<Vec<u8>>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
}

impl AsyncClient {
    pub async fn connect(path: &Path) -> Result<AsyncClient> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| super::unreachable(path, e))?;
        let (mut rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(1024);
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));

        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut buf = first;
                // Coalesce whatever else is queued into one write.
                while let Ok(more) = rx.try_recv() {
                    buf.extend_from_slice(&more);
                }
                if wr.write_all(&buf).await.is_err() {
                    break;
                }
            }
        });

        let p = pending.clone();
        tokio::spawn(async move {
            while let Ok(Some(body)) = frame::read_async(&mut rd).await {
                let Ok(resp) = serde_json::from_slice::<Response>(&body) else {
                    break;
                };
                if let Some(id) = resp.id {
                    let waiter = p.lock().ok().and_then(|mut m| m.remove(&id));
                    if let Some(w) = waiter {
                        let _ = w.send(resp);
                    }
                }
            }
            // Connection gone: fail every waiter (dropping the senders wakes them).
            if let Ok(mut m) = p.lock() {
                m.clear();
            }
        });

        Ok(AsyncClient {
            tx,
            pending,
            next_id: Arc::new(AtomicU64::new(1)),
        })
    }

    pub async fn call(&self, op: &Op) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut v = serde_json::to_value(op).map_err(|e| Error::Internal(e.to_string()))?;
        if let Value::Object(m) = &mut v {
            m.insert("id".into(), Value::from(id));
        }
        let body = serde_json::to_vec(&v).map_err(|e| Error::Internal(e.to_string()))?;
        let (otx, orx) = oneshot::channel();
        self.pending
            .lock()
            .map_err(|_| Error::Internal("client state poisoned".into()))?
            .insert(id, otx);
        if self.tx.send(frame::encode(&body)).await.is_err() {
            return Err(Error::AgentUnreachable(
                "connection to the agent is closed".into(),
            ));
        }
        let resp = orx
            .await
            .map_err(|_| Error::AgentUnreachable("the agent closed the connection".into()))?;
        resp.into_result()
    }

    pub async fn sign(
        &self,
        key: &KeyName,
        data: &[u8],
        scheme: Option<&str>,
    ) -> Result<SignResult> {
        let v = self.call(&super::sign_op(key, data, scheme)).await?;
        serde_json::from_value(v)
            .map_err(|e| Error::Internal(format!("unexpected sign result: {e}")))
    }
}
