//! The links of a fetched page, found on the trusted side so that the model may follow
//! one it was shown but never compose one. Deliberately small and bounded: it looks
//! only for `href` attributes (any case, quoted or not), reads at most
//! [`MAX_SCAN_BYTES`] of the page, keeps at most [`MAX_LINKS`] links of at most
//! [`MAX_LINK_BYTES`] each, resolves them against the page's URL, and keeps only
//! `https` links without credentials, fragment dropped. It builds no tree and never
//! recurses: a hostile page costs one pass over its first bytes.

use url::Url;

/// Bytes of a page looked at.
pub const MAX_SCAN_BYTES: usize = 4 * 1024 * 1024;
/// Links kept from one page.
pub const MAX_LINKS: usize = 500;
/// Longest link kept, in bytes.
pub const MAX_LINK_BYTES: usize = 2048;

/// The https links of `page`, fetched from `base`, in order, without repeats.
pub fn links(page: &[u8], base: &Url) -> Vec<Url> {
    let page = &page[..page.len().min(MAX_SCAN_BYTES)];
    let mut out: Vec<Url> = Vec::new();
    let mut i = 0;
    while out.len() < MAX_LINKS {
        let Some(at) = find_href(page, i) else { break };
        i = at + 4;
        // `href`, optional spaces, `=`, optional spaces, then the value.
        let mut j = skip_spaces(page, i);
        if page.get(j) != Some(&b'=') {
            continue;
        }
        j = skip_spaces(page, j + 1);
        let (value, next) = match page.get(j) {
            Some(q @ (b'"' | b'\'')) => {
                let start = j + 1;
                let end = page[start..]
                    .iter()
                    .take(MAX_LINK_BYTES + 1)
                    .position(|c| c == q)
                    .map(|p| start + p);
                match end {
                    Some(e) => (&page[start..e], e + 1),
                    None => continue,
                }
            }
            Some(_) => {
                let start = j;
                let end = page[start..]
                    .iter()
                    .take(MAX_LINK_BYTES + 1)
                    .position(|c| c.is_ascii_whitespace() || *c == b'>')
                    .map_or(page.len().min(start + MAX_LINK_BYTES + 1), |p| start + p);
                (&page[start..end], end)
            }
            None => break,
        };
        i = next;
        if value.len() > MAX_LINK_BYTES {
            continue;
        }
        let Ok(text) = std::str::from_utf8(value) else {
            continue;
        };
        let text = unescape(text.trim());
        let Ok(mut url) = base.join(&text) else {
            continue;
        };
        if url.scheme() != "https" || !url.username().is_empty() || url.password().is_some() {
            continue;
        }
        url.set_fragment(None);
        if !out.contains(&url) {
            out.push(url);
        }
    }
    out
}

/// The next `href` (any case) at or after `from`, preceded by a space or a quote so
/// that `data-href` and `xhref` do not count.
fn find_href(page: &[u8], from: usize) -> Option<usize> {
    let mut k = from;
    while k + 4 <= page.len() {
        if page[k..k + 4].eq_ignore_ascii_case(b"href")
            && k > 0
            && (page[k - 1].is_ascii_whitespace() || matches!(page[k - 1], b'"' | b'\''))
        {
            return Some(k);
        }
        k += 1;
    }
    None
}

fn skip_spaces(page: &[u8], mut i: usize) -> usize {
    while page.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    i
}

/// The few character references that appear in URLs.
fn unescape(s: &str) -> String {
    s.replace("&amp;", "&")
        .replace("&#38;", "&")
        .replace("&quot;", "\"")
        .replace("&#x2F;", "/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Url {
        Url::parse("https://site.test/dir/page.html?x=1").unwrap()
    }

    fn found(page: &str) -> Vec<String> {
        links(page.as_bytes(), &base())
            .into_iter()
            .map(String::from)
            .collect()
    }

    #[test]
    fn links_are_found_resolved_and_only_https_kept() {
        let page = r#"<a href="/a">x</a> <A HREF='b?q=1&amp;r=2#top'>y</A>
            <a href = https://other.test/c >z</a> <a href="http://plain.test/">no</a>
            <a href="javascript:alert(1)">no</a> <a href="https://u:p@creds.test/">no</a>
            <a data-href="/no">no</a> <link href="/a"> <a href="mailto:x@y">no</a>"#;
        assert_eq!(
            found(page),
            vec![
                "https://site.test/a",
                "https://site.test/dir/b?q=1&r=2",
                "https://other.test/c",
            ]
        );
    }

    #[test]
    fn a_hostile_page_costs_one_bounded_pass() {
        // Thousands of links: the first MAX_LINKS are kept.
        let many: String = (0..5000).map(|i| format!("<a href=\"/p{i}\">")).collect();
        let got = links(many.as_bytes(), &base());
        assert_eq!(got.len(), MAX_LINKS);
        // An unterminated quote, a link longer than the limit, a page of `href`s with
        // nothing after them, and bytes that are not UTF-8: nothing, and no panic.
        let long = format!("<a href=\"/{}\">", "x".repeat(MAX_LINK_BYTES + 10));
        for page in [
            "<a href=\"/never-closed".to_owned(),
            long,
            " href".repeat(100_000),
            " href=".to_owned(),
        ] {
            assert!(found(&page).is_empty(), "{}", &page[..page.len().min(40)]);
        }
        assert!(links(b" href=\"/\xff\xfe\"", &base()).is_empty());
    }
}
