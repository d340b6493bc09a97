//! The writer's Prometheus endpoint (`--metrics-listen`): batch and push
//! counters as text, over a minimal HTTP/1.1 server on its own thread.
//!
//! Owns rendering the counters (`storage_writer_*`) and answering `GET
//! /metrics` (anything else is 404). Reads atomics only; never touches
//! storage, the rings or the push queues.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::push::{PushStats, FAILURES, PROVIDERS};
use crate::stats::Stats;

/// How long one scrape may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

pub fn spawn(address: SocketAddr, stats: Arc<Stats>, push: Option<Arc<PushStats>>) -> Result<()> {
    let listener = TcpListener::bind(address)
        .with_context(|| format!("binding --metrics-listen {address}"))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut stream = stream;
                let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
                // The whole head (up to 1 KiB), so closing never resets a
                // request still arriving.
                let mut request = [0u8; 1024];
                let mut read = 0;
                while read < request.len() && !request[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut request[read..]) {
                        Ok(0) | Err(_) => break,
                        Ok(count) => read += count,
                    }
                }
                let head = String::from_utf8_lossy(&request[..read]);
                let answer = if head.starts_with("GET /metrics ") {
                    let body = render(&stats, push.as_deref());
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
                };
                let _ = stream.write_all(answer.as_bytes());
            }
        })?;
    Ok(())
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

