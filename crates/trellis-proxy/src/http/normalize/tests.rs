use std::borrow::Cow;

use super::PathError::*;
use super::{PathError, PathNormalization};

/// What each level makes of a path: the normalized path, or why it is refused.
type Expect = Result<&'static str, PathError>;

/// (path, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES)
const TABLE: &[(&str, Expect, Expect, Expect)] = &[
    // Already normal: unchanged at every level.
    ("/", Ok("/"), Ok("/"), Ok("/")),
    ("/admin/x", Ok("/admin/x"), Ok("/admin/x"), Ok("/admin/x")),
    ("/public/", Ok("/public/"), Ok("/public/"), Ok("/public/")),
    (
        "/a.b/..c/...",
        Ok("/a.b/..c/..."),
        Ok("/a.b/..c/..."),
        Ok("/a.b/..c/..."),
    ),
    // The bypasses of the issue, and their cousins.
    ("//admin/x", Ok("//admin/x"), Ok("/admin/x"), Ok("/admin/x")),
    ("/admin//x", Ok("/admin//x"), Ok("/admin/x"), Ok("/admin/x")),
    (
        "///admin///x//",
        Ok("///admin///x//"),
        Ok("/admin/x/"),
        Ok("/admin/x/"),
    ),
    ("/%61dmin/x", Ok("/admin/x"), Ok("/admin/x"), Ok("/admin/x")),
    ("/%41DMIN/x", Ok("/ADMIN/x"), Ok("/ADMIN/x"), Ok("/ADMIN/x")),
    ("/./admin/x", Ok("/admin/x"), Ok("/admin/x"), Ok("/admin/x")),
    (
        "/x/../admin/x",
        Ok("/admin/x"),
        Ok("/admin/x"),
        Ok("/admin/x"),
    ),
    ("/admin/./x", Ok("/admin/x"), Ok("/admin/x"), Ok("/admin/x")),
    (
        "/x/%2e%2e/admin/x",
        Ok("/admin/x"),
        Ok("/admin/x"),
        Ok("/admin/x"),
    ),
    ("/x/.%2E/admin", Ok("/admin"), Ok("/admin"), Ok("/admin")),
    ("/x//../admin", Ok("/x/admin"), Ok("/admin"), Ok("/admin")),
    // Case is meaning: `/ADMIN` is another path (policy is case-sensitive, as paths are).
    ("/ADMIN", Ok("/ADMIN"), Ok("/ADMIN"), Ok("/ADMIN")),
    // Trailing dots leave a directory.
    ("/admin/.", Ok("/admin/"), Ok("/admin/"), Ok("/admin/")),
    ("/admin/x/..", Ok("/admin/"), Ok("/admin/"), Ok("/admin/")),
    ("/x/..", Ok("/"), Ok("/"), Ok("/")),
    ("/.", Ok("/"), Ok("/"), Ok("/")),
    // Above the root: refused (nginx says 400 too; Envoy would clamp to `/`).
    ("/..", Err(AboveRoot), Err(AboveRoot), Err(AboveRoot)),
    (
        "/%2e%2e/admin",
        Err(AboveRoot),
        Err(AboveRoot),
        Err(AboveRoot),
    ),
    (
        "/x/../../admin",
        Err(AboveRoot),
        Err(AboveRoot),
        Err(AboveRoot),
    ),
    // Encoded slashes and backslashes: refused unless decoding them is asked for.
    (
        "/admin%2fx",
        Err(EncodedSlash),
        Err(EncodedSlash),
        Ok("/admin/x"),
    ),
    (
        "/admin%2Fx",
        Err(EncodedSlash),
        Err(EncodedSlash),
        Ok("/admin/x"),
    ),
    (
        "/x%2F..%2Fadmin",
        Err(EncodedSlash),
        Err(EncodedSlash),
        Ok("/admin"),
    ),
    (
        "/admin%5cx",
        Err(EncodedBackslash),
        Err(EncodedBackslash),
        Ok("/admin/x"),
    ),
    ("/admin\\x", Err(Backslash), Err(Backslash), Ok("/admin/x")),
    (
        "/x\\..\\admin",
        Err(Backslash),
        Err(Backslash),
        Ok("/admin"),
    ),
    // Bad percent-encoding and control characters: always refused.
    (
        "/%zz",
        Err(BadPercentEncoding),
        Err(BadPercentEncoding),
        Err(BadPercentEncoding),
    ),
    (
        "/%4",
        Err(BadPercentEncoding),
        Err(BadPercentEncoding),
        Err(BadPercentEncoding),
    ),
    (
        "/%",
        Err(BadPercentEncoding),
        Err(BadPercentEncoding),
        Err(BadPercentEncoding),
    ),
    (
        "/a%00",
        Err(ControlCharacter),
        Err(ControlCharacter),
        Err(ControlCharacter),
    ),
    (
        "/a%0d%0aX: y",
        Err(ControlCharacter),
        Err(ControlCharacter),
        Err(ControlCharacter),
    ),
    (
        "/a%7F",
        Err(ControlCharacter),
        Err(ControlCharacter),
        Err(ControlCharacter),
    ),
    (
        "/a\u{0}b",
        Err(ControlCharacter),
        Err(ControlCharacter),
        Err(ControlCharacter),
    ),
    // Other escapes stay encoded (hex uppercased): an overlong UTF-8 dot is no dot.
    (
        "/%C0%AE%C0%AE/admin",
        Ok("/%C0%AE%C0%AE/admin"),
        Ok("/%C0%AE%C0%AE/admin"),
        Ok("/%C0%AE%C0%AE/admin"),
    ),
    (
        "/x/%c0%ae%c0%ae/admin",
        Ok("/x/%C0%AE%C0%AE/admin"),
        Ok("/x/%C0%AE%C0%AE/admin"),
        Ok("/x/%C0%AE%C0%AE/admin"),
    ),
    (
        "/a%20b%3f",
        Ok("/a%20b%3F"),
        Ok("/a%20b%3F"),
        Ok("/a%20b%3F"),
    ),
    ("/%25%32%66", Ok("/%252f"), Ok("/%252f"), Ok("/%252f")),
    // Not a path.
    (
        "admin",
        Err(NotAbsolute),
        Err(NotAbsolute),
        Err(NotAbsolute),
    ),
    ("*", Err(NotAbsolute), Err(NotAbsolute), Err(NotAbsolute)),
    ("", Err(NotAbsolute), Err(NotAbsolute), Err(NotAbsolute)),
];

