//! Info hashes typed by people: the full 64 hex digits, or a unique prefix of at least
//! [`MIN_PREFIX`] digits (what `status` shows is 16). Pure: the caller hands in the hashes it
//! knows, so the rule is the same for the control socket, the HTTP API and tests.

use crate::metainfo::Hash;

/// Fewer digits than this match too much by chance to act on (pause, remove).
pub const MIN_PREFIX: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("{given:?} is not an info hash: give its 64 hex digits or a unique prefix of at least {MIN_PREFIX}")]
    NotHex { given: String },
    #[error("no torrent in this peer has an info hash starting with {prefix}")]
    NoMatch { prefix: String },
    #[error("{prefix} matches {count} torrents ({}); give more digits", .examples.join(", "))]
    Ambiguous {
        prefix: String,
        count: usize,
        /// Up to three of the matches, as 16-digit prefixes.
        examples: Vec<String>,
    },
}

/// Check that `s` looks like a hash or a usable prefix; returns it lowercased.
///
/// # Errors
/// Not hex, shorter than [`MIN_PREFIX`], or longer than 64 digits.
pub fn normalize(s: &str) -> Result<String, PrefixError> {
    let t = s.trim();
    if t.len() < MIN_PREFIX || t.len() > 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(PrefixError::NotHex { given: s.into() });
    }
    Ok(t.to_ascii_lowercase())
}

/// A full 64-digit hash, parsed; `None` for a prefix.
pub fn full(s: &str) -> Option<Hash> {
    let v = hex::decode(s.trim()).ok()?;
    v.try_into().ok()
}

/// Resolve `s` against `known`: the one hash it names.
///
/// A full hash resolves to itself only if it is known, so a typo never acts on a neighbour.
///
/// # Errors
/// Not hex, no match, or more than one match.
pub fn resolve<'a>(
    s: &str,
    known: impl IntoIterator<Item = &'a Hash>,
) -> Result<Hash, PrefixError> {
    let prefix = normalize(s)?;
    let mut found: Vec<Hash> = Vec::new();
    for h in known {
        if hex::encode(h).starts_with(&prefix) && !found.contains(h) {
            found.push(*h);
        }
    }
    match found.len() {
        0 => Err(PrefixError::NoMatch { prefix }),
        1 => Ok(found[0]),
        count => {
            found.sort();
            Err(PrefixError::Ambiguous {
                prefix,
                count,
                examples: found.iter().take(3).map(|h| hex::encode(&h[..8])).collect(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(first: u8, second: u8) -> Hash {
        let mut x = [0u8; 32];
        x[0] = first;
        x[1] = second;
        x
    }

    #[test]
    fn it_should_resolve_a_unique_prefix_and_the_full_hash() {
        let known = [h(0xab, 0xcd), h(0x12, 0x34)];
        assert_eq!(resolve("ABCD0000", &known), Ok(known[0]));
        assert_eq!(resolve(&hex::encode(known[1]), &known), Ok(known[1]));
    }

    #[test]
    fn it_should_refuse_short_ambiguous_unknown_and_non_hex_input() {
        let known = [h(0xab, 0xcd), h(0xab, 0xcd)];
        let two = [h(0xab, 0xcd), {
            let mut x = h(0xab, 0xcd);
            x[31] = 1;
            x
        }];
        assert!(matches!(
            resolve("abcd", &known),
            Err(PrefixError::NotHex { .. })
        ));
        assert!(matches!(
            resolve("abcd00zz", &known),
            Err(PrefixError::NotHex { .. })
        ));
        assert_eq!(
            resolve("abcd0000", &known),
            Ok(known[0]),
            "duplicates are one torrent"
        );
        assert!(matches!(
            resolve("abcd0000", &two),
            Err(PrefixError::Ambiguous { count: 2, .. })
        ));
        assert!(matches!(
            resolve("ffffffff", &two),
            Err(PrefixError::NoMatch { .. })
        ));
        let long = "a".repeat(65);
        assert!(matches!(
            resolve(&long, &two),
            Err(PrefixError::NotHex { .. })
        ));
    }
}
