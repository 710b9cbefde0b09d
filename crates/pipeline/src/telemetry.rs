//! One `init` for tracing: pretty for people, JSON for log shippers. `RUST_LOG` wins over the
//! configured level. Safe to call more than once (tests do).
//!
//! Message bodies never reach the log, whatever the level: a sendBeacon body carries its write
//! key. lapin prints whole messages in a few places, so those are capped by a second filter
//! that only ever lowers a level (an `EnvFilter` directive would raise it too).

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter};

use crate::settings::{LogFormat, LogSettings};

/// lapin modules that print message bodies, and the most they may log: `returned_messages`
/// logs a returned (unroutable) message whole at WARN, `channels` and `frames` print whole
/// frames at TRACE. lapin's other modules keep their warnings and errors.
const BODY_PRINTING_TARGETS: &[(&str, LevelFilter)] = &[
    ("lapin::returned_messages", LevelFilter::ERROR),
    ("lapin::channels", LevelFilter::DEBUG),
    ("lapin::frames", LevelFilter::DEBUG),
];

pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(no_message_bodies());
    let _already_set = match settings.format {
        LogFormat::Json => registry.with(fmt::layer().json()).try_init(),
        LogFormat::Pretty => registry.with(fmt::layer()).try_init(),
    };
}

/// Everything, except what [`BODY_PRINTING_TARGETS`] caps.
pub fn no_message_bodies() -> Targets {
    BODY_PRINTING_TARGETS.iter().fold(
        Targets::new().with_default(LevelFilter::TRACE),
        |targets, (target, max)| targets.with_target(*target, *max),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn lapin_never_logs_a_message_body_but_keeps_its_other_warnings() {
        let cap = no_message_bodies();
        assert!(!cap.would_enable("lapin::returned_messages", &Level::WARN));
        assert!(cap.would_enable("lapin::returned_messages", &Level::ERROR));
        assert!(!cap.would_enable("lapin::channels", &Level::TRACE));
        assert!(!cap.would_enable("lapin::frames", &Level::TRACE));
        assert!(cap.would_enable("lapin::channels", &Level::WARN));
        assert!(cap.would_enable("lapin::io_loop", &Level::WARN));
        assert!(cap.would_enable("lapin::io_loop", &Level::TRACE));
        assert!(cap.would_enable("collector::api", &Level::TRACE));
    }
}
