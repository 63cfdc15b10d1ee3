//! Time, injectable so tests can move it.

use std::sync::{Arc, Mutex};

use time::{Duration, OffsetDateTime, UtcOffset};

/// Truncates to whole microseconds in UTC: the precision PostgreSQL and MySQL
/// keep, so a timestamp reads back exactly as it was hashed into the audit chain.
/// (A time whose UTC date is out of range, which only a hand-built one can
/// be, keeps its offset.)
pub fn normalize(at: OffsetDateTime) -> OffsetDateTime {
    let at = at.checked_to_offset(UtcOffset::UTC).unwrap_or(at);
    let micros = at.microsecond();
    at.replace_nanosecond(micros * 1_000).unwrap_or(at)
}

/// Microseconds since the Unix epoch: how the audit hash and the stores
/// write a time (saturating far beyond any real date).
pub fn unix_micros(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos() / 1_000).unwrap_or(i64::MAX)
}

/// A source of the current time (UTC).
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Now.
    fn now(&self) -> OffsetDateTime;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// A clock that only moves when told to, for tests and demos.
///
/// ```
/// use impersonation_core::{Clock, ManualClock};
/// use time::Duration;
/// let clock = ManualClock::new(time::macros::datetime!(2024-11-06 10:15 UTC));
/// clock.advance(Duration::minutes(15));
/// assert_eq!(clock.now(), time::macros::datetime!(2024-11-06 10:30 UTC));
/// ```
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<OffsetDateTime>>,
}

impl ManualClock {
    /// A clock stopped at `start`.
    pub fn new(start: OffsetDateTime) -> Self {
        Self {
            now: Arc::new(Mutex::new(start)),
        }
    }

    /// Moves the clock forward (or back, with a negative duration); past
    /// the range `time` holds, it stops at its end, as the service's own
    /// time arithmetic saturates.
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now = now.saturating_add(by);
    }

    /// Sets the clock.
    pub fn set(&self, to: OffsetDateTime) {
        *self.now.lock().unwrap_or_else(|e| e.into_inner()) = to;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::{Clock, ManualClock};
    use time::{Duration, OffsetDateTime, PrimitiveDateTime};

    /// A test that moves the clock past the end of time gets the end of
    /// time, not a panic.
    #[test]
    fn a_manual_clock_stops_at_the_ends_of_time() {
        let clock = ManualClock::new(OffsetDateTime::UNIX_EPOCH);
        clock.advance(Duration::MAX);
        assert_eq!(clock.now(), PrimitiveDateTime::MAX.assume_utc());
        clock.advance(Duration::MIN);
        clock.advance(Duration::MIN);
        assert_eq!(clock.now(), PrimitiveDateTime::MIN.assume_utc());
    }
}
