//! From the paths one host and port saw to the `path_allowlist` patterns that allow them
//! (SPEC §3a): identifier-like segments become `*`, a literal prefix with too many distinct
//! children becomes `prefix/**`, everything else stays a literal segment prefix.
//!
//! Pure and table-tested: paths (already through `check_request_path`) go in, pattern
//! text comes out. docs/reference.md, "routes suggest", states the rules for people.

use std::collections::{BTreeMap, BTreeSet};

/// What a path segment looks like, as the generalisation reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// A name: kept literally.
    Word,
    /// All ASCII digits.
    Number,
    /// `8-4-4-4-12` hex digits.
    Uuid,
    /// Seven or more hex digits, at least one of them a digit (a commit SHA, a digest).
    Hex,
    /// Something generated: a run of 16 or more ASCII letters and digits mixing both, or
    /// 24 or more characters of `[A-Za-z0-9_-]` mixing digits, lower and upper case.
    /// May be a secret, so it is masked wherever a path is shown.
    Token,
}

/// Classifies one path segment as sent (escapes not decoded).
pub(crate) fn classify(segment: &str) -> Class {
    let b = segment.as_bytes();
    if !b.is_empty() && b.iter().all(u8::is_ascii_digit) {
        return Class::Number;
    }
    if is_uuid(b) {
        return Class::Uuid;
    }
    if b.len() >= 7 && b.iter().all(u8::is_ascii_hexdigit) && b.iter().any(u8::is_ascii_digit) {
        return Class::Hex;
    }
    if is_token(segment) {
        return Class::Token;
    }
    Class::Word
}

fn is_uuid(b: &[u8]) -> bool {
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

fn is_token(segment: &str) -> bool {
    let mixed_run = segment
        .split(|c: char| !c.is_ascii_alphanumeric())
        .any(|run| {
            run.len() >= 16
                && run.bytes().any(|c| c.is_ascii_digit())
                && run.bytes().any(|c| c.is_ascii_alphabetic())
        });
    let b = segment.as_bytes();
    let base64url = b.len() >= 24
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
        && b.iter().any(u8::is_ascii_digit)
        && b.iter().any(u8::is_ascii_lowercase)
        && b.iter().any(u8::is_ascii_uppercase);
    mixed_run || base64url
}

/// Does the segment hold an encoded slash or backslash, which `*` never matches?
fn has_encoded_separator(segment: &str) -> bool {
    let lower = segment.to_ascii_lowercase();
    lower.contains("%2f") || lower.contains("%5c")
}

/// Escapes' hex digits upper-cased: how patterns compare them, so `%2f` and `%2F` are one
/// segment.
fn upper_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut hex_left = 0;
    for c in s.chars() {
        if hex_left > 0 {
            out.push(c.to_ascii_uppercase());
            hex_left -= 1;
        } else {
            if c == '%' {
                hex_left = 2;
            }
            out.push(c);
        }
    }
    out
}

/// One segment of a suggested pattern.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Seg {
    Lit(String),
    /// `*`
    One,
    /// `**`, only ever last.
    Tail,
}

/// A path after the identifier step.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Shape {
    segs: Vec<Seg>,
    /// The path ended with `/`. A literal prefix covers that; a pattern with `*` needs
    /// `/**` for it (a pattern cannot name one trailing empty segment).
    slash: bool,
}

/// The identifier step. `None` when no pattern short of `/**` would allow the path: `/`
/// itself (a literal `/` allows every path), or a first segment that must be a wildcard
/// but holds an encoded slash (`*` cannot match it, and the root is never collapsed).
fn shape_of(path: &str) -> Option<Shape> {
    let body = path.strip_prefix('/')?;
    let mut raw: Vec<&str> = body.split('/').collect();
    let slash = raw.last() == Some(&"");
    if slash {
        raw.pop();
    }
    if raw.is_empty() {
        return None;
    }
    let mut segs = Vec::with_capacity(raw.len());
    for (i, s) in raw.iter().enumerate() {
        if !s.contains('*') && classify(s) == Class::Word {
            segs.push(Seg::Lit(upper_escapes(s)));
        } else if !has_encoded_separator(s) {
            segs.push(Seg::One);
        } else if i == 0 {
            return None;
        } else {
            // `*` would not match it: allow what is below the segments before it.
            segs.push(Seg::Tail);
            break;
        }
    }
    Some(Shape { segs, slash })
}

