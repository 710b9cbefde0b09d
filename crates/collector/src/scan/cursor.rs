//! JSON's grammar over a body's bytes, as `serde_json` reads it: every string's escapes and
//! every number's range checked, nothing kept but what the caller asks for. The body is known
//! to be UTF-8 (checked before the scan), so a string's bytes need no second look.

use std::borrow::Cow;

use super::{MAX_DEPTH, RAW_VALUE_TOKEN};
use crate::error::CaptureError;

/// Why a scan stopped: JSON that `serde_json` refuses, or a check of the collector's own.
pub(super) enum Stop {
    Malformed { at: usize, what: Cow<'static, str> },
    Refused(Box<CaptureError>),
}

impl Stop {
    pub(super) fn refused(error: CaptureError) -> Self {
        Self::Refused(Box::new(error))
    }

    /// The client's answer, with the line and column of malformed JSON in `json`.
    pub(super) fn into_error(self, json: &str) -> CaptureError {
        match self {
            Self::Refused(error) => *error,
            Self::Malformed { at, what } => {
                let before = json.as_bytes().get(..at).unwrap_or(json.as_bytes());
                let line = 1 + before.iter().filter(|b| **b == b'\n').count();
                let column = 1 + before.iter().rev().take_while(|b| **b != b'\n').count();
                CaptureError::MalformedJson(format!("{what} at line {line} column {column}"))
            }
        }
    }
}

pub(super) type Scan<T> = Result<T, Stop>;

/// A string's text between its quotes, as sent.
#[derive(Clone, Copy)]
pub(super) struct Str<'a> {
    raw: &'a str,
    escaped: bool,
}

impl<'a> Str<'a> {
    /// The decoded text: borrowed from the body when the string has no escapes.
    pub(super) fn text(self) -> Cow<'a, str> {
        if self.escaped {
            Cow::Owned(unescape(self.raw))
        } else {
            Cow::Borrowed(self.raw)
        }
    }

    fn is(self, text: &str) -> bool {
        if self.escaped {
            unescape(self.raw) == text
        } else {
            self.raw == text
        }
    }
}

/// Bytes a string holds as they are: not a quote, a backslash or a control character.
const PLAIN: [bool; 256] = {
    let mut plain = [true; 256];
    let mut byte = 0;
    while byte < 0x20 {
        plain[byte] = false;
        byte += 1;
    }
    plain[b'"' as usize] = false;
    plain[b'\\' as usize] = false;
    plain
};

