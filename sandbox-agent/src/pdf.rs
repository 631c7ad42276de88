//! Text out of a PDF the person sent, inside the sandbox, where a hostile file can
//! reach nothing. Deliberately small: it follows no object references and builds no
//! object graph. It finds every stream, inflates the Flate-encoded ones with a cap on
//! the output, and reads the text-showing operators (`Tj`, `TJ`, `'`, `"`) of the
//! content streams, in file order. Every loop is bounded by the input or by a
//! [`Limits`] field, nothing recurses, and nothing indexes past a slice's end, so a
//! file built to hang or exhaust a parser ends in a cut, never in a stall.
//!
//! What it does not read: text in fonts whose codes are not single-byte (CID fonts
//! without a simple encoding come out as whatever their bytes spell, usually
//! nothing), text in images (no OCR), and reading order beyond file order.

/// What one extraction may cost.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Content streams with text read ("pages"; a page may have more than one).
    pub(crate) max_pages: usize,
    /// Streams looked at.
    pub(crate) max_streams: usize,
    /// Bytes one stream may inflate to.
    pub(crate) max_inflated_per_stream: usize,
    /// Bytes all streams together may inflate to.
    pub(crate) max_inflated_total: usize,
    /// Bytes of text kept.
    pub(crate) max_text: usize,
    /// Time the whole extraction may take.
    pub(crate) max_time: std::time::Duration,
}

pub(crate) const LIMITS: Limits = Limits {
    max_pages: 50,
    max_streams: 4096,
    max_inflated_per_stream: 4 * 1024 * 1024,
    max_inflated_total: 16 * 1024 * 1024,
    max_text: 32 * 1024,
    max_time: std::time::Duration::from_secs(10),
};

/// The text found, and whether a limit cut it short.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Extracted {
    pub(crate) text: String,
    pub(crate) pages: usize,
    pub(crate) cut: bool,
}

/// Why no text could be had at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PdfError {
    NotAPdf,
}

pub(crate) fn text(bytes: &[u8], limits: Limits) -> Result<Extracted, PdfError> {
    if !bytes.starts_with(b"%PDF-") {
        return Err(PdfError::NotAPdf);
    }
    let mut out = Extracted {
        text: String::new(),
        pages: 0,
        cut: false,
    };
    let started = std::time::Instant::now();
    let mut inflated_total = 0usize;
    let mut streams = 0usize;
    let mut at = 0usize;
    while let Some(found) = find(bytes, b"stream", at) {
        let keyword_end = found + b"stream".len();
        at = keyword_end;
        // `endstream` contains `stream`; a real stream keyword is followed by a line end.
        let data_start = match bytes.get(keyword_end..keyword_end + 2) {
            Some(b"\r\n") => keyword_end + 2,
            Some([b'\n', _]) | Some([b'\n']) => keyword_end + 1,
            _ => continue,
        };
        if found >= 3 && &bytes[found - 3..found] == b"end" {
            continue;
        }
        streams += 1;
        if streams > limits.max_streams || started.elapsed() > limits.max_time {
            out.cut = true;
            break;
        }
        let Some(end) = find(bytes, b"endstream", data_start) else {
            break;
        };
        at = end + b"endstream".len();
        let dict = dictionary_before(bytes, found);
        let data = trim_eol(&bytes[data_start..end]);
        if contains(dict, b"/Image") || contains(dict, b"/XRef") || contains(dict, b"/ObjStm") {
            continue;
        }
        let budget = limits
            .max_inflated_per_stream
            .min(limits.max_inflated_total.saturating_sub(inflated_total));
        let content = if contains(dict, b"/FlateDecode") || contains(dict, b"/Fl ") {
            let (inflated, was_cut) = inflate(data, budget);
            inflated_total += inflated.len();
            out.cut |= was_cut;
            inflated
        } else if contains(dict, b"/Filter") {
            // Another filter (an image codec, LZW, ...): not text this reader can use.
            continue;
        } else {
            // An unfiltered stream costs its length of the same budget.
            let take = data.len().min(budget);
            inflated_total += take;
            out.cut |= take < data.len();
            data[..take].to_vec()
        };
        if !(contains(&content, b"BT") && (contains(&content, b"Tj") || contains(&content, b"TJ")))
        {
            continue;
        }
        out.pages += 1;
        read_text(&content, &mut out.text, limits.max_text);
        out.text.push('\n');
        if out.text.len() >= limits.max_text {
            out.cut = true;
            break;
        }
        if out.pages >= limits.max_pages {
            // Stop at the cap; more may follow.
            out.cut |= find(bytes, b"stream", at).is_some();
            break;
        }
        if inflated_total >= limits.max_inflated_total {
            out.cut = true;
            break;
        }
    }
    let mut cut_at = out.text.len().min(limits.max_text);
    while !out.text.is_char_boundary(cut_at) {
        cut_at -= 1;
    }
    out.text.truncate(cut_at);
    out.text = tidy(&out.text);
    Ok(out)
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + from)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle, 0).is_some()
}

