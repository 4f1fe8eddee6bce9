//! For tests: a small tmpfs of the test's own, to run a filesystem out of space on purpose
//! (a snapshot or a log that hits ENOSPC). Mounting needs root, as the KVM tests have.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted tmpfs; unmounted (lazily, so that a file still open does not stop it) when
/// dropped.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

#[derive(Debug, thiserror::Error)]
pub enum TmpfsError {
    #[error("cannot make a mount point")]
    MountPoint(#[source] std::io::Error),
    #[error("cannot run mount")]
    Spawn(#[source] std::io::Error),
    #[error("mount -t tmpfs failed (root is needed): {0}")]
    Mount(String),
    #[error("cannot fill {path}")]
    Fill {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Tmpfs {
    /// Mounts a tmpfs of `mib` MiB on a fresh directory.
    pub fn mount(mib: u64) -> Result<Tmpfs, TmpfsError> {
        let dir = tempfile::tempdir().map_err(TmpfsError::MountPoint)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0700"), "nvc-test"])
            .arg(dir.path())
            .output()
            .map_err(TmpfsError::Spawn)?;
        if !out.status.success() {
            return Err(TmpfsError::Mount(String::from_utf8_lossy(&out.stderr).trim().to_string()));
        }
        Ok(Tmpfs { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Bytes still free.
    pub fn free_bytes(&self) -> u64 {
        let Ok(c) = std::ffi::CString::new(self.path().as_os_str().as_encoded_bytes()) else { return 0 };
        // SAFETY: statvfs writes into the zeroed struct it is given; `c` is a valid C string.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above; both pointers are valid for the call.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return 0;
        }
        st.f_bavail as u64 * st.f_frsize as u64
    }

    /// Writes a file of zeroes (really allocated, not sparse) until only `leave` bytes
    /// are free; returns its path.
    pub fn fill_leaving(&self, leave: u64) -> Result<PathBuf, TmpfsError> {
        use std::io::Write;
        let path = self.path().join("filler");
        let fill = |source| TmpfsError::Fill { path: path.clone(), source };
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(fill)?;
        let chunk = vec![0u8; 64 << 10];
        while self.free_bytes() > leave {
            let n = (self.free_bytes() - leave).min(chunk.len() as u64) as usize;
            file.write_all(&chunk[..n]).map_err(fill)?;
        }
        file.sync_all().map_err(fill)?;
        Ok(path)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}
