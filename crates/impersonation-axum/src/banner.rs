//! The banner: "You are impersonating `<name>` (`<company>`)", escaped, with the
//! reason, the ticket, "read only" for a read-only session, the time left
//! and a Stop button.

use axum::response::{IntoResponseParts, ResponseParts};
use impersonation_core::Context;
use time::OffsetDateTime;

/// `text` escaped for HTML, and without Unicode's bidirectional controls
/// (embeddings, overrides, isolates, marks): a name holding U+202E would
/// reverse what follows it in the banner and could make it read as
/// something else.
///
/// Characters XML 1.0 does not allow (C0 controls but tab, line feed and
/// carriage return; U+FFFE and U+FFFF) become U+FFFD: one of them in a
/// customer's name would make an XHTML page fail to render at all.
fn esc(text: &str) -> String {
    let is_bidi_control = |c: char| matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}');
    if text.contains(is_bidi_control) || text.contains(not_xml) {
        let plain: String = text
            .chars()
            .filter(|&c| !is_bidi_control(c))
            .map(xml_char)
            .collect();
        return html_escape::encode_text(&plain).into_owned();
    }
    html_escape::encode_text(text).into_owned()
}

/// Whether XML 1.0 allows `c` nowhere (Rust strings hold no surrogates).
fn not_xml(c: char) -> bool {
    (c.is_ascii_control() && !matches!(c, '\t' | '\n' | '\r' | '\u{7F}'))
        || matches!(c, '\u{FFFE}' | '\u{FFFF}')
}

fn xml_char(c: char) -> char {
    if not_xml(c) { '\u{FFFD}' } else { c }
}

/// `text` escaped for a double-quoted attribute, characters XML does not
/// allow replaced as in [`esc`].
fn attr(text: &str) -> String {
    if text.contains(not_xml) {
        let plain: String = text.chars().map(xml_char).collect();
        return html_escape::encode_double_quoted_attribute(&plain).into_owned();
    }
    html_escape::encode_double_quoted_attribute(text).into_owned()
}

/// The banner's `style` attributes, in the order they appear: the banner,
/// its message, its details, the Stop form and button. (Plain ASCII with no `"` or `&`:
/// each attribute's value is the text itself, which is what a page's
/// Content-Security-Policy hashes, see [`crate::banner_style_sources`].)
pub(crate) const STYLES: [&str; 5] = [
    // `!important` in the element's own style outranks a page's
    // stylesheet (a customer's theme) that would hide it, move it off
    // the screen, shrink, clip or paint it out: no stylesheet rule can
    // then set these. (A page's script can still remove it; nothing a
    // banner does stops that.)
    concat!(
        "position:fixed!important;top:0!important;left:0!important;right:0!important;bottom:auto!important;",
        "z-index:2147483647!important;display:flex!important;visibility:visible!important;opacity:1!important;",
        "transform:none!important;translate:none!important;scale:none!important;rotate:none!important;",
        "zoom:1!important;clip:auto!important;clip-path:none!important;filter:none!important;",
        "mask:none!important;content-visibility:visible!important;overflow:visible!important;",
        "width:auto!important;height:auto!important;min-height:0!important;max-height:none!important;",
        "max-width:none!important;margin:0!important;gap:1em;align-items:center;",
        "padding:.6em 1em!important;background:#b91c1c!important;color:#fff!important;",
        "-webkit-text-fill-color:#fff!important;font:600 15px/1.4 system-ui,sans-serif!important"
    ),
    "display:inline!important;visibility:visible!important;opacity:1!important",
    "display:inline!important;visibility:visible!important;opacity:1!important;font-weight:400",
    "display:block!important;visibility:visible!important;opacity:1!important;margin:0 0 0 auto",
    // The button's own colours: the banner's white text (and its
    // `-webkit-text-fill-color`, which inherits) would be white on the
    // button's light face.
    concat!(
        "display:inline-block!important;visibility:visible!important;opacity:1!important;",
        "color:#7f1d1d!important;-webkit-text-fill-color:#7f1d1d!important;",
        "background:#fff!important;border:1px solid #fff!important;border-radius:4px;",
        "font:inherit;padding:.2em .8em;white-space:nowrap;cursor:pointer"
    ),
];

/// Marks a response whose page already holds the banner (the app rendered
/// [`banner_html`] itself): the layer leaves its body as it is, with no
/// second banner, and streams it rather than reading it whole, so such a
/// page may be larger than [`MAX_BANNER_BODY`](crate::MAX_BANNER_BODY).
/// Everything else under impersonation stays: the request is audited,
/// the response is `no-store` and framed by this site only, and a streamed
/// body ends with its session.
///
/// The page's own Content-Security-Policy is then the app's to fit to the
/// banner ([`banner_style_sources`](crate::banner_style_sources), and the
/// stop route in any `form-action`): the layer does not read the page.
/// The marker is the app's word that the banner is there; the layer does
/// not look for it.
///
/// ```
/// use axum::response::{Html, IntoResponse, Response};
/// use impersonation_axum::{BannerRendered, CsrfToken, MaybeImpersonating, banner_html};
///
/// async fn report(MaybeImpersonating(ctx): MaybeImpersonating, csrf: CsrfToken) -> Response {
///     let banner = ctx
///         .map(|c| banner_html(&c, time::OffsetDateTime::now_utc(), "/impersonation/stop", csrf.as_str()))
///         .unwrap_or_default();
///     (BannerRendered, Html(format!("<html><body>{banner}<h1>Report</h1></body></html>"))).into_response()
/// }
/// # let _ = axum::Router::<()>::new().route("/report", axum::routing::get(report));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BannerRendered;

impl IntoResponseParts for BannerRendered {
    type Error = std::convert::Infallible;

    fn into_response_parts(self, mut res: ResponseParts) -> Result<ResponseParts, Self::Error> {
        res.extensions_mut().insert(self);
        Ok(res)
    }
}

/// The banner as an HTML fragment, for apps that render it themselves
/// (marking their response [`BannerRendered`], so that the layer does not
/// add a second one).
/// It is `position:fixed` at the top of the viewport; give the page some top
/// padding (about 3.5em, more on narrow screens) while impersonating.
/// `stop_action` is the stop route's path; `csrf` the request's CSRF token.
/// Its styles are inline `style` attributes: under a Content-Security-Policy
/// that blocks those, add [`crate::banner_style_sources`] to the page's
/// policy (the layer does so itself for the banner it injects).
/// The fragment is pure ASCII (other characters as numeric references), so
/// it fits a page in any ASCII-compatible charset.
pub fn banner_html(ctx: &Context, now: OffsetDateTime, stop_action: &str, csrf: &str) -> String {
    let banner = ctx.banner(now);
    let ticket = banner
        .ticket
        .as_deref()
        .map(|t| {
            format!(
                " · ticket <span class=\"impersonation-ticket\">{}</span>",
                esc(t)
            )
        })
        .unwrap_or_default();
    // Says why every change is refused.
    let read_only = if ctx.read_only() {
        " · <span class=\"impersonation-read-only\">read only</span>"
    } else {
        ""
    };
    let [
        banner_style,
        message_style,
        details_style,
        form_style,
        button_style,
    ] = STYLES;
    ascii_only(format!(
        concat!(
            "<div id=\"impersonation-banner\" role=\"alert\" aria-live=\"assertive\" ",
            "style=\"{banner_style}\">",
            "<span class=\"impersonation-message\" style=\"{message_style}\">{message}</span>",
            "<span style=\"{details_style}\">reason: <span class=\"impersonation-reason\">{reason}</span>{ticket}{read_only}",
            " · <span class=\"impersonation-time-left\" data-seconds-left=\"{seconds}\">{left}</span> left</span>",
            "<form method=\"post\" action=\"{action}\" style=\"{form_style}\">",
            // The token is the button's own value, sent only when the
            // button is pressed, and the button names its own target,
            // method, encoding and window: where the HTML parser drops
            // the `<form>` above (inside a form the page left open, which
            // the injected page closes first, but an app that renders
            // this fragment in one may not), the button joins the app's
            // form, whose own submissions must not carry the token, and
            // whose target, method and required fields must not hold up
            // the stop.
            "<button type=\"submit\" name=\"csrf\" value=\"{csrf}\" formaction=\"{action}\" ",
            "formmethod=\"post\" formenctype=\"application/x-www-form-urlencoded\" ",
            "formtarget=\"_self\" formnovalidate=\"formnovalidate\" ",
            "style=\"{button_style}\">Stop impersonating</button>",
            "</form></div>"
        ),
        banner_style = banner_style,
        message_style = message_style,
        details_style = details_style,
        form_style = form_style,
        button_style = button_style,
        message = esc(&banner.message()),
        reason = esc(&banner.reason),
        ticket = ticket,
        read_only = read_only,
        seconds = banner.seconds_left,
        left = esc(&banner.time_left()),
        action = attr(stop_action),
        csrf = attr(csrf),
    ))
}

/// Inserts the banner before the last `</body>` (any case) that is markup,
/// or appends it. The page's bytes are not decoded: the banner is pure
/// ASCII, so it reads the same in any charset that keeps ASCII as ASCII,
/// and a page with a stray invalid byte gets its banner too.
///
/// A policy the page delivers in a `<meta http-equiv=
/// "Content-Security-Policy">` (an app shell's, say) gets the banner's
/// styles, and its Stop form's post to `stop`, let through it, as one in
/// a header does (`crate::csp`).
///
/// A page whose `Content-Type` names no charset (`charset_known` false)
/// is read in the charset its first `<meta>` declaring one names (as a
/// browser reads it): one not known to keep ASCII as ASCII (ISO-2022, say,
/// where a customer's kanji can spell `<script`) gets no banner, and the
/// answer says why.
pub(crate) fn inject(
    html: &[u8],
    banner: &str,
    stop: &[String],
    charset_known: bool,
) -> Result<Vec<u8>, &'static str> {
    let mut metas = Vec::new();
    let (at, left_open) = scan(html, &mut metas);
    if !charset_known
        && (metas
            .iter()
            .find_map(|tag| declared_charset(&html[tag.clone()]))
            .is_some_and(|charset| !meta_keeps_ascii(&charset))
            || prescanned_charset(html).is_some_and(|charset| !meta_keeps_ascii(&charset)))
    {
        return Err("the page's <meta> charset is not one known to keep ASCII as ASCII");
    }
    let mut edits: Vec<(std::ops::Range<usize>, Vec<u8>)> = metas
        .into_iter()
        .filter_map(|tag| crate::csp::rewrite_meta(&html[tag.clone()], stop).map(|new| (tag, new)))
        .collect();
    // A form the page left open where the banner goes is closed first
    // (it ends there anyway, at `</body>`), so that the banner's Stop is a
    // form of its own, which the app's submit handlers and `target` do
    // not meet; so are the elements left open that would hide the banner,
    // swallow it or take its clicks (`LeftOpen`).
    let mut placed = left_open.closing(nothing_follows(&html[at..]));
    placed.extend_from_slice(banner.as_bytes());
    edits.push((at..at, placed));
    // A meta tag ends before the banner's place, or begins after it.
    edits.sort_by_key(|(range, _)| (range.start, range.end));
    let mut out = Vec::with_capacity(html.len() + banner.len() + "</form>".len());
    let mut from = 0;
    for (range, new) in edits {
        out.extend_from_slice(&html[from..range.start]);
        out.extend_from_slice(&new);
        from = range.end;
    }
    out.extend_from_slice(&html[from..]);
    Ok(out)
}