/// The stream's dictionary: from the last `obj` (or at most 4 KiB) before the keyword.
fn dictionary_before(bytes: &[u8], keyword: usize) -> &[u8] {
    let from = keyword.saturating_sub(4096);
    let window = &bytes[from..keyword];
    match window.windows(3).rposition(|w| w == b"obj") {
        Some(i) => &window[i..],
        None => window,
    }
}

fn trim_eol(data: &[u8]) -> &[u8] {
    let data = data.strip_suffix(b"\n").unwrap_or(data);
    data.strip_suffix(b"\r").unwrap_or(data)
}

/// Inflates zlib (or, failing that, raw deflate) data to at most `max` bytes; whether
/// the output was cut there.
fn inflate(data: &[u8], max: usize) -> (Vec<u8>, bool) {
    use miniz_oxide::inflate::{
        TINFLStatus, decompress_to_vec_with_limit, decompress_to_vec_zlib_with_limit,
    };
    let attempt = match decompress_to_vec_zlib_with_limit(data, max) {
        // Not zlib at all: some writers leave the header out.
        Err(e) if e.status != TINFLStatus::HasMoreOutput && e.output.is_empty() => {
            decompress_to_vec_with_limit(data, max)
        }
        other => other,
    };
    match attempt {
        Ok(v) => (v, false),
        Err(e) => {
            let cut = e.status == TINFLStatus::HasMoreOutput;
            (e.output, cut)
        }
    }
}

/// Strings kept between two operators; a real `TJ` array holds a line's worth.
const MAX_OPERANDS: usize = 4096;

