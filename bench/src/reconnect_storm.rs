//! The `reconnect-storm` scenario: N clients connected, then all of them drop
//! their connection and reconnect at once, as after a node failure or an
//! undrained restart.
//!
//! Owns the storm: T threads, each dropping and reopening its share of clients
//! back to back (closed loop: as fast as the gateway answers). Measures the time
//! and rate until every client has its `hello` again, errors by kind, and each
//! client's reconnect latency (drop to `hello`). Bounded by count and time.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::gateway_process::GatewayTarget;
use crate::report::{self, Percentiles};
use crate::wsclient;

#[derive(clap::Args, Debug, Clone)]
pub struct ReconnectStormArgs {
    #[command(flatten)]
    pub gateway: GatewayTarget,
    /// Clients in the storm.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Threads reconnecting concurrently.
    #[arg(long, default_value_t = 8)]
    pub threads: usize,
    /// Rate for the initial connections (before the storm).
    #[arg(long, default_value_t = 8000)]
    pub connect_rate: u64,
    #[arg(long, default_value = "storm")]
    pub user_prefix: String,
    /// JSON summary.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// What one storm thread brings back: its reopened clients, their latencies, errors.
type StormShare = (
    Vec<std::net::TcpStream>,
    hdrhistogram::Histogram<u64>,
    BTreeMap<String, u64>,
);

#[derive(Debug, serde::Serialize)]
pub struct ReconnectStormReport {
    pub connections: usize,
    pub reconnected: usize,
    pub errors: BTreeMap<String, u64>,
    pub storm_seconds: f64,
    pub reconnects_per_s: f64,
    pub reconnect_latency: Percentiles,
    pub environment: serde_json::Value,
}

pub fn run(args: &ReconnectStormArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.connections >= 1 && args.threads >= 1,
        "need 1+ connections and threads"
    );
    let gateway = args.gateway.resolve()?;
    let threads = args.threads.min(args.connections);

    // Phase 1: everyone connected (paced), split across the storm threads.
    let mut shares: Vec<Vec<(usize, std::net::TcpStream)>> =
        (0..threads).map(|_| Vec::new()).collect();
    let interval = Duration::from_secs_f64(1.0 / args.connect_rate.max(1) as f64);
    for index in 0..args.connections {
        let token = args
            .gateway
            .token(&format!("{}{index}", args.user_prefix))?;
        let (stream, _) = wsclient::open(gateway.address, args.gateway.source(index), &token)?;
        shares[index % threads].push((index, stream));
        std::thread::sleep(interval);
    }

    // Phase 2: the storm. Every thread drops and reopens its clients back to back.
    let started = Instant::now();
    let handles: Vec<_> = shares
        .into_iter()
        .map(|share| {
            let args = args.clone();
            let address = gateway.address;
            std::thread::spawn(move || -> anyhow::Result<StormShare> {
                let mut latency = report::new_histogram();
                let mut errors = BTreeMap::new();
                let mut reopened = Vec::with_capacity(share.len());
                let deadline = Instant::now() + Duration::from_secs(300);
                for (index, stream) in share {
                    anyhow::ensure!(Instant::now() < deadline, "storm exceeded its time bound");
                    let dropped = Instant::now();
                    drop(stream);
                    let token = args
                        .gateway
                        .token(&format!("{}{index}", args.user_prefix))?;
                    match wsclient::open(address, args.gateway.source(index), &token) {
                        Ok((stream, _)) => {
                            let _ = latency.record((dropped.elapsed().as_micros() as u64).max(1));
                            reopened.push(stream);
                        }
                        Err(error) => {
                            let kind = error
                                .to_string()
                                .split(':')
                                .next()
                                .unwrap_or("error")
                                .to_owned();
                            *errors.entry(kind).or_insert(0) += 1;
                        }
                    }
                }
                Ok((reopened, latency, errors))
            })
        })
        .collect();
    let mut latency = report::new_histogram();
    let mut errors = BTreeMap::new();
    let mut held = Vec::new();
    for handle in handles {
        let (reopened, part, part_errors) = handle
            .join()
            .map_err(|_| anyhow::anyhow!("storm thread panicked"))??;
        latency.add(&part)?;
        for (kind, count) in part_errors {
            *errors.entry(kind).or_insert(0) += count;
        }
        held.extend(reopened);
    }
    let storm_seconds = started.elapsed().as_secs_f64();
    let report = ReconnectStormReport {
        connections: args.connections,
        reconnected: held.len(),
        errors,
        storm_seconds,
        reconnects_per_s: held.len() as f64 / storm_seconds,
        reconnect_latency: report::percentiles(&latency),
        environment: report::environment(),
    };
    let p = &report.reconnect_latency;
    println!(
        "reconnect-storm: {} of {} clients back in {:.2} s ({:.0}/s), {} threads, errors {:?}",
        report.reconnected,
        report.connections,
        report.storm_seconds,
        report.reconnects_per_s,
        threads,
        report.errors
    );
    println!(
        "  drop-to-hello latency p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        p.p50_us as f64 / 1000.0,
        p.p99_us as f64 / 1000.0,
        p.max_us as f64 / 1000.0
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
