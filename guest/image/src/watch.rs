//! Runs a VM process and watches its console: every stdout line arrives with the instant it
//! was read, so that callers can wait for what the guest says and time it.

use crate::report::{GuestLine, parse};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Line {
    pub at: Instant,
    pub text: String,
    pub parsed: GuestLine,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot start {0}")]
    Spawn(String, #[source] std::io::Error),
    #[error("timed out after {timeout:?} waiting for {what}; the guest's last lines were:\n{tail}")]
    Timeout { what: String, timeout: Duration, tail: String },
    #[error("the VM process ended ({status}) while waiting for {what}; its last lines were:\n{tail}\nstderr: {stderr}")]
    Ended { what: String, status: String, tail: String, stderr: String },
}

/// A VM process whose stdout is read line by line on a thread of its own.
pub struct Watched {
    pub child: Child,
    pub spawned_at: Instant,
    lines: Receiver<Line>,
    stderr: Receiver<String>,
    /// Every line read so far, in order.
    pub seen: Vec<Line>,
}

impl Watched {
    /// Spawns `cmd` with stdout and stderr piped.
    pub fn spawn(mut cmd: Command) -> Result<Self, WatchError> {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null());
        let spawned_at = Instant::now();
        let mut child = cmd.spawn().map_err(|e| WatchError::Spawn(format!("{cmd:?}"), e))?;
        let (tx, lines) = channel();
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                for text in BufReader::new(out).lines().map_while(Result::ok) {
                    let line = Line { at: Instant::now(), parsed: parse(&text), text };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let (etx, stderr) = channel();
        if let Some(mut err) = child.stderr.take() {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = err.read_to_string(&mut text);
                let _ = etx.send(text);
            });
        }
        Ok(Watched { child, spawned_at, lines, stderr, seen: Vec::new() })
    }

    fn tail(&self) -> String {
        let start = self.seen.len().saturating_sub(12);
        self.seen[start..].iter().map(|l| format!("  {}", l.text)).collect::<Vec<_>>().join("\n")
    }

    /// Waits for the next line, for at most `timeout`. None when the output has ended.
    pub fn next_line(&mut self, timeout: Duration) -> Result<Option<Line>, WatchError> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => {
                self.seen.push(line.clone());
                Ok(Some(line))
            }
            Err(RecvTimeoutError::Timeout) => {
                Err(WatchError::Timeout { what: "a line".into(), timeout, tail: self.tail() })
            }
            Err(RecvTimeoutError::Disconnected) => Ok(None),
        }
    }

    /// Waits for a line for which `want` says yes, returning it.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut want: impl FnMut(&Line) -> bool,
    ) -> Result<Line, WatchError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_line(left) {
                Ok(Some(line)) if want(&line) => return Ok(line),
                Ok(Some(_)) => {}
                Ok(None) => {
                    let status = self.child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                    let stderr = self.stderr.recv_timeout(Duration::from_secs(2)).unwrap_or_default();
                    return Err(WatchError::Ended { what: what.into(), status, tail: self.tail(), stderr });
                }
                Err(_) => {
                    return Err(WatchError::Timeout { what: what.into(), timeout, tail: self.tail() });
                }
            }
        }
    }

    /// Waits until the `n`-th `VERIFY OK` (counting all seen so far).
    pub fn wait_verified(&mut self, n: usize, timeout: Duration) -> Result<Line, WatchError> {
        let already = self.seen.iter().filter(|l| matches!(l.parsed, GuestLine::VerifyOk { .. })).count();
        let mut count = already;
        if count >= n
            && let Some(l) = self.seen.iter().rev().find(|l| matches!(l.parsed, GuestLine::VerifyOk { .. }))
        {
            return Ok(l.clone());
        }
        self.wait_for(&format!("VERIFY OK number {n}"), timeout, |l| {
            if matches!(l.parsed, GuestLine::VerifyOk { .. }) {
                count += 1;
            }
            count >= n
        })
    }

    /// Waits for the process to end and returns its status and the rest of its stderr.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<(ExitStatus, String), WatchError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                while let Ok(Some(_)) = self.next_line(Duration::from_millis(50)) {}
                let stderr = self.stderr.recv_timeout(Duration::from_secs(2)).unwrap_or_default();
                return Ok((status, stderr));
            }
            if Instant::now() > deadline {
                return Err(WatchError::Timeout { what: "the VM process to end".into(), timeout, tail: self.tail() });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn heartbeats(&self) -> Vec<u64> {
        self.seen.iter().filter_map(|l| if let GuestLine::Heartbeat(s) = l.parsed { Some(s) } else { None }).collect()
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// True when /dev/kvm can be used for a test that boots the guest. Otherwise says loudly
/// that `test` is skipped, or fails it when NOVACRON_REQUIRE_KVM is set (CI sets it: there,
/// KVM tests must really run).
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var_os("NOVACRON_REQUIRE_KVM").is_none(),
                "{test}: /dev/kvm is required but cannot be opened: {e}"
            );
            eprintln!("\n*** SKIPPED {test}: /dev/kvm is not usable here ({e}) ***\n");
            false
        }
    }
}
/// Follows a serial log file as it grows; starts over when the file is replaced (a
/// restarted VMM rotates the old one away).
pub struct SerialTail {
    path: PathBuf,
    inode: u64,
    offset: u64,
    partial: String,
    /// Every complete line so far with the instant it was read, since the last replacement.
    pub lines: Vec<(Instant, GuestLine)>,
    pub replaced: u32,
}

impl SerialTail {
    pub fn new(path: &Path) -> Self {
        SerialTail {
            path: path.to_owned(),
            inode: 0,
            offset: 0,
            partial: String::new(),
            lines: Vec::new(),
            replaced: 0,
        }
    }

    /// Reads what was appended since the last poll.
    pub fn poll(&mut self) {
        let Ok(mut file) = std::fs::File::open(&self.path) else { return };
        let Ok(meta) = file.metadata() else { return };
        if meta.ino() != self.inode || meta.len() < self.offset {
            if self.inode != 0 {
                self.replaced += 1;
            }
            self.inode = meta.ino();
            self.offset = 0;
            self.partial.clear();
            self.lines.clear();
        }
        let mut buf = Vec::new();
        if file.seek(SeekFrom::Start(self.offset)).is_err() || file.read_to_end(&mut buf).is_err() {
            return;
        }
        self.offset += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        let now = Instant::now();
        while let Some(end) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=end).collect();
            self.lines.push((now, parse(&line)));
        }
    }

    pub fn heartbeats(&self) -> Vec<(Instant, u64)> {
        self.lines
            .iter()
            .filter_map(|(at, l)| if let GuestLine::Heartbeat(s) = l { Some((*at, *s)) } else { None })
            .collect()
    }

    pub fn last_heartbeat(&self) -> Option<u64> {
        self.heartbeats().last().map(|h| h.1)
    }

    pub fn boots(&self) -> usize {
        self.lines.iter().filter(|(_, l)| *l == GuestLine::Boot).count()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
