//! Loads the tracking plan directory, compiles each schema once, and validates events against the
//! envelope, the schema for their `type`, and for `track` the schema for their `event` name.
//!
//! Layout of the directory:
//! - `envelope.json`: required, applies to every event;
//! - `<type>.json`: optional, for one of the Segment types (`identify.json`, `screen.json`, ...);
//! - `track/<slug>.json`: one per track event, naming its event in a top-level `"x-event"` whose
//!   [`event_slug`] must equal the file stem.
//!
//! Other files (READMEs, other directories) are ignored. Schemas are compiled offline, so a `$ref`
//! must point inside its own file.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::doc::{Doc, DocJson, Node};
use crate::{event_slug, Invalid, Issue, LoadError, ValidatedEvent};

/// The event types the pipeline takes: each has its envelope rules here, and the collector
/// refuses a batch event of any other type. The one list; the pipeline re-exports it.
pub const EVENT_TYPES: [&str; 6] = ["track", "identify", "page", "screen", "group", "alias"];
const EVENT_NAME_KEY: &str = "x-event";

/// What to do with a track event whose name has no schema in the tracking plan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownEventPolicy {
    /// Valid if the envelope (and the `track` type schema, if any) accept it.
    #[default]
    Accept,
    /// Invalid, with an issue at `/event`.
    Reject,
}

#[derive(Debug)]
struct Compiled {
    name: String,
    validator: jsonschema::Validator<DocJson>,
}

impl Compiled {
    fn check(&self, event: Node<'_>, issues: &mut Vec<Issue>) {
        // Most events are valid: answering that alone is cheaper than collecting errors.
        if self.validator.is_valid(event) {
            return;
        }
        issues.extend(self.validator.iter_errors(event).map(|error| {
            let message = match error.instance().as_ref() {
                Value::Object(_) | Value::Array(_) => error.masked_with("value").to_string(),
                _ => error.to_string(),
            };
            let message = bounded(message);
            Issue {
                pointer: error.instance_path().as_str().to_owned(),
                message,
                schema: self.name.clone(),
            }
        }));
    }
}

/// An error message echoes the value it is about; a 30 KB string must not be copied into
/// every error of an invalid record.
const MAX_MESSAGE_CHARS: usize = 500;

fn bounded(message: String) -> String {
    match message.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}… ({} bytes)", &message[..cut], message.len()),
        None => message,
    }
}

/// The compiled tracking plan.
#[derive(Debug)]
pub struct Registry {
    envelope: Compiled,
    by_type: HashMap<String, Compiled>,
    by_event: HashMap<String, Compiled>,
    policy: UnknownEventPolicy,
}

impl Registry {
    pub fn load(dir: &Path, policy: UnknownEventPolicy) -> Result<Registry, LoadError> {
        let envelope_path = dir.join("envelope.json");
        if !envelope_path.is_file() {
            return Err(LoadError::MissingEnvelope {
                dir: dir.to_path_buf(),
            });
        }
        let envelope = compile(
            "envelope".to_owned(),
            &envelope_path,
            &read_json(&envelope_path)?,
        )?;

        let mut by_type = HashMap::new();
        for path in json_files(dir)? {
            let Some(stem) = file_stem(&path) else {
                continue;
            };
            if stem == "envelope" {
                continue;
            }
            if !EVENT_TYPES.contains(&stem) {
                return Err(LoadError::UnknownSchemaFile { path });
            }
            let compiled = compile(stem.to_owned(), &path, &read_json(&path)?)?;
            by_type.insert(stem.to_owned(), compiled);
        }

        let mut by_event = HashMap::new();
        let track_dir = dir.join("track");
        if track_dir.is_dir() {
            for path in json_files(&track_dir)? {
                let (event, compiled) = load_track_schema(&path)?;
                by_event.insert(event, compiled);
            }
        }

        Ok(Registry {
            envelope,
            by_type,
            by_event,
            policy,
        })
    }

    /// Checks an event held as a `serde_json` map: [`Registry::check`] on it.
    pub fn validate(&self, event: Map<String, Value>) -> Result<ValidatedEvent, Invalid> {
        let event = Value::Object(event);
        let issues = self.check(Doc::from_value(&event).node());
        let message_id = event
            .get("messageId")
            .and_then(Value::as_str)
            .map(str::to_owned);
        match (event, message_id) {
            (Value::Object(map), Some(message_id)) if issues.is_empty() => {
                Ok(ValidatedEvent::new(map, message_id))
            }
            (event, _) => Err(Invalid {
                event,
                errors: issues,
            }),
        }
    }

