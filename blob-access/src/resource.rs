//! ByteStream resource names: `{instance}/blobs/{hash}/{size}` for reads and
//! `{instance}/uploads/{uuid}/blobs/{hash}/{size}` for writes, and their
//! `compressed-blobs/zstd/` forms. The size is in the name, which is what lets a
//! reader tell a truncated stream from a complete one.
//!
//! REAPI 2.3 puts the digest function before the hash where the hash length
//! cannot tell it (`blobs/blake3/{hash}/{size}`); names without one mean the
//! function of that hash length (64: SHA-256, 40: SHA-1, 32: MD5, 96:
//! SHA-384, 128: SHA-512).

use crate::digest::{Digest, DigestError, DigestFunction};
use std::fmt;

/// How the bytes of a ByteStream transfer are encoded on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Compressor {
    #[default]
    Identity,
    Zstd,
}

/// A parsed read resource name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadResource {
    pub instance_name: String,
    pub compressor: Compressor,
    pub digest: Digest,
}

/// A parsed write resource name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteResource {
    pub instance_name: String,
    pub uuid: String,
    pub compressor: Compressor,
    pub digest: Digest,
}

/// Why a resource name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    #[error("resource name {0:?} has no blobs/HASH/SIZE or compressed-blobs/zstd/HASH/SIZE part")]
    Shape(String),
    #[error("resource name {0:?} uses unsupported compressor {1:?}")]
    Compressor(String, String),
    #[error("resource name {0:?}: {1}")]
    Digest(String, DigestError),
    #[error("resource name {0:?}: {1}")]
    Function(String, String),
}

fn join_instance(instance: &str, rest: fmt::Arguments<'_>) -> String {
    if instance.is_empty() {
        rest.to_string()
    } else {
        format!("{instance}/{rest}")
    }
}

fn blob_part(compressor: Compressor, d: &Digest) -> String {
    let function = match d.function() {
        f if f.named_in_resource_names() => format!("{}/", f.name()),
        _ => String::new(),
    };
    let (hash, size) = (d.hash(), d.size_bytes());
    match compressor {
        Compressor::Identity => format!("blobs/{function}{hash}/{size}"),
        Compressor::Zstd => format!("compressed-blobs/zstd/{function}{hash}/{size}"),
    }
}

impl ReadResource {
    pub fn new(instance_name: &str, compressor: Compressor, digest: Digest) -> Self {
        ReadResource {
            instance_name: instance_name.to_string(),
            compressor,
            digest,
        }
    }

    /// Parses a read resource name.
    ///
    /// ```
    /// use blob_access::resource::{ReadResource, Compressor};
    /// let name = "a/b/compressed-blobs/zstd/e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855/0";
    /// let r = ReadResource::parse(name).unwrap();
    /// assert_eq!(r.instance_name, "a/b");
    /// assert_eq!(r.compressor, Compressor::Zstd);
    /// assert_eq!(r.to_string(), name);
    /// ```
    pub fn parse(name: &str) -> Result<Self, ResourceError> {
        let segs: Vec<&str> = name.split('/').collect();
        let i = segs
            .iter()
            .position(|s| *s == "blobs" || *s == "compressed-blobs")
            .ok_or_else(|| ResourceError::Shape(name.to_string()))?;
        let (compressor, digest) = parse_blob_part(name, &segs[i..], false)?;
        Ok(ReadResource {
            instance_name: segs[..i].join("/"),
            compressor,
            digest,
        })
    }
}

impl fmt::Display for ReadResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let part = blob_part(self.compressor, &self.digest);
        f.write_str(&join_instance(&self.instance_name, format_args!("{part}")))
    }
}

impl WriteResource {
    /// A write resource with a fresh random upload id.
    pub fn new(instance_name: &str, compressor: Compressor, digest: Digest) -> Self {
        WriteResource {
            instance_name: instance_name.to_string(),
            uuid: uuid::Uuid::new_v4().to_string(),
            compressor,
            digest,
        }
    }

    /// Parses a write resource name; trailing metadata after the size is allowed and ignored.
    pub fn parse(name: &str) -> Result<Self, ResourceError> {
        let segs: Vec<&str> = name.split('/').collect();
        let i = segs
            .iter()
            .position(|s| *s == "uploads")
            .filter(|i| segs.len() > i + 2)
            .ok_or_else(|| ResourceError::Shape(name.to_string()))?;
        let (compressor, digest) = parse_blob_part(name, &segs[i + 2..], true)?;
        Ok(WriteResource {
            instance_name: segs[..i].join("/"),
            uuid: segs[i + 1].to_string(),
            compressor,
            digest,
        })
    }
}

impl fmt::Display for WriteResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let part = blob_part(self.compressor, &self.digest);
        let uuid = &self.uuid;
        f.write_str(&join_instance(
            &self.instance_name,
            format_args!("uploads/{uuid}/{part}"),
        ))
    }
}

