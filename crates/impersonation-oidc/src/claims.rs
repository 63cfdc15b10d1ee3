//! The claims of an impersonation token (RFC 8693): `sub` is the customer,
//! `act.sub` the agent acting for them, `sid` the impersonation session.

use openidconnect::core::{
    CoreGenderClaim, CoreJweContentEncryptionAlgorithm, CoreJwsSigningAlgorithm,
};
use openidconnect::{AdditionalClaims, IdToken};
use serde::{Deserialize, Serialize};

/// The actor (RFC 8693 §4.1): who acts for the subject. Only the current
/// actor is authoritative; prior actors (a nested `act`) are kept as they
/// came, never read for authorisation.
///
/// Read strictly: an object with a string `sub`, prior actors objects too
/// (serde would otherwise take `["sam"]` for `{"sub": "sam"}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "serde_json::Map<String, serde_json::Value>")]
pub struct ActorClaim {
    /// The acting party: the support agent.
    pub sub: String,
    /// The issuer of `sub`, when the token names one (RFC 8693 §4.1: `iss`
    /// and `sub` together may be needed to tell who acts, one issuer's
    /// `sam` from another's). This crate's issuer names none: its actors
    /// are its own users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Prior actors, if a chain of delegation was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<serde_json::Value>,
}

impl TryFrom<serde_json::Map<String, serde_json::Value>> for ActorClaim {
    type Error = String;

    fn try_from(mut object: serde_json::Map<String, serde_json::Value>) -> Result<Self, String> {
        let sub = match object.remove("sub") {
            Some(serde_json::Value::String(sub)) if !sub.is_empty() => sub,
            _ => return Err("act.sub must be a non-empty string".into()),
        };
        let iss = match object.remove("iss") {
            None => None,
            Some(serde_json::Value::String(iss)) if !iss.is_empty() => Some(iss),
            Some(_) => return Err("act.iss must be a non-empty string".into()),
        };
        let act = object.remove("act");
        // Every prior actor down the chain is held to the same shape.
        check_actors(act.as_ref(), "a prior actor")?;
        Ok(Self { sub, iss, act })
    }
}

/// Each actor from `first` down its `act` chain: an object with a
/// non-empty string `sub`. `what` names them in the refusal.
fn check_actors(first: Option<&serde_json::Value>, what: &str) -> Result<(), String> {
    let mut actor = first;
    while let Some(next) = actor {
        let serde_json::Value::Object(object) = next else {
            return Err(format!("{what} must be an object"));
        };
        if !matches!(object.get("sub"), Some(serde_json::Value::String(s)) if !s.is_empty()) {
            return Err(format!("{what}'s sub must be a non-empty string"));
        }
        // `iss` names whose `sub` it is (RFC 8693 §4.1): absent, or a
        // non-empty string, as the top-level actor's is.
        if object
            .get("iss")
            .is_some_and(|iss| !matches!(iss, serde_json::Value::String(s) if !s.is_empty()))
        {
            return Err(format!("{what}'s iss must be a non-empty string"));
        }
        actor = object.get("act");
    }
    Ok(())
}

/// A delegation chain as a token states it (`act`, RFC 8693 §4.1): each
/// actor an object with a non-empty string `sub`, and every member of it
/// (`iss`, say) kept as it came.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "serde_json::Value", into = "serde_json::Value")]
pub(crate) struct ActorChain(pub(crate) serde_json::Value);

impl TryFrom<serde_json::Value> for ActorChain {
    type Error = String;

    fn try_from(value: serde_json::Value) -> Result<Self, String> {
        check_actors(Some(&value), "an actor")?;
        Ok(Self(value))
    }
}

impl From<ActorChain> for serde_json::Value {
    fn from(chain: ActorChain) -> Self {
        chain.0
    }
}

/// The claims this crate adds to the registered ones (`iss`, `sub`, `aud`,
/// `exp`, `iat`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImpersonationClaims {
    /// The impersonation session the token belongs to.
    pub sid: String,
    /// The agent acting as the subject.
    pub act: ActorClaim,
    /// A unique token id.
    pub jti: String,
    /// Not before (seconds since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// The client the token was issued to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Granted scope, if any was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

impl AdditionalClaims for ImpersonationClaims {}

/// An impersonation token as a JWT (signed, never encrypted).
pub type ImpersonationToken = IdToken<
    ImpersonationClaims,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJwsSigningAlgorithm,
>;

/// What an external provider's exchanged token may say about its actor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalClaims {
    /// The actor, if the provider recorded one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<ActorClaim>,
    /// The provider's session id, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
}

