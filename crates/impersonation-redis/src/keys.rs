//! The key layout. Everything about one agent lives under one hash tag, the
//! agent chain's route (`ChainKey::route`, 16 hex characters, also carried
//! by every session token), so each script touches one hash slot:
//!
//! | key | type | what |
//! |---|---|---|
//! | `ns:{R}:a:<agent>:head` | hash | the chain head: `seq`, `hash` |
//! | `ns:{R}:a:<agent>:chain` | stream | the chain; entry `0-<seq+1>`, field `e` = the event's record (`AuditEvent::to_record`) |
//! | `ns:{R}:a:<agent>:live` | string | the agent's live session id |
//! | `ns:{R}:s:<session>` | hash | the session |
//! | `ns:{R}:k:<secret hash>` | string | session id by secret hash |
//!
//! Derived views (their own slots; written by the client around the
//! scripts, rebuildable from the chains):
//!
//! | key | type | what |
//! |---|---|---|
//! | `ns:where:<session>` | string | the session's route |
//! | `ns:live:subject:<user>`, `ns:live:tenant:<t>`, `ns:live:all` | set | `R|session` of live sessions |
//! | `ns:live:routes` | hash | session id → route, for live sessions (finds one whose `where` key ran out) |
//! | `ns:audit:{all,agent,subject,tenant,actor,session}:<v>` | sorted set | runs of one chain's events: `first-seq|last-seq|first-event-id|chain`, score = earliest time in µs |
//! | `ns:chains` | sorted set | chain keys (lexicographic) |

use impersonation_core::{ChainKey, SessionId};

/// The hash tag of a key as Redis Cluster computes it: the text between the
/// first `{` and the next `}`, if not empty.
pub(crate) fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let rest = &key[open + 1..];
    let close = rest.find('}')?;
    (close > 0).then(|| &rest[..close])
}

/// Whether text is a route: 16 lower-case hex characters.
pub(crate) fn is_route(text: &str) -> bool {
    text.len() == 16
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Keys of one agent's slot.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub(crate) route: String,
    prefix: String,
    agent_prefix: String,
}

impl Slot {
    pub(crate) fn of_chain(ns: &str, chain: &ChainKey) -> Self {
        let route = chain.route();
        Self::new(ns, route, Some(chain))
    }

    /// For lookups where only the route is known (a presented token).
    pub(crate) fn of_route(ns: &str, route: &str) -> Self {
        Self::new(ns, route.to_owned(), None)
    }

    fn new(ns: &str, route: String, chain: Option<&ChainKey>) -> Self {
        let prefix = format!("{ns}:{{{route}}}");
        let agent_prefix = match chain {
            Some(c) => format!("{prefix}:a:{}", c.as_str()),
            None => format!("{prefix}:a:?"),
        };
        Self {
            route,
            prefix,
            agent_prefix,
        }
    }

    pub(crate) fn head(&self) -> String {
        format!("{}:head", self.agent_prefix)
    }

    pub(crate) fn chain(&self) -> String {
        format!("{}:chain", self.agent_prefix)
    }

    pub(crate) fn live(&self) -> String {
        format!("{}:live", self.agent_prefix)
    }

    pub(crate) fn session_prefix(&self) -> String {
        format!("{}:s:", self.prefix)
    }

    pub(crate) fn session(&self, id: SessionId) -> String {
        format!("{}:s:{id}", self.prefix)
    }

    pub(crate) fn secret(&self, hash_hex: &str) -> String {
        format!("{}:k:{hash_hex}", self.prefix)
    }

    /// Every key a script is given must be in this slot: checked before
    /// each script runs, so a layout mistake fails loudly, never cross-slot.
    pub(crate) fn owns_all(&self, keys: &[&str]) -> bool {
        keys.iter()
            .all(|k| hash_tag(k) == Some(self.route.as_str()))
    }
}

pub(crate) fn where_key(ns: &str, id: SessionId) -> String {
    format!("{ns}:where:{id}")
}

pub(crate) fn live_set(ns: &str, kind: &str, value: &str) -> String {
    format!("{ns}:live:{kind}:{value}")
}

pub(crate) fn live_all(ns: &str) -> String {
    format!("{ns}:live:all")
}

pub(crate) fn live_routes(ns: &str) -> String {
    format!("{ns}:live:routes")
}

pub(crate) fn audit_index(ns: &str, kind: &str, value: &str) -> String {
    format!("{ns}:audit:{kind}:{value}")
}

pub(crate) fn audit_all(ns: &str) -> String {
    format!("{ns}:audit:all")
}

pub(crate) fn chains(ns: &str) -> String {
    format!("{ns}:chains")
}

/// The chains whose events' view entries could not be written after their
/// script committed (a hash: chain → first position missing, and a
/// nonce): `audit` rebuilds their views before it reads.
pub(crate) fn stale_views(ns: &str) -> String {
    format!("{ns}:views:stale")
}

#[cfg(test)]
mod tests {
    use impersonation_core::UserId;

    use super::*;

    #[test]
    fn every_key_of_an_agent_shares_the_routes_tag() {
        let chain = ChainKey::for_agent(&UserId::new("odd{agent}|id").unwrap());
        let slot = Slot::of_chain("app", &chain);
        let keys = [
            slot.head(),
            slot.chain(),
            slot.live(),
            slot.session(SessionId::new()),
            slot.secret("ab"),
        ];
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        assert!(slot.owns_all(&refs), "{keys:?}");
        assert_eq!(hash_tag(&slot.head()), Some(chain.route().as_str()));
        assert!(!slot.owns_all(&["app:where:x"]));
    }

    #[test]
    fn hash_tags_follow_the_cluster_rule() {
        assert_eq!(hash_tag("a{b}c"), Some("b"));
        assert_eq!(hash_tag("a{}c{d}"), None);
        assert_eq!(hash_tag("abc"), None);
        assert_eq!(hash_tag("a{b{c}d}"), Some("b{c"));
    }
}