/// How far into a page a browser's prescan looks for a `<meta>` charset
/// (the HTML Standard's "prescan a byte stream": its first 1024 bytes).
const PRESCAN_BYTES: usize = 1024;

/// The charset the first `<meta>` that declares one names in the page's
/// first [`PRESCAN_BYTES`], read as a browser's prescan reads them (the
/// HTML Standard's "prescan a byte stream"): comments and other tags (with
/// their attributes) passed over, and the text between tags read byte for
/// byte, blind to `<script>`, `<style>` and the other elements whose text
/// the scanner skips (a `<meta charset=iso-2022-jp>` in a script's string
/// is the page's charset to the prescan).
fn prescanned_charset(html: &[u8]) -> Option<String> {
    let head = &html[..html.len().min(PRESCAN_BYTES)];
    let mut at = 0;
    while let Some(lt) = head[at..].iter().position(|&b| b == b'<') {
        let here = at + lt;
        let rest = &head[here..];
        if rest.starts_with(b"<!--") {
            // To the first `>` after `<!` that ends a `-->` (`<!-->` too).
            let end = rest[2..].windows(3).position(|w| w == b"-->")?;
            at = here + 2 + end + 3;
            continue;
        }
        let letter = |i: usize| rest.get(i).is_some_and(u8::is_ascii_alphabetic);
        let space_or_slash = |i: usize| {
            rest.get(i)
                .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' | b'/'))
        };
        if rest.len() > 5 && rest[..5].eq_ignore_ascii_case(b"<meta") && space_or_slash(5) {
            // Its `>`, not one in a quoted value (`x=">"`).
            let end = tag_end(rest)?;
            if let Some(charset) = declared_charset(&rest[..=end]) {
                return Some(charset);
            }
            at = here + end + 1;
        } else if letter(1) || (rest.get(1) == Some(&b'/') && letter(2)) {
            // Another tag, passed over with its attributes: a `<meta` in
            // a quoted value is text.
            at = here + tag_end(rest)? + 1;
        } else if matches!(rest.get(1), Some(b'!' | b'/' | b'?')) {
            at = here + rest.iter().position(|&b| b == b'>')? + 1;
        } else {
            at = here + 1;
        }
    }
    None
}

/// Whether a page read in the charset its `<meta>` names keeps ASCII as
/// ASCII: as [`crate::layer::keeps_ascii`], except that a UTF-16 label
/// there is read as UTF-8 (HTML's prescan: bytes that spell out a meta
/// tag are not UTF-16), and a label browsers do not know is ignored, as
/// they ignore it (the page is read in their default, which keeps ASCII).
fn meta_keeps_ascii(label: &str) -> bool {
    match encoding_rs::Encoding::for_label(label.as_bytes()) {
        Some(e) if e == encoding_rs::UTF_16BE || e == encoding_rs::UTF_16LE => true,
        Some(e) => e.is_ascii_compatible(),
        None => true,
    }
}

/// The charset a `<meta>` start tag (`<` to `>`) declares, lowercased: its
/// `charset`, or the `charset=` in the `content` of an
/// `http-equiv="Content-Type"`.
fn declared_charset(tag: &[u8]) -> Option<String> {
    let attributes = crate::csp::attributes(tag)?;
    let value = |name: &str| {
        attributes
            .iter()
            .find(|a| a.name.eq_ignore_ascii_case(name.as_bytes()))
            .and_then(|a| std::str::from_utf8(a.value).ok())
    };
    if let Some(charset) = value("charset") {
        return Some(charset.trim().to_ascii_lowercase());
    }
    if !value("http-equiv")?
        .trim()
        .eq_ignore_ascii_case("content-type")
    {
        return None;
    }
    let content = value("content")?.to_ascii_lowercase();
    let after = &content[content.find("charset")? + "charset".len()..];
    let label: String = after
        .trim_start()
        .strip_prefix('=')?
        .trim_start()
        .trim_start_matches(['"', '\''])
        .chars()
        .take_while(|&c| !matches!(c, ';' | '"' | '\'') && !c.is_whitespace())
        .collect();
    (!label.is_empty()).then_some(label)
}

/// Where the banner goes: before the last `</body>` that is markup, not
/// text inside a script, a style, a title, a textarea or a comment (a
/// customer's note quoting `</body>` in a page's JSON, in a page that
/// leaves out its own `</body>`); at the end if there is none. The banner
/// inside a script would break the script and show nothing.
///
/// One pass from the start, as a browser reads the page: an element whose
/// content is text (HTML's raw text and escapable raw text elements, and
/// `<noscript>`, `<noembed>` and `<noframes>`, which a browser that runs
/// scripts reads as text too) is passed over to its end tag, a comment to
/// its `-->`, so nothing quoted inside them (a `</body>`, or an opening
/// tag after one) counts. Text left open (`<plaintext>` always is) runs
/// to the end of the page: then the banner goes before it, unless a
/// `</body>` came earlier. Inside an svg or a math, whose elements hold
/// markup (a `<style>` there is no text element, and `<title/>` closes
/// itself), the open elements are followed as HTML's parser follows them,
/// out to the HTML elements that end them and in to the ones (an svg's
/// `<foreignObject>`, `<desc>` and `<title>`, MathML's `<mi>`, `<mo>`,
/// `<mn>`, `<ms>` and `<mtext>`) whose content is HTML again. A
/// `</body>` inside a `<template>` is the template's inert content, and a
/// template left open holds the rest of the page: the banner then goes
/// before that template, unless a `</body>` came earlier.
///
/// Every `<meta>` start tag passed on the way (markup, not text) goes into
/// `metas`, from its `<` to its `>`.
fn scan(html: &[u8], metas: &mut Vec<std::ops::Range<usize>>) -> (usize, LeftOpen) {
    /// Openers of text, and what ends each.
    const RAW: [(&[u8], &[u8]); 10] = [
        (b"<script", b"</script"),
        (b"<style", b"</style"),
        (b"<textarea", b"</textarea"),
        (b"<title", b"</title"),
        (b"<xmp", b"</xmp"),
        (b"<iframe", b"</iframe"),
        (b"<noscript", b"</noscript"),
        (b"<noembed", b"</noembed"),
        (b"<noframes", b"</noframes"),
        (b"<!--", b"-->"),
    ];
    // The banner's place, and what is open there.
    let mut last: Option<(usize, LeftOpen)> = None;
    let mut left_open = LeftOpen::default();
    let mut at = 0;
    // The elements open inside an svg or a math, innermost last (empty
    // outside them).
    let mut foreign = Foreign::default();
    // How many `<template>`s are open: a `</body>` in one is the
    // template's inert content (an email preview's whole document), which
    // the parser keeps out of the page and never shows.
    let mut templates = 0_usize;
    // Where the outermost inert template left open begins (and whether a
    // form was open there): whatever follows it is inert to its end, and
    // a banner placed there would never show, so it goes before the
    // template instead (a customer's stray `<template>` in an email
    // preview leaves the page's own open). A declarative shadow root's
    // template (`shadowrootmode`) is no such thing: its content is shown,
    // in its host's shadow tree, and the banner stays in it (before it,
    // the banner would be the host's light child, which a shadow tree
    // with no slot does not show). `inert_depth`: how many templates
    // were open around it.
    let mut open_template: Option<(usize, LeftOpen)> = None;
    let mut inert_depth = 0_usize;
    while let Some(lt) = html[at..].iter().position(|&b| b == b'<') {
        let here = at + lt;
        let rest = &html[here..];
        if tag_at(rest, b"</body") {
            if templates == 0 {
                last = Some((here, left_open.clone()));
            }
            // Passed over to its `>`, as any end tag: attributes (quoted
            // ones too) may follow its name. Left open, it takes in the
            // rest of the page.
            match tag_end(rest) {
                Some(end) => at = here + end + 1,
                None => return open_template.unwrap_or((here, left_open)),
            }
            continue;
        }
        let as_html = foreign.reads_html();
        if foreign.in_its_namespace() && rest.starts_with(b"<![CDATA[") {
            match rest.windows(3).position(|w| w == b"]]>") {
                Some(end) => at = here + end + b"]]>".len(),
                None => {
                    return last.or(open_template).unwrap_or((here, left_open));
                }
            }
            continue;
        }
        if let Some((open, close)) = RAW
            .iter()
            .find(|(open, _)| (as_html || *open == b"<!--") && tag_at(rest, open))
        {
            // The text begins after the opening tag (its attributes
            // included) or, for a comment, after `<!--`.
            let inside = if *open == b"<!--" {
                let inside = here + open.len();
                // `<!-->` and `<!--->`: a comment that ends where it begins.
                let after = &html[inside..];
                if let Some(end) = [&b">"[..], b"->"].iter().find(|e| after.starts_with(e)) {
                    at = inside + end.len();
                    continue;
                }
                inside
            } else {
                // In HTML proper, `<title/>` opens a title all the same,
                // and `<script/>` a script.
                match tag_end(rest) {
                    Some(end) => here + end + 1,
                    None => {
                        return last.or(open_template).unwrap_or((here, left_open));
                    }
                }
            };
            let closed = if *open == b"<script" {
                script_end(&html[inside..]).map(|at| (at, close.len()))
            } else if *open == b"<!--" {
                comment_end(&html[inside..])
            } else {
                closing_at(&html[inside..], close)
            };
            match closed {
                Some((end, len)) if *open == b"<!--" => at = inside + end + len,
                // An end tag runs to its `>` (past attributes, quoted
                // ones too, that an end tag may carry): `</script ` left
                // open takes in what follows, the banner included.
                Some((end, _)) => match tag_end(&html[inside + end..]) {
                    Some(gt) => at = inside + end + gt + 1,
                    None => {
                        return last.or(open_template).unwrap_or((here, left_open));
                    }
                },
                None => {
                    return last.or(open_template).unwrap_or((here, left_open));
                }
            }
            continue;
        }
        if as_html && tag_at(rest, b"<plaintext") {
            return last.or(open_template).unwrap_or((here, left_open));
        }
        // Any other tag, start or end, is passed over whole: a quoted
        // attribute value (a customer's text in a `title`) holding `<!--`,
        // `<script` or `</body>` is text, not markup. A tag left open
        // runs to the end, and would take the banner in.
        let letter = |i: usize| rest.get(i).is_some_and(u8::is_ascii_alphabetic);
        let is_end = rest.get(1) == Some(&b'/');
        if letter(1) || (is_end && letter(2)) {
            let Some(end) = tag_end(rest) else {
                return last.or(open_template).unwrap_or((here, left_open));
            };
            let name_at = if is_end { 2 } else { 1 };
            let name_len = rest[name_at..]
                .iter()
                .take_while(|b| !matches!(b, b'>' | b'/' | b' ' | b'\t' | b'\n' | b'\r' | 0x0c))
                .count();
            let name = rest[name_at..name_at + name_len].to_ascii_lowercase();
            // A form opens where HTML is read (in an svg, `<form>` is the
            // svg's own element); `</form>` ends the one open. Inside a
            // template neither moves the parser's form element pointer:
            // a form there is the template's own, and a `</form>` there
            // cannot reach one open outside it.
            if name == b"form" && templates == 0 && (is_end || foreign.reads_html()) {
                left_open.form = !is_end;
            }
            // Read as HTML before it (an svg's own root included), or
            // once it has broken out of one (`<svg><table>`).
            let read_as_html = foreign.reads_html();
            // A `<template>` read as HTML opens one (in an svg, it is the
            // svg's own element); a `</template>` ends the nearest one,
            // unless an svg's own `template` is nearer.
            let html_template = if is_end {
                foreign.ends_an_html_template()
            } else {
                foreign.reads_html()
            };
            if name == b"template" && html_template {
                if is_end {
                    templates = templates.saturating_sub(1);
                    if templates <= inert_depth {
                        open_template = None;
                    }
                } else {
                    if open_template.is_none() && !hosts_a_shadow_root(&rest[..=end]) {
                        open_template = Some((here, left_open.clone()));
                        inert_depth = templates;
                    }
                    templates = templates.saturating_add(1);
                }
            }
            if is_end {
                foreign.end(&name);
                // An end tag that HTML reads (one in an svg that ends it,
                // `</a>` there, included).
                if templates == 0 && foreign.reads_html() {
                    left_open.end(&name);
                }
            } else {
                if name == b"meta" {
                    metas.push(here..here + end + 1);
                }
                let html_element = read_as_html || ends_foreign(&name, &rest[..end]);
                if templates == 0 && html_element {
                    left_open.start(&name, &rest[..=end]);
                }
                foreign.start(name, &rest[..end], closes_itself(rest, end));
            }
            at = here + end + 1;
            continue;
        }
        // A bogus comment (`<!x`, `<?x`, `</ x`) runs to the first `>`.
        if matches!(rest.get(1), Some(b'!' | b'?' | b'/')) {
            match rest.iter().position(|&b| b == b'>') {
                Some(end) => at = here + end + 1,
                None => {
                    return last.or(open_template).unwrap_or((here, left_open));
                }
            }
            continue;
        }
        at = here + 1;
    }
    last.or(open_template).unwrap_or((html.len(), left_open))
}

