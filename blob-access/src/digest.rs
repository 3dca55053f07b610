//! Content digests: what a blob is named by, and how its bytes are checked.

use sha2::{Digest as _, Sha256, Sha384, Sha512};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The hash function of a digest, as REAPI names them. Servers advertise the
/// ones they accept; a digest carries its function everywhere it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum DigestFunction {
    #[default]
    Sha256,
    Sha1,
    Md5,
    Sha384,
    Sha512,
    Blake3,
}

impl DigestFunction {
    /// Every function this crate hashes, SHA-256 first.
    pub const ALL: [DigestFunction; 6] = [
        DigestFunction::Sha256,
        DigestFunction::Sha1,
        DigestFunction::Md5,
        DigestFunction::Sha384,
        DigestFunction::Sha512,
        DigestFunction::Blake3,
    ];

    /// Length of the hash in lowercase hex characters.
    pub fn hex_len(self) -> usize {
        match self {
            DigestFunction::Sha256 | DigestFunction::Blake3 => 64,
            DigestFunction::Sha1 => 40,
            DigestFunction::Md5 => 32,
            DigestFunction::Sha384 => 96,
            DigestFunction::Sha512 => 128,
        }
    }

    /// The REAPI enum value (`DigestFunction.Value`).
    pub fn to_proto(self) -> i32 {
        match self {
            DigestFunction::Sha256 => 1,
            DigestFunction::Sha1 => 2,
            DigestFunction::Md5 => 3,
            DigestFunction::Sha384 => 5,
            DigestFunction::Sha512 => 6,
            DigestFunction::Blake3 => 9,
        }
    }

    /// The function of a REAPI enum value; `None` for UNKNOWN (0) and the
    /// ones not hashed here (VSO, MURMUR3, SHA256TREE).
    pub fn from_proto(value: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.to_proto() == value)
    }

    /// Name used in resource names, config files, flags and logs: `sha256`, `blake3`...
    pub fn name(self) -> &'static str {
        match self {
            DigestFunction::Sha256 => "sha256",
            DigestFunction::Sha1 => "sha1",
            DigestFunction::Md5 => "md5",
            DigestFunction::Sha384 => "sha384",
            DigestFunction::Sha512 => "sha512",
            DigestFunction::Blake3 => "blake3",
        }
    }

    /// Whether resource names must name this function. REAPI 2.3 leaves it
    /// out for the functions told apart by their hash length (SHA-256,
    /// SHA-1, MD5, SHA-384, SHA-512) and requires it for the others.
    pub fn named_in_resource_names(self) -> bool {
        self == DigestFunction::Blake3
    }

    /// The function a resource name without one means, told by the hash
    /// length (64 is SHA-256, as before REAPI 2.3).
    pub fn from_hex_len(len: usize) -> Option<Self> {
        Self::ALL
            .into_iter()
            .filter(|f| !f.named_in_resource_names())
            .find(|f| f.hex_len() == len)
    }

    /// A fresh incremental hasher for this function.
    pub fn hasher(self) -> Hasher {
        Hasher(match self {
            DigestFunction::Sha256 => State::Sha256(Sha256::new()),
            DigestFunction::Sha1 => State::Sha1(sha1::Sha1::new()),
            DigestFunction::Md5 => State::Md5(md5::Md5::new()),
            DigestFunction::Sha384 => State::Sha384(Sha384::new()),
            DigestFunction::Sha512 => State::Sha512(Sha512::new()),
            DigestFunction::Blake3 => State::Blake3(Box::new(blake3::Hasher::new())),
        })
    }

    /// The hash of no bytes, which servers treat as always present.
    fn empty_hash(self) -> &'static str {
        match self {
            DigestFunction::Sha256 => {
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            }
            DigestFunction::Sha1 => "da39a3ee5e6b4b0d3255bfef95601890afd80709",
            DigestFunction::Md5 => "d41d8cd98f00b204e9800998ecf8427e",
            DigestFunction::Sha384 => "38b060a751ac96384cd9327eb1b1e36a21fdb71114be07434c0cc7bf63f6e1da274edebfe76f65fbd51ad2f14898b95b",
            DigestFunction::Sha512 => "cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e",
            DigestFunction::Blake3 => {
                "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
            }
        }
    }
}

