//! A response's media type as a browser reads it: Fetch's "extract a MIME
//! type" over every `Content-Type` value, each item parsed by MIME
//! Sniffing's "parse a MIME type". Only the type, subtype and charset are
//! kept, without copying: they decide whether a response is a page and
//! how its bytes read, for every response under impersonation.

use std::borrow::Cow;

use axum::http::{HeaderMap, header};

/// A valid media type: its type and subtype (any case), and its
/// parameters, read for the charset only when asked (most responses are
/// no page, and need no charset). Read without copying.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MediaType<'a> {
    kind: &'a [u8],
    subtype: &'a [u8],
    /// Its parameters, from the `;` after the subtype on.
    params: &'a [u8],
    /// The parameters of the first item of the run of this type it ends
    /// (Fetch's carried `charset`), if another.
    first: Option<&'a [u8]>,
}

impl<'a> MediaType<'a> {
    /// Whether its essence is `essence` (lower case), in any case.
    pub(crate) fn is(&self, essence: &str) -> bool {
        let essence = essence.as_bytes();
        // Told apart by length first: this runs for every response.
        essence.len() == self.kind.len() + 1 + self.subtype.len()
            && essence[..self.kind.len()].eq_ignore_ascii_case(self.kind)
            && essence[self.kind.len()] == b'/'
            && essence[self.kind.len() + 1..].eq_ignore_ascii_case(self.subtype)
    }

    fn same_essence(&self, other: &MediaType<'_>) -> bool {
        self.kind.eq_ignore_ascii_case(other.kind)
            && self.subtype.eq_ignore_ascii_case(other.subtype)
    }

    /// The charset it names (as written, without quotes), or else the one
    /// the first item of its run named.
    pub(crate) fn charset(&self) -> Option<Cow<'a, [u8]>> {
        charset_in(self.params).or_else(|| self.first.and_then(charset_in))
    }

    /// The encoding its charset names, if a browser knows the label: one
    /// it does not know (`utf8mb4`, an empty one) it ignores, as if none
    /// were given (HTML's "determining the character encoding"), and
    /// reads the page's `<meta>` instead.
    pub(crate) fn encoding(&self) -> Option<&'static encoding_rs::Encoding> {
        self.charset()
            .as_deref()
            .and_then(encoding_rs::Encoding::for_label)
    }
}

/// The media type of a response with `headers`, as a browser reads it:
/// of every `Content-Type` value and comma-separated item (a comma in a
/// quoted parameter separates nothing), the last valid one that is not
/// `*/*`; an item of the same type as the one before it that names no
/// charset keeps that one's. `None` when no item is valid: the browser
/// then sniffs the body's type.
pub(crate) fn of(headers: &HeaderMap) -> Option<MediaType<'_>> {
    // Nearly always one value of one item: read as it is.
    let mut values = headers.get_all(header::CONTENT_TYPE).iter();
    if let (Some(only), None) = (values.next(), values.next())
        && !only.as_bytes().contains(&b',')
    {
        return parse(only.as_bytes()).filter(|t| !t.is("*/*"));
    }
    // The first item of the run of one type the last item is in (Fetch's
    // `essence` and `charset`).
    let mut run: Option<MediaType<'_>> = None;
    let mut found: Option<MediaType<'_>> = None;
    for value in headers.get_all(header::CONTENT_TYPE) {
        for item in Items::of(value.as_bytes()) {
            let Some(mut parsed) = parse(item) else {
                continue;
            };
            if parsed.is("*/*") {
                continue;
            }
            match run {
                Some(first) if first.same_essence(&parsed) => parsed.first = Some(first.params),
                _ => run = Some(parsed),
            }
            found = Some(parsed);
        }
    }
    found
}

/// HTTP's white space, as MIME Sniffing trims it.
fn is_http_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn trim(mut bytes: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = bytes
        && is_http_space(*first)
    {
        bytes = rest;
    }
    while let [rest @ .., last] = bytes
        && is_http_space(*last)
    {
        bytes = rest;
    }
    bytes
}

fn is_token(bytes: &[u8]) -> bool {
    !bytes.is_empty()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b))
}

/// A header value's items, split at commas outside quoted strings (Fetch's
/// "get, decode, and split"), each trimmed.
struct Items<'a> {
    rest: Option<&'a [u8]>,
}

impl<'a> Items<'a> {
    fn of(value: &'a [u8]) -> Self {
        Self { rest: Some(value) }
    }
}

impl<'a> Iterator for Items<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let value = self.rest?;
        let mut quoted = false;
        let mut at = 0;
        while let Some(&b) = value.get(at) {
            match b {
                b'"' => quoted = !quoted,
                // An escaped character in a quoted string is passed over.
                b'\\' if quoted => at += 1,
                b',' if !quoted => {
                    self.rest = value.get(at + 1..);
                    return Some(trim(&value[..at]));
                }
                _ => {}
            }
            at += 1;
        }
        self.rest = None;
        Some(trim(value))
    }
}

/// One item parsed as MIME Sniffing parses a MIME type: `None` if its type
/// or subtype is missing or not a token. Its parameters are kept as they
/// are, for `charset_in`.
fn parse(item: &[u8]) -> Option<MediaType<'_>> {
    let item = trim(item);
    let slash = item.iter().position(|&b| b == b'/')?;
    let kind = &item[..slash];
    let rest = &item[slash + 1..];
    let semicolon = rest.iter().position(|&b| b == b';').unwrap_or(rest.len());
    let subtype = trim(&rest[..semicolon]);
    if !is_token(kind) || !is_token(subtype) {
        return None;
    }
    Some(MediaType {
        kind,
        subtype,
        params: &rest[semicolon..],
        first: None,
    })
}

