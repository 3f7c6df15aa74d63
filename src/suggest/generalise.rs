//! From the paths one host and port saw to the `path_allowlist` patterns that allow them
//! (SPEC §3a): identifier-like segments become `*`, a literal prefix with too many distinct
//! children becomes `prefix/**`, everything else stays a literal segment prefix.
//!
//! Pure and table-tested: paths (already through `check_request_path`) go in, pattern
//! text comes out. docs/reference.md, "routes suggest", states the rules for people.

use std::collections::{BTreeMap, BTreeSet};

use crate::routes::{has_encoded_separator, uppercase_escapes};

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
    // Escapes (`%2B`, `%3D`: base64's `+` and `=`, encoded) do not end a run.
    let mixed_run = segment
        .split(|c: char| !c.is_ascii_alphanumeric() && c != '%')
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
        let encoded_separator = has_encoded_separator(s);
        if !s.contains('*') && (encoded_separator || classify(s) == Class::Word) {
            // A segment with an encoded slash stays literal whatever it looks like
            // (SPEC §3a): `*` would not match it.
            segs.push(Seg::Lit(uppercase_escapes(s)));
        } else if !encoded_separator {
            segs.push(Seg::One);
        } else if i == 0 {
            return None;
        } else {
            // A `*` in it, which a pattern cannot hold, and an encoded slash, which `*`
            // does not match: allow what is below the segments before it.
            segs.push(Seg::Tail);
            break;
        }
    }
    // Wildcards alone (`/*/*`, from `/1/2`; `/*/**`, from `/123/`) would allow any path of
    // their shape on the host, and a few of them every path: such a path is kept
    // literally instead, a segment prefix of its own.
    if !segs.iter().any(|s| matches!(s, Seg::Lit(_))) {
        if raw.iter().any(|s| s.contains('*')) {
            return None;
        }
        let segs = raw.iter().map(|s| Seg::Lit(uppercase_escapes(s))).collect();
        return Some(Shape { segs, slash });
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

/// Drops every pattern another one already covers. Two patterns cover each other only
/// when they allow the same paths (`/a` and `/a/**`): the first in order is kept.
///
/// A pattern can only be covered by one whose segments lead to it in a prefix tree of
/// them all (literally, or through a `*` over a literal), so each is checked by a walk
/// down that tree rather than against every other pattern.
///
/// A walk can branch at each literal (its own child and a `*` child), so each pattern's
/// walk has a budget of nodes; one whose walk runs out is kept. A kept pattern another
/// covers is only redundant, never wider.
fn without_covered(patterns: BTreeSet<Pattern>) -> Vec<Pattern> {
    let mut tree = CoverNode::default();
    let mut kept: Vec<(Pattern, bool)> = Vec::new();
    for p in patterns {
        let open = is_open(&p);
        let core = &p[..p.len() - usize::from(p.last() == Some(&Seg::Tail))];
        let end = tree.node_mut(core);
        let first = if open { !end.open } else { !end.closed };
        end.open |= open;
        end.closed |= !open;
        if first {
            kept.push((p, open));
        }
    }
    kept.into_iter()
        .filter(|(p, open)| {
            let core = &p[..p.len() - usize::from(p.last() == Some(&Seg::Tail))];
            let mut budget = COVER_WALK_BUDGET;
            !tree.covered(core, *open, true, &mut budget)
        })
        .map(|(p, _)| p)
        .collect()
}

/// Nodes one pattern's cover walk may visit.
const COVER_WALK_BUDGET: usize = 4096;

/// The prefix tree of the patterns' segments (without a final `**`); a node says whether
/// an open pattern (a literal prefix, or one ending in `**`) or a closed one (whole path,
/// with a `*`) ends there.
#[derive(Default)]
struct CoverNode {
    children: BTreeMap<Seg, CoverNode>,
    open: bool,
    closed: bool,
}

impl CoverNode {
    fn node_mut(&mut self, segs: &[Seg]) -> &mut CoverNode {
        let mut node = self;
        for s in segs {
            node = node.children.entry(s.clone()).or_default();
        }
        node
    }

    /// Does another pattern in the tree cover the one whose segments are `core`: an open
    /// one ending at a proper prefix of it, or one ending where it ends, reached through a
    /// `*` over one of its literals (`exact` false), or open over it closed?
    fn covered(&self, core: &[Seg], open: bool, exact: bool, budget: &mut usize) -> bool {
        if *budget == 0 {
            return false;
        }
        *budget -= 1;
        let Some((first, rest)) = core.split_first() else {
            return (self.open && (!open || !exact)) || (self.closed && !open && !exact);
        };
        if self.open {
            return true;
        }
        let literal_under_star = match first {
            Seg::Lit(s) => !has_encoded_separator(s),
            _ => false,
        };
        self.children
            .get(first)
            .is_some_and(|n| n.covered(rest, open, exact, budget))
            || (literal_under_star
                && self
                    .children
                    .get(&Seg::One)
                    .is_some_and(|n| n.covered(rest, open, false, budget)))
    }
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
            .map(|s| format!("{} {}", s.method, mask_identifiers(&s.path)))
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

/// The path with every segment that looks generated (a UUID, hex, a token) shown as
/// `<id>`: a path can carry a secret (a UUID or hex API key, a bot token), and the
/// example goes into a file people share. Numbers stay: they are what makes an example
/// readable (`/issues/123`).
pub(crate) fn mask_identifiers(path: &str) -> String {
    path.split('/')
        .map(|s| match classify(s) {
            Class::Uuid | Class::Hex | Class::Token => "<id>",
            Class::Word | Class::Number => s,
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests;
