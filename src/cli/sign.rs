//! `keyward sign`: sign raw bytes through the agent (message from a file or stdin, never argv
//! when it matters) and print the signature.

use std::path::PathBuf;

use base64::Engine;
use keyward::model::KeyName;
use keyward::{Error, Result};

use super::Ctx;

/// Largest message: its base64 must fit in one 1 MiB frame.
const MAX_MESSAGE: usize = 512 * 1024;

#[derive(clap::Args)]
pub struct SignArgs {
    /// The key to sign with.
    #[arg(long)]
    key: KeyName,
    /// Signing scheme (default by key type), e.g. rsa-pss-sha256, ecdsa-secp256k1-sha256.
    #[arg(long)]
    scheme: Option<String>,
    /// The message file; `-` (default) reads standard input.
    #[arg(long, default_value = "-")]
    file: PathBuf,
    /// Output encoding of the signature.
    #[arg(long, value_parser = ["base64", "hex"], default_value = "base64")]
    encoding: String,
}

pub fn run(ctx: &Ctx, a: SignArgs) -> Result<()> {
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
