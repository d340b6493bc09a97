//! `gateway doctor --connections N`: can this host hold N connections?
//!
//! Owns the host audit: it reads sysctls, rlimits, io_uring availability,
//! cores and memory (`HostFacts::read`), then judges them for a target
//! (`evaluate`, a pure function). Each finding says why it matters and the
//! exact line that fixes it. Changes nothing on the host.

use std::fmt::Write;

use crate::limits::{
    BUFFER_BYTES_PER_CONNECTION, KERNEL_BYTES_PER_IDLE_CONNECTION, USER_BYTES_PER_IDLE_CONNECTION,
};
/// Share of physical memory the connections may take; the rest is for bursts,
/// the storage writer and the OS.
const MEMORY_SHARE_PERCENT: u64 = 70;
/// Backlog the gateway asks for on each shard's listener.
const LISTEN_BACKLOG: u64 = crate::limits::LISTEN_BACKLOG as u64;

/// What the audit reads from the host.
#[derive(Debug, Clone, Default)]
pub struct HostFacts {
    pub nofile_soft: u64,
    pub nofile_hard: u64,
    /// Whether this process could raise its hard RLIMIT_NOFILE (CAP_SYS_RESOURCE).
    pub nofile_hard_raisable: bool,
    pub nr_open: Option<u64>,
    pub file_max: Option<u64>,
    pub somaxconn: Option<u64>,
    pub tcp_max_syn_backlog: Option<u64>,
    pub netdev_max_backlog: Option<u64>,
    /// tcp_mem: min, pressure, max, in pages.
    pub tcp_mem_pages: Option<[u64; 3]>,
    pub tcp_rmem: Option<[u64; 3]>,
    pub tcp_wmem: Option<[u64; 3]>,
    pub memlock_soft_bytes: u64,
    pub is_root: bool,
    pub io_uring_disabled: Option<u64>,
    pub io_uring_works: bool,
    pub cores: usize,
    pub memory_total_bytes: u64,
    pub page_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Ok,
    /// Worth fixing; the target still fits.
    Warn,
    /// The host cannot hold the target until this is fixed.
    Short,
}

#[derive(Debug, Clone)]
pub struct Finding {
    pub severity: Severity,
    pub name: &'static str,
    pub found: String,
    pub why: String,
    pub fix: Option<String>,
}

/// Descriptors a gateway process needs for `connections` on `shards` shards
/// (the reserve matches the node's start-up budget).
pub fn descriptors_needed(connections: u64, shards: u64) -> u64 {
    connections + 64 + 8 * shards
}

