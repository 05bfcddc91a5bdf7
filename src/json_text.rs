//! Editing the string values of a JSON text without re-serializing it.
//!
//! Kommo may spell its JSON any valid way: escaped slashes (`https:\/\/...`), `\u0026`-style
//! escapes, `\uXXXX` for non-ASCII, whitespace anywhere, any key order. A caller looks at each
//! string value by meaning (its decoded text and where it sits) and may replace it. Every other
//! byte of the text stays as written, and a replacement is written in the spelling of the value
//! it replaces (slashes escaped if they were, and so on).

use std::borrow::Cow;

/// Deepest nesting accepted (serde_json's default recursion limit).
const MAX_DEPTH: usize = 128;

/// One step of the way from the top of the document to a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg<'a> {
    /// A member of an object, by its decoded name (borrowed from the text when it has no
    /// escapes).
    Key(Cow<'a, str>),
    /// An element of an array.
    Index(usize),
}

/// One string value, as a visitor sees it.
pub struct StringValue<'a> {
    /// The decoded text.
    pub text: &'a str,
    /// Where it sits; the last step is its member name or array index.
    pub path: &'a [Seg<'a>],
}

impl StringValue<'_> {
    /// The member name this value belongs to, if it is a member's value.
    pub fn key(&self) -> Option<&str> {
        match self.path.last() {
            Some(Seg::Key(k)) => Some(k),
            _ => None,
        }
    }
}

/// What to do with one string value.
#[derive(Debug, PartialEq, Eq)]
pub enum Edit {
    Keep,
    /// Replace the whole value.
    Replace(String),
    /// Replace the first `len` bytes of the decoded text, keeping the rest as written.
    ReplacePrefix {
        len: usize,
        with: String,
    },
}

/// The text is not valid JSON; says where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotJson(pub String);

impl std::fmt::Display for NotJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Visits every string value of `src` (member names are not values) and applies the edits;
/// borrowed when nothing changed. Fails on anything that is not one valid JSON value.
pub fn edit_strings<'a>(
    src: &'a [u8],
    visit: impl FnMut(&StringValue<'_>) -> Edit,
) -> Result<Cow<'a, [u8]>, NotJson> {
    // serde_json checks the grammar; the scanner below only finds the strings.
    serde_json::from_slice::<serde::de::IgnoredAny>(src).map_err(|e| NotJson(e.to_string()))?;
    let text = std::str::from_utf8(src)
        .map_err(|e| NotJson(format!("not UTF-8 at byte {}", e.valid_up_to())))?;
    let mut scanner = Scanner {
        src: text,
        pos: 0,
        out: None,
        copied: 0,
        path: Vec::new(),
        visit,
    };
    scanner.value(0)?;
    Ok(match scanner.out {
        None => Cow::Borrowed(src),
        Some(mut out) => {
            out.extend_from_slice(&src[scanner.copied..]);
            Cow::Owned(out)
        }
    })
}

/// Walks a text serde_json has checked, so it only looks for where each string starts and
/// what it sits under.
struct Scanner<'a, F> {
    src: &'a str,
    pos: usize,
    /// The edited text, once something changed.
    out: Option<Vec<u8>>,
    /// How much of `src` is already in `out`.
    copied: usize,
    path: Vec<Seg<'a>>,
    visit: F,
}

