//! The service behind one object-safe trait, so the layer, routes and
//! extractors need no store or directory type parameters.

use std::sync::Arc;

use async_trait::async_trait;
use impersonation_core::{
    Activity, AuditEvent, Context, Denial, Directory, EndReason, Error, Impersonation, Principal,
    Requester, SessionSecret, StartRequest, Started, Store,
};
use time::OffsetDateTime;

/// What a binding needs of an [`Impersonation`] service. Implemented for
/// every `Impersonation<S, D>`; host apps never implement it themselves.
#[async_trait]
pub trait ImpersonationApi: Send + Sync + 'static {
    /// See [`Impersonation::resolve`].
    async fn resolve(&self, secret: &SessionSecret) -> Result<Context, Error>;
    /// See [`Impersonation::start`].
    async fn start(
        &self,
        requester: Requester<'_>,
        request: StartRequest,
    ) -> Result<Started, Error>;
    /// See [`Impersonation::stop`].
    async fn stop(&self, secret: &SessionSecret, by: &Principal) -> Result<EndReason, Error>;
    /// See [`Impersonation::record`].
    async fn record(&self, ctx: &Context, activity: Activity) -> Result<AuditEvent, Error>;
    /// See [`Impersonation::record_denied`].
    async fn record_denied(
        &self,
        ctx: &Context,
        denial: Denial,
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
    async fn record(&self, ctx: &Context, activity: Activity) -> Result<AuditEvent, Error> {
        Impersonation::record(self, ctx, activity).await
    }
    async fn record_denied(
        &self,
        ctx: &Context,
        denial: Denial,
        attempt: &str,
    ) -> Result<Error, Error> {
        Impersonation::record_denied(self, ctx, denial, attempt).await
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
    async fn record(&self, ctx: &Context, activity: Activity) -> Result<AuditEvent, Error> {
        (**self).record(ctx, activity).await
    }
    async fn record_denied(
        &self,
        ctx: &Context,
        denial: Denial,
        attempt: &str,
    ) -> Result<Error, Error> {
        (**self).record_denied(ctx, denial, attempt).await
    }
    fn now(&self) -> OffsetDateTime {
        (**self).now()
    }
}
