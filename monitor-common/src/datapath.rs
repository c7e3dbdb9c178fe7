//! Values stored in the datapath maps.

/// What the ingress program did with a packet; counted per interface in `IFACE_COUNTERS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Pass = 0,
    DropBlocklist = 1,
    DropRatelimit = 2,
    DropPolicy = 3,
    /// Truncated or malformed headers: counted, then passed to the stack.
    Malformed = 4,
}

impl Action {
    pub const COUNT: usize = 5;
    pub const ALL: [Action; Action::COUNT] = [
        Action::Pass,
        Action::DropBlocklist,
        Action::DropRatelimit,
        Action::DropPolicy,
        Action::Malformed,
    ];

    /// The label operators see (contract: `pass`, `drop_blocklist`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            Action::Pass => "pass",
            Action::DropBlocklist => "drop_blocklist",
            Action::DropRatelimit => "drop_ratelimit",
            Action::DropPolicy => "drop_policy",
            Action::Malformed => "malformed",
        }
    }

    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Action::DropBlocklist | Action::DropRatelimit | Action::DropPolicy
        )
    }
}

/// Packets and bytes for one action on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ActionCounter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<ActionCounter>() == 16);

/// Why an address is on a list; the daemon keeps the operator's text, the kernel only the code.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReasonCode {
    Cli = 1,
    Policy = 2,
    State = 3,
}

/// One blocklist or allowlist entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListEntry {
    /// CLOCK_MONOTONIC deadline in ns (`bpf_ktime_get_coarse_ns`); 0 = never expires.
    /// The kernel ignores an entry past its deadline, so a timed block ends on time
    /// even while the daemon is down.
    pub expires_at_ns: u64,
    /// Packets that matched this entry, bumped atomically by the kernel.
    pub hits: u64,
    /// `ReasonCode` as u32.
    pub reason: u32,
    /// Throttle entries: packets per second the source may send (0 elsewhere).
    pub rate_pps: u32,
}
const _: () = assert!(core::mem::size_of::<ListEntry>() == 24);

impl ListEntry {
    pub const NEVER: u64 = 0;

    #[inline(always)]
    pub const fn is_live(&self, now_ns: u64) -> bool {
        self.expires_at_ns == Self::NEVER || now_ns < self.expires_at_ns
    }
}

/// What the kernel needs to know about the lists as a whole. Written by the daemon
/// after every change to a list map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathState {
    /// `PRESENT_*` bits: list maps holding entries. The kernel skips lookups in empty
    /// ones (a lookup in an empty LPM trie still costs a helper call per packet).
    pub present: u32,
    /// Bumped on every list change, never 0. A source whose `IpStats::pass_epoch` equals
    /// it passed the lists under this very state, so its next packets skip the lookups.
    pub epoch: u32,
}
const _: () = assert!(core::mem::size_of::<DatapathState>() == 8);

impl DatapathState {
    pub const PRESENT_BLOCK_V4_HOSTS: u32 = 1 << 0;
    pub const PRESENT_BLOCK_V6_HOSTS: u32 = 1 << 1;
    pub const PRESENT_BLOCK_V4_NETS: u32 = 1 << 2;
    pub const PRESENT_BLOCK_V6_NETS: u32 = 1 << 3;
    pub const PRESENT_ALLOW_V4: u32 = 1 << 4;
    pub const PRESENT_ALLOW_V6: u32 = 1 << 5;
    pub const PRESENT_THROTTLE_V4: u32 = 1 << 6;
    pub const PRESENT_THROTTLE_V6: u32 = 1 << 7;
    /// Default per-source rate limits are configured (`RATE_CONFIG`).
    pub const RATE_LIMITS: u32 = 1 << 30;
    /// HTTP capture is configured (some server ports are monitored).
    pub const CAPTURE_ENABLED: u32 = 1 << 31;
    /// Any reason to run the per-source token buckets.
    pub const RATE_CHECKS: u32 =
        Self::RATE_LIMITS | Self::PRESENT_THROTTLE_V4 | Self::PRESENT_THROTTLE_V6;

    #[inline(always)]
    pub const fn has(&self, bit: u32) -> bool {
        self.present & bit != 0
    }

    /// The epoch after this one (0 is reserved for "no verdict cached").
    pub const fn next_epoch(epoch: u32) -> u32 {
        match epoch.wrapping_add(1) {
            0 => 1,
            next => next,
        }
    }
}

/// Default per-source limits, enforced with token buckets in the kernel (0: none).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateConfig {
    /// Packets per second from one source, and how many may come at once.
    pub pps: u32,
    pub pps_burst: u32,
    /// New connections (TCP SYN) per second from one source, and the burst.
    pub syn_ps: u32,
    pub syn_burst: u32,
}
const _: () = assert!(core::mem::size_of::<RateConfig>() == 16);

