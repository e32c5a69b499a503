//! The compiled policy: identifies a peer as a named client and judges a request rule by rule.
//! Built once per config load (globs compiled, decimals parsed), so a check costs microseconds.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::Arc;

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use rust_decimal::Decimal;

use super::rules::{ClientRule, Guards, KeyPolicy, LockAfter, RateSpec, Role};
use crate::error::{Error, Result};
use crate::model::{Env, KeyName};
use crate::profile::{ProfileName, RequestView};

/// The name of the implicit client every peer running as the agent's user or root becomes
/// when no configured client matches it.
pub const OWNER: &str = "owner";

/// A connected peer as the kernel reports it.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub exe: Option<String>,
    /// SHA-256 of the token the connection presented in `hello`, if any.
    pub token_sha256: Option<[u8; 32]>,
}

/// A peer identified as a configured (or the implicit owner) client.
#[derive(Debug, PartialEq, Eq)]
pub struct Client {
    pub name: String,
    pub env: Option<Env>,
    pub admin: bool,
    pub rate: Option<RateSpec>,
}

struct CompiledClient {
    uids: Vec<u32>,
    gids: Vec<u32>,
    exe: Option<GlobSet>,
    token_sha256: Option<[u8; 32]>,
    client: Arc<Client>,
}

/// A key's policy with its globs and limits compiled.
pub struct CompiledKey {
    pub rule: KeyPolicy,
    allow_paths: Option<GlobSet>,
    deny_paths: GlobSet,
    allow_default_denied: GlobSet,
    max_quantity: Option<Decimal>,
    max_notional: Option<Decimal>,
}

/// One rule's verdict, for `policy explain` and for denials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub rule: &'static str,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    /// The rule is not configured for this key.
    NotSet,
    Fail(String),
}

/// What is being asked: a profile request, or raw bytes through the `sign` op.
pub enum Ask<'a> {
    Profile(ProfileName, &'a RequestView),
    Raw,
}

/// The facts about a key policy needs from its metadata.
pub struct KeyFacts<'a> {
    pub name: &'a KeyName,
    pub env: Env,
    pub bound_profiles: &'a [String],
}

pub struct Policy {
    /// In config (name) order; the first match names the peer.
    clients: Vec<CompiledClient>,
    owner: Arc<Client>,
    keys: HashMap<String, CompiledKey>,
    unrestricted: CompiledKey,
    agent_uid: u32,
}

impl Policy {
    /// Compiles the `[clients]` and `[keys]` sections; any invalid glob, decimal, token hash
    /// or reference to an unknown client is an error naming the setting.
    pub fn compile(
        clients: &BTreeMap<String, ClientRule>,
        keys: &BTreeMap<String, KeyPolicy>,
        agent_uid: u32,
    ) -> Result<Policy> {
        let mut compiled = Vec::new();
        for (name, c) in clients {
            let at = |what: &str| format!("clients.{name}.{what}");
            if name == OWNER {
                return Err(Error::Config(format!(
                    "clients.{OWNER}: the name is reserved for the agent's own user and root"
                )));
            }
            if KeyName::new(name).is_err() {
                return Err(Error::Config(format!(
                    "clients.{name}: client names use [a-z0-9._-]"
                )));
            }
            if c.uids.is_empty() && c.gids.is_empty() {
                return Err(Error::Config(format!(
                    "clients.{name}: set `uids` or `gids` (peer credentials are always checked)"
                )));
            }
            let exe = if c.exe.is_empty() {
                None
            } else {
                Some(globs(&c.exe, false, &at("exe"))?)
            };
            let token_sha256 = c
                .token_sha256
                .as_deref()
                .map(|h| {
                    parse_sha256(h).ok_or_else(|| {
                        Error::Config(format!("{}: expected 64 hex digits", at("token_sha256")))
                    })
                })
                .transpose()?;
            if let Some(r) = &c.rate {
                check_rate(r, &at("rate"))?;
            }
            compiled.push(CompiledClient {
                uids: c.uids.clone(),
                gids: c.gids.clone(),
                exe,
                token_sha256,
                client: Arc::new(Client {
                    name: name.clone(),
                    env: c.env,
                    admin: c.roles.contains(&Role::Admin),
                    rate: c.rate,
                }),
            });
        }
        let mut compiled_keys = HashMap::new();
        for (name, k) in keys {
            if KeyName::new(name).is_err() {
                return Err(Error::Config(format!(
                    "keys.{name}: key names use [a-z0-9][a-z0-9._-]"
                )));
            }
            if let Some(cs) = &k.clients {
                for c in cs {
                    if c != OWNER && !clients.contains_key(c) {
                        return Err(Error::Config(format!(
                            "keys.{name}.clients: no client `{c}` is configured"
                        )));
                    }
                }
            }
            compiled_keys.insert(name.clone(), compile_key(name, k)?);
        }
        Ok(Policy {
            clients: compiled,
            owner: Arc::new(Client {
                name: OWNER.into(),
                env: None,
                admin: true,
                rate: None,
            }),
            keys: compiled_keys,
            unrestricted: compile_key("(default)", &KeyPolicy::default())?,
            agent_uid,
        })
    }