impl<'a, F: FnMut(&StringValue<'_>) -> Edit> Scanner<'a, F> {
    fn error(&self, what: &str) -> NotJson {
        NotJson(format!("{what} at byte {}", self.pos))
    }

    /// Skips whitespace; the byte after it.
    fn peek(&mut self) -> Option<u8> {
        let b = self.src.as_bytes();
        while matches!(b.get(self.pos), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
        b.get(self.pos).copied()
    }

    fn value(&mut self, depth: usize) -> Result<(), NotJson> {
        match self.peek() {
            Some(b'{' | b'[') if depth >= MAX_DEPTH => Err(self.error("nesting too deep")),
            Some(b'{') => self.container(b'}', depth),
            Some(b'[') => self.container(b']', depth),
            Some(b'"') => {
                let start = self.pos;
                let text = self.string()?;
                self.visit_string(start, &text);
                Ok(())
            }
            None => Err(self.error("expected a value")),
            // A number or a literal: it ends where the next token starts.
            Some(_) => {
                let rest = &self.src.as_bytes()[self.pos..];
                let end = rest.iter().position(|b| b",]} \t\n\r".contains(b));
                self.pos += end.unwrap_or(rest.len());
                Ok(())
            }
        }
    }

    /// An object (`close` is `}`) or an array (`]`): each member or element is read under its
    /// step of the path.
    fn container(&mut self, close: u8, depth: usize) -> Result<(), NotJson> {
        self.pos += 1;
        let mut index = 0;
        while self.peek() != Some(close) {
            let step = if close == b'}' {
                let key = self.string()?;
                self.peek(); // the `:`
                self.pos += 1;
                Seg::Key(key)
            } else {
                Seg::Index(index)
            };
            self.path.push(step);
            self.value(depth + 1)?;
            self.path.pop();
            index += 1;
            if self.peek() == Some(b',') {
                self.pos += 1;
            }
        }
        self.pos += 1;
        Ok(())
    }

    /// Reads the string token at `pos` (its opening quote) and returns its decoded text:
    /// borrowed when it has no escapes, as nearly every member name and most values.
    fn string(&mut self) -> Result<Cow<'a, str>, NotJson> {
        let src: &'a str = self.src;
        let start = self.pos + 1;
        let plain = src.as_bytes().get(start..).and_then(|rest| {
            rest.iter()
                .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        });
        if let Some(len) = plain.filter(|&len| src.as_bytes()[start + len] == b'"') {
            self.pos = start + len + 1;
            return Ok(Cow::Borrowed(&src[start..start + len]));
        }
        // Escaped: serde_json decodes the token and says where it ends.
        let token = serde_json::Deserializer::from_str(&src[self.pos..]);
        let mut token = token.into_iter::<String>();
        let Some(Ok(text)) = token.next() else {
            return Err(self.error("invalid string"));
        };
        self.pos += token.byte_offset();
        Ok(Cow::Owned(text))
    }

    fn visit_string(&mut self, start: usize, text: &str) {
        let raw = &self.src[start..self.pos];
        let value = StringValue {
            text,
            path: &self.path,
        };
        // The new text, and the part of the old one kept as written.
        let (with, kept) = match (self.visit)(&value) {
            Edit::Keep => return,
            Edit::Replace(with) => (with, ""),
            Edit::ReplacePrefix { len, with } => match raw_offset_after(raw, len) {
                Some(at) => (with, &raw[at..raw.len() - 1]),
                None => (with + text.get(len..).unwrap_or(""), ""),
            },
        };
        let replacement = encode(&with, Spelling::of(raw, text), kept);
        let out = self
            .out
            .get_or_insert_with(|| Vec::with_capacity(self.src.len() + 256));
        out.extend_from_slice(&self.src.as_bytes()[self.copied..start]);
        out.extend_from_slice(replacement.as_bytes());
        self.copied = self.pos;
    }
}

/// The character an escape at the start of `s` stands for, and the escape's length.
fn unescape(s: &str) -> Option<(char, usize)> {
    let unit = |at: usize| u32::from_str_radix(s.get(at..at + 4)?, 16).ok();
    let len = match s.as_bytes().get(1)? {
        // A high surrogate, whose low half follows as a second escape.
        b'u' if (0xD800..0xDC00).contains(&unit(2)?) => 12,
        b'u' => 6,
        _ => 2,
    };
    let text: String = serde_json::from_str(&format!("\"{}\"", s.get(..len)?)).ok()?;
    Some((text.chars().next()?, len))
}

