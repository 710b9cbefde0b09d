//! The spool is the collector's user's alone: its files hold request bodies (users' data), so
//! the directory is `0700` and the segment and lock files `0600`, whatever the umask. A spool
//! an older release left readable by others is tightened when it is opened; where that is
//! refused (the directory belongs to another user), the spool still opens, with a warning.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

#[cfg(unix)]
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};

#[cfg(unix)]
const DIR_MODE: u32 = 0o700;
#[cfg(unix)]
const FILE_MODE: u32 = 0o600;

/// Creates `dir` `0700` (its missing parents as the umask says), or makes an existing one that
/// others may enter `0700`.
pub(super) fn create_dir(dir: &Path) -> io::Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    builder.mode(DIR_MODE);
    match builder.create(dir) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(error) => return Err(error),
    }
    #[cfg(unix)]
    {
        let mode = std::fs::metadata(dir)?.permissions().mode();
        if mode & 0o077 != 0 {
            let tightened =
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE));
            warn_unless_done(dir, mode, tightened);
        }
    }
    Ok(())
}

/// Options that create a file `0600`.
pub(super) fn options() -> OpenOptions {
    let mut options = OpenOptions::new();
    #[cfg(unix)]
    options.mode(FILE_MODE);
    options
}

/// Makes a file the spool found readable by others (made by an older release) `0600`.
pub(super) fn tighten(file: &File, path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let mode = file.metadata()?.permissions().mode();
        if mode & 0o077 != 0 {
            warn_unless_done(
                path,
                mode,
                file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE)),
            );
        }
    }
    #[cfg(not(unix))]
    let _ = (file, path);
    Ok(())
}

/// A spool whose mode cannot be tightened still opens: refusing would turn a permission left by
/// the operator into an outage.
#[cfg(unix)]
fn warn_unless_done(path: &Path, mode: u32, done: io::Result<()>) {
    if let Err(error) = done {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", mode & 0o777),
            %error,
            "cannot make the spool readable by the collector's user alone"
        );
    }
}