/// Judges `host` for a target of `connections` connections in one process.
pub fn evaluate(host: &HostFacts, connections: u64, shards: u64) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut add = |severity, name, found: String, why: String, fix: Option<String>| {
        findings.push(Finding {
            severity,
            name,
            found,
            why,
            fix,
        })
    };
    let need_fds = descriptors_needed(connections, shards);
    let limit_fix = format!(
        "LimitNOFILE={need_fds} in the unit (systemd/chat-gateway.service), or `chat-gateway hard nofile {need_fds}` in /etc/security/limits.d/60-chat-gateway.conf"
    );

    if host.nofile_hard >= need_fds {
        add(Severity::Ok, "RLIMIT_NOFILE", format!("soft {} hard {}", host.nofile_soft, host.nofile_hard),
            format!("one descriptor per connection; {need_fds} needed (the gateway raises soft to hard itself)"), None);
    } else {
        let raisable = if host.nofile_hard_raisable {
            "it can be raised by a privileged process"
        } else {
            "and this process cannot raise it (no CAP_SYS_RESOURCE): it must be raised where the process is started"
        };
        add(Severity::Short, "RLIMIT_NOFILE", format!("soft {} hard {}", host.nofile_soft, host.nofile_hard),
            format!("one descriptor per connection: {need_fds} needed, the hard limit allows {} connections, {raisable}; or run several gateway processes sharing the port (SO_REUSEPORT)",
                host.nofile_hard.saturating_sub(need_fds - connections)),
            Some(limit_fix));
    }

    let sysctl_check = |value: Option<u64>, wanted: u64| match value {
        Some(value) if value >= wanted => (Severity::Ok, value.to_string()),
        Some(value) => (Severity::Short, value.to_string()),
        None => (Severity::Warn, "unreadable".to_owned()),
    };
    let (severity, found) = sysctl_check(host.nr_open, need_fds);
    add(
        severity,
        "fs.nr_open",
        found,
        format!("caps RLIMIT_NOFILE; must be at least {need_fds}"),
        (severity != Severity::Ok)
            .then(|| format!("sysctl -w fs.nr_open={}", need_fds.next_power_of_two())),
    );
    let file_max_wanted = need_fds + 65_536;
    let (severity, found) = sysctl_check(host.file_max, file_max_wanted);
    add(
        severity,
        "fs.file-max",
        found,
        format!("open files system-wide; {file_max_wanted} leaves room for the rest of the host"),
        (severity != Severity::Ok).then(|| {
            format!(
                "sysctl -w fs.file-max={}",
                file_max_wanted.next_power_of_two()
            )
        }),
    );

    let backlog_check = |value: Option<u64>, wanted: u64| match value {
        Some(value) if value >= wanted => (Severity::Ok, value.to_string()),
        Some(value) => (Severity::Warn, value.to_string()),
        None => (Severity::Warn, "unreadable".to_owned()),
    };
    let (severity, found) = backlog_check(host.somaxconn, LISTEN_BACKLOG);
    add(severity, "net.core.somaxconn", found, format!("caps each shard's listen backlog ({LISTEN_BACKLOG}); a short backlog drops SYNs in reconnect storms"),
        (severity != Severity::Ok).then(|| format!("sysctl -w net.core.somaxconn={}", LISTEN_BACKLOG * 2)));
    let (severity, found) = backlog_check(host.tcp_max_syn_backlog, LISTEN_BACKLOG * 4);
    add(
        severity,
        "net.ipv4.tcp_max_syn_backlog",
        found,
        "half-open connections queued during a reconnect storm".into(),
        (severity != Severity::Ok).then(|| {
            format!(
                "sysctl -w net.ipv4.tcp_max_syn_backlog={}",
                LISTEN_BACKLOG * 4
            )
        }),
    );
    let (severity, found) = backlog_check(host.netdev_max_backlog, 16_384);
    add(
        severity,
        "net.core.netdev_max_backlog",
        found,
        "packets queued per core before the stack drops them under bursts".into(),
        (severity != Severity::Ok)
            .then(|| "sysctl -w net.core.netdev_max_backlog=16384".to_owned()),
    );

    let page = host.page_bytes.max(1);
    let buffer_pages_wanted = connections * BUFFER_BYTES_PER_CONNECTION / page;
    match host.tcp_mem_pages {
        Some([_, _, max]) if max >= buffer_pages_wanted => add(Severity::Ok, "net.ipv4.tcp_mem", format!("max {max} pages"),
            format!("socket buffers for {connections} connections at {BUFFER_BYTES_PER_CONNECTION} B each need {buffer_pages_wanted} pages"), None),
        Some([_, _, max]) => add(Severity::Short, "net.ipv4.tcp_mem", format!("max {max} pages"),
            format!("socket buffers for {connections} connections at {BUFFER_BYTES_PER_CONNECTION} B each need {buffer_pages_wanted} pages; past the max, the kernel drops data"),
            Some(format!("sysctl -w net.ipv4.tcp_mem=\"{} {} {}\"", buffer_pages_wanted / 2, buffer_pages_wanted * 3 / 4, buffer_pages_wanted))),
        None => add(Severity::Warn, "net.ipv4.tcp_mem", "unreadable".into(), "socket buffer budget".into(), None),
    }
    for (name, value) in [
        ("net.ipv4.tcp_rmem", host.tcp_rmem),
        ("net.ipv4.tcp_wmem", host.tcp_wmem),
    ] {
        match value {
            Some([min, default, max]) if default <= 65_536 => add(Severity::Ok, name, format!("{min} {default} {max}"),
                "initial buffer per socket; small defaults keep idle connections cheap (autotuning grows busy ones)".into(), None),
            Some([min, default, max]) => add(Severity::Warn, name, format!("{min} {default} {max}"),
                format!("a {default}-byte default buffer per socket is much more than an idle chat connection needs"),
                Some(format!("sysctl -w {name}=\"4096 16384 {max}\""))),
            None => add(Severity::Warn, name, "unreadable".into(), "socket buffer sizes".into(), None),
        }
    }

    let per_connection = KERNEL_BYTES_PER_IDLE_CONNECTION
        + USER_BYTES_PER_IDLE_CONNECTION
        + BUFFER_BYTES_PER_CONNECTION;
    let memory_needed = connections * per_connection;
    let memory_allowed = host.memory_total_bytes / 100 * MEMORY_SHARE_PERCENT;
    let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
    add(if memory_needed <= memory_allowed { Severity::Ok } else { Severity::Short }, "memory",
        format!("{:.1} GiB total", gib(host.memory_total_bytes)),
        format!("{connections} connections x {per_connection} B (kernel socket, user space, buffer budget) = {:.1} GiB; {MEMORY_SHARE_PERCENT}% of memory is {:.1} GiB",
            gib(memory_needed), gib(memory_allowed)),
        (memory_needed > memory_allowed).then(|| format!("spread the target over more hosts: this one holds about {} connections", memory_allowed / per_connection)));

    if host.is_root || host.memlock_soft_bytes >= 64 << 20 {
        add(
            Severity::Ok,
            "RLIMIT_MEMLOCK",
            if host.is_root {
                "root (exempt)".into()
            } else {
                format!("{} bytes", host.memlock_soft_bytes)
            },
            "io_uring rings count against locked memory on kernels before 5.12".into(),
            None,
        );
    } else {
        add(Severity::Warn, "RLIMIT_MEMLOCK", format!("{} bytes", host.memlock_soft_bytes),
            "io_uring rings count against locked memory on kernels before 5.12; too little fails at start-up".into(),
            Some("LimitMEMLOCK=64M in the unit".into()));
    }
    if host.io_uring_works {
        add(
            Severity::Ok,
            "io_uring",
            "available".into(),
            "shards run on io_uring".into(),
            None,
        );
    } else {
        add(Severity::Warn, "io_uring", format!("unavailable (kernel.io_uring_disabled = {})", host.io_uring_disabled.map_or("?".into(), |v| v.to_string())),
            "shards fall back to epoll: correct, somewhat more syscalls per event".into(),
            Some("sysctl -w kernel.io_uring_disabled=0 (and allow io_uring_* in any seccomp profile)".into()));
    }
    add(
        if shards as usize <= host.cores.max(1) {
            Severity::Ok
        } else {
            Severity::Warn
        },
        "cores",
        format!("{} cores, {shards} shards", host.cores),
        "one shard per core; more shards than cores only adds wake-ups".into(),
        (shards as usize > host.cores.max(1)).then(|| format!("--shards {}", host.cores)),
    );
    findings
}