pub fn render(stats: &Stats, push: Option<&PushStats>) -> String {
    let mut out = String::new();
    // Rows of one family (the tables of `expired_total`) follow each other;
    // its HELP and TYPE come once, before the first.
    let mut previous = "";
    for (name, help, value, labels) in [
        ("storage_writer_batches_total", "Batches committed.", &stats.batches, ""),
        ("storage_writer_records_total", "Ring records committed.", &stats.records, ""),
        (
            "storage_writer_commit_failures_total",
            "Attempts at a batch that failed (each is retried with back-off: a full disk, a database away).",
            &stats.commit_failures,
            "",
        ),
        (
            "storage_writer_expired_total",
            "Rows removed after their window, by table.",
            &stats.expired_sends,
            "{table=\"sends\"}",
        ),
        (
            "storage_writer_expired_total",
            "Rows removed after their window, by table.",
            &stats.expired_presence,
            "{table=\"presence\"}",
        ),
        (
            "storage_writer_expired_total",
            "Rows removed after their window, by table.",
            &stats.expired_devices,
            "{table=\"devices\"}",
        ),
        (
            "storage_writer_expired_total",
            "Rows removed after their window, by table.",
            &stats.expired_messages,
            "{table=\"messages\"}",
        ),
        (
            "storage_writer_reclaimed_bytes_total",
            "Bytes given back at once by retention (PostgreSQL: partitions dropped; the embedded store reclaims in compaction).",
            &stats.reclaimed_bytes,
            "",
        ),
        (
            "storage_writer_partitions_created_total",
            "Time partitions created ahead (PostgreSQL).",
            &stats.partitions_created,
            "",
        ),
        (
            "storage_writer_cleanup_runs_total",
            "Cleanup passes made (every --cleanup-interval-s).",
            &stats.cleanup_runs,
            "",
        ),
    ] {
        if name != previous {
            family(&mut out, name, "counter", help);
            previous = name;
        }
        let _ = writeln!(out, "{name}{labels} {}", value.load(Relaxed));
    }
    family(
        &mut out,
        "storage_writer_cleanup_caught_up_unix_seconds",
        "gauge",
        "When a cleanup pass last found nothing old left (0: never); the cleanup's lag is now minus this.",
    );
    let _ = writeln!(
        out,
        "storage_writer_cleanup_caught_up_unix_seconds {}",
        stats.cleanup_caught_up_unix_s.load(Relaxed)
    );
    family(
        &mut out,
        "storage_writer_batch_commit_seconds",
        "histogram",
        "How long each batch took to commit (apply, write, fsync): the writer's share of every `sent`.",
    );
    stats
        .commit_time
        .render(&mut out, "storage_writer_batch_commit_seconds", "");
    let Some(push) = push else {
        return out;
    };
    for (name, help, value) in [
        (
            "storage_writer_push_offered_total",
            "Recipients of durable messages offered to the push worker.",
            &push.offered,
        ),
        (
            "storage_writer_push_dropped_total",
            "Recipients dropped on a full push queue (they sync when they connect).",
            &push.dropped,
        ),
        (
            "storage_writer_push_acknowledged_total",
            "Checks that found the device had the message (no push).",
            &push.acknowledged,
        ),
        (
            "storage_writer_push_coalesced_total",
            "Messages folded into a device's pending push.",
            &push.coalesced,
        ),
    ] {
        family(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", value.load(Relaxed));
    }
    for (name, help, value) in [
        (
            "storage_writer_push_queue_depth",
            "Recipients waiting to be checked.",
            &push.queue_depth,
        ),
        (
            "storage_writer_push_pending",
            "Devices whose push waits for its coalescing window.",
            &push.pending,
        ),
        (
            "storage_writer_push_in_flight",
            "Push requests in flight.",
            &push.in_flight,
        ),
    ] {
        family(&mut out, name, "gauge", help);
        let _ = writeln!(out, "{name} {}", value.load(Relaxed));
    }
    type Field = fn(&crate::push::ProviderStats) -> &std::sync::atomic::AtomicU64;
    let per_provider: [(&str, &str, Field); 3] = [
        (
            "storage_writer_push_sent_total",
            "Pushes the provider accepted.",
            |p| &p.sent,
        ),
        (
            "storage_writer_push_pruned_total",
            "Targets removed because the provider called them invalid.",
            |p| &p.pruned,
        ),
        (
            "storage_writer_push_retries_total",
            "Push requests tried again (429, 5xx, a refreshed credential).",
            |p| &p.retries,
        ),
    ];
    for (name, help, field) in per_provider {
        family(&mut out, name, "counter", help);
        for (index, provider) in PROVIDERS.iter().enumerate() {
            let value = field(&push.providers[index]).load(Relaxed);
            let _ = writeln!(out, "{name}{{provider=\"{provider}\"}} {value}");
        }
    }
    family(
        &mut out,
        "storage_writer_push_failed_total",
        "counter",
        "Pushes that failed, by reason.",
    );
    for (index, provider) in PROVIDERS.iter().enumerate() {
        for (reason_index, (reason, _)) in FAILURES.iter().enumerate() {
            let value = push.providers[index].failed[reason_index].load(Relaxed);
            let _ = writeln!(out, "storage_writer_push_failed_total{{provider=\"{provider}\",reason=\"{reason}\"}} {value}");
        }
    }
    family(
        &mut out,
        "storage_writer_push_latency_seconds",
        "histogram",
        "From a message becoming durable to its push being accepted.",
    );
    for (index, provider) in PROVIDERS.iter().enumerate() {
        push.providers[index].latency.render(
            &mut out,
            "storage_writer_push_latency_seconds",
            &format!("provider=\"{provider}\""),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sample_follows_its_help_and_type() {
        let stats = Stats::default();
        stats.expired_sends.store(3, Relaxed);
        let text = render(&stats, None);
        assert!(
            text.contains("storage_writer_expired_total{table=\"sends\"} 3\n"),
            "{text}"
        );
        for help in text.lines().filter(|line| line.starts_with("# HELP ")) {
            assert_eq!(
                text.matches(&format!("{help}\n")).count(),
                1,
                "{help} twice"
            );
        }
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            let sample = line.split(['{', ' ']).next().unwrap();
            // A histogram's samples are its family's name and a suffix.
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|suffix| sample.strip_suffix(suffix))
                .find(|family| text.contains(&format!("# TYPE {family} histogram")))
                .unwrap_or(sample);
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} has no TYPE"
            );
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no HELP"
            );
        }
    }
}
