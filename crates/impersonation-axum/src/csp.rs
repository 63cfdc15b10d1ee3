//! The banner's inline styles under the page's Content-Security-Policy.
//!
//! A page whose policy blocks inline styles (`style-src 'self'`, say, or
//! only a `default-src`) would show the banner unstyled: not fixed at the
//! top, but at the foot of the page, where the agent may never scroll.
//! The layer therefore lets the banner's own `style` attributes through,
//! and nothing else: it gives such a policy a `style-src-attr` directive
//! (or adds to the one it has) with `'unsafe-hashes'` and the SHA-256 of
//! each of the banner's styles, keeping the sources the policy already
//! allowed for style attributes. A policy that allows inline styles is
//! left as it is.

use std::sync::LazyLock;

use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

use crate::banner::STYLES;

/// `'sha256-…'` of each of the banner's styles.
static HASHES: LazyLock<Vec<String>> = LazyLock::new(|| {
    STYLES
        .iter()
        .map(|style| format!("'sha256-{}'", STANDARD.encode(Sha256::digest(style))))
        .collect()
});

static SOURCES: LazyLock<String> =
    LazyLock::new(|| format!("'unsafe-hashes' {}", HASHES.join(" ")));

/// The Content-Security-Policy sources that let the banner's inline styles
/// through: `'unsafe-hashes'` and the SHA-256 of each of its `style`
/// attributes.
///
/// The layer adds them to a page's policy itself when it injects the
/// banner. An app that renders [`crate::banner_html`] itself under a
/// policy that blocks inline styles adds them to its `style-src-attr`
/// (or `style-src`) directive:
///
/// ```
/// let policy = format!(
///     "default-src 'self'; style-src 'self' {}",
///     impersonation_axum::banner_style_sources()
/// );
/// assert!(policy.contains("'unsafe-hashes' 'sha256-"));
/// ```
pub fn banner_style_sources() -> &'static str {
    &SOURCES
}

/// Lets the banner's styles through every policy of the response, enforced
/// or report-only (where they would only be reported).
pub(crate) fn allow_banner_styles(headers: &mut HeaderMap) {
    for name in [
        header::CONTENT_SECURITY_POLICY,
        header::CONTENT_SECURITY_POLICY_REPORT_ONLY,
    ] {
        allow_in(headers, name);
    }
}

fn allow_in(headers: &mut HeaderMap, name: HeaderName) {
    let mut changed = false;
    let values: Vec<HeaderValue> = headers
        .get_all(&name)
        .iter()
        .map(|value| {
            let rewritten = value
                .to_str()
                .ok()
                .and_then(rewrite_list)
                .and_then(|text| HeaderValue::from_str(&text).ok());
            match rewritten {
                Some(new) => {
                    changed = true;
                    new
                }
                None => value.clone(),
            }
        })
        .collect();
    if changed {
        headers.remove(&name);
        for value in values {
            headers.append(&name, value);
        }
    }
}

/// A header value may hold several policies, separated by commas, each
/// enforced: the value with every one rewritten, or `None` if none needed
/// it.
fn rewrite_list(list: &str) -> Option<String> {
    let policies: Vec<(&str, Option<String>)> = list
        .split(',')
        .map(|policy| (policy, rewrite_policy(policy)))
        .collect();
    if policies.iter().all(|(_, new)| new.is_none()) {
        return None;
    }
    let parts: Vec<&str> = policies
        .iter()
        .map(|(old, new)| new.as_deref().unwrap_or(old.trim()))
        .collect();
    Some(parts.join(", "))
}

/// One directive: its name (lower case) and its sources.
struct Directive<'a> {
    name: String,
    sources: Vec<&'a str>,
}

fn is_keyword(source: &str, keyword: &str) -> bool {
    source.eq_ignore_ascii_case(keyword)
}

/// Whether `source` starts with `prefix` (lower case), in any case.
fn starts_with_any_case(source: &str, prefix: &str) -> bool {
    source
        .get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
}

/// Whether a source is a hash (`'sha256-…'` and its kin).
fn is_hash(source: &str) -> bool {
    ["'sha256-", "'sha384-", "'sha512-"]
        .iter()
        .any(|p| starts_with_any_case(source, p))
}

/// Whether a source is a nonce (`'nonce-…'`).
fn is_nonce(source: &str) -> bool {
    starts_with_any_case(source, "'nonce-")
}

/// Whether `sources` allow any inline style: `'unsafe-inline'`, which a
/// nonce or a hash beside it turns off (CSP Level 3).
fn allows_inline(sources: &[&str]) -> bool {
    let has_nonce_or_hash = sources.iter().any(|s| is_nonce(s) || is_hash(s));
    !has_nonce_or_hash && sources.iter().any(|s| is_keyword(s, "'unsafe-inline'"))
}

