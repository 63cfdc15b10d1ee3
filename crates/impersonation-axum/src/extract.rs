//! Extractors: the impersonation context, the effective and the real user,
//! and a guard for routes that must not be reached while impersonating.

use std::sync::atomic::Ordering;

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use impersonation_core::{Context, Denial, Principal, ShadowUser};

use crate::layer::{CsrfToken, Handle, RefusalAnswer, route_of};

fn reject(status: StatusCode, text: &'static str) -> Response {
    (
        status,
        [(axum::http::header::CACHE_CONTROL, "no-store")],
        text,
    )
        .into_response()
}

/// The impersonation context; rejects with 403 when the request is not
/// made under impersonation.
#[derive(Debug, Clone)]
pub struct Impersonating(pub Context);

impl<S: Send + Sync> FromRequestParts<S> for Impersonating {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response> {
        parts
            .extensions
            .get::<Context>()
            .cloned()
            .map(Self)
            .ok_or_else(|| reject(StatusCode::FORBIDDEN, "not impersonating"))
    }
}

/// The impersonation context, if any. Never rejects.
#[derive(Debug, Clone)]
pub struct MaybeImpersonating(pub Option<Context>);

impl<S: Send + Sync> FromRequestParts<S> for MaybeImpersonating {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(parts.extensions.get::<Context>().cloned()))
    }
}

/// The signed-in person (the real agent while impersonating), as the host
/// app's authentication put it in the request; 401 without one.
#[derive(Debug, Clone)]
pub struct RealUser(pub Principal);

impl<S: Send + Sync> FromRequestParts<S> for RealUser {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .map(Self)
            .ok_or_else(|| reject(StatusCode::UNAUTHORIZED, "sign in first"))
    }
}

/// The user the request acts as: the shadow user while impersonating, the
/// signed-in principal otherwise; 401 without either.
#[derive(Debug, Clone)]
pub enum EffectiveUser {
    /// Impersonating: the projection of the customer (a cheap shared handle).
    Shadow(ShadowUser),
    /// Not impersonating: the signed-in person.
    Real(Box<Principal>),
}

impl EffectiveUser {
    /// The effective user's display name.
    pub fn display_name(&self) -> &str {
        match self {
            Self::Shadow(s) => s.display_name(),
            Self::Real(p) => &p.display_name,
        }
    }

    /// The effective user's id (the customer's while impersonating).
    pub fn id(&self) -> &impersonation_core::UserId {
        match self {
            Self::Shadow(s) => s.id(),
            Self::Real(p) => &p.id,
        }
    }

    /// The effective user's tenant.
    pub fn tenant(&self) -> &impersonation_core::TenantId {
        match self {
            Self::Shadow(s) => s.tenant(),
            Self::Real(p) => &p.tenant,
        }
    }

    /// Whether this is a shadow user (the request is impersonated).
    pub fn is_shadow(&self) -> bool {
        matches!(self, Self::Shadow(_))
    }

    /// The effective user's company and partner relationships (the
    /// customer's, while impersonating): which tenants beyond their own
    /// they work with.
    pub fn relationships(&self) -> &[impersonation_core::Relationship] {
        match self {
            Self::Shadow(s) => s.relationships(),
            Self::Real(p) => &p.relationships,
        }
    }

    /// Whether the request is made in a read-only impersonation, where the
    /// layer refuses every change: a page can say so, and leave out forms
    /// that change something without a permission of their own. (The
    /// shadow user of a read-only session holds only the permissions the
    /// policy counts as reads, `*:read`, `*:view` and `*:list` by default.)
    pub fn read_only(&self) -> bool {
        match self {
            Self::Shadow(s) => s.read_only(),
            Self::Real(_) => false,
        }
    }

