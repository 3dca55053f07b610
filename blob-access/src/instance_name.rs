//! REAPI instance names as prefixes: `team-a` covers `team-a` and `team-a/x`
//! but not `team-ab`, so one name's prefix never captures another team's
//! names. Used by `demultiplexing` to route and by `serve`'s tokens to limit
//! what a caller may reach.

/// Whether `name` is `prefix` or below it (on `/` boundaries); `""` covers every name.
///
/// ```
/// use blob_access::instance_name::has_prefix;
/// assert!(has_prefix("team-a/x", "team-a") && has_prefix("team-a", "team-a"));
/// assert!(!has_prefix("team-ab", "team-a") && has_prefix("anything", ""));
/// ```
pub fn has_prefix(name: &str, prefix: &str) -> bool {
    prefix.is_empty()
        || name
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// `name` with its leading `prefix` (which it must have) replaced by `replacement`.
///
/// ```
/// use blob_access::instance_name::replace_prefix;
/// assert_eq!(replace_prefix("team-a/x", "team-a", "remote"), "remote/x");
/// assert_eq!(replace_prefix("team-a", "team-a", ""), "");
/// assert_eq!(replace_prefix("team-a/x", "team-a", ""), "x");
/// assert_eq!(replace_prefix("x", "", "base"), "base/x");
/// ```
pub fn replace_prefix(name: &str, prefix: &str, replacement: &str) -> String {
    let rest = name[prefix.len()..].trim_start_matches('/');
    join(replacement, rest)
}

/// `prefix/rest`, or whichever of the two is not empty.
pub fn join(prefix: &str, rest: &str) -> String {
    match (prefix, rest) {
        ("", r) => r.to_string(),
        (p, "") => p.to_string(),
        (p, r) => format!("{p}/{r}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_on_slash_boundaries() {
        for (name, prefix, want) in [
            ("", "", true),
            ("team-a", "", true),
            ("team-a", "team-a", true),
            ("team-a/x/y", "team-a", true),
            ("team-a/x/y", "team-a/x", true),
            ("team-ab", "team-a", false),
            ("team-a/xy", "team-a/x", false),
            ("team", "team-a", false),
            ("", "team-a", false),
        ] {
            assert_eq!(has_prefix(name, prefix), want, "{name:?} {prefix:?}");
        }
    }
}
