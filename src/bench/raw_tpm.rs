//! The TPM baseline: TPM2_Sign called directly through `tss-esapi` on the TPM keyward uses, with
//! the key blobs keyward created, loaded under the same storage key (the SRK template of
//! `backend::tpm`) and kept loaded for the whole case, the digest computed on the host as keyward
//! does, and the scheme keyward's tpm backend uses. No keyward code sits between the loop and
//! the TPM: this is what the TPM itself delivers to a client that keeps its key loaded (the
//! fastest raw client there is; loading per signature would cost a TPM2_Load every time).
//!
//! The TPM is serial and swtpm (like any TPM without a resource manager) has three transient
//! slots shared by every process using it. So a case's key is loaded once per case by
//! [`RawTpm::load`] (the storage key is flushed right after: a loaded key does not need its
//! parent), and each benchmark thread signs through its own ESAPI context holding an ESYS
//! reference to that one object ([`RawTpm::signer`]): no slot per thread. The threads' commands
//! serialise at the TPM; their host-side work (marshalling, the TCTI's connection) overlaps.
//! [`RawTpm::evict_all`] empties the TPM's transient slots between cases, so the agent, keyward's
//! backend in this process and this baseline take turns (each reloads what it needs).

use std::path::{Path, PathBuf};
use std::str::FromStr;

use tss_esapi::constants::CapabilityType;
use tss_esapi::constants::PropertyTag;
use tss_esapi::handles::{KeyHandle, ObjectHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Auth, CapabilityData, Digest, HashScheme, Signature as TpmSignature, SignatureScheme,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::Context;

use crate::backend::tpm::{self, TpmAuth};
use crate::config::TpmConfig;
use crate::error::{Error, Result};
use crate::model::{Algorithm, KeyType};

/// First transient handle (TPM 2.0 Part 2: HR_TRANSIENT).
const TRANSIENT_FIRST: u32 = 0x8000_0000;
/// How many transient handles one capability query asks for (swtpm has 3, hardware ~3–7).
const TRANSIENT_QUERY: u32 = 64;

/// A TPM opened for raw signing: its TCTI and auth values (contexts are made per thread, as
/// an ESAPI context is not `Send`).
pub struct RawTpm {
    alias: String,
    tcti: String,
    keys_dir: PathBuf,
    owner_auth: Option<Auth>,
    key_auth: Option<Auth>,
}

/// A key blob loaded for one case (flushed when dropped). Lives on the thread that loaded it.
pub struct LoadedKey {
    ctx: Context,
    handle: KeyHandle,
    target: KeyTarget,
}

/// Where a loaded key is, for other threads' contexts (plain data: `Send` and `Copy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyTarget {
    /// The key object's TPM handle (0x80xxxxxx).
    pub tpm_handle: u32,
    pub key_type: KeyType,
    /// Whether the key has an auth value (then the configured `key_auth` is presented).
    pub auth: bool,
}

/// One thread's signer: its own context, an ESYS reference to the loaded key, the scheme.
pub struct RawSigner {
    ctx: Context,
    handle: ObjectHandle,
    alg: Algorithm,
    scheme: SignatureScheme,
}

fn tss(what: &str, e: tss_esapi::Error) -> Error {
    Error::BackendUnavailable(format!("raw tss-esapi {what}: {e}"))
}

impl RawTpm {
    /// Check the TCTI and that the TPM answers (one round trip).
    pub fn open(alias: &str, cfg: &TpmConfig, keys_dir: &Path, auth: &TpmAuth) -> Result<RawTpm> {
        let t = RawTpm {
            alias: alias.to_string(),
            tcti: tpm::effective_tcti(cfg),
            keys_dir: keys_dir.to_path_buf(),
            owner_auth: tpm::to_auth(auth.owner.as_ref())?,
            key_auth: tpm::to_auth(auth.key.as_ref())?,
        };
        tpm::check_tcti(&t.tcti)?;
        t.context()?
            .get_tpm_property(PropertyTag::Manufacturer)
            .map_err(|e| tss("TPM2_GetCapability", e))?;
        Ok(t)
    }

    pub fn alias(&self) -> &str {
        &self.alias
    }

    pub fn tcti(&self) -> &str {
        &self.tcti
    }

    fn context(&self) -> Result<Context> {
        let conf = TctiNameConf::from_str(&self.tcti)
            .map_err(|e| Error::Config(format!("invalid TCTI {:?}: {e}", self.tcti)))?;
        Context::new(conf).map_err(|e| tss(&format!("connecting to {}", self.tcti), e))
    }

    /// The blob file of a tpm locator on this TPM (`<alias>:<name>.<version>.tpm`), if it is one.
    pub fn blob_of(&self, locator: &str) -> Option<PathBuf> {
        tpm::blob_in_locator(locator, &self.alias).map(|f| self.keys_dir.join(f))
    }

