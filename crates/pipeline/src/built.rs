//! How large a request's events grow once the worker has built them: the one rule that the
//! collector checks before it answers 200 and the worker checks before it copies anything, so
//! that a body the collector accepts is never one the worker refuses as too large.
//!
//! The worker copies into each event of a batch what it lacks of the batch-level `context`
//! (key by key), `integrations` and `sentAt`, and gives a `screen` or `page` without a `name`
//! the one it sent as `event` (RudderStack's mobile SDKs). Each side measures the values it
//! sees (the collector as sent, the worker as it will write them) and this module adds them up.

/// `"context":{}` and its comma: what an event without a `context` gains before the keys.
const CONTEXT_WRAPPER: usize = r#""context":{},"#.len();
/// `"integrations":` and its comma.
const INTEGRATIONS_KEY: usize = r#""integrations":,"#.len();
/// `"sentAt":` and its comma.
const SENT_AT_KEY: usize = r#""sentAt":,"#.len();
/// `"name":` and its comma.
const NAME_KEY: usize = r#""name":,"#.len();

/// How much larger than the collector's `max_batch_bytes` a batch the collector accepted can
/// be once the worker has built it, before the worker's own per-event fields: the body (at
/// most the limit), and the copies, which the collector counts as sent (at most the limit).
/// Written back, a string or an object is never longer than as sent, but a number can be 4.5
/// times as long (`1E15` is written `1000000000000000.0`): 1 + 4.5, rounded up.
/// `tests/e2e/built_rule.rs` holds the two services to it.
pub const WORKER_BOUND_FACTOR: usize = 6;

/// What the worker adds to each event of its own, at most, counted against
/// `worker.max_built_bytes` for each of `collector.max_batch_events` (received-at, ids, the
/// request's source, IP and user agent cut to 512 characters).
pub const WORKER_FIELDS_BYTES: usize = 2048;

/// A screen or page name longer than this (in characters) is not copied: the envelope allows
/// no longer `name`.
pub const VIEW_NAME_CHARS: usize = 200;

/// What one copy of a batch-level context key costs in an event: the key quoted, its value,
/// a colon and a comma.
pub fn context_key_cost(quoted_key: usize, value: usize) -> usize {
    quoted_key.saturating_add(value).saturating_add(2)
}

/// The batch-level fields the worker copies into each event that lacks them, each as the
/// bytes its value takes (`None`: the batch does not have it, or has `null`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Shared {
    /// Every batch-level context key's [`context_key_cost`], summed; `None`: no context object.
    pub context: Option<usize>,
    pub integrations: Option<usize>,
    pub sent_at: Option<usize>,
}

/// An event's own `context`, as the copy of the batch-level one sees it.
#[derive(Debug, Clone, Copy)]
pub enum OwnContext {
    /// Absent or `null`: it gets a new one with every batch-level key.
    Absent,
    /// An object that has batch-level keys costing `kept` of [`Shared::context`]: it gets the
    /// others.
    Object { kept: usize },
    /// Not an object: nothing is copied into it.
    Other,
}

/// What one event of a batch has of what the worker would add.
#[derive(Debug, Clone, Copy)]
pub struct Lacks {
    pub context: OwnContext,
    pub has_integrations: bool,
    pub has_sent_at: bool,
    /// For a screen or page without a `name`: the bytes of the `event` it takes the name from.
    pub view_name: Option<usize>,
}

/// The bytes the worker adds to one event of a batch with `shared` fields.
pub fn added(shared: &Shared, event: &Lacks) -> usize {
    let context = match (shared.context, event.context) {
        (None, _) | (Some(_), OwnContext::Other) => 0,
        (Some(all), OwnContext::Absent) => CONTEXT_WRAPPER.saturating_add(all),
        (Some(all), OwnContext::Object { kept }) => all.saturating_sub(kept),
    };
    let integrations = match (shared.integrations, event.has_integrations) {
        (Some(bytes), false) => INTEGRATIONS_KEY.saturating_add(bytes),
        _ => 0,
    };
    let sent_at = match (shared.sent_at, event.has_sent_at) {
        (Some(bytes), false) => SENT_AT_KEY.saturating_add(bytes),
        _ => 0,
    };
    let name = event.view_name.map_or(0, view_name_added);
    context
        .saturating_add(integrations)
        .saturating_add(sent_at)
        .saturating_add(name)
}

/// What a `name` of `bytes` (quoted) adds to an event: the key, the value and a comma.
pub fn view_name_added(bytes: usize) -> usize {
    NAME_KEY.saturating_add(bytes)
}

/// Whether a screen or page without a `name` takes `event` as its name: a non-empty string of
/// at most [`VIEW_NAME_CHARS`] characters.
pub fn is_view_name(event: &str) -> bool {
    !event.is_empty() && event.chars().count() <= VIEW_NAME_CHARS
}

/// Whether an event of this `type` gets a `name` from its `event` when it has none.
pub fn is_view(kind: &str) -> bool {
    matches!(kind, "screen" | "page")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_copy_costs_its_key_and_value_and_an_event_pays_only_for_what_it_lacks() {
        let shared = Shared {
            context: Some(100),
            integrations: Some(10),
            sent_at: Some(26),
        };
        let lacks_all = Lacks {
            context: OwnContext::Absent,
            has_integrations: false,
            has_sent_at: false,
            view_name: Some(6),
        };
        assert_eq!(
            added(&shared, &lacks_all),
            (13 + 100) + (16 + 10) + (10 + 26) + (8 + 6)
        );
        let has_all = Lacks {
            context: OwnContext::Object { kept: 100 },
            has_integrations: true,
            has_sent_at: true,
            view_name: None,
        };
        assert_eq!(added(&shared, &has_all), 0);
        let other_context = Lacks {
            context: OwnContext::Other,
            ..has_all
        };
        assert_eq!(added(&shared, &other_context), 0);
        assert_eq!(added(&Shared::default(), &lacks_all), 8 + 6);
    }

    #[test]
    fn view_names_are_short_non_empty_strings_of_screens_and_pages() {
        assert!(is_view("screen") && is_view("page") && !is_view("track"));
        assert!(is_view_name("Cart"));
        assert!(!is_view_name(""));
        assert!(is_view_name(&"é".repeat(VIEW_NAME_CHARS)));
        assert!(!is_view_name(&"x".repeat(VIEW_NAME_CHARS + 1)));
    }
}
