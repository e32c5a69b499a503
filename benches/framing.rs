//! Criterion micro-benchmarks of the native protocol's hot path: frame encode/decode, request
//! parsing (valid and rejected), and the response encoding the agent does for every `sign`.

use std::hint::black_box;

use base64::Engine;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use keyward::model::KeyName;
use keyward::proto::{frame, parse_request, Op, Response};
use serde_json::json;

/// A `sign` request as the client sends it: 100-byte message, base64.
fn sign_request_body() -> Vec<u8> {
    let data = base64::engine::general_purpose::STANDARD.encode([0x61u8; 100]);
    let key = KeyName::new("binance-main").expect("fixed benchmark input");
    let mut v = serde_json::to_value(Op::Sign {
        key,
        data,
        scheme: Some("hmac-sha256".into()),
        version: None,
    })
    .expect("fixed benchmark input");
    if let serde_json::Value::Object(m) = &mut v {
        m.insert("id".into(), json!(42));
    }
    serde_json::to_vec(&v).expect("fixed benchmark input")
}

fn framing(c: &mut Criterion) {
    let body = sign_request_body();
    let framed = frame::encode(&body);
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Bytes(framed.len() as u64));
    g.bench_function("encode_sign_request", |b| {
        b.iter(|| frame::encode(black_box(&body)))
    });
    g.bench_function("read_sync_sign_request", |b| {
        b.iter(|| frame::read_sync(&mut black_box(&framed[..])))
    });
    let big = vec![b'x'; 64 * 1024];
    let big_framed = frame::encode(&big);
    g.throughput(Throughput::Bytes(big_framed.len() as u64));
    g.bench_function("read_sync_64KiB", |b| {
        b.iter(|| frame::read_sync(&mut black_box(&big_framed[..])))
    });
    g.finish();
}

fn parsing(c: &mut Criterion) {
    let body = sign_request_body();
    let mut g = c.benchmark_group("parse_request");
    g.bench_function("sign", |b| b.iter(|| parse_request(black_box(&body))));
    let status = br#"{"id":1,"op":"status"}"#;
    g.bench_function("status", |b| b.iter(|| parse_request(black_box(status))));
    let unknown = br#"{"id":1,"op":"nope","key":"k"}"#;
    g.bench_function("rejected_unknown_op", |b| {
        b.iter(|| parse_request(black_box(unknown)))
    });
    let deep = format!("{}{}", "[".repeat(40), "]".repeat(40));
    g.bench_function("rejected_too_deep", |b| {
        b.iter(|| parse_request(black_box(deep.as_bytes())))
    });
    g.finish();
}

fn responses(c: &mut Criterion) {
    let sig = base64::engine::general_purpose::STANDARD.encode([7u8; 64]);
    let result =
        json!({"key": "binance-main", "version": 1, "scheme": "ed25519", "signature": sig});
    let mut g = c.benchmark_group("response");
    g.bench_function("encode_sign_result", |b| {
        b.iter(|| Response::ok(Some(42), black_box(result.clone())).to_bytes())
    });
    let bytes = Response::ok(Some(42), result.clone()).to_bytes();
    g.bench_function("decode_sign_result", |b| {
        b.iter(|| serde_json::from_slice::<Response>(black_box(&bytes)))
    });
    g.finish();
}

/// The client library's share of a round trip: what `Client::sign` does besides the syscalls.
fn client(c: &mut Criterion) {
    let key = KeyName::new("binance-main").expect("fixed benchmark input");
    let msg = [0x61u8; 100];
    let mut g = c.benchmark_group("client");
    g.bench_function("encode_sign_request", |b| {
        b.iter(|| {
            let data = base64::engine::general_purpose::STANDARD.encode(black_box(&msg[..]));
            let mut v = serde_json::to_value(Op::Sign {
                key: key.clone(),
                data,
                scheme: Some("ed25519".into()),
                version: None,
            })
            .expect("serialisable");
            if let serde_json::Value::Object(m) = &mut v {
                m.insert("id".into(), json!(42));
            }
            frame::encode(&serde_json::to_vec(&v).expect("serialisable"))
        })
    });
    let sig = base64::engine::general_purpose::STANDARD.encode([7u8; 64]);
    let result =
        json!({"key": "binance-main", "version": 1, "scheme": "ed25519", "signature": sig});
    let bytes = Response::ok(Some(42), result).to_bytes();
    g.bench_function("decode_sign_response", |b| {
        b.iter(|| {
            let r: Response = serde_json::from_slice(black_box(&bytes)).expect("valid");
            let v = r.into_result().expect("ok");
            serde_json::from_value::<keyward::proto::SignResult>(v).expect("valid")
        })
    });
    g.finish();
}

criterion_group!(benches, framing, parsing, responses, client);
criterion_main!(benches);