/// The report as text, and whether the host can hold the target.
pub fn render(findings: &[Finding], connections: u64) -> (String, bool) {
    let mut out = String::new();
    let holds = findings
        .iter()
        .all(|finding| finding.severity != Severity::Short);
    let _ = writeln!(
        out,
        "gateway doctor: can this host hold {connections} connections in one gateway process?\n"
    );
    for finding in findings {
        let tag = match finding.severity {
            Severity::Ok => "ok   ",
            Severity::Warn => "warn ",
            Severity::Short => "SHORT",
        };
        let _ = writeln!(out, "[{tag}] {:<30} {}", finding.name, finding.found);
        if finding.severity != Severity::Ok {
            let _ = writeln!(out, "        why: {}", finding.why);
            if let Some(fix) = &finding.fix {
                let _ = writeln!(out, "        fix: {fix}");
            }
        }
    }
    let verdict = if holds {
        "yes"
    } else {
        "NO: fix the SHORT lines (tuning/ has a profile)"
    };
    let _ = writeln!(out, "\nverdict: {verdict}");
    (out, holds)
}

impl HostFacts {
    /// Reads the live host. Missing files become `None`, never an error.
    pub fn read() -> HostFacts {
        let number = |path: &str| {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok())
        };
        let triple = |path: &str| {
            let text = std::fs::read_to_string(path).ok()?;
            let values: Vec<u64> = text
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            <[u64; 3]>::try_from(values).ok()
        };
        let (nofile_soft, nofile_hard) =
            rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((0, 0));
        // Raising the hard limit needs CAP_SYS_RESOURCE; try it (on our own
        // process only) and put it back.
        let nofile_hard_raisable = rlimit::setrlimit(
            rlimit::Resource::NOFILE,
            nofile_soft,
            nofile_hard.saturating_add(1),
        )
        .is_ok();
        if nofile_hard_raisable {
            let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, nofile_soft, nofile_hard);
        }
        let memory_total_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| {
                let line = text
                    .lines()
                    .find(|line| line.starts_with("MemTotal:"))?
                    .to_owned();
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .map_or(0, |kib| kib * 1024);
        HostFacts {
            nofile_soft,
            nofile_hard,
            nofile_hard_raisable,
            nr_open: number("/proc/sys/fs/nr_open"),
            file_max: number("/proc/sys/fs/file-max"),
            somaxconn: number("/proc/sys/net/core/somaxconn"),
            tcp_max_syn_backlog: number("/proc/sys/net/ipv4/tcp_max_syn_backlog"),
            netdev_max_backlog: number("/proc/sys/net/core/netdev_max_backlog"),
            tcp_mem_pages: triple("/proc/sys/net/ipv4/tcp_mem"),
            tcp_rmem: triple("/proc/sys/net/ipv4/tcp_rmem"),
            tcp_wmem: triple("/proc/sys/net/ipv4/tcp_wmem"),
            memlock_soft_bytes: rlimit::getrlimit(rlimit::Resource::MEMLOCK)
                .map_or(0, |(soft, _)| soft),
            is_root: effective_uid() == Some(0),
            io_uring_disabled: number("/proc/sys/kernel/io_uring_disabled"),
            io_uring_works: monoio::utils::detect_uring(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_total_bytes,
            page_bytes: 4096,
        }
    }
}

