//! CPU time and resident memory of a process, from Linux's /proc.

use std::time::Instant;

/// Linux reports CPU times in /proc in USER_HZ ticks, 100 per second on every architecture the
/// kernel's user ABI supports.
const TICKS_PER_SEC: f64 = 100.0;

/// One reading of a process.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// When the sample was taken.
    pub at: Instant,
    /// utime + stime, in ticks.
    pub cpu_ticks: u64,
    /// VmRSS, kB.
    pub rss_kb: u64,
    /// VmHWM (peak RSS), kB.
    pub peak_kb: u64,
}

/// Reads `/proc/PID/stat` and `/proc/PID/status`.
pub fn sample(pid: u32) -> std::io::Result<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "unexpected /proc format");
    let cpu_ticks = parse_stat_cpu(&stat).ok_or_else(bad)?;
    Ok(Sample {
        at: Instant::now(),
        cpu_ticks,
        rss_kb: parse_status_kb(&status, "VmRSS:").unwrap_or(0),
        peak_kb: parse_status_kb(&status, "VmHWM:").unwrap_or(0),
    })
}

/// utime + stime from a stat line. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted after its last `)`.
fn parse_stat_cpu(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn parse_status_kb(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU use between two samples, in percent of one core (200 = two cores busy).
pub fn cpu_percent(a: &Sample, b: &Sample) -> f64 {
    let secs = b.at.duration_since(a.at).as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    let used = b.cpu_ticks.saturating_sub(a.cpu_ticks) as f64 / TICKS_PER_SEC;
    used / secs * 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_names() {
        let line = "1234 (my (odd) name) S 1 2 3 4 5 6 7 8 9 10 150 50 0 0 20 0 4 0 99 1000 200";
        assert_eq!(parse_stat_cpu(line), Some(200));
    }

    #[test]
    fn parses_status() {
        let s = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(parse_status_kb(s, "VmRSS:"), Some(1024));
        assert_eq!(parse_status_kb(s, "VmHWM:"), Some(2048));
    }

    #[test]
    fn reads_self() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_kb > 0);
    }
}