#[test]
fn every_level_on_every_attacker_form() {
    let mut failures = Vec::new();
    for (path, base, merge, decode) in TABLE {
        for (level, want) in [
            (PathNormalization::Base, base),
            (PathNormalization::MergeSlashes, merge),
            (PathNormalization::DecodeAndMergeSlashes, decode),
        ] {
            let got = level.normalize(path);
            let got = got.as_ref().map(|p| p.as_ref()).map_err(|e| *e);
            if got != *want {
                failures.push(format!("{level:?} {path:?}: got {got:?}, want {want:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn none_passes_everything_through() {
    for (path, ..) in TABLE {
        assert_eq!(
            PathNormalization::None.normalize(path),
            Ok(Cow::Borrowed(*path))
        );
    }
}

#[test]
fn a_normal_path_is_borrowed_not_copied() {
    for path in ["/", "/admin/x", "/a/b/c.d/", "/a-b_c~d/e.f"] {
        for level in [
            PathNormalization::Base,
            PathNormalization::MergeSlashes,
            PathNormalization::DecodeAndMergeSlashes,
        ] {
            assert!(
                matches!(level.normalize(path), Ok(Cow::Borrowed(_))),
                "{level:?} {path}"
            );
        }
    }
}

#[test]
fn normalizing_twice_changes_nothing() {
    for (path, ..) in TABLE {
        for level in [
            PathNormalization::Base,
            PathNormalization::MergeSlashes,
            PathNormalization::DecodeAndMergeSlashes,
        ] {
            if let Ok(once) = level.normalize(path) {
                let twice = level.normalize(&once);
                assert_eq!(twice.as_deref(), Ok(once.as_ref()), "{level:?} {path:?}");
                assert!(
                    matches!(twice, Ok(Cow::Borrowed(_))),
                    "{level:?} {path:?}: the normal form is not recognized as normal"
                );
            }
        }
    }
}

#[test]
fn the_default_merges_slashes() {
    assert_eq!(
        PathNormalization::default(),
        PathNormalization::MergeSlashes
    );
}
