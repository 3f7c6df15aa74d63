//! `egress-proxy routes suggest` as a command: open the `--routes` file and the logs it
//! names (stdin for none or `-`), hand them to [`Suggester`], print its draft on stdout
//! and its notes on stderr. All the deciding is [`Suggester`]'s.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use super::Suggester;
use crate::reload::read_routes_text;

/// Runs `routes suggest`; an error is one line naming the file that failed.
pub fn suggest_routes(
    routes: Option<&Path>,
    max_literal: usize,
    logs: &[PathBuf],
) -> Result<(), String> {
    let mut suggester = Suggester::new(max_literal);
    if let Some(path) = routes {
        let text = read_routes_text(path).map_err(|e| format!("--routes {e}"))?;
        suggester = suggester.with_routes(&path.display().to_string(), &text)?;
    }
    let stdin_only = [PathBuf::from("-")];
    let logs = if logs.is_empty() {
        &stdin_only[..]
    } else {
        logs
    };
    let stderr = std::io::stderr();
    let mut warn = |line: &str| {
        let _ = writeln!(stderr.lock(), "{line}");
    };
    for log in logs {
        // The file's name goes before `line N` only when there are several to tell apart.
        let name = (logs.len() > 1).then(|| match log.to_str() {
            Some("-") => "stdin".to_owned(),
            _ => log.display().to_string(),
        });
        let mut reader: Box<dyn BufRead> = if log.as_os_str() == "-" {
            Box::new(std::io::stdin().lock())
        } else {
            let file = std::fs::File::open(log).map_err(|e| format!("{}: {e}", log.display()))?;
            Box::new(std::io::BufReader::with_capacity(64 << 10, file))
        };
        suggester
            .read(name.as_deref(), &mut reader, &mut warn)
            .map_err(|e| format!("{}: {e}", log.display()))?;
    }
    let (yaml, notes) = suggester.finish();
    for note in notes {
        warn(&note);
    }
    std::io::stdout()
        .lock()
        .write_all(yaml.as_bytes())
        .map_err(|e| format!("writing the routes: {e}"))
}
