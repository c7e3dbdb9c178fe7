//! Repeat offenders get longer blocks, like fail2ban's `bantime.increment`: each
//! offence within the memory window multiplies the TTL, up to a maximum.

use std::{
    num::{NonZeroU32, NonZeroUsize},
    time::{Duration, Instant},
};

use ipnet::IpNet;
use lru::LruCache;

/// Offenders remembered at once (least recent forgotten first).
const MAX_OFFENDERS: usize = 100_000;

pub struct Escalation {
    factor: NonZeroU32,
    max_ttl: Duration,
    memory: Duration,
    /// Offences and the time of the last one, per offending network.
    offences: LruCache<IpNet, (u32, Instant)>,
}

impl Escalation {
    pub fn new(factor: NonZeroU32, max_ttl: Duration, memory: Duration) -> Self {
        Self {
            factor,
            max_ttl,
            memory,
            offences: LruCache::new(NonZeroUsize::new(MAX_OFFENDERS).unwrap_or(NonZeroUsize::MIN)),
        }
    }

    /// Settings changed (a policy reload); what offenders did is kept.
    pub fn retune(&mut self, factor: NonZeroU32, max_ttl: Duration, memory: Duration) {
        self.factor = factor;
        self.max_ttl = max_ttl;
        self.memory = memory;
    }

    /// Records an offence of `net` at `now`; returns its TTL and which offence it is
    /// (1 for the first within the memory window).
    pub fn offend(&mut self, net: IpNet, base: Duration, now: Instant) -> (Duration, u32) {
        let count = match self.offences.get(&net) {
            Some((count, last)) if now.duration_since(*last) <= self.memory => count + 1,
            _ => 1,
        };
        self.offences.put(net, (count, now));
        let multiplier = self.factor.get().saturating_pow(count - 1);
        let ttl = base
            .checked_mul(multiplier)
            .unwrap_or(self.max_ttl)
            .min(self.max_ttl.max(base));
        (ttl, count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeat_offences_multiply_up_to_the_maximum_and_are_forgotten() {
        let minute = Duration::from_secs(60);
        let mut e = Escalation::new(NonZeroU32::new(2).unwrap(), 5 * minute, 60 * minute);
        let net: IpNet = "10.0.0.1/32".parse().unwrap();
        let other: IpNet = "10.0.0.2/32".parse().unwrap();
        let t0 = Instant::now();
        assert_eq!(e.offend(net, minute, t0), (minute, 1));
        assert_eq!(e.offend(net, minute, t0 + minute), (2 * minute, 2));
        assert_eq!(e.offend(other, minute, t0 + minute), (minute, 1));
        assert_eq!(e.offend(net, minute, t0 + 2 * minute), (4 * minute, 3));
        assert_eq!(
            e.offend(net, minute, t0 + 3 * minute),
            (5 * minute, 4),
            "capped"
        );
        for n in 5..40 {
            assert_eq!(
                e.offend(net, minute, t0 + 3 * minute).0,
                5 * minute,
                "offence {n}"
            );
        }
        assert_eq!(
            e.offend(net, minute, t0 + 200 * minute),
            (minute, 1),
            "forgotten after the memory window"
        );
    }
}
