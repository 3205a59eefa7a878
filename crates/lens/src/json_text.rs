//! JSON text that round-trips: key order, number text, and the exponent
//! style that `serde_json` normalises (`1e400` would come back `1e+400`).
//!
//! Parse with [`parse`], which notes how the input wrote its exponents, and
//! write with [`to_string`] in the same style.

use serde_json::Value;

/// How a document's text wrote exponents, where `serde_json` loses it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NumberStyle {
    /// Exponents were written without a `+` (`1e400`), and never with one.
    pub unsigned_exponent: bool,
    /// Exponents were written with `E`, and never with `e`.
    pub upper_e: bool,
}

/// Calls `f` on every byte outside strings with the byte before it.
fn outside_strings(text: &str, mut f: impl FnMut(usize, u8)) {
    let bytes = text.as_bytes();
    let (mut in_string, mut escaped) = (false, false);
    for (i, &b) in bytes.iter().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else if b == b'"' {
            in_string = true;
        } else {
            f(i, b);
        }
    }
}

/// The exponent style of a JSON text.
pub fn style_of(text: &str) -> NumberStyle {
    let bytes = text.as_bytes();
    let (mut unsigned, mut signed, mut upper, mut lower) = (false, false, false, false);
    outside_strings(text, |i, b| {
        if (b == b'e' || b == b'E')
            && i > 0
            && (bytes[i - 1].is_ascii_digit() || bytes[i - 1] == b'.')
        {
            if b == b'E' {
                upper = true
            } else {
                lower = true
            }
            match bytes.get(i + 1) {
                Some(b'+') => signed = true,
                Some(b'-') => {}
                _ => unsigned = true,
            }
        }
    });
    NumberStyle {
        unsigned_exponent: unsigned && !signed,
        upper_e: upper && !lower,
    }
}

/// Parses a JSON text and notes its exponent style.
pub fn parse(text: &str) -> serde_json::Result<(Value, NumberStyle)> {
    Ok((serde_json::from_str(text)?, style_of(text)))
}

/// Writes a value compactly, with exponents in `style`.
pub fn to_string(value: &Value, style: NumberStyle) -> String {
    let text = serde_json::to_string(value).unwrap_or_default();
    if style == NumberStyle::default() || !text.contains('e') {
        return text;
    }
    let bytes = text.as_bytes();
    let mut drop = Vec::new();
    let mut upper = Vec::new();
    outside_strings(&text, |i, b| {
        if b == b'e' && i > 0 && (bytes[i - 1].is_ascii_digit() || bytes[i - 1] == b'.') {
            if style.upper_e {
                upper.push(i);
            }
            if style.unsigned_exponent && bytes.get(i + 1) == Some(&b'+') {
                drop.push(i + 1);
            }
        }
    });
    let mut out = Vec::with_capacity(bytes.len());
    for (i, &b) in bytes.iter().enumerate() {
        if drop.binary_search(&i).is_ok() {
            continue;
        }
        out.push(if upper.binary_search(&i).is_ok() {
            b'E'
        } else {
            b
        });
    }
    String::from_utf8(out).unwrap_or(text)
}

/// True for an integer's text of at most 15 digits, not `-0`: a double
/// holds it exactly and JavaScript formats it as written, so it is its own
/// value's text on either side.
pub fn is_plain_integer(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    !digits.is_empty()
        && digits.len() <= 15
        && digits.bytes().all(|b| b.is_ascii_digit())
        && text != "-0"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_come_back_as_written() {
        for text in [
            r#"{"a":1e400,"b":"1e+5 stays","c":1.10,"d":12345678901234567890}"#,
            r#"{"a":1E400,"b":2E-3}"#,
            r#"{"a":1e+400}"#,
            r#"{"a":-0.0,"b":[1e5,2e-7]}"#,
        ] {
            let (value, style) = parse(text).unwrap();
            assert_eq!(to_string(&value, style), text);
        }
    }
}