/// Elements a page left open where the banner goes that would hide it (any
/// element `hidden`, `inert` or `aria-hidden`; a closed `<details>` or
/// `<dialog>`; the fallback content of an `<object>`, `<video>`, `<audio>`
/// or `<canvas>`), swallow it (a `<select>` or `<datalist>`, in which the
/// parser drops the banner's tags or shows none of them; a `<table>`,
/// which moves it) or take its clicks (a `<button>` or `<label>` around
/// it): each is ended before the banner when nothing of the page follows
/// it there (`nothing_follows`), so that ending them moves nothing.
/// Counted by name from the first one that counts: an end tag for one the
/// parser closed by its own rules meanwhile (a second `<button>` ends the
/// first) is an end tag for no open element, which the parser ignores.
/// Not counted: the elements whose end tag does something when none is
/// open (`</p>` makes an empty paragraph) or moves what they hold (the
/// formatting elements, `<a>`, `<b>`…, which the parser's adoption agency
/// takes apart), and a form, which is the parser's form element pointer
/// (`form`), ended whatever follows.
#[derive(Clone, Default)]
struct LeftOpen {
    /// Whether a form is open (the HTML parser's form element pointer).
    form: bool,
    /// Each name, how many of it are open, in the order first met.
    open: Vec<(Vec<u8>, usize)>,
}

impl LeftOpen {
    /// Elements that, left open, always count.
    const CONTAINERS: [&'static [u8]; 11] = [
        b"select",
        b"datalist",
        b"button",
        b"label",
        b"details",
        b"dialog",
        b"object",
        b"video",
        b"audio",
        b"canvas",
        b"table",
    ];

    /// Elements never counted, `hidden` or not: the document's own, a
    /// template (inert; `scan` places the banner before one left open), a
    /// form, a paragraph, and the formatting elements.
    const NEVER: [&'static [u8]; 20] = [
        b"html",
        b"head",
        b"body",
        b"template",
        b"form",
        b"p",
        b"a",
        b"b",
        b"big",
        b"code",
        b"em",
        b"font",
        b"i",
        b"nobr",
        b"s",
        b"small",
        b"strike",
        b"strong",
        b"tt",
        b"u",
    ];

    /// A start tag of `name` (lower case), read as HTML: `tag` is the
    /// whole tag, from `<` to `>`.
    fn start(&mut self, name: &[u8], tag: &[u8]) {
        if is_void(name) || Self::NEVER.contains(&name) {
            return;
        }
        if let Some((_, count)) = self.open.iter_mut().find(|(n, _)| n == name) {
            *count += 1;
        } else if Self::CONTAINERS.contains(&name) || hides(tag) {
            self.open.push((name.to_vec(), 1));
        }
    }

    /// An end tag of `name` (lower case), read as HTML.
    fn end(&mut self, name: &[u8]) {
        if let Some((_, count)) = self.open.iter_mut().find(|(n, _)| n == name) {
            *count = count.saturating_sub(1);
        }
    }

    /// The end tags that go before the banner: a `<select>`'s first (in
    /// one, the parser ignores every other end tag), then the form's if
    /// one is open (which also lets the banner's own form be one: the
    /// parser ignores a `<form>` while its form pointer is set, as an
    /// element closed around the form would leave it), then the others,
    /// the last met first. The form's only, unless `all`.
    fn closing(&self, all: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut end = |name: &[u8], count: usize| {
            for _ in 0..count {
                out.extend_from_slice(b"</");
                out.extend_from_slice(name);
                out.push(b'>');
            }
        };
        let open = if all { &self.open[..] } else { &[] };
        let selects = open.iter().find(|(n, _)| n == b"select");
        end(b"select", selects.map_or(0, |(_, count)| *count));
        if self.form {
            end(b"form", 1);
        }
        for (name, count) in open.iter().rev().filter(|(n, _)| n != b"select") {
            end(name, *count);
        }
        out
    }
}

/// Whether nothing of the page follows the banner's place (`tail`, from
/// there on): only `</body>` and `</html>` end tags, comments and white
/// space. `</body>` ends no element (what follows it still goes into the
/// ones open), so an element ended before the banner would let content
/// after `</body>` out of it.
fn nothing_follows(mut tail: &[u8]) -> bool {
    loop {
        tail = tail.trim_ascii_start();
        if tail.is_empty() {
            return true;
        }
        let next = if let Some(text) = tail.strip_prefix(b"<!--") {
            // `<!-->` and `<!--->` end where they begin.
            match [&b">"[..], b"->"].iter().find(|e| text.starts_with(e)) {
                Some(end) => Some(4 + end.len()),
                None => comment_end(text).map(|(end, len)| 4 + end + len),
            }
        } else if tag_at(tail, b"</body") || tag_at(tail, b"</html") {
            tag_end(tail).map(|gt| gt + 1)
        } else {
            return false;
        };
        match next {
            Some(next) => tail = &tail[next..],
            // Left open, it takes in the rest: nothing of the page.
            None => return true,
        }
    }
}

/// Whether a start tag (`tag`) hides its element and what it holds:
/// `hidden` (any value: `until-found` hides too), `inert`, or
/// `aria-hidden` other than `false`.
fn hides(tag: &[u8]) -> bool {
    Attributes::of(tag).any(|a| {
        a.name.eq_ignore_ascii_case(b"hidden")
            || a.name.eq_ignore_ascii_case(b"inert")
            || (a.name.eq_ignore_ascii_case(b"aria-hidden")
                && !a.value.eq_ignore_ascii_case(b"false"))
    })
}

/// Whether the start tag `tag`, whose `>` is at `end`, closes itself
/// (`<path/>`): a `/` just before its `>` that is not the end of an
/// unquoted attribute value (`<a href=/>` opens an `a`).
fn closes_itself(tag: &[u8], end: usize) -> bool {
    end > 0
        && tag[end - 1] == b'/'
        && Attributes::of(&tag[..=end])
            .last()
            .is_none_or(|a| a.span.end != end)
}

/// Whether a `<template>` start tag (`tag`) declares a shadow root
/// (`shadowrootmode` `open` or `closed`, as HTML's parser reads it: its
/// first such attribute), whose content is shown, not kept inert.
fn hosts_a_shadow_root(tag: &[u8]) -> bool {
    Attributes::of(tag)
        .find(|a| a.name.eq_ignore_ascii_case(b"shadowrootmode"))
        .is_some_and(|a| {
            a.value.eq_ignore_ascii_case(b"open") || a.value.eq_ignore_ascii_case(b"closed")
        })
}

/// Whether a MathML `<annotation-xml>` start tag (`tag`) makes its content
/// HTML: its `encoding` is `text/html` or `application/xhtml+xml`
/// (HTML's integration point), so a script there is a script.
fn annotation_holds_html(tag: &[u8]) -> bool {
    Attributes::of(tag)
        .find(|a| a.name.eq_ignore_ascii_case(b"encoding"))
        .is_some_and(|a| {
            a.value.eq_ignore_ascii_case(b"text/html")
                || a.value.eq_ignore_ascii_case(b"application/xhtml+xml")
        })
}

/// The namespace of an element open inside an svg or a math.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ns {
    Svg,
    MathMl,
}

/// What an element open inside an svg or a math is to the parser.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// An svg's or a math's own element: its content is markup of theirs.
    Foreign(Ns),
    /// An element of theirs whose content is HTML again (an svg's
    /// `<foreignObject>`, `<desc>`, `<title>`; MathML's `<mi>`, `<mo>`,
    /// `<mn>`, `<ms>`, `<mtext>`).
    Integration(Ns),
    /// An HTML element inside one of those.
    Html,
}

/// The elements open inside an svg or a math, as [`scan`] follows
/// them: at most [`FOREIGN_DEPTH`], so that a page of a million nested
/// `<g>`s costs a look at each tag, not a search of a million names.
#[derive(Default)]
struct Foreign {
    open: Vec<(Vec<u8>, Kind)>,
    /// The HTML elements open outside any svg or math (at most
    /// [`FOREIGN_DEPTH`] of them): an end tag in an svg that names one
    /// (`<button><svg>…</button>`, the svg's end left out) ends the svg.
    around: Vec<Vec<u8>>,
}

