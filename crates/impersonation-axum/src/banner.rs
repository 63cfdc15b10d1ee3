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
    format!(
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
    )
}

/// Inserts the banner before the last `</body>` (any case), or appends it.
pub(crate) fn inject(html: &str, banner: &str) -> String {
    let lower = html.to_ascii_lowercase();
    match lower.rfind("</body>") {
        Some(at) => {
            let mut out = String::with_capacity(html.len() + banner.len());
            out.push_str(&html[..at]);
            out.push_str(banner);
            out.push_str(&html[at..]);
            out
        }
        None => format!("{html}{banner}"),
    }
}