/// The fastest rate a limit may name (keeps token arithmetic far from overflow).
pub const MAX_RATE: u32 = 100_000_000;

/// One source's token buckets. A token is `TOKEN` units, so that refills at any rate
/// stay exact in integers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenBuckets {
    pub packets: u64,
    pub syns: u64,
    /// CLOCK_MONOTONIC ns of the last refill.
    pub refilled_ns: u64,
}
const _: () = assert!(core::mem::size_of::<TokenBuckets>() == 24);

impl TokenBuckets {
    /// Units per token: one second of refill at one token per second.
    pub const TOKEN: u64 = 1_000_000_000;
    /// Refill credited for at most this long an idle period (bounds the arithmetic).
    pub const MAX_REFILL_NS: u64 = 10_000_000_000;

    /// Refills a bucket for `elapsed_ns` at `rate` per second, up to `burst` tokens
    /// (0: one second's worth).
    #[inline(always)]
    pub fn refill(tokens: &mut u64, elapsed_ns: u64, rate: u32, burst: u32) {
        let burst = if burst == 0 { rate } else { burst };
        let capacity = u64::from(burst.max(1)) * Self::TOKEN;
        let refill = elapsed_ns.min(Self::MAX_REFILL_NS) * u64::from(rate.min(MAX_RATE));
        *tokens = tokens.saturating_add(refill).min(capacity);
    }

    /// Refills, then takes one token; false when there was none.
    #[inline(always)]
    pub fn take(tokens: &mut u64, elapsed_ns: u64, rate: u32, burst: u32) -> bool {
        Self::refill(tokens, elapsed_ns, rate, burst);
        if *tokens >= Self::TOKEN {
            *tokens -= Self::TOKEN;
            true
        } else {
            false
        }
    }
}

/// Traffic seen from one source address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpStats {
    pub packets: u64,
    pub bytes: u64,
    pub drops: u64,
    /// CLOCK_MONOTONIC ns.
    pub first_seen_ns: u64,
    /// CLOCK_MONOTONIC ns.
    pub last_seen_ns: u64,
    /// `DatapathState::epoch` under which this source last passed the lists (0: none).
    /// Only passes are cached: a drop always looks up its entry, to count its hit.
    pub pass_epoch: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<IpStats>() == 48);

/// Source address key for `IP_STATS`: IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`)
/// so that one map serves both families.
pub type IpKey = [u8; 16];

/// Builds the `IP_STATS` key of an IPv4 address given in network order.
///
/// Built from words rather than bytes: a byte array literal with a zero run makes the
/// bpf backend call a byte-at-a-time `memset`, a measurable cost on every packet.
#[inline(always)]
pub const fn ipv4_mapped(v4: [u8; 4]) -> IpKey {
    let words: [u32; 4] = [
        0,
        0,
        u32::from_ne_bytes([0, 0, 0xff, 0xff]),
        u32::from_ne_bytes(v4),
    ];
    // SAFETY: [u32; 4] and [u8; 16] have the same size and every bit pattern is valid.
    unsafe { core::mem::transmute::<[u32; 4], IpKey>(words) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_mapped_is_the_rfc4291_layout() {
        assert_eq!(
            ipv4_mapped([192, 0, 2, 1]),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 1]
        );
    }
}

#[cfg(test)]
mod token_tests {
    use super::TokenBuckets;

    #[test]
    fn buckets_refill_at_their_rate_up_to_the_burst() {
        let second = 1_000_000_000;
        let mut tokens = 0;
        assert!(!TokenBuckets::take(&mut tokens, 0, 10, 5), "empty");
        assert!(
            TokenBuckets::take(&mut tokens, second / 10, 10, 5),
            "one token per 100 ms"
        );
        assert!(!TokenBuckets::take(&mut tokens, 0, 10, 5));
        // An hour idle refills to the burst, no more.
        TokenBuckets::refill(&mut tokens, 3600 * second, 10, 5);
        assert_eq!(
            (0..10)
                .filter(|_| TokenBuckets::take(&mut tokens, 0, 10, 5))
                .count(),
            5
        );
        // Burst 0 means one second's worth.
        TokenBuckets::refill(&mut tokens, 10 * second, 7, 0);
        assert_eq!(
            (0..20)
                .filter(|_| TokenBuckets::take(&mut tokens, 0, 7, 0))
                .count(),
            7
        );
        // The largest rate over the longest refill does not overflow.
        let mut full = u64::MAX >> 1;
        TokenBuckets::refill(&mut full, u64::MAX, u32::MAX, u32::MAX);
        assert_eq!(full, u64::from(u32::MAX) * TokenBuckets::TOKEN);
    }
}