impl AdditionalClaims for ExternalClaims {}

/// Who a subject lets act for them (RFC 8693 §4.4 `may_act`): the actor's
/// `sub`, and the issuer that `sub` belongs to when it is not the token's
/// own. Read strictly, as [`ActorClaim`] is: an object with a non-empty
/// string `sub` and, if present, a string `iss`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "serde_json::Map<String, serde_json::Value>")]
pub(crate) struct MayActClaim {
    pub(crate) sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) iss: Option<String>,
}

impl TryFrom<serde_json::Map<String, serde_json::Value>> for MayActClaim {
    type Error = String;

    fn try_from(mut object: serde_json::Map<String, serde_json::Value>) -> Result<Self, String> {
        let sub = match object.remove("sub") {
            Some(serde_json::Value::String(sub)) if !sub.is_empty() => sub,
            _ => return Err("may_act.sub must be a non-empty string".into()),
        };
        let iss = match object.remove("iss") {
            None => None,
            Some(serde_json::Value::String(iss)) => Some(iss),
            Some(_) => return Err("may_act.iss must be a string".into()),
        };
        Ok(Self { sub, iss })
    }
}

/// A claim read as present when its name is, even with a `null` value
/// (which serde's `Option` takes for absent): a token cannot lift a
/// check by sending `null` where the check looks for the claim.
pub(crate) fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// What the issuer reads from an agent's access token beyond the standard
/// claims: whether it names an actor (`act`, of any shape), which makes it
/// a delegated token, not the agent's own; and, for an issuer that requires
/// them ([`crate::IssuerConfig::require_actor_scope`],
/// [`crate::IssuerConfig::require_actor_client`]), its scope and the client
/// it was issued to. Those are read as any shape here and judged only when
/// required, so a claim of an odd shape refuses no token of an issuer that
/// does not look at it (a token naming one of these claims twice is
/// refused, as one naming `act` twice always was). Other claims, whatever
/// their types, are left alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ActorTokenClaims {
    /// Present, whatever its value: `"act": null` is a token that names an
    /// actor slot all the same, not one without.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub(crate) act: Option<serde_json::Value>,
    /// RFC 9068 §2.2.3 / RFC 8693 §4.2: space-separated scope values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) scope: Option<serde_json::Value>,
    /// What several providers send instead (Microsoft Entra ID a
    /// space-separated string, Okta an array).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) scp: Option<serde_json::Value>,
    /// RFC 9068 §2.2: the client the token was issued to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) client_id: Option<serde_json::Value>,
    /// Okta's name for the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) cid: Option<serde_json::Value>,
    /// Microsoft Entra ID's (v1 tokens; v2 tokens carry `azp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) appid: Option<serde_json::Value>,
}

impl ActorTokenClaims {
    /// Whether the token grants `wanted`: its `scope`, or without one its
    /// `scp`, holds it as a whole value (`impersonate` is not granted by
    /// `impersonate:read`). A claim of another shape grants nothing.
    pub(crate) fn grants_scope(&self, wanted: &str) -> bool {
        let holds = |value: &serde_json::Value| match value {
            serde_json::Value::String(text) => text.split(' ').any(|s| s == wanted),
            serde_json::Value::Array(items) => items.iter().any(|i| i.as_str() == Some(wanted)),
            _ => false,
        };
        match (&self.scope, &self.scp) {
            // An array is not RFC 9068's shape for `scope`.
            (Some(scope @ serde_json::Value::String(_)), _) | (None, Some(scope)) => holds(scope),
            (Some(_), _) | (None, None) => false,
        }
    }

    /// The client the token was issued to: the first of `client_id`
    /// (RFC 9068), `azp` (the standard claims carry it), `cid` and `appid`
    /// that the token has decides, and only as a string.
    pub(crate) fn client<'a>(&'a self, azp: Option<&'a str>) -> Option<&'a str> {
        let named = |claim: &'a Option<serde_json::Value>| {
            claim
                .as_ref()
                .map(|value| value.as_str().unwrap_or_default())
        };
        named(&self.client_id)
            .or(azp)
            .or_else(|| named(&self.cid))
            .or_else(|| named(&self.appid))
            .filter(|id| !id.is_empty())
    }
}

impl AdditionalClaims for ActorTokenClaims {}