/// The most open elements [`Foreign`] follows; deeper ones (no icon or
/// chart nests so far) are passed over as if they were not there.
const FOREIGN_DEPTH: usize = 64;

impl Foreign {
    /// Whether a tag here is read by HTML's rules (raw text elements,
    /// `<plaintext>`): outside any svg or math, or inside an element whose
    /// content is HTML.
    fn reads_html(&self) -> bool {
        !matches!(self.open.last(), Some((_, Kind::Foreign(_))))
    }

    /// Whether the innermost open element is an svg's or a math's own
    /// (whether or not its content is HTML): there `<![CDATA[` opens a
    /// CDATA section, not a bogus comment.
    fn in_its_namespace(&self) -> bool {
        self.open
            .last()
            .is_some_and(|(_, kind)| *kind != Kind::Html)
    }

    /// Leaves the foreign elements innermost: an HTML element ends them.
    fn break_out(&mut self) {
        while matches!(self.open.last(), Some((_, Kind::Foreign(_)))) {
            self.open.pop();
        }
    }

    /// A start tag `name` (`tag`, its text up to its `>`).
    fn start(&mut self, name: Vec<u8>, tag: &[u8], closes_itself: bool) {
        if self.open.len() >= FOREIGN_DEPTH {
            return;
        }
        let current = match self.open.last() {
            Some((_, Kind::Foreign(ns))) => Some(*ns),
            _ => None,
        };
        match current {
            // In an svg's or a math's own element, a tag is theirs (an
            // `<svg>` in a math is a math element), unless it is one of
            // HTML's that end them.
            Some(_) if ends_foreign(&name, tag) => {
                self.break_out();
                // An HTML element: a `/` before its `>` closes nothing.
                if is_void(&name) {
                } else if !self.open.is_empty() {
                    self.open.push((name, Kind::Html));
                } else if self.around.len() < FOREIGN_DEPTH {
                    self.around.push(name);
                }
            }
            Some(_) if closes_itself => {}
            // MathML's `<annotation-xml>` may hold an svg of svg's own.
            Some(Ns::MathMl)
                if name == b"svg"
                    && self
                        .open
                        .last()
                        .is_some_and(|(n, _)| n == b"annotation-xml") =>
            {
                self.open.push((name, Kind::Foreign(Ns::Svg)));
            }
            Some(ns) => {
                let integration = match ns {
                    Ns::Svg => matches!(&name[..], b"foreignobject" | b"desc" | b"title"),
                    Ns::MathMl => {
                        matches!(&name[..], b"mi" | b"mo" | b"mn" | b"ms" | b"mtext")
                            || (name == b"annotation-xml" && annotation_holds_html(tag))
                    }
                };
                let kind = if integration {
                    Kind::Integration(ns)
                } else {
                    Kind::Foreign(ns)
                };
                self.open.push((name, kind));
            }
            // Read as HTML: an `<svg>` or a `<math>` opens theirs (unless
            // it closes itself); an HTML element's `/` closes nothing.
            None if closes_itself && matches!(&name[..], b"svg" | b"math") => {}
            None if name == b"svg" => self.open.push((name, Kind::Foreign(Ns::Svg))),
            None if name == b"math" => self.open.push((name, Kind::Foreign(Ns::MathMl))),
            None if !self.open.is_empty() && !is_void(&name) => {
                self.open.push((name, Kind::Html));
            }
            None if !closes_itself && !is_void(&name) && self.around.len() < FOREIGN_DEPTH => {
                self.around.push(name);
            }
            None => {}
        }
    }

    /// Whether a `</template>` here ends an HTML template (if one is
    /// open): the nearest element of that name open inside the svg or
    /// math is none of theirs (or there is none, and the end tag reaches
    /// HTML's rules, which end the nearest template whatever is inside).
    fn ends_an_html_template(&self) -> bool {
        !self
            .open
            .iter()
            .rev()
            .find(|(open, _)| open == b"template")
            .is_some_and(|(_, kind)| matches!(kind, Kind::Foreign(_) | Kind::Integration(_)))
    }

    fn end(&mut self, name: &[u8]) {
        if !self.reads_html() && (name == b"p" || name == b"br") {
            self.break_out();
            return;
        }
        if let Some(at) = self.open.iter().rposition(|(open, _)| open == name) {
            self.open.truncate(at);
            return;
        }
        // `</template>` ends the template open around the svg or math,
        // and everything inside it, whatever stands between.
        if name == b"template" {
            if let Some(at) = self.around.iter().rposition(|open| open == name) {
                self.open.clear();
                self.around.truncate(at);
            }
            return;
        }
        // `</html>` changes no element, as `</body>` does not.
        if name == b"html" {
            return;
        }
        // `</form>` takes the form out of the elements open, and leaves
        // those open inside it (an svg among them) open.
        if name == b"form" {
            if let Some(at) = self.around.iter().rposition(|open| open == name) {
                self.around.remove(at);
            }
            return;
        }
        // The end of an HTML element open around the svg or math (its own
        // end left out) ends it too, unless an element stands between
        // that HTML's rule for that end tag stops at: for a `</div>`, a
        // `</li>` and the like (closed if "in scope") only a scope's
        // boundary (a `<table>`, a `<td>`); for any other, a "special"
        // element (a `<button>`, a `<div>`). Inside the svg or math, an
        // element whose content is HTML (`<foreignObject>`) is both. One
        // that closes nothing changes nothing.
        if let Some(at) = self.around.iter().rposition(|open| open == name) {
            let between = &self.around[at + 1..];
            let blocked = match scope_of(name) {
                Some(boundary) => between.iter().any(|open| boundary(open)),
                None => between.iter().any(|open| is_special(open)),
            } || self
                .open
                .iter()
                .any(|(_, kind)| matches!(kind, Kind::Integration(_)));
            if !blocked {
                self.open.clear();
                self.around.truncate(at);
            }
        }
    }
}

/// For an end tag HTML closes by the "in scope" rule (in body: the
/// block elements, `li`, `dd`, `dt`, the headings, `applet`, `marquee`,
/// `object`), what bounds the scope it is looked for in; `None` for the
/// others (`</span>`, `</a>`…), which a "special" element stops.
fn scope_of(end: &[u8]) -> Option<fn(&[u8]) -> bool> {
    match end {
        b"li" => Some(|open| is_scope_boundary(open) || matches!(open, b"ol" | b"ul")),
        b"address" | b"article" | b"aside" | b"blockquote" | b"button" | b"center" | b"details"
        | b"dialog" | b"dir" | b"div" | b"dl" | b"fieldset" | b"figcaption" | b"figure"
        | b"footer" | b"header" | b"hgroup" | b"listing" | b"main" | b"menu" | b"nav" | b"ol"
        | b"pre" | b"search" | b"section" | b"summary" | b"ul" | b"dd" | b"dt" | b"h1" | b"h2"
        | b"h3" | b"h4" | b"h5" | b"h6" | b"applet" | b"marquee" | b"object" => {
            Some(is_scope_boundary)
        }
        _ => None,
    }
}

/// The HTML elements that bound "in scope" (the foreign ones that also
/// do are never in [`Foreign::around`]).
fn is_scope_boundary(name: &[u8]) -> bool {
    matches!(
        name,
        b"applet"
            | b"caption"
            | b"html"
            | b"table"
            | b"td"
            | b"th"
            | b"marquee"
            | b"object"
            | b"template"
    )
}

/// Whether a `<font>` start tag (`tag`) ends the svg or math it appears
/// in: only with a `color`, `face` or `size` attribute.
fn font_breaks_out(tag: &[u8]) -> bool {
    let lower = tag.to_ascii_lowercase();
    [&b"color"[..], b"face", b"size"].iter().any(|attr| {
        lower.windows(attr.len() + 1).enumerate().any(|(i, w)| {
            w[0].is_ascii_whitespace()
                && &w[1..] == *attr
                && lower.get(i + attr.len() + 1).is_none_or(|b| {
                    matches!(b, b'=' | b'>' | b'/' | b' ' | b'\t' | b'\n' | b'\r' | 0x0c)
                })
        })
    })
}

/// HTML's "special" elements, which an end tag of another name does not
/// reach past.
fn is_special(name: &[u8]) -> bool {
    matches!(
        name,
        b"address"
            | b"applet"
            | b"area"
            | b"article"
            | b"aside"
            | b"base"
            | b"basefont"
            | b"bgsound"
            | b"blockquote"
            | b"body"
            | b"br"
            | b"button"
            | b"caption"
            | b"center"
            | b"col"
            | b"colgroup"
            | b"dd"
            | b"details"
            | b"dir"
            | b"div"
            | b"dl"
            | b"dt"
            | b"embed"
            | b"fieldset"
            | b"figcaption"
            | b"figure"
            | b"footer"
            | b"form"
            | b"frame"
            | b"frameset"
            | b"h1"
            | b"h2"
            | b"h3"
            | b"h4"
            | b"h5"
            | b"h6"
            | b"head"
            | b"header"
            | b"hgroup"
            | b"hr"
            | b"html"
            | b"iframe"
            | b"img"
            | b"input"
            | b"keygen"
            | b"li"
            | b"link"
            | b"listing"
            | b"main"
            | b"marquee"
            | b"menu"
            | b"meta"
            | b"nav"
            | b"noembed"
            | b"noframes"
            | b"noscript"
            | b"object"
            | b"ol"
            | b"p"
            | b"param"
            | b"plaintext"
            | b"pre"
            | b"script"
            | b"search"
            | b"section"
            | b"select"
            | b"source"
            | b"style"
            | b"summary"
            | b"table"
            | b"tbody"
            | b"td"
            | b"template"
            | b"textarea"
            | b"tfoot"
            | b"th"
            | b"thead"
            | b"title"
            | b"tr"
            | b"track"
            | b"ul"
            | b"wbr"
            | b"xmp"
    )
}

/// HTML's void elements (the obsolete ones too: `<param>`, `<keygen>`…),
/// which have no end tag and hold nothing.
fn is_void(name: &[u8]) -> bool {
    matches!(
        name,
        b"area"
            | b"base"
            | b"basefont"
            | b"bgsound"
            | b"br"
            | b"col"
            | b"embed"
            | b"frame"
            | b"hr"
            | b"img"
            | b"input"
            | b"keygen"
            | b"link"
            | b"meta"
            | b"param"
            | b"source"
            | b"track"
            | b"wbr"
    )
}

/// Whether the start tag `tag` (up to its `>`), named `name` (lower case),
/// ends the svg or math it appears in: a breakout element's, or a `<font>`
/// with the attributes that make it one.
fn ends_foreign(name: &[u8], tag: &[u8]) -> bool {
    breaks_out(name) || (name == b"font" && font_breaks_out(tag))
}

