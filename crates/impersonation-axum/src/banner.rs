//! The banner: "You are impersonating `<name>` (`<company>`)", escaped, with the
//! reason, the ticket, "read only" for a read-only session, the time left
//! and a Stop button.

use impersonation_core::Context;
use time::OffsetDateTime;

fn esc(text: &str) -> String {
    html_escape::encode_text(text).into_owned()
}

fn attr(text: &str) -> String {
    html_escape::encode_double_quoted_attribute(text).into_owned()
}

/// The banner as an HTML fragment, for apps that render it themselves.
/// It is `position:fixed` at the top of the viewport; give the page some top
/// padding (about 3.5em, more on narrow screens) while impersonating.
/// `stop_action` is the stop route's path; `csrf` the request's CSRF token.
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
    ascii_only(format!(
        concat!(
            "<div id=\"impersonation-banner\" role=\"alert\" aria-live=\"assertive\" ",
            "style=\"position:fixed;top:0;left:0;right:0;z-index:2147483647;display:flex;gap:1em;align-items:center;",
            "padding:.6em 1em;background:#b91c1c;color:#fff;font:600 15px/1.4 system-ui,sans-serif\">",
            "<span class=\"impersonation-message\">{message}</span>",
            "<span style=\"font-weight:400\">reason: <span class=\"impersonation-reason\">{reason}</span>{ticket}{read_only}",
            " · <span class=\"impersonation-time-left\" data-seconds-left=\"{seconds}\">{left}</span> left</span>",
            "<form method=\"post\" action=\"{action}\" style=\"margin:0 0 0 auto\">",
            "<input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">",
            "<button type=\"submit\" style=\"font:inherit;padding:.2em .8em;white-space:nowrap\">Stop impersonating</button>",
            "</form></div>"
        ),
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
pub(crate) fn inject(html: &[u8], banner: &str) -> Vec<u8> {
    let at = banner_place(html);
    let mut out = Vec::with_capacity(html.len() + banner.len());
    out.extend_from_slice(&html[..at]);
    out.extend_from_slice(banner.as_bytes());
    out.extend_from_slice(&html[at..]);
    out
}

/// Where the banner goes: before the last `</body>` that is markup, not
/// text inside a script, a style, a textarea or a comment (a customer's
/// note quoting `</body>` in a page's JSON, in a page that leaves out its
/// own `</body>`); at the end if there is none. The banner inside a
/// script would break the script and show nothing.
fn banner_place(html: &[u8]) -> usize {
    // Checked from the end; a page that quotes `</body>` more often than
    // this gets the banner appended.
    const MOST_TRIED: usize = 16;
    let mut end = html.len();
    for _ in 0..MOST_TRIED {
        let Some(at) = html[..end]
            .windows(7)
            .rposition(|w| w.eq_ignore_ascii_case(b"</body>"))
        else {
            break;
        };
        if !inside_raw_text(&html[at..]) {
            return at;
        }
        end = at;
    }
    html.len()
}

/// Whether the text from `rest` on closes a script, style, textarea or
/// comment before it opens one: `rest` then starts inside it.
fn inside_raw_text(rest: &[u8]) -> bool {
    const OPEN: [&[u8]; 4] = [b"<script", b"<style", b"<textarea", b"<!--"];
    const CLOSE: [&[u8]; 4] = [b"</script", b"</style", b"</textarea", b"-->"];
    let first = |needles: &[&[u8]]| {
        needles
            .iter()
            .filter_map(|n| {
                rest.windows(n.len())
                    .position(|w| w.eq_ignore_ascii_case(n))
            })
            .min()
    };
    match (first(&CLOSE), first(&OPEN)) {
        (Some(close), Some(open)) => close < open,
        (Some(_), None) => true,
        (None, _) => false,
    }
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
            // Writing to a String cannot fail.
            let _ = std::fmt::Write::write_fmt(&mut out, format_args!("&#{};", u32::from(c)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::inject;

    fn placed(page: &str) -> String {
        String::from_utf8(inject(page.as_bytes(), "[B]")).unwrap()
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
    }
}
