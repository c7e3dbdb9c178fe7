//! Time in the two clocks apimon uses: wall time for operators and the state file,
//! CLOCK_MONOTONIC for the kernel (`bpf_ktime_get_coarse_ns` counts on it).

use std::time::{Duration, SystemTime};

use nix::time::{ClockId, clock_gettime};

/// Now on CLOCK_MONOTONIC, in ns.
pub fn monotonic_ns() -> u64 {
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|ts| {
            u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000
                + u64::try_from(ts.tv_nsec()).unwrap_or(0)
        })
        // CLOCK_MONOTONIC cannot fail on Linux; 0 would only make deadlines look expired.
        .unwrap_or(0)
}

/// A pair of readings of both clocks, to convert between them.
#[derive(Clone, Copy, Debug)]
pub struct Clocks {
    pub wall: SystemTime,
    pub monotonic_ns: u64,
}

impl Clocks {
    pub fn now() -> Self {
        Self {
            wall: SystemTime::now(),
            monotonic_ns: monotonic_ns(),
        }
    }

    /// Kernel deadline for a wall-clock deadline. Never 0 (which means "never expires"):
    /// a deadline already past maps to "now".
    pub fn to_monotonic(&self, deadline: SystemTime) -> u64 {
        let remaining = deadline.duration_since(self.wall).unwrap_or(Duration::ZERO);
        let remaining_ns = u64::try_from(remaining.as_nanos()).unwrap_or(u64::MAX);
        self.monotonic_ns.saturating_add(remaining_ns).max(1)
    }

    /// Wall time of a kernel timestamp.
    pub fn to_wall(&self, monotonic_ns: u64) -> SystemTime {
        if monotonic_ns >= self.monotonic_ns {
            self.wall
                .checked_add(Duration::from_nanos(monotonic_ns - self.monotonic_ns))
                .unwrap_or_else(latest)
        } else {
            self.wall
                .checked_sub(Duration::from_nanos(self.monotonic_ns - monotonic_ns))
                .unwrap_or(SystemTime::UNIX_EPOCH)
        }
    }
}

/// The longest TTL accepted anywhere: keeps every deadline printable (RFC 3339 ends at
/// year 9999) and far from overflow.
pub const MAX_TTL: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

/// A TTL accepted anywhere: positive and at most `MAX_TTL` (why not, otherwise).
pub fn check_ttl(ttl: Duration) -> Result<Duration, String> {
    if ttl.is_zero() {
        return Err("must be positive".into());
    }
    if ttl > MAX_TTL {
        return Err(format!(
            "is longer than the maximum of {}",
            humantime::format_duration(MAX_TTL)
        ));
    }
    Ok(ttl)
}

/// A duration as operators write it (`90s`, `15m`, `7d`), checked as a TTL.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration =
        humantime::parse_duration(text).map_err(|e| format!("invalid duration {text:?}: {e}"))?;
    check_ttl(duration).map_err(|why| format!("duration {why}"))
}

/// The latest time RFC 3339 can print, 9999-12-31T23:59:59Z.
fn latest() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799)
}

/// RFC 3339 UTC with second precision, as operators and the contract want it.
pub fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time.min(latest())).to_string()
}

/// RFC 3339 UTC with milliseconds (the state file).
pub fn rfc3339_millis(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time.min(latest())).to_string()
}

/// Serde for `SystemTime` as RFC 3339 strings with milliseconds (the state file).
pub mod serde_rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize as _, Deserializer, Serializer, de::Error as _};

    pub fn serialize<S: Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::rfc3339_millis(*time))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&text).map_err(D::Error::custom)
    }

    pub mod option {
        use std::time::SystemTime;

        use serde::{Deserialize as _, Deserializer, Serializer, de::Error as _};

        pub fn serialize<S: Serializer>(
            time: &Option<SystemTime>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match time {
                Some(time) => s.serialize_str(&super::super::rfc3339_millis(*time)),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<SystemTime>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|text| humantime::parse_rfc3339_weak(&text).map_err(D::Error::custom))
                .transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_convert_both_ways() {
        let clocks = Clocks {
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000),
            monotonic_ns: 5_000_000_000,
        };
        let deadline = clocks.wall + Duration::from_secs(2);
        assert_eq!(clocks.to_monotonic(deadline), 7_000_000_000);
        assert_eq!(clocks.to_wall(7_000_000_000), deadline);
        assert_eq!(
            clocks.to_wall(4_000_000_000),
            clocks.wall - Duration::from_secs(1)
        );
    }

    #[test]
    fn past_deadlines_are_now_never_zero() {
        let clocks = Clocks {
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(100),
            monotonic_ns: 0,
        };
        assert_eq!(clocks.to_monotonic(SystemTime::UNIX_EPOCH), 1);
    }

    #[test]
    fn far_future_times_never_panic() {
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(400_000_000_000);
        assert_eq!(rfc3339(far), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339_millis(far), "9999-12-31T23:59:59.000Z");
        // u64::MAX ns is some 584 years: far, but printable, and no overflow.
        let clocks = Clocks::now();
        assert!(rfc3339(clocks.to_wall(u64::MAX)).starts_with("26"));
    }

    #[test]
    fn rfc3339_is_utc_seconds() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_500);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20Z");
    }
}
