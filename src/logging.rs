//! Log output: one JSON object a line on stderr (SPEC §6), or compact text for a person.
//!
//! Why a formatter of our own: every request writes an audit line, and tracing-subscriber's
//! JSON formatter first collects an event's fields into a map of `serde_json::Value`s,
//! allocating a string for each, before it writes them, and for a small request that was
//! a large share of the proxy's work (docs/decisions.md). [`JsonLines`] writes each field
//! straight into the line as the event is visited, escaped on the fly, and allocates
//! nothing. The shape is the same: `timestamp`, `level`, the event's fields in order (the
//! message, if any, under `message`), then `target`.

use std::cell::Cell;
use std::fmt::{self, Write};
use std::io::Write as _;
use std::sync::Mutex;
use std::time::SystemTime;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// Installs the process-wide subscriber: levels from `RUST_LOG` (default `info`), lines to
/// stderr in `format`.
///
/// `RUST_LOG` takes `level` and `target=level` directives, comma-separated (`info`,
/// `warn,egress_proxy::audit=info`): tracing-subscriber's `Targets`, which is what a
/// proxy's logs need without `EnvFilter`'s span and field filters and the regex engine
/// behind them. An unparsable value falls back to `info`.
pub fn init(format: LogFormat) {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    let layer = tracing_subscriber::fmt::layer().with_writer(|| LineSink);
    match format {
        LogFormat::Json => tracing_subscriber::registry()
            .with(layer.event_format(JsonLines).with_filter(filter))
            .init(),
        LogFormat::Text => {
            // Colour only for a person at a terminal, never into a log file.
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            tracing_subscriber::registry()
                .with(layer.compact().with_ansi(ansi).with_filter(filter))
                .init()
        }
    }
}

/// Lines waiting to be written to stderr (see [`LineSink`]).
static PENDING: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Past this many bytes, pending lines are written at once even on a busy worker.
const PENDING_LIMIT: usize = 16 * 1024;

thread_local! {
    /// Whether this thread is a runtime worker, whose lines may wait for [`flush`].
    static DEFERS_WRITES: Cell<bool> = const { Cell::new(false) };
}

/// For the runtime's `on_thread_park`, which only its workers call: writes what is
/// pending and marks this thread as a worker, whose lines from now on wait for the next
/// park or for [`PENDING_LIMIT`] instead of costing one `write(2)` each. Lines from any
/// other thread (blocking pool, file watcher) are written at once, after whatever is
/// pending, so the order is kept and nothing waits on an idle runtime.
pub fn on_worker_park() {
    DEFERS_WRITES.with(|d| d.set(true));
    flush();
}

/// Writes every pending line to stderr: when a worker is about to park, and before the
/// process exits.
pub fn flush() {
    let mut pending = PENDING.lock().unwrap_or_else(|p| p.into_inner());
    write_out(&mut pending);
}

fn write_out(pending: &mut Vec<u8>) {
    if !pending.is_empty() {
        // Nothing sensible to do if stderr is gone; the lines are dropped.
        let _ = std::io::stderr().write_all(pending);
        pending.clear();
    }
}

/// Where each formatted line goes. Why not stderr directly: an audit line per request
/// was a `write(2)` per request, a system call as dear as the request's own; a
/// worker's lines are batched until the runtime has nothing else to do, which under light
/// load is right after the request, and under heavy load within [`PENDING_LIMIT`] bytes.
/// What a SIGKILL can lose is bounded the same way.
struct LineSink;

impl std::io::Write for LineSink {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut pending = PENDING.lock().unwrap_or_else(|p| p.into_inner());
        pending.extend_from_slice(line);
        if pending.len() >= PENDING_LIMIT || !DEFERS_WRITES.with(Cell::get) {
            write_out(&mut pending);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Formats each event as one JSON object, written field by field.
pub(crate) struct JsonLines;

thread_local! {
    /// The line being formatted, reused by every event on this thread.
    static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // The line is built in a buffer of our own and handed over once: `Writer` is a
        // `dyn fmt::Write`, and a call through it for every piece of every field was
        // most of what an audit line cost.
        LINE.with(|line| {
            let Ok(mut line) = line.try_borrow_mut() else {
                // An event logged while formatting one (from a Debug impl): unbuffered.
                return format_line(&mut writer, event);
            };
            line.clear();
            format_line(&mut *line, event)?;
            writer.write_str(&line)
        })
    }
}

/// `{"timestamp":…,"level":…,<fields>,"target":…}` and a newline.
fn format_line(out: &mut impl Write, event: &Event<'_>) -> fmt::Result {
    let meta = event.metadata();
    out.write_str("{\"timestamp\":\"")?;
    write_timestamp(out, SystemTime::now())?;
    out.write_str("\",\"level\":\"")?;
    out.write_str(meta.level().as_str())?;
    out.write_char('"')?;
    let mut fields = JsonFields {
        out: &mut *out,
        result: Ok(()),
    };
    event.record(&mut fields);
    fields.result?;
    out.write_str(",\"target\":")?;
    write_json_str(out, meta.target())?;
    out.write_str("}\n")
}

/// Writes `,"name":value` for each field of an event.
struct JsonFields<'w, W: Write> {
    out: &'w mut W,
    result: fmt::Result,
}

