//! The people and the stand-in for the host's authentication that the
//! binding's HTTP tests share.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use impersonation_core::{
    MemoryDirectory, Principal, RelationKind, Relationship, TenantId, UserId,
};

/// A support agent of the vendor who may impersonate anyone, and read and
/// change bookings.
pub(crate) fn agent(id: &str) -> Principal {
    Principal::new(
        UserId::new(id).unwrap(),
        format!("Agent {id}"),
        TenantId::new("vendor").unwrap(),
    )
    .with_permissions(["impersonation:start", "bookings:read", "bookings:write"])
    .with_relationship(Relationship::all_tenants(
        RelationKind::Support,
        "s",
        "Support",
    ))
}

/// A customer of the Pinewood Campground named `name`, who may read
/// bookings and manage billing.
pub(crate) fn customer(id: &str, name: &str) -> Principal {
    let t = TenantId::new("pinewood").unwrap();
    Principal::new(UserId::new(id).unwrap(), name, t.clone())
        .with_permissions(["bookings:read", "billing:manage"])
        .with_relationship(Relationship::new(
            RelationKind::Company,
            "pw",
            "Pinewood Campground",
            [t],
        ))
}

/// The host app's authentication, as a test stands in for it: the
/// `x-test-user` header names the signed-in person.
pub(crate) async fn auth(
    State(directory): State<MemoryDirectory>,
    mut req: Request,
    next: Next,
) -> Response {
    let user = req
        .headers()
        .get("x-test-user")
        .and_then(|v| v.to_str().ok())
        .and_then(|u| UserId::new(u).ok());
    if let Some(principal) = user.and_then(|u| directory.get(&u)) {
        req.extensions_mut().insert(principal);
    }
    next.run(req).await
}
