//! Why a tracking plan directory could not be turned into a [`crate::Registry`].

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("tracking plan {dir} has no envelope.json")]
    MissingEnvelope { dir: PathBuf },

    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{path} is not a valid JSON Schema 2020-12 document: {message}")]
    Compile { path: PathBuf, message: String },

    #[error(
        "{path} is not a known schema file: top-level schemas must be envelope.json or one of \
         track, identify, page, screen, group, alias (.json)"
    )]
    UnknownSchemaFile { path: PathBuf },

    #[error("{path} has no \"x-event\" naming the track event it applies to")]
    MissingEventName { path: PathBuf },

    #[error("{path} declares x-event {event:?}, whose schema file must be named {expected}")]
    SlugMismatch {
        path: PathBuf,
        event: String,
        expected: String,
    },
}