    /// Who this peer is: the first configured client it matches, else the implicit owner
    /// client for the agent's user and root, else `unauthorized`.
    pub fn identify(&self, peer: &Peer) -> Result<Arc<Client>> {
        for c in &self.clients {
            if !(c.uids.contains(&peer.uid) || c.gids.contains(&peer.gid)) {
                continue;
            }
            if let Some(set) = &c.exe {
                match &peer.exe {
                    Some(exe) if set.is_match(exe) => {}
                    _ => continue,
                }
            }
            if let Some(want) = &c.token_sha256 {
                match &peer.token_sha256 {
                    Some(got) if constant_time_eq(got, want) => {}
                    _ => continue,
                }
            }
            return Ok(c.client.clone());
        }
        if peer.uid == 0 || peer.uid == self.agent_uid {
            return Ok(self.owner.clone());
        }
        Err(Error::Unauthorized(format!(
            "uid {} matches no configured client",
            peer.uid
        )))
    }

    /// A client by name (`owner` included), for `policy explain`.
    pub fn client(&self, name: &str) -> Option<Arc<Client>> {
        if name == OWNER {
            return Some(self.owner.clone());
        }
        self.clients
            .iter()
            .find(|c| c.client.name == name)
            .map(|c| c.client.clone())
    }

    /// Whether any configured client could match this uid/gid (decides whether a connection
    /// is accepted before `hello`).
    pub fn may_connect(&self, uid: u32, gid: u32) -> bool {
        uid == 0
            || uid == self.agent_uid
            || self
                .clients
                .iter()
                .any(|c| c.uids.contains(&uid) || c.gids.contains(&gid))
    }

    /// The key's compiled policy (an unrestricted one when the key has no section).
    pub fn key(&self, name: &KeyName) -> &CompiledKey {
        self.keys.get(name.as_str()).unwrap_or(&self.unrestricted)
    }

    /// The first failing rule as an error (`policy_denied`, or `forbidden` for raw signing of
    /// a profile-bound key), with the rule named.
    pub fn check(&self, client: &Client, key: &KeyFacts<'_>, ask: &Ask<'_>) -> Result<()> {
        let mut denial = None;
        self.evaluate(client, key, ask, &mut |v| match v.outcome {
            Outcome::Fail(msg) => {
                denial = Some((v.rule, msg));
                false
            }
            _ => true,
        });
        match denial {
            None => Ok(()),
            Some((rule @ "raw", msg)) => Err(Error::Forbidden(format!("rule {rule}: {msg}"))),
            Some((rule, msg)) => Err(Error::PolicyDenied(format!("rule {rule}: {msg}"))),
        }
    }

    /// Every rule and its verdict (`keyward policy explain`).
    pub fn explain(&self, client: &Client, key: &KeyFacts<'_>, ask: &Ask<'_>) -> Vec<Verdict> {
        let mut out = Vec::new();
        self.evaluate(client, key, ask, &mut |v| {
            out.push(v);
            true
        });
        out
    }

