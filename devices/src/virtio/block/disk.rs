//! The file behind a virtio-blk device: a raw image, read and written at sector offsets.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub const SECTOR_SIZE: u64 = 512;
/// The length of a virtio-blk ID (spec 5.2.6: GET_ID answers 20 bytes).
pub const ID_BYTES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {path} is smaller than one sector")]
    TooSmall { path: PathBuf },
    #[error("disk id {0:?} is longer than {ID_BYTES} bytes")]
    IdTooLong(String),
}

pub struct Disk {
    file: File,
    path: PathBuf,
    sectors: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
}

impl Disk {
    /// Opens `path`; `id` defaults to the file's name, cut to 20 bytes.
    pub fn open(path: &Path, read_only: bool, id: Option<&str>) -> Result<Self, DiskError> {
        let open_err = |source| DiskError::Open { path: path.to_owned(), source };
        let file = OpenOptions::new().read(true).write(!read_only).open(path).map_err(open_err)?;
        let len = file.metadata().map_err(open_err)?.len();
        let sectors = len / SECTOR_SIZE;
        if sectors == 0 {
            return Err(DiskError::TooSmall { path: path.to_owned() });
        }
        let name = match id {
            Some(id) if id.len() > ID_BYTES => return Err(DiskError::IdTooLong(id.to_string())),
            Some(id) => id.to_string(),
            None => path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        };
        let mut id = [0u8; ID_BYTES];
        let n = name.len().min(ID_BYTES);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Ok(Disk { file, path: path.to_owned(), sectors, read_only, id })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn id(&self) -> &[u8; ID_BYTES] {
        &self.id
    }

    /// True when `len` bytes from `sector` lie inside the disk.
    pub fn in_range(&self, sector: u64, len: u64) -> bool {
        len.is_multiple_of(SECTOR_SIZE) && sector.checked_add(len / SECTOR_SIZE).is_some_and(|end| end <= self.sectors)
    }

    pub fn read(&self, sector: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, sector * SECTOR_SIZE)
    }

    pub fn write(&self, sector: u64, buf: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(buf, sector * SECTOR_SIZE)
    }

    /// fdatasync: an acknowledged flush has reached the file.
    pub fn flush(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_disk_range_checks_reject_partial_sectors_overflow_and_past_end() {
        let f = tempfile_with(4096);
        let disk = Disk::open(f.path(), false, None).unwrap();

        assert!(disk.in_range(0, 4096));
        assert!(disk.in_range(7, 512));
        assert!(!disk.in_range(7, 1024));
        assert!(!disk.in_range(0, 100));
        assert!(!disk.in_range(u64::MAX, 512));
    }

    #[test]
    fn test_disk_id_defaults_to_file_name_and_long_ids_are_refused() {
        let f = tempfile_with(512);
        let disk = Disk::open(f.path(), true, None).unwrap();
        let name = f.path().file_name().unwrap().to_string_lossy().into_owned();

        assert_eq!(&disk.id()[..name.len().min(ID_BYTES)], &name.as_bytes()[..name.len().min(ID_BYTES)]);
        assert!(matches!(Disk::open(f.path(), true, Some("x".repeat(21).as_str())), Err(DiskError::IdTooLong(_))));
    }

    #[test]
    fn test_disk_smaller_than_a_sector_is_refused() {
        let f = tempfile_with(100);
        assert!(matches!(Disk::open(f.path(), false, None), Err(DiskError::TooSmall { .. })));
    }

    fn tempfile_with(len: u64) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(len).unwrap();
        f
    }
}
