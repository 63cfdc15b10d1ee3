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
//! left as it is. The same goes for a policy an HTML page delivers in a
//! `<meta http-equiv="Content-Security-Policy">` tag, rewritten in its
//! `content` attribute as the banner is injected.
//!
//! A `form-action` that does not allow the site's own origin (`'none'`,
//! say, in an app that posts no forms) would block the banner's Stop
//! button. Such a directive gets the stop route's URL at the site's
//! origins, and nothing else (a `'none'` beside it goes, as it must stand
//! alone).

use std::sync::LazyLock;

use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

use crate::banner::{Attribute, Attributes, STYLES};

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

/// Lets the banner's styles, and its Stop form's post to `stop` (the
/// sources [`crate::csrf::stop_sources`] gives, if any), through every
/// policy of the response, enforced or report-only (where they would only
/// be reported).
pub(crate) fn allow_banner(headers: &mut HeaderMap, stop: &[String]) {
    for name in [
        header::CONTENT_SECURITY_POLICY,
        header::CONTENT_SECURITY_POLICY_REPORT_ONLY,
    ] {
        allow_in(headers, name, stop);
    }
}

fn allow_in(headers: &mut HeaderMap, name: HeaderName, stop: &[String]) {
    let mut changed = false;
    let values: Vec<HeaderValue> = headers
        .get_all(&name)
        .iter()
        .map(|value| {
            let rewritten = value
                .to_str()
                .ok()
                .and_then(|list| rewrite_list(list, stop))
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
fn rewrite_list(list: &str, stop: &[String]) -> Option<String> {
    let policies: Vec<(&str, Option<String>)> = list
        .split(',')
        .map(|policy| (policy, rewrite_policy(policy, stop)))
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

/// A `<meta http-equiv="Content-Security-Policy" content="…">` start tag
/// (`tag`, from its `<` to its `>`) with the banner's styles (and its Stop
/// form's post to `stop`) let through its policy, or `None` if it is no
/// such tag, its policy lets them through already, or its `content` might
/// read otherwise to a browser
/// than here (see `decoded`), or holds anything but ASCII: left as it is
/// then, the banner unstyled. A policy a page delivers this way is
/// enforced as one in a header is (browsers ignore a report-only one in
/// a `<meta>`).
pub(crate) fn rewrite_meta(tag: &[u8], stop: &[String]) -> Option<Vec<u8>> {
    let attributes = attributes(tag)?;
    let value = |name: &str| {
        attributes
            .iter()
            .find(|a| a.name.eq_ignore_ascii_case(name.as_bytes()))
    };
    let equiv = value("http-equiv")?;
    let equiv = std::str::from_utf8(equiv.value).ok()?;
    if !decoded(equiv)?
        .trim()
        .eq_ignore_ascii_case("content-security-policy")
    {
        return None;
    }
    let content = value("content")?;
    let policy = decoded(std::str::from_utf8(content.value).ok()?)?;
    // A directive with anything but ASCII in it is dropped by browsers
    // (and a header can hold none): rewritten, it could turn into one
    // they keep. Such a policy is left as it is.
    if !policy.is_ascii() {
        return None;
    }
    let new = rewrite_policy(&policy, stop)?;
    let escaped = new.replace('&', "&amp;").replace('"', "&quot;");
    let mut out = Vec::with_capacity(tag.len() + escaped.len());
    out.extend_from_slice(&tag[..content.span.start]);
    out.push(b'"');
    out.extend_from_slice(escaped.as_bytes());
    out.push(b'"');
    out.extend_from_slice(&tag[content.span.end..]);
    Some(out)
}

/// The attributes of the start tag `tag` (`<` to `>`) that a browser
/// keeps: the first of a repeated name. `None` if the tag does not end.
pub(crate) fn attributes(tag: &[u8]) -> Option<Vec<Attribute<'_>>> {
    let mut all = Attributes::of(tag);
    let mut found: Vec<Attribute<'_>> = Vec::new();
    for attribute in all.by_ref() {
        if !found
            .iter()
            .any(|a| a.name.eq_ignore_ascii_case(attribute.name))
        {
            found.push(attribute);
        }
    }
    all.end.map(|_| found)
}

/// An attribute value with its character references decoded as a
/// browser decodes them, or `None` wherever this reading might differ
/// from a browser's: a named reference other than `&amp;`, `&quot;`,
/// `&apos;`, `&lt;`, `&gt;`, or any reference without its `;` (which
/// browsers sometimes decode and sometimes not), and a numeric one that
/// is malformed or names no plain character (0, a C1 control, a
/// surrogate, past U+10FFFF). A `&` that begins no reference (one before
/// a space) is itself.
fn decoded(raw: &str) -> Option<String> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        let next = after.chars().next();
        let (c, len) = match next {
            Some('#') => {
                let (radix, digits_at) = match after[1..].chars().next() {
                    Some('x' | 'X') => (16, 2),
                    _ => (10, 1),
                };
                let digits = after[digits_at..]
                    .bytes()
                    .take_while(|b| {
                        if radix == 16 {
                            b.is_ascii_hexdigit()
                        } else {
                            b.is_ascii_digit()
                        }
                    })
                    .count();
                if digits == 0
                    || digits > 8
                    || after.as_bytes().get(digits_at + digits) != Some(&b';')
                {
                    return None;
                }
                let code =
                    u32::from_str_radix(&after[digits_at..digits_at + digits], radix).ok()?;
                let c = char::from_u32(code)
                    .filter(|c| *c != '\0' && !('\u{80}'..='\u{9f}').contains(c))?;
                (c, digits_at + digits + 1)
            }
            Some(c) if c.is_ascii_alphanumeric() => {
                let name_len = after.bytes().take_while(u8::is_ascii_alphanumeric).count();
                if after.as_bytes().get(name_len) != Some(&b';') {
                    return None;
                }
                let c = match &after[..name_len] {
                    "amp" => '&',
                    "quot" => '"',
                    "apos" => '\'',
                    "lt" => '<',
                    "gt" => '>',
                    _ => return None,
                };
                (c, name_len + 1)
            }
            _ => ('&', 0),
        };
        out.push(c);
        rest = &after[len..];
    }
    out.push_str(rest);
    Some(out)
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

/// The policy with the banner's styles, and its Stop form's post to
/// `stop`, let through, or `None` if it lets them through already.
fn rewrite_policy<'a>(policy: &'a str, stop: &'a [String]) -> Option<String> {
    let mut directives: Vec<Directive<'a>> = policy
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
    let styled = allow_styles(&mut directives);
    let posted = allow_stop(&mut directives, stop);
    if !(styled || posted) {
        return None;
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

/// Lets the banner's style attributes through `directives`; `false` if
/// they were let through already.
fn allow_styles(directives: &mut Vec<Directive<'_>>) -> bool {
    // What governs a style attribute: the first `style-src-attr`, else
    // `style-src`, else `default-src` (a repeated directive is ignored).
    let Some(governing) = ["style-src-attr", "style-src", "default-src"]
        .iter()
        .find_map(|name| directives.iter().position(|d| d.name == *name))
    else {
        return false;
    };
    let sources = &directives[governing].sources;
    let unsafe_hashes = sources.iter().any(|s| is_keyword(s, "'unsafe-hashes'"));
    // Hashes are base64: compared exactly.
    if allows_inline(sources) || (unsafe_hashes && HASHES.iter().all(|h| sources.contains(&&**h))) {
        return false;
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
    true
}

/// Lets the banner's Stop form post to the `stop` sources through the
/// policy's `form-action` (the first; it has no fallback, so without one
/// forms post anywhere): unless it allows the site's own origin (`'self'`,
/// `*`), each source it lacks is added, and a `'none'` goes. `false` if
/// nothing changed.
fn allow_stop<'a>(directives: &mut [Directive<'a>], stop: &'a [String]) -> bool {
    let Some(action) = directives.iter_mut().find(|d| d.name == "form-action") else {
        return false;
    };
    if action
        .sources
        .iter()
        .any(|s| is_keyword(s, "'self'") || *s == "*")
    {
        return false;
    }
    let missing: Vec<&str> = stop
        .iter()
        .map(String::as_str)
        .filter(|s| !action.sources.contains(s))
        .collect();
    if missing.is_empty() {
        return false;
    }
    action.sources.retain(|s| !is_keyword(s, "'none'"));
    action.sources.extend(missing);
    true
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn ours() -> String {
        HASHES.join(" ")
    }

    fn meta(tag: &str) -> Option<String> {
        rewrite_meta(tag.as_bytes(), &[]).map(|t| String::from_utf8(t).unwrap())
    }

    #[test]
    fn a_form_action_that_allows_not_even_this_site_lets_the_stop_form_post() {
        let url = "https://app.example.com/impersonation/stop";
        let stop = [url.to_owned()];
        let h = ours();
        for (policy, expected) in [
            ("form-action 'none'", format!("form-action {url}")),
            ("form-action", format!("form-action {url}")),
            (
                "form-action 'NONE'; base-uri 'none'",
                format!("form-action {url}; base-uri 'none'"),
            ),
            (
                "default-src 'self'; form-action https://pay.example.com",
                format!(
                    "default-src 'self'; form-action https://pay.example.com {url}; style-src-attr 'self' 'unsafe-hashes' {h}"
                ),
            ),
            // Only the first `form-action` counts.
            (
                "form-action 'none'; form-action 'self'",
                format!("form-action {url}; form-action 'self'"),
            ),
        ] {
            let rewritten = rewrite_policy(policy, &stop);
            assert_eq!(rewritten, Some(expected), "{policy}");
            // Rewritten once: the next rewrite finds nothing to do.
            assert_eq!(rewrite_policy(&rewritten.unwrap(), &stop), None, "{policy}");
        }
        // A directive that allows this site (or the stop route), or none
        // at all (forms post anywhere), is left alone; so is every policy
        // when there is no source to give.
        for policy in [
            "form-action 'self'",
            "form-action 'SELF' https://pay.example.com",
            "form-action *",
            "form-action https://app.example.com/impersonation/stop",
            "script-src 'self'",
        ] {
            assert_eq!(rewrite_policy(policy, &stop), None, "{policy}");
        }
        assert_eq!(rewrite_policy("form-action 'none'", &[]), None);
        // Several origins' stop routes: each one the directive lacks.
        let two = [
            url.to_owned(),
            "https://eu.example.com/impersonation/stop".to_owned(),
        ];
        let once = rewrite_policy(&format!("form-action {url}"), &two).unwrap();
        assert_eq!(once, format!("form-action {url} {}", two[1]));
        assert_eq!(rewrite_policy(&once, &two), None);
        // In a `<meta>` too.
        assert_eq!(
            rewrite_meta(
                b"<meta http-equiv=Content-Security-Policy content=\"form-action &#39;none&#39;\">",
                &stop
            )
            .map(|t| String::from_utf8(t).unwrap()),
            Some(format!(
                "<meta http-equiv=Content-Security-Policy content=\"form-action {url}\">"
            ))
        );
        // And in every header policy, report-only ones too.
        let mut headers = HeaderMap::new();
        for (name, value) in [
            (header::CONTENT_SECURITY_POLICY, "form-action 'none'"),
            (
                header::CONTENT_SECURITY_POLICY_REPORT_ONLY,
                "form-action https://pay.example.com",
            ),
        ] {
            headers.append(name, HeaderValue::from_static(value));
        }
        allow_banner(&mut headers, &stop);
        assert_eq!(
            headers[header::CONTENT_SECURITY_POLICY],
            format!("form-action {url}").as_str()
        );
        assert_eq!(
            headers[header::CONTENT_SECURITY_POLICY_REPORT_ONLY],
            format!("form-action https://pay.example.com {url}").as_str()
        );
    }

    #[test]
    fn a_meta_policy_is_rewritten_in_its_content_attribute() {
        let h = ours();
        let expected = format!(
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'self'; style-src-attr 'self' 'unsafe-hashes' {h}\">"
        );
        for tag in [
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'self'\">",
            "<meta http-equiv=\"Content-Security-Policy\" content='default-src &#39;self&#39;'>",
            "<meta http-equiv=\"Content-Security-Policy\" content = \"default-src &apos;self&#x27;\">",
        ] {
            let got = meta(tag).unwrap();
            assert_eq!(got.replace("content = ", "content="), expected, "{tag}");
        }
        // Any case, any order, unquoted, closed with `/>`; `&` and `"`
        // escaped on the way out.
        assert_eq!(
            meta("<META CONTENT=\"report-uri /r?a=1&amp;b=&quot;2; default-src 'none'\" Http-Equiv=content-security-policy />").unwrap(),
            format!("<META CONTENT=\"report-uri /r?a=1&amp;b=&quot;2; default-src 'none'; style-src-attr 'unsafe-hashes' {h}\" Http-Equiv=content-security-policy />")
        );
        // The first of a repeated attribute is the one a browser reads.
        assert_eq!(
            meta("<meta http-equiv=content-security-policy content=\"style-src 'self'\" content=\"default-src *\">").unwrap(),
            format!("<meta http-equiv=content-security-policy content=\"style-src 'self'; style-src-attr 'self' 'unsafe-hashes' {h}\" content=\"default-src *\">")
        );
    }

    /// `text` as an attribute value a page might carry: quoted either way
    /// or not at all, each character written as itself or as a
    /// reference, as `pick` says; with `odd`, some references are of the
    /// kinds a browser may read otherwise than the rewrite would (no `;`,
    /// a `+`, a name outside the few, leading zeros).
    fn spelled(text: &str, quote: u8, pick: &[u8], odd: bool) -> String {
        let mut out = String::new();
        let q = match quote % 3 {
            0 => "\"",
            1 => "'",
            // Unquoted only if nothing in it ends or breaks such a value.
            _ if !text.contains([' ', '"', '\'', '=', '<', '>', '`']) => "",
            _ => "\"",
        };
        out.push_str(q);
        for (i, c) in text.chars().enumerate() {
            let how = pick.get(i % pick.len().max(1)).copied().unwrap_or(0) % 8;
            let code = u32::from(c);
            match (c, how) {
                ('&', _) => out.push_str("&amp;"),
                ('"', _) if q == "\"" => out.push_str("&quot;"),
                ('\'', _) if q == "'" => out.push_str("&#39;"),
                (_, 0 | 1) if c.is_ascii_whitespace() && q.is_empty() => out.push(c),
                ('\'', 1) => out.push_str("&apos;"),
                (_, 2) => out.push_str(&format!("&#{code};")),
                (_, 3) => out.push_str(&format!("&#x{code:X};")),
                (_, 4) if odd => out.push_str(&format!("&#{code}")),
                (_, 5) if odd => out.push_str(&format!("&#+{code};")),
                (_, 6) if odd => out.push_str(&format!("&#000{code};")),
                ('\'', 7) if odd => out.push_str("&apos"),
                ('e', 7) if odd => out.push_str("&eacute;"),
                (_, _) => out.push(c),
            }
        }
        out.push_str(q);
        out
    }

    /// The `content` of the page's first `<meta>` in its head, as a real
    /// HTML parser (html5ever, as browsers parse) reads it.
    fn parsed_content(page: &str) -> Option<String> {
        let dom = scraper::Html::parse_document(page);
        let found = scraper::Selector::parse("head meta").unwrap();
        dom.select(&found)
            .next()
            .and_then(|m| m.value().attr("content"))
            .map(str::to_owned)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x6d65_7461),
            failure_persistence: None,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// However a page spells its meta policy (quotes, references,
        /// case, attribute order, others beside), a real HTML parser reads
        /// out of the page with the banner injected either the policy it
        /// read before, untouched, or exactly that policy with the
        /// banner's styles (and, given a stop route, its Stop form's post)
        /// let through: never a third. One spelled with
        /// plain references only is rewritten whenever it needs to be;
        /// one with anything but ASCII never is.
        #[test]
        fn a_parser_reads_the_rewritten_meta_policy(
            directives in proptest::collection::vec(proptest::sample::select(vec![
                "default-src 'self'", "default-src 'none'", "style-src 'self' https://cdn.example",
                "style-src 'unsafe-inline'", "style-src-attr 'none'", "img-src * data:",
                "report-uri /csp?a=1&b=\"2\"", "script-src 'nonce-r4nd0m'", "default-src",
                "style-src 'nonce-\u{e9}'", "img-src\t'self'", "form-action 'none'",
                "form-action 'self'", "form-action https://pay.example",
            ]), 1..4),
            compact in proptest::prelude::any::<bool>(),
            quote in 0u8..3,
            pick in proptest::collection::vec(0u8..8, 1..12),
            odd in proptest::prelude::any::<bool>(),
            upper in proptest::prelude::any::<bool>(),
            content_first in proptest::prelude::any::<bool>(),
            extra in proptest::prelude::any::<bool>(),
            with_stop in proptest::prelude::any::<bool>(),
        ) {
            let stop: Vec<String> = if with_stop {
                vec!["app.example/impersonation/stop".to_owned()]
            } else {
                Vec::new()
            };
            let policy = directives.join(if compact { ";" } else { "; " });
            let equiv = if upper { "HTTP-EQUIV=\"CONTENT-SECURITY-POLICY\"" } else { "http-equiv=Content-Security-Policy" };
            let content = format!("content={}", spelled(&policy, quote, &pick, odd));
            let (a, b) = if content_first { (&content[..], equiv) } else { (equiv, &content[..]) };
            let other = if extra { " data-x='a > b' =\"c\"" } else { "" };
            let page = format!("<!doctype html><html><head><meta {a}{other} {b}></head><body><p>x</p></body></html>");
            let injected = String::from_utf8(crate::banner::inject(page.as_bytes(), "<div id=b></div>", &stop, true).unwrap()).unwrap();
            let before = parsed_content(&page).unwrap();
            let after = parsed_content(&injected).unwrap();
            let rewritten = rewrite_policy(&before, &stop);
            if !before.is_ascii() {
                proptest::prop_assert_eq!(&after, &before, "page: {}", injected);
            } else if odd {
                proptest::prop_assert!(
                    after == before || Some(&after) == rewritten.as_ref(),
                    "read before: {}\nafter: {}\npage: {}", before, after, injected
                );
            } else {
                proptest::prop_assert_eq!(&after, rewritten.as_ref().unwrap_or(&before), "page: {}", injected);
            }
        }
    }

    #[test]
    fn other_meta_tags_and_policies_that_need_nothing_are_left_alone() {
        for tag in [
            "<meta charset=utf-8>",
            "<meta name=\"Content-Security-Policy\" content=\"default-src 'self'\">",
            // Browsers ignore a report-only policy in a meta.
            "<meta http-equiv=\"Content-Security-Policy-Report-Only\" content=\"default-src 'self'\">",
            "<meta http-equiv=\"Content-Security-Policy\" content=\"style-src 'unsafe-inline'\">",
            "<meta http-equiv=\"Content-Security-Policy\" content=\"img-src 'self'\">",
            "<meta http-equiv=\"Content-Security-Policy\">",
            // A named reference outside the few a policy needs: not read.
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src &nbsp;'self'\">",
            // References a browser may read otherwise: without their `;`,
            // with a sign, naming a C1 control or nothing.
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'self'; script-src &#39nonce-r4nd0m&#39 https:\">",
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'self'; script-src &amp\">",
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'self'; script-src &#+39;unsafe-inline&#+39;\">",
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'self' &#x80;\">",
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'self' &#0;\">",
            // Anything but ASCII: a directive browsers drop.
            "<meta http-equiv=\"Content-Security-Policy\" content=\"style-src 'unsafe-hashes' 'sha256-abc=' 'nonce-\u{e9}'; default-src 'self'\">",
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'self' &#xe9;\">",
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'self'",
        ] {
            assert_eq!(meta(tag), None, "{tag}");
        }
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
                rewrite_policy(policy, &[]).as_deref(),
                Some(&*expected),
                "{policy}"
            );
            // Once let through, it stays as it is.
            assert_eq!(rewrite_policy(&expected, &[]), None, "{expected}");
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
            assert_eq!(rewrite_policy(policy, &[]), None, "{policy}");
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
        allow_banner(&mut headers, &[]);
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
