//! Checks of a `grpc` node's endpoint and header literals. They run while a
//! config is deserialized, so errors carry the line, column and path of the
//! offending value, and again when a node is built (configs made in code).

use super::config::{FromEnv, FromFile, HeaderValue, Headers};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use std::collections::BTreeMap;
use std::fmt;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::transport::Endpoint;

/// Where an endpoint leads: a lazily connecting endpoint, whether it is TLS,
/// and for `unix:` the socket path.
pub(super) struct Target {
    pub endpoint: Endpoint,
    pub tls: bool,
    pub unix: Option<String>,
}

/// Parses `grpc://host:port`, `grpcs://host:port` or `unix:/path`.
pub(super) fn parse_endpoint(text: &str) -> Result<Target, String> {
    let bad = |why: &str| format!("{text:?} {why}");
    let (uri, tls, unix) = if let Some(rest) = text.strip_prefix("grpc://") {
        check_host_port(rest).map_err(&bad)?;
        (format!("http://{rest}"), false, None)
    } else if let Some(rest) = text.strip_prefix("grpcs://") {
        check_host_port(rest).map_err(&bad)?;
        (format!("https://{rest}"), true, None)
    } else if let Some(path) = text.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(bad("has no socket path"));
        }
        if path.chars().any(|c| c.is_ascii_control()) {
            return Err(bad("has a control character in its socket path"));
        }
        (
            "http://localhost".to_string(),
            false,
            Some(path.to_string()),
        )
    } else {
        return Err(bad("must start with grpc://, grpcs:// or unix:"));
    };
    let endpoint = Endpoint::from_shared(uri).map_err(|_| bad("is not a valid host:port"))?;
    if unix.is_none() && endpoint.uri().port_u16().is_none() {
        return Err(bad("has no port"));
    }
    Ok(Target {
        endpoint,
        tls,
        unix,
    })
}

/// `host:port` with an optional trailing `/`, and nothing else (no user,
/// path, query or fragment: the channel would drop or misuse them). The host
/// is a name or address of `[A-Za-z0-9._~-]`, or an IPv6 address in brackets;
/// the port is 1 to 65535. The JSON Schema's pattern says the same.
fn check_host_port(rest: &str) -> Result<(), &'static str> {
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = authority.rsplit_once(':').ok_or("has no port")?;
    let name = |c: char| c.is_ascii_alphanumeric() || "._~-".contains(c);
    let ipv6 = |c: char| c.is_ascii_hexdigit() || ":.".contains(c);
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => !v6.is_empty() && v6.chars().all(ipv6),
        None => !host.is_empty() && host.chars().all(name),
    };
    if !host_ok {
        return Err("is not grpc://host:port (a host name or address, [IPv6] in brackets; no user, path or query)");
    }
    let port_ok = !port.is_empty()
        && !port.starts_with('0')
        && port.len() <= 5
        && port.chars().all(|c| c.is_ascii_digit())
        && (1..=65535).contains(&port.parse::<u32>().unwrap_or(0));
    if !port_ok {
        return Err("has no port from 1 to 65535");
    }
    Ok(())
}

pub(super) fn header_name(name: &str) -> Result<AsciiMetadataKey, String> {
    name.parse::<AsciiMetadataKey>()
        .map_err(|_| format!("header name {name:?} is not a valid gRPC header name"))
}

/// Errors name the variable or file, never the value.
pub(super) fn header_value(text: &str, what: &str) -> Result<AsciiMetadataValue, String> {
    text.parse::<AsciiMetadataValue>()
        .map_err(|_| format!("{what} is not printable ASCII"))
}

/// `deserialize_with` of `GrpcConfig::endpoint`: a string that [`parse_endpoint`] takes.
pub(super) fn deserialize_endpoint<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an endpoint: grpc://host:port, grpcs://host:port or unix:/path")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            parse_endpoint(v).map_err(E::custom)?;
            Ok(v.to_string())
        }
    }
    d.deserialize_str(V)
}

/// A header name, checked inside the key's own deserialization (for its position).
struct HeaderName;

impl<'de> DeserializeSeed<'de> for HeaderName {
    type Value = String;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = String;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a header name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
                header_name(v).map_err(E::custom)?;
                Ok(v.to_string())
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> serde::Deserialize<'de> for Headers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Headers;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of header names to values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Headers, A::Error> {
                let mut headers = BTreeMap::new();
                while let Some(name) = map.next_key_seed(HeaderName)? {
                    let value = map.next_value()?;
                    headers.insert(name, value);
                }
                Ok(Headers(headers))
            }
        }
        d.deserialize_map(V)
    }
}

/// `{env: NAME}` or `{file: PATH}`, exactly one.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Source {
    env: Option<String>,
    file: Option<String>,
}

impl<'de> serde::Deserialize<'de> for HeaderValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = HeaderValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a header value: a string, {env: NAME} or {file: PATH}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HeaderValue, E> {
                header_value(v, "the value").map_err(E::custom)?;
                Ok(HeaderValue::Literal(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<HeaderValue, A::Error> {
                let source: Source =
                    serde::Deserialize::deserialize(de::value::MapAccessDeserializer::new(map))?;
                match source {
                    Source {
                        env: Some(env),
                        file: None,
                    } => Ok(HeaderValue::Env(FromEnv { env })),
                    Source {
                        env: None,
                        file: Some(file),
                    } => Ok(HeaderValue::File(FromFile { file })),
                    _ => Err(de::Error::custom(
                        "a header value map has exactly one key, `env` or `file`",
                    )),
                }
            }
        }
        d.deserialize_any(V)
    }
}