/// Appends the text shown by the content stream `content` to `out`, up to `max` bytes.
fn read_text(content: &[u8], out: &mut String, max: usize) {
    // The strings since the last operator, each with whether a word space (a large
    // negative kern) came before it; at most MAX_OPERANDS are kept.
    let mut operands: Vec<(bool, Vec<u8>)> = Vec::new();
    let mut space_next = false;
    let mut i = 0;
    while i < content.len() && out.len() < max {
        let c = content[i];
        match c {
            b'%' => {
                while i < content.len() && content[i] != b'\n' && content[i] != b'\r' {
                    i += 1;
                }
            }
            b'(' => {
                let (s, next) = literal(content, i + 1);
                if operands.len() < MAX_OPERANDS {
                    operands.push((std::mem::take(&mut space_next), s));
                }
                i = next;
                continue;
            }
            b'<' if content.get(i + 1) == Some(&b'<') => i += 1,
            b'<' => {
                let (s, next) = hex(content, i + 1);
                if operands.len() < MAX_OPERANDS {
                    operands.push((std::mem::take(&mut space_next), s));
                }
                i = next;
                continue;
            }
            b'-' | b'0'..=b'9' | b'.' => {
                let start = i;
                while i < content.len() && matches!(content[i], b'-' | b'+' | b'.' | b'0'..=b'9') {
                    i += 1;
                }
                // A large negative kern inside a TJ array is a word space.
                let n: f64 = std::str::from_utf8(&content[start..i])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0.0);
                if n < -200.0 {
                    space_next = true;
                }
                continue;
            }
            b'a'..=b'z' | b'A'..=b'Z' | b'\'' | b'"' | b'*' => {
                let start = i;
                while i < content.len()
                    && matches!(content[i], b'a'..=b'z' | b'A'..=b'Z' | b'\'' | b'"' | b'*')
                {
                    i += 1;
                }
                match &content[start..i] {
                    b"Tj" => show(out, operands.last().map(|o| o.1.as_slice()), max),
                    b"'" | b"\"" => {
                        out.push('\n');
                        show(out, operands.last().map(|o| o.1.as_slice()), max);
                    }
                    b"TJ" => {
                        for (spaced, s) in &operands {
                            if *spaced && !out.ends_with(' ') {
                                out.push(' ');
                            }
                            show(out, Some(s), max);
                        }
                    }
                    b"T*" | b"Td" | b"TD" | b"ET" if !out.is_empty() && !out.ends_with('\n') => {
                        out.push('\n');
                    }
                    _ => {}
                }
                operands.clear();
                space_next = false;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
}

/// A literal string from just after its `(`: its bytes and where reading goes on.
fn literal(content: &[u8], mut i: usize) -> (Vec<u8>, usize) {
    let mut s = Vec::new();
    let mut depth = 1usize;
    while i < content.len() {
        let c = content[i];
        i += 1;
        match c {
            b'\\' => {
                let Some(&e) = content.get(i) else { break };
                i += 1;
                match e {
                    b'n' => s.push(b'\n'),
                    b'r' => s.push(b'\r'),
                    b't' => s.push(b'\t'),
                    b'b' | b'f' => {}
                    b'0'..=b'7' => {
                        let mut v = u32::from(e - b'0');
                        for _ in 0..2 {
                            match content.get(i) {
                                Some(d @ b'0'..=b'7') => {
                                    v = v * 8 + u32::from(d - b'0');
                                    i += 1;
                                }
                                _ => break,
                            }
                        }
                        s.push((v & 0xff) as u8);
                    }
                    b'\r' | b'\n' => {}
                    other => s.push(other),
                }
            }
            b'(' => {
                depth += 1;
                s.push(c);
            }
            b')' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
                s.push(c);
            }
            _ => s.push(c),
        }
    }
    (s, i)
}

/// A hex string from just after its `<`.
fn hex(content: &[u8], mut i: usize) -> (Vec<u8>, usize) {
    let mut digits = Vec::new();
    while i < content.len() && content[i] != b'>' {
        if content[i].is_ascii_hexdigit() {
            digits.push(content[i]);
        }
        i += 1;
    }
    if digits.len() % 2 == 1 {
        digits.push(b'0');
    }
    let value = |d: u8| match d {
        b'0'..=b'9' => d - b'0',
        b'a'..=b'f' => d - b'a' + 10,
        _ => d - b'A' + 10,
    };
    let bytes = digits
        .chunks(2)
        .map(|p| value(p[0]) << 4 | value(p[1]))
        .collect();
    (bytes, i + 1)
}

/// Appends a shown string's characters: UTF-16 if it says so, else one byte each
/// (PDFDocEncoding and WinAnsi agree with Latin-1 on letters); controls are dropped.
fn show(out: &mut String, s: Option<&[u8]>, max: usize) {
    let Some(s) = s else { return };
    let chars: Vec<char> = if let Some(rest) = s.strip_prefix(b"\xfe\xff") {
        let units: Vec<u16> = rest
            .chunks(2)
            .map(|p| u16::from_be_bytes([p[0], *p.get(1).unwrap_or(&0)]))
            .collect();
        char::decode_utf16(units).filter_map(Result::ok).collect()
    } else {
        s.iter().map(|b| char::from(*b)).collect()
    };
    for c in chars {
        if out.len() >= max {
            return;
        }
        if !c.is_control() || c == '\n' {
            out.push(c);
        }
    }
}

/// Lines trimmed, runs of blank lines made one.
fn tidy(text: &str) -> String {
    let mut out = String::new();
    let mut blank = false;
    for line in text.lines().map(str::trim) {
        if line.is_empty() {
            if !blank && !out.is_empty() {
                out.push('\n');
            }
            blank = true;
        } else {
            out.push_str(line);
            out.push('\n');
            blank = false;
        }
    }
    out.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-page PDF whose content stream is `content`, deflated when `deflate`.
    pub(crate) fn pdf(content: &[u8], deflate: bool) -> Vec<u8> {
        let (data, filter) = if deflate {
            (
                miniz_oxide::deflate::compress_to_vec_zlib(content, 6),
                "/Filter /FlateDecode ",
            )
        } else {
            (content.to_vec(), "")
        };
        let mut f = b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n".to_vec();
        f.extend_from_slice(
            format!("4 0 obj << {filter}/Length {} >>\nstream\n", data.len()).as_bytes(),
        );
        f.extend_from_slice(&data);
        f.extend_from_slice(b"\nendstream\nendobj\ntrailer << /Root 1 0 R >>\n%%EOF\n");
        f
    }

    #[test]
    fn the_text_of_a_plain_and_of_a_deflated_page_is_read() {
        let content =
            b"BT /F1 12 Tf 72 720 Td (Invoice \\(draft\\)) Tj T* [(Total:) -250 (42) ( EUR)] TJ ET";
        for deflate in [false, true] {
            let got = text(&pdf(content, deflate), LIMITS).unwrap();
            assert_eq!(
                got.text, "Invoice (draft)\nTotal: 42 EUR",
                "deflate {deflate}"
            );
            assert_eq!((got.pages, got.cut), (1, false));
        }
        let utf16 = b"BT <FEFF00E9007400E9> Tj ET";
        assert_eq!(text(&pdf(utf16, true), LIMITS).unwrap().text, "été");
    }

    #[test]
    fn a_deflate_bomb_is_cut_at_its_cap_and_many_pages_at_theirs() {
        // 64 MiB of zeros inside a text object, deflated to a few dozen KiB.
        let mut bomb = b"BT (start) Tj ".to_vec();
        bomb.resize(64 * 1024 * 1024, b' ');
        bomb.extend_from_slice(b"(end) Tj ET");
        let file = pdf(&bomb, true);
        assert!(file.len() < 200 * 1024, "{}", file.len());
        let got = text(&file, LIMITS).unwrap();
        assert!(got.cut);
        assert_eq!(got.text, "start");
        // A thousand pages: the first 50 are read.
        let mut many = b"%PDF-1.4\n".to_vec();
        for n in 0..1000 {
            many.extend_from_slice(
                format!(
                    "{n} 0 obj << /Length 20 >>\nstream\nBT (page{n}) Tj ET\nendstream\nendobj\n"
                )
                .as_bytes(),
            );
        }
        let got = text(&many, LIMITS).unwrap();
        assert_eq!((got.pages, got.cut), (50, true));
        assert!(
            got.text.ends_with("page49"),
            "{}",
            &got.text[got.text.len() - 20..]
        );
    }

    #[test]
    fn a_text_array_of_many_kerned_strings_is_read_in_linear_time() {
        // Each operator's strings are bounded and a kern is a flag, not a search.
        let mut content = b"BT [".to_vec();
        for _ in 0..400_000 {
            content.extend_from_slice(b"(a)-300");
        }
        content.extend_from_slice(b"] TJ ET");
        let plain = pdf(&content, false);
        let got = text(&plain, LIMITS).unwrap();
        assert!(got.text.starts_with("a a a"), "{}", &got.text[..10]);
        assert!(got.text.len() <= LIMITS.max_text);
    }

    #[test]
    fn broken_and_hostile_input_never_panics() {
        for bad in [
            &b"%PDF-"[..],
            b"%PDF-1.4 stream",
            b"%PDF-1.4 obj <<>> stream\n",
            b"%PDF-1.4 obj <<>> stream\nBT ((((((((( Tj",
            b"%PDF-1.4 obj <</Filter /FlateDecode>> stream\n\x78\x9c\xff\xff endstream",
            b"%PDF-1.4 obj <<>> stream\nBT <abc Tj [ (x TJ \\",
            b"%PDF-1.4 obj <<>> stream\nBT (\\777\\) Tj ET endstream",
        ] {
            let _ = text(bad, LIMITS).unwrap();
        }
        assert_eq!(text(b"PK\x03\x04", LIMITS), Err(PdfError::NotAPdf));
        // Deeply nested parentheses are a counter, not a recursion.
        let mut deep = b"BT ".to_vec();
        deep.extend(std::iter::repeat_n(b'(', 1_000_000));
        deep.extend_from_slice(b" Tj ET");
        let _ = text(&pdf(&deep, false), LIMITS).unwrap();
    }
}
