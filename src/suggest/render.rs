//! Writing the suggested routes file by hand: a fixed layout, comments for the reviewer,
//! and every scalar double-quoted with escapes that YAML and JSON read alike, in ASCII
//! only (nothing a terminal or an editor could misread).

use std::fmt::Write as _;

use serde_json::Value;

/// A YAML double-quoted scalar for `s` (also a JSON string).
pub(crate) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            c if (c as u32) <= 0xffff => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            // JSON and YAML both read a surrogate pair.
            c => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{:04x}", u);
                }
            }
        }
    }
    out.push('"');
    out
}

/// A value in YAML flow style (which JSON also is).
pub(crate) fn flow(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => quote(s),
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(flow).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("{}: {}", quote(k), flow(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// One route as `key: value` lines under a `- `, in the order given; null values left out.
pub(crate) fn route(out: &mut String, fields: &[(String, Value)]) {
    let mut first = true;
    for (k, v) in fields.iter().filter(|(_, v)| !v.is_null()) {
        let lead = if first { "  - " } else { "    " };
        first = false;
        match v {
            // A long list goes one item a line, so a reviewer's diff shows each.
            Value::Array(items) if items.len() > 1 && flow(v).len() > 60 => {
                let _ = writeln!(out, "{lead}{k}:");
                for item in items {
                    let _ = writeln!(out, "      - {}", flow(item));
                }
            }
            v => {
                let _ = writeln!(out, "{lead}{k}: {}", flow(v));
            }
        }
    }
}

/// A comment line; the text is one line of printable ASCII already, made sure here too.
pub(crate) fn comment(out: &mut String, indent: &str, text: &str) {
    let clean: String = text
        .chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .collect();
    let _ = writeln!(out, "{indent}# {clean}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_scalars_read_back_as_json_and_as_yaml() {
        for s in [
            "plain",
            "/a/*/**",
            "with \"quotes\" and \\ backslash",
            "#not a comment: {x} [y] &z *w !t |l >f %d @a `b",
            "tab\tnew\nline\u{1b}nul\u{0}",
            "caf\u{e9} \u{85} \u{feff} \u{1f600}",
            "",
            "null",
            "true",
            "0123",
        ] {
            let q = quote(s);
            assert!(q.is_ascii(), "{q}");
            let json: String = serde_json::from_str(&q).unwrap();
            assert_eq!(json, s);
            let yaml: String = serde_saphyr::from_str(&q).unwrap();
            assert_eq!(yaml, s, "{q}");
        }
    }
}