/// Whether a start tag named `name` (lower case) ends the svg or math it
/// appears in (HTML's "breakout" elements: foreign content cannot hold
/// them).
fn breaks_out(name: &[u8]) -> bool {
    matches!(
        name,
        b"b" | b"big"
            | b"blockquote"
            | b"body"
            | b"br"
            | b"center"
            | b"code"
            | b"dd"
            | b"div"
            | b"dl"
            | b"dt"
            | b"em"
            | b"embed"
            | b"h1"
            | b"h2"
            | b"h3"
            | b"h4"
            | b"h5"
            | b"h6"
            | b"head"
            | b"hr"
            | b"i"
            | b"img"
            | b"li"
            | b"listing"
            | b"menu"
            | b"meta"
            | b"nobr"
            | b"ol"
            | b"p"
            | b"pre"
            | b"ruby"
            | b"s"
            | b"small"
            | b"span"
            | b"strong"
            | b"strike"
            | b"sub"
            | b"sup"
            | b"table"
            | b"tt"
            | b"u"
            | b"ul"
            | b"var"
    )
}

/// Where the start tag at the start of `tag` ends: its `>`, not one
/// inside a quoted attribute value (`title="a > b"`).
pub(crate) fn tag_end(tag: &[u8]) -> Option<usize> {
    let mut attributes = Attributes::of(tag);
    attributes.by_ref().for_each(drop);
    attributes.end
}

/// One attribute of a start tag: its name, its raw value (between its
/// quotes, if any), and where that value stands in the tag, quotes
/// included (empty, after the name, for an attribute without a value).
pub(crate) struct Attribute<'a> {
    pub(crate) name: &'a [u8],
    pub(crate) value: &'a [u8],
    pub(crate) span: std::ops::Range<usize>,
}

/// The attributes of the tag at the start of `tag`, in order, as HTML's
/// tokenizer reads them: the tag's name, then attributes, each a name
/// (whose first character may be anything, `=` and quotes included) and,
/// after an `=`, a value, quoted or not. Once they run out, `end` is where
/// the tag ends (its `>`), or `None` if it does not.
pub(crate) struct Attributes<'a> {
    tag: &'a [u8],
    at: usize,
    /// The tag's `>`, once found.
    pub(crate) end: Option<usize>,
    done: bool,
}

impl<'a> Attributes<'a> {
    pub(crate) fn of(tag: &'a [u8]) -> Self {
        // Past `<` and the tag's name (or, in an end tag, its `/`).
        let mut at = 1;
        while tag
            .get(at)
            .is_some_and(|&b| !is_space(b) && b != b'/' && b != b'>')
        {
            at += 1;
        }
        Self {
            tag,
            at,
            end: None,
            done: false,
        }
    }

    fn skip_spaces(&mut self) {
        while self.tag.get(self.at).is_some_and(|&b| is_space(b)) {
            self.at += 1;
        }
    }
}

impl<'a> Iterator for Attributes<'a> {
    type Item = Attribute<'a>;

    fn next(&mut self) -> Option<Attribute<'a>> {
        if self.done {
            return None;
        }
        let tag = self.tag;
        while tag.get(self.at).is_some_and(|&b| is_space(b) || b == b'/') {
            self.at += 1;
        }
        match tag.get(self.at) {
            None => {
                self.done = true;
                return None;
            }
            Some(b'>') => {
                self.done = true;
                self.end = Some(self.at);
                return None;
            }
            // The name: its first character whatever it is.
            Some(_) => {}
        }
        let start = self.at;
        self.at += 1;
        while tag
            .get(self.at)
            .is_some_and(|&b| !is_space(b) && !matches!(b, b'/' | b'>' | b'='))
        {
            self.at += 1;
        }
        let name = &tag[start..self.at];
        self.skip_spaces();
        if tag.get(self.at) != Some(&b'=') {
            let here = self.at;
            return Some(Attribute {
                name,
                value: &tag[here..here],
                span: here..here,
            });
        }
        self.at += 1;
        self.skip_spaces();
        let from = self.at;
        let value = if let Some(&quote @ (b'"' | b'\'')) = tag.get(from) {
            let Some(len) = tag[from + 1..].iter().position(|&c| c == quote) else {
                // An open quote runs past the end: the tag does not end.
                self.done = true;
                return None;
            };
            self.at = from + 1 + len + 1;
            &tag[from + 1..from + 1 + len]
        } else {
            // An unquoted value runs to a space or the `>`: a quote or
            // `=` inside it (`href=/?q='x`) is its text.
            while tag.get(self.at).is_some_and(|&c| !is_space(c) && c != b'>') {
                self.at += 1;
            }
            &tag[from..self.at]
        };
        Some(Attribute {
            name,
            value,
            span: from..self.at,
        })
    }
}

/// HTML's whitespace, between a tag's name and attributes.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0c)
}

/// Whether `text` starts with `name` (any case) as a whole tag name: a
/// comment's `<!--`, or a name followed by the end of its tag or an
/// attribute (not `<scripts>`, not a custom `<script-box>`).
fn tag_at(text: &[u8], name: &[u8]) -> bool {
    text.len() >= name.len()
        && text[..name.len()].eq_ignore_ascii_case(name)
        && (name == b"<!--"
            || text
                .get(name.len())
                .is_none_or(|b| matches!(b, b'>' | b'/' | b' ' | b'\t' | b'\n' | b'\r' | 0x0c)))
}

/// Where the first `close` (an end tag's start) is in `text`, and its
/// length.
fn closing_at(text: &[u8], close: &[u8]) -> Option<(usize, usize)> {
    let mut from = 0;
    while let Some(found) = text[from..]
        .windows(close.len())
        .position(|w| w.eq_ignore_ascii_case(close))
    {
        let at = from + found;
        if tag_at(&text[at..], close) {
            return Some((at, close.len()));
        }
        from = at + 1;
    }
    None
}

/// Where a comment's text ends: its first `-->`, or `--!>`, which
/// browsers take for one too; and the end's length.
fn comment_end(text: &[u8]) -> Option<(usize, usize)> {
    let mut from = 0;
    while let Some(found) = text[from..].windows(2).position(|w| w == b"--") {
        let at = from + found;
        match text.get(at + 2..) {
            Some([b'>', ..]) => return Some((at, 3)),
            Some([b'!', b'>', ..]) => return Some((at, 4)),
            _ => from = at + 1,
        }
    }
    None
}

/// Where a script's text ends (its `</script`), as browsers read it: after
/// `<!--` in a script, a `<script` opens an inner "double-escaped" part
/// that its own `</script` closes, not the element, until `-->` (HTML's
/// script data states). A customer's `<!--<script>` put in a JSON script
/// runs the element past the first `</script>`, to the page's end, or to
/// a later one.
fn script_end(text: &[u8]) -> Option<usize> {
    enum State {
        Data,
        Escaped,
        DoubleEscaped,
    }
    let mut state = State::Data;
    // Dashes just read in an escaped part: `>` after two ends it (the
    // dashes of its `<!--` count: `<!-->` ends where it begins).
    let mut dashes = 0;
    let mut i = 0;
    while let Some(&b) = text.get(i) {
        let rest = &text[i..];
        match state {
            State::Data => {
                if rest.starts_with(b"<!--") {
                    state = State::Escaped;
                    dashes = 2;
                    i += b"<!--".len();
                    continue;
                }
                if tag_at(rest, b"</script") {
                    return Some(i);
                }
            }
            State::Escaped | State::DoubleEscaped => {
                match b {
                    b'-' => {
                        dashes += 1;
                        i += 1;
                        continue;
                    }
                    b'>' if dashes >= 2 => {
                        state = State::Data;
                        dashes = 0;
                        i += 1;
                        continue;
                    }
                    _ => dashes = 0,
                }
                if matches!(state, State::Escaped) {
                    if tag_at(rest, b"</script") {
                        return Some(i);
                    }
                    if tag_at(rest, b"<script") {
                        state = State::DoubleEscaped;
                        i += b"<script".len();
                        continue;
                    }
                } else if tag_at(rest, b"</script") {
                    state = State::Escaped;
                    i += b"</script".len();
                    continue;
                }
            }
        }
        i += 1;
    }
    None
}

