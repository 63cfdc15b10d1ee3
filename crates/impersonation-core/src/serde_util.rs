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

/// Lower-case hex of `bytes`. (`hex::encode` goes through a char iterator,
/// several times slower; this is on every audited request's path.)
pub(crate) fn lower_hex(bytes: &[u8]) -> String {
    let mut out = vec![0_u8; bytes.len() * 2];
    // The buffer has exactly the size `encode_to_slice` needs, and its
    // output is ASCII: neither fallback can run.
    if hex::encode_to_slice(bytes, &mut out).is_err() {
        return hex::encode(bytes);
    }
    String::from_utf8(out).unwrap_or_else(|_| hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    #[test]
    fn lower_hex_matches_the_hex_crate() {
        for bytes in [&[][..], &[0x00], &[0xab, 0x01, 0xff], &[7; 32]] {
            assert_eq!(super::lower_hex(bytes), hex::encode(bytes));
        }
    }
}