    /// Walks the rules in a fixed order; `sink` returns false to stop.
    fn evaluate(
        &self,
        client: &Client,
        key: &KeyFacts<'_>,
        ask: &Ask<'_>,
        sink: &mut dyn FnMut(Verdict) -> bool,
    ) {
        let k = self.key(key.name);
        let rule = &k.rule;
        macro_rules! emit {
            ($rule:expr, $outcome:expr) => {
                if !sink(Verdict {
                    rule: $rule,
                    outcome: $outcome,
                }) {
                    return;
                }
            };
        }
        emit!(
            "clients",
            match &rule.clients {
                None => Outcome::NotSet,
                Some(cs) if cs.contains(&client.name) => Outcome::Pass,
                Some(_) => Outcome::Fail(format!(
                    "client `{}` may not use key `{}`",
                    client.name, key.name
                )),
            }
        );
        let key_env = rule.env.unwrap_or(key.env);
        emit!(
            "env",
            match client.env {
                Some(Env::Demo) if key_env == Env::Prod => Outcome::Fail(format!(
                    "demo client `{}` may not use prod key `{}`",
                    client.name, key.name
                )),
                Some(_) => Outcome::Pass,
                None => Outcome::NotSet,
            }
        );
        let bound: &[String] = rule.profiles.as_deref().unwrap_or(key.bound_profiles);
        let view = match ask {
            Ask::Raw => {
                emit!(
                    "raw",
                    if bound.is_empty() || rule.allow_raw {
                        Outcome::Pass
                    } else {
                        Outcome::Fail(format!(
                            "key `{}` is bound to profile {}; raw signing needs allow_raw = true",
                            key.name,
                            bound.join(", ")
                        ))
                    }
                );
                return;
            }
            Ask::Profile(p, view) => {
                let outcome = if *p == ProfileName::Raw {
                    if bound.is_empty() || rule.allow_raw || bound.iter().any(|b| b == "raw") {
                        Outcome::Pass
                    } else {
                        Outcome::Fail(format!(
                            "key `{}` is bound to profile {}; raw signing needs allow_raw = true",
                            key.name,
                            bound.join(", ")
                        ))
                    }
                } else if bound.is_empty() {
                    Outcome::NotSet
                } else if bound.iter().any(|b| b == p.as_str()) {
                    Outcome::Pass
                } else {
                    Outcome::Fail(format!(
                        "key `{}` is bound to {}, not {p}",
                        key.name,
                        bound.join(", ")
                    ))
                };
                emit!(
                    if *p == ProfileName::Raw {
                        "raw"
                    } else {
                        "profiles"
                    },
                    outcome
                );
                view
            }
        };
        emit!(
            "methods",
            match (&rule.methods, &view.method) {
                (None, _) | (_, None) => Outcome::NotSet,
                (Some(ms), Some(m)) if ms.iter().any(|x| x == m) => Outcome::Pass,
                (Some(_), Some(m)) => Outcome::Fail(format!("method {m} is not allowed")),
            }
        );
        let path = view.path.as_deref();
        emit!(
            "path_canonical",
            match path {
                None => Outcome::NotSet,
                Some(p) => match non_canonical(p) {
                    None => Outcome::Pass,
                    Some(why) => Outcome::Fail(format!("path {why}")),
                },
            }
        );
        let profile_denied = match ask {
            Ask::Profile(p, _) => default_deny(*p),
            Ask::Raw => None,
        };
        emit!(
            "default_deny",
            match (path, profile_denied) {
                (Some(p), Some(set)) if set.is_match(p) && !k.allow_default_denied.is_match(p) =>
                    Outcome::Fail(format!(
                        "{} is a withdrawal/transfer endpoint, denied by default (opt out with allow_default_denied)",
                        crate::profile::util::truncate(p, 80)
                    )),
                (Some(_), Some(_)) => Outcome::Pass,
                _ => Outcome::NotSet,
            }
        );
        emit!(
            "deny_paths",
            match path {
                Some(p) if k.deny_paths.is_match(p) => Outcome::Fail(format!(
                    "{} matches deny_paths",
                    crate::profile::util::truncate(p, 80)
                )),
                Some(_) if !rule.deny_paths.is_empty() => Outcome::Pass,
                _ => Outcome::NotSet,
            }
        );
        emit!(
            "allow_paths",
            match (&k.allow_paths, path) {
                (Some(set), Some(p)) if set.is_match(p) => Outcome::Pass,
                (Some(_), Some(p)) => Outcome::Fail(format!(
                    "{} matches no allow_paths entry",
                    crate::profile::util::truncate(p, 80)
                )),
                _ => Outcome::NotSet,
            }
        );
        emit!(
            "max_body_bytes",
            match rule.max_body_bytes {
                Some(max) if view.body_len > max =>
                    Outcome::Fail(format!("body is {} bytes, more than {max}", view.body_len)),
                Some(_) => Outcome::Pass,
                None => Outcome::NotSet,
            }
        );
        emit!("guards", k.check_guards(rule.guards.as_ref(), view));
        emit!(
            "eip712",
            match &view.typed_data {
                None => Outcome::NotSet,
                Some(td) => {
                    let dom = td.domain_name.as_deref().unwrap_or("");
                    match (&rule.eip712_domains, &rule.eip712_types) {
                        (None, None) => Outcome::NotSet,
                        (Some(ds), _) if !ds.iter().any(|d| d == dom) => Outcome::Fail(format!(
                            "EIP-712 domain {dom:?} is not in eip712_domains"
                        )),
                        (_, Some(ts)) if !ts.contains(&td.primary_type) => Outcome::Fail(format!(
                            "EIP-712 primary type {:?} is not in eip712_types",
                            crate::profile::util::truncate(&td.primary_type, 64)
                        )),
                        _ => Outcome::Pass,
                    }
                }
            }
        );
    }
}