/// The prefix tree of one group's shapes, for the collapse step.
#[derive(Default)]
struct Node {
    children: BTreeMap<Seg, Node>,
}

impl Node {
    fn insert(&mut self, segs: &[Seg]) {
        if let Some((first, rest)) = segs.split_first() {
            self.children.entry(first.clone()).or_default().insert(rest);
        }
    }

    /// Prefixes holding at least one literal segment (so never the root, nor `*` alone)
    /// with more than `max_literal` distinct children, shallowest first: those become
    /// `prefix/**`.
    fn collapsed(&self, max_literal: usize, prefix: &mut Vec<Seg>, out: &mut BTreeSet<Vec<Seg>>) {
        for (seg, child) in &self.children {
            if *seg == Seg::Tail {
                continue;
            }
            prefix.push(seg.clone());
            let literal = prefix.iter().any(|s| matches!(s, Seg::Lit(_)));
            if literal && child.children.len() > max_literal {
                out.insert(prefix.clone());
            } else {
                child.collapsed(max_literal, prefix, out);
            }
            prefix.pop();
        }
    }
}

/// A suggested pattern: its segments, `Tail` only last.
type Pattern = Vec<Seg>;

fn pattern_after_collapse(shape: &Shape, collapsed: &BTreeSet<Vec<Seg>>) -> Pattern {
    for n in 1..=shape.segs.len() {
        if collapsed.contains(&shape.segs[..n]) {
            let mut p = shape.segs[..n].to_vec();
            p.push(Seg::Tail);
            return p;
        }
    }
    let mut p = shape.segs.clone();
    if shape.slash && p.contains(&Seg::One) && p.last() != Some(&Seg::Tail) {
        p.push(Seg::Tail);
    }
    p
}

/// Does a pattern match everything below what it names? A literal one is a segment
/// prefix, and one ending in `**` says so.
fn is_open(p: &[Seg]) -> bool {
    p.last() == Some(&Seg::Tail) || p.iter().all(|s| matches!(s, Seg::Lit(_)))
}

fn segment_covers(q: &Seg, p: &Seg) -> bool {
    match (q, p) {
        (Seg::One, Seg::Lit(s)) => !has_encoded_separator(s),
        (q, p) => q == p,
    }
}

/// Does pattern `q` match every path pattern `p` matches?
fn covers(q: &[Seg], p: &[Seg]) -> bool {
    let core = |x: &[Seg]| x.len() - usize::from(x.last() == Some(&Seg::Tail));
    let (qc, pc) = (&q[..core(q)], &p[..core(p)]);
    let prefix_covers =
        qc.len() <= pc.len() && qc.iter().zip(pc).all(|(a, b)| segment_covers(a, b));
    if is_open(q) {
        prefix_covers
    } else {
        !is_open(p) && qc.len() == pc.len() && prefix_covers
    }
}

/// Drops every pattern another one already covers (of two that cover each other, the
/// one that sorts last).
fn without_covered(patterns: BTreeSet<Pattern>) -> Vec<Pattern> {
    let all: Vec<Pattern> = patterns.into_iter().collect();
    all.iter()
        .enumerate()
        .filter(|(i, p)| {
            !all.iter()
                .enumerate()
                .any(|(j, q)| j != *i && covers(q, p) && (j < *i || !covers(p, q)))
        })
        .map(|(_, p)| p.clone())
        .collect()
}

fn render(p: &[Seg]) -> String {
    let mut out = String::new();
    for s in p {
        out.push('/');
        match s {
            Seg::Lit(l) => out.push_str(l),
            Seg::One => out.push('*'),
            Seg::Tail => out.push_str("**"),
        }
    }
    out
}