    /// Whether the effective user holds a permission.
    pub fn has_permission(&self, permission: &str) -> bool {
        let p = impersonation_core::Permission::new(permission);
        match self {
            Self::Shadow(s) => s.has_permission(&p),
            Self::Real(r) => r.has_permission(&p),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for EffectiveUser {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response> {
        if let Some(ctx) = parts.extensions.get::<Context>() {
            return Ok(Self::Shadow(ctx.shadow().clone()));
        }
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .map(|p| Self::Real(Box::new(p)))
            .ok_or_else(|| reject(StatusCode::UNAUTHORIZED, "sign in first"))
    }
}

/// A guard for billing, password, credential and export routes: while
/// impersonating it refuses with 403 and audits the refusal (in a
/// session found over, ended elsewhere or its time up, it records nothing
/// and the layer answers 401 as for any request of an ended session).
///
/// Answered with its refusal ([`NotImpersonatingRejection`], as is or
/// dressed by [`NotImpersonatingRejection::answer_with`]), the request's
/// one audit event is the denial. A handler that takes the guard as a
/// `Result` and answers anything else of its own carried on past the
/// refusal: its request is audited as well, as an access or a
/// modification with its status.
#[derive(Debug, Clone, Copy)]
pub struct NotImpersonating;

/// The [`NotImpersonating`] guard's refusal.
///
/// As a response it is a plain-text 403 (or a 401 when the session
/// turned out to be over, a 503 when the refusal could not be put on the
/// trail, or a 500 when the impersonation layer is missing). An app that
/// renders its own refusal page, or redirects,
/// answers with [`answer_with`](Self::answer_with), so that the denial
/// stays the request's one record:
///
/// ```
/// use axum::http::StatusCode;
/// use axum::response::{IntoResponse, Redirect, Response};
/// use impersonation_axum::{NotImpersonating, NotImpersonatingRejection};
///
/// async fn billing(guard: Result<NotImpersonating, NotImpersonatingRejection>) -> Response {
///     match guard {
///         Ok(NotImpersonating) => "card on file".into_response(),
///         Err(refusal) if refusal.status() == StatusCode::FORBIDDEN => {
///             refusal.answer_with(Redirect::to("/?refused=billing"))
///         }
///         Err(other) => other.into_response(),
///     }
/// }
/// ```
#[derive(Debug)]
pub struct NotImpersonatingRejection {
    status: StatusCode,
    text: &'static str,
    /// The guard settled the request's record: the denial is on the
    /// trail (403), or the session was over and nothing is to be
    /// recorded (401). An answer made of this refusal is marked as the
    /// refusal, so the layer writes no record of its own (and answers a
    /// 401's as for an ended session).
    recorded: bool,
}

impl NotImpersonatingRejection {
    /// 403 for a refusal on the trail, 401 when the session turned out to
    /// be over (ended elsewhere, or its time up: nothing recorded after
    /// its end, and the layer answers as for an ended session), 503 when
    /// the trail could not take it, 500 when the impersonation layer is
    /// missing.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// Answers the refusal with `response` (the app's own refusal page,
    /// a redirect): the denial the guard put on the trail stays the
    /// request's one record. Answer with it only when nothing was done
    /// past the refusal; an answer of the handler's own, made without
    /// it, is audited as a request that carried on.
    ///
    /// A refusal that did not reach the trail (503) or found no layer
    /// (500) marks nothing: the layer then records the request itself.
    /// One of a session found over (401) is marked, and the layer
    /// replaces the answer with its own for an ended session (the cookie
    /// cleared): nothing the handler made of it is sent.
    pub fn answer_with(self, response: impl IntoResponse) -> Response {
        let mut res = response.into_response();
        if self.recorded {
            res.extensions_mut().insert(RefusalAnswer);
        }
        res
    }
}

impl IntoResponse for NotImpersonatingRejection {
    fn into_response(self) -> Response {
        let (status, text) = (self.status, self.text);
        self.answer_with(reject(status, text))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for NotImpersonating {
    type Rejection = NotImpersonatingRejection;

    async fn from_request_parts(
        parts: &mut Parts,
        _: &S,
    ) -> Result<Self, NotImpersonatingRejection> {
        let refusal = |status, text, recorded| NotImpersonatingRejection {
            status,
            text,
            recorded,
        };
        // Without the layer in front nobody can tell: a route wired outside
        // it fails loudly rather than pass the guard unchecked.
        let Some(Handle(state)) = parts.extensions.get::<Handle>().cloned() else {
            return Err(refusal(
                StatusCode::INTERNAL_SERVER_ERROR,
                "impersonation layer missing",
                false,
            ));
        };
        let Some(ctx) = parts.extensions.get::<Context>().cloned() else {
            return Ok(Self);
        };
        // The route's template, not its path: a path may carry a token
        // (`/password/reset/{token}`), which must not reach the trail.
        let route = route_of(&parts.extensions, &parts.uri);
        let attempt = format!("{} {route}", parts.method);
        // The refusal is the request's record if it is the answer, so the
        // layer then writes none. It runs to its end, as the layer's own
        // writes do: a client that goes away meanwhile does not take it
        // off the trail.
        state.guard_refused.store(true, Ordering::SeqCst);
        state.refusal_in_flight.store(true, Ordering::SeqCst);
        let api = std::sync::Arc::clone(&state.shared.api);
        let ctx = ctx.clone();
        let write = crate::layer::run_to_end(async move {
            api.record_denied(&ctx, Denial::SensitiveAction, &attempt)
                .await
        });
        let written = write.await;
        state.refusal_in_flight.store(false, Ordering::SeqCst);
        match written {
            Ok(impersonation_core::Error::Denied(_)) => Err(refusal(
                StatusCode::FORBIDDEN,
                "This page is not available while impersonating a customer.",
                true,
            )),
            // The session was over (ended by another process, or its time
            // up): nothing is on the trail after its end, and the layer
            // answers as for any request of an ended session.
            Ok(impersonation_core::Error::Unauthenticated) => {
                state.refused_over.store(true, Ordering::SeqCst);
                Err(refusal(
                    StatusCode::UNAUTHORIZED,
                    "impersonation session ended",
                    true,
                ))
            }
            // A store that failed (or an answer the service does not
            // give): nothing is known to be on the trail.
            Ok(_) | Err(_) => Err(refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "audit unavailable",
                false,
            )),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for CsrfToken {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response> {
        parts.extensions.get::<CsrfToken>().cloned().ok_or_else(|| {
            reject(
                StatusCode::INTERNAL_SERVER_ERROR,
                "impersonation layer missing",
            )
        })
    }
}
