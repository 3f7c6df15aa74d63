//! Loading the routes file, and reloading it while the proxy runs (SPEC §5).
//!
//! A load reads, parses and validates the whole file and reads every token it names, or
//! fails with one line naming the file and what is wrong. A reload does a load and, only
//! when it succeeded, swaps the new table in atomically: every request decided after the
//! swap (on new and already open tunnels) sees the new routes, requests in flight finish
//! under the table they started with, and an invalid file leaves the old routes in force.
//!
//! Triggers: SIGHUP (always reloads, re-reading tokens), and any change in the routes
//! file's directory (debounced, and only when the file's bytes changed). Watching the
//! directory rather than the file is what makes an editor's rename-and-replace, a
//! `docker cp` and a Kubernetes ConfigMap's `..data` symlink swap all visible.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::Watcher;
use tokio::sync::mpsc;

use crate::proxy::ProxyState;
use crate::routes::{RouteTable, SecretSource};

/// Events closer together than this are one change (an editor writes in several steps).
const DEBOUNCE: Duration = Duration::from_millis(150);

/// A routes file larger than this is refused before parsing.
const MAX_ROUTES_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// Tokens from the process environment and the filesystem.
pub(crate) struct ProcessSecrets;

impl SecretSource for ProcessSecrets {
    fn env(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn file(&self, path: &str) -> Result<String, String> {
        read_limited(Path::new(path)).map_err(|e| describe_read_error(Path::new(path), &e))
    }
}

fn read_limited(path: &Path) -> io::Result<String> {
    let meta = fs::metadata(path)?;
    if meta.len() > MAX_ROUTES_FILE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {MAX_ROUTES_FILE_BYTES} bytes"),
        ));
    }
    fs::read_to_string(path)
}

/// One line for a file that could not be read; for a permission problem it names the
/// file's owner and mode and who we run as, the usual container mistake.
fn describe_read_error(path: &Path, e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::PermissionDenied
        && let Ok(meta) = fs::metadata(path)
    {
        // SAFETY: geteuid and getegid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        return format!(
            "{}: permission denied (owner uid {} gid {}, mode {:04o}; egress-proxy runs as uid {uid} gid {gid}): make it readable by that user, e.g. mount its directory or docker cp -a a file owned by it",
            path.display(),
            meta.uid(),
            meta.gid(),
            meta.mode() & 0o7777
        );
    }
    format!("{}: {e}", path.display())
}

/// Reads and validates a routes file, reading every token it names.
pub fn load_routes(path: &Path) -> Result<RouteTable, String> {
    load_routes_with_bytes(path).map(|(table, _)| table)
}

/// A routes file's text, bounded in size, or one line naming it and what failed (for a
/// permission problem, its owner and mode).
pub(crate) fn read_routes_text(path: &Path) -> Result<String, String> {
    read_limited(path).map_err(|e| describe_read_error(path, &e))
}

/// [`load_routes`], and the bytes the table was parsed from (one read of the file), so a
/// later change is measured against exactly what is in force.
fn load_routes_with_bytes(path: &Path) -> Result<(RouteTable, Vec<u8>), String> {
    let text = read_routes_text(path)?;
    let table = RouteTable::from_text(&text, &ProcessSecrets)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((table, text.into_bytes()))
}

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trigger {
    Signal,
    FileChange,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "sighup",
            Trigger::FileChange => "file_change",
        }
    }
}

/// Handle to the reload task: send it a trigger.
#[derive(Debug, Clone)]
pub(crate) struct Reloader {
    tx: mpsc::Sender<Trigger>,
}

/// The watch on the routes file's directory, started before the routes are first read
/// (SPEC §5): a change made while the proxy is still starting (its CA key being read, its
/// listeners bound) is an event queued here, and the reload task applies it as soon as it
/// runs. Watching only after the first read would miss a change made in between, and
/// the running table would stay stale until a SIGHUP.
pub(crate) struct RoutesWatch {
    path: PathBuf,
    tx: mpsc::Sender<Trigger>,
    rx: mpsc::Receiver<Trigger>,
    watcher: notify::RecommendedWatcher,
}

