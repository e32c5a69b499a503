//! `keyward init`: create a home with its config and passphrase-protected identity.
//! The passphrase is read (and its source checked) before anything is written.

use keyward::home::{self, Home};
use keyward::secret::{SecretBytes, SecretSource};
use keyward::{Error, Result};
use serde_json::json;

use super::Ctx;

#[derive(clap::Args)]
pub struct InitArgs {
    /// Passphrase source: env:NAME, file:PATH (mode 0600), stdin or prompt.
    #[arg(long, value_name = "SOURCE", default_value = "prompt")]
    passphrase: String,
    /// scrypt cost as log2(N), 10..=22 (default: age's, about one second). Low values are for
    /// tests and demos only.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(10..=22))]
    kdf_work_factor: Option<u8>,
}

pub fn run(ctx: &Ctx, a: InitArgs) -> Result<()> {
    let home = Home::resolve(ctx.home.as_deref())?;
    if home.is_initialized() {
        return Err(Error::AlreadyExists(format!(
            "{} is already a keyward home",
            home.root().display()
        )));
    }
    let source: SecretSource = a.passphrase.parse()?;
    let pass = read_new_passphrase(&source)?;
    home.create_dirs()?;
    if !home.config_path().exists() {
        home::atomic_create(
            &home.config_path(),
            keyward::config::DEFAULT_CONFIG.as_bytes(),
        )?;
    }
    keyward::identity::create(&home, &pass, a.kdf_work_factor)?;
    let recipient = keyward::identity::recipient(&home)?.to_string();
    let root = home.root().display().to_string();
    ctx.emit(&json!({"home": root, "recipient": recipient}), || {
        format!(
            "initialised keyward home {root}\n  identity recipient: {recipient}\n  next: keyward --home {root} key generate NAME --type ed25519"
        )
    });
    Ok(())
}

fn read_new_passphrase(source: &SecretSource) -> Result<SecretBytes> {
    let pass = source.read("new identity passphrase")?;
    if *source == SecretSource::Prompt {
        let again = source.read("repeat the passphrase")?;
        if again.expose() != pass.expose() {
            return Err(Error::BadPassphrase("the passphrases differ".into()));
        }
    }
    if pass.len() < keyward::identity::MIN_PASSPHRASE {
        return Err(Error::BadPassphrase(format!(
            "the passphrase must have at least {} characters",
            keyward::identity::MIN_PASSPHRASE
        )));
    }
    Ok(pass)
}
