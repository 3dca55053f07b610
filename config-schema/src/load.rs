//! Loading config trees from YAML or JSON with errors that point at the
//! offending node: its path in the tree, its line and column, what was expected.

use crate::Config;
use std::fmt;
use std::path::Path;

/// The syntax of a config text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
}

impl Format {
    /// JSON for `.json` files, YAML otherwise.
    pub fn of_path(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("json") => Format::Json,
            _ => Format::Yaml,
        }
    }
}

/// A config that could not be loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or other source) name.
    pub source: String,
    /// Dotted path of the node in the tree, e.g. `read_caching.slow.grpc.endpoint`; empty at the root.
    pub path: String,
    /// 1-based line and column, where the parser knows them.
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source)?;
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, ":{l}:{c}")?;
        }
        if !self.path.is_empty() {
            write!(f, ": at {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Reads and parses a config file; the format follows the extension.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let source = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        source: source.clone(),
        path: String::new(),
        line: None,
        column: None,
        message: format!("cannot read: {e}"),
    })?;
    load_str(&text, Format::of_path(path), &source)
}

/// Parses a config text and checks that each node suits its tree. `source`
/// names the text in errors.
pub fn load_str(text: &str, format: Format, source: &str) -> Result<Config, ConfigError> {
    let config = parse(text, format, source)?;
    config.check().map_err(|(path, message)| ConfigError {
        source: source.to_string(),
        path,
        line: None,
        column: None,
        message,
    })?;
    Ok(config)
}

fn parse(text: &str, format: Format, source: &str) -> Result<Config, ConfigError> {
    let (path, line, column, message) = match format {
        Format::Yaml => {
            let de = serde_yaml_ng::Deserializer::from_str(text);
            match serde_path_to_error::deserialize::<_, Config>(de) {
                Ok(node) => return Ok(node),
                Err(e) => {
                    let loc = e.inner().location();
                    let message = strip_location(&e.inner().to_string());
                    (
                        dotted(e.path()),
                        loc.as_ref().map(|l| l.line()),
                        loc.map(|l| l.column()),
                        message,
                    )
                }
            }
        }
        Format::Json => {
            let mut de = serde_json::Deserializer::from_str(text);
            match serde_path_to_error::deserialize::<_, Config>(&mut de) {
                Ok(node) => {
                    if let Err(e) = de.end() {
                        (
                            String::new(),
                            Some(e.line()),
                            Some(e.column()),
                            strip_location(&e.to_string()),
                        )
                    } else {
                        return Ok(node);
                    }
                }
                Err(e) => {
                    let inner = e.inner();
                    let message = strip_location(&inner.to_string());
                    (
                        dotted(e.path()),
                        Some(inner.line()),
                        Some(inner.column()),
                        message,
                    )
                }
            }
        }
    };
    // serde_yaml_ng prefixes its message with the path, which we print apart.
    // (or that of the node holding the offending field).
    let message = match message.split_once(": ") {
        Some((head, rest)) if !head.is_empty() && path.starts_with(head) => rest.to_string(),
        _ => message,
    };
    Err(ConfigError {
        source: source.to_string(),
        path,
        line,
        column,
        message,
    })
}

/// `a.b[2].c` from a serde path, without the `?` of unknown segments.
fn dotted(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in path.iter() {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {}
        }
    }
    out
}

/// The parsers append " at line L column C"; we print the location ourselves.
fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}