impl std::fmt::Debug for RoutesWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoutesWatch")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl RoutesWatch {
    /// Starts watching the directory of the routes file at `path`.
    pub(crate) fn start(path: PathBuf) -> Result<RoutesWatch, String> {
        let (tx, rx) = mpsc::channel::<Trigger>(64);
        let watch_tx = tx.clone();
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok_and(|e| may_change_the_file(&e.kind)) {
                    let _ = watch_tx.try_send(Trigger::FileChange);
                }
            })
            .map_err(|e| format!("watching {}: {e}", dir.display()))?;
        watcher
            .watch(&dir, notify::RecursiveMode::NonRecursive)
            .map_err(|e| format!("watching {}: {e}", dir.display()))?;
        Ok(RoutesWatch {
            path,
            tx,
            rx,
            watcher,
        })
    }

    /// The first read of the routes, with the watch already in place: the table, and
    /// the bytes it was parsed from (for [`RoutesWatch::serve`]).
    pub(crate) fn load(&self) -> Result<(RouteTable, Vec<u8>), String> {
        load_routes_with_bytes(&self.path)
    }

    /// Starts the reload task. `initial` is what [`RoutesWatch::load`] read: the file is
    /// reloaded when its bytes differ from those, including for a change that happened
    /// before this call.
    pub(crate) fn serve(self, state: Arc<ProxyState>, initial: Vec<u8>) -> Reloader {
        let RoutesWatch {
            path,
            tx,
            rx,
            watcher,
        } = self;
        tokio::spawn(run(state, path, rx, watcher, Some(initial)));
        Reloader { tx }
    }
}

impl Reloader {
    /// Asks for a reload (SIGHUP).
    pub(crate) fn trigger(&self, trigger: Trigger) {
        let _ = self.tx.try_send(trigger);
    }
}

/// Whether a directory event may have changed the routes file. Opening, reading, or
/// closing a file that was only read cannot, and must not count: the check after each
/// change reads the file, which is itself such an event, and taking it for a change kept
/// the proxy re-reading its routes file every debounce window, forever, from its first
/// read at start. A close after writing does count.
fn may_change_the_file(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    match kind {
        notify::EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        notify::EventKind::Access(_) => false,
        _ => true,
    }
}

async fn run(
    state: Arc<ProxyState>,
    path: PathBuf,
    mut rx: mpsc::Receiver<Trigger>,
    _watcher: notify::RecommendedWatcher,
    mut last_bytes: Option<Vec<u8>>,
) {
    while let Some(first) = rx.recv().await {
        // A file change waits out the debounce window and collects whatever else arrived;
        // a signal among them (or first) makes it a forced reload, at once.
        let mut trigger = first;
        if trigger == Trigger::FileChange {
            let window = tokio::time::sleep(DEBOUNCE);
            tokio::pin!(window);
            loop {
                tokio::select! {
                    _ = &mut window => break,
                    next = rx.recv() => match next {
                        Some(Trigger::Signal) => { trigger = Trigger::Signal; break }
                        Some(Trigger::FileChange) => {}
                        None => return,
                    },
                }
            }
        }
        while let Ok(t) = rx.try_recv() {
            if t == Trigger::Signal {
                trigger = Trigger::Signal;
            }
        }
        let bytes = fs::read(&path).ok();
        if trigger == Trigger::FileChange && bytes.is_some() && bytes == last_bytes {
            continue;
        }
        if trigger == Trigger::FileChange && bytes.is_none() && last_bytes.is_none() {
            continue;
        }
        last_bytes = bytes;
        reload(&state, &path, trigger).await;
    }
}

/// Loads the file and swaps it in when valid; logs one `reload` event either way.
pub(crate) async fn reload(state: &ProxyState, path: &Path, trigger: Trigger) -> bool {
    let owned = path.to_path_buf();
    let loaded = tokio::task::spawn_blocking(move || load_routes(&owned))
        .await
        .unwrap_or_else(|e| Err(format!("reload task failed: {e}")));
    match loaded {
        Ok(mut table) => {
            // A route that matches the same requests under the same rate limit keeps its
            // spent bucket: a reload is no way to refill it.
            table.keep_buckets_from(&state.routes.load());
            let n = table.routes().len();
            state.routes.store(Arc::new(table));
            state.metrics.count_reload(true);
            tracing::info!(event = "reload", result = "ok", trigger = trigger.as_str(), routes = n, routes_file = %path.display(), "routes reloaded");
            true
        }
        Err(reason) => {
            state.metrics.count_reload(false);
            tracing::warn!(event = "reload", result = "error", trigger = trigger.as_str(), reason = %reason, routes_file = %path.display(), "routes file invalid; keeping the routes in force");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::may_change_the_file;
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode, CreateKind, DataChange, ModifyKind, RemoveKind};

    #[test]
    fn reading_the_file_is_not_a_change_and_writing_or_replacing_it_is() {
        for access in [
            AccessKind::Open(AccessMode::Read),
            AccessKind::Read,
            AccessKind::Close(AccessMode::Read),
            AccessKind::Any,
        ] {
            assert!(
                !may_change_the_file(&EventKind::Access(access)),
                "{access:?}"
            );
        }
        for change in [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Modify(ModifyKind::Name(notify::event::RenameMode::To)),
            EventKind::Remove(RemoveKind::File),
            EventKind::Any,
            EventKind::Other,
        ] {
            assert!(may_change_the_file(&change), "{change:?}");
        }
    }
}
