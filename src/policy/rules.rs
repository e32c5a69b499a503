//! The policy sections of `keyward.toml` (`[clients.*]`, `[keys.*]`) as parsed, strictly.
//! Compilation into matchers and validation of globs and decimals lives in `engine.rs`.

use serde::{Deserialize, Serialize};

use crate::model::Env;

/// `[clients.<name>]`: who a peer is, by kernel-verified credentials first.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientRule {
    /// Peer uids (SO_PEERCRED); the client matches when its uid is listed or its gid is.
    #[serde(default)]
    pub uids: Vec<u32>,
    #[serde(default)]
    pub gids: Vec<u32>,
    /// Optional: `/proc/<pid>/exe` must match one of these globs.
    #[serde(default)]
    pub exe: Vec<String>,
    /// Optional: SHA-256 (hex) of a token the connection must present in `hello`.
    pub token_sha256: Option<String>,
    /// `demo` clients can never use a `prod` key.
    pub env: Option<Env>,
    /// `admin` may lock, unlock and reload.
    #[serde(default)]
    pub roles: Vec<Role>,
    /// Token bucket for everything this client signs.
    pub rate: Option<RateSpec>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Admin,
}

/// `[keys.<name>]`: what may be signed with one key. Absent settings do not restrict.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPolicy {
    /// Client names allowed to use the key (absent: every identified client).
    pub clients: Option<Vec<String>>,
    /// Profiles the key may sign for (absent: the profiles bound in its metadata; none
    /// there either: any profile).
    pub profiles: Option<Vec<String>>,
    /// Overrides the environment recorded in the key's metadata.
    pub env: Option<Env>,
    pub rate: Option<RateSpec>,
    /// Signatures per UTC day; persisted in `state/`, so a restart does not reset it.
    pub daily_max: Option<u64>,
    /// HTTP methods allowed (exact, case-sensitive as sent).
    pub methods: Option<Vec<String>>,
    /// Path globs a request must match one of (`*` matches any characters, `/` included).
    pub allow_paths: Option<Vec<String>>,
    /// Path globs that are always refused (case-insensitive), on top of the profile's
    /// default deny list (withdrawals, transfers).
    #[serde(default)]
    pub deny_paths: Vec<String>,
    /// Explicit opt-out: default-denied paths (withdrawals, transfers) matching these globs
    /// are allowed.
    #[serde(default)]
    pub allow_default_denied: Vec<String>,
    pub max_body_bytes: Option<usize>,
    pub guards: Option<Guards>,
    pub lock_after_denials: Option<LockAfter>,
    /// A request may carry its own timestamp/nonce within this many ms of the agent's clock.
    pub client_timestamp_skew_ms: Option<u64>,
    /// Allow raw signing (`sign` op, `raw` profile) although the key is bound to a profile.
    #[serde(default)]
    pub allow_raw: bool,
    /// EIP-712 domain names allowed (eip712, polymarket L1, hyperliquid).
    pub eip712_domains: Option<Vec<String>>,
    /// EIP-712 primary types allowed.
    pub eip712_types: Option<Vec<String>>,
}

/// A token bucket: `burst` at once, refilled at `per_second`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateSpec {
    pub per_second: u32,
    pub burst: u32,
}

/// Order guards: decimal limits as strings (`"5"`, `"0.25"`) so no float rounding applies.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Guards {
    pub symbols: Option<Vec<String>>,
    pub max_quantity: Option<String>,
    /// quantity × price, where both are present in the request.
    pub max_notional: Option<String>,
}

/// Lock the key after `count` denials within `within_s` seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LockAfter {
    pub count: u32,
    pub within_s: u64,
}
