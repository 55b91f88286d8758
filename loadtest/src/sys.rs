//! Process-tree and kernel figures read from /proc, clocks and limits.

use std::collections::HashMap;
use std::fs;

/// CLOCK_MONOTONIC in nanoseconds. It is system-wide, so a timestamp taken in
/// one worker process can be compared with one taken in another.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Raise the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a stack struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Fields of /proc/PID/stat after the `comm` field: index 0 is field 3 (state).
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_ascii_whitespace().map(str::to_owned).collect())
}

/// Parent pid -> child pids, from the ppid field of every /proc/N/stat.
fn children_map() -> HashMap<i32, Vec<i32>> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            if let Some(f) = stat_fields(pid) {
                if let Some(ppid) = f.get(1).and_then(|p| p.parse::<i32>().ok()) {
                    children.entry(ppid).or_default().push(pid);
                }
            }
        }
    }
    children
}

/// `root` and all its descendants in `children`.
fn tree_in(children: &HashMap<i32, Vec<i32>>, root: i32) -> Vec<i32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        if let Some(c) = children.get(&out[i]) {
            out.extend(c.iter().copied());
        }
        i += 1;
        if out.len() > 100_000 {
            break;
        }
    }
    out
}

/// The process trees of several roots from one scan of /proc, each process
/// in one tree only (the first root's that holds it, so a root given twice,
/// or one inside another's tree, is not counted twice). None if a root is gone.
fn trees(roots: &[i32]) -> Option<Vec<Vec<i32>>> {
    for r in roots {
        fs::metadata(format!("/proc/{r}")).ok()?;
    }
    let children = children_map();
    let mut seen = std::collections::HashSet::new();
    Some(
        roots
            .iter()
            .map(|&r| {
                tree_in(&children, r)
                    .into_iter()
                    .filter(|p| seen.insert(*p))
                    .collect()
            })
            .collect(),
    )
}

fn rss_of(pid: i32) -> u64 {
    let mut total = 0u64;
    if let Ok(s) = fs::read_to_string(format!("/proc/{pid}/status")) {
        for line in s.lines() {
            if let Some(v) = line.strip_prefix("VmRSS:") {
                let kb: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                total += kb * 1024;
            }
        }
    }
    total
}

fn ticks_of(pid: i32) -> u64 {
    stat_fields(pid)
        .map(|f| {
            let u: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
            let s: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
            u + s
        })
        .unwrap_or(0)
}

/// utime+stime (seconds) summed over the process tree of `root`.
pub fn tree_cpu_secs(root: i32) -> Option<f64> {
    trees_cpu_secs(&[root]).map(|v| v[0])
}

/// VmRSS (bytes) of each root's process tree. None if any root is gone.
pub fn trees_rss_bytes(roots: &[i32]) -> Option<Vec<u64>> {
    Some(
        trees(roots)?
            .iter()
            .map(|t| t.iter().map(|&p| rss_of(p)).sum())
            .collect(),
    )
}

/// utime+stime (seconds) of each root's process tree. None if any root is gone.
pub fn trees_cpu_secs(roots: &[i32]) -> Option<Vec<f64>> {
    let tck = clk_tck();
    Some(
        trees(roots)?
            .iter()
            .map(|t| t.iter().map(|&p| ticks_of(p)).sum::<u64>() as f64 / tck)
            .collect(),
    )
}

/// (ListenOverflows, ListenDrops) from /proc/net/netstat.
pub fn listen_overflows() -> Option<(u64, u64)> {
    let s = fs::read_to_string("/proc/net/netstat").ok()?;
    let lines: Vec<&str> = s.lines().collect();
    for pair in lines.windows(2) {
        if pair[0].starts_with("TcpExt:") && pair[1].starts_with("TcpExt:") {
            let names: Vec<&str> = pair[0].split_ascii_whitespace().collect();
            let vals: Vec<&str> = pair[1].split_ascii_whitespace().collect();
            let get = |n: &str| -> u64 {
                names
                    .iter()
                    .position(|x| *x == n)
                    .and_then(|i| vals.get(i))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            return Some((get("ListenOverflows"), get("ListenDrops")));
        }
    }
    None
}

/// Least-squares slope of y over x.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 {
        None
    } else {
        Some(sxy / sxx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line() {
        let pts = [(1.0, 3.0), (2.0, 5.0), (4.0, 9.0)];
        assert!((slope(&pts).unwrap() - 2.0).abs() < 1e-9);
        assert!(slope(&pts[..1]).is_none());
    }

    #[test]
    fn own_process_is_measurable() {
        let me = std::process::id() as i32;
        assert!(trees_rss_bytes(&[me]).unwrap()[0] > 0);
        assert!(tree_cpu_secs(me).is_some());
        assert!(trees(&[me]).unwrap()[0].contains(&me));
    }

    #[test]
    fn several_roots_count_each_process_once() {
        let me = std::process::id() as i32;
        let one = trees_rss_bytes(&[me]).unwrap();
        let twice = trees_rss_bytes(&[me, me]).unwrap();
        assert_eq!(twice.len(), 2);
        assert_eq!(twice[1], 0);
        assert!(one[0] > 0 && twice[0] > 0);
        assert_eq!(trees_cpu_secs(&[me, me]).unwrap().len(), 2);
        assert!(trees_cpu_secs(&[me, i32::MAX]).is_none());
        assert_eq!(trees_cpu_secs(&[]).unwrap().len(), 0);
    }
}
