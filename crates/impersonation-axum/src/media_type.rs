//! A response's media type as a browser reads it: Fetch's "extract a MIME
//! type" over its `Content-Type` values, each item parsed by MIME
//! Sniffing's "parse a MIME type". Only what the layer asks is kept:
//! whether the response is a page (and which kind), whether it leaves its
//! type to the browser, and the encoding a page's charset names. It runs
//! for every response under impersonation, so one value of one item (the
//! usual case) is read without a copy, and a charset only for a page.

use std::borrow::Cow;

use axum::http::{HeaderMap, header};

/// What a response's media type is to the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `text/html`.
    Html,
    /// `application/xhtml+xml`.
    Xhtml,
    /// `unknown/unknown` or `application/unknown`: the browser sniffs the
    /// body's type, as for no type at all.
    Sniffed,
    /// Anything else.
    Other,
}

/// A response's media type, as read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MediaType {
    pub(crate) kind: Kind,
    /// For a page, the encoding its charset names, if a browser knows the
    /// label: one it does not know (`utf8mb4`, an empty one) it ignores,
    /// as if none were given (HTML's "determining the character
    /// encoding"), and reads the page's `<meta>` instead.
    pub(crate) encoding: Option<&'static encoding_rs::Encoding>,
}

/// One valid item: its type and subtype (any case), and its parameters,
/// read for the charset only when asked.
#[derive(Debug, Clone, Copy)]
struct Item<'a> {
    kind: &'a [u8],
    subtype: &'a [u8],
    /// Its parameters, from the `;` after the subtype on.
    params: &'a [u8],
    /// The parameters of the first item of the run of this type it ends
    /// (Fetch's carried `charset`), if another.
    first: Option<&'a [u8]>,
}

impl<'a> Item<'a> {
    /// Whether its essence is `essence` (lower case), in any case.
    fn is(&self, essence: &str) -> bool {
        let essence = essence.as_bytes();
        // Told apart by length first.
        essence.len() == self.kind.len() + 1 + self.subtype.len()
            && essence[..self.kind.len()].eq_ignore_ascii_case(self.kind)
            && essence[self.kind.len()] == b'/'
            && essence[self.kind.len() + 1..].eq_ignore_ascii_case(self.subtype)
    }

    fn same_essence(&self, other: &Item<'_>) -> bool {
        self.kind.eq_ignore_ascii_case(other.kind)
            && self.subtype.eq_ignore_ascii_case(other.subtype)
    }

    /// The charset it names (as written, without quotes), or else the one
    /// the first item of its run named.
    fn charset(&self) -> Option<Cow<'a, [u8]>> {
        charset_in(self.params).or_else(|| self.first.and_then(charset_in))
    }

    fn read(&self) -> MediaType {
        let kind = if self.is("text/html") {
            Kind::Html
        } else if self.is("application/xhtml+xml") {
            Kind::Xhtml
        } else if self.is("unknown/unknown") || self.is("application/unknown") {
            Kind::Sniffed
        } else {
            Kind::Other
        };
        let encoding = matches!(kind, Kind::Html | Kind::Xhtml)
            .then(|| self.charset())
            .flatten()
            .and_then(|label| encoding_rs::Encoding::for_label(&label));
        MediaType { kind, encoding }
    }
}

/// The media type of a response with `headers`, as a browser reads it:
/// its `Content-Type` values joined by `, ` and split at commas outside
/// quoted strings, the last valid item that is not `*/*`; an item of the
/// same type as the one before it that names no charset keeps that
/// one's. `None` when no item is valid: the browser then sniffs the
/// body's type.
pub(crate) fn of(headers: &HeaderMap) -> Option<MediaType> {
    let mut values = headers.get_all(header::CONTENT_TYPE).iter();
    match (values.next(), values.next()) {
        (None, _) => None,
        (Some(only), None) => last_item(only.as_bytes()),
        (Some(_), Some(_)) => {
            // Joined as Fetch's "get" joins them: a quote left open in
            // one value runs on into the next.
            let mut joined = Vec::new();
            for (i, value) in headers.get_all(header::CONTENT_TYPE).iter().enumerate() {
                if i > 0 {
                    joined.extend_from_slice(b", ");
                }
                joined.extend_from_slice(value.as_bytes());
            }
            last_item(&joined)
        }
    }
}

