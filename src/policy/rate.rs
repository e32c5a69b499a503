//! Token buckets per key and per client (governor, GCRA). They never queue: a request over
//! the limit is answered `rate_limited` at once with how long until it would pass.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;

use governor::clock::{Clock, DefaultClock};
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use super::rules::RateSpec;
use crate::error::{Error, Result};

type Bucket = RateLimiter<NotKeyed, InMemoryState, DefaultClock>;

/// One bucket with the spec it was built from (kept across reloads when unchanged).
struct Limiter {
    spec: RateSpec,
    bucket: Bucket,
}

/// All buckets, by `key:<name>` / `client:<name>`.
#[derive(Default)]
pub struct Limits {
    buckets: HashMap<String, Arc<Limiter>>,
}

impl Limits {
    /// Buckets for `specs`; a bucket whose spec did not change keeps its state, so a reload
    /// does not hand every client a fresh burst.
    pub fn rebuild(&self, specs: impl IntoIterator<Item = (String, RateSpec)>) -> Limits {
        let mut buckets = HashMap::new();
        for (id, spec) in specs {
            let limiter = match self.buckets.get(&id) {
                Some(l) if l.spec == spec => l.clone(),
                _ => Arc::new(Limiter {
                    spec,
                    bucket: RateLimiter::direct(quota(spec)),
                }),
            };
            buckets.insert(id, limiter);
        }
        Limits { buckets }
    }

    /// Takes one token from bucket `id` (absent bucket = unlimited).
    pub fn take(&self, id: &str) -> Result<()> {
        let Some(l) = self.buckets.get(id) else {
            return Ok(());
        };
        l.bucket.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let retry_after_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
            Error::RateLimited {
                message: format!(
                    "{id} is over its rate of {}/s (burst {})",
                    l.spec.per_second, l.spec.burst
                ),
                retry_after_ms,
            }
        })
    }
}

fn quota(spec: RateSpec) -> Quota {
    let nz = |v: u32| NonZeroU32::new(v).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(nz(spec.per_second)).allow_burst(nz(spec.burst))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refusal_with_retry_after() {
        let spec = RateSpec {
            per_second: 50,
            burst: 10,
        };
        let l = Limits::default().rebuild([("key:a".to_string(), spec)]);
        let ok = (0..100).filter(|_| l.take("key:a").is_ok()).count();
        assert!((10..=12).contains(&ok), "{ok}");
        match l.take("key:a").unwrap_err() {
            Error::RateLimited { retry_after_ms, .. } => {
                assert!((1..=40).contains(&retry_after_ms))
            }
            e => panic!("{e}"),
        }
        assert!(l.take("key:other").is_ok());
        // Unchanged spec: state kept across a rebuild.
        let l2 = l.rebuild([("key:a".to_string(), spec)]);
        assert!(l2.take("key:a").is_err());
    }
}
