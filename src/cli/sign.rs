//! `keyward sign`: sign raw bytes (message from a file or stdin, never argv when it matters),
//! or with `--profile` sign an exchange request and print its headers or a curl command.

use std::path::{Path, PathBuf};

use base64::Engine;
use keyward::model::KeyName;
use keyward::{Error, Result};
use serde_json::{Map, Value};

use super::Ctx;

/// Largest message: its base64 must fit in one 1 MiB frame.
const MAX_MESSAGE: usize = 512 * 1024;

#[derive(clap::Args)]
pub struct SignArgs {
    /// The key to sign with.
    #[arg(long)]
    key: KeyName,
    /// Raw signing scheme (default by key type), e.g. rsa-pss-sha256, ecdsa-secp256k1-sha256.
    #[arg(long, conflicts_with = "profile")]
    scheme: Option<String>,
    /// The message file for raw signing; `-` (default) reads standard input.
    #[arg(long, default_value = "-", conflicts_with = "profile")]
    file: PathBuf,
    /// Output encoding of a raw signature.
    #[arg(long, value_parser = ["base64", "hex"], default_value = "base64")]
    encoding: String,
    /// Sign an exchange request with this profile (binance, kalshi, …) instead of raw bytes.
    #[arg(long)]
    profile: Option<String>,
    /// HTTP method of the request (profile mode).
    #[arg(long, requires = "profile")]
    method: Option<String>,
    /// Request path without query (profile mode).
    #[arg(long, requires = "profile")]
    path: Option<String>,
    /// Query string without the leading `?` (profile mode).
    #[arg(long, requires = "profile")]
    query: Option<String>,
    /// Request body, or `@FILE` to read it from a file (profile mode).
    #[arg(long, requires = "profile")]
    body: Option<String>,
    /// The whole request object as JSON (file, `-` for stdin); --method/--path/... override
    /// its fields. Needed for profiles without an HTTP request (eip712, hyperliquid, …).
    #[arg(long, value_name = "FILE", requires = "profile")]
    request: Option<PathBuf>,
    /// Print a ready-to-run curl command for this base URL (e.g. https://api.binance.com).
    #[arg(long, value_name = "URL", requires = "profile")]
    curl: Option<String>,
}

pub fn run(ctx: &Ctx, a: SignArgs) -> Result<()> {
    if a.profile.is_some() {
        return run_profile(ctx, a);
    }
    let msg = super::read_input(&a.file, MAX_MESSAGE)?;
    let r = ctx.connect()?.sign(&a.key, &msg, a.scheme.as_deref())?;
    let v = serde_json::to_value(&r).map_err(|e| Error::Internal(e.to_string()))?;
    ctx.emit(&v, || {
        if a.encoding == "hex" {
            base64::engine::general_purpose::STANDARD
                .decode(&r.signature)
                .map(hex::encode)
                .unwrap_or_default()
        } else {
            r.signature.clone()
        }
    });
    Ok(())
}

fn run_profile(ctx: &Ctx, a: SignArgs) -> Result<()> {
    let profile = a.profile.clone().unwrap_or_default();
    let mut req = match &a.request {
        Some(f) => match serde_json::from_slice(&super::read_input(f, MAX_MESSAGE)?) {
            Ok(Value::Object(m)) => m,
            Ok(_) => {
                return Err(Error::BadRequest(
                    "--request must hold a JSON object".into(),
                ))
            }
            Err(e) => return Err(Error::BadRequest(format!("--request: invalid JSON: {e}"))),
        },
        None => Map::new(),
    };
    let body = match a.body.as_deref() {
        Some(b) if b.starts_with('@') => {
            let bytes = super::read_input(Path::new(&b[1..]), MAX_MESSAGE)?;
            Some(
                String::from_utf8(bytes)
                    .map_err(|_| Error::BadRequest("--body file is not UTF-8 text".into()))?,
            )
        }
        other => other.map(str::to_owned),
    };
    for (field, value) in [
        ("method", a.method.clone()),
        ("path", a.path.clone()),
        ("query", a.query.clone()),
        ("body", body),
    ] {
        if let Some(v) = value {
            req.insert(field.into(), Value::String(v));
        }
    }
    let out = ctx
        .connect()?
        .sign_request(&a.key, &profile, Value::Object(req.clone()))?;
    if let Some(base) = &a.curl {
        println!("{}", curl_command(base, &req, &out));
        return Ok(());
    }
    ctx.emit(&out, || {
        let mut s = String::new();
        if let Some(Value::Object(h)) = out.get("headers") {
            for (k, v) in h {
                s.push_str(&format!("{k}: {}\n", v.as_str().unwrap_or_default()));
            }
        }
        for field in ["query", "body"] {
            if let Some(Value::String(v)) = out.get(field) {
                s.push_str(&format!("{field}: {v}\n"));
            }
        }
        if s.is_empty() {
            s = out
                .get("signature")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
        }
        s.trim_end().to_string()
    });
    Ok(())
}

/// A curl command sending exactly what was signed: the final query/body from the output
/// (profiles that append parameters return them), else the request's.
fn curl_command(base: &str, req: &Map<String, Value>, out: &Value) -> String {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    let method = text(req.get("method")).unwrap_or_else(|| "POST".into());
    let path = text(req.get("path")).unwrap_or_default();
    let query = text(out.get("query")).or_else(|| text(req.get("query")));
    let body = text(out.get("body")).or_else(|| text(req.get("body")));
    let mut url = format!("{}{path}", base.trim_end_matches('/'));
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        url.push('?');
        url.push_str(&q);
    }
    let mut cmd = format!("curl -sS -X {} {}", shell_quote(&method), shell_quote(&url));
    if let Some(Value::Object(h)) = out.get("headers") {
        for (k, v) in h {
            let line = format!("{k}: {}", v.as_str().unwrap_or_default());
            cmd.push_str(&format!(" -H {}", shell_quote(&line)));
        }
    }
    if let Some(b) = body.filter(|b| !b.is_empty()) {
        cmd.push_str(&format!(" --data-raw {}", shell_quote(&b)));
    }
    cmd
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn curl_uses_the_final_query_and_quotes_everything() {
        let req = json!({"method": "GET", "path": "/api/v3/account", "query": "a=1"});
        let out =
            json!({"query": "a=1&timestamp=5&signature=ab", "headers": {"X-MBX-APIKEY": "k'ey"}});
        let c = curl_command("https://api.binance.com/", req.as_object().unwrap(), &out);
        assert_eq!(
            c,
            "curl -sS -X 'GET' 'https://api.binance.com/api/v3/account?a=1&timestamp=5&signature=ab' -H 'X-MBX-APIKEY: k'\\''ey'"
        );
    }
}
