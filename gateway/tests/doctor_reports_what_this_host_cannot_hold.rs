//! `gateway doctor` reads the live host: it exits 0 for a target the host can
//! hold, and 1 with the setting, the reason and the fix for one it cannot; on
//! these machines it says that the open-files limit cannot be raised.

use std::process::Command;

fn doctor(connections: u64) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args([
            "doctor",
            "--connections",
            &connections.to_string(),
            "--shards",
            "2",
        ])
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
    )
}

/// This process's hard RLIMIT_NOFILE, from /proc.
fn nofile_hard() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(4).unwrap().parse().unwrap()
}

#[test]
fn a_small_target_fits() {
    let (holds, report) = doctor(100);
    assert!(holds, "{report}");
    assert!(report.contains("verdict: yes"));
    for setting in [
        "RLIMIT_NOFILE",
        "fs.nr_open",
        "net.core.somaxconn",
        "net.ipv4.tcp_mem",
        "memory",
        "io_uring",
        "cores",
    ] {
        assert!(
            report.contains(setting),
            "the report covers {setting}:\n{report}"
        );
    }
}

#[test]
fn a_target_past_the_fd_limit_is_refused_with_the_fix() {
    let target = nofile_hard() + 1;
    let (holds, report) = doctor(target);
    assert!(!holds, "{report}");
    let nofile = report
        .lines()
        .find(|line| line.contains("RLIMIT_NOFILE"))
        .unwrap();
    assert!(nofile.starts_with("[SHORT]"), "{report}");
    assert!(report.contains("fix: LimitNOFILE="), "{report}");
    assert!(report.contains("verdict: NO"));
    // Root without CAP_SYS_RESOURCE (these machines) cannot raise it: the report says so.
    let raisable = Command::new("sh")
        .args(["-c", "ulimit -H -n $(( $(ulimit -H -n) + 1 ))"])
        .status()
        .unwrap()
        .success();
    if !raisable {
        assert!(report.contains("cannot raise"), "{report}");
    }
}

#[test]
fn a_target_past_memory_is_refused() {
    let (holds, report) = doctor(1_000_000_000);
    assert!(!holds);
    let memory = report
        .lines()
        .find(|line| line.contains("] memory"))
        .unwrap();
    assert!(memory.starts_with("[SHORT]"), "{report}");
}