/// `html` with every non-ASCII character written as a numeric character
/// reference (`&#183;` for `·`), which HTML reads the same in text and in
/// attribute values, whatever the page's charset.
fn ascii_only(html: String) -> String {
    if html.is_ascii() {
        return html;
    }
    let mut out = String::with_capacity(html.len() + 16);
    for c in html.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            // HTML reads a reference to U+0080-U+009F (C1 controls) as the
            // windows-1252 character of that byte (`&#153;` is "™"): the
            // banner would show a name other than the stored one.
            let c = if ('\u{80}'..='\u{9F}').contains(&c) {
                '\u{FFFD}'
            } else {
                c
            };
            // Writing to a String cannot fail.
            let _ = std::fmt::Write::write_fmt(&mut out, format_args!("&#{};", u32::from(c)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::inject;
    use proptest::prelude::*;

    /// What XML does not allow never reaches the banner: one such
    /// character in a name would make an XHTML page fail to render.
    #[test]
    fn banner_text_keeps_to_what_xml_allows() {
        assert_eq!(
            super::esc("Ol\u{0}ive\u{1B} & \u{FFFE}Co\u{FFFF}\t\u{7F}"),
            "Ol\u{FFFD}ive\u{FFFD} &amp; \u{FFFD}Co\u{FFFD}\t\u{7F}"
        );
        assert_eq!(super::attr("a\u{8}\"b"), "a\u{FFFD}&quot;b");
        assert_eq!(super::esc("Olive <Owner>"), "Olive &lt;Owner&gt;");
    }

    /// Text a script, style, comment or textarea may hold: the markers
    /// that open, close or escape one, and plain text.
    fn inner() -> impl Strategy<Value = String> {
        let token = prop_oneof![
            Just("<!--"),
            Just("-->"),
            Just("<!-->"),
            Just("<script>"),
            Just("<SCRIPT type=x>"),
            Just("</script>"),
            Just("</script "),
            Just("</body>"),
            Just("<textarea>"),
            Just("</style>"),
            Just("-"),
            Just(">"),
            Just("a"),
            Just(" "),
        ];
        proptest::collection::vec(token, 0..8).prop_map(|t| t.concat())
    }

    /// A piece of a page: markup, raw text elements with [`inner`] text
    /// (closed or left open), comments, quoted attributes and end tags.
    fn piece() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("<p>x</p>".to_owned()),
            Just("</body>".to_owned()),
            Just("</BODY >".to_owned()),
            Just("</html>".to_owned()),
            Just("<svg><title/><path/></svg>".to_owned()),
            Just("<svg viewBox=\"0 0 1 1\"><style/><script/></svg>".to_owned()),
            Just("<title/>".to_owned()),
            // HTML's own elements end an svg left open.
            Just("<svg><p>".to_owned()),
            Just(
                "<math><mi>x</mi><annotation-xml><svg><title/></svg></annotation-xml></math>"
                    .to_owned()
            ),
            inner().prop_map(|t| format!(
                "<svg><style><![CDATA[{}]]></style></svg>",
                t.replace("]]>", "")
            )),
            inner().prop_map(|t| format!("<svg><style>{t}</style></svg>")),
            inner().prop_map(|t| format!("<svg><title>{t}</title></svg>")),
            inner().prop_map(|t| format!("<svg><foreignObject>{t}</foreignObject></svg>")),
            inner().prop_map(|t| format!("<math><mi>{t}</mi></math>")),
            Just("<br/>".to_owned()),
            Just("<button><svg><path d=x></button>".to_owned()),
            // A `</div>` ends an svg inside a `<p>` in the div: only a
            // scope's boundary stops it, not the `<p>`.
            Just("<div><p><svg><path d=M0>".to_owned()),
            Just("</div>".to_owned()),
            Just("<ul><li><span><svg><g>".to_owned()),
            Just("</li>".to_owned()),
            Just("<svg><font>".to_owned()),
            Just("<svg><font size=2>".to_owned()),
            Just("<a href=/?q='x>y</a>".to_owned()),
            // A `/` ending an unquoted value closes nothing; nor does
            // one an HTML element's tag ends with.
            Just("<a href=/>".to_owned()),
            Just("</a>".to_owned()),
            Just("<span/>".to_owned()),
            Just("</span>".to_owned()),
            Just("<svg/>".to_owned()),
            Just("</body data-x=\"<!--\">".to_owned()),
            // A template's content is inert, whatever it holds; one left
            // open holds the rest of the page.
            Just("<template>".to_owned()),
            Just("</template>".to_owned()),
            // A declarative shadow root's, whose content is shown.
            Just("<div><template shadowrootmode=open>".to_owned()),
            // (Not an `<annotation-xml encoding="text/html">`: the parser
            // here, html5ever as `scraper` drives it, does not read its
            // content as HTML, as browsers do; a test below says where the
            // banner goes then.)
            inner().prop_map(|t| format!("<!--{t}--!>")),
            inner().prop_map(|t| format!("<xmp>{t}</xmp>")),
            inner().prop_map(|t| format!("<iframe>{t}</iframe>")),
            inner().prop_map(|t| format!("<noembed>{t}</noembed>")),
            inner().prop_map(|t| format!("<noframes>{t}</noframes>")),
            Just("<img>".to_owned()),
            inner().prop_map(|t| format!("<div title=\"{}\">y</div>", t.replace('"', ""))),
            (inner(), any::<bool>())
                .prop_map(|(t, c)| { format!("<script>{t}{}", if c { "</script>" } else { "" }) }),
            (inner(), any::<bool>()).prop_map(|(t, c)| {
                format!(
                    "<script type=\"application/json\">{t}{}",
                    if c { "</script>" } else { "" }
                )
            }),
            inner().prop_map(|t| format!("<style>{t}</style>")),
            inner().prop_map(|t| format!("<textarea>{t}</textarea>")),
            inner().prop_map(|t| format!("<title>{t}</title>")),
            inner().prop_map(|t| format!("<noscript>{t}</noscript>")),
            inner().prop_map(|t| format!("<!--{t}-->")),
            "[a-z <!?/>-]{0,6}",
            Just("<!doctype x>".to_owned()),
            Just("</p >".to_owned()),
        ]
    }

    proptest! {
        // A fixed seed: every run (CI's too) draws the same pages, so a
        // failure is found once, here, and not by chance on a later run.
        // Run it with `PROPTEST_CASES=60000` to look further.
        #![proptest_config(ProptestConfig {
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x6261_6e6e_6572),
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// Wherever the scanner puts the banner, a real HTML parser
        /// (html5ever, as browsers parse) reads it as an element of the
        /// page, not as text inside a script, a style, a comment or a
        /// textarea: it shows.
        #[test]
        fn a_real_parser_finds_the_banner_as_an_element(pieces in proptest::collection::vec(piece(), 0..10)) {
            let page = format!("<!doctype html><html><head></head><body>{}", pieces.concat());
            let banner = "<div id=\"impersonation-banner\" role=\"alert\">B</div>";
            let injected = String::from_utf8(inject(page.as_bytes(), banner, &[], true).unwrap()).unwrap();
            let dom = scraper::Html::parse_document(&injected);
            let found = scraper::Selector::parse("#impersonation-banner").unwrap();
            prop_assert_eq!(dom.select(&found).count(), 1, "page: {}", injected);
            // Not inside an HTML template, whose content never shows (an
            // svg's own `template` element is no such thing, nor is a
            // declarative shadow root's, which this parser keeps as a
            // template and browsers show).
            let banner = dom.select(&found).next().unwrap();
            let in_template = banner.ancestors().any(|a| {
                a.value().as_element().is_some_and(|e| {
                    e.name() == "template"
                        && &*e.name.ns == "http://www.w3.org/1999/xhtml"
                        && !matches!(e.attr("shadowrootmode"), Some("open" | "closed"))
                })
            });
            prop_assert!(!in_template, "in a template: {}", injected);
        }
    }

    /// A `=` that begins an attribute's name opens no value: the tag ends
    /// at the first `>`, as a browser's tokenizer ends it.
    #[test]
    fn a_name_that_begins_with_an_equals_sign_opens_no_value() {
        assert_eq!(super::tag_end(b"<p =\"a>\" b>"), Some(6));
        assert_eq!(super::tag_end(b"<p x =\"a>\" b>"), Some(12));
        assert_eq!(super::tag_end(b"<p/=\"a>\">"), Some(6));
    }

    /// The banner's and its Stop button's own styles mark what would hide
    /// them `!important`, which no stylesheet rule outranks.
    #[test]
    fn the_banners_styles_hold_against_a_pages_stylesheet() {
        for property in [
            "position:fixed",
            "top:0",
            "left:0",
            "right:0",
            "display:flex",
            "visibility:visible",
            "opacity:1",
            "transform:none",
            "translate:none",
            "scale:none",
            "rotate:none",
            "clip:auto",
            "clip-path:none",
            "filter:none",
            "max-height:none",
            "overflow:visible",
            "content-visibility:visible",
            "color:#fff",
            "-webkit-text-fill-color:#fff",
            "background:#b91c1c",
        ] {
            assert!(
                super::STYLES[0].contains(&format!("{property}!important")),
                "{property}"
            );
        }
        // Its message, details, form and button each hold their own too.
        for style in &super::STYLES[1..] {
            for property in [
                "display:",
                "visibility:visible!important",
                "opacity:1!important",
            ] {
                assert!(style.contains(property), "{style}: {property}");
            }
        }
        assert!(super::STYLES[4].contains("display:inline-block!important"));
        // The button's text is not the banner's white, which it would
        // inherit onto its white face.
        for property in [
            "color:#7f1d1d!important",
            "-webkit-text-fill-color:#7f1d1d!important",
        ] {
            assert!(super::STYLES[4].contains(property), "{property}");
        }
    }

    /// A `</body>` inside a `<template>` is the template's inert content,
    /// never shown: the banner goes before the page's own, or is appended.
    #[test]
    fn a_body_end_inside_a_template_is_not_the_pages() {
        let page = "<p>x</p><template id=preview><html><body>y</body></html></template>";
        assert_eq!(placed(page), format!("{page}[B]"));
        let nested = "<template><template></template></body></template><p>x</p></body>";
        assert_eq!(
            placed(nested),
            "<template><template></template></body></template><p>x</p>[B]</body>"
        );
        // An svg's own `<template>` element opens no HTML template.
        let svg = "<svg><template></svg><p>x</p></body>";
        assert_eq!(placed(svg), "<svg><template></svg><p>x</p>[B]</body>");
    }

    /// A template left open (a customer's stray `<template>` in a preview
    /// of their email) holds the rest of the page, the page's own
    /// `</body>` included: the banner goes before it, where it shows, or
    /// before a `</body>` that came earlier.
    #[test]
    fn a_template_left_open_does_not_take_the_banner_in() {
        let preview = "<p>x</p><template id=preview>a<template>b</template></body></html>";
        assert_eq!(
            placed(preview),
            "<p>x</p>[B]<template id=preview>a<template>b</template></body></html>"
        );
        // A form open before it is closed first, as before a `</body>`.
        let form = "<form><input name=q><template><p>y</p></body>";
        assert_eq!(
            placed(form),
            "<form><input name=q></form>[B]<template><p>y</p></body>"
        );
        // Left open inside a script's text after it, the place stays.
        let script = "<template><p>y</p><script>var a = 1;";
        assert_eq!(placed(script), format!("[B]{script}"));
        let earlier = "<p>x</p></body><template><p>y</p>";
        assert_eq!(placed(earlier), "<p>x</p>[B]</body><template><p>y</p>");
        // Closed again, it moves nothing.
        let closed = "<template><p>y</p></template><p>x</p>";
        assert_eq!(placed(closed), format!("{closed}[B]"));
        // A `</template>` inside an svg ends the template (and the svg),
        // unless the svg's own `template` is open: then it ends that one.
        let in_svg = "<template><svg><path d=M0></template><p>x</p></body>";
        assert_eq!(
            placed(in_svg),
            "<template><svg><path d=M0></template><p>x</p>[B]</body>"
        );
        let svgs_own = "<template><svg><template></template></svg><p>x</p></body>";
        assert_eq!(placed(svgs_own), format!("[B]{svgs_own}"));
        // One left open inside another that closes: the banner goes
        // before the one left open.
        let inner = "<template><p>y</p></template><p>x</p><template>z</body>";
        assert_eq!(
            placed(inner),
            "<template><p>y</p></template><p>x</p>[B]<template>z</body>"
        );
    }

    /// A declarative shadow root's template (`shadowrootmode`) is shown,
    /// in its host's shadow tree: left open, it keeps the banner, which
    /// before it would be a light child the shadow tree does not show.
    /// An inert template left open inside it still puts the banner
    /// before that one.
    #[test]
    fn a_shadow_roots_template_left_open_keeps_the_banner() {
        let shadow = "<div id=preview><template shadowrootmode=open><p>hi</p></body></html>";
        assert_eq!(placed(shadow), format!("{shadow}[B]"));
        let closed = "<div><template SHADOWROOTMODE=\"closed\"><p>hi</p>";
        assert_eq!(placed(closed), format!("{closed}[B]"));
        let inert = "<div><template shadowrootmode=open><p>hi</p><template>z</body>";
        assert_eq!(
            placed(inert),
            "<div><template shadowrootmode=open><p>hi</p>[B]<template>z</body>"
        );
        // A `</template>` inside an svg ends the shadow root's template
        // (and the svg): the `<textarea>` after it is HTML's, its text
        // left open, and the banner goes before it.
        let svg = "<div><template shadowrootmode=open><svg><path d=M0></template><textarea>a";
        assert_eq!(
            placed(svg),
            "<div><template shadowrootmode=open><svg><path d=M0></template>[B]<textarea>a"
        );
        // Not a mode the parser knows: an inert template like any other.
        let unknown = "<p>x</p><template shadowrootmode=none><p>y</p></body>";
        assert_eq!(
            placed(unknown),
            "<p>x</p>[B]<template shadowrootmode=none><p>y</p></body>"
        );
    }

    /// A `<meta>` charset quoted in a script's text, in the page's first
    /// 1024 bytes, is the page's charset to a browser's prescan, which
    /// does not know scripts: one that does not keep ASCII refuses the
    /// banner, even with a UTF-8 `<meta>` after it, a `>` in a quoted
    /// value before it, or in another case. Past the prescan's bytes, or
    /// with the charset in the header, it is only text.
    #[test]
    fn a_meta_charset_the_prescan_reads_in_a_script_refuses_the_banner() {
        for page in [
            "<script>var n=\"<meta charset=iso-2022-jp>\"</script><meta charset=utf-8><p>x</p></body>",
            "<script>var n='<META x=\">\" CHARSET=iso-2022-jp>'</script><p>x</p></body>",
            "<style>/*<meta http-equiv=content-type content='text/html; charset=iso-2022-jp'>*/</style><p>x</p></body>",
        ] {
            assert!(
                inject(page.as_bytes(), "[B]", &[], false).is_err(),
                "{page}"
            );
            assert!(inject(page.as_bytes(), "[B]", &[], true).is_ok(), "{page}");
        }
        // A `<meta` in another tag's attribute, or in a comment, is no
        // charset to the prescan.
        for page in [
            "<input value=\"<meta charset=iso-2022-jp>\"><p>x</p></body>",
            "<!-- <meta charset=iso-2022-jp> --><p>x</p></body>",
        ] {
            assert!(inject(page.as_bytes(), "[B]", &[], false).is_ok(), "{page}");
        }
        // The prescan's first charset decides: an ASCII-keeping one first.
        let first_utf8 =
            "<script>x=\"<meta charset=utf-8>\"</script><meta charset=utf-8><p>x</p></body>";
        assert!(inject(first_utf8.as_bytes(), "[B]", &[], false).is_ok());
        // `<metadata>` is another element.
        let other = "<script>x=\"<metadata charset=iso-2022-jp>\"</script><p>x</p></body>";
        assert!(inject(other.as_bytes(), "[B]", &[], false).is_ok());
        // Past the first 1024 bytes the prescan does not look.
        let late = format!(
            "<p>{}</p><script>x=\"<meta charset=iso-2022-jp>\"</script></body>",
            "a".repeat(1100)
        );
        assert!(inject(late.as_bytes(), "[B]", &[], false).is_ok());
    }

    fn placed(page: &str) -> String {
        String::from_utf8(inject(page.as_bytes(), "[B]", &[], true).unwrap()).unwrap()
    }

    #[test]
    fn the_banner_goes_before_the_last_body_end_that_is_markup() {
        assert_eq!(
            placed("<p>x</p></BODY></html>"),
            "<p>x</p>[B]</BODY></html>"
        );
        // A script after the body (analytics) does not move it.
        assert_eq!(
            placed("<p>x</p></body><script>a()</script>"),
            "<p>x</p>[B]</body><script>a()</script>"
        );
        // `</body>` quoted in a script, a comment or a textarea of a page
        // without its own: appended, not put inside them.
        for page in [
            "<p>x</p><script type=\"application/json\">{\"note\":\"</body>\"}</script>",
            "<p>x</p><!-- </body> -->",
            "<textarea></body></textarea>",
        ] {
            assert_eq!(placed(page), format!("{page}[B]"));
        }
        // Quoted before the real one: the real one.
        assert_eq!(
            placed("<script>var s=\"</body>\";</script><p>x</p></body>"),
            "<script>var s=\"</body>\";</script><p>x</p>[B]</body>"
        );
        // MathML's `<annotation-xml>` holds HTML when its encoding says
        // so (any case), as browsers read it: a script in it is a script,
        // and a `<!--` in its text opens no comment. Without the
        // encoding, its content is MathML, where `<!--` does.
        assert_eq!(
            placed(
                "<math><annotation-xml encoding=\"Text/HTML\"><script>a=\"<!--\"</script></annotation-xml></math><p>x</p></body>"
            ),
            "<math><annotation-xml encoding=\"Text/HTML\"><script>a=\"<!--\"</script></annotation-xml></math><p>x</p>[B]</body>"
        );
        assert_eq!(
            placed(
                "<math><annotation-xml><script>a=\"<!--\"</script></annotation-xml></math><p>x</p></body>"
            ),
            "<math><annotation-xml><script>a=\"[B]<!--\"</script></annotation-xml></math><p>x</p></body>"
        );
        // A `/` ending an unquoted value does not close an element: `</a>`
        // ends the svg it holds, and the script after is HTML's.
        assert_eq!(
            placed(
                "<a href=/><svg><path d=\"M0 0\"></a><script>if(s==\"<!--\")f()</script><p>x</p></body>"
            ),
            "<a href=/><svg><path d=\"M0 0\"></a><script>if(s==\"<!--\")f()</script><p>x</p>[B]</body>"
        );
        // An end tag's attributes are part of it: a `<!--` quoted there
        // opens no comment, and the script after it is text.
        assert_eq!(
            placed(
                "<p>x</p></body data-x=\"<!--\"><script>var s=\"-->\"; var t=\"</body>\";</script>"
            ),
            "<p>x</p>[B]</body data-x=\"<!--\"><script>var s=\"-->\"; var t=\"</body>\";</script>"
        );
        // Quoted with an opening tag after it, in a page without its own:
        // still inside the script or comment, so appended.
        for page in [
            "<div><script type=\"application/json\">{\"note\":\"see </body> and <!-- x\"}</script></div>",
            "<p>x</p><!-- </body> <script -->",
            "<style>/* </body> <textarea */</style>",
        ] {
            assert_eq!(placed(page), format!("{page}[B]"));
        }
        // A tag whose name only begins like a raw-text one is markup.
        assert_eq!(
            placed("<scripts-box></scripts-box><p>x</p></body>"),
            "<scripts-box></scripts-box><p>x</p>[B]</body>"
        );
        // An end tag with a space before its `>`, and a script closed by
        // one: both seen.
        assert_eq!(
            placed("<script>a()</script ><p>x</p></body >"),
            "<script>a()</script ><p>x</p>[B]</body >"
        );
        // An empty comment ends where it begins, as browsers read it.
        assert_eq!(
            placed("<!--><p>x</p></body><!-- -->"),
            "<!--><p>x</p>[B]</body><!-- -->"
        );
        assert_eq!(
            placed("<!---><p>x</p></body><!-- -->"),
            "<!---><p>x</p>[B]</body><!-- -->"
        );
        // Text left open runs to the end: the banner goes before it, where
        // it shows, unless the body ended earlier.
        assert_eq!(
            placed("<p>x</p><script>if (a </body>"),
            "<p>x</p>[B]<script>if (a </body>"
        );
        assert_eq!(
            placed("<p>x</p><PLAINTEXT></body>"),
            "<p>x</p>[B]<PLAINTEXT></body>"
        );
        assert_eq!(
            placed("<p>x</p></body><!-- </body>"),
            "<p>x</p>[B]</body><!-- </body>"
        );
    }

    /// Elements nested deeper than the scanner follows (a million `<g>`s
    /// in an svg) are passed over, each tag looked at once: the banner
    /// still goes before the body's end.
    #[test]
    fn a_deeply_nested_svg_is_passed_over() {
        let depth = 1_000_000;
        let page = format!(
            "<body><svg>{}{}</svg><p>x</p></body>",
            "<g>".repeat(depth),
            "</x>".repeat(depth)
        );
        let placed = placed(&page);
        assert!(placed.ends_with("<p>x</p>[B]</body>"));
    }

    #[test]
    fn banner_text_loses_bidirectional_controls_and_is_escaped() {
        assert_eq!(
            super::esc("Olive \u{202E}renwO\u{202C} <b>"),
            "Olive renwO &lt;b&gt;"
        );
        for c in [
            '\u{061C}', '\u{200E}', '\u{200F}', '\u{202A}', '\u{2066}', '\u{2069}',
        ] {
            assert_eq!(super::esc(&format!("a{c}b")), "ab", "{:?}", c);
        }
        // Right-to-left letters themselves stay.
        assert_eq!(super::esc("\u{05D0}\u{05D1}"), "\u{05D0}\u{05D1}");
    }

    /// After `<!--`, a `<script` in a script opens a part its own
    /// `</script>` closes, not the element (HTML's double-escaped script
    /// data): browsers then read on to a later `</script>` or the page's
    /// end, and a banner put before the first `</script>`'s `</body>`
    /// would be script text, never shown.
    #[test]
    fn a_script_escaped_twice_runs_past_its_first_end_tag() {
        // A customer's note in a JSON script: the rest of the page is
        // script, so the banner goes before it, where it shows.
        let page = "<p>x</p><script type=\"application/json\">{\"note\":\"<!--<script>\"}</script><p>y</p></body></html>";
        assert_eq!(
            placed(page),
            format!("<p>x</p>[B]{}", &page["<p>x</p>".len()..])
        );
        // Closed by a later `</script>`: the body's end after it counts.
        let page = "<script>s='<!--<script>';</script>t='</script>';</script><p>y</p></body>";
        assert_eq!(placed(page), page.replace("</body>", "[B]</body>"));
        // `-->` ends the escaped part, and `<!-->` ends where it begins:
        // the first `</script>` then closes the element.
        for script in [
            "<script>a('<!--<script></script>-->');</script>",
            "<script>a('<!-->');</script>",
            "<script>a('<!--->');</script>",
            "<script>a('<!--');</script>",
            "<script>a('<!-- x <scripts>');</script>",
        ] {
            let page = format!("{script}<p>y</p></body>");
            assert_eq!(
                placed(&page),
                format!("{script}<p>y</p>[B]</body>"),
                "{script}"
            );
        }
    }

    #[test]
    fn a_text_element_that_closes_itself_opens_no_text() {
        // An icon's `<title/>` or `<style/>` closes itself in an svg: no
        // text runs from it to the end of the page.
        for svg in [
            "<svg><title/><path/></svg>",
            "<svg viewBox=\"0 0 1 1\"><style/><script/></svg>",
            "<svg><title>a </body> b</title></svg><svg/>",
            "<math><mi>x</mi><annotation/></math>",
        ] {
            let page = format!("<body>{svg}<p>Bookings</p></body>");
            assert_eq!(
                placed(&page),
                format!("<body>{svg}<p>Bookings</p>[B]</body>"),
                "{svg}"
            );
        }
        // An svg left open (the browser leaves it at the first `<div>`)
        // changes nothing for the HTML after it.
        let page = "<svg class=\"icon\"><use href=\"#m\"></use><div>B</div><script>if (s.startsWith(\"<!--\")) f(s)</script><p>x</p></body>";
        assert_eq!(
            placed(page),
            page.replace("<p>x</p></body>", "<p>x</p>[B]</body>")
        );
    }

    #[test]
    fn an_end_tag_closed_in_scope_ends_an_svg_past_a_paragraph() {
        // `</div>` ends the svg left open in the `<p>` inside the div (HTML
        // looks for the div in scope, which a `<p>` does not bound), so the
        // script after it is a script, and its `<!--` no comment.
        let script = "<script>if (s.startsWith(\"<!--\")) f(s)</script>";
        let page = format!("<body><div><p><svg><path d=\"M0\"></div>{script}<p>x</p></body>");
        assert_eq!(
            placed(&page),
            page.replace("<p>x</p></body>", "<p>x</p>[B]</body>")
        );
        // A table cell bounds the scope: the `</div>` outside it ends
        // nothing there, and the svg goes on. Either way a real parser
        // finds the banner as an element.
        for page in [
            page.clone(),
            format!("<div><table><tr><td><svg><path></div>{script}<p>x</p></body>"),
            format!("<div><ul><li><svg><path></div>{script}<p>x</p></body>"),
        ] {
            assert_banner_is_an_element(&page);
        }
    }

    /// A real HTML parser finds the banner injected into `page` as one
    /// element.
    fn assert_banner_is_an_element(page: &str) {
        assert_injected_once(
            page,
            "<div id=\"impersonation-banner\">B</div>",
            "#impersonation-banner",
        );
    }

    /// A real HTML parser finds `selector` once in `page` with `banner`
    /// injected.
    fn assert_injected_once(page: &str, banner: &str, selector: &str) {
        let injected =
            String::from_utf8(inject(page.as_bytes(), banner, &[], true).unwrap()).unwrap();
        let dom = scraper::Html::parse_document(&injected);
        let found = scraper::Selector::parse(selector).unwrap();
        assert_eq!(dom.select(&found).count(), 1, "{injected}");
    }

    /// An element the page left open where the banner goes that would hide
    /// it, swallow it or take its clicks is ended before it (`LeftOpen`),
    /// as a real parser then reads the page: the banner is an element of
    /// its own, its Stop a form of its own outside the page's button, and
    /// none of its ancestors hides it. Nothing is ended that the page
    /// closed itself.
    #[test]
    fn elements_left_open_that_would_hide_the_banner_are_ended_before_it() {
        // In a `<select>`, the parser drops the banner's tags.
        assert_banner_is_an_element("<p>x</p><select name=s><option>a</body></html>");
        assert_banner_is_an_element("<select><select><option>a</body>");
        assert_injected_once(
            "<form><button>Save</body>",
            "<div id=\"b\"><form><button id=\"stop\">Stop</button></form></div>",
            "body > #b > form > button#stop",
        );
        for page in [
            "<div hidden>x</body>",
            "<div hidden><div>a</div><div>b</body>",
            "<details><summary>More</summary>x</body>",
            "<dialog>x</body>",
            "<video src=v.mp4>x</body>",
            "<object data=x.pdf>x</body>",
            "<section aria-hidden=true><div>x</div></body>",
            "<main inert><p>x</body>",
            "<label>Name <input></body>",
            "<table><tr><td><div hidden>x</body>",
            "<div hidden><object><div>x</body>",
            "<datalist id=d><option>b</body>",
            // An HTML element that ends the svg around it is HTML's.
            "<svg><circle r=1><div hidden>x</body>",
        ] {
            let injected = String::from_utf8(
                inject(page.as_bytes(), "<div id=\"b\">B</div>", &[], true).unwrap(),
            )
            .unwrap();
            let dom = scraper::Html::parse_document(&injected);
            let found = scraper::Selector::parse("#b").unwrap();
            let banners: Vec<_> = dom.select(&found).collect();
            assert_eq!(banners.len(), 1, "{injected}");
            for ancestor in banners[0].ancestors().filter_map(scraper::ElementRef::wrap) {
                let element = ancestor.value();
                assert!(
                    matches!(element.name(), "html" | "body")
                        && !["hidden", "inert", "aria-hidden"]
                            .iter()
                            .any(|a| element.attr(a).is_some()),
                    "{page}: the banner is in a <{}>: {injected}",
                    element.name()
                );
            }
        }
        for page in [
            "<div hidden>x</div><button>b</button><p>y</body>",
            "<select><option>a</select><a href=/>x</a><table><tr><td>1</table></body>",
            "<svg><a><text>x</text></a></svg><p>y</body>",
            "<input hidden><img hidden src=x><br></body>",
            // An end tag that would make an element (`</p>`) or take the
            // page's content apart (`</a>`, `</b>`: the adoption agency).
            "<p hidden>e</p><p>a<p>b</body>",
            "<a href=/x class=card><div id=c>card</body>",
            "<b hidden><div>x</body>",
        ] {
            let (head, tail) = page.split_at(page.len() - "</body>".len());
            assert_eq!(placed(page), format!("{head}[B]{tail}"), "{page}");
        }
        // Nor when the page goes on after `</body>` (which ends nothing):
        // what follows stays where the page put it.
        for (page, selector) in [
            ("<div hidden>x</body><p id=t>late</p>", "div[hidden] #t"),
            (
                "<table><tr><td>a</body><td id=t>b</td></tr></table>",
                "td#t",
            ),
            (
                "<select><option>a</body><option id=t>b</select>",
                "select #t",
            ),
        ] {
            assert_eq!(
                placed(page),
                page.replacen("</body>", "[B]</body>", 1),
                "{page}"
            );
            let dom = scraper::Html::parse_document(&placed(page));
            let found = scraper::Selector::parse(selector).unwrap();
            assert_eq!(dom.select(&found).count(), 1, "{page}");
        }
        // (An empty comment, `<!-->`, ends where it begins.)
        assert_eq!(
            placed("<dialog>x</body><!--><p>late"),
            "<dialog>x[B]</body><!--><p>late"
        );
        // Comments and `</html>` after it are nothing of the page.
        assert_eq!(
            placed("<dialog>x</body>\n<!-- built 12:00 -->\n</html>\n"),
            "<dialog>x</dialog>[B]</body>\n<!-- built 12:00 -->\n</html>\n"
        );
    }

    #[test]
    fn a_form_left_open_is_closed_before_the_banner_and_only_then() {
        for (page, placed_as) in [
            (
                "<form><input name=q></body>",
                "<form><input name=q></form>[B]</body>",
            ),
            (
                "<form action=/a><input></FORM><p>x</body>",
                "<form action=/a><input></FORM><p>x[B]</body>",
            ),
            ("<p>x</body>", "<p>x[B]</body>"),
            // In an svg, `<form>` is the svg's element, and no HTML form.
            (
                "<svg><form></form></svg><p>x</body>",
                "<svg><form></form></svg><p>x[B]</body>",
            ),
            // The form that is open where the banner goes counts.
            ("<p>x</body><form>", "<p>x[B]</body><form>"),
            // A template's forms are its own: a `</form>` in one leaves
            // the page's form open, and a `<form>` in one opens none.
            (
                "<form><template></form></template><p>x</body>",
                "<form><template></form></template><p>x</form>[B]</body>",
            ),
            (
                "<template><form></template><p>x</body>",
                "<template><form></template><p>x[B]</body>",
            ),
        ] {
            assert_eq!(placed(page), placed_as, "{page}");
            // A real parser keeps the banner's form as a form of its own
            // (it drops a `<form>` met while another is open).
            assert_injected_once(
                page,
                "<div><form id=\"stop\"><button>Stop</button></form></div>",
                "form#stop button",
            );
        }
    }

    #[test]
    fn a_form_end_tag_leaves_an_svg_inside_it_open() {
        // `</form>` takes the form off the elements open and leaves the svg
        // in it open: the `<style>` after is the svg's, not raw text, and
        // its `<!--` opens a comment that runs to the end of the page. A
        // `</div>` after that ends the div the form was in, and the svg.
        for page in [
            "<body><form><svg><path></form><style>/*<!--*/</style><p>x</p></body>",
            "<body><div><form><svg><path></form></div><script>a('<!--')</script><p>x</p></body>",
        ] {
            assert_banner_is_an_element(page);
        }
    }

    #[test]
    fn a_c1_control_is_shown_as_replaced_not_as_a_windows_1252_character() {
        // `&#153;` would read as "™", `&#133;` as "…".
        let html = super::ascii_only("<p id=n>Ann\u{99}\u{85} é</p>".into());
        assert_eq!(html, "<p id=n>Ann&#65533;&#65533; &#233;</p>");
        let dom = scraper::Html::parse_fragment(&html);
        let shown: String = dom.root_element().text().collect();
        assert_eq!(shown, "Ann\u{FFFD}\u{FFFD} é");
    }

    #[test]
    fn attribute_values_are_text() {
        // Quoted, a customer's text in an attribute is no markup, whatever
        // it holds: the banner goes before the real `</body>`.
        for tag in [
            "<p title=\"I <3 it <!-- see\">",
            "<img alt='<script'>",
            "<div data-note = \"</body> and <plaintext>\">",
            "<input value=\"a > b\" title='<title>'>",
        ] {
            let page = format!("{tag}<p>x</p></body>");
            assert_eq!(placed(&page), format!("{tag}<p>x</p>[B]</body>"), "{tag}");
        }
        // Only quoted, with no `</body>` outside it: appended.
        let page = "<div data-x=\"</body>\"></div>";
        assert_eq!(placed(page), format!("{page}[B]"));
        // A script's own attributes are not its text.
        assert_eq!(
            placed("<script data-x=\"</script>\">a()</script><p>x</p></body>"),
            "<script data-x=\"</script>\">a()</script><p>x</p>[B]</body>"
        );
        // Unquoted values, and a tag left open at the end of the page.
        assert_eq!(
            placed("<a href=/x>y</a></body><div title=\"open"),
            "<a href=/x>y</a>[B]</body><div title=\"open"
        );
        assert_eq!(
            placed("<p>x</p><div title=\"open"),
            "<p>x</p>[B]<div title=\"open"
        );
    }

    #[test]
    fn every_element_browsers_read_as_text_is_passed_over() {
        for name in [
            "title", "xmp", "iframe", "noscript", "noembed", "noframes", "TiTlE",
        ] {
            let page = format!("<p>x</p></body><{name}>a </body> <script b</{name}>");
            assert_eq!(
                placed(&page),
                format!("<p>x</p>[B]</body><{name}>a </body> <script b</{name}>"),
                "{name}"
            );
            // Left open, with no `</body>` before it: before it.
            let page = format!("<p>x</p><{name} class=\"q\">a </body>");
            assert_eq!(
                placed(&page),
                format!("<p>x</p>[B]<{name} class=\"q\">a </body>"),
                "{name}"
            );
        }
    }

    #[test]
    fn many_quoted_body_ends_still_find_the_real_one() {
        // Scripts after the body that quote `</body>`, more than any
        // fixed number of tries from the end would pass over.
        let quoted = "<script>\"</body>\"</script>".repeat(40);
        let page = format!("<p>x</p></body>{quoted}</html>");
        assert_eq!(placed(&page), format!("<p>x</p>[B]</body>{quoted}</html>"));
    }
}
