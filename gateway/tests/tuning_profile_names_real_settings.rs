//! The host tuning files name settings this kernel has, and the CPU placement
//! script runs (dry) against a real interface.

use testkit::gateway as support;

use support::{repo, run_script};

use std::path::Path;
use std::process::Command;

#[test]
fn every_sysctl_in_the_profile_exists_and_parses() {
    let profile =
        std::fs::read_to_string(repo().join("tuning/sysctl.d/60-chat-gateway.conf")).unwrap();
    let mut count = 0;
    for line in profile
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
    {
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("`key = value`: {line}"));
        let path = Path::new("/proc/sys").join(key.trim().replace('.', "/"));
        assert!(
            path.exists(),
            "{} is not a sysctl on this kernel",
            key.trim()
        );
        assert!(
            value
                .split_whitespace()
                .all(|word| word.parse::<u64>().is_ok()),
            "{line}"
        );
        count += 1;
    }
    assert!(
        count >= 10,
        "the profile sets the settings the audit checks"
    );
}

#[test]
fn cpu_placement_dry_run_names_what_it_would_change() {
    let report = run_script(
        "tuning/cpu-placement",
        &["--interface", "lo", "--cores", "0", "--dry-run"],
    );
    assert!(
        report.contains("would write 1 > /sys/class/net/lo/queues/rx-0/rps_cpus"),
        "{report}"
    );
    assert!(report.contains("isolcpus="), "{report}");
    let bad = Command::new(repo().join("tuning/cpu-placement"))
        .args(["--interface", "no-such-if", "--cores", "0"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}
