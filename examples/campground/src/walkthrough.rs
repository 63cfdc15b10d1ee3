//! `cargo xtask demo --walkthrough`: the demo's story played over HTTP
//! against a running demo, the way a browser would (cookies, forms, CSRF
//! tokens read from the pages), ending with the audit table.

use std::io::Write;

use anyhow::{Context as _, Result, bail};
use reqwest::StatusCode;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// One person's browser: its own cookie jar, the last CSRF token it saw.
struct Browser {
    client: reqwest::Client,
    base: String,
    csrf: String,
}

/// A page as fetched.
struct Page {
    status: StatusCode,
    path: String,
    body: String,
}

impl Page {
    fn has_banner(&self) -> bool {
        self.body.contains("id=\"impersonation-banner\"")
    }

    /// The text of the first element whose opening tag contains `marker`.
    fn text_of(&self, marker: &str) -> Option<String> {
        let at = self.body.find(marker)?;
        let open_end = at + self.body[at..].find('>')? + 1;
        let rest = &self.body[open_end..];
        // The element's text up to its matching close; nested tags removed.
        let mut depth = 0usize;
        let mut text = String::new();
        let mut chars = rest.char_indices();
        while let Some((i, c)) = chars.next() {
            if c == '<' {
                let tag = &rest[i..];
                if tag.starts_with("</") {
                    if depth == 0 {
                        break;
                    }
                    depth -= 1;
                } else if !tag.starts_with("<input") && !tag.starts_with("<br") {
                    depth += 1;
                }
                for (_, c) in chars.by_ref() {
                    if c == '>' {
                        break;
                    }
                }
            } else {
                text.push(c);
            }
        }
        Some(html_escape::decode_html_entities(text.trim()).into_owned())
    }
}

/// A client for the demo this process serves on loopback: no proxy (one
/// set for the machine's downloads, `http_proxy`, would otherwise carry
/// these requests too, and fail them), and a bound on each request, so
/// that a stuck server fails the walkthrough instead of hanging it.
fn demo_client() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(30))
}

impl Browser {
    fn new(base: &str) -> Result<Self> {
        Ok(Self {
            client: demo_client().cookie_store(true).build()?,
            base: base.trim_end_matches('/').to_owned(),
            csrf: String::new(),
        })
    }

    fn remember_csrf(&mut self, body: &str) {
        let marker = "name=\"csrf\" value=\"";
        if let Some(at) = body.find(marker) {
            let rest = &body[at + marker.len()..];
            if let Some(end) = rest.find('"') {
                self.csrf = rest[..end].to_owned();
            }
        }
    }

    async fn finish(&mut self, res: reqwest::Response) -> Result<Page> {
        let status = res.status();
        let path = res.url().path().to_owned();
        let body = res.text().await?;
        self.remember_csrf(&body);
        Ok(Page { status, path, body })
    }

    async fn get(&mut self, path: &str) -> Result<Page> {
        let res = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        self.finish(res).await
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Result<Page> {
        let mut fields: Vec<(&str, &str)> = form.to_vec();
        let csrf = self.csrf.clone();
        fields.push(("csrf", &csrf));
        let res = self
            .client
            .post(format!("{}{path}", self.base))
            .form(&fields)
            .send()
            .await
            .with_context(|| format!("POST {path}"))?;
        self.finish(res).await
    }

    async fn sign_in(base: &str, user: &str) -> Result<Self> {
        let mut b = Self::new(base)?;
        b.get("/").await?;
        let page = b.post("/signin", &[("user", user)]).await?;
        if page.status != StatusCode::OK {
            bail!("signing in as {user} gave {}", page.status);
        }
        Ok(b)
    }

    async fn start(&mut self, target: &str, reason: &str, ticket: &str) -> Result<Page> {
        self.get("/support").await?;
        self.post(
            "/impersonation/start",
            &[
                ("target", target),
                ("reason", reason),
                ("ticket", ticket),
                ("return_to", "/dashboard"),
                ("error_to", "/support"),
            ],
        )
        .await
    }
}

struct Out<'a, W: Write> {
    out: &'a mut W,
    color: bool,
    step: u32,
}

