//! Disk image locks: one writer per image, or any number of readers, across processes.
//!
//! Every image a VM opens read-write is locked exclusively, and every read-only one
//! shared, with open-file-description (OFD) `fcntl` locks on the whole file, as QEMU's
//! image locking does. OFD locks belong to an open file, not to a process: two opens of
//! one image in the same VMM conflict too (the same image attached twice), they are
//! released when the file is closed, and so when the process dies, however it dies. A lock
//! is its own open of the image, apart from the disk's, so that a migration can release
//! and take it without closing the disk.
//!
//! The kernel does not say who holds an OFD lock (`l_pid` is -1), so a refusal looks for
//! the holder in /proc: a process with the image open whose fdinfo lists a lock.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// A read-only image: others may read it too, nobody may write it.
    Shared,
    /// A read-write image: nobody else may open it at all.
    Exclusive,
}

/// A process that holds a lock on an image, as /proc shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// Its command line, shortened.
    pub command: String,
    /// The process is this one (the image is attached twice to one VM).
    pub is_self: bool,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_self {
            write!(f, "this VM itself (the image is attached twice)")
        } else {
            write!(f, "process {} ({})", self.pid, self.command)
        }
    }
}

fn holder_words(holder: &Option<Holder>) -> String {
    match holder {
        Some(h) => h.to_string(),
        None => "another process".to_string(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot open disk image {path} to lock it")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {path} is in use by {}: a read-write image has one user at a time", holder_words(holder))]
    InUse { path: PathBuf, holder: Option<Holder> },
    #[error(
        "disk image {path} is open read-only by {}: it cannot be written while others read it",
        holder_words(holder)
    )]
    ReadersPresent { path: PathBuf, holder: Option<Holder> },
    #[error("cannot lock disk image {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A held lock on one image; dropping it releases the lock.
#[derive(Debug)]
pub struct ImageLock {
    /// The open file the lock belongs to: closing it releases the lock.
    _file: File,
    path: PathBuf,
    mode: LockMode,
}

/// `fcntl(fd, cmd, flock)` over the whole file.
fn ofd_lock(file: &File, cmd: libc::c_int, kind: libc::c_int) -> std::io::Result<libc::flock> {
    // SAFETY: flock is plain integers; zeroes are a valid value, and the fields that
    // matter are set below (l_pid must be 0 for OFD locks).
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = 0;
    lock.l_len = 0; // to the end of the file, however long it grows
    // SAFETY: fcntl with an F_OFD_* command reads (and for F_OFD_GETLK writes) the flock
    // struct it is given, which lives on this stack frame; the fd is open.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut lock as *mut libc::flock) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(lock)
}

impl ImageLock {
    /// Takes the lock, or says who holds a conflicting one. Never waits.
    pub fn acquire(path: &Path, mode: LockMode) -> Result<ImageLock, LockError> {
        // A write lock needs a file opened for writing.
        let file = File::options()
            .read(true)
            .write(mode == LockMode::Exclusive)
            .open(path)
            .map_err(|source| LockError::Open { path: path.to_owned(), source })?;
        let kind = match mode {
            LockMode::Shared => libc::F_RDLCK,
            LockMode::Exclusive => libc::F_WRLCK,
        };
        match ofd_lock(&file, libc::F_OFD_SETLK, kind) {
            Ok(_) => Ok(ImageLock { _file: file, path: path.to_owned(), mode }),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {
                // What blocks us: a writer (always), or for a writer, any reader.
                let writer = ofd_lock(&file, libc::F_OFD_GETLK, libc::F_RDLCK)
                    .map(|l| l.l_type == libc::F_WRLCK as libc::c_short)
                    .unwrap_or(true);
                let holder = find_holder(&file);
                let path = path.to_owned();
                Err(if writer { LockError::InUse { path, holder } } else { LockError::ReadersPresent { path, holder } })
            }
            Err(source) => Err(LockError::Lock { path: path.to_owned(), source }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn mode(&self) -> LockMode {
        self.mode
    }
}

/// The first process other than this open file that has the image open with a lock on it.
fn find_holder(file: &File) -> Option<Holder> {
    let meta = file.metadata().ok()?;
    let (dev, ino) = (meta.dev(), meta.ino());
    let own_fd = file.as_raw_fd();
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            let name = fd.file_name();
            let Some(fd_num) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
            if pid == me && fd_num == own_fd {
                continue;
            }
            let Ok(target) = std::fs::metadata(fd.path()) else { continue };
            if target.dev() != dev || target.ino() != ino {
                continue;
            }
            let info = std::fs::read_to_string(entry.path().join("fdinfo").join(&name)).unwrap_or_default();
            if info.lines().any(|l| l.starts_with("lock:") && l.contains("OFDLCK")) {
                return Some(Holder { pid, command: command_of(&entry.path()), is_self: pid == me });
            }
        }
    }
    None
}

/// A process's command line, arguments joined by spaces, at most 120 characters.
fn command_of(proc_dir: &Path) -> String {
    let raw = std::fs::read(proc_dir.join("cmdline")).unwrap_or_default();
    let words: Vec<String> =
        raw.split(|&b| b == 0).filter(|w| !w.is_empty()).map(|w| String::from_utf8_lossy(w).into_owned()).collect();
    let mut line = words.join(" ");
    if line.chars().count() > 120 {
        line = line.chars().take(117).collect::<String>() + "...";
    }
    if line.is_empty() { "no command line".to_string() } else { line }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(4096).unwrap();
        f
    }

    #[test]
    fn test_second_writer_is_refused_and_named() {
        let f = image();
        let first = ImageLock::acquire(f.path(), LockMode::Exclusive).unwrap();

        let second = ImageLock::acquire(f.path(), LockMode::Exclusive).unwrap_err();
        let reader = ImageLock::acquire(f.path(), LockMode::Shared).unwrap_err();

        let LockError::InUse { holder: Some(holder), .. } = &second else { panic!("{second:?}") };
        assert!(holder.is_self && holder.pid == std::process::id(), "{holder:?}");
        assert!(second.to_string().contains("attached twice"), "{second}");
        assert!(matches!(reader, LockError::InUse { .. }), "{reader:?}");
        drop(first);
    }

    #[test]
    fn test_readers_share_and_keep_a_writer_out() {
        let f = image();
        let a = ImageLock::acquire(f.path(), LockMode::Shared).unwrap();
        let b = ImageLock::acquire(f.path(), LockMode::Shared).unwrap();

        let writer = ImageLock::acquire(f.path(), LockMode::Exclusive).unwrap_err();

        assert!(matches!(writer, LockError::ReadersPresent { holder: Some(_), .. }), "{writer:?}");
        assert_eq!((a.mode(), b.mode()), (LockMode::Shared, LockMode::Shared));
    }

    #[test]
    fn test_dropping_the_lock_lets_the_next_writer_in() {
        let f = image();
        let first = ImageLock::acquire(f.path(), LockMode::Exclusive).unwrap();
        drop(first);

        let second = ImageLock::acquire(f.path(), LockMode::Exclusive);

        assert!(second.is_ok(), "{second:?}");
    }
}