    /// Flush every transient object on the TPM (what `tpm2_flushcontext -t` does), whoever
    /// loaded it: between cases, so the next path finds free slots. keyward's backends (the
    /// agent's and this process's) find their handles gone on their next request and reload
    /// (the documented "someone flushed keyward's objects" case). Returns how many were flushed.
    pub fn evict_all(&self) -> Result<usize> {
        let mut ctx = self.context()?;
        let (data, _) = ctx
            .get_capability(CapabilityType::Handles, TRANSIENT_FIRST, TRANSIENT_QUERY)
            .map_err(|e| tss("TPM2_GetCapability(handles)", e))?;
        let handles = match data {
            CapabilityData::Handles(h) => h.into_inner(),
            _ => Vec::new(),
        };
        let mut n = 0;
        for h in handles {
            if !matches!(h, TpmHandle::Transient(_)) {
                continue;
            }
            // Another process may flush it meanwhile: a vanished object is no error here.
            if let Ok(o) = ctx.tr_from_tpm_public(h) {
                if ctx.flush_context(o).is_ok() {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Load a key blob under the storage key (created from keyward's SRK template, flushed
    /// again once the key is loaded). Not timed: the loop signs with the loaded key.
    pub fn load(&self, blob: &Path) -> Result<LoadedKey> {
        let b = tpm::read_blob(blob)?;
        let mut ctx = self.context()?;
        if let Some(a) = &self.owner_auth {
            ctx.tr_set_auth(ObjectHandle::Owner, a.clone())
                .map_err(|e| tss("setting the owner auth", e))?;
        }
        let primary = ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.create_primary(
                    Hierarchy::Owner,
                    tpm::srk_template()?,
                    None,
                    None,
                    None,
                    None,
                )
            })
            .map_err(|e| tss("TPM2_CreatePrimary (storage key)", e))?
            .key_handle;
        let loaded = ctx.execute_with_session(Some(AuthSession::Password), |c| {
            c.load(primary, b.private.clone(), b.public.clone())
        });
        let _ = ctx.flush_context(primary.into());
        let handle = loaded.map_err(|e| tss(&format!("TPM2_Load {}", blob.display()), e))?;
        if b.auth {
            if let Some(a) = &self.key_auth {
                ctx.tr_set_auth(handle.into(), a.clone())
                    .map_err(|e| tss("setting the key auth", e))?;
            }
        }
        let mut key = LoadedKey {
            ctx,
            handle,
            target: KeyTarget {
                tpm_handle: 0,
                key_type: b.key_type,
                auth: b.auth,
            },
        };
        key.target.tpm_handle = key.find_tpm_handle()?;
        Ok(key)
    }

    /// A signer with its own context (call it on the thread that signs) referring to `key`'s
    /// object: no second copy of the key, no slot of its own.
    pub fn signer(&self, key: KeyTarget, alg: Algorithm) -> Result<RawSigner> {
        let scheme = scheme(key.key_type, alg)?;
        let mut ctx = self.context()?;
        let th = TpmHandle::try_from(key.tpm_handle)
            .map_err(|e| tss(&format!("handle {:#x}", key.tpm_handle), e))?;
        let mut handle = ctx
            .tr_from_tpm_public(th)
            .map_err(|e| tss("TPM2_ReadPublic (loaded key)", e))?;
        if let (true, Some(a)) = (key.auth, &self.key_auth) {
            if let Err(e) = ctx.tr_set_auth(handle, a.clone()) {
                let _ = ctx.tr_close(&mut handle);
                return Err(tss("setting the key auth", e));
            }
        }
        Ok(RawSigner {
            ctx,
            handle,
            alg,
            scheme,
        })
    }
}

impl LoadedKey {
    /// Where the key is, for other threads' [`RawTpm::signer`]s.
    pub fn target(&self) -> KeyTarget {
        self.target
    }

    /// The transient handle whose object has this key's name.
    fn find_tpm_handle(&mut self) -> Result<u32> {
        let want = self
            .ctx
            .tr_get_name(self.handle.into())
            .map_err(|e| tss("Esys_TR_GetName", e))?;
        let (data, _) = self
            .ctx
            .get_capability(CapabilityType::Handles, TRANSIENT_FIRST, TRANSIENT_QUERY)
            .map_err(|e| tss("TPM2_GetCapability(handles)", e))?;
        let CapabilityData::Handles(handles) = data else {
            return Err(Error::Internal("the TPM listed no handles".into()));
        };
        for h in handles.into_inner() {
            let Ok(mut o) = self.ctx.tr_from_tpm_public(h) else {
                continue;
            };
            let same = self
                .ctx
                .tr_get_name(o)
                .is_ok_and(|n| n.value() == want.value());
            // A second ESYS reference to an object: close it, never flush it.
            let _ = self.ctx.tr_close(&mut o);
            if same {
                return Ok(u32::from(h));
            }
        }
        Err(Error::Internal(
            "the loaded key is not among the TPM's transient objects".into(),
        ))
    }
}

impl Drop for LoadedKey {
    fn drop(&mut self) {
        let _ = self.ctx.flush_context(self.handle.into());
    }
}

impl RawSigner {
    /// One TPM2_Sign with the digest computed here (SHA-256, as keyward's backend does), the
    /// scheme keyward uses (RSASSA-PSS or ECDSA, SHA-256). ECDSA comes back as r ‖ s.
    pub fn sign(&mut self, msg: &[u8]) -> Result<Vec<u8>> {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, msg);
        let digest = Digest::try_from(d.as_ref().to_vec()).map_err(|e| tss("digest", e))?;
        let (h, scheme) = (self.handle, self.scheme);
        let sig = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.sign(h.into(), digest, scheme, tpm::null_ticket()?)
            })
            .map_err(|e| tss("TPM2_Sign", e))?;
        match sig {
            TpmSignature::RsaSsa(s) | TpmSignature::RsaPss(s) => Ok(s.signature().value().to_vec()),
            TpmSignature::EcDsa(s) => {
                let mut out = pad32(s.signature_r().value())?;
                out.extend_from_slice(&pad32(s.signature_s().value())?);
                Ok(out)
            }
            _ => Err(Error::Internal(format!(
                "the TPM returned an unexpected signature type for {}",
                self.alg
            ))),
        }
    }
}

