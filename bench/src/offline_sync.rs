//! The `offline-sync` scenario: messages pile up for users who are offline,
//! then those users connect and drain their backlog through the connect-time sync.
//!
//! Owns both phases. Phase 1: one sender per recipient sends `--messages`
//! each, paced at a fixed total rate, and waits for every `sent` (durable).
//! Phase 2: `--threads` threads connect the recipients and read until
//! `synced`, checking that each backlog arrives complete, once and in order.
//! Reports the drain's wall time and messages/s, each recipient's
//! connect-to-`synced` latency, and the gateway's CPU. Bounded by count and time.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::gateway_process::GatewayTarget;
use crate::report::{self, Percentiles};
use crate::wsclient;

/// Longest any phase may take.
const PHASE_LIMIT: Duration = Duration::from_secs(600);

#[derive(clap::Args, Debug, Clone)]
pub struct OfflineSyncArgs {
    #[command(flatten)]
    pub gateway: GatewayTarget,
    /// Offline recipients (each has its own sender).
    #[arg(long, default_value_t = 1000)]
    pub users: usize,
    /// Messages waiting for each recipient (1-1000).
    #[arg(long, default_value_t = 50)]
    pub messages: usize,
    /// Total send rate in phase 1, messages/s (keep it under 20 per sender,
    /// the gateway's default per-user send rate).
    #[arg(long, default_value_t = 5000)]
    pub send_rate: u64,
    /// Bytes of each message body.
    #[arg(long, default_value_t = 100)]
    pub body_bytes: usize,
    /// Threads connecting recipients in phase 2.
    #[arg(long, default_value_t = 8)]
    pub threads: usize,
    #[arg(long, default_value = "osync")]
    pub user_prefix: String,
    /// JSON summary.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct DrainCheck {
    pub messages: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct OfflineSyncReport {
    pub users: usize,
    pub messages_per_user: usize,
    pub sent: u64,
    pub acknowledged: u64,
    pub send_seconds: f64,
    pub drain_seconds: f64,
    pub drained_per_s: f64,
    pub check: DrainCheck,
    pub connect_to_synced: Percentiles,
    pub gateway_cpu_seconds_drain: Option<f64>,
    pub environment: serde_json::Value,
}

fn sender(prefix: &str, index: usize) -> String {
    format!("{prefix}-s{index}")
}

fn recipient(prefix: &str, index: usize) -> String {
    format!("{prefix}-r{index}")
}

/// Reads server frames until `stop` says so; calls `each` with every text frame.
pub fn read_frames(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    deadline: Instant,
    mut each: impl FnMut(&[u8]) -> bool,
) -> anyhow::Result<()> {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let mut used = 0;
        let mut done = false;
        while let Some((frame, length)) = wsclient::decode(&buffer[used..]) {
            used += length;
            match frame {
                wsclient::ServerFrame::Text(text) if each(text) => {
                    done = true;
                    break;
                }
                wsclient::ServerFrame::Close(code) => anyhow::bail!("closed ({code:?})"),
                _ => {}
            }
        }
        buffer.drain(..used);
        if done {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "no answer within the time bound");
        let read = stream.read(&mut chunk)?;
        anyhow::ensure!(read > 0, "connection closed");
        buffer.extend_from_slice(&chunk[..read]);
    }
}

#[derive(serde::Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    body: Option<&'a str>,
}