impl<W: Write> Out<'_, W> {
    fn step(&mut self, title: &str) -> Result<()> {
        self.step += 1;
        let line = format!("{}. {title}", self.step);
        if self.color {
            writeln!(self.out, "\n\x1b[1m{line}\x1b[0m")?;
        } else {
            writeln!(self.out, "\n{line}")?;
        }
        Ok(())
    }

    fn line(&mut self, text: &str) -> Result<()> {
        writeln!(self.out, "   {text}")?;
        Ok(())
    }
}

fn expect(page: &Page, status: StatusCode, what: &str) -> Result<()> {
    if page.status != status {
        bail!(
            "{what}: expected {status}, got {} at {}",
            page.status,
            page.path
        );
    }
    Ok(())
}

/// A page answered 200 with the banner on it, as after a start.
fn expect_banner(page: &Page, what: &str) -> Result<()> {
    expect(page, StatusCode::OK, what)?;
    if !page.has_banner() {
        bail!("no banner after {what}");
    }
    Ok(())
}

/// A page that must be free of the banner (its session over).
fn no_banner(page: &Page, what: &str) -> Result<()> {
    if page.has_banner() {
        bail!("the banner is still shown after {what}");
    }
    Ok(())
}

/// The support console's refusal on `page`, which must give `code`.
fn refusal(page: &Page, code: &str) -> Result<String> {
    let text = page
        .text_of("id=\"denied\"")
        .context("a refusal is shown")?;
    if !text.contains(&format!("({code})")) {
        bail!("refused, but not for {code}: {text}");
    }
    Ok(text)
}

/// The session ids in the live-sessions rows naming `agent`.
fn live_sessions_of(page: &Page, agent: &str) -> Vec<String> {
    page.body
        .split("<tr>")
        .filter(|row| row.starts_with(&format!("<td>{agent}</td>")))
        .filter_map(|row| {
            let marker = "name=\"session\" value=\"";
            let at = row.find(marker)? + marker.len();
            let end = row[at..].find('"')?;
            Some(row[at..at + end].to_owned())
        })
        .collect()
}

/// The session id in the live-sessions row naming both people.
fn live_session(page: &Page, agent: &str, customer: &str) -> Option<String> {
    page.body.split("<tr>").find_map(|row| {
        if !(row.contains(agent) && row.contains(customer)) {
            return None;
        }
        let marker = "name=\"session\" value=\"";
        let at = row.find(marker)? + marker.len();
        let end = row[at..].find('"')?;
        Some(row[at..at + end].to_owned())
    })
}

