//! `keyward identity seal|unseal-check`: seal an existing home's identity to a TPM (asks for
//! the passphrase once, to decrypt identity.age) and check that the seal still opens — after
//! a firmware or boot change, before the agent's next unattended start finds out.

use keyward::backend::tpm_seal::PcrPolicy;
use keyward::config::Config;
use keyward::home;
use keyward::secret::SecretSource;
use keyward::{Error, Result};
use serde_json::json;

use super::Ctx;

#[derive(clap::Subcommand)]
pub enum IdentityCmd {
    /// Seal the identity to a TPM (writes identity.tpm; identity.age stays for recovery).
    /// Run again to reseal, e.g. after the bound PCRs changed.
    Seal(SealArgs),
    /// Unseal with the TPM (the agent's unattended path) and report whether it works.
    UnsealCheck,
}

#[derive(clap::Args)]
pub struct SealArgs {
    /// The TPM: a `[tpm.ALIAS]` of keyward.toml (added when missing).
    #[arg(long, value_name = "ALIAS")]
    tpm: String,
    /// TCTI for a `[tpm.ALIAS]` this command adds (default: $TPM2TOOLS_TCTI, $TCTI, then
    /// device:/dev/tpmrm0).
    #[arg(long, value_name = "TCTI")]
    tpm_tcti: Option<String>,
    /// Bind the seal to these PCRs' current values, e.g. `sha256:0,7` (default: no PCRs).
    #[arg(long, value_name = "BANK:LIST")]
    pcrs: Option<String>,
    /// Identity passphrase source: env:NAME, file:PATH (mode 0600), stdin or prompt.
    #[arg(long, value_name = "SOURCE", default_value = "prompt")]
    passphrase: String,
}

pub fn run(ctx: &Ctx, cmd: IdentityCmd) -> Result<()> {
    match cmd {
        IdentityCmd::Seal(a) => seal(ctx, a),
        IdentityCmd::UnsealCheck => unseal_check(ctx),
    }
}

fn seal(ctx: &Ctx, a: SealArgs) -> Result<()> {
    let home = ctx.open_home()?;
    let pcrs = a.pcrs.as_deref().map(str::parse::<PcrPolicy>).transpose()?;
    let source: SecretSource = a.passphrase.parse()?;
    let (text, changed) = super::init::with_tpm_section(&home, &a.tpm, a.tpm_tcti.as_deref())?;
    let pass = source.read("identity passphrase")?;
    let identity = keyward::identity::unlock(&home, &pass)?;
    drop(pass);
    if changed {
        home::atomic_write(&home.config_path(), text.as_bytes())?;
    }
    let config = Config::load(&home.config_path())?;
    keyward::identity::seal(&home, &config, &a.tpm, &identity, pcrs.as_ref())?;
    let path = keyward::identity::sealed_path(&home).display().to_string();
    let pcr_text = pcrs.as_ref().map(PcrPolicy::to_string);
    let note = if config.agent.passphrase.is_some() {
        "\n  note: agent.passphrase is set in keyward.toml; the agent uses it instead of the TPM until you remove it"
    } else {
        ""
    };
    ctx.emit(
        &json!({"sealed": path, "tpm": a.tpm, "pcrs": pcr_text}),
        || {
            format!(
                "identity sealed to TPM `{}`{} in {path}\n  the agent now starts without the passphrase when none is given; keep the passphrase for recovery{note}",
                a.tpm,
                pcr_text.as_deref().map(|p| format!(" (PCRs {p})")).unwrap_or_default()
            )
        },
    );
    Ok(())
}

fn unseal_check(ctx: &Ctx) -> Result<()> {
    let home = ctx.open_home()?;
    if !keyward::identity::is_sealed(&home) {
        return Err(Error::NotInitialized(format!(
            "{} has no TPM-sealed identity; create one with `keyward identity seal --tpm ALIAS`",
            home.root().display()
        )));
    }
    let config = Config::load(&home.config_path())?;
    let blob = keyward::identity::read_sealed(&home)?;
    let identity = keyward::identity::unlock_sealed(&home, &config)?;
    let recipient = identity.to_public().to_string();
    drop(identity);
    let pcr_text = blob.pcrs.as_ref().map(PcrPolicy::to_string);
    ctx.emit(
        &json!({"ok": true, "tpm": blob.tpm, "pcrs": pcr_text, "recipient": recipient}),
        || format!("the TPM `{}` unseals the identity ({recipient})", blob.tpm),
    );
    Ok(())
}