/// Parses `blobs/HASH/SIZE` or `compressed-blobs/zstd/HASH/SIZE` (plus metadata if allowed).
fn parse_blob_part(
    name: &str,
    segs: &[&str],
    allow_trailing: bool,
) -> Result<(Compressor, Digest), ResourceError> {
    let shape = || ResourceError::Shape(name.to_string());
    let (compressor, rest) = match segs.first() {
        Some(&"blobs") => (Compressor::Identity, &segs[1..]),
        Some(&"compressed-blobs") => match segs.get(1) {
            Some(&"zstd") => (Compressor::Zstd, &segs[2..]),
            Some(other) => {
                return Err(ResourceError::Compressor(
                    name.to_string(),
                    other.to_string(),
                ))
            }
            None => return Err(shape()),
        },
        _ => return Err(shape()),
    };
    // A segment that is not hexadecimal before the hash names the function.
    let named = rest.len() >= 3 && !rest[0].bytes().all(|b| b.is_ascii_hexdigit());
    let (function, rest) = if named {
        let f = rest[0]
            .parse::<DigestFunction>()
            .map_err(|e| ResourceError::Function(name.to_string(), e))?;
        (f, &rest[1..])
    } else {
        let hash_len = rest.first().map_or(0, |h| h.len());
        let f = DigestFunction::from_hex_len(hash_len).unwrap_or_default();
        (f, rest)
    };
    if rest.len() < 2 || (!allow_trailing && rest.len() > 2) {
        return Err(shape());
    }
    let digest = Digest::from_parts(function, rest[0], rest[1])
        .map_err(|e| ResourceError::Digest(name.to_string(), e))?;
    Ok((compressor, digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> Digest {
        Digest::of(b"hello")
    }

    #[test]
    fn read_round_trips() {
        for instance in ["", "main", "a/b/c"] {
            for c in [Compressor::Identity, Compressor::Zstd] {
                let r = ReadResource::new(instance, c, d());
                assert_eq!(ReadResource::parse(&r.to_string()).unwrap(), r);
            }
        }
        let r = ReadResource::new("", Compressor::Identity, d());
        assert_eq!(r.to_string(), format!("blobs/{}/5", d().hash()));
    }

    #[test]
    fn write_round_trips() {
        for instance in ["", "x/y"] {
            for c in [Compressor::Identity, Compressor::Zstd] {
                let w = WriteResource::new(instance, c, d());
                assert_eq!(WriteResource::parse(&w.to_string()).unwrap(), w);
            }
        }
        let with_meta = format!("i/uploads/u-1/blobs/{}/5/some/metadata", d().hash());
        let w = WriteResource::parse(&with_meta).unwrap();
        assert_eq!((w.instance_name.as_str(), w.uuid.as_str()), ("i", "u-1"));
    }

    #[test]
    fn digest_functions_are_named_where_the_length_cannot_tell() {
        for f in DigestFunction::ALL {
            let d = Digest::of_with(f, b"hello");
            for c in [Compressor::Identity, Compressor::Zstd] {
                let r = ReadResource::new("i", c, d.clone());
                let name = r.to_string();
                assert_eq!(
                    name.contains("/blake3/"),
                    f == DigestFunction::Blake3,
                    "{name}"
                );
                assert_eq!(ReadResource::parse(&name).unwrap(), r, "{name}");
                let w = WriteResource::new("", c, d.clone());
                assert_eq!(WriteResource::parse(&w.to_string()).unwrap(), w);
            }
            // Named although the length would tell (other clients do): accepted.
            let name = format!("blobs/{}/{}/5", f.name(), d.hash());
            assert_eq!(ReadResource::parse(&name).unwrap().digest, d);
        }
        let h = Digest::of(b"x").hash().to_string();
        let e = ReadResource::parse(&format!("blobs/blake2/{h}/1")).unwrap_err();
        assert!(
            e.to_string().contains("unknown digest function \"blake2\""),
            "{e}"
        );
        // A SHA-1 length named as SHA-256: the length is wrong for the function.
        let sha1 = Digest::of_with(DigestFunction::Sha1, b"x");
        let e = ReadResource::parse(&format!("blobs/sha256/{}/1", sha1.hash())).unwrap_err();
        assert!(matches!(e, ResourceError::Digest(..)), "{e}");
    }

    #[test]
    fn rejects_bad_names() {
        let h = d().hash().to_string();
        assert!(matches!(
            ReadResource::parse("nothing/here"),
            Err(ResourceError::Shape(_))
        ));
        assert!(matches!(
            ReadResource::parse(&format!("blobs/{h}")),
            Err(ResourceError::Shape(_))
        ));
        assert!(matches!(
            ReadResource::parse(&format!("blobs/{h}/5/extra")),
            Err(ResourceError::Shape(_))
        ));
        assert!(matches!(
            ReadResource::parse(&format!("compressed-blobs/gzip/{h}/5")),
            Err(ResourceError::Compressor(..))
        ));
        assert!(matches!(
            ReadResource::parse(&format!("blobs/{h}/-5")),
            Err(ResourceError::Digest(..))
        ));
        assert!(matches!(
            WriteResource::parse(&format!("blobs/{h}/5")),
            Err(ResourceError::Shape(_))
        ));
    }
}
