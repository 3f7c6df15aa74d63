//! `egress-proxy routes suggest` (SPEC §3a): a draft routes file from what an agent did.
//!
//! Run the agent with `--mode report`, feed the proxy's log here, review what comes out,
//! run in `enforce` with it. The log's requests (decision `allow` or `report`) are
//! gathered per host, port, method and path; each host and port's paths are generalised
//! ([`generalise`]) into patterns grouped by the methods used on them; the result is
//! written as YAML by hand ([`render`]), sorted, so the same log gives the same bytes.
//!
//! Pure but for the reader it is handed: [`run`] opens the files and prints.

mod generalise;
mod input;
mod render;
mod run;

pub use run::suggest_routes;

use std::collections::BTreeMap;
use std::io::{self, BufRead};

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;

use crate::routes::{Host, OneSecret, RouteTable, parse_routes_text};
use generalise::{Generalised, Seen, generalise};
use input::{Line, Observed};

/// How many distinct requests (host, port, method, path) are held, and how many bytes of
/// them: a log of millions of distinct paths is summarised up to here, not held whole.
const MAX_DISTINCT: usize = 200_000;
const MAX_DISTINCT_BYTES: usize = 64 << 20;
/// And how many path segments in all: the generalisation builds prefix trees of them.
const MAX_DISTINCT_SEGMENTS: usize = 1_000_000;

/// A routes file given with `--routes`: its routes in file order as written (every key
/// the file had, through `RouteSpec`'s serde form), and the table that decides what they
/// already allow.
struct Existing {
    name: String,
    fields: Vec<Vec<(String, Value)>>,
    table: RouteTable,
}

/// Gathers requests from logs and drafts the routes for them.
pub struct Suggester {
    max_literal: usize,
    existing: Option<Existing>,
    /// (host, port) → (method, path) → requests.
    seen: BTreeMap<(String, u16), BTreeMap<(String, String), u64>>,
    distinct: usize,
    distinct_bytes: usize,
    distinct_segments: usize,
    /// Requests dropped because the bound above was reached.
    over_budget: u64,
}

impl Suggester {
    /// `max_literal`: a literal prefix with more distinct children than this becomes
    /// `prefix/**`.
    pub fn new(max_literal: usize) -> Suggester {
        Suggester {
            max_literal,
            existing: None,
            seen: BTreeMap::new(),
            distinct: 0,
            distinct_bytes: 0,
            distinct_segments: 0,
            over_budget: 0,
        }
    }