/// The first `charset` with a value among `params` (from a `;` on), as
/// MIME Sniffing reads parameters: a quoted value unescaped, a malformed
/// parameter passed over, as browsers pass it over.
fn charset_in(rest: &[u8]) -> Option<Cow<'_, [u8]>> {
    let mut at = 0;
    // At a `;` (or the end): one parameter after another.
    while at < rest.len() {
        at += 1;
        while rest.get(at).copied().is_some_and(is_http_space) {
            at += 1;
        }
        // Where the first byte `stop` takes is, from `from` on.
        let until = |from: usize, stop: fn(u8) -> bool| {
            rest[from.min(rest.len())..]
                .iter()
                .position(|&b| stop(b))
                .map_or(rest.len(), |n| from + n)
        };
        let name_end = until(at, |b| b == b';' || b == b'=');
        let name = &rest[at.min(name_end)..name_end];
        at = name_end;
        if rest.get(at) != Some(&b'=') {
            continue;
        }
        at += 1;
        let value: Cow<'_, [u8]> = if rest.get(at) == Some(&b'"') {
            let start = at + 1;
            let mut unescaped: Option<Vec<u8>> = None;
            at = start;
            while let Some(&b) = rest.get(at) {
                match b {
                    b'"' => break,
                    b'\\' => {
                        let copy = unescaped.get_or_insert_with(|| rest[start..at].to_vec());
                        at += 1;
                        copy.push(rest.get(at).copied().unwrap_or(b'\\'));
                    }
                    _ => {
                        if let Some(copy) = &mut unescaped {
                            copy.push(b);
                        }
                    }
                }
                at += 1;
            }
            let value = match unescaped {
                Some(copy) => Cow::Owned(copy),
                None => Cow::Borrowed(&rest[start.min(rest.len())..at.min(rest.len())]),
            };
            // Whatever follows the closing quote, up to the next `;`.
            at = until(at, |b| b == b';');
            value
        } else {
            let end = until(at, |b| b == b';');
            let value = trim(&rest[at.min(end)..end]);
            at = end;
            if value.is_empty() {
                continue;
            }
            Cow::Borrowed(value)
        };
        if name.eq_ignore_ascii_case(b"charset") {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::of;
    use axum::http::{HeaderMap, HeaderValue, header};

    /// The essence (lower case) and charset read from these values.
    fn read(values: &[&'static str]) -> Option<(String, Option<String>)> {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(header::CONTENT_TYPE, HeaderValue::from_static(value));
        }
        of(&headers).map(|t| {
            let essence = format!(
                "{}/{}",
                String::from_utf8_lossy(t.kind),
                String::from_utf8_lossy(t.subtype)
            );
            assert!(t.is(&essence.to_ascii_lowercase()));
            (
                essence.to_ascii_lowercase(),
                t.charset()
                    .map(|c| String::from_utf8_lossy(&c).into_owned()),
            )
        })
    }

    fn media(essence: &str, charset: Option<&str>) -> Option<(String, Option<String>)> {
        Some((essence.to_owned(), charset.map(str::to_owned)))
    }

    /// The examples of Fetch's "extract a MIME type", and the cases a
    /// first reading of it got wrong: the last valid item wins, `*/*` is
    /// passed over, a charset carries over within one type, a comma in a
    /// quoted value splits nothing.
    #[test]
    fn the_type_is_read_as_a_browser_reads_it() {
        assert_eq!(read(&["text/html"]), media("text/html", None));
        assert_eq!(
            read(&["Text/HTML; Charset=\"UTF-8\""]),
            media("text/html", Some("UTF-8"))
        );
        assert_eq!(read(&["text/plain, text/html"]), media("text/html", None));
        assert_eq!(read(&["text/plain", "text/html"]), media("text/html", None));
        assert_eq!(read(&["text/html", "*/*"]), media("text/html", None));
        assert_eq!(read(&["text/html,"]), media("text/html", None));
        assert_eq!(
            read(&["text/html; charset=utf-16", "text/html"]),
            media("text/html", Some("utf-16"))
        );
        assert_eq!(
            read(&["text/html; charset=gbk", "text/plain", "text/html"]),
            media("text/html", None)
        );
        assert_eq!(
            read(&["text/html; a=\"x,y\"; charset=utf-16"]),
            media("text/html", Some("utf-16"))
        );
        assert_eq!(
            read(&["text/html; x=\"a,text/plain;b\""]),
            media("text/html", None)
        );
        assert_eq!(
            read(&["text/html; charset=\"sh\\\"ift_jis\"; charset=utf-8"]),
            media("text/html", Some("sh\"ift_jis"))
        );
        assert_eq!(
            read(&["text/html; charset; charset=; charset=latin1"]),
            media("text/html", Some("latin1"))
        );
        for nothing_valid in [
            &["html"][..],
            &["*/*"],
            &[""],
            &["text/"],
            &["/html"],
            &["te xt/html"],
        ] {
            assert_eq!(read(nothing_valid), None, "{nothing_valid:?}");
        }
        assert_eq!(read(&[]), None);
    }
}
