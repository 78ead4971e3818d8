//! Request-path normalization before authorization, as Istio's `pathNormalization`:
//! policy must judge the path the app will serve, so the proxy normalizes it once,
//! authorizes the result and hands the app that same path. What would stay ambiguous
//! between servers (an encoded slash or backslash, bad percent-encoding, control
//! bytes, `..` above the root) is refused with 400 instead of guessed at.
//!
//! An already-normal path (the usual case) is only scanned: nothing is allocated.

use std::borrow::Cow;

/// How far paths are normalized; set per proxy (`--path-normalization`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PathNormalization {
    /// Paths are passed as they came and checked as they came. Unsafe with any
    /// path rule: `/%61dmin` is not `/admin` to policy, but is to most servers.
    #[value(name = "NONE")]
    None,
    /// RFC 3986: percent-encoded unreserved characters are decoded, the hex of other
    /// escapes is uppercased, dot segments are removed; ambiguous paths get 400.
    #[value(name = "BASE")]
    Base,
    /// BASE, and runs of slashes become one (as nginx and most servers do).
    #[default]
    #[value(name = "MERGE_SLASHES")]
    MergeSlashes,
    /// MERGE_SLASHES, and `%2F`, `%5C` and `\` become `/` instead of being refused.
    #[value(name = "DECODE_AND_MERGE_SLASHES")]
    DecodeAndMergeSlashes,
}

/// Why a path was refused (400).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path does not start with '/'")]
    NotAbsolute,
    #[error("the path has an encoded slash (%2F)")]
    EncodedSlash,
    #[error("the path has an encoded backslash (%5C)")]
    EncodedBackslash,
    #[error("the path has a backslash")]
    Backslash,
    #[error("the path has invalid percent-encoding")]
    BadPercentEncoding,
    #[error("the path has a control character")]
    ControlCharacter,
    #[error("the path climbs above the root with '..'")]
    AboveRoot,
}

impl PathNormalization {
    /// The normalized form of `path` (the path component only, without the query),
    /// borrowed when it is already normal.
    pub fn normalize(self, path: &str) -> Result<Cow<'_, str>, PathError> {
        if self == PathNormalization::None {
            return Ok(Cow::Borrowed(path));
        }
        if !path.starts_with('/') {
            return Err(PathError::NotAbsolute);
        }
        if self.is_normal(path.as_bytes())? {
            return Ok(Cow::Borrowed(path));
        }
        let decoded = self.decode(path.as_bytes())?;
        let merge = self != PathNormalization::Base;
        let resolved = remove_dot_segments(&decoded, merge)?;
        // Only ASCII is ever written (other bytes are kept as they came, inside a
        // `str`), but a failed conversion is a refusal, never a panic.
        String::from_utf8(resolved)
            .map(Cow::Owned)
            .map_err(|_| PathError::BadPercentEncoding)
    }

    /// The fast path: `true` when nothing would change. Errors found on the way are
    /// reported here already (a control byte cannot be fixed by normalizing).
    fn is_normal(self, path: &[u8]) -> Result<bool, PathError> {
        let merge = self != PathNormalization::Base;
        let mut segment_start = 0;
        for (i, &b) in path.iter().enumerate() {
            match b {
                b'%' if !is_kept_escape(&path[i..]) => return Ok(false),
                b'\\' => return Ok(false),
                0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
                b'/' => {
                    if i > 0 && is_dot_segment(&path[segment_start..i]) {
                        return Ok(false);
                    }
                    if merge && i > 0 && path[i - 1] == b'/' {
                        return Ok(false);
                    }
                    segment_start = i + 1;
                }
                _ => {}
            }
        }
        Ok(!is_dot_segment(&path[segment_start..]))
    }

    /// Decodes what RFC 3986 says is the same resource (unreserved characters) and,
    /// at DECODE_AND_MERGE_SLASHES, slashes; refuses what stays ambiguous.
    fn decode(self, path: &[u8]) -> Result<Vec<u8>, PathError> {
        let slashes = self == PathNormalization::DecodeAndMergeSlashes;
        let mut out = Vec::with_capacity(path.len());
        let mut i = 0;
        while i < path.len() {
            let b = path[i];
            match b {
                b'%' => {
                    let (Some(hi), Some(lo)) = (
                        path.get(i + 1).copied().and_then(hex),
                        path.get(i + 2).copied().and_then(hex),
                    ) else {
                        return Err(PathError::BadPercentEncoding);
                    };
                    let value = hi << 4 | lo;
                    match value {
                        b'/' if slashes => out.push(b'/'),
                        b'\\' if slashes => out.push(b'/'),
                        b'/' => return Err(PathError::EncodedSlash),
                        b'\\' => return Err(PathError::EncodedBackslash),
                        0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
                        v if is_unreserved(v) => out.push(v),
                        v => {
                            // Kept encoded; uppercase hex, so one resource has one spelling.
                            out.push(b'%');
                            out.push(HEX_UPPER[usize::from(v >> 4)]);
                            out.push(HEX_UPPER[usize::from(v & 0xf)]);
                        }
                    }
                    i += 3;
                    continue;
                }
                b'\\' if slashes => out.push(b'/'),
                b'\\' => return Err(PathError::Backslash),
                0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
                _ => out.push(b),
            }
            i += 1;
        }
        Ok(out)
    }
}

/// An escape that normalizing keeps as it is: uppercase hex, of a byte that is
/// neither unreserved nor a slash, backslash or control character.
fn is_kept_escape(escape: &[u8]) -> bool {
    let [b'%', hi, lo, ..] = *escape else {
        return false;
    };
    let upper = |d: u8| d.is_ascii_digit() || (b'A'..=b'F').contains(&d);
    if !upper(hi) || !upper(lo) {
        return false;
    }
    let value = hex(hi).unwrap_or(0) << 4 | hex(lo).unwrap_or(0);
    !(is_unreserved(value) || matches!(value, b'/' | b'\\' | 0..=0x1f | 0x7f))
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 section 2.3.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn is_dot_segment(segment: &[u8]) -> bool {
    segment == b"." || segment == b".."
}

/// RFC 3986 section 5.2.4 on an absolute path, optionally merging empty segments.
/// A `..` with nothing left to remove is refused: servers disagree on it (nginx
/// answers 400, RFC 3986 and Envoy stay at `/`), and no browser sends one.
fn remove_dot_segments(path: &[u8], merge: bool) -> Result<Vec<u8>, PathError> {
    // The leading '/' is implied; segments are what lies between slashes.
    let segments: Vec<&[u8]> = path[1..].split(|b| *b == b'/').collect();
    let last = segments.len() - 1;
    let mut kept: Vec<&[u8]> = Vec::with_capacity(segments.len());
    for (i, segment) in segments.into_iter().enumerate() {
        match segment {
            b"." => {}
            b".." => {
                if kept.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            b"" if merge && i != last => {}
            s => {
                kept.push(s);
                continue;
            }
        }
        // A dot segment (or merged slash) at the end leaves a directory: `/a/.` is `/a/`.
        if i == last {
            kept.push(b"");
        }
    }
    let mut out = Vec::with_capacity(path.len());
    for segment in kept.iter() {
        out.push(b'/');
        out.extend_from_slice(segment);
    }
    if out.is_empty() {
        out.push(b'/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