impl CompiledKey {
    fn check_guards(&self, guards: Option<&Guards>, view: &RequestView) -> Outcome {
        let Some(g) = guards else {
            return Outcome::NotSet;
        };
        for o in &view.orders {
            if let Some(symbols) = &g.symbols {
                match &o.symbol {
                    Some(s) if symbols.iter().any(|x| x == s) => {}
                    Some(s) => {
                        return Outcome::Fail(format!(
                            "symbol {:?} is not in guards.symbols",
                            crate::profile::util::truncate(s, 32)
                        ))
                    }
                    None => return Outcome::Fail("the order names no symbol".into()),
                }
            }
            let qty = match o.quantity.as_deref().map(parse_amount) {
                None => None,
                Some(Ok(q)) => Some(q),
                Some(Err(why)) => return Outcome::Fail(format!("quantity {why}")),
            };
            let price = match o.price.as_deref().map(parse_amount) {
                None => None,
                Some(Ok(p)) => Some(p),
                Some(Err(why)) => return Outcome::Fail(format!("price {why}")),
            };
            if let (Some(max), Some(q)) = (self.max_quantity, qty) {
                if q > max {
                    return Outcome::Fail(format!(
                        "quantity {q} exceeds guards.max_quantity {max}"
                    ));
                }
            }
            if let (Some(max), Some(q), Some(p)) = (self.max_notional, qty, price) {
                match q.checked_mul(p) {
                    Some(n) if n <= max => {}
                    Some(n) => {
                        return Outcome::Fail(format!(
                            "notional {n} exceeds guards.max_notional {max}"
                        ))
                    }
                    None => return Outcome::Fail("notional overflows".into()),
                }
            }
            if self.max_quantity.is_some() && qty.is_none() {
                return Outcome::Fail(
                    "the order has no quantity to check against guards.max_quantity".into(),
                );
            }
        }
        Outcome::Pass
    }
}

/// A non-negative decimal as an exchange writes it (`"0.01000000"`, `"5"`).
fn parse_amount(text: &str) -> std::result::Result<Decimal, String> {
    let t = text.trim();
    if t.is_empty() || t.len() > 40 || !t.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err("is not a plain non-negative decimal".into());
    }
    Decimal::from_str(t).map_err(|_| "is not a decimal".into())
}

fn compile_key(name: &str, k: &KeyPolicy) -> Result<CompiledKey> {
    let at = |what: &str| format!("keys.{name}.{what}");
    if let Some(ps) = &k.profiles {
        for p in ps {
            ProfileName::from_str(p)
                .map_err(|_| Error::Config(format!("{}: unknown profile `{p}`", at("profiles"))))?;
        }
    }
    if let Some(ms) = &k.methods {
        for m in ms {
            crate::profile::util::check_method(m)
                .map_err(|e| Error::Config(format!("{}: {e}", at("methods"))))?;
        }
    }
    if let Some(r) = &k.rate {
        check_rate(r, &at("rate"))?;
    }
    if k.daily_max == Some(0) {
        return Err(Error::Config(format!("{} must be > 0", at("daily_max"))));
    }
    if let Some(LockAfter { count, within_s }) = k.lock_after_denials {
        if count == 0 || within_s == 0 {
            return Err(Error::Config(format!(
                "{}: count and within_s must be > 0",
                at("lock_after_denials")
            )));
        }
    }
    let decimal = |v: &Option<String>, what: &str| -> Result<Option<Decimal>> {
        v.as_deref()
            .map(|s| {
                parse_amount(s).map_err(|why| Error::Config(format!("{}: {s:?} {why}", at(what))))
            })
            .transpose()
    };
    let (max_quantity, max_notional) = match &k.guards {
        Some(g) => (
            decimal(&g.max_quantity, "guards.max_quantity")?,
            decimal(&g.max_notional, "guards.max_notional")?,
        ),
        None => (None, None),
    };
    Ok(CompiledKey {
        allow_paths: k
            .allow_paths
            .as_ref()
            .map(|p| globs(p, false, &at("allow_paths")))
            .transpose()?,
        deny_paths: globs(&k.deny_paths, true, &at("deny_paths"))?,
        allow_default_denied: globs(&k.allow_default_denied, false, &at("allow_default_denied"))?,
        max_quantity,
        max_notional,
        rule: k.clone(),
    })
}