/// One logged request (deduplicated): its method, path and how many times it was seen.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Seen {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) count: u64,
}

/// One suggested route's path side: the methods it allows, its patterns, and what it
/// stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Group {
    /// In [`method_rank`] order.
    pub(crate) methods: Vec<String>,
    pub(crate) patterns: Vec<String>,
    /// Requests it covers.
    pub(crate) count: u64,
    /// The most frequent request (the smallest of equals), `METHOD /path`, opaque tokens
    /// masked.
    pub(crate) example: String,
}

/// What one host and port's requests generalise to.
#[derive(Debug, Default)]
pub(crate) struct Generalised {
    pub(crate) groups: Vec<Group>,
    /// Requests no pattern short of `/**` would allow: not suggested.
    pub(crate) left_out: Vec<Seen>,
}

/// A method as it sorts: its place in the fixed order, then its name.
type MethodKey = (usize, String);

/// The fixed order methods are listed in; others follow by name.
pub(crate) fn method_rank(m: &str) -> MethodKey {
    const ORDER: [&str; 7] = ["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"];
    (
        ORDER.iter().position(|o| *o == m).unwrap_or(ORDER.len()),
        m.to_owned(),
    )
}

/// Generalises one host and port's requests: the identifier step on each path; the
/// methods of each resulting shape gathered (so the group a path joins depends on what
/// was done on paths of its shape, not on the whole host); then, per set of methods, the
/// collapse step and the patterns.
pub(crate) fn generalise(seen: &[Seen], max_literal: usize) -> Generalised {
    let mut out = Generalised::default();
    let mut shaped: Vec<(&Seen, Shape)> = Vec::new();
    let mut methods_of: BTreeMap<Vec<Seg>, BTreeSet<MethodKey>> = BTreeMap::new();
    for s in seen {
        match shape_of(&s.path) {
            Some(shape) => {
                methods_of
                    .entry(shape.segs.clone())
                    .or_default()
                    .insert(method_rank(&s.method));
                shaped.push((s, shape));
            }
            None => out.left_out.push(s.clone()),
        }
    }
    let mut groups: BTreeMap<Vec<MethodKey>, Vec<(&Seen, Shape)>> = BTreeMap::new();
    for (s, shape) in shaped {
        let key: Vec<MethodKey> = methods_of
            .get(&shape.segs)
            .map(|m| m.iter().cloned().collect())
            .unwrap_or_default();
        groups.entry(key).or_default().push((s, shape));
    }
    for (methods, members) in groups {
        let mut tree = Node::default();
        for (_, shape) in &members {
            tree.insert(&shape.segs);
        }
        let mut collapsed = BTreeSet::new();
        tree.collapsed(max_literal, &mut Vec::new(), &mut collapsed);
        let patterns: BTreeSet<Pattern> = members
            .iter()
            .map(|(_, shape)| pattern_after_collapse(shape, &collapsed))
            .collect();
        let example = members
            .iter()
            .map(|(s, _)| *s)
            .max_by(|a, b| {
                a.count
                    .cmp(&b.count)
                    .then_with(|| (&b.path, &b.method).cmp(&(&a.path, &a.method)))
            })
            .map(|s| format!("{} {}", s.method, mask_tokens(&s.path)))
            .unwrap_or_default();
        out.groups.push(Group {
            methods: methods.into_iter().map(|(_, m)| m).collect(),
            patterns: without_covered(patterns)
                .iter()
                .map(|p| render(p))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
            count: members.iter().map(|(s, _)| s.count).sum(),
            example,
        });
    }
    out
}

/// The path with every segment classed [`Class::Token`] shown as `<token>`: a path can
/// carry a secret, and the example goes into a file people share.
pub(crate) fn mask_tokens(path: &str) -> String {
    path.split('/')
        .map(|s| {
            if classify(s) == Class::Token {
                "<token>"
            } else {
                s
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests;