pub(super) struct Cursor<'a> {
    text: &'a str,
    bytes: &'a [u8],
    /// The next byte to read.
    pub(super) at: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(text: &'a str) -> Self {
        Self {
            text,
            bytes: text.as_bytes(),
            at: 0,
        }
    }

    /// The text from `start` to the cursor.
    pub(super) fn since(&self, start: usize) -> &'a str {
        self.text.get(start..self.at).unwrap_or_default()
    }

    pub(super) fn fail<T>(&self, what: impl Into<Cow<'static, str>>) -> Scan<T> {
        Err(Stop::Malformed {
            at: self.at,
            what: what.into(),
        })
    }

    /// Skips whitespace; the next byte, if any.
    pub(super) fn peek(&mut self) -> Option<u8> {
        while let Some(&byte) = self.bytes.get(self.at) {
            if !matches!(byte, b' ' | b'\n' | b'\r' | b'\t') {
                return Some(byte);
            }
            self.at += 1;
        }
        None
    }

    /// Nothing but whitespace is left.
    pub(super) fn end(&mut self) -> Scan<()> {
        match self.peek() {
            None => Ok(()),
            Some(_) => self.fail("trailing characters"),
        }
    }

    /// Any value, `level` containers deep, checked and kept nowhere.
    pub(super) fn value(&mut self, level: usize) -> Scan<()> {
        match self.peek() {
            Some(b'{') => self.object(level, |cursor, _| cursor.value(level + 1)),
            Some(b'[') => self.array(level, |cursor, _| cursor.value(level + 1)),
            Some(b'"') => self.string().map(|_| ()),
            Some(b't') => self.word(b"true"),
            Some(b'f') => self.word(b"false"),
            Some(b'n') => self.word(b"null"),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => self.fail("expected value"),
            None => self.fail("EOF while parsing a value"),
        }
    }

    /// A container `level` containers deep: refused past [`MAX_DEPTH`].
    fn enter(&self, level: usize) -> Scan<()> {
        if level >= MAX_DEPTH {
            let message = format!("JSON nested deeper than {MAX_DEPTH} levels");
            return Err(Stop::refused(CaptureError::BadRequest(message)));
        }
        Ok(())
    }

    /// The object at the cursor (`level` deep): each key goes to `member`, which reads its
    /// value (at `level + 1`). serde_json's reserved `RawValue` key is refused.
    pub(super) fn object(
        &mut self,
        level: usize,
        mut member: impl FnMut(&mut Self, Str<'a>) -> Scan<()>,
    ) -> Scan<()> {
        self.enter(level)?;
        self.at += 1;
        match self.peek() {
            Some(b'}') => {
                self.at += 1;
                return Ok(());
            }
            Some(b'"') => {}
            Some(_) => return self.fail("key must be a string"),
            None => return self.fail("EOF while parsing an object"),
        }
        loop {
            let key = self.string()?;
            if key.is(RAW_VALUE_TOKEN) {
                return self.fail(format!("the key `{RAW_VALUE_TOKEN}` is reserved"));
            }
            match self.peek() {
                Some(b':') => self.at += 1,
                Some(_) => return self.fail("expected `:`"),
                None => return self.fail("EOF while parsing an object"),
            }
            self.peek();
            member(self, key)?;
            match self.peek() {
                Some(b',') => {
                    self.at += 1;
                    match self.peek() {
                        Some(b'"') => {}
                        Some(b'}') => return self.fail("trailing comma"),
                        Some(_) => return self.fail("key must be a string"),
                        None => return self.fail("EOF while parsing an object"),
                    }
                }
                Some(b'}') => {
                    self.at += 1;
                    return Ok(());
                }
                Some(_) => return self.fail("expected `,` or `}`"),
                None => return self.fail("EOF while parsing an object"),
            }
        }
    }

    /// The array at the cursor (`level` deep): each element goes to `element` with its index,
    /// the cursor on its first byte.
    pub(super) fn array(
        &mut self,
        level: usize,
        mut element: impl FnMut(&mut Self, usize) -> Scan<()>,
    ) -> Scan<()> {
        self.enter(level)?;
        self.at += 1;
        if self.peek() == Some(b']') {
            self.at += 1;
            return Ok(());
        }
        let mut index = 0;
        loop {
            self.peek();
            element(self, index)?;
            index += 1;
            match self.peek() {
                Some(b',') => {
                    self.at += 1;
                    if self.peek() == Some(b']') {
                        return self.fail("trailing comma");
                    }
                }
                Some(b']') => {
                    self.at += 1;
                    return Ok(());
                }
                Some(_) => return self.fail("expected `,` or `]`"),
                None => return self.fail("EOF while parsing a list"),
            }
        }
    }

    /// The string at the cursor (on its opening quote).
    pub(super) fn string(&mut self) -> Scan<Str<'a>> {
        self.at += 1;
        let start = self.at;
        let mut escaped = false;
        loop {
            while self
                .bytes
                .get(self.at)
                .is_some_and(|byte| PLAIN[usize::from(*byte)])
            {
                self.at += 1;
            }
            match self.bytes.get(self.at) {
                Some(b'"') => {
                    let raw = self.text.get(start..self.at).unwrap_or_default();
                    self.at += 1;
                    return Ok(Str { raw, escaped });
                }
                Some(b'\\') => {
                    escaped = true;
                    self.escape()?;
                }
                Some(_) => {
                    return self.fail("control character (\\u0000-\\u001F) found in a string")
                }
                None => return self.fail("EOF while parsing a string"),
            }
        }
    }

    /// The escape at the cursor (on its backslash). A `\u` escape of a UTF-16 surrogate must
    /// be the leading half of a pair, as `serde_json` requires of a string.
    fn escape(&mut self) -> Scan<()> {
        self.at += 1;
        match self.bytes.get(self.at) {
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                self.at += 1;
                Ok(())
            }
            Some(b'u') => {
                self.at += 1;
                let unit = self.hex4()?;
                if (0xDC00..=0xDFFF).contains(&unit) {
                    return self.fail("lone surrogate in hex escape");
                }
                if (0xD800..=0xDBFF).contains(&unit) {
                    if self.bytes.get(self.at..self.at + 2) != Some(b"\\u") {
                        return self.fail("unexpected end of hex escape");
                    }
                    self.at += 2;
                    if !(0xDC00..=0xDFFF).contains(&self.hex4()?) {
                        return self.fail("lone surrogate in hex escape");
                    }
                }
                Ok(())
            }
            Some(_) => self.fail("invalid escape"),
            None => self.fail("EOF while parsing a string"),
        }
    }

    fn hex4(&mut self) -> Scan<u32> {
        let Some(digits) = self.bytes.get(self.at..self.at + 4) else {
            self.at = self.bytes.len();
            return self.fail("EOF while parsing a string");
        };
        let mut unit = 0;
        for digit in digits {
            let Some(value) = char::from(*digit).to_digit(16) else {
                return self.fail("invalid escape");
            };
            unit = unit * 16 + value;
        }
        self.at += 4;
        Ok(unit)
    }

    fn word(&mut self, word: &[u8]) -> Scan<()> {
        if self.bytes.get(self.at..self.at + word.len()) != Some(word) {
            return self.fail("expected value");
        }
        self.at += word.len();
        Ok(())
    }

    /// A number by JSON's grammar. Whether one with an exponent or more than 300 integer digits
    /// is in `f64`'s range is `serde_json`'s answer on its text (its rounding near the limit is
    /// its own); shorter numbers without one always are.
    fn number(&mut self) -> Scan<()> {
        let start = self.at;
        if self.bytes.get(self.at) == Some(&b'-') {
            self.at += 1;
        }
        let integer = self.at;
        match self.bytes.get(self.at) {
            Some(b'0') => {
                self.at += 1;
                if self.bytes.get(self.at).is_some_and(u8::is_ascii_digit) {
                    return self.fail("invalid number");
                }
            }
            Some(b'1'..=b'9') => self.digits(),
            _ => return self.fail("invalid number"),
        }
        let integer_digits = self.at - integer;
        if self.bytes.get(self.at) == Some(&b'.') {
            self.at += 1;
            if !self.bytes.get(self.at).is_some_and(u8::is_ascii_digit) {
                return self.fail("invalid number");
            }
            self.digits();
        }
        let mut exponent = false;
        if matches!(self.bytes.get(self.at), Some(b'e' | b'E')) {
            exponent = true;
            self.at += 1;
            if matches!(self.bytes.get(self.at), Some(b'+' | b'-')) {
                self.at += 1;
            }
            if !self.bytes.get(self.at).is_some_and(u8::is_ascii_digit) {
                return self.fail("invalid number");
            }
            self.digits();
        }
        if (exponent || integer_digits > 300)
            && serde_json::from_str::<f64>(self.since(start)).is_err()
        {
            return self.fail("number out of range");
        }
        Ok(())
    }

    fn digits(&mut self) {
        while self.bytes.get(self.at).is_some_and(u8::is_ascii_digit) {
            self.at += 1;
        }
    }
}

