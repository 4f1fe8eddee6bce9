//! One VMM process as its supervisor sees it: started in its own session, watched through a
//! pidfd (which also works for a process that is not our child, as after a re-adoption),
//! signalled through the same pidfd so that a recycled pid can never be hit.

use crate::supervisor::policy::ProcessExit;
use novacron_vmm::api::client::{ClientError, call};
use novacron_vmm::api::{Request, Response};
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start the VMM {binary} (is `novacron-vmm` built and executable?)")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open the VMM's log file {path}")]
    Log {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("process {pid} does not exist (any more)")]
    Gone { pid: u32 },
    #[error("cannot watch process {pid} (pidfd_open needs Linux 5.3 or later)")]
    Pidfd {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot signal process {pid}")]
    Signal {
        pid: u32,
        #[source]
        source: io::Error,
    },
}

/// What `novacron-vmm` is started with.
#[derive(Debug, Clone)]
pub struct Launch {
    pub binary: PathBuf,
    pub args: Vec<std::ffi::OsString>,
    /// The VMM's own stderr (its log), appended to across restarts.
    pub log: PathBuf,
}

/// A running VMM process: its pid and a pidfd that refers to exactly that process.
#[derive(Debug)]
pub struct VmmProcess {
    pid: u32,
    pidfd: OwnedFd,
}

impl VmmProcess {
    /// Starts the VMM in a session of its own, so that the signals and hang-ups of the
    /// supervisor's terminal or process group never reach it: the guest outlives the
    /// daemon.
    pub fn spawn(launch: &Launch) -> Result<Self, ProcessError> {
        let log = private_file(&launch.log, false)
            .map_err(|source| ProcessError::Log { path: launch.log.clone(), source })?;
        let mut cmd = Command::new(&launch.binary);
        cmd.args(&launch.args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent; it is
        // the only thing run between fork and exec.
        unsafe {
            cmd.pre_exec(|| if libc::setsid() == -1 { Err(io::Error::last_os_error()) } else { Ok(()) });
        }
        let child = cmd.spawn().map_err(|source| ProcessError::Spawn { binary: launch.binary.clone(), source })?;
        // The child handle is dropped without waiting: the pidfd watches and reaps it. Until
        // it is reaped it stays a zombie, so the pid cannot be reused before pidfd_open.
        let pid = child.id();
        let pidfd = pidfd_open(pid)?;
        Ok(VmmProcess { pid, pidfd })
    }

    /// Adopts a running process by pid (after a supervisor restart or a daemon restart).
    pub fn adopt(pid: u32) -> Result<Self, ProcessError> {
        Ok(VmmProcess { pid, pidfd: pidfd_open(pid)? })
    }

    /// True when `pid` is a VMM serving `socket` (its command line says `--api-sock
    /// SOCKET`): a pid remembered from earlier may have been recycled by now.
    pub fn is_vmm_of(pid: u32, socket: &Path) -> bool {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
        let mut want = b"--api-sock\0".to_vec();
        want.extend_from_slice(socket.as_os_str().as_encoded_bytes());
        want.push(0);
        cmdline.windows(want.len()).any(|w| w == want.as_slice())
    }

    /// Every running VMM whose control socket (`--api-sock`) is in `dir`, as (pid, socket):
    /// the VMMs of a runtime directory, whether or not a host knows them.
    pub fn running_in(dir: &Path) -> Vec<(u32, PathBuf)> {
        let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
        let mut found: Vec<(u32, PathBuf)> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|pid| {
                // A zombie's command line is empty: it runs nothing any more.
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let mut args = cmdline.split(|b| *b == 0);
                args.find(|a| *a == b"--api-sock")?;
                let socket = PathBuf::from(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(args.next()?));
                (socket.parent() == Some(dir)).then_some((pid, socket))
            })
            .collect();
        found.sort();
        found
    }

