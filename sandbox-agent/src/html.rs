//! A fetched page turned into text inside the sandbox, where a hostile page reaches
//! nothing. One pass, no tree, no recursion: tags are dropped (block tags become line
//! breaks), `script`, `style`, `noscript`, `template` and comments are skipped whole, a
//! few character references are decoded, and the text is cut at [`MAX_TEXT_BYTES`].

/// Most bytes of text kept from one page.
pub(crate) const MAX_TEXT_BYTES: usize = 32 * 1024;

const SKIPPED: [&str; 4] = ["script", "style", "noscript", "template"];
const BLOCKS: [&str; 16] = [
    "p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article",
    "header", "footer", "table",
];

/// The text of `page`, and whether it was cut.
pub(crate) fn text(page: &[u8]) -> (String, bool) {
    let page = String::from_utf8_lossy(page);
    let lower = page.to_ascii_lowercase();
    let bytes = page.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    let mut cut = false;
    while i < bytes.len() {
        if out.len() >= MAX_TEXT_BYTES {
            cut = true;
            break;
        }
        if bytes[i] == b'<' {
            if lower[i..].starts_with("<!--") {
                i = lower[i..].find("-->").map_or(bytes.len(), |e| i + e + 3);
                continue;
            }
            let name: String = lower[i + 1..]
                .chars()
                .skip_while(|c| *c == '/')
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect();
            let close = lower[i..].find('>').map_or(bytes.len(), |e| i + e + 1);
            if SKIPPED.contains(&name.as_str()) && !lower[i + 1..].starts_with('/') {
                let end = format!("</{name}");
                i = lower[close..].find(&end).map_or(bytes.len(), |e| close + e);
                i = lower[i..].find('>').map_or(bytes.len(), |e| i + e + 1);
                continue;
            }
            if BLOCKS.contains(&name.as_str()) && !out.ends_with('\n') {
                out.push('\n');
            }
            i = close;
            continue;
        }
        let next = lower[i..].find('<').map_or(bytes.len(), |e| i + e);
        let chunk = &page[i..next];
        out.push_str(&decode(chunk));
        i = next;
    }
    cut |= out.len() > MAX_TEXT_BYTES;
    let mut at = out.len().min(MAX_TEXT_BYTES);
    while !out.is_char_boundary(at) {
        at -= 1;
    }
    out.truncate(at);
    (tidy(&out), cut)
}

fn decode(s: &str) -> String {
    s.replace("&nbsp;", " ")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

/// Runs of spaces made one, lines trimmed, blank lines dropped.
fn tidy(text: &str) -> String {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_becomes_its_visible_text() {
        let page = b"<html><head><title>T</title><style>p{color:red}</style>\
            <script>steal()</script></head><body><h1>Weather</h1><p>Sunny &amp; 21&nbsp;C</p>\
            <!-- hidden --><div>Wind <b>light</b></div></body></html>";
        let (t, cut) = text(page);
        assert_eq!(t, "T\nWeather\nSunny & 21 C\nWind light");
        assert!(!cut);
    }

    #[test]
    fn hostile_pages_end_in_a_cut_never_a_hang() {
        let (t, cut) = text("x".repeat(100_000).as_bytes());
        assert!(cut && t.len() <= MAX_TEXT_BYTES);
        for page in [
            "<script>",
            "<!--",
            "<",
            "<<<<<<",
            "<style>a",
            "</script>",
            "\u{fffd}<p",
        ] {
            let _ = text(page.as_bytes());
        }
        let _ = text(&[0xff, b'<', 0xfe, b'>']);
    }
}
