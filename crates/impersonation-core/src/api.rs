//! The service behind one object-safe trait, so that bindings (layers,
//! routes, extractors, token endpoints) need no store or directory type
//! parameters.

use std::sync::Arc;

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::{
    Activity, ActivityKind, AuditEvent, Context, Denial, Directory, EndReason, Error,
    Impersonation, Initiator, Principal, Requester, SessionId, SessionSecret, StartRequest,
    Started, Store, UserId,
};

/// What a binding needs of an [`Impersonation`] service. Implemented for
/// every `Impersonation<S, D>` (and for `Arc`s of one); host apps never
/// implement it themselves.
#[async_trait]
pub trait ImpersonationApi: Send + Sync + 'static {
    /// See [`Impersonation::resolve`].
    async fn resolve(&self, secret: &SessionSecret) -> Result<Context, Error>;
    /// See [`Impersonation::resolve_fresh`].
    async fn resolve_fresh(&self, secret: &SessionSecret) -> Result<Context, Error>;
    /// See [`Impersonation::resolve_session`].
    async fn resolve_session(&self, id: SessionId) -> Result<Context, Error>;
    /// See [`Impersonation::resolve_session_reusing`].
    async fn resolve_session_reusing(&self, id: SessionId) -> Result<Context, Error>;
    /// See [`Impersonation::check_session`].
    async fn check_session(&self, id: SessionId) -> Result<Context, Error>;
    /// A person by id, from the service's [`Directory`] (`None`: unknown).
    async fn principal(&self, id: &UserId) -> Result<Option<Principal>, Error>;
    /// See [`Impersonation::start`].
    async fn start(
        &self,
        requester: Requester<'_>,
        request: StartRequest,
    ) -> Result<Started, Error>;
    /// See [`Impersonation::stop`].
    async fn stop(&self, secret: &SessionSecret, by: &Principal) -> Result<EndReason, Error>;
    /// See [`Impersonation::stop_session`].
    async fn stop_session(&self, id: SessionId, by: &Principal) -> Result<EndReason, Error>;
    /// See [`Impersonation::revoke_all_for_agent`].
    async fn revoke_all_for_agent(
        &self,
        agent: &UserId,
        by: Initiator<'_>,
        note: &str,
    ) -> Result<Vec<SessionId>, Error>;
    /// See [`Impersonation::record`].
    async fn record(&self, ctx: &Context, activity: Activity) -> Result<AuditEvent, Error>;
    /// See [`Impersonation::admit`].
    async fn admit(&self, ctx: &Context, kind: ActivityKind, attempt: &str) -> Result<(), Error>;
    /// See [`Impersonation::record_completed`].
    async fn record_completed(
        &self,
        ctx: &Context,
        activity: Activity,
    ) -> Result<AuditEvent, Error>;
    /// See [`Impersonation::record_denied`].
    async fn record_denied(
        &self,
        ctx: &Context,
        denial: Denial,
        attempt: &str,
    ) -> Result<Error, Error>;
    /// See [`Impersonation::record_refused`].
    async fn record_refused(
        &self,
        ctx: &Context,
        denial: Denial,
        attempt: &str,
    ) -> Result<(), Error>;
    /// See [`Impersonation::record_used_by_other`].
    async fn record_used_by_other(
        &self,
        ctx: &Context,
        by: &Principal,
        attempt: &str,
    ) -> Result<Error, Error>;
    /// The service's clock.
    fn now(&self) -> OffsetDateTime;
}

#[async_trait]
impl<S, D> ImpersonationApi for Impersonation<S, D>
where
    S: Store + 'static,
    D: Directory + 'static,
{
    async fn resolve(&self, secret: &SessionSecret) -> Result<Context, Error> {
        Impersonation::resolve(self, secret).await
    }
    async fn resolve_fresh(&self, secret: &SessionSecret) -> Result<Context, Error> {
        Impersonation::resolve_fresh(self, secret).await
    }
    async fn resolve_session(&self, id: SessionId) -> Result<Context, Error> {
        Impersonation::resolve_session(self, id).await
    }
    async fn resolve_session_reusing(&self, id: SessionId) -> Result<Context, Error> {
        Impersonation::resolve_session_reusing(self, id).await
    }
    async fn check_session(&self, id: SessionId) -> Result<Context, Error> {
        Impersonation::check_session(self, id).await
    }
    async fn principal(&self, id: &UserId) -> Result<Option<Principal>, Error> {
        Ok(self.directory().principal(id).await?)
    }
    async fn start(
        &self,
        requester: Requester<'_>,
        request: StartRequest,
    ) -> Result<Started, Error> {
        Impersonation::start(self, requester, request).await
    }
    async fn stop(&self, secret: &SessionSecret, by: &Principal) -> Result<EndReason, Error> {
        Impersonation::stop(self, secret, by).await
    }
    async fn stop_session(&self, id: SessionId, by: &Principal) -> Result<EndReason, Error> {
        Impersonation::stop_session(self, id, by).await
    }
    async fn revoke_all_for_agent(
        &self,
        agent: &UserId,
        by: Initiator<'_>,
        note: &str,
    ) -> Result<Vec<SessionId>, Error> {
        Impersonation::revoke_all_for_agent(self, agent, by, note).await
    }
    async fn record(&self, ctx: &Context, activity: Activity) -> Result<AuditEvent, Error> {
        Impersonation::record(self, ctx, activity).await
    }
    async fn admit(&self, ctx: &Context, kind: ActivityKind, attempt: &str) -> Result<(), Error> {
        Impersonation::admit(self, ctx, kind, attempt).await
    }
    async fn record_completed(
        &self,
        ctx: &Context,
        activity: Activity,
    ) -> Result<AuditEvent, Error> {
        Impersonation::record_completed(self, ctx, activity).await
    }
    async fn record_denied(
        &self,
        ctx: &Context,
        denial: Denial,
        attempt: &str,
    ) -> Result<Error, Error> {
        Impersonation::record_denied(self, ctx, denial, attempt).await
    }
    async fn record_refused(
        &self,
        ctx: &Context,
        denial: Denial,
        attempt: &str,
    ) -> Result<(), Error> {
        Impersonation::record_refused(self, ctx, denial, attempt).await
    }
    async fn record_used_by_other(
        &self,
        ctx: &Context,
        by: &Principal,
        attempt: &str,
    ) -> Result<Error, Error> {
        Impersonation::record_used_by_other(self, ctx, by, attempt).await
    }
    fn now(&self) -> OffsetDateTime {
        Impersonation::now(self)
    }
}

