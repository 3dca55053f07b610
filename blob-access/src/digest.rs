//! Content digests: what a blob is named by, and how its bytes are checked.

use sha2::{Digest as _, Sha256};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The hash function of a digest. REAPI servers advertise the ones they accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum DigestFunction {
    #[default]
    Sha256,
}

impl DigestFunction {
    /// Length of the hash in lowercase hex characters.
    pub fn hex_len(self) -> usize {
        match self {
            DigestFunction::Sha256 => 64,
        }
    }

    /// The REAPI enum value (`DigestFunction.Value`).
    pub fn to_proto(self) -> i32 {
        match self {
            DigestFunction::Sha256 => 1,
        }
    }

    /// Name used in resource names and logs.
    pub fn name(self) -> &'static str {
        match self {
            DigestFunction::Sha256 => "sha256",
        }
    }

    /// A fresh incremental hasher for this function.
    pub fn hasher(self) -> Hasher {
        match self {
            DigestFunction::Sha256 => Hasher(Sha256::new()),
        }
    }
}

/// Incremental hasher; feed it chunks as they stream by.
#[derive(Clone)]
pub struct Hasher(Sha256);

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    /// Lowercase hex of the hash.
    pub fn finish_hex(self) -> String {
        hex::encode(self.0.finalize())
    }
}

/// A blob's identity: the hash of its content and its size in bytes, plus the
/// REAPI instance name of the request it came with (empty by default).
///
/// The instance name travels with the digest, as in bb-storage, so that every
/// decorator passes it through untouched and only the nodes it matters to look
/// at it: `demultiplexing` routes by it, `grpc` sends it upstream, action caches
/// keep results per instance. It takes part in equality, hashing and ordering,
/// so a cache keyed by digests never answers one instance with what it learnt
/// for another; stores of content (memory, disk) key by
/// [`without_instance_name`](Digest::without_instance_name) since a blob's
/// bytes are the same whatever the instance. `Display` shows `HASH/SIZE` only.
///
/// ```
/// use blob_access::Digest;
/// let d: Digest = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855/0".parse().unwrap();
/// assert_eq!(d.size_bytes(), 0);
/// assert_eq!(d, Digest::of(b""));
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hash: String,
    size_bytes: u64,
    function: DigestFunction,
    /// `None` for the empty (default) instance name, so that both compare equal.
    instance_name: Option<Arc<str>>,
}

/// Why a digest could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("expected HASH/SIZE, got {0:?}")]
    Shape(String),
    #[error("hash {hash:?} has {len} characters, a {function} hash has {expected}")]
    HashLength {
        hash: String,
        len: usize,
        expected: usize,
        function: &'static str,
    },
    #[error("hash {0:?} is not lowercase hexadecimal")]
    HashNotHex(String),
    #[error("size {0:?} is not a non-negative integer")]
    Size(String),
}

