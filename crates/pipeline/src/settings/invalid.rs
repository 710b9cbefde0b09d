//! `worker.invalid`: how the worker compacts repeats of one invalid event before they reach the
//! invalid queue (the queue's byte cap is `broker.invalid_max_length_bytes`, since every
//! declarer must pass it).

use serde::Deserialize;

/// Per source and error signature, within a window of `window_ms`, the first `keep_whole`
/// invalid records go to the invalid queue whole; the rest are counted in one summary record
/// per window. The signatures tracked at once are bounded, in all and per source; a signature
/// past either bound is counted under its source's catch-all (or one shared catch-all).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InvalidSettings {
    /// The window in milliseconds; 0 keeps every invalid record whole (no compaction).
    pub window_ms: u64,
    /// Records kept whole per source, signature and window.
    pub keep_whole: usize,
    /// (source, signature) windows tracked at once, in all.
    pub max_signatures: usize,
    /// Signatures of one source tracked at once: one client's variety cannot take the table.
    pub max_signatures_per_source: usize,
}

impl Default for InvalidSettings {
    fn default() -> Self {
        Self {
            window_ms: 60_000,
            keep_whole: 10,
            max_signatures: 10_000,
            max_signatures_per_source: 100,
        }
    }
}

/// The largest `max_signatures`: a tracked signature costs up to about 2 KB.
const MAX_SIGNATURES_LIMIT: usize = 1_000_000;
/// The largest `keep_whole`: more is no compaction.
const MAX_KEEP_WHOLE: usize = 100_000;
/// The longest window: a day.
const MAX_WINDOW_MS: u64 = 86_400_000;

impl InvalidSettings {
    /// Names the first bad field (as `worker.invalid.<field>`).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.window_ms > MAX_WINDOW_MS {
            return Err((
                "worker.invalid.window_ms",
                format!("must be at most {MAX_WINDOW_MS} (a day); 0 turns compaction off"),
            ));
        }
        if !(1..=MAX_KEEP_WHOLE).contains(&self.keep_whole) {
            return Err((
                "worker.invalid.keep_whole",
                format!("must be between 1 and {MAX_KEEP_WHOLE}"),
            ));
        }
        if !(1..=MAX_SIGNATURES_LIMIT).contains(&self.max_signatures) {
            return Err((
                "worker.invalid.max_signatures",
                format!("must be between 1 and {MAX_SIGNATURES_LIMIT}"),
            ));
        }
        if !(1..=self.max_signatures).contains(&self.max_signatures_per_source) {
            return Err((
                "worker.invalid.max_signatures_per_source",
                "must be between 1 and worker.invalid.max_signatures".to_owned(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_defaults_are_valid_and_each_bad_field_is_named() {
        assert_eq!(InvalidSettings::default().validate(), Ok(()));
        let off = InvalidSettings {
            window_ms: 0,
            ..InvalidSettings::default()
        };
        assert_eq!(off.validate(), Ok(()));
        for (bad, field) in [
            (json!({"window_ms": 86_400_001u64}), "window_ms"),
            (json!({"keep_whole": 0}), "keep_whole"),
            (json!({"keep_whole": 100_001}), "keep_whole"),
            (json!({"max_signatures": 0}), "max_signatures"),
            (json!({"max_signatures": 1_000_001}), "max_signatures"),
            (
                json!({"max_signatures": 10, "max_signatures_per_source": 11}),
                "max_signatures_per_source",
            ),
            (
                json!({"max_signatures_per_source": 0}),
                "max_signatures_per_source",
            ),
        ] {
            let mut value = serde_json::to_value(InvalidSettings::default()).expect("json");
            for (k, v) in bad.as_object().expect("object") {
                value[k] = v.clone();
            }
            let settings: InvalidSettings = serde_json::from_value(value).expect("parses");
            let (setting, _) = settings.validate().expect_err(field);
            assert_eq!(setting, format!("worker.invalid.{field}"), "{bad}");
        }
    }

    #[test]
    fn an_unknown_field_is_refused() {
        let value = json!({"window_ms": 1, "keep_whole": 1, "max_signatures": 1,
            "max_signatures_per_source": 1, "keep": 3});
        let error = serde_json::from_value::<InvalidSettings>(value).expect_err("unknown");
        assert!(error.to_string().contains("keep"), "{error}");
    }
}
