//! Serde helpers: durations as whole seconds, so stored records stay readable.

pub(crate) mod duration_secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::Duration;

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(d.whole_seconds())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        i64::deserialize(d).map(Duration::seconds)
    }
}

pub(crate) mod opt_duration_secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::Duration;

    pub(crate) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.whole_seconds()),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<i64>::deserialize(d)?.map(Duration::seconds))
    }
}

/// RFC 3339 timestamps written as `time::serde::rfc3339` writes them,
/// formatted on the stack rather than into a `String` per value (an event
/// stored as JSON has one; the stores write thousands per second).
pub(crate) mod rfc3339 {
    use serde::{Deserializer, Serializer};
    use time::OffsetDateTime;
    use time::format_description::well_known::Rfc3339;

    /// Room for the longest RFC 3339 form `time` writes (nanoseconds and an
    /// offset: 35 bytes).
    const ROOM: usize = 40;

    pub(crate) fn serialize<S: Serializer>(at: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0_u8; ROOM];
        let mut out = &mut buf[..];
        at.format_into(&mut out, &Rfc3339)
            .map_err(serde::ser::Error::custom)?;
        let written = ROOM - out.len();
        let text = std::str::from_utf8(&buf[..written]).map_err(serde::ser::Error::custom)?;
        s.serialize_str(text)
    }

    /// A time whose date in UTC is out of `time`'s range (`9999-12-31T23:30:00-05:00`
    /// is year 10000 in UTC) is refused: everything downstream reads times in UTC.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
        let at = time::serde::rfc3339::deserialize(d)?;
        at.checked_to_offset(time::UtcOffset::UTC)
            .map(|_| at)
            .ok_or_else(|| serde::de::Error::custom("timestamp out of range in UTC"))
    }
}
