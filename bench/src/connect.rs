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
    /// Load-generator processes to spread the connections over (one process
    /// may hold at most RLIMIT_NOFILE sockets; 20,000 on the build machines).
    #[arg(long, default_value_t = 1)]
    pub processes: usize,
    /// Connect with `wss://`, trusting the CA certificate(s) in this PEM file
    /// (the gateway runs with `tls_cert`/`tls_key`).
    #[arg(long)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// The name the TLS client asks for and checks in the certificate.
    #[arg(long, default_value = "localhost")]
    pub tls_name: String,
    /// Internal: run as one of `--processes` workers (open, report, hold until stdin closes).
    #[arg(long, hide = true)]
    pub worker: bool,
}

/// What one process opened.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Opened {
    held: usize,
    errors: usize,
    first_error: Option<String>,
}

/// A connection held open: its socket, or its TLS session over the socket.
enum Held {
    Plain(#[allow(dead_code)] std::net::TcpStream),
    Tls(#[allow(dead_code)] Box<wsclient::TlsStream>),
}

/// Opens `args.connections` connections, paced at `args.rate`.
fn open_connections(
    args: &ConnectArgs,
    target: std::net::SocketAddr,
) -> anyhow::Result<(Vec<Held>, Opened)> {
    let tls = args
        .tls_ca
        .as_deref()
        .map(wsclient::tls_client_config)
        .transpose()
        .context("reading --tls-ca")?;
    let interval = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    let mut held = Vec::with_capacity(args.connections);
    let mut opened = Opened::default();
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
        let source = args.gateway.source(index);
        let result = match &tls {
            None => wsclient::open(target, source, &token).map(|(stream, _)| Held::Plain(stream)),
            Some(config) => {
                wsclient::open_tls(target, source, &token, config.clone(), &args.tls_name)
                    .map(|stream| Held::Tls(Box::new(stream)))
            }
        };
        match result {
            Ok(stream) => held.push(stream),
            Err(error) => {
                opened.errors += 1;
                opened.first_error.get_or_insert(error.to_string());
            }
        }
    }
    opened.held = held.len();
    Ok((held, opened))
}

/// Worker mode: open, print one JSON line, hold until the parent closes stdin.
fn run_worker(args: &ConnectArgs) -> anyhow::Result<()> {
    let (held, opened) = open_connections(args, args.gateway.target)?;
    println!("{}", serde_json::to_string(&opened)?);
    std::io::Write::flush(&mut std::io::stdout())?;
    // Bounded: a parent that never closes stdin still ends the worker.
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(900));
        std::process::exit(3);
    });
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    drop(held);
    Ok(())
}

/// Spreads the connections over `args.processes` worker processes with
/// disjoint users and source addresses; returns them once all have opened.
fn spawn_workers(
    args: &ConnectArgs,
    target: std::net::SocketAddr,
) -> anyhow::Result<(Vec<std::process::Child>, Opened)> {
    use std::io::BufRead;
    let processes = args.processes;
    let mut children = Vec::with_capacity(processes);
    for worker in 0..processes {
        let count =
            args.connections / processes + usize::from(worker < args.connections % processes);
        let child = args
            .gateway
            .worker_command("connect", worker, processes)?
            .args([
                "--target",
                &target.to_string(),
                "--connections",
                &count.to_string(),
            ])
            .args(["--rate", &(args.rate / processes as u64).max(1).to_string()])
            .args(["--user-prefix", &format!("{}{worker}-", args.user_prefix)])
            .args(args.tls_ca.iter().flat_map(|ca| {
                [
                    std::ffi::OsString::from("--tls-ca"),
                    ca.clone().into_os_string(),
                ]
            }))
            .args(["--tls-name", &args.tls_name])
            .spawn()?;
        children.push(child);
    }
    let mut total = Opened::default();
    for child in children.iter_mut() {
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().expect("piped")).read_line(&mut line)?;
        let opened: Opened = serde_json::from_str(line.trim())
            .with_context(|| format!("worker reported {line:?}"))?;
        total.held += opened.held;
        total.errors += opened.errors;
        if total.first_error.is_none() {
            total.first_error = opened.first_error;
        }
    }
    Ok((children, total))
}

#[derive(Debug, Default, serde::Serialize)]
pub struct ConnectReport {
    pub connections_requested: usize,
    pub connections_held: usize,
    pub gateway_processes: usize,
    pub load_generator_processes: usize,
    pub errors: usize,
    pub open_seconds: f64,
    pub open_rate_per_s: f64,
    pub gateway_before: Option<procfs::ProcessMemory>,
    pub gateway_after: Option<procfs::ProcessMemory>,
    pub user_space_bytes_per_connection: Option<f64>,
    pub kernel_tcp_buffer_bytes_per_connection: Option<f64>,
    pub kernel_slab_bytes_per_connection_both_ends: Option<f64>,
    /// The backplane's nats-server (`--backplane`): before and after.
    pub nats_before: Option<procfs::ProcessMemory>,
    pub nats_after: Option<procfs::ProcessMemory>,
}

pub fn run(args: &ConnectArgs) -> anyhow::Result<()> {
    if args.worker {
        return run_worker(args);
    }
    let gateway = args.gateway.resolve()?;
    let before = gateway.memory()?;
    let nats_before = gateway.nats_memory();
    let tcp_pages_before = procfs::tcp_memory_pages().ok();
    let slab_before = procfs::slab_bytes().ok();

    let started = Instant::now();
    let (held, workers, opened) = if args.processes <= 1 {
        let (held, opened) = open_connections(args, gateway.address)?;
        (held, Vec::new(), opened)
    } else {
        let (workers, opened) = spawn_workers(args, gateway.address)?;
        (Vec::new(), workers, opened)
    };
    let open_seconds = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(args.hold_s));

    let after = gateway.memory().context("reading gateway memory")?;
    let errors = opened.errors;
    let first_error = opened.first_error.clone();
    let held_count = opened.held;
    let count = held_count.max(1) as f64;
    let mut report = ConnectReport {
        connections_requested: args.connections,
        connections_held: held_count,
        gateway_processes: gateway.pids.len(),
        load_generator_processes: args.processes.max(1),
        errors,
        open_seconds,
        open_rate_per_s: held_count as f64 / open_seconds,
        gateway_before: before,
        gateway_after: after,
        nats_before,
        nats_after: gateway.nats_memory(),
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
        "connect: {} of {} connections held, {} errors ({} gateway processes, {} load-generator processes)",
        report.connections_held, args.connections, errors, report.gateway_processes, report.load_generator_processes
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
    if let (Some(before), Some(after)) = (report.nats_before, report.nats_after) {
        println!(
            "  backplane nats-server rss {:.1} MiB -> {:.1} MiB",
            before.rss_bytes as f64 / 1048576.0,
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
    for mut worker in workers {
        drop(worker.stdin.take()); // the worker closes its connections and exits
        worker.wait()?;
    }
    Ok(())
}
