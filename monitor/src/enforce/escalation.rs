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
    /// Offences and when the last one's enforcement ends, per offending network.
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
        // Remembered from the end of the last enforcement, not its start: long blocks
        // must not make a repeat offender look new.
        let count = match self.offences.get(&net) {
            Some((count, ended)) if now.saturating_duration_since(*ended) <= self.memory => {
                count + 1
            }
            _ => 1,
        };
        let multiplier = self.factor.get().saturating_pow(count - 1);
        let ttl = base
            .checked_mul(multiplier)
            .unwrap_or(self.max_ttl)
            .min(self.max_ttl.max(base));
        self.offences.put(net, (count, now + ttl));
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
        // The window starts when the last block ends: a 50-minute block followed by an
        // offence 55 minutes later (5 after it ended) is a repeat, with a 60-minute memory.
        let mut long = Escalation::new(NonZeroU32::new(2).unwrap(), 1000 * minute, 60 * minute);
        assert_eq!(long.offend(net, 50 * minute, t0), (50 * minute, 1));
        assert_eq!(long.offend(net, 50 * minute, t0 + 105 * minute).1, 2);
    }
}