/// The policy with the banner's styles let through, or `None` if it lets
/// them through already.
fn rewrite_policy(policy: &str) -> Option<String> {
    let mut directives: Vec<Directive<'_>> = policy
        .split(';')
        .filter_map(|text| {
            let mut tokens = text.split_ascii_whitespace();
            let name = tokens.next()?.to_ascii_lowercase();
            Some(Directive {
                name,
                sources: tokens.collect(),
            })
        })
        .collect();
    // What governs a style attribute: the first `style-src-attr`, else
    // `style-src`, else `default-src` (a repeated directive is ignored).
    let governing = ["style-src-attr", "style-src", "default-src"]
        .iter()
        .find_map(|name| directives.iter().position(|d| d.name == *name))?;
    let sources = &directives[governing].sources;
    let unsafe_hashes = sources.iter().any(|s| is_keyword(s, "'unsafe-hashes'"));
    // Hashes are base64: compared exactly.
    if allows_inline(sources) || (unsafe_hashes && HASHES.iter().all(|h| sources.contains(&&**h))) {
        return None;
    }
    // `'none'` allows nothing and stands alone: it goes. Without
    // `'unsafe-hashes'` the list's hashes (and its nonces, always) did not
    // apply to style attributes: they go too, or `'unsafe-hashes'` would
    // let an attribute through that matches a `<style>` element's hash.
    let mut sources: Vec<&str> = sources
        .iter()
        .copied()
        .filter(|s| !is_keyword(s, "'none'") && !is_nonce(s) && (unsafe_hashes || !is_hash(s)))
        .collect();
    if !unsafe_hashes {
        sources.push("'unsafe-hashes'");
    }
    sources.extend(HASHES.iter().map(String::as_str));
    if directives[governing].name == "style-src-attr" {
        directives[governing].sources = sources;
    } else {
        directives.push(Directive {
            name: "style-src-attr".to_owned(),
            sources,
        });
    }
    let text: Vec<String> = directives
        .iter()
        .map(|d| {
            let mut text = d.name.clone();
            for source in &d.sources {
                text.push(' ');
                text.push_str(source);
            }
            text
        })
        .collect();
    Some(text.join("; "))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn ours() -> String {
        HASHES.join(" ")
    }

    #[test]
    fn a_policy_that_blocks_inline_styles_lets_the_banners_through() {
        let h = ours();
        for (policy, expected) in [
            (
                "default-src 'self'",
                format!("default-src 'self'; style-src-attr 'self' 'unsafe-hashes' {h}"),
            ),
            (
                "default-src 'none'; img-src *",
                format!("default-src 'none'; img-src *; style-src-attr 'unsafe-hashes' {h}"),
            ),
            (
                "Style-Src 'self' https://cdn.example 'sha256-abc=' 'unsafe-inline'",
                format!(
                    "style-src 'self' https://cdn.example 'sha256-abc=' 'unsafe-inline'; \
                     style-src-attr 'self' https://cdn.example 'unsafe-inline' 'unsafe-hashes' {h}"
                ),
            ),
            (
                "style-src 'nonce-r4nd0m'; style-src-attr 'none'",
                format!("style-src 'nonce-r4nd0m'; style-src-attr 'unsafe-hashes' {h}"),
            ),
            // The app's hashes and nonces, which did not apply to style
            // attributes, are not made to.
            (
                "style-src 'self' 'nonce-r4nd0m' 'sha256-abc='",
                format!(
                    "style-src 'self' 'nonce-r4nd0m' 'sha256-abc='; style-src-attr 'self' 'unsafe-hashes' {h}"
                ),
            ),
            (
                "style-src-attr 'sha384-def='",
                format!("style-src-attr 'unsafe-hashes' {h}"),
            ),
            (
                "style-src-attr 'unsafe-hashes' 'sha256-abc='; style-src-attr 'unsafe-inline'",
                format!(
                    "style-src-attr 'unsafe-hashes' 'sha256-abc=' {h}; style-src-attr 'unsafe-inline'"
                ),
            ),
        ] {
            assert_eq!(
                rewrite_policy(policy).as_deref(),
                Some(&*expected),
                "{policy}"
            );
            // Once let through, it stays as it is.
            assert_eq!(rewrite_policy(&expected), None, "{expected}");
        }
    }

    #[test]
    fn a_policy_that_allows_inline_styles_is_left_alone() {
        for policy in [
            "",
            "frame-ancestors 'self'",
            "script-src 'self'; img-src *",
            "default-src 'self' 'unsafe-inline'",
            "default-src 'none'; style-src 'unsafe-inline'",
            "style-src 'none'; style-src-attr 'UNSAFE-INLINE'",
        ] {
            assert_eq!(rewrite_policy(policy), None, "{policy}");
        }
    }

    #[test]
    fn each_policy_of_a_list_and_each_header_is_rewritten() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'self', img-src *"),
        );
        headers.append(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("frame-ancestors 'none'"),
        );
        headers.append(
            header::CONTENT_SECURITY_POLICY_REPORT_ONLY,
            HeaderValue::from_static("style-src 'self'"),
        );
        allow_banner_styles(&mut headers);
        let h = ours();
        let enforced: Vec<&str> = headers
            .get_all(header::CONTENT_SECURITY_POLICY)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(
            enforced,
            [
                format!("default-src 'self'; style-src-attr 'self' 'unsafe-hashes' {h}, img-src *"),
                "frame-ancestors 'none'".to_owned(),
            ]
        );
        assert_eq!(
            headers[header::CONTENT_SECURITY_POLICY_REPORT_ONLY],
            format!("style-src 'self'; style-src-attr 'self' 'unsafe-hashes' {h}").as_str()
        );
    }
}
