//! The state stream: the VM's state as a list of sections, each versioned and checksummed.
//!
//! ```text
//! header   magic "NVCRSTAT" (8 bytes) | format version (u16 LE) | section count (u32 LE)
//! section  kind (u16 LE) | version (u16 LE) | length (u32 LE) | payload | CRC-32 (u32 LE)
//! ```
//!
//! The CRC covers the section's kind, version, length and payload. Payloads are postcard
//! encodings of the VMM's state types. A reader checks everything before it returns a
//! section: magic, format version, section count and lengths against fixed bounds and the
//! bytes available, and each checksum; a truncated or altered stream gives an error naming
//! the section, never a panic or a partial result. The bytes come from files and networks.
//!
//! Version policy: the format version changes only with the layout above; a section's
//! version changes with its payload's type. A reader accepts the current version of each
//! and, once there is one, the one before.

use serde::Serialize;
use serde::de::DeserializeOwned;

pub const MAGIC: [u8; 8] = *b"NVCRSTAT";
pub const FORMAT_VERSION: u16 = 1;
/// Bounds on what a reader accepts from a stream.
pub const MAX_SECTIONS: u32 = 4096;
pub const MAX_SECTION_BYTES: u32 = 64 << 20;

const HEADER_BYTES: usize = 14;
const SECTION_HEADER_BYTES: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("not a NovaCron state stream (bad magic)")]
    BadMagic,
    #[error("state stream format version {0} is not supported (this build reads {FORMAT_VERSION})")]
    Version(u16),
    #[error("the stream claims {0} sections, more than the {MAX_SECTIONS} allowed")]
    TooManySections(u32),
    #[error("the stream ends inside section {index} (truncated)")]
    Truncated { index: u32 },
    #[error("section {index} claims {length} bytes, more than the {MAX_SECTION_BYTES} allowed")]
    SectionTooLarge { index: u32, length: u32 },
    #[error("section {index} (kind {kind}) fails its checksum: it was altered or damaged")]
    Checksum { index: u32, kind: u16 },
    #[error("{0} bytes follow the last section")]
    TrailingBytes(usize),
    #[error("section {what} cannot be encoded: {reason}")]
    Encode { what: &'static str, reason: String },
    #[error("section {what} cannot be decoded: {reason}")]
    Decode { what: &'static str, reason: String },
}

/// One section: what it is, which version of that, and its encoded payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub kind: u16,
    pub version: u16,
    pub payload: Vec<u8>,
}

impl Section {
    /// Encodes `value` as a section.
    pub fn new<T: Serialize>(kind: u16, version: u16, what: &'static str, value: &T) -> Result<Self, StreamError> {
        let payload = postcard::to_stdvec(value).map_err(|e| StreamError::Encode { what, reason: e.to_string() })?;
        Ok(Section { kind, version, payload })
    }

    /// Decodes the payload; the whole payload must be consumed.
    pub fn decode<T: DeserializeOwned>(&self, what: &'static str) -> Result<T, StreamError> {
        let (value, rest) = postcard::take_from_bytes(&self.payload)
            .map_err(|e| StreamError::Decode { what, reason: e.to_string() })?;
        if !rest.is_empty() {
            return Err(StreamError::Decode { what, reason: format!("{} bytes left over", rest.len()) });
        }
        Ok(value)
    }
}

fn checksum(kind: u16, version: u16, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&kind.to_le_bytes());
    h.update(&version.to_le_bytes());
    h.update(&(payload.len() as u32).to_le_bytes());
    h.update(payload);
    h.finalize()
}

