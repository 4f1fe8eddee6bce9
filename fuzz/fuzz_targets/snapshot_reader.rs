//! A snapshot's state.bin (and, later, a migration's state message): any bytes must give
//! a state or an error, never a panic.
//!
//! Every section carries a CRC-32, so mutated bytes rarely get past the checksum. Besides
//! the bytes as they are, the target therefore also parses them re-encoded with valid
//! checksums, so that the section payload decoders (postcard, into the VMM's and KVM's
//! state types) and the consistency checks see mutated payloads too:
//!
//! - input that starts with the stream's magic is re-framed: its sections are read as the
//!   stream lays them out, without checking count, lengths or checksums (lengths are cut
//!   to what is there), and encoded again. Mutations of a real state.bin reach the
//!   payloads this way;
//! - any other input is a list of pieces, each `kind (u8) | version (u8) | length (u16 LE)
//!   | payload`, the last one cut short if the input ends, encoded as sections.
#![no_main]

use libfuzzer_sys::fuzz_target;
use novacron_migration::stream::{self, MAGIC, Section};
use novacron_vmm::snapshot::parse_state;

const HEADER_BYTES: usize = 14;
const SECTION_HEADER_BYTES: usize = 8;
const CRC_BYTES: usize = 4;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The sections of a stream-shaped input, read leniently: at most the header's count,
/// each as long as its length says or as the input still is, checksums skipped.
fn reframe(data: &[u8]) -> Vec<Section> {
    let mut sections = Vec::new();
    if data.len() < HEADER_BYTES {
        return sections;
    }
    let count = u32_at(data, 10).min(stream::MAX_SECTIONS);
    let mut at = HEADER_BYTES;
    while sections.len() < count as usize && data.len() - at >= SECTION_HEADER_BYTES {
        let (kind, version) = (u16_at(data, at), u16_at(data, at + 2));
        let body = at + SECTION_HEADER_BYTES;
        let end = body + (u32_at(data, at + 4) as usize).min(data.len() - body);
        sections.push(Section { kind, version, payload: data[body..end].to_vec() });
        at = (end + CRC_BYTES).min(data.len());
    }
    sections
}

/// The input as pieces: kind, version, a 16-bit length and that many payload bytes.
fn pieces(data: &[u8]) -> Vec<Section> {
    let mut sections = Vec::new();
    let mut rest = data;
    while rest.len() >= 4 && sections.len() < stream::MAX_SECTIONS as usize {
        let (kind, version) = (u16::from(rest[0]), u16::from(rest[1]));
        let len = usize::from(u16::from_le_bytes([rest[2], rest[3]])).min(rest.len() - 4);
        sections.push(Section { kind, version, payload: rest[4..4 + len].to_vec() });
        rest = &rest[4 + len..];
    }
    sections
}

fuzz_target!(|data: &[u8]| {
    // As they are: the container's own checks (magic, version, bounds, checksums).
    let _ = parse_state(data);
    // Past the checksums: the payload decoders and the checks between sections.
    let sections = if data.starts_with(&MAGIC) { reframe(data) } else { pieces(data) };
    let _ = parse_state(&stream::encode(&sections));
});
