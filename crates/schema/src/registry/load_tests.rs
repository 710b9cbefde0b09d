//! Loading a tracking plan: what loads, and each way a plan fails to load with an error that
//! names the file.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Registry, UnknownEventPolicy};
use crate::LoadError;

/// A scratch tracking plan under the system temp dir, removed on drop.
struct ScratchPlan {
    dir: PathBuf,
}

impl ScratchPlan {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ingest-schema-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(dir.join("track")).expect("create scratch plan dir");
        Self { dir }
    }

    fn with_envelope() -> Self {
        let plan = Self::new();
        plan.write(
            "envelope.json",
            r#"{ "type": "object", "required": ["type"] }"#,
        );
        plan
    }

    fn write(&self, relative: &str, contents: &str) {
        std::fs::write(self.dir.join(relative), contents).expect("write scratch schema");
    }

    fn load(&self) -> Result<Registry, LoadError> {
        Registry::load(&self.dir, UnknownEventPolicy::Accept)
    }
}

impl Drop for ScratchPlan {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn load_error(plan: &ScratchPlan) -> LoadError {
    match plan.load() {
        Ok(registry) => panic!("expected a load error, got {registry:?}"),
        Err(error) => error,
    }
}

#[test]
fn minimal_plan_with_only_an_envelope_loads() {
    let plan = ScratchPlan::with_envelope();
    let registry = plan.load().expect("envelope alone is a plan");
    assert_eq!(registry.len(), 1);
}

#[test]
fn load_fails_without_envelope() {
    let plan = ScratchPlan::new();
    let error = load_error(&plan);
    assert!(
        matches!(error, LoadError::MissingEnvelope { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("envelope.json"));
}

#[test]
fn load_error_names_the_file_with_bad_json() {
    let plan = ScratchPlan::with_envelope();
    plan.write(
        "track/order_completed.json",
        r#"{ "x-event": "Order Completed", "#,
    );
    let error = load_error(&plan);
    assert!(matches!(error, LoadError::Json { .. }), "{error:?}");
    assert!(
        error.to_string().contains("order_completed.json"),
        "{error}"
    );
}

#[test]
fn load_fails_when_x_event_does_not_match_the_file_name() {
    let plan = ScratchPlan::with_envelope();
    plan.write(
        "track/order_completed.json",
        r#"{ "x-event": "Order Refunded" }"#,
    );
    let error = load_error(&plan);
    assert!(matches!(error, LoadError::SlugMismatch { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("order_completed.json"), "{message}");
    assert!(message.contains("track/order_refunded.json"), "{message}");
}

#[test]
fn load_fails_when_x_event_is_missing() {
    let plan = ScratchPlan::with_envelope();
    plan.write("track/order_completed.json", r#"{ "type": "object" }"#);
    let error = load_error(&plan);
    assert!(
        matches!(error, LoadError::MissingEventName { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("order_completed.json"));
}

#[test]
fn load_fails_on_a_schema_that_does_not_compile() {
    let plan = ScratchPlan::with_envelope();
    plan.write("screen.json", r#"{ "type": "objekt" }"#);
    let error = load_error(&plan);
    assert!(matches!(error, LoadError::Compile { .. }), "{error:?}");
    assert!(error.to_string().contains("screen.json"));
}

#[test]
fn load_fails_on_a_reference_outside_the_file() {
    let plan = ScratchPlan::with_envelope();
    plan.write(
        "identify.json",
        r#"{ "$ref": "https://schemas.analytics.local/elsewhere.json" }"#,
    );
    let error = load_error(&plan);
    assert!(matches!(error, LoadError::Compile { .. }), "{error:?}");
}

#[test]
fn load_fails_on_an_unknown_top_level_schema() {
    let plan = ScratchPlan::with_envelope();
    plan.write(
        "order_completed.json",
        r#"{ "x-event": "Order Completed" }"#,
    );
    let error = load_error(&plan);
    assert!(
        matches!(error, LoadError::UnknownSchemaFile { .. }),
        "{error:?}"
    );
}

#[test]
fn load_fails_on_a_format_the_validator_does_not_know() {
    let plan = ScratchPlan::with_envelope();
    plan.write(
        "page.json",
        r#"{ "properties": { "url": { "format": "url-ish" } } }"#,
    );
    let error = load_error(&plan);
    assert!(matches!(error, LoadError::Compile { .. }), "{error:?}");
}

#[test]
fn non_json_files_in_the_plan_are_ignored() {
    let plan = ScratchPlan::with_envelope();
    plan.write("README.md", "# tracking plan");
    plan.write("track/notes.txt", "not a schema");
    let registry = plan.load().expect("non-schema files are ignored");
    assert_eq!(registry.len(), 1);
}
