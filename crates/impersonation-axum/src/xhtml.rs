//! The banner in an XHTML page (`application/xhtml+xml`), which a browser
//! parses as XML: the banner's markup is well-formed XML, carries the
//! XHTML namespace, and goes before the body's end tag. Nothing may follow
//! an XML document's root element, so a page whose body's end tag cannot
//! be found is served without the banner rather than broken.

/// The XHTML namespace, declared on the banner's root element: a page may
/// bind XHTML to a prefix (`<h:html xmlns:h=…>`) and leave unprefixed
/// elements in no namespace, where a browser would not render them as HTML.
const XHTML_NS: &str = "http://www.w3.org/1999/xhtml";

/// The banner's markup for an XHTML page: the HTML fragment (well-formed
/// XML: its one void element closes itself, its text and attributes use
/// only XML's entities and numeric references) with the namespace declared
/// on its root.
pub(crate) fn banner(html_banner: &str) -> String {
    match html_banner.strip_prefix("<div ") {
        Some(rest) => format!("<div xmlns=\"{XHTML_NS}\" {rest}"),
        None => html_banner.to_owned(),
    }
}

/// The page with the banner before its body's end tag (an empty body
/// written `<body/>` is opened and closed around it), or `None` when there
/// is none that is markup.
pub(crate) fn inject(xml: &[u8], banner: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(xml.len() + banner.len() + 16);
    match body_end(xml)? {
        Place::Before(at) => {
            out.extend_from_slice(&xml[..at]);
            out.extend_from_slice(banner.as_bytes());
            out.extend_from_slice(&xml[at..]);
        }
        Place::Empty { slash, end, name } => {
            out.extend_from_slice(&xml[..slash]);
            out.push(b'>');
            out.extend_from_slice(banner.as_bytes());
            out.extend_from_slice(b"</");
            out.extend_from_slice(name);
            out.push(b'>');
            out.extend_from_slice(&xml[end..]);
        }
    }
    Some(out)
}

/// Where the banner goes.
#[derive(Debug, PartialEq, Eq)]
enum Place<'a> {
    /// Before the body's end tag, which starts here.
    Before(usize),
    /// Into an empty body, `<body/>`: its `/` is at `slash`, the tag ends
    /// before `end`, and its name (with any prefix) is `name`.
    Empty {
        slash: usize,
        end: usize,
        name: &'a [u8],
    },
}

/// A tag's name: from after `<` or `</` to the first space, `/` or `>`.
fn tag_name(after_lt: &[u8]) -> &[u8] {
    let len = after_lt
        .iter()
        .position(|b| b.is_ascii_whitespace() || matches!(b, b'>' | b'/'))
        .unwrap_or(after_lt.len());
    &after_lt[..len]
}

/// Whether a name, with or without a prefix, is `body`.
fn is_body(name: &[u8]) -> bool {
    name.rsplit(|&b| b == b':').next() == Some(b"body".as_slice())
}

/// The encoding an XML declaration at the page's start names
/// (`<?xml version="1.0" encoding="ISO-2022-JP"?>`), in lower case, after
/// a UTF-8 byte-order mark if any.
pub(crate) fn declared_encoding(xml: &[u8]) -> Option<String> {
    let xml = xml.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(xml);
    if !xml.starts_with(b"<?xml") {
        return None;
    }
    let decl = &xml[..find(xml, b"?>")?];
    let at = find(decl, b"encoding")? + b"encoding".len();
    let rest = decl[at..]
        .trim_ascii_start()
        .strip_prefix(b"=")?
        .trim_ascii_start();
    let (&quote, rest) = rest.split_first()?;
    if !matches!(quote, b'"' | b'\'') {
        return None;
    }
    let value = &rest[..rest.iter().position(|&b| b == quote)?];
    Some(String::from_utf8_lossy(value).to_ascii_lowercase())
}

/// Where `needle` starts in `text`.
fn find(text: &[u8], needle: &[u8]) -> Option<usize> {
    text.windows(needle.len()).position(|w| w == needle)
}

/// The end of a tag starting at `text[0]` (`<`): the index after its `>`,
/// past quoted attribute values (which may hold a `>`), as the HTML
/// scanner reads a tag.
fn tag_end(text: &[u8]) -> Option<usize> {
    crate::banner::tag_end(text).map(|gt| gt + 1)
}

/// The end of a document type declaration at `text[0]`: past its internal
/// subset (`[…]`), whose comments and processing instructions are passed
/// over whole, and quoted literals, any of which may hold a `>`.
fn doctype_end(text: &[u8]) -> Option<usize> {
    let (mut quote, mut depth) = (None, 0_usize);
    let mut i = 2;
    while let Some(&b) = text.get(i) {
        match (quote, b) {
            (Some(q), _) if b == q => quote = None,
            (Some(_), _) => {}
            (None, b'<') if depth > 0 && text[i..].starts_with(b"<!--") => {
                i += 4 + find(&text[i + 4..], b"-->")? + 3;
                continue;
            }
            (None, b'<') if depth > 0 && text[i..].starts_with(b"<?") => {
                i += 2 + find(&text[i + 2..], b"?>")? + 2;
                continue;
            }
            (None, b'"' | b'\'') => quote = Some(b),
            (None, b'[') => depth += 1,
            (None, b']') => depth = depth.saturating_sub(1),
            (None, b'>') if depth == 0 => return Some(i + 1),
            _ => {}
        }
        i += 1;
    }
    None
}

