//! Identifiers: the host app's own user and tenant keys, and the SDK's UUID v7 ids.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Longest accepted host identifier, in bytes. Identifiers end up in database
/// keys, Redis keys and audit rows; a bound keeps all of them predictable.
pub const MAX_ID_LEN: usize = 255;

/// Why a host identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The identifier was empty.
    #[error("identifier is empty")]
    Empty,
    /// The identifier is longer than [`MAX_ID_LEN`] bytes.
    #[error("identifier is longer than {MAX_ID_LEN} bytes")]
    TooLong,
    /// The identifier contains a control character, a bidirectional
    /// control or a line or paragraph separator (any of which could
    /// rewrite a log line or a table row the id is shown in).
    #[error("identifier contains a control, bidirectional or line-separator character")]
    ControlCharacter,
    /// The user identifier starts with `revocations:`, which the SDK keeps
    /// for the customers' revocation chains: an agent of that id would
    /// write into a customer's revocation chain (an agent's chain is named
    /// by the agent's id).
    #[error("user identifier starts with `revocations:`, which is reserved")]
    Reserved,
}

/// An id: not empty, at most [`MAX_ID_LEN`] bytes, and without a control
/// character, a line or paragraph separator, or a bidirectional embedding,
/// override or isolate (U+202A-U+202E, U+2066-U+2069), any of which could
/// rewrite a log line or a table row the id is shown in. The plain
/// direction marks (U+200E, U+200F, U+061C), which right-to-left keys may
/// hold, are let through. The same check holds for an id read back from a
/// store: a record holding such an id does not decode (fail closed).
fn check_opaque(value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty);
    }
    if value.len() > MAX_ID_LEN {
        return Err(IdError::TooLong);
    }
    if value.chars().any(crate::policy::rewrites_lines) {
        return Err(IdError::ControlCharacter);
    }
    Ok(())
}

/// A user id: an opaque id ([`check_opaque`]) that does not start with the
/// prefix of the customers' revocation chains
/// ([`ChainKey::revocations_of`](crate::ChainKey::revocations_of)), so no
/// agent's chain, named by the agent's id, is ever one of them.
fn check_user(value: &str) -> Result<(), IdError> {
    check_opaque(value)?;
    if value.starts_with(crate::audit::REVOCATIONS_PREFIX) {
        return Err(IdError::Reserved);
    }
    Ok(())
}

macro_rules! opaque_id {
    ($(#[$doc:meta])* $name:ident, $check:path) => {
        $(#[$doc])*
        ///
        /// Cloning is cheap: the text is shared.
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(Arc<str>);

        impl $name {
            /// Wraps a host identifier, refusing empty, over-long or
            /// control-character values (bidirectional controls and line
            /// separators included).
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                $check(&value)?;
                Ok(Self(value.into()))
            }

            /// The identifier as the host app gave it.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The shared text, for keys derived from the id without copying it.
            #[allow(dead_code)] // not every id kind derives keys
            pub(crate) fn shared(&self) -> Arc<str> {
                Arc::clone(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::new(value)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = IdError;
            fn try_from(value: &str) -> Result<Self, IdError> {
                Self::new(value)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(value: &str) -> Result<Self, IdError> {
                Self::new(value)
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0.to_string()
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id.hyphenated().to_string().into())
            }
        }

        impl From<u64> for $name {
            fn from(id: u64) -> Self {
                Self(id.to_string().into())
            }
        }

        impl From<i64> for $name {
            fn from(id: i64) -> Self {
                Self(id.to_string().into())
            }
        }

        impl From<u32> for $name {
            fn from(id: u32) -> Self {
                Self(id.to_string().into())
            }
        }

        impl From<i32> for $name {
            fn from(id: i32) -> Self {
                Self(id.to_string().into())
            }
        }
    };
}

opaque_id! {
    /// A user of the host application, by the host's own key (integer, string or UUID).
    ///
    /// ```
    /// use impersonation_core::UserId;
    /// assert_eq!(UserId::from(42_u64).as_str(), "42");
    /// assert!(UserId::new("").is_err());
    /// ```
    UserId, check_user
}

opaque_id! {
    /// A tenant (customer organisation) of the host application, by the host's own key.
    TenantId, check_opaque
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A fresh, time-ordered (UUID v7) identifier.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            /// Wraps an existing UUID (for stores reading their rows back).
            pub const fn from_uuid(id: Uuid) -> Self {
                Self(id)
            }

            /// The underlying UUID.
            pub const fn as_uuid(&self) -> &Uuid {
                &self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(value: &str) -> Result<Self, uuid::Error> {
                Uuid::parse_str(value).map(Self)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Uuid {
                id.0
            }
        }
    };
}

uuid_id! {
    /// An impersonation session (UUID v7, so ids sort by creation time).
    SessionId
}

uuid_id! {
    /// An audit event (UUID v7).
    EventId
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_keys_of_every_shape_fit() {
        assert_eq!(UserId::from(7_u64).as_str(), "7");
        assert_eq!(UserId::from(-7_i64).as_str(), "-7");
        let uuid = Uuid::nil();
        assert_eq!(
            UserId::from(uuid).as_str(),
            "00000000-0000-0000-0000-000000000000"
        );
        assert_eq!(TenantId::new("acme").map(String::from), Ok("acme".into()));
    }

    #[test]
    fn bad_host_keys_are_refused_with_a_typed_error() {
        assert_eq!(UserId::new(""), Err(IdError::Empty));
        assert_eq!(UserId::new("a".repeat(256)), Err(IdError::TooLong));
        assert_eq!(UserId::new("a\nb"), Err(IdError::ControlCharacter));
        // Bidirectional overrides, embeddings and isolates and line
        // separators rewrite what a log line or a table row shows: refused
        // in a new id. Plain direction marks are let through.
        for bad in ["ann\u{202E}lee", "ann\u{2028}lee", "\u{2066}x"] {
            assert_eq!(UserId::new(bad), Err(IdError::ControlCharacter), "{bad:?}");
            assert_eq!(
                TenantId::new(bad),
                Err(IdError::ControlCharacter),
                "{bad:?}"
            );
        }
        assert!(UserId::new("\u{200F}שרה").is_ok());
        assert!(serde_json::from_str::<UserId>("\"\"").is_err());
        assert!(serde_json::from_str::<UserId>(r#""a\nb""#).is_err());
        assert!(serde_json::from_str::<UserId>(r#""a\u202eb""#).is_err());
        assert_eq!(UserId::new("josé").map(String::from), Ok("josé".into()));
    }

    /// No user id names a customer's revocation chain: an agent's chain is
    /// named by the agent's id, and one named so would take its refusals
    /// into the customer's revocation chain (and a start on that customer
    /// would read them as a revocation). A tenant may be called anything.
    #[test]
    fn no_user_id_is_a_revocation_chains_name() {
        let olive = UserId::new("olive").unwrap_or_else(|_| unreachable!());
        let chain = crate::ChainKey::revocations_of(&olive);
        assert_eq!(UserId::new(chain.as_str()), Err(IdError::Reserved));
        assert!(serde_json::from_str::<UserId>(r#""revocations:x""#).is_err());
        assert!(UserId::new("revocations").is_ok());
        assert!(TenantId::new(chain.as_str()).is_ok());
    }

    #[test]
    fn session_ids_are_version_7() {
        assert_eq!(SessionId::new().as_uuid().get_version_num(), 7);
        assert_eq!(EventId::new().as_uuid().get_version_num(), 7);
    }
}