impl<W: Write> JsonFields<'_, W> {
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut W) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = (|| {
                // Field names are Rust identifiers (tracing's macros take no other),
                // which need no escaping.
                self.out.write_str(",\"")?;
                self.out.write_str(field.name())?;
                self.out.write_str("\":")?;
                value(self.out)
            })();
        }
    }
}

impl<W: Write> Visit for JsonFields<'_, W> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, |out| write_json_str(out, value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |out| {
            out.write_str(itoa::Buffer::new().format(value))
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |out| {
            out.write_str(itoa::Buffer::new().format(value))
        });
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |out| {
            out.write_str(if value { "true" } else { "false" })
        });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity: those become strings.
        self.field(field, |out| {
            if value.is_finite() {
                write!(out, "{value}")
            } else {
                write!(out, "\"{value}\"")
            }
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `%value` fields arrive here too, through a Debug that calls Display.
        self.field(field, |out| {
            out.write_char('"')?;
            write!(JsonEscaped(&mut *out), "{value:?}")?;
            out.write_char('"')
        });
    }
}

/// `value` as a JSON string, quotes included.
fn write_json_str(out: &mut impl Write, value: &str) -> fmt::Result {
    out.write_char('"')?;
    JsonEscaped(&mut *out).write_str(value)?;
    out.write_char('"')
}

/// A writer that escapes what passes through it for the inside of a JSON string.
struct JsonEscaped<'a, W: Write>(&'a mut W);

impl<W: Write> Write for JsonEscaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Almost every value needs no escape: one pass to check, one write.
        if !s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
            return self.0.write_str(s);
        }
        let mut plain_from = 0;
        for (i, b) in s.bytes().enumerate() {
            let escape = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..=0x1f => "",
                _ => continue,
            };
            self.0.write_str(&s[plain_from..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            plain_from = i + 1;
        }
        self.0.write_str(&s[plain_from..])
    }
}

/// RFC 3339 in UTC with microseconds, as `2026-11-23T10:04:05.123456Z`; digits written
/// directly, as `write!` with seven padded integers cost more than the rest of a line.
fn write_timestamp(out: &mut impl Write, now: SystemTime) -> fmt::Result {
    let t = time::OffsetDateTime::from(now);
    let mut b = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut v: u32| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, t.year().clamp(0, 9999) as u32);
    put(5, 2, u8::from(t.month()).into());
    put(8, 2, t.day().into());
    put(11, 2, t.hour().into());
    put(14, 2, t.minute().into());
    put(17, 2, t.second().into());
    put(20, 6, t.microsecond());
    // Only ASCII digits and the separators above are in `b`.
    out.write_str(std::str::from_utf8(&b).map_err(|_| fmt::Error)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, UNIX_EPOCH};

    /// Runs `f` under a JSON-lines subscriber and returns what it wrote.
    fn capture(f: impl FnOnce()) -> String {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || SharedWriter(sink.clone()))
            .event_format(JsonLines)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = buf.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8(bytes).unwrap_or_default()
    }

    struct SharedWriter(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for SharedWriter {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut v) = self.0.lock() {
                v.extend_from_slice(b);
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn an_event_is_one_json_object_with_its_fields_in_order() {
        let client: std::net::SocketAddr = "127.0.0.1:4242".parse().unwrap();
        let none: Option<&str> = None;
        let out = capture(|| {
            tracing::info!(
                target: "egress_proxy::audit",
                event = "request",
                conn = 7u64,
                client = %client,
                route = Some(2usize),
                reason = none,
                ok = true,
                delta = -3i64,
                ratio = 0.5f64,
                odd = f64::NAN,
            );
            tracing::warn!(file = "a\"b\\c\nd\u{1}e", "routes not reloaded");
        });
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(first["level"], "INFO");
        assert_eq!(first["event"], "request");
        assert_eq!(first["conn"], 7);
        assert_eq!(first["client"], "127.0.0.1:4242");
        assert_eq!(first["route"], 2);
        assert!(first.get("reason").is_none(), "None fields are left out");
        assert_eq!(first["ok"], true);
        assert_eq!(first["delta"], -3);
        assert_eq!(first["ratio"], 0.5);
        assert_eq!(first["odd"], "NaN");
        assert_eq!(first["target"], "egress_proxy::audit");
        let keys: Vec<&str> = ["timestamp", "level", "event", "conn", "client", "route"]
            .into_iter()
            .collect();
        let positions: Vec<usize> = keys
            .iter()
            .map(|k| lines[0].find(&format!("\"{k}\":")).unwrap())
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{}", lines[0]);

        let second: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(second["level"], "WARN");
        assert_eq!(second["message"], "routes not reloaded");
        assert_eq!(second["file"], "a\"b\\c\nd\u{1}e");
        assert!(lines[1].contains(r#""a\"b\\c\nd\u0001e""#), "{}", lines[1]);
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let mut s = String::new();
        let t = UNIX_EPOCH + Duration::from_micros(1_795_392_245_000_042);
        write_timestamp(&mut s, t).unwrap();
        assert_eq!(s, "2026-11-23T00:04:05.000042Z");
    }
}