pub fn encode(sections: &[Section]) -> Vec<u8> {
    let total: usize = sections.iter().map(|s| SECTION_HEADER_BYTES + s.payload.len() + 4).sum();
    let mut out = Vec::with_capacity(HEADER_BYTES + total);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(sections.len() as u32).to_le_bytes());
    for s in sections {
        out.extend_from_slice(&s.kind.to_le_bytes());
        out.extend_from_slice(&s.version.to_le_bytes());
        out.extend_from_slice(&(s.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&s.payload);
        out.extend_from_slice(&checksum(s.kind, s.version, &s.payload).to_le_bytes());
    }
    out
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub fn decode(bytes: &[u8]) -> Result<Vec<Section>, StreamError> {
    if bytes.len() < HEADER_BYTES || bytes[..8] != MAGIC {
        return Err(StreamError::BadMagic);
    }
    let version = u16_at(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(StreamError::Version(version));
    }
    let count = u32_at(bytes, 10);
    if count > MAX_SECTIONS {
        return Err(StreamError::TooManySections(count));
    }
    let mut sections = Vec::with_capacity(count as usize);
    let mut at = HEADER_BYTES;
    for index in 0..count {
        if bytes.len() - at < SECTION_HEADER_BYTES {
            return Err(StreamError::Truncated { index });
        }
        let (kind, version, length) = (u16_at(bytes, at), u16_at(bytes, at + 2), u32_at(bytes, at + 4));
        if length > MAX_SECTION_BYTES {
            return Err(StreamError::SectionTooLarge { index, length });
        }
        let body = at + SECTION_HEADER_BYTES;
        let end = body + length as usize;
        if bytes.len() < end + 4 {
            return Err(StreamError::Truncated { index });
        }
        let payload = &bytes[body..end];
        if u32_at(bytes, end) != checksum(kind, version, payload) {
            return Err(StreamError::Checksum { index, kind });
        }
        sections.push(Section { kind, version, payload: payload.to_vec() });
        at = end + 4;
    }
    if at != bytes.len() {
        return Err(StreamError::TrailingBytes(bytes.len() - at));
    }
    Ok(sections)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Section> {
        vec![
            Section::new(1, 1, "numbers", &vec![1u64, 2, 3]).unwrap(),
            Section::new(2, 3, "text", &"a vCPU".to_string()).unwrap(),
            Section { kind: 9, version: 1, payload: vec![] },
        ]
    }

    #[test]
    fn test_stream_round_trips_sections_and_payloads() {
        let bytes = encode(&sample());
        let back = decode(&bytes).unwrap();

        assert_eq!(back, sample());
        assert_eq!(back[0].decode::<Vec<u64>>("numbers").unwrap(), vec![1, 2, 3]);
        assert_eq!(back[1].decode::<String>("text").unwrap(), "a vCPU");
    }

    #[test]
    fn test_stream_every_truncation_is_an_error() {
        let bytes = encode(&sample());
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "a stream cut at {len} bytes was accepted");
        }
    }

    #[test]
    fn test_stream_every_flipped_bit_is_caught() {
        let bytes = encode(&sample());
        for at in 0..bytes.len() {
            for bit in 0..8 {
                let mut altered = bytes.clone();
                altered[at] ^= 1 << bit;
                assert!(decode(&altered).is_err(), "a flip at byte {at} bit {bit} went unnoticed");
            }
        }
    }

    #[test]
    fn test_stream_rejects_wrong_version_huge_counts_and_trailing_bytes() {
        let mut bytes = encode(&sample());
        let mut v2 = bytes.clone();
        v2[8] = 2;
        let mut huge = bytes.clone();
        huge[10..14].copy_from_slice(&u32::MAX.to_le_bytes());
        bytes.push(0);

        assert_eq!(decode(&v2), Err(StreamError::Version(2)));
        assert_eq!(decode(&huge), Err(StreamError::TooManySections(u32::MAX)));
        assert_eq!(decode(&bytes), Err(StreamError::TrailingBytes(1)));
    }

    #[test]
    fn test_section_decode_refuses_wrong_type_and_leftovers() {
        let s = Section::new(1, 1, "pair", &(7u8, 9u8)).unwrap();
        assert!(s.decode::<u8>("pair").is_err(), "leftover bytes");
        assert!(s.decode::<String>("pair").is_err());
    }
}