/// Where the banner goes: before the end tag of the root element's `body`
/// child (`</body>`, or `</h:body>` under a prefix; XML names are
/// case-sensitive), or into that child written empty (`<body/>`). Elements
/// are followed by depth, so a `body` of another vocabulary deeper in (an
/// XHTML 1.0 frameset's `<noframes><body>`) is not taken for it; comments,
/// CDATA sections, processing instructions and the document type
/// declaration are passed over. A construct left open ends the search.
fn body_end(xml: &[u8]) -> Option<Place<'_>> {
    let mut found = None;
    // Elements open around the scan: the root is depth 1.
    let mut depth = 0_usize;
    let mut i = 0;
    while let Some(lt) = xml[i..].iter().position(|&b| b == b'<') {
        let at = i + lt;
        let rest = &xml[at..];
        let skip = if rest.starts_with(b"<!--") {
            find(&rest[4..], b"-->").map(|e| 4 + e + 3)
        } else if rest.starts_with(b"<![CDATA[") {
            find(&rest[9..], b"]]>").map(|e| 9 + e + 3)
        } else if rest.starts_with(b"<?") {
            find(&rest[2..], b"?>").map(|e| 2 + e + 2)
        } else if rest.starts_with(b"<!") {
            doctype_end(rest)
        } else if let Some(close) = rest.strip_prefix(b"</") {
            if depth == 2 && is_body(tag_name(close)) {
                found = Some(Place::Before(at));
            }
            depth = depth.saturating_sub(1);
            tag_end(rest)
        } else {
            let end = tag_end(rest);
            let name = tag_name(&rest[1..]);
            match end {
                // An empty element, `<body/>` when it is the root's child.
                Some(end) if end >= 2 && rest[end - 2] == b'/' => {
                    let place = Place::Empty {
                        slash: at + end - 2,
                        end: at + end,
                        name,
                    };
                    found = (depth == 1 && is_body(name)).then_some(place).or(found);
                }
                Some(_) => depth += 1,
                None => {}
            }
            end
        };
        match skip {
            Some(n) => i = at + n,
            None => break,
        }
    }
    found
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use proptest::prelude::*;

    const BANNER: &str = "<div id=\"impersonation-banner\" role=\"alert\"><form method=\"post\" action=\"/stop\"><input type=\"hidden\" name=\"csrf\" value=\"t\" /><button type=\"submit\">Stop</button></form></div>";

    /// The banner's element as a real XML parser reads the result: its
    /// parent's name and namespace, or why the result is not XML.
    fn banner_parent(xml: &str) -> Result<(String, Option<String>), String> {
        let doc = roxmltree::Document::parse_with_options(
            xml,
            roxmltree::ParsingOptions {
                allow_dtd: true,
                ..roxmltree::ParsingOptions::default()
            },
        )
        .map_err(|e| e.to_string())?;
        let banner = doc
            .descendants()
            .find(|n| n.attribute("id") == Some("impersonation-banner"))
            .ok_or("no banner element")?;
        let parent = banner.parent_element().ok_or("no parent")?;
        if banner.tag_name().namespace() != Some(XHTML_NS) {
            return Err(format!("banner in {:?}", banner.tag_name().namespace()));
        }
        Ok((
            parent.tag_name().name().to_owned(),
            parent.tag_name().namespace().map(str::to_owned),
        ))
    }

    #[test]
    fn the_banner_goes_before_the_bodys_end_tag_as_markup() {
        let banner = super::banner(BANNER);
        for page in [
            "<html xmlns=\"http://www.w3.org/1999/xhtml\"><body><p>x</p></body></html>",
            "<?xml version=\"1.0\"?>\n<!DOCTYPE html [ <!ENTITY e \"x ]> y\"> <!-- ]> </body> --> ]>\
             <html xmlns=\"http://www.w3.org/1999/xhtml\"><body><p title='a > b'>&e;</p>\
             <!-- </body> --><![CDATA[ </body> ]]><?pi </body> ?></body></html>",
            "<h:html xmlns:h=\"http://www.w3.org/1999/xhtml\"><h:body><h:p>x</h:p></h:body></h:html>",
            "<html xmlns=\"http://www.w3.org/1999/xhtml\"><body/></html>",
            "<h:html xmlns:h=\"http://www.w3.org/1999/xhtml\"><h:body class='a/b' /></h:html>",
            "<!DOCTYPE html [<!-- Olive's notes --><?pi a ]> b ?>]><html xmlns=\"http://www.w3.org/1999/xhtml\"><body><p>x</p></body></html>",
            "<!DOCTYPE html [<!-- ]> ' --><?pi ]> ?>]><html xmlns=\"http://www.w3.org/1999/xhtml\"><head><title>t</title></head><body><p>x</p></body></html>",
            "<html xmlns=\"http://www.w3.org/1999/xhtml\"><body><svg xmlns=\"http://www.w3.org/2000/svg\"><title>&lt;/body&gt;</title></svg></body >\n</html><!-- </body> -->",
        ] {
            let out = String::from_utf8(inject(page.as_bytes(), &banner).unwrap()).unwrap();
            assert_eq!(
                banner_parent(&out),
                Ok(("body".to_owned(), Some(XHTML_NS.to_owned()))),
                "{out}"
            );
        }
    }

    #[test]
    fn a_page_without_its_bodys_end_tag_is_left_alone() {
        for page in [
            // A comment in the doctype's subset quoting `]>` and `</body>`,
            // and an apostrophe in another.
            "<!DOCTYPE x [<!-- ]> </body> --><!-- Olive's -->]><html xmlns=\"http://www.w3.org/1999/xhtml\"><p/></html>",
            // A `body` deeper than the root's child.
            "<html xmlns=\"http://www.w3.org/1999/xhtml\"><frameset><noframes><body>x</body></noframes></frameset></html>",
            "<html xmlns=\"http://www.w3.org/1999/xhtml\"><div><body/></div></html>",
            "<html xmlns=\"http://www.w3.org/1999/xhtml\"><body><p>x</p>",
            "<html><BODY></BODY></html>",
            "<html><body><!-- </body> --></html>",
            "<svg xmlns=\"http://www.w3.org/2000/svg\"/>",
            "",
        ] {
            assert_eq!(inject(page.as_bytes(), BANNER), None, "{page}");
        }
    }

    #[test]
    fn the_xml_declaration_names_the_encoding() {
        for (page, encoding) in [
            (
                "<?xml version=\"1.0\" encoding=\"ISO-2022-JP\"?><html/>",
                Some("iso-2022-jp"),
            ),
            (
                "\u{FEFF}<?xml version='1.0' encoding = 'UTF-8' ?><html/>",
                Some("utf-8"),
            ),
            ("<?xml version=\"1.0\"?><html/>", None),
            ("<html/>", None),
            ("<?xml version=\"1.0\" encoding=\"x", None),
        ] {
            assert_eq!(
                declared_encoding(page.as_bytes()).as_deref(),
                encoding,
                "{page}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, rng_seed: proptest::test_runner::RngSeed::Fixed(34), ..ProptestConfig::default() })]

        /// A page of comments, CDATA, instructions, quoted attributes and
        /// elements, all quoting `</body>`: wherever the banner goes, a
        /// real parser finds it as the body's last child, the page still XML.
        #[test]
        fn a_real_parser_finds_the_banner_in_the_body(
            before in proptest::collection::vec(piece(), 0..6),
            after in proptest::collection::vec(outside(), 0..3),
        ) {
            let page = format!(
                "<?xml version=\"1.0\"?><html xmlns=\"http://www.w3.org/1999/xhtml\"><head><title>t</title></head><body>{}</body></html>{}",
                before.concat(),
                after.concat()
            );
            let banner = super::banner(BANNER);
            let out = String::from_utf8(inject(page.as_bytes(), &banner).unwrap()).unwrap();
            prop_assert_eq!(
                banner_parent(&out),
                Ok(("body".to_owned(), Some(XHTML_NS.to_owned()))),
                "{}", out
            );
            let doc = roxmltree::Document::parse(&out).unwrap();
            let body = doc.descendants().find(|n| n.has_tag_name((XHTML_NS, "body"))).unwrap();
            let last = body.last_element_child().unwrap();
            prop_assert_eq!(last.attribute("id"), Some("impersonation-banner"));
        }
    }

    /// Content of the body that quotes the body's end tag.
    fn piece() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("<p>x</p>".to_owned()),
            Just("<!-- </body> -->".to_owned()),
            Just("<![CDATA[ </body> <p> ]]>".to_owned()),
            Just("<?php echo '</body>'; ?>".to_owned()),
            Just("<p title=\"a > b\">y</p><p title='&lt;/body>'/>".to_owned()),
            Just("<script><![CDATA[ if (a < b) document.write('</body>'); ]]></script>".to_owned()),
            Just("&lt;/body&gt;".to_owned()),
            Just(
                "<svg xmlns=\"http://www.w3.org/2000/svg\"><desc>&lt;/body&gt;</desc></svg>"
                    .to_owned()
            ),
        ]
    }

    /// What may follow the root element: comments and instructions.
    fn outside() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("<!-- </body> -->".to_owned()),
            Just("<?pi </body> ?>".to_owned()),
            Just("\n".to_owned()),
        ]
    }
}
