//! Sealing a small secret (the home's age identity) to a TPM 2.0, so the agent can start
//! unattended on that host while the passphrase-encrypted `identity.age` stays for recovery.
//!
//! - The secret becomes the sensitive part of a keyed-hash *data object* (no sign, no decrypt:
//!   the TPM only gives it back through TPM2_Unseal) created under the same storage primary
//!   key as the TPM backend's keys (tpm.rs `srk_template`): fixedTPM and fixedParent, so the
//!   TPM2B_PRIVATE is encrypted to this TPM's owner seed and useless anywhere else.
//! - Without PCRs the object has an empty auth value and `userWithAuth`. With PCRs it has a
//!   PolicyPCR policy and `userWithAuth` clear: an auth-value session would otherwise bypass
//!   the policy.
//! - Every session that carries the secret is salted with the storage key and has parameter
//!   encryption on (decrypt for TPM2_Create's sensitive input, encrypt for TPM2_Unseal's
//!   output), so the secret does not cross the TPM interface (bus, swtpm socket) in clear.
//! - This uses its own short-lived ESAPI context rather than the backend's worker: sealing
//!   runs in the CLI and unsealing once at agent start, before any backend exists.

use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{KeyHandle, ObjectHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Auth, Digest, KeyedHashScheme, PcrSelectionList, PcrSlot, Private, Public, PublicBuilder,
    PublicKeyedHashParameters, SensitiveData, SymmetricDefinition,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::Context;

use super::tpm::{decode_pair, effective_tcti, encode_pair, raw_rc, srk_template, LOCKOUT_HINT};
use crate::config::TpmConfig;
use crate::error::{Error, Result};
use crate::secret::{SecretBytes, SecretSource};

const SEALED_FORMAT: &str = "keyward-tpm-sealed-identity";
/// Same parent as the backend's key blobs (tpm.rs): the ECC P-256 SRK under the owner.
const PARENT_SRK: &str = "owner/ecc-p256-srk";
/// TPM2B_SENSITIVE_DATA holds at most 128 bytes (MAX_SYM_DATA); an age identity is 74.
const MAX_SEALED: usize = 128;

/// PCRs a sealed object is bound to: one bank and its indices (`sha256:0,7`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PcrPolicy {
    /// `sha1`, `sha256` or `sha384`.
    pub bank: String,
    /// PCR indices 0..=23, sorted, no duplicates.
    pub pcrs: Vec<u8>,
}

impl FromStr for PcrPolicy {
    type Err = Error;
    /// `sha256:0,7` or `0,7` (bank sha256).
    fn from_str(s: &str) -> Result<PcrPolicy> {
        let (bank, list) = match s.split_once(':') {
            Some((b, l)) => (b.trim().to_ascii_lowercase(), l),
            None => ("sha256".to_string(), s),
        };
        bank_alg(&bank)?;
        let mut pcrs = Vec::new();
        for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let n: u8 =
                part.parse().ok().filter(|n| *n <= 23).ok_or_else(|| {
                    Error::BadRequest(format!("PCR index must be 0..=23: {part:?}"))
                })?;
            pcrs.push(n);
        }
        if pcrs.is_empty() {
            return Err(Error::BadRequest(
                "a PCR list needs at least one index (e.g. sha256:0,7)".into(),
            ));
        }
        pcrs.sort_unstable();
        pcrs.dedup();
        Ok(PcrPolicy { bank, pcrs })
    }
}

impl std::fmt::Display for PcrPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list: Vec<String> = self.pcrs.iter().map(u8::to_string).collect();
        write!(f, "{}:{}", self.bank, list.join(","))
    }
}

