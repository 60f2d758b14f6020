//! Log output: `tracing` with a human format on a terminal and JSON lines
//! for journald and log shippers (`log_format`).

use crate::config::LogFormat;
use std::io::IsTerminal;

/// The format `auto` stands for here: text on a terminal; JSON when stderr
/// is connected to the journal (systemd sets JOURNAL_STREAM); text otherwise.
pub fn effective(format: LogFormat) -> LogFormat {
    match format {
        LogFormat::Auto => {
            if !std::io::stderr().is_terminal() && std::env::var_os("JOURNAL_STREAM").is_some() {
                LogFormat::Json
            } else {
                LogFormat::Text
            }
        }
        f => f,
    }
}

/// Installs the global subscriber; `level` was validated by `config`.
pub fn init(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match effective(format) {
        LogFormat::Json => b.json().flatten_event(true).with_current_span(false).init(),
        _ => b.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// Admin commands: RUST_LOG or `info`, text.
pub fn init_for_cli() {
    let level = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    init(&level, LogFormat::Text);
}