/// A shared service (`Arc<Impersonation<..>>`) serves as well, so the host
/// app can keep its own handle for audit pages and revocation.
#[async_trait]
impl<T: ImpersonationApi + ?Sized> ImpersonationApi for Arc<T> {
    async fn resolve(&self, secret: &SessionSecret) -> Result<Context, Error> {
        (**self).resolve(secret).await
    }
    async fn resolve_fresh(&self, secret: &SessionSecret) -> Result<Context, Error> {
        (**self).resolve_fresh(secret).await
    }
    async fn resolve_session(&self, id: SessionId) -> Result<Context, Error> {
        (**self).resolve_session(id).await
    }
    async fn resolve_session_reusing(&self, id: SessionId) -> Result<Context, Error> {
        (**self).resolve_session_reusing(id).await
    }
    async fn check_session(&self, id: SessionId) -> Result<Context, Error> {
        (**self).check_session(id).await
    }
    async fn principal(&self, id: &UserId) -> Result<Option<Principal>, Error> {
        (**self).principal(id).await
    }
    async fn start(
        &self,
        requester: Requester<'_>,
        request: StartRequest,
    ) -> Result<Started, Error> {
        (**self).start(requester, request).await
    }
    async fn stop(&self, secret: &SessionSecret, by: &Principal) -> Result<EndReason, Error> {
        (**self).stop(secret, by).await
    }
    async fn revoke_all_for_agent(
        &self,
        agent: &UserId,
        by: Initiator<'_>,
        note: &str,
    ) -> Result<Vec<SessionId>, Error> {
        (**self).revoke_all_for_agent(agent, by, note).await
    }
    async fn stop_session(&self, id: SessionId, by: &Principal) -> Result<EndReason, Error> {
        (**self).stop_session(id, by).await
    }
    async fn record(&self, ctx: &Context, activity: Activity) -> Result<AuditEvent, Error> {
        (**self).record(ctx, activity).await
    }
    async fn admit(&self, ctx: &Context, kind: ActivityKind, attempt: &str) -> Result<(), Error> {
        (**self).admit(ctx, kind, attempt).await
    }
    async fn record_completed(
        &self,
        ctx: &Context,
        activity: Activity,
    ) -> Result<AuditEvent, Error> {
        (**self).record_completed(ctx, activity).await
    }
    async fn record_denied(
        &self,
        ctx: &Context,
        denial: Denial,
        attempt: &str,
    ) -> Result<Error, Error> {
        (**self).record_denied(ctx, denial, attempt).await
    }
    async fn record_refused(
        &self,
        ctx: &Context,
        denial: Denial,
        attempt: &str,
    ) -> Result<(), Error> {
        (**self).record_refused(ctx, denial, attempt).await
    }
    async fn record_used_by_other(
        &self,
        ctx: &Context,
        by: &Principal,
        attempt: &str,
    ) -> Result<Error, Error> {
        (**self).record_used_by_other(ctx, by, attempt).await
    }
    fn now(&self) -> OffsetDateTime {
        (**self).now()
    }
}

/// Turns a bearer token that is not a session secret (a signed token that
/// names a session, such as `impersonation-oidc`'s) into the context of
/// that session. Bindings try it on `Authorization: Bearer` values that are
/// not `imp1.` secrets.
#[async_trait]
pub trait TokenResolver: Send + Sync + 'static {
    /// `None` when the token is not of this resolver's kind (the request is
    /// then not an impersonation, and the binding goes on without one);
    /// `Some(Err(_))` when it is, and is refused.
    async fn resolve_token(&self, token: &str) -> Option<Result<Context, Error>>;

    /// [`TokenResolver::resolve_token`] for a request that only reads (a
    /// safe method): it may answer from a session resolved a moment ago
    /// ([`Impersonation::resolve_session_reusing`]), where `resolve_token`,
    /// used for changes, must read the store. The default reads the store.
    async fn resolve_token_for_read(&self, token: &str) -> Option<Result<Context, Error>> {
        self.resolve_token(token).await
    }
}
