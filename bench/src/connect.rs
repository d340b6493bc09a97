//! The `connect` scenario: open and hold N authenticated WebSockets.
//!
//! Owns pacing (a fixed open rate), spreading source addresses over
//! 127.0.0.x so more than one address's ephemeral ports are available, and
//! the before/after memory readings of the gateway process. Connections are
//! opened with blocking sockets by a few threads; the scenario measures the
//! server, not the client's speed. Every loop is bounded by count and time.

use std::time::{Duration, Instant};

use anyhow::Context;

use crate::gateway_process::GatewayTarget;
use crate::{procfs, wsclient};

#[derive(clap::Args, Debug, Clone)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub gateway: GatewayTarget,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Connections opened per second (paced).
    #[arg(long, default_value_t = 2000)]
    pub rate: u64,
    /// Seconds to hold every connection once all are open.
    #[arg(long, default_value_t = 5)]
    pub hold_s: u64,
    /// Prefix of the generated user ids.
    #[arg(long, default_value = "bench")]
    pub user_prefix: String,
    /// Write a JSON summary here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct ConnectReport {
    pub connections_requested: usize,
    pub connections_held: usize,
    pub errors: usize,
    pub open_seconds: f64,
    pub open_rate_per_s: f64,
    pub gateway_before: Option<procfs::ProcessMemory>,
    pub gateway_after: Option<procfs::ProcessMemory>,
    pub user_space_bytes_per_connection: Option<f64>,
    pub kernel_tcp_buffer_bytes_per_connection: Option<f64>,
    pub kernel_slab_bytes_per_connection_both_ends: Option<f64>,
}

pub fn run(args: &ConnectArgs) -> anyhow::Result<()> {
    let gateway = args.gateway.resolve()?;
    let (target, gateway_pid) = (gateway.address, gateway.pid);
    let before = gateway_pid.map(procfs::process_memory).transpose()?;
    let tcp_pages_before = procfs::tcp_memory_pages().ok();
    let slab_before = procfs::slab_bytes().ok();

    let interval = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    let mut held = Vec::with_capacity(args.connections);
    let mut errors = 0usize;
    let mut first_error = None;
    for index in 0..args.connections {
        let due = started + interval.mul_f64(index as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if Instant::now() > deadline {
            break;
        }
        let token = args
            .gateway
            .token(&format!("{}{index}", args.user_prefix))?;
        match wsclient::open(target, args.gateway.source(index), &token) {
            Ok((stream, _)) => held.push(stream),
            Err(error) => {
                errors += 1;
                first_error.get_or_insert(error.to_string());
            }
        }
    }
    let open_seconds = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(args.hold_s));

    let after = gateway_pid
        .map(procfs::process_memory)
        .transpose()
        .context("reading gateway memory")?;
    let count = held.len().max(1) as f64;
    let mut report = ConnectReport {
        connections_requested: args.connections,
        connections_held: held.len(),
        errors,
        open_seconds,
        open_rate_per_s: held.len() as f64 / open_seconds,
        gateway_before: before,
        gateway_after: after,
        ..ConnectReport::default()
    };
    if let (Some(before), Some(after)) = (before, after) {
        report.user_space_bytes_per_connection =
            Some((after.anonymous_bytes as f64 - before.anonymous_bytes as f64) / count);
    }
    if let (Some(before), Ok(after)) = (tcp_pages_before, procfs::tcp_memory_pages()) {
        report.kernel_tcp_buffer_bytes_per_connection =
            Some((after as f64 - before as f64) * 4096.0 / count);
    }
    if let (Some(before), Ok(after)) = (slab_before, procfs::slab_bytes()) {
        report.kernel_slab_bytes_per_connection_both_ends =
            Some((after as f64 - before as f64) / count);
    }

    println!(
        "connect: {} of {} connections held, {} errors",
        report.connections_held, args.connections, errors
    );
    if let Some(error) = first_error {
        println!("  first error: {error}");
    }
    println!(
        "  opened in {:.2} s ({:.0}/s)",
        report.open_seconds, report.open_rate_per_s
    );
    if let (Some(before), Some(after)) = (before, after) {
        println!(
            "  gateway anonymous memory {:.1} MiB -> {:.1} MiB (rss {:.1} MiB)",
            before.anonymous_bytes as f64 / 1048576.0,
            after.anonymous_bytes as f64 / 1048576.0,
            after.rss_bytes as f64 / 1048576.0
        );
    }
    if let Some(bytes) = report.user_space_bytes_per_connection {
        println!("  user-space bytes per idle connection: {bytes:.0}");
    }
    if let Some(bytes) = report.kernel_slab_bytes_per_connection_both_ends {
        println!("  kernel slab bytes per connection (both socket ends, machine-wide): {bytes:.0}");
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    drop(held);
    Ok(())
}