impl PcrPolicy {
    fn selection(&self) -> Result<PcrSelectionList> {
        let slots = self
            .pcrs
            .iter()
            .map(|n| {
                PcrSlot::try_from(1u32 << n).map_err(|e| Error::BadRequest(format!("PCR {n}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        PcrSelectionList::builder()
            .with_selection(bank_alg(&self.bank)?, &slots)
            .build()
            .map_err(|e| Error::BadRequest(format!("PCR selection {self}: {e}")))
    }
}

fn bank_alg(bank: &str) -> Result<HashingAlgorithm> {
    match bank {
        "sha1" => Ok(HashingAlgorithm::Sha1),
        "sha256" => Ok(HashingAlgorithm::Sha256),
        "sha384" => Ok(HashingAlgorithm::Sha384),
        other => Err(Error::BadRequest(format!(
            "PCR bank must be sha1, sha256 or sha384, not {other:?}"
        ))),
    }
}

/// The content of `identity.tpm` (JSON). The blobs are what `tpm2_create -u -r` would write.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedBlob {
    pub format: String,
    pub version: u32,
    /// The `[tpm.<alias>]` whose TCTI reaches the TPM that holds the seed.
    pub tpm: String,
    pub parent: String,
    /// PCR binding, if any (fixed at seal time: the policy digest is part of the object).
    pub pcrs: Option<PcrPolicy>,
    /// What the sealed secret is for (the identity's public recipient), so a stale file left
    /// from another identity is recognised before it is used.
    pub recipient: String,
    /// Marshalled TPM2B_PUBLIC, base64.
    pub public: String,
    /// Marshalled TPM2B_PRIVATE, base64.
    pub private: String,
}

impl SealedBlob {
    pub fn to_json(&self) -> Result<Vec<u8>> {
        let mut v = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::Internal(format!("encoding the sealed identity: {e}")))?;
        v.push(b'\n');
        Ok(v)
    }

    pub fn from_json(text: &[u8]) -> Result<SealedBlob> {
        let b: SealedBlob = serde_json::from_slice(text)
            .map_err(|e| Error::Config(format!("malformed sealed identity: {e}")))?;
        if b.format != SEALED_FORMAT || b.version != 1 || b.parent != PARENT_SRK {
            return Err(Error::Config(
                "sealed identity: unknown format, version or parent".into(),
            ));
        }
        Ok(b)
    }

    fn blobs(&self) -> Result<(Public, Private)> {
        decode_pair(&self.public, &self.private)
            .map_err(|what| Error::Config(format!("malformed sealed identity: {what}")))
    }
}

/// Seal `secret` to the TPM configured as `[tpm.<alias>]`, then unseal it once to prove the
/// agent will be able to (a seal that cannot be opened would only show at the next start).
pub fn seal(
    alias: &str,
    cfg: &TpmConfig,
    secret: &SecretBytes,
    pcrs: Option<&PcrPolicy>,
    recipient: &str,
) -> Result<SealedBlob> {
    if secret.is_empty() || secret.len() > MAX_SEALED {
        return Err(Error::Internal(format!(
            "a sealed secret has 1..={MAX_SEALED} bytes"
        )));
    }
    let mut t = Tpm::open(alias, cfg)?;
    let result = t.seal(secret, pcrs);
    t.close();
    let (public, private) = result?;
    let blob = encode(alias, pcrs, recipient, &public, &private)?;
    let back = unseal(alias, cfg, &blob)?;
    if back.expose() != secret.expose() {
        return Err(Error::Internal(
            "the TPM returned different data when unsealing".into(),
        ));
    }
    Ok(blob)
}

/// Unseal the secret of `blob` with the TPM of `cfg`. Failures are `backend_unavailable`
/// with the reason (TPM unreachable, another TPM, PCRs changed, lockout).
pub fn unseal(alias: &str, cfg: &TpmConfig, blob: &SealedBlob) -> Result<SecretBytes> {
    let (public, private) = blob.blobs()?;
    let mut t = Tpm::open(alias, cfg)?;
    let r = t.unseal(public, private, blob.pcrs.as_ref());
    t.close();
    r
}

fn encode(
    alias: &str,
    pcrs: Option<&PcrPolicy>,
    recipient: &str,
    public: &Public,
    private: &Private,
) -> Result<SealedBlob> {
    let (public, private) = encode_pair(public, private)?;
    Ok(SealedBlob {
        format: SEALED_FORMAT.into(),
        version: 1,
        tpm: alias.into(),
        parent: PARENT_SRK.into(),
        pcrs: pcrs.cloned(),
        recipient: recipient.into(),
        public,
        private,
    })
}

/// One connection with the storage key loaded; transient objects and sessions it made are
/// flushed by `close` (swtpm has three transient slots and no resource manager).
struct Tpm {
    alias: String,
    ctx: Context,
    primary: Option<KeyHandle>,
    flush: Vec<ObjectHandle>,
}

impl Tpm {
    fn open(alias: &str, cfg: &TpmConfig) -> Result<Tpm> {
        let tcti = effective_tcti(cfg);
        let conf = TctiNameConf::from_str(&tcti)
            .map_err(|e| Error::Config(format!("tpm.{alias}.tcti: invalid TCTI {tcti:?}: {e}")))?;
        let ctx = Context::new(conf).map_err(|e| {
            Error::BackendUnavailable(format!(
                "tpm `{alias}`: the TPM is unreachable: cannot connect to {tcti} ({e}); check that it is present and that this user may open it (docs/tpm.md §5)"
            ))
        })?;
        let mut t = Tpm {
            alias: alias.to_string(),
            ctx,
            primary: None,
            flush: Vec::new(),
        };
        if let Some(src) = &cfg.owner_auth {
            let a = src
                .parse::<SecretSource>()?
                .read(&format!("TPM `{alias}` owner auth"))?;
            let auth = Auth::try_from(a.expose().to_vec()).map_err(|_| {
                Error::BadPassphrase("a TPM auth value may have at most 64 bytes".into())
            })?;
            t.ctx
                .tr_set_auth(ObjectHandle::Owner, auth)
                .map_err(|e| Error::Internal(format!("setting the owner auth: {e}")))?;
        }
        let template = srk_template().map_err(|e| Error::Internal(format!("SRK template: {e}")))?;
        let r = t
            .ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.create_primary(Hierarchy::Owner, template, None, None, None, None)
            })
            .map_err(|e| t.fail("creating the storage key", e))?;
        t.flush.push(r.key_handle.into());
        t.primary = Some(r.key_handle);
        Ok(t)
    }

    fn primary(&self) -> Result<KeyHandle> {
        self.primary
            .ok_or_else(|| Error::Internal("storage key not loaded".into()))
    }

    /// A session salted with the storage key (its key is unknown to anyone watching the
    /// interface), with parameter encryption both ways.
    fn salted(&mut self, kind: SessionType) -> Result<AuthSession> {
        let primary = self.primary()?;
        let s = self
            .ctx
            .start_auth_session(
                Some(primary),
                None,
                None,
                kind,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(|e| self.fail("starting a session", e))?
            .ok_or_else(|| Error::Internal("the TPM returned no session".into()))?;
        self.flush.push(SessionHandle::from(s).into());
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_decrypt(true)
            .with_encrypt(true)
            .with_continue_session(true)
            .build();
        self.ctx
            .tr_sess_set_attributes(s, attrs, mask)
            .map_err(|e| self.fail("setting session attributes", e))?;
        Ok(s)
    }

    /// A policy (or trial) session that has run PolicyPCR over the PCRs' current values.
    fn pcr_session(&mut self, kind: SessionType, pcrs: &PcrPolicy) -> Result<PolicySession> {
        let s = if kind == SessionType::Trial {
            let s = self
                .ctx
                .start_auth_session(
                    None,
                    None,
                    None,
                    kind,
                    SymmetricDefinition::Null,
                    HashingAlgorithm::Sha256,
                )
                .map_err(|e| self.fail("starting a trial session", e))?
                .ok_or_else(|| Error::Internal("the TPM returned no session".into()))?;
            self.flush.push(SessionHandle::from(s).into());
            s
        } else {
            self.salted(kind)?
        };
        let ps = PolicySession::try_from(s)
            .map_err(|e| Error::Internal(format!("policy session: {e}")))?;
        let selection = pcrs.selection()?;
        // An empty digest: the TPM uses the PCRs' current values (at seal time that is the
        // value the policy binds to; at unseal time a mismatch fails the Unseal).
        self.ctx
            .policy_pcr(ps, Digest::default(), selection)
            .map_err(|e| self.fail("PolicyPCR", e))?;
        Ok(ps)
    }

    fn seal(
        &mut self,
        secret: &SecretBytes,
        pcrs: Option<&PcrPolicy>,
    ) -> Result<(Public, Private)> {
        let tss = |e: tss_esapi::Error| Error::Internal(format!("sealed object template: {e}"));
        let policy = match pcrs {
            Some(p) => {
                let trial = self.pcr_session(SessionType::Trial, p)?;
                self.ctx
                    .policy_get_digest(trial)
                    .map_err(|e| self.fail("reading the policy digest", e))?
            }
            None => Digest::default(),
        };
        let attrs = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            // The data comes from us, not the TPM's RNG.
            .with_sensitive_data_origin(false)
            // With a PCR policy, an (empty) auth value must not open the object as well.
            .with_user_with_auth(pcrs.is_none())
            // Empty auth value: nothing to guess, so no dictionary-attack accounting.
            .with_no_da(true)
            .with_sign_encrypt(false)
            .with_decrypt(false)
            .with_restricted(false)
            .build()
            .map_err(tss)?;
        let template = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::KeyedHash)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attrs)
            .with_auth_policy(policy)
            .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
            .with_keyed_hash_unique_identifier(Digest::default())
            .build()
            .map_err(tss)?;
        let data = SensitiveData::try_from(secret.expose().to_vec())
            .map_err(|_| Error::Internal("sealed data size".into()))?;
        let parent = self.primary()?;
        let session = self.salted(SessionType::Hmac)?;
        let r = self
            .ctx
            .execute_with_session(Some(session), |ctx| {
                ctx.create(parent, template, None, Some(data), None, None)
            })
            .map_err(|e| self.fail("sealing", e))?;
        Ok((r.out_public, r.out_private))
    }