impl Drop for RawSigner {
    /// The object belongs to the [`LoadedKey`]: close this context's reference (dropping the
    /// context would flush a transient object it refers to).
    fn drop(&mut self) {
        let _ = self.ctx.tr_close(&mut self.handle);
    }
}

/// The TPM scheme keyward's tpm backend uses for `alg` (the benchmark's two: RSA-2048
/// RSASSA-PSS SHA-256 and ECDSA P-256 SHA-256; RSASSA PKCS#1 v1.5 SHA-256 too).
fn scheme(key_type: KeyType, alg: Algorithm) -> Result<SignatureScheme> {
    let hash_scheme = HashScheme::new(HashingAlgorithm::Sha256);
    let s = match alg {
        Algorithm::RsaPssSha256 if key_type.is_rsa() => SignatureScheme::RsaPss { hash_scheme },
        Algorithm::RsaPkcs1Sha256 if key_type.is_rsa() => SignatureScheme::RsaSsa { hash_scheme },
        Algorithm::EcdsaP256Sha256 if key_type == KeyType::P256 => {
            SignatureScheme::EcDsa { hash_scheme }
        }
        other => {
            return Err(Error::Unsupported(format!(
                "the raw tss-esapi baseline does not sign {other} with a {key_type} key"
            )))
        }
    };
    Ok(s)
}

fn pad32(v: &[u8]) -> Result<Vec<u8>> {
    let v = &v[v.iter().take_while(|b| **b == 0).count()..];
    if v.len() > 32 {
        return Err(Error::Internal(
            "ECDSA component longer than the curve".into(),
        ));
    }
    let mut out = vec![0u8; 32 - v.len()];
    out.extend_from_slice(v);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_match_the_backend() {
        assert!(matches!(
            scheme(KeyType::Rsa2048, Algorithm::RsaPssSha256),
            Ok(SignatureScheme::RsaPss { .. })
        ));
        assert!(matches!(
            scheme(KeyType::P256, Algorithm::EcdsaP256Sha256),
            Ok(SignatureScheme::EcDsa { .. })
        ));
        assert!(scheme(KeyType::P256, Algorithm::RsaPssSha256).is_err());
        assert!(scheme(KeyType::HmacSha256, Algorithm::HmacSha256).is_err());
    }

    #[test]
    fn pads_ecdsa_components() {
        assert_eq!(pad32(&[1, 2]).unwrap().len(), 32);
        assert_eq!(pad32(&[0, 0, 7]).unwrap()[31], 7);
        assert!(pad32(&[1u8; 33]).is_err());
    }

    #[test]
    fn blob_locators() {
        let t = RawTpm {
            alias: "bench".into(),
            tcti: "swtpm:host=127.0.0.1,port=1".into(),
            keys_dir: PathBuf::from("/h/keys"),
            owner_auth: None,
            key_auth: None,
        };
        assert_eq!(
            t.blob_of("bench:p256.1.tpm"),
            Some(PathBuf::from("/h/keys/p256.1.tpm"))
        );
        assert_eq!(t.blob_of("other:p256.1.tpm"), None);
        assert_eq!(t.blob_of("bench:0x81000001"), None);
        assert_eq!(t.blob_of("bench:../x.tpm"), None);
        assert_eq!(t.blob_of("bench:.x.tpm"), None);
    }
}
