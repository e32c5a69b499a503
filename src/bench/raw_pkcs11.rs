//! The PKCS#11 baseline: C_Sign called directly through `cryptoki` on the token keyward uses,
//! one session per benchmark thread, with the mechanisms keyward's pkcs11 backend uses. No
//! keyward code sits between the loop and the module: this is what the token itself delivers.

use std::path::PathBuf;
use std::sync::Mutex;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use crate::config::TokenConfig;
use crate::error::{Error, Result};
use crate::model::Algorithm;
use crate::secret::SecretBytes;

/// A token opened for raw signing: the module initialised once, the user logged in once (the
/// login holds as long as one session of this process is open; `anchor` is that session).
pub struct RawToken {
    alias: String,
    module: PathBuf,
    anchor: Mutex<Session>,
    slot: Slot,
    ctx: Pkcs11,
}

/// One thread's signer: its own session, the key's handle, the mechanism's parameters.
pub struct RawSigner {
    session: Session,
    handle: ObjectHandle,
    alg: Algorithm,
}

fn ck(what: &str, e: CkError) -> Error {
    Error::BackendUnavailable(format!("raw PKCS#11 {what}: {e}"))
}

impl RawToken {
    /// Load the module, find the token by label/serial (as keyward does) and log in.
    pub fn open(alias: &str, cfg: &TokenConfig, pin: &SecretBytes) -> Result<RawToken> {
        if !cfg.module.is_file() {
            return Err(Error::BackendUnavailable(format!(
                "PKCS#11 module {} does not exist",
                cfg.module.display()
            )));
        }
        let ctx = Pkcs11::new(&cfg.module).map_err(|e| ck("loading the module", e))?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(ck("C_Initialize", e)),
        }
        // The same selection rule keyward uses (not timed: only C_Sign is measured).
        let slot = crate::backend::pkcs11::find_slot(&ctx, cfg)
            .map_err(|e| Error::BackendUnavailable(format!("raw PKCS#11: token `{alias}`: {e}")))?;
        let anchor = ctx
            .open_ro_session(slot)
            .map_err(|e| ck("C_OpenSession", e))?;
        let pin = std::str::from_utf8(pin.expose())
            .map_err(|_| Error::BadPassphrase("the PIN is not UTF-8".into()))?;
        match anchor.login(UserType::User, Some(&AuthPin::from(pin.to_owned()))) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => return Err(ck("C_Login", e)),
        }
        Ok(RawToken {
            alias: alias.to_string(),
            module: cfg.module.clone(),
            anchor: Mutex::new(anchor),
            slot,
            ctx,
        })
    }

    pub fn alias(&self) -> &str {
        &self.alias
    }

    pub fn module(&self) -> &std::path::Path {
        &self.module
    }

    /// Whether the private key with CKA_ID `id` is on the token.
    pub fn has_key(&self, id: &[u8]) -> Result<bool> {
        let s = self.anchor.lock().unwrap_or_else(|p| p.into_inner());
        Ok(find_private(&s, id)?.is_some())
    }

    /// A signer with its own new session (call it on the thread that signs).
    pub fn signer(&self, id: &[u8], alg: Algorithm) -> Result<RawSigner> {
        mechanism(alg, |_| ())?;
        let session = self
            .ctx
            .open_ro_session(self.slot)
            .map_err(|e| ck("C_OpenSession", e))?;
        let handle = find_private(&session, id)?.ok_or_else(|| {
            Error::UnknownKey(format!(
                "no private key with CKA_ID {} on token `{}`",
                hex::encode(id),
                self.alias
            ))
        })?;
        Ok(RawSigner {
            session,
            handle,
            alg,
        })
    }
}

impl RawSigner {
    /// One C_SignInit + C_Sign, exactly the mechanism keyward's pkcs11 backend uses for `alg`
    /// (ECDSA: SHA-256/384 on the host, then CKM_ECDSA, as for SoftHSM).
    pub fn sign(&mut self, msg: &[u8]) -> Result<Vec<u8>> {
        let (s, h) = (&self.session, self.handle);
        let digest;
        let input = match self.alg {
            Algorithm::EcdsaP256Sha256 => {
                digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, msg);
                digest.as_ref()
            }
            Algorithm::EcdsaP384Sha384 => {
                digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA384, msg);
                digest.as_ref()
            }
            _ => msg,
        };
        mechanism(self.alg, |m| s.sign(m, h, input))?.map_err(|e| ck("C_Sign", e))
    }
}

