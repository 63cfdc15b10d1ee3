//! The demo is part of the product: it must keep telling the whole story.
#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

#[tokio::test]
async fn the_walkthrough_ends_in_the_audit_table_and_a_verified_chain() {
    let mut out = Vec::new();
    impersonation_walkthrough::run(&mut out, false)
        .await
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("You are impersonating Olive Owner (Pinewood Campground)"));
    assert!(
        text.contains("•••••••••••••••4242  (masked)"),
        "the card is masked"
    );
    assert!(
        !text.contains("\u{1b}["),
        "no ANSI codes when colour is off"
    );
    assert!(text.contains("password_hash") && text.contains("(dropped)"));
    // The refusals are the ones the story names, for its reasons.
    assert!(
        text.contains("(the shadow user has no billing:manage)"),
        "{text}"
    );
    assert!(text.contains("(nesting)"), "{text}");
    assert!(text.contains("(protected_role)"), "{text}");
    assert!(
        text.contains(
            "| Timestamp | Action | User Performing Action | Impersonated User | Details |"
        )
    );
    for label in [
        "User Impersonation |",
        "Data Access",
        "Data Modification",
        "Denied Attempt",
        "User Impersonation End",
    ] {
        assert!(text.contains(label), "the table lists {label}");
    }
    assert!(
        text.trim_end()
            .ends_with("chain verified: 1 chain(s), 7 events, SHA-256 linked"),
        "{text}"
    );
}
