//! Loading the routes file from disk, with the process environment as the token source.
//!
//! Used at start-up, by `check`, and on every reload: a file is read, parsed and
//! validated completely and its tokens are read, or the whole attempt fails with one
//! line naming the file and what is wrong. (The SIGHUP and file-watch triggers that swap
//! a freshly loaded table in come with the live-operations work.)

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::routes::{RouteTable, SecretSource};

/// A routes file larger than this is refused before parsing.
const MAX_ROUTES_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// Tokens from the process environment and the filesystem.
pub struct ProcessSecrets;

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
    if e.kind() == io::ErrorKind::PermissionDenied {
        if let Ok(meta) = fs::metadata(path) {
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
    }
    format!("{}: {e}", path.display())
}

/// Reads and validates a routes file, reading every token it names.
pub fn load_routes(path: &Path) -> Result<RouteTable, String> {
    let text = read_limited(path).map_err(|e| describe_read_error(path, &e))?;
    RouteTable::from_text(&text, &ProcessSecrets).map_err(|e| format!("{}: {e}", path.display()))
}