/// Build `alg`'s mechanism on this thread (Mechanism values are not Send) and hand it to `f`.
fn mechanism<T>(alg: Algorithm, f: impl FnOnce(&Mechanism) -> T) -> Result<T> {
    let pss = |hash: MechanismType, mgf: PkcsMgfType, len: u64| PkcsPssParams {
        hash_alg: hash,
        mgf,
        s_len: len.into(),
    };
    let m = match alg {
        Algorithm::Ed25519 => Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
        Algorithm::EcdsaP256Sha256 | Algorithm::EcdsaP384Sha384 => Mechanism::Ecdsa,
        Algorithm::RsaPkcs1Sha256 => Mechanism::Sha256RsaPkcs,
        Algorithm::RsaPkcs1Sha512 => Mechanism::Sha512RsaPkcs,
        Algorithm::RsaPssSha256 => {
            Mechanism::Sha256RsaPkcsPss(pss(MechanismType::SHA256, PkcsMgfType::MGF1_SHA256, 32))
        }
        Algorithm::RsaPssSha512 => {
            Mechanism::Sha512RsaPkcsPss(pss(MechanismType::SHA512, PkcsMgfType::MGF1_SHA512, 64))
        }
        Algorithm::HmacSha256 => Mechanism::Sha256Hmac,
        Algorithm::HmacSha512 => Mechanism::Sha512Hmac,
        other => {
            return Err(Error::Unsupported(format!(
                "the raw PKCS#11 baseline does not sign {other} (recovery ids are keyward's work)"
            )))
        }
    };
    Ok(f(&m))
}

fn find_private(s: &Session, id: &[u8]) -> Result<Option<ObjectHandle>> {
    for class in [ObjectClass::PRIVATE_KEY, ObjectClass::SECRET_KEY] {
        let found = s
            .find_objects(&[Attribute::Class(class), Attribute::Id(id.to_vec())])
            .map_err(|e| ck("C_FindObjects", e))?;
        if let Some(h) = found.into_iter().next() {
            return Ok(Some(h));
        }
    }
    Ok(None)
}

/// The CKA_ID of a pkcs11 locator (`<alias>:<hex id>`) if it is on token `alias`.
pub fn id_in_locator(locator: &str, alias: &str) -> Option<Vec<u8>> {
    let (a, id) = locator.split_once(':')?;
    if a != alias {
        return None;
    }
    hex::decode(id).ok().filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locator_ids() {
        assert_eq!(
            id_in_locator("bench:00ff10", "bench"),
            Some(vec![0x00, 0xff, 0x10])
        );
        assert_eq!(id_in_locator("other:00ff10", "bench"), None);
        assert_eq!(id_in_locator("bench:", "bench"), None);
        assert_eq!(id_in_locator("bench:zz", "bench"), None);
        assert_eq!(id_in_locator("keys/x.age", "bench"), None);
    }

    #[test]
    fn mechanisms_match_the_backend() {
        assert!(mechanism(Algorithm::RsaPssSha256, |m| matches!(
            m,
            Mechanism::Sha256RsaPkcsPss(_)
        ))
        .unwrap());
        assert!(mechanism(Algorithm::EcdsaP256Sha256, |m| matches!(
            m,
            Mechanism::Ecdsa
        ))
        .unwrap());
        assert!(mechanism(Algorithm::Ed25519, |m| matches!(m, Mechanism::Eddsa(_))).unwrap());
        assert!(mechanism(Algorithm::EcdsaSecp256k1Keccak256, |_| ()).is_err());
    }

    #[test]
    fn a_missing_module_is_a_clear_error() {
        let cfg = TokenConfig {
            module: PathBuf::from("/nonexistent/libnothing.so"),
            label: Some("x".into()),
            serial: None,
            pin: "prompt".into(),
            sessions: 1,
            timeout_ms: 2000,
        };
        let e = RawToken::open("x", &cfg, &SecretBytes::from_slice(b"1234"))
            .err()
            .unwrap();
        assert_eq!(e.code(), "backend_unavailable");
    }
}
