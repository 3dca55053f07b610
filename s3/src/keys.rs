//! Where blobs and action results live in the bucket:
//!
//! - CAS: `PREFIX/cas/FUNCTION/HASH-SIZE`, one copy for every instance name
//!   (content is the same whatever the instance);
//! - action cache: `PREFIX/ac/FUNCTION/HASH-SIZE` for the default instance,
//!   `PREFIX/ac/instances/INSTANCE/FUNCTION/HASH-SIZE` for another (instances
//!   may build differently).
//!
//! FUNCTION is the digest function's name as in resource names (`sha256`).

use blob_access::Digest;
use object_store::path::Path;

#[derive(Clone, Debug)]
pub(crate) struct Keys {
    /// Empty, or the prefix with one trailing `/`.
    prefix: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Self {
        let prefix = prefix.trim_matches('/');
        Keys {
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
        }
    }

    /// The prefix as a path (what the startup check lists).
    pub(crate) fn root(&self) -> Path {
        Path::from(self.prefix.as_str())
    }

    pub(crate) fn cas(&self, d: &Digest) -> Path {
        Path::from(format!("{}cas/{}", self.prefix, object_name(d)))
    }

    pub(crate) fn action_cache(&self, d: &Digest) -> Path {
        match d.instance_name() {
            "" => Path::from(format!("{}ac/{}", self.prefix, object_name(d))),
            instance => Path::from(format!(
                "{}ac/instances/{instance}/{}",
                self.prefix,
                object_name(d)
            )),
        }
    }
}

fn object_name(d: &Digest) -> String {
    format!("{}/{}-{}", d.function().name(), d.hash(), d.size_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let d = Digest::of(b"x");
        let name = format!("sha256/{}-1", d.hash());
        assert_eq!(Keys::new("").cas(&d).as_ref(), format!("cas/{name}"));
        assert_eq!(
            Keys::new("/t/a/").cas(&d).as_ref(),
            format!("t/a/cas/{name}")
        );
        let i = d.with_instance_name("team/x");
        assert_eq!(Keys::new("p").cas(&i).as_ref(), format!("p/cas/{name}"));
        assert_eq!(
            Keys::new("p").action_cache(&d).as_ref(),
            format!("p/ac/{name}")
        );
        assert_eq!(
            Keys::new("p").action_cache(&i).as_ref(),
            format!("p/ac/instances/team/x/{name}")
        );
    }
}
