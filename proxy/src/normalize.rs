//! Request path normalization before routing, with Istio's options
//! (`meshConfig.pathNormalization`). The normalized path is what routes match, what policies
//! will see, and what the backend receives, so `/public/../secret` can never be routed by a
//! `/public` rule and then read as `/secret` by the backend.
//!
//! In order: `%2F`/`%5C` decoded (`DECODE_AND_MERGE_SLASHES` only); percent-encoded
//! unreserved characters decoded and other escapes' hex digits uppercased (RFC 3986 §6.2.2);
//! backslashes turned into slashes; dot segments removed (RFC 3986 §5.2.4); runs of slashes
//! merged (`MERGE_SLASHES` and up). `%00` is refused under every option. A path that needs
//! none of this (the common case) is returned as it is, without a copy.

use std::borrow::Cow;

use crate::config::PathNormalization;

/// Why a path is refused (answered 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path contains an encoded NUL (%00)")]
    EncodedNul,
}

/// Normalizes `path` (no query) under `mode`.
pub fn normalize(path: &str, mode: PathNormalization) -> Result<Cow<'_, str>, PathError> {
    let b = path.as_bytes();
    let has_pct = b.contains(&b'%');
    if has_pct && has_encoded_nul(b) {
        return Err(PathError::EncodedNul);
    }
    if mode == PathNormalization::None || !path.starts_with('/') {
        return Ok(Cow::Borrowed(path));
    }
    let merge = mode != PathNormalization::Base;
    let needs =
        has_pct || b.contains(&b'\\') || b.windows(2).any(|w| w == b"/." || (merge && w == b"//"));
    if !needs {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode(b, mode == PathNormalization::DecodeAndMergeSlashes);
    let mut p = remove_dot_segments(&decoded);
    if merge {
        p = merge_slashes(&p);
    }
    Ok(if p == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(p)
    })
}

fn has_encoded_nul(b: &[u8]) -> bool {
    b.windows(3).any(|w| w == b"%00")
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

/// Decodes escapes of unreserved characters (and of `/` and `\` with `slashes`), uppercases
/// the hex of the others, turns `\` into `/`. Decoding happens once: `%252e` stays `%252E`.
fn decode(b: &[u8], slashes: bool) -> String {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            let v = h * 16 + l;
            if unreserved(v) || (slashes && (v == b'/' || v == b'\\')) {
                out.push(if v == b'\\' { b'/' } else { v });
            } else {
                out.push(b'%');
                out.push(b[i + 1].to_ascii_uppercase());
                out.push(b[i + 2].to_ascii_uppercase());
            }
            i += 3;
            continue;
        }
        out.push(if c == b'\\' { b'/' } else { c });
        i += 1;
    }
    // Only ASCII bytes were replaced by ASCII bytes; everything else was copied whole.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// RFC 3986 §5.2.4 on an absolute path.
fn remove_dot_segments(path: &str) -> String {
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, seg) in segments.into_iter().enumerate() {
        match seg {
            "." => {}
            ".." => {
                out.pop();
            }
            s => {
                out.push(s);
                continue;
            }
        }
        // A trailing `.` or `..` leaves a directory: `/a/b/..` → `/a/`.
        if i == last {
            out.push("");
        }
    }
    let mut s = String::with_capacity(path.len());
    for seg in out {
        s.push('/');
        s.push_str(seg);
    }
    if s.is_empty() {
        s.push('/');
    }
    s
}

fn merge_slashes(path: &str) -> String {
    let mut s = String::with_capacity(path.len());
    let mut prev_slash = false;
    for c in path.chars() {
        if c == '/' && prev_slash {
            continue;
        }
        prev_slash = c == '/';
        s.push(c);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use PathNormalization::*;

    fn n(p: &str, m: PathNormalization) -> String {
        normalize(p, m).unwrap().into_owned()
    }

    #[test]
    fn base_removes_dot_segments_and_decodes_unreserved() {
        for (input, want) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/public/../secret", "/secret"),
            ("/public/%2e%2e/secret", "/secret"),
            ("/public/%2E%2E/secret", "/secret"),
            ("/public/.%2e/secret", "/secret"),
            ("/a/./b", "/a/b"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/..", "/"),
            ("/../../x", "/x"),
            ("/a/..b/c", "/a/..b/c"),
            ("/%7Euser/%41%62c", "/~user/Abc"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%2Fb/..%2f..", "/a%2Fb/..%2F.."),
            ("/a\\..\\b", "/b"),
            ("/\\da", "//da"),
            ("/a//b", "/a//b"),
            ("/a%20b", "/a%20b"),
            ("/%252e%252e/x", "/%252e%252e/x"),
            ("/%zz/x", "/%zz/x"),
            ("/x%", "/x%"),
        ] {
            assert_eq!(n(input, Base), want, "{input}");
        }
    }

    #[test]
    fn merge_slashes_merges_after_base() {
        assert_eq!(n("/a//b///c", MergeSlashes), "/a/b/c");
        assert_eq!(n("//a/../b", MergeSlashes), "/b");
        assert_eq!(n("/a%2f%2fb", MergeSlashes), "/a%2F%2Fb");
    }

    #[test]
    fn decode_and_merge_slashes_decodes_encoded_slashes_first() {
        assert_eq!(n("/a%2fb", DecodeAndMergeSlashes), "/a/b");
        assert_eq!(n("/public%2f..%2fsecret", DecodeAndMergeSlashes), "/secret");
        assert_eq!(n("/a%5c..%5cb", DecodeAndMergeSlashes), "/b");
        assert_eq!(n("/a%2f%2fb", DecodeAndMergeSlashes), "/a/b");
    }

    #[test]
    fn none_keeps_the_path_but_still_refuses_nul() {
        assert_eq!(n("/public/../secret", None), "/public/../secret");
        assert_eq!(normalize("/a%00b", None), Err(PathError::EncodedNul));
        assert_eq!(normalize("/a%00b", Base), Err(PathError::EncodedNul));
    }

    #[test]
    fn clean_paths_are_not_copied() {
        assert!(matches!(
            normalize("/api/v1/items", Base),
            Ok(Cow::Borrowed(_))
        ));
        assert!(matches!(
            normalize("/a.b/c.d", MergeSlashes),
            Ok(Cow::Borrowed(_))
        ));
        assert!(matches!(normalize("*", Base), Ok(Cow::Borrowed(_))));
    }
}