    /// Every issue the tracking plan finds in an event, none if it is valid: the envelope, the
    /// schema for its `type`, for `track` the schema for its `event` (or the unknown-event
    /// policy), a known `type` and a string `messageId`.
    pub fn check(&self, event: Node<'_>) -> Vec<Issue> {
        let mut issues = Vec::new();

        self.envelope.check(event, &mut issues);

        let kind = event.get("type").and_then(|kind| kind.as_str());
        if let Some(schema) = kind.and_then(|kind| self.by_type.get(kind)) {
            schema.check(event, &mut issues);
        }
        // Whatever the tracking plan's envelope says: the collector refuses such a batch event
        // alone on the same rule, and answers which one it was.
        let known = kind.is_some_and(|kind| EVENT_TYPES.contains(&kind));
        let reported = issues.iter().any(|issue| {
            issue.pointer == "/type"
                || (issue.pointer.is_empty() && issue.message.contains("\"type\""))
        });
        if !known && !reported {
            issues.push(Issue {
                pointer: "/type".to_owned(),
                message: format!("type must be one of {}", EVENT_TYPES.join(", ")),
                schema: "envelope".to_owned(),
            });
        }

        if kind == Some("track") {
            if let Some(name) = event.get("event").and_then(|name| name.as_str()) {
                match self.by_event.get(name) {
                    Some(schema) => schema.check(event, &mut issues),
                    None if self.policy == UnknownEventPolicy::Reject => issues.push(Issue {
                        pointer: "/event".to_owned(),
                        message: format!("no schema in the tracking plan for event {name:?}"),
                        schema: "track".to_owned(),
                    }),
                    None => {}
                }
            }
        }

        let has_message_id = event
            .get("messageId")
            .is_some_and(|id| id.as_str().is_some());
        if !has_message_id && !issues.iter().any(|issue| issue.pointer == "/messageId") {
            issues.push(Issue {
                pointer: "/messageId".to_owned(),
                message: "messageId is required and must be a string".to_owned(),
                schema: "envelope".to_owned(),
            });
        }
        issues
    }

    /// Number of compiled schemas, the envelope included.
    pub fn len(&self) -> usize {
        1 + self.by_type.len() + self.by_event.len()
    }

    /// Always false: a registry holds at least the envelope.
    pub fn is_empty(&self) -> bool {
        false
    }
}

fn load_track_schema(path: &Path) -> Result<(String, Compiled), LoadError> {
    let schema = read_json(path)?;
    let event = schema
        .get(EVENT_NAME_KEY)
        .and_then(Value::as_str)
        .filter(|event| !event.is_empty())
        .ok_or_else(|| LoadError::MissingEventName {
            path: path.to_path_buf(),
        })?;
    let slug = event_slug(event);
    if file_stem(path) != Some(slug.as_str()) {
        return Err(LoadError::SlugMismatch {
            path: path.to_path_buf(),
            event: event.to_owned(),
            expected: format!("track/{slug}.json"),
        });
    }
    let compiled = compile(format!("track/{slug}"), path, &schema)?;
    Ok((event.to_owned(), compiled))
}

fn compile(name: String, path: &Path, schema: &Value) -> Result<Compiled, LoadError> {
    let validator = jsonschema::options_for::<DocJson>()
        .with_draft(jsonschema::Draft::Draft202012)
        .should_validate_formats(true)
        .should_ignore_unknown_formats(false)
        .offline()
        .build(schema)
        .map_err(|error| LoadError::Compile {
            path: path.to_path_buf(),
            message: error.to_string(),
        })?;
    Ok(Compiled { name, validator })
}

fn read_json(path: &Path) -> Result<Value, LoadError> {
    let text = fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| LoadError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// The `.json` files directly inside `dir`, sorted so load errors are reported deterministically.
fn json_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let read_error = |source| LoadError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_error)? {
        let path = entry.map_err(read_error)?.path();
        if path.is_file() && path.extension().is_some_and(|ext| ext == "json") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn file_stem(path: &Path) -> Option<&str> {
    path.file_stem().and_then(|stem| stem.to_str())
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod load_tests;