fn check_rate(r: &RateSpec, at: &str) -> Result<()> {
    if r.per_second == 0 || r.burst == 0 {
        return Err(Error::Config(format!(
            "{at}: per_second and burst must be > 0"
        )));
    }
    Ok(())
}

fn globs(patterns: &[String], case_insensitive: bool, at: &str) -> Result<GlobSet> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        b.add(glob(p, case_insensitive).map_err(|e| Error::Config(format!("{at}: {e}")))?);
    }
    b.build().map_err(|e| Error::Config(format!("{at}: {e}")))
}

fn glob(p: &str, case_insensitive: bool) -> std::result::Result<Glob, globset::Error> {
    GlobBuilder::new(p)
        .case_insensitive(case_insensitive)
        .literal_separator(false)
        .backslash_escape(true)
        .build()
}

/// Why a path could be read differently by the exchange than by a glob, if it could: dot
/// segments, doubled slashes, encoded dots/slashes or backslashes (e.g.
/// `/api/v3/../../sapi/v1/capital/withdraw/apply` must not pass `allow_paths = ["/api/v3/*"]`).
fn non_canonical(path: &str) -> Option<&'static str> {
    let lower = path.to_ascii_lowercase();
    if path.contains("//") {
        return Some("contains an empty segment (//)");
    }
    if path.split('/').any(|seg| seg == "." || seg == "..") {
        return Some("contains a dot segment");
    }
    if lower.contains("%2e")
        || lower.contains("%2f")
        || lower.contains("%5c")
        || path.contains('\\')
    {
        return Some("contains an encoded dot, slash or a backslash");
    }
    None
}

/// Each profile's built-in deny list: endpoints that move funds out (withdrawals, transfers).
/// A key opts out per path with `allow_default_denied`.
pub fn default_deny_patterns(p: ProfileName) -> &'static [&'static str] {
    match p {
        ProfileName::Binance => &[
            "/sapi/*/capital/withdraw*",
            "/sapi/*/asset/transfer*",
            "/sapi/*/sub-account/*transfer*",
            "/sapi/*/sub-account/*/transfer*",
            "/sapi/*/futures/transfer*",
            "/sapi/*/localentity/withdraw*",
            "/wapi/*",
        ],
        ProfileName::Okx => &[
            "/api/v5/asset/withdrawal*",
            "/api/v5/asset/cancel-withdrawal*",
            "/api/v5/asset/transfer*",
            "/api/v5/asset/subaccount/transfer*",
        ],
        ProfileName::Bybit => &["/v5/asset/withdraw/*", "/v5/asset/transfer/*"],
        ProfileName::Kraken => &[
            "/0/private/Withdraw*",
            "/0/private/WalletTransfer*",
            "/0/private/AccountTransfer*",
        ],
        ProfileName::Coinbase => &[
            "/v2/accounts/*/transactions*",
            "/api/v3/brokerage/portfolios/move_funds*",
        ],
        ProfileName::Kalshi
        | ProfileName::Polymarket
        | ProfileName::Hyperliquid
        | ProfileName::Eip191
        | ProfileName::Eip712
        | ProfileName::Raw => &[],
    }
}

fn default_deny(p: ProfileName) -> Option<&'static GlobSet> {
    use std::sync::OnceLock;
    static SETS: OnceLock<Vec<(ProfileName, GlobSet)>> = OnceLock::new();
    let sets = SETS.get_or_init(|| {
        ProfileName::ALL
            .into_iter()
            .filter_map(|p| {
                let mut b = GlobSetBuilder::new();
                for pat in default_deny_patterns(p) {
                    // The patterns are constants checked by a unit test.
                    b.add(glob(pat, true).ok()?);
                }
                Some((p, b.build().ok()?))
            })
            .collect()
    });
    sets.iter().find(|(q, _)| *q == p).map(|(_, s)| s)
}