/// Where in `raw` (a token, quotes included) the first `len` decoded bytes end, if that is
/// between two characters as written.
fn raw_offset_after(raw: &str, len: usize) -> Option<usize> {
    let mut decoded = 0;
    let mut i = 1;
    while decoded < len {
        let rest = raw.get(i..raw.len().checked_sub(1)?)?;
        let (c, width) = if rest.starts_with('\\') {
            unescape(rest)?
        } else {
            let c = rest.chars().next()?;
            (c, c.len_utf8())
        };
        decoded += c.len_utf8();
        i += width;
    }
    (decoded == len).then_some(i)
}

/// How a value was spelled, so its replacement is spelled alike.
#[derive(Debug, Clone, Copy)]
struct Spelling {
    /// `/` written `\/` (PHP's default).
    slash: bool,
    /// `& < > ' "` written as `\u0026`-style escapes (PHP with `JSON_HEX_*`).
    html: bool,
    /// Non-ASCII characters written as `\uXXXX`.
    ascii: bool,
}

impl Spelling {
    fn of(raw: &str, text: &str) -> Self {
        const HTML: [&[u8]; 5] = [b"\\u0026", b"\\u003c", b"\\u003e", b"\\u0027", b"\\u0022"];
        let html = |w: &[u8]| HTML.iter().any(|e| w.eq_ignore_ascii_case(e));
        Spelling {
            slash: raw.contains("\\/"),
            html: raw.as_bytes().windows(6).any(html),
            ascii: raw.is_ascii() && !text.is_ascii(),
        }
    }
}

