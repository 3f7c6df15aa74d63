//! The generalisation's rules on tables of paths, its cover check against the pairwise
//! definition, and its cost on a log with many paths.

use proptest::prelude::*;

use super::*;

#[test]
fn identifiers_and_names_on_real_shapes() {
    use Class::*;
    for (segment, class) in [
        // Names people and registries choose stay literal.
        ("widgets", Word),
        ("git-upload-pack", Word),
        ("git-receive-pack", Word),
        ("messages", Word),
        ("count_tokens", Word),
        ("index.html", Word),
        ("requests-2.31.0.tar.gz", Word),
        ("requests-2.31.0-py3-none-any.whl", Word),
        (
            "numpy-1.26.4-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
            Word,
        ),
        ("claude-sonnet-4-20250514", Word),
        ("widgets.git", Word),
        ("@scope%2fname", Word),
        // Standard base64 with its `+` and `=` escaped is one run, and a token.
        ("dGhpc2lzYXNl%2BY3JldGtleQ%3D%3D", Token),
        ("v1", Word),
        ("3.12", Word),
        ("8e", Word),
        ("internationalization", Word),
        ("ubuntu-22-04-lts-release-notes", Word),
        ("2024-01-15", Word),
        ("defaced", Word),
        ("left-pad-1.3.0.tgz", Word),
        ("x86_64-unknown-linux-gnu", Word),
        // Identifiers become `*`.
        ("123", Number),
        ("7421983113", Number),
        ("0", Number),
        ("123e4567-e89b-12d3-a456-426614174000", Uuid),
        ("123E4567-E89B-12D3-A456-426614174000", Uuid),
        ("e83c516", Hex),
        ("9fceb02d0ae598e95dc970b74767f19372d61af8", Hex),
        (
            "0e2d847013cb52cd35b38c009bb167a1a26b2ce6cd6965bf26b47bc0bf44",
            Hex,
        ),
        ("file-XjGxS3KTG0uNmNOK362iJua3", Token),
        ("msg_01XFDUDYJgAACzvnptvVoYEL", Token),
        ("msgbatch_01HkcTjaV5uDC8jWR4ZsDV8d", Token),
        (
            "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
            Token,
        ),
        ("bot123456:ABC-DEF1234ghIkl-zyx57W2v1u123ew11", Token),
        ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0", Token),
        ("aB3-xY_9kLmN-pQ7_rStUv-Wx1_yZ", Token),
    ] {
        assert_eq!(classify(segment), class, "{segment}");
    }
}

fn seen(list: &[(&str, &str)]) -> Vec<Seen> {
    let mut out: Vec<Seen> = Vec::new();
    for (method, path) in list {
        match out
            .iter_mut()
            .find(|s| s.method == *method && s.path == *path)
        {
            Some(s) => s.count += 1,
            None => out.push(Seen {
                method: (*method).into(),
                path: (*path).into(),
                count: 1,
            }),
        }
    }
    out
}

fn groups(list: &[(&str, &str)], max_literal: usize) -> Vec<(Vec<String>, Vec<String>)> {
    generalise(&seen(list), max_literal)
        .groups
        .into_iter()
        .map(|g| (g.methods, g.patterns))
        .collect()
}

fn owned(groups: &[(&[&str], &[&str])]) -> Vec<(Vec<String>, Vec<String>)> {
    groups
        .iter()
        .map(|(m, p)| {
            (
                m.iter().map(|s| s.to_string()).collect(),
                p.iter().map(|s| s.to_string()).collect(),
            )
        })
        .collect()
}