/// Plays the story against the demo at `base` (e.g. `http://127.0.0.1:3000`).
pub async fn run(base: &str, out: &mut impl Write, color: bool) -> Result<()> {
    let mut o = Out {
        out,
        color,
        step: 0,
    };
    writeln!(o.out, "Campground Cloud walkthrough over HTTP at {base}")?;

    // A session of Sam's or Lee's left running on a persistent store (by
    // an earlier run, or by someone trying the demo) would refuse their
    // starts (one live session per agent); the admin ends them first.
    let mut ada = Browser::sign_in(base, "ada").await?;
    let console = ada.get("/support").await?;
    expect(&console, StatusCode::OK, "the admin's console")?;
    for agent in ["Sam Support", "Lee Lead"] {
        for id in live_sessions_of(&console, agent) {
            let page = ada.post("/support/revoke", &[("session", &id)]).await?;
            expect(&page, StatusCode::OK, "ending a session left running")?;
            writeln!(o.out, "(ended a session of {agent}'s left running before)")?;
        }
    }
    // The table at the end shows the story from here, not the clean-up
    // (the demo serves on this machine: one clock).
    let since = OffsetDateTime::now_utc().format(&Rfc3339)?;

    o.step("Sam Support (ordinary agent) signs in and opens the support console")?;
    let mut sam = Browser::sign_in(base, "sam").await?;
    let console = sam.get("/support?q=pinewood").await?;
    expect(&console, StatusCode::OK, "support console")?;
    o.line(&format!(
        "searching \"pinewood\": {} customers he may impersonate",
        console
            .body
            .matches("action=\"/impersonation/start\"")
            .count()
    ))?;

    o.step("Sam tries to impersonate Ada Admin: refused, and audited")?;
    let page = sam
        .start("ada", "Checking the admin settings page", "SUP-1040")
        .await?;
    o.line(&refusal(&page, "protected_role")?)?;

    o.step("Sam tries Paula Partner, who holds a permission he lacks: refused")?;
    let page = sam
        .start("paula", "Partner cannot open the report", "SUP-1041")
        .await?;
    o.line(&refusal(&page, "escalation")?)?;

    o.step("Sam starts impersonating Olive Owner, with a reason and a ticket")?;
    let page = sam
        .start("olive", "Olive cannot see next week's bookings", "SUP-1042")
        .await?;
    expect_banner(&page, "Sam's start")?;
    o.line(&format!(
        "banner: \"{}\" · reason: {} · {} left",
        page.text_of("class=\"impersonation-message\"")
            .unwrap_or_default(),
        page.text_of("class=\"impersonation-reason\"")
            .unwrap_or_default(),
        page.text_of("class=\"impersonation-time-left\"")
            .unwrap_or_default(),
    ))?;
    o.line(&format!(
        "dashboard as {}: {} bookings at Pinewood",
        page.text_of("id=\"effective-user\"").unwrap_or_default(),
        page.body.matches("<tr><td>").count()
    ))?;

    o.step("Sam adds a booking for Olive (a modification, audited)")?;
    let page = sam
        .post(
            "/bookings",
            &[
                ("guest", "K. Lindqvist"),
                ("site", "Pitch 4"),
                ("arrival", "2026-12-08"),
                ("nights", "2"),
            ],
        )
        .await?;
    expect(&page, StatusCode::OK, "add booking")?;
    o.line(&format!(
        "dashboard now lists {} bookings",
        page.body.matches("<tr><td>").count()
    ))?;

    o.step("Olive's profile as the shadow user shows it")?;
    let page = sam.get("/profile").await?;
    expect_banner(&page, "Olive's profile")?;
    let (email, phone, card) = (
        page.text_of("id=\"email\"").unwrap_or_default(),
        page.text_of("id=\"phone\"").unwrap_or_default(),
        page.text_of("id=\"card\"").unwrap_or_default(),
    );
    // The projection's rules, as the shadow user holds them: contact
    // data redacted, the card masked to its last digits.
    if phone != "[redacted]" || email != "[redacted]" {
        bail!("Olive's contact data reached the shadow user: {email} / {phone}");
    }
    if card.matches(|c: char| c.is_ascii_digit()).count() > 4 {
        bail!("Olive's card reached the shadow user unmasked: {card}");
    }
    o.line(&format!("email: {email}"))?;
    o.line(&format!("phone: {phone}"))?;
    o.line(&format!("card on file: {card}"))?;

    o.step("Billing and the password change are refused while impersonating")?;
    let page = sam.get("/billing").await?;
    expect(&page, StatusCode::FORBIDDEN, "billing")?;
    o.line(&format!(
        "GET /billing → {}: {}",
        page.status,
        page.text_of("id=\"refused\"").unwrap_or_default()
    ))?;
    let page = sam
        .post(
            "/profile/password",
            &[("password", "correct horse battery staple")],
        )
        .await?;
    expect(&page, StatusCode::FORBIDDEN, "password change")?;
    o.line(&format!("POST /profile/password → {}", page.status))?;

    o.step("The status endpoint (JSON) for scripts and single-page apps")?;
    let page = sam.get("/impersonation/status").await?;
    let status: serde_json::Value = serde_json::from_str(&page.body)?;
    o.line(&format!(
        "impersonating: {}, subject: {}, seconds left: {}",
        status["impersonating"], status["subject"]["name"], status["seconds_left"]
    ))?;

    o.step("Sam stops: the banner is gone")?;
    let page = sam.post("/impersonation/stop", &[]).await?;
    expect(&page, StatusCode::OK, "stop")?;
    no_banner(&page, "Sam's stop")?;
    o.line(&format!(
        "after stop: {} at {}, banner shown: {}",
        page.status,
        page.path,
        page.has_banner()
    ))?;

    o.step("Lee Lead (support lead) impersonates Paula Partner, who manages two campgrounds")?;
    let mut lee = Browser::sign_in(base, "lee").await?;
    let page = lee
        .start(
            "paula",
            "Partner report shows the wrong campground",
            "SUP-1043",
        )
        .await?;
    expect_banner(&page, "Lee's start")?;
    o.line(&format!(
        "banner: \"{}\"; dashboard shows {} campgrounds",
        page.text_of("class=\"impersonation-message\"")
            .unwrap_or_default(),
        page.body.matches("<div class=\"card\"><h2>").count()
    ))?;

    o.step("Ada Admin revokes Lee's session from her console; Lee's next request has no banner")?;
    let console = ada.get("/support").await?;
    let id =
        live_session(&console, "Lee Lead", "Paula Partner").context("Lee's session is listed")?;
    let page = ada.post("/support/revoke", &[("session", &id)]).await?;
    expect(&page, StatusCode::OK, "revoke")?;
    let page = lee.get("/dashboard").await?;
    no_banner(&page, "Ada's revoke")?;
    o.line(&format!(
        "Lee's next page: {}, banner shown: {}",
        page.status,
        page.has_banner()
    ))?;

    o.step("Sam impersonates Olive again; Olive changes her password, which ends it")?;
    let page = sam
        .start("olive", "Olive asked us to check her settings", "SUP-1045")
        .await?;
    expect_banner(&page, "Sam's second start")?;
    let mut olive = Browser::sign_in(base, "olive").await?;
    let page = olive
        .post("/profile/password", &[("password", "a longer passphrase")])
        .await?;
    expect(&page, StatusCode::OK, "password change")?;
    let page = sam.get("/dashboard").await?;
    no_banner(&page, "Olive's password change")?;
    o.line(&format!(
        "Sam's next page: {}, banner shown: {}",
        page.status,
        page.has_banner()
    ))?;

    o.step("Sam's API client gets Sam's own access token from the identity provider (/idp)")?;
    let page = sam.post("/idp/token", &[]).await?;
    expect(&page, StatusCode::OK, "provider token")?;
    let own: serde_json::Value = serde_json::from_str(&page.body)?;
    let own = own["access_token"]
        .as_str()
        .context("an access token")?
        .to_owned();
    o.line(&format!(
        "a JWT for sub \"{}\", audience {base}/api",
        claims_of(&own)?["sub"].as_str().unwrap_or_default()
    ))?;

    o.step(
        "It exchanges that token for an impersonation token for Olive (RFC 8693, POST /oidc/token)",
    )?;
    let api = demo_client().build()?;
    let audience = format!("{base}/api");
    let exchanged = api
        .post(format!("{base}/oidc/token"))
        .basic_auth(crate::api::CLIENT_ID, Some(crate::api::CLIENT_SECRET))
        .form(&[
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("actor_token", own.as_str()),
            (
                "actor_token_type",
                "urn:ietf:params:oauth:token-type:access_token",
            ),
            ("requested_subject", "olive"),
            ("audience", audience.as_str()),
            ("reason", "Olive's booking sync fails through the API"),
            ("ticket", "SUP-1044"),
        ])
        .send()
        .await?;
    let status = exchanged.status();
    let body: serde_json::Value = serde_json::from_str(&exchanged.text().await?)?;
    if status != StatusCode::OK {
        bail!("token exchange: {status}: {body}");
    }
    let token = body["access_token"]
        .as_str()
        .context("an impersonation token")?
        .to_owned();
    let claims = claims_of(&token)?;
    o.line(&format!(
        "{status}: {} token, expires in {} s, no refresh token",
        body["token_type"].as_str().unwrap_or_default(),
        body["expires_in"]
    ))?;
    o.line(&format!(
        "claims: sub \"{}\", act {{sub: \"{}\"}}, sid {}",
        claims["sub"].as_str().unwrap_or_default(),
        claims["act"]["sub"].as_str().unwrap_or_default(),
        claims["sid"].as_str().unwrap_or_default()
    ))?;

    o.step("The client calls the API with it: Olive's bookings, Sam beside (GET /api/bookings)")?;
    let call = |bearer: String| {
        let api = api.clone();
        let url = format!("{base}/api/bookings");
        async move {
            let res = api.get(url).bearer_auth(bearer).send().await?;
            let status = res.status();
            let text = res.text().await?;
            anyhow::Ok((status, text))
        }
    };
    let (status, text) = call(token.clone()).await?;
    let listing: serde_json::Value = serde_json::from_str(&text)?;
    o.line(&format!(
        "{status}: as {} (impersonated by {}), {} bookings",
        listing["name"].as_str().unwrap_or_default(),
        listing["impersonated_by"].as_str().unwrap_or("nobody"),
        listing["bookings"].as_array().map_or(0, Vec::len)
    ))?;
    if status != StatusCode::OK || listing["impersonated_by"].as_str().is_none() {
        bail!("the impersonation token was not served as Olive, Sam beside: {status} {text}");
    }
    let (status, text) = call(own.clone()).await?;
    if status != StatusCode::OK {
        bail!("Sam's own token was refused: {status} {text}");
    }
    let listing: serde_json::Value = serde_json::from_str(&text)?;
    o.line(&format!(
        "with Sam's own token instead: {status}, as {}, {} bookings",
        listing["name"].as_str().unwrap_or_default(),
        listing["bookings"].as_array().map_or(0, Vec::len)
    ))?;

    o.step("The client revokes the token (POST /oidc/revoke): the next call gets 401")?;
    let revoked = api
        .post(format!("{base}/oidc/revoke"))
        .basic_auth(crate::api::CLIENT_ID, Some(crate::api::CLIENT_SECRET))
        .form(&[("token", token.as_str())])
        .send()
        .await?;
    let (status, _) = call(token.clone()).await?;
    o.line(&format!(
        "revocation: {}; the same token next: {status}",
        revoked.status()
    ))?;
    if status != StatusCode::UNAUTHORIZED {
        bail!("a revoked token still worked: {status}");
    }

    o.step("Ada verifies the audit chains")?;
    let page = ada.post("/audit/verify", &[]).await?;
    let verified = page
        .text_of("id=\"verified\"")
        .context("a verification result")?;
    if !verified.starts_with('✓') {
        bail!("the audit chains did not verify: {verified}");
    }
    o.line(&verified)?;

    o.step("The audit trail of this walkthrough")?;
    let table = ada.get(&format!("/audit.txt?since={since}")).await?;
    expect(&table, StatusCode::OK, "audit table")?;
    writeln!(o.out, "\n{}", table.body)?;
    Ok(())
}

/// A JWT's claims, decoded for display (the server verified them).
fn claims_of(token: &str) -> Result<serde_json::Value> {
    use base64::Engine;
    let payload = token.split('.').nth(1).context("a JWT has three parts")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?;
    Ok(serde_json::from_slice(&bytes)?)
}