    /// Starts from a routes file's text (`name` is how errors name it). Its routes are read
    /// for what they allow only: the token variables and files it names need not exist.
    pub fn with_routes(mut self, name: &str, text: &str) -> Result<Suggester, String> {
        let file = parse_routes_text(text).map_err(|e| format!("{name}: {e}"))?;
        let fields = file
            .routes
            .iter()
            .map(|spec| {
                serde_json::to_string(spec)
                    .and_then(|json| serde_json::from_str::<Ordered>(&json))
                    .map(|o| o.0)
                    .map_err(|e| format!("{name}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // A placeholder answers every token variable and file: the table decides paths,
        // it never sends anything.
        let table = RouteTable::build(file, &OneSecret("placeholder"))
            .map_err(|e| format!("{name}: {e}"))?;
        self.existing = Some(Existing {
            name: name.to_owned(),
            fields,
            table,
        });
        Ok(self)
    }

    /// Reads one log. `warn` gets a line for each line that is skipped as malformed
    /// (`line N: …`, prefixed with `source: ` when `source` is given).
    pub fn read(
        &mut self,
        source: Option<&str>,
        reader: &mut dyn BufRead,
        warn: &mut dyn FnMut(&str),
    ) -> io::Result<()> {
        let mut buf = Vec::new();
        let mut n: u64 = 0;
        let prefix = source.map(|s| format!("{s}: ")).unwrap_or_default();
        while let Some(whole) = input::read_line(reader, &mut buf)? {
            n += 1;
            let line = if whole {
                input::parse_line(&buf)
            } else {
                Line::Bad(format!(
                    "longer than {} bytes, skipped",
                    input::MAX_LINE_BYTES
                ))
            };
            match line {
                Line::Request(o) => self.add(o),
                Line::Skip => {}
                Line::Bad(why) => warn(&format!("{prefix}line {n}: {why}")),
            }
        }
        Ok(())
    }

    fn add(&mut self, o: Observed) {
        let host = (o.host.to_string(), o.port);
        let key = (o.method, o.path);
        if let Some(count) = self.seen.get_mut(&host).and_then(|m| m.get_mut(&key)) {
            *count += 1;
            return;
        }
        // A new host is held only within the same bound as a new path.
        let bytes = host.0.len() + key.0.len() + key.1.len();
        let segments = key.1.matches('/').count();
        if self.distinct >= MAX_DISTINCT
            || self.distinct_bytes + bytes > MAX_DISTINCT_BYTES
            || self.distinct_segments + segments > MAX_DISTINCT_SEGMENTS
        {
            self.over_budget += 1;
            return;
        }
        self.distinct += 1;
        self.distinct_bytes += bytes;
        self.distinct_segments += segments;
        self.seen.entry(host).or_default().insert(key, 1);
    }

    /// The routes file (YAML), and lines for stderr about what it leaves out.
    pub fn finish(self) -> (String, Vec<String>) {
        let mut notes = Vec::new();
        if self.over_budget > 0 {
            notes.push(format!(
                "{} requests not counted: more than {MAX_DISTINCT} distinct requests (or {} MiB, or {MAX_DISTINCT_SEGMENTS} path segments, of them) in the input",
                self.over_budget,
                MAX_DISTINCT_BYTES >> 20
            ));
        }
        let (total, new_routes) = self.new_routes();
        let mut out = String::new();
        render::comment(
            &mut out,
            "",
            &format!(
                "Drafted by `egress-proxy routes suggest` from {total} requests: review every route before use."
            ),
        );
        let n_existing = self.existing.as_ref().map_or(0, |e| e.fields.len());
        let n_new: usize = new_routes.iter().map(|r| r.generalised.groups.len()).sum();
        out.push_str(if n_existing + n_new == 0 {
            "routes: []\n"
        } else {
            "routes:\n"
        });
        if let Some(e) = &self.existing {
            if !e.fields.is_empty() {
                render::comment(&mut out, "  ", &format!("From {}, unchanged.", e.name));
            }
            for fields in &e.fields {
                render::route(&mut out, fields);
            }
        }
        let mut left_out = Vec::new();
        for NewRoutes {
            host,
            parsed,
            port,
            generalised: g,
        } in &new_routes
        {
            let token_route = parsed.as_ref().and_then(|h| self.token_route(h, *port));
            for group in &g.groups {
                write_route(&mut out, host, *port, group, token_route);
            }
            left_out.extend(g.left_out.iter().map(|s| {
                format!(
                    "{} {} on {host}:{port} ({}): only a route allowing every path would allow it",
                    s.method,
                    truncate(&generalise::mask_identifiers(&s.path)),
                    requests(s.count),
                )
            }));
        }
        if !left_out.is_empty() {
            render::comment(
                &mut out,
                "",
                "Not suggested (allow by hand if the agent needs it):",
            );
            for l in &left_out {
                render::comment(&mut out, "", &format!("  {l}"));
            }
            notes.extend(left_out.into_iter().map(|l| format!("not suggested: {l}")));
        }
        (out, notes)
    }

    /// How many requests were counted, and what the `--routes` file does not already
    /// allow, generalised, per host and port.
    fn new_routes(&self) -> (u64, Vec<NewRoutes<'_>>) {
        let mut total = 0;
        let mut out = Vec::new();
        for ((host, port), by_path) in &self.seen {
            let parsed = Host::parse(host).ok();
            let mut fresh = Vec::new();
            for ((method, path), count) in by_path {
                total += count;
                let allowed = match (
                    &self.existing,
                    &parsed,
                    http::Method::from_bytes(method.as_bytes()),
                ) {
                    (Some(e), Some(h), Ok(m)) => e.table.decide(h, *port, &m, path).is_ok(),
                    _ => false,
                };
                if !allowed {
                    fresh.push(Seen {
                        method: method.clone(),
                        path: path.clone(),
                        count: *count,
                    });
                }
            }
            if !fresh.is_empty() {
                out.push(NewRoutes {
                    host,
                    parsed,
                    port: *port,
                    generalised: generalise(&fresh, self.max_literal),
                });
            }
        }
        (total, out)
    }

    /// The first `--routes` route that injects a token for this host and port.
    fn token_route(&self, host: &Host, port: u16) -> Option<usize> {
        let e = self.existing.as_ref()?;
        e.table
            .routes()
            .iter()
            .find(|r| r.injection.is_some() && r.covers(host, port))
            .map(|r| r.index)
    }
}

/// What one host and port saw that the `--routes` file does not allow, generalised.
struct NewRoutes<'a> {
    host: &'a str,
    /// The host as routes match it, parsed once (every logged host parsed on input).
    parsed: Option<Host>,
    port: u16,
    generalised: Generalised,
}

/// One new route: its comments, then its keys.
fn write_route(
    out: &mut String,
    host: &str,
    port: u16,
    group: &generalise::Group,
    token_route: Option<usize>,
) {
    render::comment(
        out,
        "  ",
        &format!(
            "{}, e.g. {}",
            requests(group.count),
            truncate(&group.example)
        ),
    );
    if let Some(i) = token_route {
        render::comment(
            out,
            "  ",
            &format!(
                "No token: routes[{i}] above injects one for {host}; add token settings here only if these paths need it."
            ),
        );
    }
    let mut fields = vec![("host".to_owned(), Value::from(host))];
    if port != 443 {
        fields.push(("ports".into(), Value::from(vec![port])));
    }
    fields.push(("methods".into(), Value::from(group.methods.clone())));
    fields.push(("path_allowlist".into(), Value::from(group.patterns.clone())));
    render::route(out, &fields);
}

fn requests(n: u64) -> String {
    format!("{n} request{}", if n == 1 { "" } else { "s" })
}

/// An example path in a comment, cut to a readable length.
fn truncate(path: &str) -> String {
    const MAX: usize = 160;
    match path.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &path[..i]),
        None => path.to_owned(),
    }
}

/// A JSON object's entries in the order written (serde_json's own map sorts them).
struct Ordered(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    entries.push((k, v));
                }
                Ok(Ordered(entries))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests;
