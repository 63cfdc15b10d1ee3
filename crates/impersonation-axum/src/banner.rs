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

/// Inserts the banner before the last `</body>` (any case), or appends it.
/// The page's bytes are not decoded: the banner is pure ASCII, so it reads
/// the same in any charset that keeps ASCII as ASCII, and a page with a
/// stray invalid byte gets its banner too.
pub(crate) fn inject(html: &[u8], banner: &str) -> Vec<u8> {
    let at = html
        .windows(7)
        .rposition(|w| w.eq_ignore_ascii_case(b"</body>"))
        .unwrap_or(html.len());
    let mut out = Vec::with_capacity(html.len() + banner.len());
    out.extend_from_slice(&html[..at]);
    out.extend_from_slice(banner.as_bytes());
    out.extend_from_slice(&html[at..]);
    out
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