    /// The VMM serving `socket`, if one runs.
    pub fn serving(socket: &Path) -> Option<u32> {
        let dir = socket.parent()?;
        Self::running_in(dir).into_iter().find(|(_, s)| s == socket).map(|(pid, _)| pid)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A future that resolves when the process has ended (without reaping it). Owning its
    /// own duplicate of the pidfd, it can run in a task of its own.
    pub fn exited(&self) -> io::Result<impl Future<Output = io::Result<()>> + Send + 'static> {
        let fd = self.pidfd.try_clone()?;
        Ok(async move {
            // SAFETY: the AsyncFd owns `fd` (an OwnedFd), so it stays open and names the same
            // pidfd until the AsyncFd is dropped.
            let afd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
            // A pidfd polls readable once the process has exited, and stays so.
            let _ready = afd.readable().await?;
            Ok(())
        })
    }

    /// Waits up to `timeout` for the process to end; true if it did.
    pub async fn wait_exited(&self, timeout: Duration) -> bool {
        match self.exited() {
            Ok(fut) => matches!(tokio::time::timeout(timeout, fut).await, Ok(Ok(()))),
            Err(e) => {
                tracing::warn!(pid = self.pid, "cannot wait for the VMM process: {e}");
                false
            }
        }
    }

    /// Collects the exit status of an ended process. `None` while it still runs;
    /// `ProcessExit::Unknown` when it is not our child (adopted from an earlier daemon).
    pub fn reap(&self) -> Option<ProcessExit> {
        // SAFETY: siginfo_t is plain data for which all-zero is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes only into `info`, which lives for the call; the pidfd is
        // open (owned by self).
        let rc = unsafe {
            libc::waitid(libc::P_PIDFD, self.pidfd.as_raw_fd() as libc::id_t, &mut info, libc::WEXITED | libc::WNOHANG)
        };
        if rc == -1 {
            // ECHILD: not our child, or already reaped. Either way it is over only if the
            // pidfd says so.
            return self.has_exited().then_some(ProcessExit::Unknown);
        }
        // SAFETY: after a successful waitid the kernel has filled the SIGCHLD fields.
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return None; // WNOHANG: still running
        }
        Some(match info.si_code {
            libc::CLD_EXITED => ProcessExit::Code(status),
            libc::CLD_KILLED | libc::CLD_DUMPED => ProcessExit::Signal(status),
            _ => ProcessExit::Unknown,
        })
    }

    /// True once the process has ended (the pidfd polls readable).
    fn has_exited(&self) -> bool {
        let mut fds = libc::pollfd { fd: self.pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut fds, 1, 0) };
        n == 1 && fds.revents & libc::POLLIN != 0
    }

    /// Sends `signal` to exactly this process (through the pidfd, never by pid).
    pub fn signal(&self, signal: i32) -> Result<(), ProcessError> {
        // SAFETY: pidfd_send_signal with a valid pidfd, no siginfo and no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc == -1 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ESRCH) {
                return Ok(()); // already gone
            }
            return Err(ProcessError::Signal { pid: self.pid, source: err });
        }
        Ok(())
    }
}

/// Opens `path` for appending (or truncated, with `truncate`), readable by its owner only,
/// also when it existed with another mode: a VMM's log and console show what the guest and
/// the VMM say, which is nobody else's business.
pub fn private_file(path: &Path, truncate: bool) -> io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file =
        OpenOptions::new().create(true).append(!truncate).write(true).truncate(truncate).mode(0o600).open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

fn pidfd_open(pid: u32) -> Result<OwnedFd, ProcessError> {
    let raw_pid = libc::pid_t::try_from(pid).map_err(|_| ProcessError::Gone { pid })?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw_pid, 0) };
    if fd < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ESRCH) {
            return Err(ProcessError::Gone { pid });
        }
        return Err(ProcessError::Pidfd { pid, source: err });
    }
    // SAFETY: the syscall returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// One control socket request, off the async threads (the client blocks).
pub async fn api_call(socket: &Path, request: Request, timeout: Duration) -> Result<Response, ClientError> {
    let socket = socket.to_owned();
    match tokio::task::spawn_blocking(move || call(&socket, request, timeout)).await {
        Ok(result) => result,
        Err(e) => Err(ClientError::Io(io::Error::other(e))),
    }
}