/// `text` as a JSON string token in `spelling`, with `raw_tail` (already spelled) before the
/// closing quote.
fn encode(text: &str, spelling: Spelling, raw_tail: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(text.len() + raw_tail.len() + 16);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' if spelling.html => out.push_str("\\u0022"),
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '/' if spelling.slash => out.push_str("\\/"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            // PHP writes these in upper-case hex (`\u0026`), the spelling kept here.
            '&' | '<' | '>' | '\'' if spelling.html => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c if c < ' ' || (spelling.ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push_str(raw_tail);
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn upper_hrefs(src: &str) -> String {
        let out = edit_strings(src.as_bytes(), |v| match v.key() {
            Some("href") => Edit::Replace(v.text.to_uppercase()),
            _ => Edit::Keep,
        })
        .unwrap();
        String::from_utf8(out.into_owned()).unwrap()
    }

    #[test]
    fn only_href_values_change_and_every_other_byte_stays() {
        let src = "{ \"a\" : [1, -2.5e3, true, null, \"href\"],\n  \"href\" : \"x/y\" ,\"b\":{\"href\":\"z\"}}";
        assert_eq!(
            upper_hrefs(src),
            "{ \"a\" : [1, -2.5e3, true, null, \"href\"],\n  \"href\" : \"X/Y\" ,\"b\":{\"href\":\"Z\"}}"
        );
    }

    #[test]
    fn member_names_are_decoded() {
        assert_eq!(upper_hrefs(r#"{"hr\u0065f":"a"}"#), r#"{"hr\u0065f":"A"}"#);
    }

    #[test]
    fn replacements_keep_the_spelling_of_what_they_replace() {
        let src = r#"{"href":"https:\/\/a.kommo.com\/x?a=1\u0026b=\u0027c\u0027","n":"\u041f"}"#;
        let out = edit_strings(src.as_bytes(), |v| match v.key() {
            Some("href") => Edit::ReplacePrefix {
                len: "https://a.kommo.com".len(),
                with: "http://p/q".into(),
            },
            Some("n") => Edit::Replace("Пé/&".into()),
            _ => Edit::Keep,
        })
        .unwrap();
        let out = std::str::from_utf8(&out).unwrap();
        assert_eq!(
            out,
            r#"{"href":"http:\/\/p\/q\/x?a=1\u0026b=\u0027c\u0027","n":"\u041f\u00e9/&"}"#
        );
        let v: Value = serde_json::from_str(out).unwrap();
        assert_eq!(v["href"], "http://p/q/x?a=1&b='c'");
        assert_eq!(v["n"], "Пé/&");
    }

    #[test]
    fn a_prefix_may_end_after_an_escape_and_never_panics_inside_one() {
        let src = r#"["\u00e9t\u00e9"]"#;
        let edit = |len| {
            let out = edit_strings(src.as_bytes(), |_| Edit::ReplacePrefix {
                len,
                with: "E".into(),
            })
            .unwrap();
            String::from_utf8(out.into_owned()).unwrap()
        };
        assert_eq!(edit(2), r#"["Et\u00e9"]"#);
        // Inside a character: a caller's mistake, answered with the prefix alone.
        assert_eq!(edit(1), r#"["E"]"#);
    }

    #[test]
    fn paths_name_where_a_value_sits() {
        let mut seen = Vec::new();
        edit_strings(br#"{"a":[{"b":"x"},"y"]}"#, |v| {
            let path: Vec<Seg<'static>> = v
                .path
                .iter()
                .map(|s| match s {
                    Seg::Key(k) => Seg::Key(Cow::Owned(k.to_string())),
                    Seg::Index(i) => Seg::Index(*i),
                })
                .collect();
            seen.push((path, v.text.to_string()));
            Edit::Keep
        })
        .unwrap();
        let key = |k: &str| Seg::Key(Cow::Owned(k.to_string()));
        assert_eq!(
            seen,
            vec![
                (vec![key("a"), Seg::Index(0), key("b")], "x".to_string()),
                (vec![key("a"), Seg::Index(1)], "y".to_string()),
            ]
        );
    }

    #[test]
    fn unchanged_text_is_borrowed() {
        let src = br#"{"href":"a"}"#;
        assert!(matches!(
            edit_strings(src, |_| Edit::Keep).unwrap(),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn invalid_json_is_an_error() {
        let deep = "[".repeat(200) + &"]".repeat(200);
        for bad in [
            &b""[..],
            b"{",
            b"{\"a\"}",
            b"{\"a\":1,}",
            b"[1 2]",
            b"\"a",
            b"\"\\x\"",
            b"\"\\ud800\"",
            b"\"\x01\"",
            b"01",
            b"1.",
            b"-",
            b"tru",
            b"{} {}",
            b"\"\xff\"",
            b"<html>blocked</html>",
            deep.as_bytes(),
        ] {
            assert!(
                edit_strings(bad, |_| Edit::Keep).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn valid_json_of_every_kind_scans() {
        for good in [
            &b" {} "[..],
            b"[]",
            b"0",
            b"-0.5E+10",
            b"\"\\ud83d\\ude00 \\\" \\\\ \\/ \\b\\f\\n\\r\\t\"",
            b"{\"a\":{\"b\":[[],{}]}}",
        ] {
            assert!(
                edit_strings(good, |_| Edit::Keep).is_ok(),
                "{}",
                String::from_utf8_lossy(good)
            );
        }
    }

    proptest::proptest! {
        /// Whatever serde_json can write, in any of its spellings, scans, and replacing every
        /// string with itself (as decoded) yields a text that decodes to the same value.
        #[test]
        fn replacing_strings_with_themselves_keeps_the_value(s in "\\PC{0,20}", n in -1000i64..1000, pretty in proptest::bool::ANY) {
            let v = serde_json::json!({"href": s, "n": n, "list": [s, {"k": s}]});
            let text = if pretty { serde_json::to_vec_pretty(&v).unwrap() } else { serde_json::to_vec(&v).unwrap() };
            let out = edit_strings(&text, |v| Edit::Replace(v.text.to_string())).unwrap();
            let back: Value = serde_json::from_slice(&out).unwrap();
            proptest::prop_assert_eq!(back, v);
        }
    }
}
