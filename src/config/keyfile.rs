//! Checks on key files referenced by the config. Key material is never put in
//! a message and is wiped after the check.

use std::io::{ErrorKind, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use zeroize::Zeroizing;

/// Anything bigger is certainly not a one-line key.
const MAX_KEY_FILE: u64 = 4096;

/// Every problem with the key file at `path` (empty if it is usable).
pub(super) fn check(path: &Path) -> Vec<String> {
    let shown = path.display();
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return vec![format!("key file {shown} does not exist")];
        }
        Err(e) => return vec![format!("cannot access key file {shown}: {e}")],
    };
    if !meta.is_file() {
        return vec![format!("key file {shown} is not a regular file")];
    }

    let mut problems = Vec::new();
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        problems.push(format!(
            "key file {shown} is readable by group/others (mode {mode:04o}); run chmod 600 {shown}"
        ));
    }
    if meta.len() > MAX_KEY_FILE {
        problems.push(format!(
            "key file {shown} is too large ({} bytes) to hold a key",
            meta.len()
        ));
        return problems;
    }
    match read_secret(path) {
        Ok(content) if holds_key(&content) => {}
        Ok(_) => problems.push(format!(
            "key file {shown} does not hold a key: expected one line of base64 encoding \
             32 bytes (as written by `wg genkey`)"
        )),
        Err(e) => problems.push(format!("cannot read key file {shown}: {e}")),
    }
    problems
}

fn read_secret(path: &Path) -> std::io::Result<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(Vec::with_capacity(MAX_KEY_FILE as usize + 1));
    std::fs::File::open(path)?
        .take(MAX_KEY_FILE + 1)
        .read_to_end(&mut buf)?;
    Ok(buf)
}

fn holds_key(content: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(content) else {
        return false;
    };
    STANDARD
        .decode(text.trim())
        .map(|bytes| Zeroizing::new(bytes).len() == 32)
        .unwrap_or(false)
}