impl fmt::Display for DigestFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `sha256`, `blake3`, ... (lower-case, as in resource names); upper case is accepted too.
impl FromStr for DigestFunction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|f| f.name() == lower)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|f| f.name()).collect();
                format!(
                    "unknown digest function {s:?}: expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// Incremental hasher; feed it chunks as they stream by.
#[derive(Clone)]
pub struct Hasher(State);

#[derive(Clone)]
enum State {
    Sha256(Sha256),
    Sha1(sha1::Sha1),
    Md5(md5::Md5),
    Sha384(Sha384),
    Sha512(Sha512),
    Blake3(Box<blake3::Hasher>),
}

/// Chunks at least this large are hashed by BLAKE3 on several threads; below
/// it, spreading the work costs more than it saves.
const BLAKE3_PARALLEL_CHUNK: usize = 256 * 1024;

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        match &mut self.0 {
            State::Sha256(h) => h.update(data),
            State::Sha1(h) => h.update(data),
            State::Md5(h) => h.update(data),
            State::Sha384(h) => h.update(data),
            State::Sha512(h) => h.update(data),
            State::Blake3(h) if data.len() >= BLAKE3_PARALLEL_CHUNK => {
                h.update_rayon(data);
            }
            State::Blake3(h) => {
                h.update(data);
            }
        }
    }
    /// Lowercase hex of the hash.
    pub fn finish_hex(self) -> String {
        match self.0 {
            State::Sha256(h) => hex::encode(h.finalize()),
            State::Sha1(h) => hex::encode(h.finalize()),
            State::Md5(h) => hex::encode(h.finalize()),
            State::Sha384(h) => hex::encode(h.finalize()),
            State::Sha512(h) => hex::encode(h.finalize()),
            State::Blake3(h) => h.finalize().to_hex().to_string(),
        }
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
        Digest::of_with(DigestFunction::Sha256, data)
    }

    /// The digest of `data` under `function`.
    ///
    /// ```
    /// use blob_access::{Digest, DigestFunction};
    /// let d = Digest::of_with(DigestFunction::Sha1, b"abc");
    /// assert_eq!(d.hash(), "a9993e364706816aba3e25717850c26c9cd0d89d");
    /// assert_eq!(d.function(), DigestFunction::Sha1);
    /// ```
    pub fn of_with(function: DigestFunction, data: &[u8]) -> Self {
        let mut h = function.hasher();
        h.update(data);
        Digest {
            hash: h.finish_hex(),
            size_bytes: data.len() as u64,
            function,
            instance_name: None,
        }
    }

    /// Parses `HASH/SIZE` of a digest under `function`.
    pub fn parse_with(function: DigestFunction, text: &str) -> Result<Self, DigestError> {
        let (hash, size) = text
            .split_once('/')
            .ok_or_else(|| DigestError::Shape(text.to_string()))?;
        Digest::from_parts(function, hash, size)
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
        self.size_bytes == 0 && self.hash == self.function.empty_hash()
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
    /// Parses `HASH/SIZE` of SHA-256 (use [`Digest::parse_with`] for another function).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse_with(DigestFunction::Sha256, s)
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
    fn every_function_hashes_as_its_reference_does() {
        // Reference values of "abc" (FIPS 180, RFC 1321, the BLAKE3 test vectors).
        let abc = [
            (DigestFunction::Sha256, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
            (DigestFunction::Sha1, "a9993e364706816aba3e25717850c26c9cd0d89d"),
            (DigestFunction::Md5, "900150983cd24fb0d6963f7d28e17f72"),
            (DigestFunction::Sha384, "cb00753f45a35e8bb5a03d699ac65007272c32ab0eded1631a8b605a43ff5bed8086072ba1e7cc2358baeca134c825a7"),
            (DigestFunction::Sha512, "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"),
            (DigestFunction::Blake3, "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"),
        ];
        for (f, hash) in abc {
            let d = Digest::of_with(f, b"abc");
            assert_eq!(d.hash(), hash, "{f}");
            assert_eq!(d.hash().len(), f.hex_len(), "{f}");
            assert!(Digest::of_with(f, b"").is_empty_blob(), "{f}");
            assert!(!d.is_empty_blob());
            assert_eq!(DigestFunction::from_proto(f.to_proto()), Some(f));
            assert_eq!(f.name().parse::<DigestFunction>(), Ok(f));
            assert_eq!(Digest::parse_with(f, &d.to_string()), Ok(d));
        }
        // Large chunks take BLAKE3's multi-threaded path: same hash as small ones.
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut whole = DigestFunction::Blake3.hasher();
        whole.update(&big);
        let mut pieces = DigestFunction::Blake3.hasher();
        big.chunks(1000).for_each(|c| pieces.update(c));
        assert_eq!(whole.finish_hex(), pieces.finish_hex());
        assert_eq!(DigestFunction::from_proto(0), None);
        assert_eq!(
            DigestFunction::from_proto(8),
            None,
            "SHA256TREE is not hashed here"
        );
        let e = "blake2".parse::<DigestFunction>().unwrap_err();
        assert!(
            e.contains("sha256, sha1, md5, sha384, sha512, blake3"),
            "{e}"
        );
        assert_eq!(
            DigestFunction::from_hex_len(64),
            Some(DigestFunction::Sha256)
        );
        assert_eq!(DigestFunction::from_hex_len(40), Some(DigestFunction::Sha1));
        assert_eq!(DigestFunction::from_hex_len(41), None);
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
