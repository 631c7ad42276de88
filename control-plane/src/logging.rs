//! The service's log: lines on stderr (plain text, or JSON with
//! `IRONCLAW_LOG_FORMAT=json`), filtered by `IRONCLAW_LOG`, and the last warning kept
//! for `ironclaw status`.

use std::fmt::Write as _;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

/// The environment variable that picks the log format: `json`, else plain text.
pub const FORMAT_ENV: &str = "IRONCLAW_LOG_FORMAT";
/// The environment variable with the log filter (`info` by default).
pub const FILTER_ENV: &str = "IRONCLAW_LOG";

/// The longest warning text kept.
const MAX_WARNING_BYTES: usize = 1024;

/// The most recent line at WARN or ERROR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Warning {
    /// Unix seconds.
    pub at: i64,
    pub level: String,
    /// The message and its fields, as the log line shows them.
    pub text: String,
}

static LAST_WARNING: Mutex<Option<Warning>> = Mutex::new(None);

/// The last warning or error logged by this process, if any.
pub fn last_warning() -> Option<Warning> {
    LAST_WARNING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// Keeps the last WARN or ERROR event.
struct KeepLastWarning;

/// Writes an event's message first, then its other fields as `name=value`.
#[derive(Default)]
struct Text {
    message: String,
    fields: String,
}

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for KeepLastWarning {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        if level > tracing::Level::WARN {
            return;
        }
        let mut text = Text::default();
        event.record(&mut text);
        let mut line = text.message + &text.fields;
        if line.len() > MAX_WARNING_BYTES {
            let mut end = MAX_WARNING_BYTES;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
        }
        *LAST_WARNING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Warning {
            at: crate::state::now_secs(),
            level: level.to_string(),
            text: line,
        });
    }
}

/// Sets up the log for `serve`: stderr, without colours, in the format
/// [`FORMAT_ENV`] asks for.
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_env(FILTER_ENV)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = std::env::var(FORMAT_ENV).is_ok_and(|v| v == "json");
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(KeepLastWarning);
    let plain = (!json).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
    });
    let structured = json.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });
    registry.with(plain).with(structured).init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_warnings_and_errors_are_kept_with_their_fields_and_bounded() {
        let subscriber = tracing_subscriber::registry().with(KeepLastWarning);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("fine");
            assert_eq!(last_warning(), None);
            tracing::warn!(session = "alice", code = 3, "the sandbox crashed");
            let w = last_warning().unwrap();
            assert_eq!(w.level, "WARN");
            assert_eq!(w.text, "the sandbox crashed session=alice code=3");
            tracing::info!("fine again");
            assert_eq!(last_warning().unwrap(), w, "info never replaces it");
            tracing::error!(detail = %"x".repeat(5000), "failed");
            let e = last_warning().unwrap();
            assert_eq!(e.level, "ERROR");
            assert!(e.text.starts_with("failed detail=xxx") && e.text.len() == MAX_WARNING_BYTES);
        });
    }
}
