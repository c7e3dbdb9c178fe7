//! Per-rule rate limits with governor (GCRA), keyed by client, client and route, an API
//! key or a JWT subject. The key space is bounded: governor's state lives in an LRU of
//! `max_keys` entries, so a flood of distinct keys evicts old ones instead of growing
//! memory (governor issue #171).

use std::{
    hash::Hash,
    net::IpAddr,
    num::{NonZeroU32, NonZeroUsize},
    sync::{Arc, Mutex},
};

use governor::{
    Quota, RateLimiter,
    clock::{Clock, DefaultClock},
    middleware::NoOpMiddleware,
    nanos::Nanos,
    state::StateStore,
};
use lru::LruCache;

use super::file::RateLimitDoc;

/// The key a request is counted under.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LimitKey {
    Ip(IpAddr),
    IpRoute(IpAddr, String),
    /// A header value or JWT subject, by digest: keys stay 16 bytes whatever clients send.
    Value([u8; 16]),
}

impl LimitKey {
    pub fn of_value(value: &str) -> Self {
        use sha2::{Digest as _, Sha256};
        let digest = Sha256::digest(value.as_bytes());
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest[..16]);
        LimitKey::Value(key)
    }
}

/// governor's state store, bounded: least recently seen keys are forgotten first.
/// Shared, so the limiter's owner can see how many keys it holds.
pub struct LruStore<K: Hash + Eq> {
    cells: Arc<Mutex<LruCache<K, Nanos>>>,
}

impl<K: Hash + Eq> LruStore<K> {
    pub fn new(capacity: NonZeroUsize) -> Self {
        Self {
            cells: Arc::new(Mutex::new(LruCache::new(capacity))),
        }
    }

    fn share(&self) -> Self {
        Self {
            cells: self.cells.clone(),
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<K, Nanos>> {
        self.cells
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<K: Hash + Eq + Clone> StateStore for LruStore<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        // One lock around read and write: no lost updates between threads. A known key
        // is updated in place (one lookup, no key clone).
        let mut cells = self.lock();
        if let Some(cell) = cells.get_mut(key) {
            let (result, new) = f(Some(*cell))?;
            *cell = new;
            return Ok(result);
        }
        let (result, new) = f(None)?;
        cells.put(key.clone(), new);
        Ok(result)
    }
}

/// One rule's limiter.
pub struct Limiter<C: Clock = DefaultClock> {
    limiter: RateLimiter<LimitKey, LruStore<LimitKey>, C, NoOpMiddleware<C::Instant>>,
    keys: LruStore<LimitKey>,
}

impl Limiter<DefaultClock> {
    pub fn new(doc: &RateLimitDoc) -> Self {
        Self::with_clock(doc, DefaultClock::default())
    }
}

impl<C: Clock> Limiter<C> {
    pub fn with_clock(doc: &RateLimitDoc, clock: C) -> Self {
        let period = doc.per.0 / doc.requests.get();
        let burst = doc.burst.unwrap_or(doc.requests);
        // A period below a nanosecond is an absurd limit; treat it as the fastest one.
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst);
        let capacity = NonZeroUsize::new(doc.max_keys.get() as usize).unwrap_or(NonZeroUsize::MIN);
        let keys = LruStore::new(capacity);
        Self {
            limiter: RateLimiter::new(quota, keys.share(), clock),
            keys,
        }
    }

    /// Keys tracked now.
    pub fn keys(&self) -> usize {
        self.keys.len()
    }

    /// Counts one request under `key`; true when it is over the limit.
    pub fn exceeded(&self, key: &LimitKey) -> bool {
        self.limiter.check_key(key).is_err()
    }
}

/// The `sub` claim of a bearer token, read without verifying the token: good enough to
/// count by, never to trust.
pub fn jwt_subject(authorization: &str) -> Option<String> {
    use crate::detect::auth::{bearer_token, unverified_claims};
    match unverified_claims(bearer_token(authorization)?)?.get("sub")? {
        serde_json::Value::String(sub) => Some(sub.clone()),
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use governor::clock::FakeRelativeClock;

    use super::*;
    use crate::policy::file::{HumanDuration, RateKey};

    fn doc(requests: u32, per: Duration, max_keys: u32) -> RateLimitDoc {
        RateLimitDoc {
            requests: NonZeroU32::new(requests).unwrap(),
            per: HumanDuration(per),
            burst: None,
            key: RateKey::Ip,
            max_keys: NonZeroU32::new(max_keys).unwrap(),
        }
    }

    #[test]
    fn a_key_over_its_quota_is_limited_and_recovers() {
        let clock = FakeRelativeClock::default();
        let limiter = Limiter::with_clock(&doc(3, Duration::from_secs(3), 10), clock.clone());
        let a = LimitKey::Ip("10.0.0.1".parse().unwrap());
        let b = LimitKey::Ip("10.0.0.2".parse().unwrap());
        assert!((0..3).all(|_| !limiter.exceeded(&a)), "burst of 3 passes");
        assert!(limiter.exceeded(&a));
        assert!(!limiter.exceeded(&b), "other keys are independent");
        clock.advance(Duration::from_secs(1));
        assert!(!limiter.exceeded(&a), "one request refilled per second");
        assert!(limiter.exceeded(&a));
    }

    #[test]
    fn a_flood_of_distinct_keys_stays_bounded() {
        let limiter = Limiter::with_clock(
            &doc(1, Duration::from_secs(60), 100),
            FakeRelativeClock::default(),
        );
        for i in 0..10_000u32 {
            let _ = limiter.exceeded(&LimitKey::of_value(&i.to_string()));
        }
        assert_eq!(limiter.keys(), 100);
    }

    #[test]
    fn jwt_subjects_are_read_without_verification() {
        // {"alg":"none"}.{"sub":"user-7","exp":1}.
        let token = "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ1c2VyLTciLCJleHAiOjF9.";
        assert_eq!(jwt_subject(token).as_deref(), Some("user-7"));
        assert_eq!(
            jwt_subject(&token.replace("Bearer", "BEARER")).as_deref(),
            Some("user-7"),
            "the scheme is case-insensitive"
        );
        assert_eq!(jwt_subject("Bearer not-a-jwt"), None);
        assert_eq!(jwt_subject("Basic dXNlcjpwYXNz"), None);
        assert_eq!(jwt_subject("Bearer a.!!!.c"), None);
    }
}