/// What the issuer reads of a subject token beyond the registered claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SubjectClaims {
    /// Who may act for the subject, if the token says (`null` is no
    /// `may_act` object, and refuses the token, not one without).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub(crate) may_act: Option<MayActClaim>,
    /// Who already acts for the subject (a delegated token): the issued
    /// token names them as prior actors. Read as strictly as any `act`,
    /// and kept whole (`null` too: it refuses the token).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub(crate) act: Option<ActorChain>,
}

impl AdditionalClaims for SubjectClaims {}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::{ActorClaim, ActorTokenClaims};
    use serde_json::json;

    /// A required scope is granted by `scope` as a whole space-separated
    /// value, or without `scope` by `scp` (a string or an array); any other
    /// shape grants nothing, and an odd claim still parses (it is judged
    /// only by an issuer that requires it).
    #[test]
    fn an_actor_tokens_scope_and_client_are_read_as_providers_send_them() {
        let read =
            |json: serde_json::Value| serde_json::from_value::<ActorTokenClaims>(json).unwrap();
        let grants = |json: serde_json::Value| read(json).grants_scope("impersonate");
        assert!(grants(json!({"scope": "api impersonate"})));
        assert!(grants(json!({"scope": "impersonate"})));
        assert!(!grants(json!({"scope": "api impersonate:read"})));
        assert!(!grants(json!({"scope": "api  Impersonate"})));
        assert!(!grants(json!({})));
        assert!(grants(json!({"scp": "api impersonate"})));
        assert!(grants(json!({"scp": ["api", "impersonate"]})));
        assert!(!grants(json!({"scp": ["api impersonate"]})));
        assert!(!grants(json!({"scp": 1})));
        // `scope` decides when present, whatever `scp` says.
        assert!(!grants(json!({"scope": "api", "scp": ["impersonate"]})));
        assert!(!grants(json!({"scope": ["impersonate"]})));
        // A `null` claim is an absent one.
        assert!(grants(json!({"scope": null, "scp": "impersonate"})));

        let console = read(json!({"client_id": "console-ui"}));
        assert_eq!(console.client(Some("other")), Some("console-ui"));
        assert_eq!(
            read(json!({})).client(Some("console-ui")),
            Some("console-ui")
        );
        assert_eq!(read(json!({})).client(None), None);
        assert_eq!(
            read(json!({"client_id": 7})).client(Some("console-ui")),
            None
        );
        assert_eq!(
            read(json!({"client_id": ""})).client(Some("console-ui")),
            None
        );
        // `client_id` decides over `azp`, `azp` over a provider's own names.
        assert_eq!(
            read(json!({"cid": "okta-app", "appid": "entra-app"})).client(Some("console-ui")),
            Some("console-ui")
        );
        assert_eq!(
            read(json!({"cid": "okta-app"})).client(None),
            Some("okta-app")
        );
        assert_eq!(
            read(json!({"appid": "entra-app"})).client(None),
            Some("entra-app")
        );
        assert_eq!(read(json!({"cid": ["okta-app"]})).client(None), None);
    }

    /// The current actor keeps the issuer a token names for it, and
    /// writes none when it has none; one that is not a string is refused.
    #[test]
    fn the_current_actors_issuer_is_kept() {
        let read = |json: &str| serde_json::from_str::<ActorClaim>(json);
        let partner =
            read(r#"{"sub":"sam","iss":"https://partner.example","act":{"sub":"lee"}}"#).unwrap();
        assert_eq!(partner.sub, "sam");
        assert_eq!(partner.iss.as_deref(), Some("https://partner.example"));
        assert_eq!(
            serde_json::to_value(&partner).unwrap(),
            serde_json::json!({"sub": "sam", "iss": "https://partner.example", "act": {"sub": "lee"}})
        );
        let own = read(r#"{"sub":"sam"}"#).unwrap();
        assert_eq!(own.iss, None);
        assert_eq!(serde_json::to_string(&own).unwrap(), r#"{"sub":"sam"}"#);
        for bad in [r#"{"sub":"sam","iss":5}"#, r#"{"sub":"sam","iss":""}"#] {
            assert!(read(bad).is_err(), "{bad}");
        }
        // So is a prior actor's.
        for bad in [
            r#"{"sub":"sam","act":{"sub":"lee","iss":null}}"#,
            r#"{"sub":"sam","act":{"sub":"lee","iss":5}}"#,
            r#"{"sub":"sam","act":{"sub":"lee","act":{"sub":"kim","iss":""}}}"#,
        ] {
            assert!(read(bad).is_err(), "{bad}");
        }
        assert!(read(r#"{"sub":"sam","act":{"sub":"lee","iss":"https://op.example"}}"#).is_ok());
    }
}
