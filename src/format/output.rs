//! Output files: written to a temporary file beside the destination and renamed over it at the end,
//! so that an interrupted or failed write never leaves a half-written file nor loses the old one.
//!
//! Only a regular file (or a path that does not exist yet) is ever replaced. The rename replaces
//! whatever node the path names, so `-o /dev/full` would otherwise turn the device into a regular file
//! (and, as root, `-o /dev/null` would break the system); a FIFO or a socket would be lost the same way.
//! A symbolic link to a regular file is followed: the file it points to is replaced, the link stays.

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// A file being written at a temporary path beside its destination; [`AtomicOutput::commit`] renames
/// it into place. Dropped without a commit, the temporary file is removed.
pub struct AtomicOutput {
    tmp: tempfile::NamedTempFile,
    dest: PathBuf,
}

impl AtomicOutput {
    /// Checks that `path` may be replaced (see the module doc) and creates the temporary file.
    pub fn create(path: &Path) -> Result<AtomicOutput> {
        let dest = replaceable_path(path)?;
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let file_name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        // 0666 minus the umask, like any new file: tempfile's default (0600) would survive the rename.
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{file_name}."))
            .suffix(".tmp")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .tempfile_in(&dir)
            .with_context(|| format!("cannot create a file in {}", dir.display()))?;
        Ok(AtomicOutput { tmp, dest })
    }

    pub fn file(&self) -> &File {
        self.tmp.as_file()
    }

    /// The temporary file's path (for error messages).
    pub fn temp_path(&self) -> &Path {
        self.tmp.path()
    }

    /// Renames the finished file over the destination.
    pub fn commit(self) -> Result<()> {
        let dest = self.dest;
        self.tmp
            .persist(&dest)
            .map_err(|e| e.error)
            .with_context(|| format!("cannot create {}", dest.display()))?;
        Ok(())
    }
}

/// Writes `bytes` to `path` through a temporary file (see [`AtomicOutput`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let out = AtomicOutput::create(path)?;
    let mut file = out.file();
    file.write_all(bytes).with_context(|| format!("cannot write {}", path.display()))?;
    out.commit()
}

/// The path the finished file is renamed to: `path` itself when it is missing or a regular file, the
/// file a symbolic link points to; an error for anything else.
fn replaceable_path(path: &Path) -> Result<PathBuf> {
    let link = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(path.to_path_buf()),
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", path.display())),
        Ok(m) => m,
    };
    if !link.file_type().is_symlink() {
        check_regular(path, link.file_type(), "")?;
        return Ok(path.to_path_buf());
    }
    match std::fs::metadata(path) {
        Ok(target) => {
            check_regular(path, target.file_type(), "a symbolic link to ")?;
            std::fs::canonicalize(path).with_context(|| format!("cannot resolve {}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("refusing to write {}: it is a symbolic link to a missing file", path.display())
        }
        Err(e) => Err(e).with_context(|| format!("cannot inspect {}", path.display())),
    }
}

fn check_regular(path: &Path, ty: std::fs::FileType, prefix: &str) -> Result<()> {
    let kind = if ty.is_file() {
        return Ok(());
    } else if ty.is_dir() {
        bail!("{} is {prefix}a directory; give a file name such as model.gguf", path.display());
    } else if ty.is_char_device() {
        "character device"
    } else if ty.is_block_device() {
        "block device"
    } else if ty.is_fifo() {
        "FIFO"
    } else if ty.is_socket() {
        "socket"
    } else {
        "special file"
    };
    bail!(
        "refusing to write {}: it is {prefix}a {kind}, not a regular file (the output is written beside it \
         and renamed over it at the end, which would replace the {kind})",
        path.display()
    )
}

#[cfg(test)]
mod tests {
    use std::os::unix::ffi::OsStrExt;

    use super::*;

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates a node in our temporary folder.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo failed");
    }

    #[test]
    fn replaces_regular_files_and_creates_missing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        // Nothing but the file is left in the folder.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn follows_a_link_to_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("real.gguf");
        let link = dir.path().join("link.gguf");
        std::fs::write(&target, b"old").unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();
        write_atomic(&link, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
    }

    #[test]
    fn refuses_devices_fifos_directories_and_dangling_links() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        mkfifo(&fifo);
        let to_null = dir.path().join("null");
        std::os::unix::fs::symlink("/dev/null", &to_null).unwrap();
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        let cases: [(&Path, &str); 4] = [
            (&fifo, "it is a FIFO"),
            (&to_null, "a symbolic link to a character device"),
            (&dangling, "missing file"),
            (dir.path(), "is a directory"),
        ];
        for (path, want) in cases {
            let err = format!("{:#}", write_atomic(path, b"x").unwrap_err());
            assert!(err.contains(want) && err.contains(&*path.to_string_lossy()), "{err}");
        }
        // The nodes are untouched and no temporary file is left behind.
        assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
        assert!(std::fs::symlink_metadata(&to_null).unwrap().file_type().is_symlink());
        assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
    }
}
