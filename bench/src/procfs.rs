//! Reads process and kernel memory figures from /proc.
//!
//! Owns parsing of `/proc/PID/smaps_rollup`, `/proc/PID/stat` and
//! `/proc/net/sockstat`. Never writes anything.

use anyhow::Context;

/// A process's resident memory, in bytes.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ProcessMemory {
    pub rss_bytes: u64,
    /// Anonymous (heap, stacks) resident bytes: what connections cost in user space.
    pub anonymous_bytes: u64,
}

pub fn process_memory(pid: u32) -> anyhow::Result<ProcessMemory> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| {
        text.lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|kib| kib.parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .unwrap_or(0)
    };
    Ok(ProcessMemory {
        rss_bytes: field("Rss:"),
        anonymous_bytes: field("Anonymous:"),
    })
}

/// Pages the kernel has allocated to TCP socket buffers, machine-wide.
pub fn tcp_memory_pages() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat")?;
    let line = text
        .lines()
        .find(|line| line.starts_with("TCP:"))
        .context("no TCP line in sockstat")?;
    let mut words = line.split_whitespace();
    while let Some(word) = words.next() {
        if word == "mem" {
            return Ok(words.next().context("mem without value")?.parse()?);
        }
    }
    anyhow::bail!("no mem field in {line}")
}

/// Kernel slab memory (reclaimable and not), machine-wide, in bytes.
pub fn slab_bytes() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    let line = text
        .lines()
        .find(|line| line.starts_with("Slab:"))
        .context("no Slab line in meminfo")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("Slab without value")?
        .parse()?;
    Ok(kib * 1024)
}

/// CPU time (user + system) a process has used, in seconds.
pub fn process_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start after ") ".
    let after_name = stat.rsplit_once(") ").context("malformed stat")?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); here indices 11 and 12.
    let ticks: u64 = fields.get(11).context("no utime")?.parse::<u64>()?
        + fields.get(12).context("no stime")?.parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / ticks_per_second)
}

/// Child processes of `pid` (for a gateway: its spawned storage-writer).
/// Children are listed per thread that forked them, so every thread is read.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut children = Vec::new();
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            children.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    children
}

/// CPU seconds of `pid` and its children: a gateway and the storage-writer it
/// spawned, the whole node's cost.
pub fn process_tree_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let mut total = process_cpu_seconds(pid)?;
    for child in children(pid) {
        total += process_cpu_seconds(child).unwrap_or(0.0);
    }
    Ok(total)
}

/// CPU seconds of the servers under test: with their children (a gateway's
/// storage-writer), and of their own processes alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerCpu {
    pub tree_s: f64,
    pub process_s: f64,
}

impl ServerCpu {
    /// Now, summed over `pids`; `None` if there are none or one is gone.
    pub fn of(pids: &[u32]) -> Option<Self> {
        if pids.is_empty() {
            return None;
        }
        let mut cpu = Self::default();
        for pid in pids {
            cpu.tree_s += process_tree_cpu_seconds(*pid).ok()?;
            cpu.process_s += process_cpu_seconds(*pid).ok()?;
        }
        Some(cpu)
    }

    /// What was spent from `start` to `self`.
    pub fn since(self, start: Self) -> Self {
        Self {
            tree_s: self.tree_s - start.tree_s,
            process_s: self.process_s - start.process_s,
        }
    }
}
