//! Clients for the native protocol: a blocking one (CLI, scripts, simple bots) and an async
//! one that pipelines many requests over one connection and matches responses by id.

mod asynchronous;

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

pub use asynchronous::AsyncClient;

use crate::error::{Error, Result};
use crate::model::KeyName;
use crate::proto::{
    self, frame, HelloResult, KeyInfo, Op, PublicKeyResult, Response, SignResult, StatusResult,
};

/// A blocking connection to the agent.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: BufWriter<UnixStream>,
    next_id: u64,
    /// Responses that arrived for other ids while waiting for one (pipelining).
    early: HashMap<u64, Response>,
}

pub(crate) fn unreachable(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::AgentUnreachable(format!("cannot reach the agent at {}: {e}", path.display()))
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client> {
        let s = UnixStream::connect(path).map_err(|e| unreachable(path, e))?;
        let w = s.try_clone().map_err(|e| unreachable(path, e))?;
        Ok(Client {
            reader: BufReader::new(s),
            writer: BufWriter::new(w),
            next_id: 1,
            early: HashMap::new(),
        })
    }

    /// Bound how long a call may wait for the agent (default: forever).
    pub fn set_timeout(&self, t: Option<Duration>) -> Result<()> {
        self.reader
            .get_ref()
            .set_read_timeout(t)
            .and_then(|_| self.writer.get_ref().set_write_timeout(t))
            .map_err(|e| Error::io("setting socket timeout", e))
    }

    /// Send a request without waiting for its answer; returns its id.
    pub fn send(&mut self, op: &Op) -> Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let mut v = serde_json::to_value(op).map_err(|e| Error::Internal(e.to_string()))?;
        if let Value::Object(m) = &mut v {
            m.insert("id".into(), Value::from(id));
        }
        let body = serde_json::to_vec(&v).map_err(|e| Error::Internal(e.to_string()))?;
        frame::write_sync(&mut self.writer, &body)
            .map_err(|e| Error::AgentUnreachable(format!("sending request: {e}")))?;
        Ok(id)
    }

    /// Push buffered requests to the agent.
    pub fn flush(&mut self) -> Result<()> {
        self.writer
            .flush()
            .map_err(|e| Error::AgentUnreachable(format!("sending request: {e}")))
    }

    /// Read the next response, whatever its id.
    pub fn recv(&mut self) -> Result<Response> {
        self.flush()?;
        let body = match frame::read_sync(&mut self.reader) {
            Ok(Some(b)) => b,
            Ok(None) => {
                return Err(Error::AgentUnreachable(
                    "the agent closed the connection".into(),
                ))
            }
            Err(e) => return Err(Error::AgentUnreachable(format!("reading response: {e}"))),
        };
        serde_json::from_slice(&body)
            .map_err(|e| Error::Internal(format!("malformed response: {e}")))
    }

    /// Wait for the response to `id` (answers to other ids are kept for later).
    pub fn wait(&mut self, id: u64) -> Result<Value> {
        if let Some(r) = self.early.remove(&id) {
            return r.into_result();
        }
        loop {
            let r = self.recv()?;
            match r.id {
                Some(got) if got == id => return r.into_result(),
                Some(other) => {
                    self.early.insert(other, r);
                }
                // An id-less answer is the agent rejecting a frame it could not parse.
                None => return r.into_result(),
            }
        }
    }

    pub fn call(&mut self, op: &Op) -> Result<Value> {
        let id = self.send(op)?;
        self.wait(id)
    }

    fn call_typed<T: DeserializeOwned>(&mut self, op: &Op) -> Result<T> {
        let v = self.call(op)?;
        serde_json::from_value(v)
            .map_err(|e| Error::Internal(format!("unexpected {} result: {e}", op.name())))
    }

    pub fn hello(&mut self, token: Option<String>) -> Result<HelloResult> {
        self.call_typed(&Op::Hello {
            version: Some(proto::PROTOCOL_VERSION),
            token,
        })
    }

    pub fn list_keys(&mut self) -> Result<Vec<KeyInfo>> {
        #[derive(serde::Deserialize)]
        struct R {
            keys: Vec<KeyInfo>,
        }
        Ok(self.call_typed::<R>(&Op::ListKeys {})?.keys)
    }

    pub fn public_key(&mut self, key: &KeyName, format: &str) -> Result<PublicKeyResult> {
        self.call_typed(&Op::PublicKey {
            key: key.clone(),
            format: Some(format.into()),
        })
    }

    /// Sign raw bytes; `scheme` defaults by key type.
    pub fn sign(&mut self, key: &KeyName, data: &[u8], scheme: Option<&str>) -> Result<SignResult> {
        self.call_typed(&sign_op(key, data, scheme))
    }

    /// Sign with a named version of the key (current, or in its grace period after a rotation).
    pub fn sign_version(
        &mut self,
        key: &KeyName,
        data: &[u8],
        scheme: Option<&str>,
        version: u32,
    ) -> Result<SignResult> {
        let mut op = sign_op(key, data, scheme);
        if let Op::Sign { version: v, .. } = &mut op {
            *v = Some(version);
        }
        self.call_typed(&op)
    }

    /// Sign an exchange request with a profile; returns the profile's output object.
    pub fn sign_request(&mut self, key: &KeyName, profile: &str, request: Value) -> Result<Value> {
        self.call(&Op::SignRequest {
            key: key.clone(),
            profile: profile.to_string(),
            request,
            version: None,
        })
    }

    pub fn status(&mut self) -> Result<StatusResult> {
        self.call_typed(&Op::Status {})
    }
}

pub(crate) fn sign_op(key: &KeyName, data: &[u8], scheme: Option<&str>) -> Op {
    use base64::Engine;
    Op::Sign {
        key: key.clone(),
        data: base64::engine::general_purpose::STANDARD.encode(data),
        scheme: scheme.map(str::to_owned),
        version: None,
    }
}
