//! One virtio-blk request (spec 5.2.6): a 16-byte header the device reads, data in the
//! direction the type says, and a status byte the device writes last. The chain's layout
//! is free (any split across descriptors), so it is read through virtio-queue's Reader and
//! Writer; its shape was checked by `virtio::chain::check` before.

use super::disk::{Disk, ID_BYTES};
use std::io::{Read, Write};
use virtio_queue::{Reader, Writer};
use vm_memory::ByteValued;
use vm_memory::bitmap::BitmapSlice;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// The largest data transfer of one request: it bounds what a driver can make the VMM
/// allocate. Linux sends at most 1.25 MiB by default.
pub const MAX_DATA_BYTES: u64 = 8 << 20;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestHeader {
    pub kind: u32,
    pub reserved: u32,
    pub sector: u64,
}

// SAFETY: plain integers in a repr(C) struct without padding (4 + 4 + 8 bytes); any bit
// pattern is a valid value.
unsafe impl ByteValued for RequestHeader {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the header is shorter than 16 bytes")]
    ShortHeader,
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("{len} bytes at sector {sector} are not whole sectors inside the disk")]
    OutOfRange { sector: u64, len: u64 },
    #[error("a read or write without data (are its buffers in the wrong direction?)")]
    NoData,
    #[error("a data transfer of {0} bytes is larger than allowed")]
    TooLarge(u64),
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("the disk image's I/O failed: {0:?}")]
    Io(std::io::ErrorKind),
    #[error("guest memory could not be read or written")]
    Memory,
}

impl RequestError {
    pub fn status(self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// What a request costs, for the rate limiter: bytes moved, and one operation.
pub fn data_bytes(kind: u32, reader: &Reader<'_, impl BitmapSlice>, writer: &Writer<'_, impl BitmapSlice>) -> u64 {
    match kind {
        VIRTIO_BLK_T_IN => writer.available_bytes() as u64,
        VIRTIO_BLK_T_OUT => reader.available_bytes() as u64,
        _ => 0,
    }
}

pub fn read_header(reader: &mut Reader<'_, impl BitmapSlice>) -> Result<RequestHeader, RequestError> {
    reader.read_obj::<RequestHeader>().map_err(|_| RequestError::ShortHeader)
}

/// Carries out a request whose header was read. `data` is the writable part without the
/// status byte; `buffer` is reused between requests.
pub fn execute(
    disk: &Disk,
    header: RequestHeader,
    body: &mut Reader<'_, impl BitmapSlice>,
    data: &mut Writer<'_, impl BitmapSlice>,
    buffer: &mut Vec<u8>,
) -> Result<(), RequestError> {
    let transfer = |len: u64, buffer: &mut Vec<u8>| -> Result<(), RequestError> {
        if len == 0 {
            return Err(RequestError::NoData);
        }
        if len > MAX_DATA_BYTES {
            return Err(RequestError::TooLarge(len));
        }
        if !disk.in_range(header.sector, len) {
            return Err(RequestError::OutOfRange { sector: header.sector, len });
        }
        buffer.resize(len as usize, 0);
        Ok(())
    };
    match header.kind {
        VIRTIO_BLK_T_IN => {
            transfer(data.available_bytes() as u64, buffer)?;
            disk.read(header.sector, buffer).map_err(|e| RequestError::Io(e.kind()))?;
            data.write_all(buffer).map_err(|_| RequestError::Memory)
        }
        VIRTIO_BLK_T_OUT => {
            if disk.read_only() {
                return Err(RequestError::ReadOnly);
            }
            transfer(body.available_bytes() as u64, buffer)?;
            body.read_exact(buffer).map_err(|_| RequestError::Memory)?;
            disk.write(header.sector, buffer).map_err(|e| RequestError::Io(e.kind()))
        }
        VIRTIO_BLK_T_FLUSH if disk.read_only() => Ok(()),
        VIRTIO_BLK_T_FLUSH => disk.flush().map_err(|e| RequestError::Io(e.kind())),
        VIRTIO_BLK_T_GET_ID => {
            let n = data.available_bytes().min(ID_BYTES);
            data.write_all(&disk.id()[..n]).map_err(|_| RequestError::Memory)
        }
        other => Err(RequestError::Unsupported(other)),
    }
}