#[test]
fn the_steps_in_order() {
    for (name, input, max, expect) in [
        (
            "identifiers become `*`, one pattern for their shape",
            &[
                ("GET", "/items/1/x"),
                ("GET", "/items/2/x"),
                ("GET", "/items/abc/x"),
            ][..],
            8,
            &[(&["GET"][..], &["/items/*/x", "/items/abc/x"][..])][..],
        ),
        (
            "a segment with `*` cannot be held literally",
            &[("GET", "/a/b*c")],
            8,
            &[(&["GET"], &["/a/*"])],
        ),
        (
            "more than max-literal children: prefix/**",
            &[("GET", "/d/a"), ("GET", "/d/b"), ("GET", "/d/c")],
            2,
            &[(&["GET"], &["/d/**"])],
        ),
        (
            "max-literal children exactly: literal prefixes",
            &[("GET", "/d/a"), ("GET", "/d/b")],
            2,
            &[(&["GET"], &["/d/a", "/d/b"])],
        ),
        (
            "the root's children are never collapsed",
            &[("GET", "/a"), ("GET", "/b"), ("GET", "/c")],
            0,
            &[(&["GET"], &["/a", "/b", "/c"])],
        ),
        (
            "a prefix below a wildcard collapses when it holds a literal",
            &[("GET", "/1/l/a"), ("GET", "/1/l/b"), ("GET", "/1/l/c")],
            2,
            &[(&["GET"], &["/*/l/**"])],
        ),
        (
            "`*` alone is not a prefix to collapse",
            &[("GET", "/1/a"), ("GET", "/1/b"), ("GET", "/1/c")],
            2,
            &[(&["GET"], &["/*/a", "/*/b", "/*/c"])],
        ),
        (
            "one DELETE does not allow DELETE everywhere",
            &[("GET", "/r/a"), ("GET", "/r/b"), ("DELETE", "/r/b/c")],
            8,
            &[(&["GET"], &["/r/a", "/r/b"]), (&["DELETE"], &["/r/b/c"])],
        ),
        (
            "methods in a fixed order",
            &[
                ("DELETE", "/x"),
                ("POST", "/x"),
                ("GET", "/x"),
                ("PURGE", "/x"),
                ("HEAD", "/x"),
            ],
            8,
            &[(&["GET", "HEAD", "POST", "DELETE", "PURGE"], &["/x"])],
        ),
        (
            "a literal prefix covers what is below it",
            &[
                ("POST", "/v1/messages"),
                ("POST", "/v1/messages/count_tokens"),
            ],
            8,
            &[(&["POST"], &["/v1/messages"])],
        ),
        (
            "a trailing slash after a wildcard needs /**",
            &[("GET", "/simple/123/")],
            8,
            &[(&["GET"], &["/simple/*/**"])],
        ),
        (
            "wildcards alone would allow any path of their shape: kept literally",
            &[("GET", "/1/2/3"), ("GET", "/123"), ("GET", "/a/1")],
            8,
            &[(&["GET"], &["/1/2/3", "/123", "/a/*"])],
        ),
        (
            "wildcards alone before /** would allow nearly everything: kept literally (one literal is enough)",
            &[("GET", "/123/"), ("GET", "/456/x/")],
            8,
            &[(&["GET"], &["/*/x/**", "/123"])],
        ),
        (
            "and left out when a `*` in it cannot be held literally",
            &[("GET", "/123/a*b%2Fc"), ("GET", "/ok")],
            8,
            &[(&["GET"], &["/ok"])],
        ),
        (
            "an encoded slash stays literal",
            &[("GET", "/@scope%2fname"), ("GET", "/@scope%2Fname")],
            8,
            &[(&["GET"], &["/@scope%2Fname"])],
        ),
        (
            "an identifier holding an encoded slash stays literal too (SPEC §3a)",
            &[
                ("GET", "/projects/XjGxS3KTG0uNmNOK362iJua3%2Fx/issues"),
                ("GET", "/projects/group%2Frepo"),
            ],
            8,
            &[(
                &["GET"],
                &[
                    "/projects/XjGxS3KTG0uNmNOK362iJua3%2Fx/issues",
                    "/projects/group%2Frepo",
                ],
            )],
        ),
        (
            "a `*`, which no pattern holds, beside an encoded slash: below the prefix",
            &[("GET", "/projects/a*b%2Fx/issues")],
            8,
            &[(&["GET"], &["/projects/**"])],
        ),
        (
            "escapes' case does not make two children",
            &[("GET", "/a%2fb/x"), ("GET", "/a%2Fb/y")],
            1,
            &[(&["GET"], &["/a%2Fb/**"])],
        ),
    ] {
        assert_eq!(groups(input, max), owned(expect), "{name}");
    }
}

