//! Channel names: validation, classification and wildcard matching.
//!
//! A channel name is `"/" segment *("/" segment)`. The last segment may be the wildcard `*`
//! (exactly one more segment) or `**` (one or more segments). Wildcards anywhere else are
//! invalid. Names are case-sensitive.
//!
//! The accepted segment characters are CometD's (letters, digits and
//! `space ! # $ ( ) + - . @ _ { ~ }`) so channels that work on CometD work here; this is a superset
//! of the Bayeux 1.0 grammar that Faye enforces.

use std::fmt;
use std::sync::Arc;

/// What a channel is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChannelKind {
    /// `/meta/**`: the protocol itself. Never broadcast, never subscribable.
    Meta,
    /// `/service/**`: request/response with server-side listeners. Never broadcast.
    Service,
    /// Everything else: broadcast to subscribers.
    Broadcast,
}

/// The wildcard, if any, in a channel name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Wildcard {
    /// A concrete channel.
    None,
    /// Ends in `/*`: matches exactly one more segment.
    One,
    /// Ends in `/**`: matches one or more segments.
    Deep,
}

/// Why a string is not a valid channel name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// The name is empty.
    #[error("channel name is empty")]
    Empty,
    /// The name does not start with `/`.
    #[error("channel name must start with '/'")]
    NoLeadingSlash,
    /// A segment is empty (`//`, or a trailing `/`).
    #[error("channel name has an empty segment")]
    EmptySegment,
    /// A segment contains a character outside the allowed set.
    #[error("channel name has an invalid character {0:?}")]
    InvalidCharacter(char),
    /// `*` or `**` somewhere other than the whole last segment.
    #[error("a wildcard may only be the whole last segment")]
    MisplacedWildcard,
    /// Longer than [`MAX_CHANNEL_LEN`].
    #[error("channel name is longer than {MAX_CHANNEL_LEN} bytes")]
    TooLong,
}

/// The longest channel name accepted, in bytes.
pub const MAX_CHANNEL_LEN: usize = 1024;

/// A validated channel name. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName(Arc<str>);

fn allowed_char(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            ' ' | '!' | '#' | '$' | '(' | ')' | '+' | '-' | '.' | '@' | '_' | '{' | '}' | '~'
        )
}

