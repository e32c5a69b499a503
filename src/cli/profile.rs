//! `keyward profile`: offline signing from a key file (to check a profile against an
//! exchange's documented example) and the list of profile names.

use std::path::PathBuf;

use keyward::profile::{offline, ProfileName};
use keyward::secret::read_secret;
use keyward::{Error, Result};
use serde_json::Value;

use super::Ctx;

/// Largest request file (the socket's frame limit).
const MAX_REQUEST: usize = 1024 * 1024;

#[derive(clap::Subcommand)]
pub enum ProfileCmd {
    /// Sign a request offline with a key file; prints the profile's output object (JSON).
    /// Errors are printed as {"error":{"code","message"}} on stderr.
    Sign(SignArgs),
    /// List the profile names.
    List,
}

#[derive(clap::Args)]
pub struct SignArgs {
    /// Profile name (see `keyward profile list`).
    #[arg(long)]
    profile: String,
    /// The key as the exchange or tool issued it: PEM, HMAC secret string, 0x-hex wallet key,
    /// or a Coinbase CDP Ed25519 secret.
    #[arg(long, value_name = "FILE")]
    key_file: PathBuf,
    /// The request object (JSON); `-` reads standard input.
    #[arg(long, value_name = "FILE|-")]
    request: PathBuf,
}

pub fn run(ctx: &Ctx, cmd: ProfileCmd) -> Result<()> {
    match cmd {
        ProfileCmd::Sign(a) => sign(a),
        ProfileCmd::List => {
            let names: Vec<&str> = ProfileName::ALL.iter().map(|p| p.as_str()).collect();
            ctx.emit(&Value::from(names.clone()), || names.join("\n"));
            Ok(())
        }
    }
}

fn sign(a: SignArgs) -> Result<()> {
    let profile: ProfileName = a.profile.parse()?;
    let text = super::read_input(&a.request, MAX_REQUEST)?;
    let request: Value = serde_json::from_slice(&text)
        .map_err(|e| Error::BadRequest(format!("the request is not valid JSON: {e}")))?;
    let f = std::fs::File::open(&a.key_file)
        .map_err(|e| Error::io(format!("opening {}", a.key_file.display()), e))?;
    let key = read_secret(f, offline::MAX_KEY_FILE)?;
    let out = offline::sign(profile, key, &request)?;
    let text = serde_json::to_string_pretty(&out.into_value())
        .map_err(|e| Error::Internal(e.to_string()))?;
    println!("{text}");
    Ok(())
}