#[test]
fn what_only_slash_star_star_would_allow_is_left_out() {
    for path in ["/", "/a*%2Fb"] {
        let g = generalise(&seen(&[("GET", path), ("GET", "/ok")]), 8);
        assert_eq!(g.left_out.len(), 1, "{path}");
        assert_eq!(g.left_out[0].path, path);
        assert_eq!(g.groups.len(), 1);
        assert_eq!(g.groups[0].patterns, ["/ok"]);
    }
}

#[test]
fn examples_mask_what_looks_generated_and_keep_numbers() {
    for (path, shown) in [
        (
            "/v1/files/file-XjGxS3KTG0uNmNOK362iJua3/content",
            "/v1/files/<id>/content",
        ),
        (
            "/bot/ab12cd34-0000-1111-2222-333344445555/send",
            "/bot/<id>/send",
        ),
        ("/keys/0123456789abcdef0123456789abcdef", "/keys/<id>"),
    ] {
        assert_eq!(mask_identifiers(path), shown);
    }
    assert_eq!(
        mask_identifiers("/repos/acme/widgets/issues/123"),
        "/repos/acme/widgets/issues/123"
    );
    let g = generalise(
        &seen(&[("GET", "/bot123456:ABC-DEF1234ghIkl-zyx57W2v1u123ew11/getMe")]),
        8,
    );
    assert_eq!(g.groups[0].example, "GET /<id>/getMe");
    assert_eq!(g.groups[0].patterns, ["/*/getMe"]);
}

/// Real sessions' URL shapes (tests/fixtures/suggest), one table row per API.
#[test]
fn real_sessions_generalise() {
    let fixtures = crate::suggest::tests::fixtures();
    for (name, expect) in [
        (
            "github",
            &[
                (
                    &["GET"][..],
                    &[
                        "/repos/acme/widgets/actions/runs/*/jobs",
                        "/repos/acme/widgets/commits/*",
                        "/repos/acme/widgets/contents/src/main.rs",
                        "/repos/acme/widgets/git/refs/heads/main",
                        "/repos/acme/widgets/issues/*",
                        "/repos/acme/widgets/pulls/*/files",
                        "/user",
                    ][..],
                ),
                (&["GET", "POST"], &["/repos/acme/widgets/issues/*/comments"]),
                (&["GET", "PATCH"], &["/repos/acme/widgets/pulls/*"]),
                (
                    &["DELETE"],
                    &["/repos/acme/widgets/git/refs/heads/feature-x"],
                ),
            ][..],
        ),
        (
            "git",
            &[
                (&["GET"], &["/acme/widgets.git/info/refs"]),
                (
                    &["POST"],
                    &[
                        "/acme/widgets.git/git-receive-pack",
                        "/acme/widgets.git/git-upload-pack",
                    ],
                ),
            ],
        ),
        (
            "npm",
            &[(
                &["GET"],
                &[
                    "/@anthropic-ai%2Fsdk",
                    "/@anthropic-ai/sdk/-/sdk-0.39.0.tgz",
                    "/@types%2Fnode",
                    "/@types/node/-/node-20.11.5.tgz",
                    "/left-pad",
                    "/undici-types",
                ],
            )],
        ),
        (
            "pypi",
            &[
                (
                    &["GET"],
                    &[
                        "/packages/*/8e/*/requests-2.31.0-py3-none-any.whl",
                        "/packages/ab/cd/*/idna-3.6-py3-none-any.whl",
                        "/packages/ba/fe/*/requests-2.31.0.tar.gz",
                    ],
                ),
                (
                    &["GET"],
                    &[
                        "/pypi/requests/json",
                        "/simple/idna",
                        "/simple/requests",
                        "/simple/urllib3",
                    ],
                ),
            ],
        ),
        (
            "anthropic",
            &[
                (&["GET"], &["/v1/messages/batches/*", "/v1/models"]),
                (&["POST"], &["/v1/messages"]),
            ],
        ),
        (
            "openai",
            &[
                (&["GET"], &["/v1/models", "/v1/responses/*"]),
                (&["GET", "DELETE"], &["/v1/files/*"]),
                (
                    &["POST"],
                    &["/v1/chat/completions", "/v1/files", "/v1/responses"],
                ),
            ],
        ),
        (
            "docs",
            &[(
                &["GET"],
                &[
                    "/*/_static/basic.css",
                    "/*/_static/pygments.css",
                    "/*/library/**",
                    "/*/tutorial/index.html",
                ],
            )],
        ),
    ] {
        let by_host = &fixtures[name];
        let got: Vec<(Vec<String>, Vec<String>)> = by_host
            .iter()
            .flat_map(|(_, seen)| generalise(seen, 8).groups)
            .map(|g| (g.methods, g.patterns))
            .collect();
        assert_eq!(got, owned(expect), "{name}");
    }
}

