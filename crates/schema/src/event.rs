//! What validation produces: a [`ValidatedEvent`] that only the registry can build, or an
//! [`Invalid`] carrying the original event and every [`Issue`] found in it.

use serde_json::{Map, Value};

/// An event that passed every applicable schema and carries a string `messageId`.
#[derive(Debug, Clone)]
pub struct ValidatedEvent {
    map: Map<String, Value>,
    message_id: String,
}

impl ValidatedEvent {
    pub(crate) fn new(map: Map<String, Value>, message_id: String) -> Self {
        Self { map, message_id }
    }

    pub fn as_map(&self) -> &Map<String, Value> {
        &self.map
    }

    pub fn into_map(self) -> Map<String, Value> {
        self.map
    }

    pub fn message_id(&self) -> &str {
        &self.message_id
    }
}

/// An event rejected by the tracking plan, with every reason.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Invalid {
    pub event: Value,
    pub errors: Vec<Issue>,
}

/// One problem with an event.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Issue {
    /// JSON pointer into the event; `""` is the event itself.
    pub pointer: String,
    pub message: String,
    /// The schema that reported it, named by its path in the tracking plan without `.json`:
    /// `envelope`, `identify`, `track/order_completed`.
    pub schema: String,
}