    fn unseal(
        &mut self,
        public: Public,
        private: Private,
        pcrs: Option<&PcrPolicy>,
    ) -> Result<SecretBytes> {
        let parent = self.primary()?;
        let h = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.load(parent, private, public)
            })
            .map_err(|e| self.fail("loading the sealed identity", e))?;
        self.flush.push(h.into());
        let session = match pcrs {
            Some(p) => self.pcr_session(SessionType::Policy, p)?.into(),
            None => self.salted(SessionType::Hmac)?,
        };
        let data = self
            .ctx
            .execute_with_session(Some(session), |ctx| ctx.unseal(h.into()))
            .map_err(|e| self.fail("unsealing", e))?;
        // SensitiveData zeroizes itself on drop; the copy goes straight into a SecretBytes.
        Ok(SecretBytes::from_slice(data.value()))
    }

    /// Map a TSS error to keyward's: every TPM-side failure is `backend_unavailable`, with
    /// the reason an operator needs (the agent adds the `--passphrase` fallback).
    fn fail(&self, what: &str, e: tss_esapi::Error) -> Error {
        let alias = &self.alias;
        let rc = match e {
            tss_esapi::Error::WrapperError(k) => {
                return Error::Internal(format!("tpm `{alias}`: {what}: {k}"))
            }
            tss_esapi::Error::Tss2Error(rc) => rc,
        };
        let raw = raw_rc(&rc).unwrap_or(0);
        if raw >> 16 != 0 {
            return Error::BackendUnavailable(format!(
                "tpm `{alias}`: {what}: the TPM is unreachable or failed (TSS error {raw:#x})"
            ));
        }
        use Tss2ResponseCodeKind as K;
        let why = match rc.kind() {
            Some(K::Integrity | K::Binding) => {
                "identity.tpm was sealed by another TPM, or this TPM's owner hierarchy was cleared"
                    .to_string()
            }
            Some(K::PolicyFail | K::PcrChanged | K::PolicyCc) => {
                "the PCR values differ from those the identity was sealed to (firmware, boot \
                 loader or Secure Boot state changed)"
                    .to_string()
            }
            Some(K::Lockout) => LOCKOUT_HINT.to_string(),
            _ => format!("TPM error {raw:#x}: {rc}"),
        };
        Error::BackendUnavailable(format!("tpm `{alias}`: {what}: {why}"))
    }

    fn close(mut self) {
        for h in std::mem::take(&mut self.flush).into_iter().rev() {
            // Sessions may already be gone (the TPM flushes a failed policy session): ignore.
            let _ = self.ctx.flush_context(h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcr_lists_parse() {
        let p: PcrPolicy = "sha256:7,0,7".parse().unwrap();
        assert_eq!(p.pcrs, vec![0, 7]);
        assert_eq!(p.to_string(), "sha256:0,7");
        assert_eq!("0".parse::<PcrPolicy>().unwrap().bank, "sha256");
        assert!("md5:0".parse::<PcrPolicy>().is_err());
        assert!("sha256:24".parse::<PcrPolicy>().is_err());
        assert!("sha256:".parse::<PcrPolicy>().is_err());
        assert!(p.selection().is_ok());
    }
}