/// The effective uid, from /proc (the second field of `Uid:`).
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roomy_host() -> HostFacts {
        HostFacts {
            nofile_soft: 1 << 20,
            nofile_hard: 1 << 20,
            nofile_hard_raisable: false,
            nr_open: Some(1 << 21),
            file_max: Some(1 << 22),
            somaxconn: Some(8192),
            tcp_max_syn_backlog: Some(16384),
            netdev_max_backlog: Some(16384),
            tcp_mem_pages: Some([1 << 20, 3 << 19, 1 << 21]),
            tcp_rmem: Some([4096, 16384, 1 << 20]),
            tcp_wmem: Some([4096, 16384, 1 << 20]),
            memlock_soft_bytes: 64 << 20,
            is_root: false,
            io_uring_disabled: Some(0),
            io_uring_works: true,
            cores: 8,
            memory_total_bytes: 64 << 30,
            page_bytes: 4096,
        }
    }

    #[test]
    fn a_tuned_host_holds_100k() {
        let findings = evaluate(&roomy_host(), 100_000, 8);
        let (report, holds) = render(&findings, 100_000);
        assert!(holds, "{report}");
        assert!(
            findings.iter().all(|f| f.severity == Severity::Ok),
            "{report}"
        );
    }

    #[test]
    fn a_low_fd_limit_that_cannot_be_raised_is_short_and_says_so() {
        let host = HostFacts {
            nofile_soft: 20_000,
            nofile_hard: 20_000,
            ..roomy_host()
        };
        let findings = evaluate(&host, 100_000, 2);
        let nofile = findings.iter().find(|f| f.name == "RLIMIT_NOFILE").unwrap();
        assert_eq!(nofile.severity, Severity::Short);
        assert!(nofile.why.contains("cannot raise"), "{}", nofile.why);
        assert!(nofile
            .fix
            .as_deref()
            .unwrap()
            .contains("LimitNOFILE=100080"));
        assert!(!render(&findings, 100_000).1);
    }

    #[test]
    fn too_little_memory_or_tcp_mem_is_short_with_a_fix() {
        let host = HostFacts {
            memory_total_bytes: 1 << 30,
            tcp_mem_pages: Some([10, 20, 30]),
            ..roomy_host()
        };
        let findings = evaluate(&host, 500_000, 8);
        for name in ["memory", "net.ipv4.tcp_mem"] {
            let finding = findings.iter().find(|f| f.name == name).unwrap();
            assert_eq!(finding.severity, Severity::Short, "{name}");
            assert!(finding.fix.is_some(), "{name} has a fix");
        }
    }

    #[test]
    fn backlogs_and_io_uring_are_warnings_not_verdicts() {
        let host = HostFacts {
            somaxconn: Some(128),
            io_uring_works: false,
            io_uring_disabled: Some(2),
            ..roomy_host()
        };
        let findings = evaluate(&host, 1_000, 8);
        assert!(render(&findings, 1_000).1, "still holds 1,000");
        let somaxconn = findings
            .iter()
            .find(|f| f.name == "net.core.somaxconn")
            .unwrap();
        assert_eq!(
            (somaxconn.severity, somaxconn.fix.as_deref()),
            (Severity::Warn, Some("sysctl -w net.core.somaxconn=8192"))
        );
    }
}
