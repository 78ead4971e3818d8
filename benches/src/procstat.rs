//! Process CPU and memory figures from `/proc/<pid>/stat` and `/proc/<pid>/status`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{BenchError, Result};

/// Clock ticks per second for `utime`/`stime` in `/proc/<pid>/stat`.
///
/// `sysconf(_SC_CLK_TCK)` needs `libc` (and `unsafe`, which the workspace forbids); Linux
/// has reported `USER_HZ = 100` to user space on every architecture we run on. A test
/// checks this against `getconf CLK_TCK`.
pub const CLK_TCK: u64 = 100;

/// One reading of a process's counters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ProcSample {
    pub pid: u32,
    /// User + system CPU time consumed so far, in ticks of [`CLK_TCK`].
    pub cpu_ticks: u64,
    /// The same in seconds.
    pub cpu_s: f64,
    /// Resident set size now (`VmRSS`), KiB.
    pub rss_kb: u64,
    /// Peak resident set size (`VmHWM`), KiB.
    pub peak_rss_kb: u64,
}

/// CPU cost of a process between two samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CpuCost {
    pub pid: u32,
    /// CPU seconds consumed between the samples.
    pub cpu_s: f64,
    /// CPU seconds per 1,000 requests.
    pub cpu_s_per_1k_req: f64,
    /// Average cores busy over the interval, at the offered rate.
    pub vcpu: f64,
    /// RSS at the second sample, KiB.
    pub rss_kb: u64,
    /// Peak RSS at the second sample, KiB.
    pub peak_rss_kb: u64,
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`.
pub fn sample_proc(pid: u32) -> Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let cpu_ticks = parse_stat_cpu_ticks(&stat)?;
    let (rss_kb, peak_rss_kb) = parse_status_rss(&status)?;
    Ok(ProcSample {
        pid,
        cpu_ticks,
        cpu_s: ticks_to_seconds(cpu_ticks),
        rss_kb,
        peak_rss_kb,
    })
}

/// Converts clock ticks to seconds.
pub fn ticks_to_seconds(ticks: u64) -> f64 {
    ticks as f64 / CLK_TCK as f64
}

/// `utime + stime` (fields 14 and 15) from the text of `/proc/<pid>/stat`.
///
/// Field 2 (`comm`) is in parentheses and may itself hold spaces and parentheses, so the
/// fields are counted from the *last* `)`.
pub fn parse_stat_cpu_ticks(stat: &str) -> Result<u64> {
    let err = |detail: &str| BenchError::Parse {
        what: "/proc/<pid>/stat".into(),
        detail: detail.into(),
    };
    let close = stat.rfind(')').ok_or_else(|| err("no ')' after comm"))?;
    let rest = stat.get(close + 1..).ok_or_else(|| err("truncated"))?;
    // rest starts at field 3 (state); utime is field 14 -> index 11, stime index 12.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |idx: usize, name: &str| -> Result<u64> {
        fields
            .get(idx)
            .ok_or_else(|| err(&format!("missing {name}")))?
            .parse::<u64>()
            .map_err(|e| err(&format!("{name}: {e}")))
    };
    Ok(field(11, "utime")? + field(12, "stime")?)
}

/// `(VmRSS, VmHWM)` in KiB from the text of `/proc/<pid>/status`.
///
/// Kernel threads have neither line; they read as zero.
pub fn parse_status_rss(status: &str) -> Result<(u64, u64)> {
    let mut rss = 0;
    let mut hwm = 0;
    for line in status.lines() {
        let (key, value) = match line.split_once(':') {
            Some(kv) => kv,
            None => continue,
        };
        let target = match key {
            "VmRSS" => &mut rss,
            "VmHWM" => &mut hwm,
            _ => continue,
        };
        let number = value.split_whitespace().next().unwrap_or("0");
        *target = number.parse().map_err(|e| BenchError::Parse {
            what: "/proc/<pid>/status".into(),
            detail: format!("{key}: {e}"),
        })?;
    }
    Ok((rss, hwm))
}

/// CPU cost between `before` and `after`, which span `wall` of wall-clock time during
/// which `requests` requests were offered.
pub fn cpu_cost(before: &ProcSample, after: &ProcSample, requests: u64, wall: Duration) -> CpuCost {
    let cpu_s = ticks_to_seconds(after.cpu_ticks.saturating_sub(before.cpu_ticks));
    let cpu_s_per_1k_req = if requests == 0 {
        0.0
    } else {
        cpu_s * 1000.0 / requests as f64
    };
    let wall_s = wall.as_secs_f64();
    let vcpu = if wall_s > 0.0 { cpu_s / wall_s } else { 0.0 };
    CpuCost {
        pid: after.pid,
        cpu_s,
        cpu_s_per_1k_req,
        vcpu,
        rss_kb: after.rss_kb,
        peak_rss_kb: after.peak_rss_kb,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A real line from a process whose comm is "a) b (c" (comm is cut to 15 bytes).
    const STAT: &str = "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
        250 75 0 0 20 0 3 0 987654 12345678 2048 18446744073709551615 1 1 0 0 0 0 0 \
        4096 17003 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n";

    const STATUS: &str = "Name:\ta) b (c\nUmask:\t0022\nState:\tS (sleeping)\n\
        VmPeak:\t  123456 kB\nVmSize:\t  120000 kB\nVmHWM:\t   18432 kB\n\
        VmRSS:\t   16384 kB\nThreads:\t3\n";

    #[test]
    fn parses_stat_with_awkward_comm() {
        assert_eq!(parse_stat_cpu_ticks(STAT).unwrap(), 325);
        assert!(parse_stat_cpu_ticks("12 (x) S 1 2").is_err());
        assert!(parse_stat_cpu_ticks("garbage").is_err());
    }

    #[test]
    fn parses_status() {
        assert_eq!(parse_status_rss(STATUS).unwrap(), (16384, 18432));
        assert_eq!(parse_status_rss("Name:\tkthreadd\n").unwrap(), (0, 0));
    }

    #[test]
    fn samples_self() {
        let s = sample_proc(std::process::id()).unwrap();
        assert!(s.rss_kb > 0);
        assert!(s.peak_rss_kb >= s.rss_kb);
    }

    #[test]
    fn clk_tck_matches_getconf() {
        let out = match std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
        {
            Ok(out) => out,
            Err(e) => {
                eprintln!("getconf not available ({e}); skipping");
                return;
            }
        };
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.trim().parse::<u64>().unwrap(), CLK_TCK);
    }

    #[test]
    fn cost_math() {
        let before = ProcSample {
            pid: 1,
            cpu_ticks: 100,
            cpu_s: 1.0,
            rss_kb: 10,
            peak_rss_kb: 10,
        };
        let after = ProcSample {
            cpu_ticks: 300,
            cpu_s: 3.0,
            rss_kb: 12,
            peak_rss_kb: 15,
            ..before
        };
        let c = cpu_cost(&before, &after, 10_000, Duration::from_secs(10));
        assert!((c.cpu_s - 2.0).abs() < 1e-9);
        assert!((c.cpu_s_per_1k_req - 0.2).abs() < 1e-9);
        assert!((c.vcpu - 0.2).abs() < 1e-9);
        assert_eq!((c.rss_kb, c.peak_rss_kb), (12, 15));
        let z = cpu_cost(&before, &after, 0, Duration::ZERO);
        assert_eq!((z.cpu_s_per_1k_req, z.vcpu), (0.0, 0.0));
    }
}
