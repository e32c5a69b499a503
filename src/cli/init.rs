//! `keyward init`: create a home with its config and passphrase-protected identity.
//! The passphrase is read (and its source checked) before anything is written.
//! `--seal-to-tpm ALIAS` also seals the identity to a TPM (docs/tpm.md §8): the TPM is asked
//! before the identity is written, so a TPM failure leaves a home `init` can simply retry.

use keyward::backend::tpm_seal::PcrPolicy;
use keyward::config::Config;
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
    /// Also seal the identity to the TPM `[tpm.ALIAS]`, so the agent starts without the
    /// passphrase on this host. A missing section is added to keyward.toml.
    #[arg(long, value_name = "ALIAS")]
    seal_to_tpm: Option<String>,
    /// TCTI of that TPM, written to `[tpm.ALIAS]` (default: $TPM2TOOLS_TCTI, $TCTI, then
    /// device:/dev/tpmrm0).
    #[arg(long, value_name = "TCTI", requires = "seal_to_tpm")]
    tpm_tcti: Option<String>,
    /// Bind the seal to these PCRs' current values, e.g. `sha256:0,7` (default: no PCRs).
    #[arg(long, value_name = "BANK:LIST", requires = "seal_to_tpm")]
    seal_pcrs: Option<String>,
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
    let pcrs = a
        .seal_pcrs
        .as_deref()
        .map(str::parse::<PcrPolicy>)
        .transpose()?;
    // Check the config edit before asking for the passphrase (a typo costs no retyping).
    let config_text = match &a.seal_to_tpm {
        Some(alias) => Some(with_tpm_section(&home, alias, a.tpm_tcti.as_deref())?),
        None => None,
    };
    let pass = read_new_passphrase(&source)?;
    home.create_dirs()?;
    let config_path = home.config_path();
    // What keyward.toml held before a TPM section was added (None: no file), restored if the
    // seal fails, so `init` can be retried with a corrected --tpm-tcti.
    let mut restore: Option<Option<String>> = None;
    match &config_text {
        // The TPM section must be on disk before the seal: the agent finds the TPM there.
        Some((text, changed)) if *changed || !config_path.exists() => {
            restore = Some(std::fs::read_to_string(&config_path).ok());
            home::atomic_write(&config_path, text.as_bytes())?
        }
        Some(_) => {}
        None if !config_path.exists() => {
            home::atomic_create(&config_path, keyward::config::DEFAULT_CONFIG.as_bytes())?
        }
        None => {}
    }
    let config = Config::load(&config_path)?;
    let seal = match &a.seal_to_tpm {
        Some(alias) => {
            let cfg = config.tpm.get(alias).ok_or_else(|| {
                Error::Internal(format!("[tpm.{alias}] vanished from keyward.toml"))
            })?;
            Some((alias.as_str(), cfg, pcrs.as_ref()))
        }
        None => None,
    };
    if let Err(e) = keyward::identity::create_sealed(&home, &pass, a.kdf_work_factor, seal) {
        match restore {
            Some(Some(old)) => {
                let _ = home::atomic_write(&config_path, old.as_bytes());
            }
            Some(None) => {
                let _ = home::remove_durably(&config_path);
            }
            None => {}
        }
        return Err(e);
    }
    let recipient = keyward::identity::recipient(&home)?.to_string();
    let root = home.root().display().to_string();
    let pcr_text = pcrs.as_ref().map(PcrPolicy::to_string);
    ctx.emit(
        &json!({"home": root, "recipient": recipient, "sealed_to_tpm": a.seal_to_tpm, "seal_pcrs": pcr_text}),
        || {
            let sealed = match &a.seal_to_tpm {
                Some(alias) => format!(
                    "\n  identity sealed to TPM `{alias}`{}: the agent starts without the passphrase on this host (keep the passphrase: it is the recovery path)",
                    pcr_text.as_deref().map(|p| format!(" (PCRs {p})")).unwrap_or_default()
                ),
                None => String::new(),
            };
            format!(
                "initialised keyward home {root}\n  identity recipient: {recipient}{sealed}\n  next: keyward --home {root} key generate NAME --type ed25519"
            )
        },
    );
    Ok(())
}

/// keyward.toml's text with a `[tpm.<alias>]` section: the existing file (or the default
/// one) as is when it has the section, else with the section appended (comments kept).
/// Returns the text and whether it differs from the file. `tcti` must agree with a section
/// that exists: init never rewrites an operator's TPM settings.
pub(super) fn with_tpm_section(
    home: &Home,
    alias: &str,
    tcti: Option<&str>,
) -> Result<(String, bool)> {
    let path = home.config_path();
    let existing = if path.exists() {
        Some(
            std::fs::read_to_string(&path)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?,
        )
    } else {
        None
    };
    let base = existing
        .clone()
        .unwrap_or_else(|| keyward::config::DEFAULT_CONFIG.to_string());
    let config = Config::parse(&base, &path)?;
    if let Some(t) = config.tpm.get(alias) {
        if let Some(want) = tcti {
            if t.tcti.as_deref() != Some(want) {
                return Err(Error::Config(format!(
                    "{}: [tpm.{alias}] already exists with another tcti; edit it there or drop --tpm-tcti",
                    path.display()
                )));
            }
        }
        return Ok((base, existing.is_none()));
    }
    let mut text = base;
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&format!(
        "\n# The TPM the identity is sealed to (`keyward init --seal-to-tpm`).\n[tpm.{alias}]\n"
    ));
    match tcti {
        Some(t) => text.push_str(&format!("tcti = {}\n", toml::Value::String(t.to_string()))),
        None => text.push_str(
            "# tcti = \"device:/dev/tpmrm0\"   # default: $TPM2TOOLS_TCTI, then $TCTI, then this\n",
        ),
    }
    // Validates the alias and the TCTI with the same rules as any keyward.toml.
    Config::parse(&text, &path)?;
    Ok((text, true))
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