/// Fetch's choice among the items of `value` (all the values joined).
fn last_item(value: &[u8]) -> Option<MediaType> {
    // Nearly always one item: read as it is.
    if !value.contains(&b',') {
        return parse(value).filter(|t| !t.is("*/*")).map(|t| t.read());
    }
    // The first item of the run of one type the last item is in (Fetch's
    // `essence` and `charset`).
    let mut run: Option<Item<'_>> = None;
    let mut found: Option<Item<'_>> = None;
    for item in Items::of(value) {
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
    found.map(|t| t.read())
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
    trim_end(bytes)
}

fn trim_end(mut bytes: &[u8]) -> &[u8] {
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
fn parse(item: &[u8]) -> Option<Item<'_>> {
    let item = trim(item);
    let slash = item.iter().position(|&b| b == b'/')?;
    let kind = &item[..slash];
    let rest = &item[slash + 1..];
    let semicolon = rest.iter().position(|&b| b == b';').unwrap_or(rest.len());
    // Only trailing white space is taken off the subtype: `text/ html`
    // is no type.
    let subtype = trim_end(&rest[..semicolon]);
    if !is_token(kind) || !is_token(subtype) {
        return None;
    }
    Some(Item {
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
        // A value of any other byte than HTTP's quoted-string allows (a
        // control) makes the parameter none: a later one may count.
        let allowed = |b: &u8| *b == b'\t' || (0x20..=0xff).contains(b) && *b != 0x7f;
        if name.eq_ignore_ascii_case(b"charset") && value.iter().all(allowed) {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::{Kind, of};
    use axum::http::{HeaderMap, HeaderValue, header};

    /// The kind and the encoding's name read from these values.
    fn read(values: &[&'static str]) -> Option<(Kind, Option<&'static str>)> {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(header::CONTENT_TYPE, HeaderValue::from_static(value));
        }
        of(&headers).map(|t| (t.kind, t.encoding.map(|e| e.name())))
    }

    /// The examples of Fetch's "extract a MIME type", and the cases first
    /// readings of it got wrong: the last valid item wins, `*/*` is
    /// passed over, a charset carries over within one type, a comma in a
    /// quoted value splits nothing (nor does one in a quote a value left
    /// open for the next), a subtype may not begin with white space, and
    /// a charset is read for a page only.
    #[test]
    fn the_type_is_read_as_a_browser_reads_it() {
        use Kind::{Html, Other, Sniffed};
        type Read = Option<(Kind, Option<&'static str>)>;
        let cases: &[(&[&'static str], Read)] = &[
            (&["text/html"], Some((Html, None))),
            (
                &["Text/HTML; Charset=\"UTF-8\""],
                Some((Html, Some("UTF-8"))),
            ),
            (&["text/plain, text/html"], Some((Html, None))),
            (&["text/plain", "text/html"], Some((Html, None))),
            (&["text/html", "*/*"], Some((Html, None))),
            (&["text/html,"], Some((Html, None))),
            (
                &["text/html; charset=utf-16", "text/html"],
                Some((Html, Some("UTF-16LE"))),
            ),
            (
                &["text/html; charset=gbk", "text/plain", "text/html"],
                Some((Html, None)),
            ),
            (
                &["text/html; a=\"x,y\"; charset=utf-16"],
                Some((Html, Some("UTF-16LE"))),
            ),
            (&["text/html; x=\"a,text/plain;b\""], Some((Html, None))),
            (
                &["text/html; x=\"a", "b\"; charset=utf-16"],
                Some((Html, Some("UTF-16LE"))),
            ),
            (&["text/html; x=\"a", "text/plain"], Some((Html, None))),
            (
                &["text/html; charset=utf-16, text/ html; charset=utf-8"],
                Some((Html, Some("UTF-16LE"))),
            ),
            (&["text/html, text/ plain"], Some((Html, None))),
            (
                &["text/html; charset=\"Shift_JIS\"; charset=utf-8"],
                Some((Html, Some("Shift_JIS"))),
            ),
            (
                &["text/html; charset=\"utf\\-16\""],
                Some((Html, Some("UTF-16LE"))),
            ),
            (
                &["text/html; charset; charset=; charset=latin1"],
                Some((Html, Some("windows-1252"))),
            ),
            (&["text/html; charset=utf8mb4"], Some((Html, None))),
            (&["unknown/unknown"], Some((Sniffed, None))),
            (
                &["Application/Unknown; charset=utf-16"],
                Some((Sniffed, None)),
            ),
            (&["text/plain; charset=utf-16"], Some((Other, None))),
            (&["text/ html"], None),
            (&["html"], None),
            (&["*/*"], None),
            (&[""], None),
            (&["text/"], None),
            (&["/html"], None),
            (&["te xt/html"], None),
            (&[], None),
        ];
        for (values, expected) in cases {
            assert_eq!(read(values), *expected, "{values:?}");
        }
    }
}
