//! The locks on a VM's disk images (`novacron_devices::virtio::block::lock`): exclusive on
//! read-write images, shared on read-only ones. A VMM takes them before it builds the
//! devices and holds them while the guest may run; a live migration hands them over at
//! its commit (the source lets go just before it sends Commit, the destination takes them
//! when Commit arrives, before its guest runs). A VM whose locks are not held does not
//! resume: it may be running somewhere else.

use novacron_devices::virtio::block::BlockConfig;
use novacron_devices::virtio::block::lock::{ImageLock, LockError, LockMode};
use std::path::PathBuf;
use std::sync::Mutex;

pub struct DiskLocks {
    images: Vec<(PathBuf, LockMode)>,
    held: Mutex<Vec<ImageLock>>,
}

impl DiskLocks {
    /// The locks a VM with `disks` needs, not taken yet.
    pub fn new(disks: &[BlockConfig]) -> Self {
        let images = disks
            .iter()
            .map(|d| (d.path.clone(), if d.read_only { LockMode::Shared } else { LockMode::Exclusive }))
            .collect();
        DiskLocks { images, held: Mutex::new(Vec::new()) }
    }

    fn held_locks(&self) -> std::sync::MutexGuard<'_, Vec<ImageLock>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes every lock, or none: the first refusal releases those already taken.
    pub fn acquire(&self) -> Result<(), LockError> {
        let mut held = self.held_locks();
        if !held.is_empty() || self.images.is_empty() {
            return Ok(());
        }
        let taken =
            self.images.iter().map(|(path, mode)| ImageLock::acquire(path, *mode)).collect::<Result<Vec<_>, _>>()?;
        tracing::debug!(images = taken.len(), "disk images locked");
        *held = taken;
        Ok(())
    }

    /// Lets go of every lock (a migration's commit hands the images to the destination).
    pub fn release(&self) {
        let mut held = self.held_locks();
        if !held.is_empty() {
            tracing::info!(images = held.len(), "disk image locks released");
        }
        held.clear();
    }

    /// Whether the VM may use its images: every lock is held (or it has no disks).
    pub fn held(&self) -> bool {
        self.images.is_empty() || !self.held_locks().is_empty()
    }
}