/// What `token_sha256` stores for a client token.
pub fn token_hash(token: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes()).as_ref(),
    );
    out
}

fn parse_sha256(h: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(h.trim(), &mut out).ok()?;
    Some(out)
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::OrderView;

    /// A policy from keyward.toml text (the config's own parser and validation).
    fn compiled(text: &str) -> Result<Policy> {
        crate::config::Config::parse(text, std::path::Path::new("k.toml"))?.policy(1000)
    }

    fn policy(text: &str) -> Policy {
        compiled(text).unwrap()
    }

    /// The client a peer with this uid (and gid) is identified as.
    fn client(p: &Policy, uid: u32) -> Arc<Client> {
        p.identify(&Peer {
            uid,
            gid: uid,
            ..Peer::default()
        })
        .unwrap()
    }

    fn view(method: &str, path: &str) -> RequestView {
        RequestView {
            method: Some(method.into()),
            path: Some(path.into()),
            ..RequestView::default()
        }
    }

    const CFG: &str = r#"
[clients.bot]
uids = [1001]
[clients.demo-bot]
uids = [1002]
env = "demo"
[keys.bn]
clients = ["bot", "demo-bot"]
profiles = ["binance"]
env = "prod"
methods = ["GET", "POST"]
allow_paths = ["/api/v3/*"]
max_body_bytes = 100
guards = { symbols = ["BTCUSDT"], max_quantity = "5", max_notional = "1000" }
"#;

    #[test]
    fn every_default_deny_pattern_compiles() {
        for p in ProfileName::ALL {
            for pat in default_deny_patterns(p) {
                assert!(glob(pat, true).is_ok(), "{pat}");
            }
            assert!(default_deny(p).is_some());
        }
    }

    #[test]
    fn identification_by_uid_then_owner_then_unauthorized() {
        let p = policy(CFG);
        let peer = |uid| Peer {
            uid,
            gid: uid,
            ..Peer::default()
        };
        assert_eq!(p.identify(&peer(1001)).unwrap().name, "bot");
        assert_eq!(p.identify(&peer(1000)).unwrap().name, OWNER);
        assert!(p.identify(&peer(0)).unwrap().admin);
        assert_eq!(p.identify(&peer(4242)).unwrap_err().code(), "unauthorized");
    }

    #[test]
    fn tokens_and_exe_globs_must_match() {
        let hash =
            hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b"t0k").as_ref());
        let p = policy(&format!(
            "[clients.a]\nuids = [5]\nexe = [\"/opt/mm/*\"]\ntoken_sha256 = \"{hash}\"\n"
        ));
        let mut token = [0u8; 32];
        token.copy_from_slice(
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b"t0k").as_ref(),
        );
        let mut peer = Peer {
            uid: 5,
            gid: 5,
            exe: Some("/opt/mm/bot".into()),
            token_sha256: Some(token),
        };
        assert_eq!(p.identify(&peer).unwrap().name, "a");
        peer.exe = Some("/usr/bin/python3".into());
        assert!(p.identify(&peer).is_err());
        peer.exe = Some("/opt/mm/bot".into());
        peer.token_sha256 = Some([0; 32]);
        assert!(p.identify(&peer).is_err());
    }

    #[test]
    fn rules_deny_with_the_rule_named() {
        let p = policy(CFG);
        let bot = client(&p, 1001);
        let demo = client(&p, 1002);
        let name = KeyName::new("bn").unwrap();
        let facts = KeyFacts {
            name: &name,
            env: Env::Demo,
            bound_profiles: &[],
        };
        let deny = |c: &Client, ask: Ask<'_>| {
            p.check(c, &facts, &ask)
                .err()
                .map(|e| (e.code(), e.to_string()))
        };
        let ok = view("POST", "/api/v3/order");
        assert_eq!(deny(&bot, Ask::Profile(ProfileName::Binance, &ok)), None);
        let (code, msg) = deny(&demo, Ask::Profile(ProfileName::Binance, &ok)).unwrap();
        assert_eq!(code, "policy_denied");
        assert!(msg.starts_with("rule env:"), "{msg}");
        let (_, msg) = deny(&bot, Ask::Profile(ProfileName::Kraken, &ok)).unwrap();
        assert!(msg.starts_with("rule profiles:"), "{msg}");
        let (code, msg) = deny(&bot, Ask::Raw).unwrap();
        assert_eq!(code, "forbidden");
        assert!(msg.starts_with("rule raw:"), "{msg}");
        for (method, path, rule) in [
            ("DELETE", "/api/v3/order", "rule methods:"),
            (
                "POST",
                "/sapi/v1/capital/withdraw/apply",
                "rule default_deny:",
            ),
            (
                "POST",
                "/api/v3/../../sapi/v1/capital/withdraw/apply",
                "rule path_canonical:",
            ),
            ("GET", "/fapi/v1/order", "rule allow_paths:"),
        ] {
            let (_, msg) = deny(
                &bot,
                Ask::Profile(ProfileName::Binance, &view(method, path)),
            )
            .unwrap();
            assert!(msg.starts_with(rule), "{msg}");
        }
        let mut big = ok.clone();
        big.body_len = 101;
        let (_, msg) = deny(&bot, Ask::Profile(ProfileName::Binance, &big)).unwrap();
        assert!(msg.starts_with("rule max_body_bytes:"), "{msg}");
        let order = |s: &str, q: &str, px: Option<&str>| {
            let mut v = ok.clone();
            v.orders = vec![OrderView {
                symbol: Some(s.into()),
                quantity: Some(q.into()),
                price: px.map(Into::into),
            }];
            v
        };
        assert_eq!(
            deny(
                &bot,
                Ask::Profile(ProfileName::Binance, &order("BTCUSDT", "5", Some("200")))
            ),
            None
        );
        for (o, want) in [
            (order("ETHUSDT", "1", None), "symbol"),
            (order("BTCUSDT", "5.00000001", None), "max_quantity"),
            (order("BTCUSDT", "-1", None), "non-negative"),
            (order("BTCUSDT", "NaN", None), "non-negative"),
            (order("BTCUSDT", "5", Some("200.01")), "max_notional"),
        ] {
            let (_, msg) = deny(&bot, Ask::Profile(ProfileName::Binance, &o)).unwrap();
            assert!(
                msg.starts_with("rule guards:") && msg.contains(want),
                "{msg}"
            );
        }
    }

    #[test]
    fn explain_lists_every_rule() {
        let p = policy(CFG);
        let bot = client(&p, 1001);
        let name = KeyName::new("bn").unwrap();
        let facts = KeyFacts {
            name: &name,
            env: Env::Prod,
            bound_profiles: &[],
        };
        let v = view("GET", "/api/v3/account");
        let verdicts = p.explain(&bot, &facts, &Ask::Profile(ProfileName::Binance, &v));
        let rules: Vec<_> = verdicts.iter().map(|v| v.rule).collect();
        assert_eq!(
            rules,
            [
                "clients",
                "env",
                "profiles",
                "methods",
                "path_canonical",
                "default_deny",
                "deny_paths",
                "allow_paths",
                "max_body_bytes",
                "guards",
                "eip712"
            ]
        );
        assert!(verdicts
            .iter()
            .all(|v| !matches!(v.outcome, Outcome::Fail(_))));
    }

    #[test]
    fn invalid_policies_are_config_errors() {
        let bad = |t: &str| compiled(t).err().map(|e| e.code()).unwrap_or("ok");
        assert_eq!(bad("[clients.a]\nexe = [\"/x\"]\n"), "config");
        assert_eq!(bad("[keys.k]\nclients = [\"nobody\"]\n"), "config");
        assert_eq!(bad("[keys.k]\nprofiles = [\"ftx\"]\n"), "config");
        assert_eq!(bad("[keys.k]\nallow_paths = [\"/a/[\"]\n"), "config");
        assert_eq!(
            bad("[keys.k]\nguards = { max_quantity = \"1e3\" }\n"),
            "config"
        );
        assert_eq!(
            bad("[keys.k]\nrate = { per_second = 0, burst = 1 }\n"),
            "config"
        );
        assert_eq!(
            bad("[clients.a]\nuids = [1]\ntoken_sha256 = \"zz\"\n"),
            "config"
        );
        assert_eq!(bad("[clients.owner]\nuids = [1]\n"), "config");
    }
}