impl ChannelName {
    /// Validates `name`.
    ///
    /// ```
    /// use bayeux_protocol::ChannelName;
    /// assert!(ChannelName::new("/chat/room-1").is_ok());
    /// assert!(ChannelName::new("/chat/*").is_ok());
    /// assert!(ChannelName::new("chat").is_err());
    /// assert!(ChannelName::new("/a/*/b").is_err());
    /// ```
    pub fn new(name: &str) -> Result<Self, ChannelError> {
        validate(name)?;
        Ok(ChannelName(Arc::from(name)))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Meta, service or broadcast.
    pub fn kind(&self) -> ChannelKind {
        kind_of(&self.0)
    }

    /// The wildcard in this name.
    pub fn wildcard(&self) -> Wildcard {
        if self.0.ends_with("/**") {
            Wildcard::Deep
        } else if self.0.ends_with("/*") {
            Wildcard::One
        } else {
            Wildcard::None
        }
    }

    /// True for `/a/*` and `/a/**`.
    pub fn is_wildcard(&self) -> bool {
        self.wildcard() != Wildcard::None
    }

    /// Does this name (a pattern or a concrete name) match the concrete channel `channel`?
    ///
    /// ```
    /// use bayeux_protocol::ChannelName;
    /// let one = ChannelName::new("/a/*").unwrap();
    /// let deep = ChannelName::new("/a/**").unwrap();
    /// assert!(one.matches("/a/b") && !one.matches("/a/b/c") && !one.matches("/a"));
    /// assert!(deep.matches("/a/b") && deep.matches("/a/b/c") && !deep.matches("/a"));
    /// ```
    pub fn matches(&self, channel: &str) -> bool {
        matches(&self.0, channel)
    }
}

/// Validates a channel name without allocating.
pub fn validate(name: &str) -> Result<(), ChannelError> {
    if name.is_empty() {
        return Err(ChannelError::Empty);
    }
    if name.len() > MAX_CHANNEL_LEN {
        return Err(ChannelError::TooLong);
    }
    let Some(rest) = name.strip_prefix('/') else {
        return Err(ChannelError::NoLeadingSlash);
    };
    let mut segments = rest.split('/').peekable();
    while let Some(segment) = segments.next() {
        if segment.is_empty() {
            return Err(ChannelError::EmptySegment);
        }
        let last = segments.peek().is_none();
        if segment == "*" || segment == "**" {
            if last {
                continue;
            }
            return Err(ChannelError::MisplacedWildcard);
        }
        for c in segment.chars() {
            if c == '*' {
                return Err(ChannelError::MisplacedWildcard);
            }
            if !allowed_char(c) {
                return Err(ChannelError::InvalidCharacter(c));
            }
        }
    }
    Ok(())
}

/// The kind of a (valid) channel name.
pub fn kind_of(name: &str) -> ChannelKind {
    if name == "/meta" || name.starts_with("/meta/") {
        ChannelKind::Meta
    } else if name == "/service" || name.starts_with("/service/") {
        ChannelKind::Service
    } else {
        ChannelKind::Broadcast
    }
}

/// Does `pattern` (concrete, `/a/*` or `/a/**`) match the concrete channel `channel`?
pub fn matches(pattern: &str, channel: &str) -> bool {
    if let Some(prefix) = pattern.strip_suffix("/**") {
        // One or more segments below `prefix`.
        channel.len() > prefix.len() + 1
            && channel.starts_with(prefix)
            && channel.as_bytes()[prefix.len()] == b'/'
    } else if let Some(prefix) = pattern.strip_suffix("/*") {
        channel.len() > prefix.len() + 1
            && channel.starts_with(prefix)
            && channel.as_bytes()[prefix.len()] == b'/'
            && !channel[prefix.len() + 1..].contains('/')
    } else {
        pattern == channel
    }
}

/// Every pattern that could match the concrete channel `channel`, most specific first: the
/// channel itself, then `/a/b/*`, then `/a/b/**`, `/a/**`, `/**`. `f` gets each one in turn,
/// written into one buffer (the channel itself is passed as it is), so looking them up on every
/// publish allocates one string, not one per pattern.
///
/// A subscription index keyed by pattern finds every matching subscription with these
/// `depth + 2` lookups, however many channels exist.
///
/// ```
/// use bayeux_protocol::channel::for_each_candidate_pattern;
/// let mut all = Vec::new();
/// for_each_candidate_pattern("/a/b", |p| all.push(p.to_owned()));
/// assert_eq!(all, ["/a/b", "/a/*", "/a/**", "/**"]);
/// ```
pub fn for_each_candidate_pattern(channel: &str, mut f: impl FnMut(&str)) {
    f(channel);
    let mut pattern = String::with_capacity(channel.len() + 3);
    let last_slash = channel.rfind('/').unwrap_or(0);
    pattern.push_str(&channel[..last_slash]);
    pattern.push_str("/*");
    f(&pattern);
    // Every prefix that ends just before a '/', longest first.
    for (i, _) in channel.rmatch_indices('/') {
        pattern.clear();
        pattern.push_str(&channel[..i]);
        pattern.push_str("/**");
        f(&pattern);
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChannelName({:?})", &*self.0)
    }
}

impl AsRef<str> for ChannelName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for ChannelName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for ChannelName {
    type Err = ChannelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ChannelName::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn validation() {
        for ok in [
            "/a",
            "/a/b",
            "/a/*",
            "/a/**",
            "/*",
            "/**",
            "/meta/connect",
            "/a.b/c d",
            "/u/notifications/ExampleUserChannel",
            "/event/Low_Ink__e",
        ] {
            assert!(ChannelName::new(ok).is_ok(), "{ok}");
        }
        assert_eq!(ChannelName::new(""), Err(ChannelError::Empty));
        assert_eq!(ChannelName::new("a/b"), Err(ChannelError::NoLeadingSlash));
        assert_eq!(ChannelName::new("/"), Err(ChannelError::EmptySegment));
        assert_eq!(ChannelName::new("/a//b"), Err(ChannelError::EmptySegment));
        assert_eq!(ChannelName::new("/a/"), Err(ChannelError::EmptySegment));
        assert_eq!(
            ChannelName::new("/a/*/b"),
            Err(ChannelError::MisplacedWildcard)
        );
        assert_eq!(
            ChannelName::new("/a/b*"),
            Err(ChannelError::MisplacedWildcard)
        );
        assert_eq!(
            ChannelName::new("/a/***"),
            Err(ChannelError::MisplacedWildcard)
        );
        assert_eq!(
            ChannelName::new("/a/b?c"),
            Err(ChannelError::InvalidCharacter('?'))
        );
        assert_eq!(
            ChannelName::new(&format!("/{}", "x".repeat(MAX_CHANNEL_LEN))),
            Err(ChannelError::TooLong)
        );
    }

