//! Event model and schema registry for the ingest pipeline.
//!
//! The tracking plan lives in `schemas/` as JSON Schema 2020-12 files. [`Registry::load`] compiles
//! them once; [`Registry::validate`] checks an event against every schema that applies to it and
//! either returns a [`ValidatedEvent`] (the only way to obtain one) or an [`Invalid`] listing every
//! problem found.

pub mod doc;
mod error;
mod event;
mod registry;
mod slug;

pub use doc::{Doc, DocJson, Edit, Node, ObjMut, SharedEdits, Text, Val};
pub use error::LoadError;
pub use event::{Invalid, Issue, ValidatedEvent};
pub use registry::{Registry, UnknownEventPolicy, EVENT_TYPES};
pub use slug::event_slug;