fn segment_covers(q: &Seg, p: &Seg) -> bool {
    match (q, p) {
        (Seg::One, Seg::Lit(s)) => !has_encoded_separator(s),
        (q, p) => q == p,
    }
}

/// The definition: does pattern `q` match every path pattern `p` matches?
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

/// [`without_covered`] by its definition: every pair compared.
fn without_covered_pairwise(patterns: &BTreeSet<Pattern>) -> Vec<Pattern> {
    let all: Vec<&Pattern> = patterns.iter().collect();
    all.iter()
        .enumerate()
        .filter(|(i, p)| {
            !all.iter()
                .enumerate()
                .any(|(j, q)| j != *i && covers(q, p) && (j < *i || !covers(p, q)))
        })
        .map(|(_, p)| (*p).clone())
        .collect()
}

fn any_pattern() -> impl Strategy<Value = Pattern> {
    let seg = prop_oneof![
        4 => prop::sample::select(vec!["a", "b", "a%2Fb"]).prop_map(|s| Seg::Lit(s.to_owned())),
        2 => Just(Seg::One),
    ];
    (prop::collection::vec(seg, 1..4), any::<bool>()).prop_map(|(mut p, tail)| {
        if tail {
            p.push(Seg::Tail);
        }
        p
    })
}

proptest! {
    #[test]
    fn the_tree_walk_drops_what_the_pairwise_definition_drops(
        patterns in prop::collection::btree_set(any_pattern(), 0..12)
    ) {
        prop_assert_eq!(without_covered(patterns.clone()), without_covered_pairwise(&patterns));
    }
}

/// A host with tens of thousands of distinct paths (a docs site crawled whole) is drafted
/// without comparing every pattern with every other (which took minutes here).
#[test]
fn many_distinct_paths_are_generalised_in_one_pass() {
    let paths: Vec<(String, String)> = (0..20_000)
        .map(|i| ("GET".to_owned(), format!("/page-{i}/part-{}", i % 7)))
        .collect();
    let list: Vec<(&str, &str)> = paths
        .iter()
        .map(|(m, p)| (m.as_str(), p.as_str()))
        .collect();
    let g = generalise(&seen(&list), 8);
    assert_eq!(g.groups.len(), 1);
    assert_eq!(g.groups[0].patterns.len(), 20_000);
}

/// Patterns whose cover walks branch at every literal (`1` under `*`, `a` under `a`) are
/// drafted without the walks growing with every branch: each has a budget, and a pattern
/// whose walk runs out is kept (redundant at worst, never wider).
#[test]
fn branching_cover_walks_are_bounded() {
    let a = vec!["a"; 30];
    let mut paths = Vec::new();
    for k in 0..200 {
        paths.push(format!("/w{k}/{}", a.join("/")));
    }
    for i in 0..30 {
        for j in i + 1..30 {
            let mut segs = a.clone();
            segs[i] = "1";
            segs[j] = "1";
            paths.push(format!("/1/{}", segs.join("/")));
        }
    }
    let list: Vec<(&str, &str)> = paths.iter().map(|p| ("GET", p.as_str())).collect();
    let g = generalise(&seen(&list), 8);
    assert_eq!(g.groups.len(), 1);
    assert!(!g.groups[0].patterns.is_empty());
}
