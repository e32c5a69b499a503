//! Pipelined load: clients that each keep N requests in flight on one connection (how a busy
//! trading process uses the agent), plus a scraper timing `GET /metrics` under that load.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::model::KeyName;
use crate::proto::Op;

/// Not counted: each client's first requests while connections and caches warm up.
const WARM_UP: Duration = Duration::from_millis(200);

/// `clients` connections to `sock`, each keeping `in_flight` `sign` requests for `key` in
/// flight for `duration`. Any error answer fails the run (a benchmark of failures is void).
/// Returns every measured latency (ns) and the measured wall time.
pub fn run(
    sock: &Path,
    key: &KeyName,
    clients: usize,
    in_flight: usize,
    duration: Duration,
) -> Result<(Vec<u64>, Duration)> {
    let started = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let sock: PathBuf = sock.to_path_buf();
            let key = key.clone();
            std::thread::spawn(move || one_client(&sock, &key, c, in_flight, duration))
        })
        .collect();
    let mut latencies = Vec::new();
    for h in handles {
        let mut l = h
            .join()
            .map_err(|_| Error::Internal("a benchmark client panicked".into()))??;
        latencies.append(&mut l);
    }
    Ok((latencies, started.elapsed().saturating_sub(WARM_UP)))
}

fn one_client(
    sock: &Path,
    key: &KeyName,
    client: usize,
    in_flight: usize,
    duration: Duration,
) -> Result<Vec<u64>> {
    let mut c = Client::connect(sock)?;
    c.set_timeout(Some(Duration::from_secs(30)))?;
    let start = Instant::now();
    let measure_from = start + WARM_UP;
    let end = measure_from + duration;
    let mut sent: HashMap<u64, Instant> = HashMap::with_capacity(in_flight * 2);
    let mut latencies = Vec::new();
    let mut n: u64 = 0;
    let mut send = |c: &mut Client, sent: &mut HashMap<u64, Instant>| -> Result<()> {
        n += 1;
        let mut data = [0u8; 100];
        data[..8].copy_from_slice(&n.to_be_bytes());
        data[8] = u8::try_from(client % 256).unwrap_or(0);
        let id = c.send(&Op::Sign {
            key: key.clone(),
            data: STANDARD.encode(data),
            scheme: None,
            version: None,
        })?;
        sent.insert(id, Instant::now());
        Ok(())
    };
    for _ in 0..in_flight {
        send(&mut c, &mut sent)?;
    }
    c.flush()?;
    while !sent.is_empty() {
        let r = c.recv()?;
        let at = Instant::now();
        let id =
            r.id.ok_or_else(|| Error::Internal("an answer without id".into()))?;
        let t0 = sent
            .remove(&id)
            .ok_or_else(|| Error::Internal(format!("an answer to unknown id {id}")))?;
        r.into_result()?;
        if t0 >= measure_from && at <= end {
            latencies.push(u64::try_from(at.duration_since(t0).as_nanos()).unwrap_or(u64::MAX));
        }
        if at < end {
            send(&mut c, &mut sent)?;
            c.flush()?;
        }
    }
    Ok(latencies)
}

/// Time `GET /metrics` on `addr` every `every` until `until`; latencies in ns.
pub fn scrape(addr: &str, every: Duration, until: Instant) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    while Instant::now() < until {
        let t0 = Instant::now();
        let mut s =
            TcpStream::connect(addr).map_err(|e| Error::io(format!("connecting to {addr}"), e))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| Error::io("socket timeout", e))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .map_err(|e| Error::io("sending the scrape", e))?;
        let mut body = Vec::new();
        s.read_to_end(&mut body)
            .map_err(|e| Error::io("reading the scrape", e))?;
        if !body.starts_with(b"HTTP/1.1 200") {
            return Err(Error::Internal(
                "the metrics listener did not answer 200".into(),
            ));
        }
        out.push(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX));
        std::thread::sleep(every);
    }
    Ok(out)
}