pub fn run(args: &OfflineSyncArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.users >= 1 && (1..=1000).contains(&args.messages) && args.threads >= 1,
        "need 1+ users, 1-1000 messages each, 1+ threads"
    );
    let gateway = args.gateway.resolve()?;
    let prefix = &args.user_prefix;

    // Phase 1: senders connect and send, paced; then every `sent` is awaited.
    let mut senders = Vec::with_capacity(args.users);
    for index in 0..args.users {
        let token = args.gateway.token(&sender(prefix, index))?;
        let (stream, rest) = wsclient::open(gateway.address, args.gateway.source(index), &token)?;
        senders.push((stream, rest));
    }
    let padding = "x".repeat(args.body_bytes.saturating_sub(24));
    let total = args.users * args.messages;
    let interval = Duration::from_secs_f64(1.0 / args.send_rate.max(1) as f64);
    let started = Instant::now();
    let mut frame = Vec::with_capacity(256 + args.body_bytes);
    for sequence in 0..total {
        let due = started + interval * sequence as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        anyhow::ensure!(
            started.elapsed() < PHASE_LIMIT,
            "send phase exceeded its bound"
        );
        let (user, number) = (sequence % args.users, sequence / args.users);
        let json = serde_json::json!({
            "type": "send",
            "id": format!("o{number}"),
            "to": recipient(prefix, user),
            "body": format!("{number}:{padding}"),
        })
        .to_string();
        frame.clear();
        wsclient::encode_text(json.as_bytes(), &mut frame);
        senders[user].0.write_all(&frame)?;
    }
    let mut acknowledged = 0u64;
    let deadline = Instant::now() + PHASE_LIMIT;
    for (stream, rest) in &mut senders {
        let mut count = 0;
        read_frames(stream, rest, deadline, |text| {
            if text.starts_with(br#"{"type":"sent""#) {
                count += 1;
            }
            count == args.messages
        })?;
        acknowledged += count as u64;
    }
    let send_seconds = started.elapsed().as_secs_f64();
    drop(senders);

    // Phase 2: every recipient connects and drains its backlog.
    let cpu_before = gateway_cpu(&gateway.pids);
    let drain_started = Instant::now();
    let threads = args.threads.min(args.users);
    let handles: Vec<_> = (0..threads)
        .map(|thread| {
            let args = args.clone();
            let address = gateway.address;
            std::thread::spawn(
                move || -> anyhow::Result<(DrainCheck, hdrhistogram::Histogram<u64>)> {
                    let mut check = DrainCheck::default();
                    let mut latency = report::new_histogram();
                    let deadline = Instant::now() + PHASE_LIMIT;
                    for user in (thread..args.users).step_by(threads) {
                        let token = args.gateway.token(&recipient(&args.user_prefix, user))?;
                        let connected = Instant::now();
                        let (mut stream, mut rest) =
                            wsclient::open(address, args.gateway.source(user), &token)?;
                        let mut seen = vec![0u32; args.messages];
                        let mut next = 0usize;
                        read_frames(&mut stream, &mut rest, deadline, |text| {
                            let Ok(frame) = serde_json::from_slice::<Frame<'_>>(text) else {
                                return false;
                            };
                            match frame.kind {
                                "message" => {
                                    let number = frame
                                        .body
                                        .and_then(|b| b.split(':').next())
                                        .and_then(|n| n.parse::<usize>().ok());
                                    if let Some(number) = number.filter(|n| *n < seen.len()) {
                                        seen[number] += 1;
                                        if number != next {
                                            check.out_of_order += 1;
                                        }
                                        next = number + 1;
                                    }
                                    check.messages += 1;
                                    false
                                }
                                "synced" => true,
                                _ => false,
                            }
                        })?;
                        let _ = latency.record((connected.elapsed().as_micros() as u64).max(1));
                        check.missing += seen.iter().filter(|c| **c == 0).count() as u64;
                        check.duplicates +=
                            seen.iter().map(|c| c.saturating_sub(1) as u64).sum::<u64>();
                    }
                    Ok((check, latency))
                },
            )
        })
        .collect();
    let mut check = DrainCheck::default();
    let mut latency = report::new_histogram();
    for handle in handles {
        let (part, part_latency) = handle
            .join()
            .map_err(|_| anyhow::anyhow!("drain thread panicked"))??;
        check.messages += part.messages;
        check.missing += part.missing;
        check.duplicates += part.duplicates;
        check.out_of_order += part.out_of_order;
        latency.add(&part_latency)?;
    }
    let drain_seconds = drain_started.elapsed().as_secs_f64();
    let cpu_after = gateway_cpu(&gateway.pids);

    let report = OfflineSyncReport {
        users: args.users,
        messages_per_user: args.messages,
        sent: total as u64,
        acknowledged,
        send_seconds,
        drain_seconds,
        drained_per_s: check.messages as f64 / drain_seconds,
        connect_to_synced: report::percentiles(&latency),
        gateway_cpu_seconds_drain: cpu_before.zip(cpu_after).map(|(a, b)| b - a),
        check,
        environment: report::environment(),
    };
    let p = &report.connect_to_synced;
    println!(
        "offline-sync: {} users x {} messages; sent {} (acknowledged {}) in {:.2} s",
        report.users,
        report.messages_per_user,
        report.sent,
        report.acknowledged,
        report.send_seconds
    );
    println!(
        "  drain: {} messages in {:.2} s ({:.0}/s), missing {}, duplicates {}, out of order {}",
        report.check.messages,
        report.drain_seconds,
        report.drained_per_s,
        report.check.missing,
        report.check.duplicates,
        report.check.out_of_order
    );
    println!(
        "  connect-to-synced per user: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; gateway CPU in drain {}",
        p.p50_us as f64 / 1000.0,
        p.p99_us as f64 / 1000.0,
        p.max_us as f64 / 1000.0,
        report
            .gateway_cpu_seconds_drain
            .map_or("unknown".to_owned(), |s| format!("{s:.2} s"))
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

/// Summed CPU seconds of the gateway processes (and, when spawned, their writers).
fn gateway_cpu(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter()
        .map(|pid| crate::procfs::process_tree_cpu_seconds(*pid).ok())
        .sum()
}
