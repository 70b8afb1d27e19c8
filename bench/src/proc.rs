//! What the harness reads from /proc (server CPU and RSS, per-core busy time, socket
//! drops, load) and process placement (CPU pinning, the open-file limit).

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result};
use nix::sched::{CpuSet, sched_setaffinity};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::unistd::Pid;

/// Pins the calling thread (and the threads it spawns later) to `cpu`.
pub fn pin_to(cpu: usize) -> Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu).context("cpu index")?;
    sched_setaffinity(Pid::from_raw(0), &set).context("sched_setaffinity")?;
    Ok(())
}

/// Raises the open-file limit (thousands of client sockets, and the servers started
/// from here inherit it): to 65536 when privileged, else the soft limit to the hard one.
pub fn raise_nofile() -> Result<()> {
    const WANT: u64 = 65536;
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if hard < WANT && setrlimit(Resource::RLIMIT_NOFILE, WANT, WANT).is_ok() {
        return Ok(());
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(())
}

/// Clock ticks per second of /proc/PID/stat times (USER_HZ, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// utime + stime of a process (all its threads), in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = s.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let utime: f64 = f.get(11).context("utime")?.parse()?;
    let stime: f64 = f.get(12).context("stime")?.parse()?;
    Ok((utime + stime) / USER_HZ)
}

/// Seconds all threads of `pid` have run on a CPU and waited on a run queue for one
/// (the first two fields of /proc/PID/task/TID/schedstat, in ns). Waiting time shows
/// that something else competed for the core during a measurement.
pub fn sched(pid: u32) -> Result<(f64, f64)> {
    let mut run = 0u64;
    let mut wait = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(t) = t else { continue };
        let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) else {
            continue;
        };
        let mut f = s.split_whitespace().map(|x| x.parse::<u64>().unwrap_or(0));
        run += f.next().unwrap_or(0);
        wait += f.next().unwrap_or(0);
    }
    Ok((run as f64 / 1e9, wait as f64 / 1e9))
}

/// VmRSS of a process in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    for line in s.lines() {
        if let Some(v) = line.strip_prefix("VmRSS:") {
            return Ok(v.trim().trim_end_matches("kB").trim().parse()?);
        }
    }
    anyhow::bail!("no VmRSS for pid {pid}")
}

/// Busy and total jiffies of one CPU from /proc/stat (busy: everything but idle and
/// iowait; includes irq and softirq, which a server's own stime may not).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTimes {
    pub busy: u64,
    pub total: u64,
}

pub fn cpu_times(cpu: usize) -> Result<CpuTimes> {
    let s = std::fs::read_to_string("/proc/stat")?;
    let name = format!("cpu{cpu}");
    for line in s.lines() {
        let mut it = line.split_whitespace();
        if it.next() == Some(name.as_str()) {
            let v: Vec<u64> = it.filter_map(|x| x.parse().ok()).collect();
            let total: u64 = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            return Ok(CpuTimes {
                busy: total - idle,
                total,
            });
        }
    }
    anyhow::bail!("no {name} in /proc/stat")
}

impl CpuTimes {
    /// Fraction of the interval the CPU was busy.
    pub fn busy_since(&self, before: &CpuTimes) -> f64 {
        let t = self.total.saturating_sub(before.total);
        if t == 0 {
            return 0.0;
        }
        self.busy.saturating_sub(before.busy) as f64 / t as f64
    }
}

/// Datagrams dropped by each local UDP port's sockets (summed over sockets sharing a
/// port), from /proc/net/udp.
pub fn udp_drops() -> Result<HashMap<u16, u64>> {
    let s = std::fs::read_to_string("/proc/net/udp")?;
    let mut m = HashMap::new();
    for line in s.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(drops)) = (f.get(1), f.last()) else {
            continue;
        };
        let Some((_, port)) = local.split_once(':') else {
            continue;
        };
        let (Ok(port), Ok(drops)) = (u16::from_str_radix(port, 16), drops.parse::<u64>()) else {
            continue;
        };
        *m.entry(port).or_insert(0) += drops;
    }
    Ok(m)
}

/// Sum of drops over `ports`, as a difference between two snapshots.
pub fn drops_between(
    before: &HashMap<u16, u64>,
    after: &HashMap<u16, u64>,
    ports: impl Fn(u16) -> bool,
) -> u64 {
    after
        .iter()
        .filter(|(p, _)| ports(**p))
        .map(|(p, a)| a.saturating_sub(before.get(p).copied().unwrap_or(0)))
        .sum()
}

/// The 1-minute load average.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(0.0)
}

/// TCP sockets whose local port is `port` (a server's side of its connections), by
/// state, from /proc/net/tcp; the listening socket is left out.
pub fn tcp_states(port: u16) -> Result<BTreeMap<String, usize>> {
    let s = std::fs::read_to_string("/proc/net/tcp")?;
    let mut m = BTreeMap::new();
    for line in s.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(st)) = (f.get(1), f.get(3)) else {
            continue;
        };
        let Some((_, p)) = local.split_once(':') else {
            continue;
        };
        if u16::from_str_radix(p, 16).ok() != Some(port) {
            continue;
        }
        let name = match *st {
            "01" => "ESTABLISHED",
            "06" => "TIME_WAIT",
            "07" => "CLOSE",
            "08" => "CLOSE_WAIT",
            "09" => "LAST_ACK",
            "0A" => continue,
            "0B" => "CLOSING",
            "04" => "FIN_WAIT1",
            "05" => "FIN_WAIT2",
            other => other,
        };
        *m.entry(name.to_owned()).or_insert(0) += 1;
    }
    Ok(m)
}