    #[test]
    fn kinds() {
        let k = |s: &str| ChannelName::new(s).unwrap().kind();
        assert_eq!(k("/meta/connect"), ChannelKind::Meta);
        assert_eq!(k("/meta/*"), ChannelKind::Meta);
        assert_eq!(k("/service/echo"), ChannelKind::Service);
        assert_eq!(k("/metadata"), ChannelKind::Broadcast);
        assert_eq!(k("/services/x"), ChannelKind::Broadcast);
        assert_eq!(k("/**"), ChannelKind::Broadcast);
    }

    #[test]
    fn matching() {
        assert!(matches("/a/b", "/a/b"));
        assert!(!matches("/a/b", "/a/bc"));
        assert!(matches("/a/*", "/a/b"));
        assert!(!matches("/a/*", "/a"));
        assert!(!matches("/a/*", "/a/b/c"));
        assert!(!matches("/a/*", "/ab/c"));
        assert!(matches("/a/**", "/a/b"));
        assert!(matches("/a/**", "/a/b/c"));
        assert!(!matches("/a/**", "/a"));
        assert!(!matches("/a/**", "/ab/c"));
        assert!(matches("/*", "/a"));
        assert!(!matches("/*", "/a/b"));
        assert!(matches("/**", "/a/b/c"));
    }

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("ab".to_owned()),
            "[a-z0-9_.-]{1,4}",
        ]
    }

    fn concrete() -> impl Strategy<Value = String> {
        prop::collection::vec(segment(), 1..5).prop_map(|s| format!("/{}", s.join("/")))
    }

    fn pattern() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(segment(), 0..4),
            prop_oneof![Just(""), Just("*"), Just("**")],
        )
            .prop_filter_map("non-empty", |(segs, wild)| {
                let mut segs = segs;
                if !wild.is_empty() {
                    segs.push(wild.to_owned());
                }
                (!segs.is_empty()).then(|| format!("/{}", segs.join("/")))
            })
    }

    /// A reference matcher written segment by segment, independent of the string tricks above.
    fn reference(pattern: &str, channel: &str) -> bool {
        let p: Vec<&str> = pattern[1..].split('/').collect();
        let c: Vec<&str> = channel[1..].split('/').collect();
        match p.last() {
            Some(&"**") => c.len() >= p.len() && p[..p.len() - 1] == c[..p.len() - 1],
            Some(&"*") => c.len() == p.len() && p[..p.len() - 1] == c[..p.len() - 1],
            _ => p == c,
        }
    }

    proptest! {
        #[test]
        fn matching_agrees_with_reference(p in pattern(), c in concrete()) {
            prop_assert!(ChannelName::new(&p).is_ok());
            prop_assert_eq!(matches(&p, &c), reference(&p, &c));
        }

        #[test]
        fn candidates_are_exactly_the_matching_patterns(p in pattern(), c in concrete()) {
            let mut candidates = Vec::new();
            for_each_candidate_pattern(&c, |p| candidates.push(p.to_owned()));
            prop_assert_eq!(candidates.contains(&p), matches(&p, &c));
            for cand in &candidates {
                prop_assert!(matches(cand, &c), "{} should match {}", cand, c);
            }
        }

        #[test]
        fn validate_never_panics(s in ".{0,40}") {
            let _ = validate(&s);
        }
    }
}
