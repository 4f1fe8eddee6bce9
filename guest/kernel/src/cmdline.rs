//! The workload's parameters, from the kernel command line: `key=value` words.

/// Block test: at most this many sectors.
pub const MAX_BLK_SECTORS: u64 = 256;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ExitMode {
    PowerOff,
    Reset,
    TripleFault,
}

/// The virtio-net test (`net=`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum NetTest {
    Off,
    /// Send this many frames and wait for their echoes.
    Send(u64),
    /// Echo every frame received, for as long as the guest runs.
    Echo,
}

pub struct Params {
    /// Working set in MiB, spread over all vCPUs.
    pub ws_mib: u64,
    /// Pages dirtied per second, over all vCPUs.
    pub rate: u64,
    /// Verification period in ms.
    pub verify_ms: u64,
    /// Heartbeat period in ms.
    pub hb_ms: u64,
    /// Stop after this many heartbeats (0: never), the way `exit_mode` says.
    pub exit_after: u64,
    pub exit_mode: ExitMode,
    /// Hash the initrd and print it (`initrd=hash`, the default), or only its size
    /// (`initrd=skip`: a large one, such as a benchmark's memory image, would take the
    /// emulated guest minutes to read).
    pub hash_initrd: bool,
    /// Corrupt one page before this verification epoch (0: never), to show a FAIL verdict.
    pub corrupt_epoch: u64,
    /// Sectors each block device's test writes and reads back (0: no block test).
    pub blk_sectors: u64,
    pub net: NetTest,
    /// Bytes asked of the entropy device (0: no entropy test).
    pub rng_bytes: u64,
}

fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    Some(v)
}

/// Parses the command line; unknown words (for example `console=ttyS0`) are ignored, and
/// a malformed number keeps the default and is reported through `bad`.
pub fn parse(cmdline: &[u8], mut bad: impl FnMut(&[u8])) -> Params {
    let mut p = Params {
        ws_mib: 16,
        rate: 1000,
        verify_ms: 1000,
        hb_ms: 500,
        exit_after: 0,
        exit_mode: ExitMode::PowerOff,
        hash_initrd: true,
        corrupt_epoch: 0,
        blk_sectors: 0,
        net: NetTest::Off,
        rng_bytes: 0,
    };
    for word in cmdline.split(|&c| c == b' ') {
        let Some(eq) = word.iter().position(|&c| c == b'=') else {
            continue;
        };
        let (key, value) = (&word[..eq], &word[eq + 1..]);
        if key == b"exitmode" {
            match value {
                b"poweroff" => p.exit_mode = ExitMode::PowerOff,
                b"reset" => p.exit_mode = ExitMode::Reset,
                b"triplefault" => p.exit_mode = ExitMode::TripleFault,
                _ => bad(word),
            }
            continue;
        }
        if key == b"initrd" {
            match value {
                b"hash" => p.hash_initrd = true,
                b"skip" => p.hash_initrd = false,
                _ => bad(word),
            }
            continue;
        }
        if key == b"net" {
            match (value, value.strip_prefix(b"send:").and_then(parse_u64)) {
                (b"echo", _) => p.net = NetTest::Echo,
                (_, Some(n)) if n > 0 => p.net = NetTest::Send(n),
                _ => bad(word),
            }
            continue;
        }
        let slot = match key {
            b"ws" => &mut p.ws_mib,
            b"rate" => &mut p.rate,
            b"verify" => &mut p.verify_ms,
            b"hb" => &mut p.hb_ms,
            b"exit" => &mut p.exit_after,
            b"corrupt" => &mut p.corrupt_epoch,
            b"blk" => &mut p.blk_sectors,
            b"rng" => &mut p.rng_bytes,
            _ => continue,
        };
        match parse_u64(value) {
            Some(v) => *slot = v,
            None => bad(word),
        }
    }
    p.verify_ms = p.verify_ms.max(1);
    p.hb_ms = p.hb_ms.max(1);
    p.blk_sectors = p.blk_sectors.min(MAX_BLK_SECTORS);
    p.rng_bytes = p.rng_bytes.min(crate::rng::MAX_BYTES);
    p
}