/// A checked string's text with its escapes decoded.
fn unescape(raw: &str) -> String {
    let mut text = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(backslash) = rest.find('\\') {
        text.push_str(&rest[..backslash]);
        let escape = &rest[backslash + 1..];
        let (decoded, used) = match escape.as_bytes().first() {
            Some(b'b') => ('\u{8}', 1),
            Some(b'f') => ('\u{c}', 1),
            Some(b'n') => ('\n', 1),
            Some(b'r') => ('\r', 1),
            Some(b't') => ('\t', 1),
            Some(b'u') => unicode(escape),
            Some(other) => (char::from(*other), 1),
            None => break,
        };
        text.push(decoded);
        rest = escape.get(used..).unwrap_or_default();
    }
    text.push_str(rest);
    text
}

/// A checked `\u` escape (`escape` starts at its `u`): the character and the bytes it took.
fn unicode(escape: &str) -> (char, usize) {
    let unit = |at: usize| {
        escape
            .get(at..at + 4)
            .and_then(|hex| u32::from_str_radix(hex, 16).ok())
    };
    let Some(first) = unit(1) else {
        return (char::REPLACEMENT_CHARACTER, 1);
    };
    if (0xD800..=0xDBFF).contains(&first) {
        if let Some(second) = unit(7) {
            let code = 0x1_0000 + ((first - 0xD800) << 10) + (second.wrapping_sub(0xDC00) & 0x3FF);
            return (
                char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER),
                11,
            );
        }
    }
    (
        char::from_u32(first).unwrap_or(char::REPLACEMENT_CHARACTER),
        5,
    )
}