impl Digest {
    /// Builds a digest from a hex hash and a size, checking the hash's form.
    pub fn new(
        function: DigestFunction,
        hash: impl Into<String>,
        size_bytes: u64,
    ) -> Result<Self, DigestError> {
        let hash = hash.into();
        if hash.len() != function.hex_len() {
            return Err(DigestError::HashLength {
                len: hash.len(),
                expected: function.hex_len(),
                function: function.name(),
                hash,
            });
        }
        if !hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(DigestError::HashNotHex(hash));
        }
        Ok(Digest {
            hash,
            size_bytes,
            function,
            instance_name: None,
        })
    }

    /// Builds a digest from the parts of a text form (`hash`, `size`), as found in
    /// resource names and on command lines.
    pub fn from_parts(
        function: DigestFunction,
        hash: &str,
        size: &str,
    ) -> Result<Self, DigestError> {
        if size.is_empty() || !size.bytes().all(|b| b.is_ascii_digit()) {
            return Err(DigestError::Size(size.to_string()));
        }
        let size_bytes = size
            .parse::<u64>()
            .ok()
            .filter(|s| *s <= i64::MAX as u64)
            .ok_or_else(|| DigestError::Size(size.to_string()))?;
        Digest::new(function, hash, size_bytes)
    }

    /// The SHA-256 digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        let mut h = DigestFunction::Sha256.hasher();
        h.update(data);
        Digest {
            hash: h.finish_hex(),
            size_bytes: data.len() as u64,
            function: DigestFunction::Sha256,
            instance_name: None,
        }
    }

    /// This digest under `instance_name` (`""` is the default instance).
    ///
    /// ```
    /// use blob_access::Digest;
    /// let d = Digest::of(b"x").with_instance_name("team-a");
    /// assert_eq!(d.instance_name(), "team-a");
    /// assert_ne!(d, Digest::of(b"x"));
    /// assert_eq!(d.without_instance_name(), Digest::of(b"x"));
    /// ```
    pub fn with_instance_name(&self, instance_name: &str) -> Digest {
        let mut d = self.clone();
        d.instance_name = (!instance_name.is_empty()).then(|| Arc::from(instance_name));
        d
    }

    /// The same blob under the default instance: the key of content stores.
    pub fn without_instance_name(&self) -> Digest {
        match self.instance_name {
            None => self.clone(),
            Some(_) => self.with_instance_name(""),
        }
    }

    /// The REAPI instance name this digest was asked for under; `""` by default.
    pub fn instance_name(&self) -> &str {
        self.instance_name.as_deref().unwrap_or("")
    }

    pub fn hash(&self) -> &str {
        &self.hash
    }
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Whether this is the digest of no bytes, which REAPI servers must treat
    /// as always present.
    ///
    /// ```
    /// use blob_access::Digest;
    /// assert!(Digest::of(b"").is_empty_blob());
    /// assert!(!Digest::of(b"x").is_empty_blob());
    /// ```
    pub fn is_empty_blob(&self) -> bool {
        const EMPTY_SHA256: &str =
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        self.size_bytes == 0 && self.function == DigestFunction::Sha256 && self.hash == EMPTY_SHA256
    }
    pub fn function(&self) -> DigestFunction {
        self.function
    }

    /// The REAPI message for this digest.
    pub fn to_proto(&self) -> crate::proto::Digest {
        crate::proto::Digest {
            hash: self.hash.clone(),
            size_bytes: self.size_bytes as i64,
        }
    }

    /// Parses a REAPI digest message.
    pub fn from_proto(
        function: DigestFunction,
        d: &crate::proto::Digest,
    ) -> Result<Self, DigestError> {
        if d.size_bytes < 0 {
            return Err(DigestError::Size(d.size_bytes.to_string()));
        }
        Digest::new(function, d.hash.clone(), d.size_bytes as u64)
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    /// Parses `HASH/SIZE` (SHA-256).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hash, size) = s
            .split_once('/')
            .ok_or_else(|| DigestError::Shape(s.to_string()))?;
        Digest::from_parts(DigestFunction::Sha256, hash, size)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.hash, self.size_bytes)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.instance_name {
            Some(i) => write!(f, "Digest({i:?} {self})"),
            None => write!(f, "Digest({self})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_prints() {
        let d: Digest = format!("{EMPTY}/0").parse().unwrap();
        assert_eq!(d.hash(), EMPTY);
        assert_eq!(d.to_string(), format!("{EMPTY}/0"));
        assert_eq!(Digest::of(b"abc").size_bytes(), 3);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            "abc".parse::<Digest>(),
            Err(DigestError::Shape(_))
        ));
        assert!(matches!(
            "abc/1".parse::<Digest>(),
            Err(DigestError::HashLength { len: 3, .. })
        ));
        let upper = EMPTY.to_uppercase();
        assert!(matches!(
            format!("{upper}/1").parse::<Digest>(),
            Err(DigestError::HashNotHex(_))
        ));
        let zz = format!("zz{}", &EMPTY[2..]);
        assert!(matches!(
            format!("{zz}/1").parse::<Digest>(),
            Err(DigestError::HashNotHex(_))
        ));
        for size in ["-1", "x", "", "1.5", "99999999999999999999"] {
            assert!(
                matches!(
                    format!("{EMPTY}/{size}").parse::<Digest>(),
                    Err(DigestError::Size(_))
                ),
                "{size}"
            );
        }
        let err = format!("{EMPTY}/-1").parse::<Digest>().unwrap_err();
        assert!(err.to_string().contains("non-negative"), "{err}");
    }
}
