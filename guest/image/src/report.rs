//! What the test guest prints, line by line, as typed events.

/// The first line, printed by the entry stub before anything else.
pub const BOOT_LINE: &str = "NOVACRON-GUEST boot";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestLine {
    /// `NOVACRON-GUEST boot`
    Boot,
    /// `NOVACRON-GUEST v1 cpus=N mem=MIB ...`
    Banner { cpus: u64, mem_mib: u64 },
    /// `SMP online=N`
    Online(u64),
    /// `READY pages=N ...`
    Ready { pages: u64 },
    /// `HB N`
    Heartbeat(u64),
    /// `VERIFY OK epoch=E pages=P cpus=C`
    VerifyOk { epoch: u64, pages: u64, cpus: u64 },
    /// `VERIFY FAIL epoch=E bad=B first=F cpus=C`
    VerifyFail { epoch: u64, bad: u64 },
    /// `FAULT ...`, `PANIC`, `... FAILED`: the guest is in trouble.
    Trouble(String),
    /// Anything else (another kernel's output, for instance).
    Other(String),
}

/// The value of `key=` in a line of `key=value` words.
pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

pub fn parse(line: &str) -> GuestLine {
    let line = line.trim_end();
    let f = |k| field(line, k).unwrap_or(0);
    if line == BOOT_LINE {
        GuestLine::Boot
    } else if line.starts_with("NOVACRON-GUEST v1 ") {
        GuestLine::Banner { cpus: f("cpus"), mem_mib: f("mem") }
    } else if line.starts_with("SMP online=") {
        GuestLine::Online(f("online"))
    } else if line.starts_with("READY ") {
        GuestLine::Ready { pages: f("pages") }
    } else if let Some(seq) = line.strip_prefix("HB ").and_then(|s| s.parse().ok()) {
        GuestLine::Heartbeat(seq)
    } else if line.starts_with("VERIFY OK ") {
        GuestLine::VerifyOk { epoch: f("epoch"), pages: f("pages"), cpus: f("cpus") }
    } else if line.starts_with("VERIFY FAIL ") {
        GuestLine::VerifyFail { epoch: f("epoch"), bad: f("bad") }
    } else if line.starts_with("FAULT") || line.starts_with("PANIC") || line.ends_with("FAILED") {
        GuestLine::Trouble(line.to_string())
    } else {
        GuestLine::Other(line.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_each_kind_of_guest_line() {
        let cases = [
            ("NOVACRON-GUEST boot", GuestLine::Boot),
            ("NOVACRON-GUEST v1 cpus=4 mem=511 ws=16 rate=1000", GuestLine::Banner { cpus: 4, mem_mib: 511 }),
            ("SMP online=4", GuestLine::Online(4)),
            ("READY pages=4096 base=0x200000", GuestLine::Ready { pages: 4096 }),
            ("HB 17\r", GuestLine::Heartbeat(17)),
            ("VERIFY OK epoch=3 pages=4096 cpus=4", GuestLine::VerifyOk { epoch: 3, pages: 4096, cpus: 4 }),
            ("VERIFY FAIL epoch=2 bad=1 first=0 cpus=4", GuestLine::VerifyFail { epoch: 2, bad: 1 }),
            ("FAULT vector=13 rip=0x1000", GuestLine::Trouble("FAULT vector=13 rip=0x1000".into())),
            ("Linux version 6.1", GuestLine::Other("Linux version 6.1".into())),
            ("HB x", GuestLine::Other("HB x".into())),
        ];
        for (line, want) in cases {
            assert_eq!(parse(line), want, "{line}");
        }
    }
}
