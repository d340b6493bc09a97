//! The `one-to-one` scenario: N users, one device each, sending 1:1 messages
//! between random pairs at a fixed open-loop rate.
//!
//! Owns the worker loop: each worker thread drives its share of connections
//! with one epoll (mio), sends on the open-loop schedule (late sends are
//! counted, never skipped), and records two latencies from each send's
//! *intended* time: delivery (to the recipient's `message`) and
//! acknowledgement (to the sender's `sent`). Warm-up is excluded. Every loop
//! is bounded by count and time. `--peer nats-ws` runs the same schedule
//! against nats-server's WebSocket listener; `--compare` runs both and prints
//! the ratios.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};

use anyhow::Context;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::clock::monotonic_ns;
use crate::gateway_process::GatewayTarget;
use crate::nats_peer::{self, NatsEvent, NatsServer};
use crate::procfs::ServerCpu;
use crate::report::{self, Percentiles};
use crate::schedule::OpenLoop;
use crate::timer::SendTimer;
use crate::{nonblocking, procfs, wsclient};

#[derive(clap::Args, Debug, Clone)]
pub struct OneToOneArgs {
    #[command(flatten)]
    pub gateway: GatewayTarget,
    /// Users (one connection each).
    #[arg(long, default_value_t = 1000)]
    pub users: usize,
    /// Messages per second, across all users (open loop).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Measured seconds, after the warm-up.
    #[arg(long, default_value_t = 10)]
    pub duration_s: u64,
    /// Seconds sent at the full rate before measuring starts.
    #[arg(long, default_value_t = 2)]
    pub warmup_s: u64,
    /// Worker threads driving the connections.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Bytes of each message body.
    #[arg(long, default_value_t = 100)]
    pub body_bytes: usize,
    /// Connections opened per second while setting up.
    #[arg(long, default_value_t = 8000)]
    pub connect_rate: u64,
    #[arg(long, default_value = "o2o")]
    pub user_prefix: String,
    /// JSON summary.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Writes PREFIX-delivery.hgrm and PREFIX-ack.hgrm.
    #[arg(long)]
    pub hgrm_prefix: Option<String>,
    /// Latency-by-percentile plot.
    #[arg(long)]
    pub svg: Option<std::path::PathBuf>,
    /// Samples the resident memory of the gateway and of its storage-writer
    /// every this many seconds from the first send to the end (a soak; 0:
    /// not sampled). Single bench process only.
    #[arg(long, default_value_t = 0)]
    pub rss_every_s: u64,
    /// Plots those samples (SVG).
    #[arg(long)]
    pub rss_svg: Option<std::path::PathBuf>,
    /// What to measure: our gateway, or nats-server's WebSocket listener.
    #[arg(long, value_enum, default_value = "gateway")]
    pub peer: Peer,
    /// Run the gateway and then nats-server with the same schedule and print the ratios.
    #[arg(long)]
    pub compare: bool,
    /// The nats-server binary (Debian's `nats-server` package).
    #[arg(long, default_value = "nats-server")]
    pub nats_server: String,
    /// Load-generator processes (each drives users/N clients; one process may
    /// hold at most RLIMIT_NOFILE sockets). Histograms are merged exactly.
    #[arg(long, default_value_t = 1)]
    pub processes: usize,
    /// Internal: run as a worker process of `--processes` for users
    /// `--user-offset` .. `--user-offset + --user-count` (of `--users` in all).
    #[arg(long, hide = true)]
    pub worker: bool,
    #[arg(long, hide = true, default_value_t = 0)]
    pub user_offset: usize,
    #[arg(long, hide = true)]
    pub user_count: Option<usize>,
}

/// The server under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Peer {
    Gateway,
    NatsWs,
}

/// A send later than this after its intended time counts as late.
const LATE_SEND_NS: u64 = 1_000_000;
/// After the last send, how long workers wait for deliveries and acks.
const DRAIN_GRACE_NS: u64 = 3_000_000_000;
/// Each client pings this often (the protocol's 30 s heartbeat interval), at
/// its own phase: pings are an open-loop schedule of their own, spread evenly,
/// never a burst (a burst of 18,000 pings once measured as a 259 ms p99).
const PING_INTERVAL_NS: u64 = 30_000_000_000;

const TIMER_TOKEN: Token = Token(usize::MAX);

struct Conn {
    stream: TcpStream,
    user_index: usize,
    input: Vec<u8>,
    output: Vec<u8>,
    /// NATS protocol bytes carried by WebSocket frames (nats-ws only).
    nats: Vec<u8>,
}

#[derive(Default)]
struct WorkerResult {
    delivery: Option<Histogram<u64>>,
    ack: Option<Histogram<u64>>,
    ack_from_write: Option<Histogram<u64>>,
    sent: u64,
    late_sends: u64,
    errors: BTreeMap<String, u64>,
    closes: u64,
}

struct Shared {
    peer: Peer,
    /// True when this process sees every delivery of the run, so it may stop
    /// as soon as all arrived; a worker process (which sees only its users')
    /// always waits out the drain grace.
    complete_view: bool,
    users: usize,
    start_ns: u64,
    measure_from_ns: u64,
    end_ns: u64,
    total_sends: u64,
    delivered: AtomicU64,
    acked: AtomicU64,
}

impl Shared {
    /// Whether a send intended at `intended_ns` is in the measured window.
    fn measures(&self, intended_ns: u64) -> bool {
        intended_ns >= self.measure_from_ns && intended_ns < self.end_ns
    }
}

#[derive(Debug, serde::Serialize)]
pub struct OneToOneReport {
    pub peer: Peer,
    pub users: usize,
    pub connections_held: usize,
    pub rate_per_s: f64,
    pub measured_s: u64,
    pub sent: u64,
    pub late_sends: u64,
    pub delivered_total: u64,
    pub acked_total: u64,
    pub delivery: Percentiles,
    pub ack: Percentiles,
    /// `sent` latency from the moment the load generator wrote the send,
    /// not from its intended time: the server's share, without the
    /// generator's own lateness (which `ack` includes, as it should).
    pub ack_from_write: Percentiles,
    pub delivered_per_s_measured: f64,
    pub server_cpu_s: Option<f64>,
    /// The server's own process, without its children (for the gateway, the
    /// rest of `server_cpu_s` is its storage-writer).
    pub server_process_cpu_s: Option<f64>,
    pub delivered_per_server_cpu_s: Option<f64>,
    pub bench_cpu_s: Option<f64>,
    pub errors: BTreeMap<String, u64>,
    pub closes: u64,
    /// `--rss-every-s`: resident memory over the run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rss_samples: Vec<RssSample>,
    pub environment: serde_json::Value,
}

/// The servers' resident memory at one moment of a run.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct RssSample {
    /// Seconds since the first send.
    pub t_s: f64,
    pub gateway_bytes: u64,
    /// The gateway's children (its storage-writer).
    pub writer_bytes: u64,
}

pub fn run(args: &OneToOneArgs) -> anyhow::Result<()> {
    if args.worker {
        return run_worker(args);
    }
    anyhow::ensure!(
        args.users >= 2 && args.threads >= 1 && args.rate > 0.0,
        "need 2+ users, 1+ threads, a positive rate"
    );
    let peers: &[Peer] = if args.compare {
        &[Peer::Gateway, Peer::NatsWs]
    } else {
        std::slice::from_ref(&args.peer)
    };
    let mut runs = Vec::new();
    for &peer in peers {
        let (report, delivery, ack) = run_one(args, peer)?;
        print_table(&report);
        if let Some(prefix) = &args.hgrm_prefix {
            let name = if args.compare {
                format!("{prefix}-{peer:?}").to_lowercase()
            } else {
                prefix.clone()
            };
            std::fs::write(format!("{name}-delivery.hgrm"), report::hgrm(&delivery))?;
            if peer == Peer::Gateway {
                std::fs::write(format!("{name}-ack.hgrm"), report::hgrm(&ack))?;
            }
        }
        runs.push((report, delivery, ack));
    }
    let ratios = args.compare.then(|| compare(&runs[0].0, &runs[1].0));
    if let Some(path) = &args.json {
        let reports: Vec<&OneToOneReport> = runs.iter().map(|(report, _, _)| report).collect();
        let json = match &ratios {
            Some(ratios) => serde_json::json!({ "runs": reports, "ratios": ratios }),
            None => serde_json::to_value(reports[0])?,
        };
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    if let Some(path) = &args.svg {
        let title = format!(
            "one-to-one: {} users, {} msgs/s, {} B bodies",
            args.users, args.rate, args.body_bytes
        );
        let mut series: Vec<(&str, &Histogram<u64>)> = Vec::new();
        for (report, delivery, ack) in &runs {
            match report.peer {
                Peer::Gateway => {
                    series.push(("gateway delivery", delivery));
                    series.push(("gateway ack (sent)", ack));
                }
                Peer::NatsWs => series.push(("nats-server ws delivery", delivery)),
            }
        }
        std::fs::write(path, report::svg(&title, &series))?;
    }
    if let Some(path) = &args.rss_svg {
        let samples = &runs[0].0.rss_samples;
        anyhow::ensure!(!samples.is_empty(), "--rss-svg needs --rss-every-s");
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        let gateway: Vec<(f64, f64)> = samples
            .iter()
            .map(|s| (s.t_s, mib(s.gateway_bytes)))
            .collect();
        let writer: Vec<(f64, f64)> = samples
            .iter()
            .map(|s| (s.t_s, mib(s.writer_bytes)))
            .collect();
        let title = format!(
            "resident memory: {} users, {} msgs/s, {} s",
            args.users,
            args.rate,
            args.warmup_s + args.duration_s
        );
        let series = [
            ("gateway", gateway.as_slice()),
            ("storage-writer", writer.as_slice()),
        ];
        std::fs::write(path, report::line_svg(&title, "MiB", &series))?;
    }
    Ok(())
}

/// Gateway over nats-server: delivered msgs per server CPU-second, p50, p99.
fn compare(gateway: &OneToOneReport, nats: &OneToOneReport) -> serde_json::Value {
    let ratio =
        |a: Option<f64>, b: Option<f64>| a.zip(b).filter(|(_, b)| *b > 0.0).map(|(a, b)| a / b);
    let per_cpu = ratio(
        gateway.delivered_per_server_cpu_s,
        nats.delivered_per_server_cpu_s,
    );
    let p50 = ratio(
        Some(nats.delivery.p50_us as f64),
        Some(gateway.delivery.p50_us as f64),
    );
    let p99 = ratio(
        Some(nats.delivery.p99_us as f64),
        Some(gateway.delivery.p99_us as f64),
    );
    let show = |value: Option<f64>| value.map_or("n/a".to_owned(), |v| format!("{v:.2}x"));
    println!("compare (gateway relative to nats-server, higher is better for the gateway):");
    println!("  delivered msgs per server CPU-second: {}", show(per_cpu));
    println!("  delivery p50 (nats / gateway):        {}", show(p50));
    println!("  delivery p99 (nats / gateway):        {}", show(p99));
    serde_json::json!({
        "delivered_per_server_cpu_s_gateway_over_nats": per_cpu,
        "p50_nats_over_gateway": p50,
        "p99_nats_over_gateway": p99,
    })
}

/// One run against `peer`; returns its report and histograms.
fn run_one(
    args: &OneToOneArgs,
    peer: Peer,
) -> anyhow::Result<(OneToOneReport, Histogram<u64>, Histogram<u64>)> {
    // The server under test, held until the run ends.
    let (address, server_pids, _server): (std::net::SocketAddr, Vec<u32>, Box<dyn std::any::Any>) =
        match peer {
            Peer::Gateway => {
                let gateway = args.gateway.resolve()?;
                (gateway.address, gateway.pids.clone(), Box::new(gateway))
            }
            Peer::NatsWs => {
                let nats = NatsServer::start(&args.nats_server)?;
                (nats.websocket, vec![nats.pid()], Box::new(nats))
            }
        };
    let server_cpu = || ServerCpu::of(&server_pids);

    let mut rss_samples = Vec::new();
    let (totals, server_cpu_s) = if args.processes > 1 {
        run_in_processes(args, peer, address, &server_cpu)?
    } else {
        let per_thread = connect_users(args, peer, address, 0..args.users)?;
        let phase = Phase::starting_soon(args);
        let running = spawn_threads(args, peer, per_thread, &phase)?;
        let every = (args.rss_every_s > 0 && peer == Peer::Gateway)
            .then(|| Duration::from_secs(args.rss_every_s));
        let (server_cpu_s, samples) = sample_server(&phase, &server_cpu, &server_pids, every);
        rss_samples = samples;
        (running.join()?, server_cpu_s)
    };
    let Totals {
        delivery,
        ack,
        ack_from_write,
        sent,
        late_sends,
        delivered,
        acked,
        closes,
        errors,
        connections_held,
        bench_cpu_s,
    } = totals;
    let delivery = histogram_from(&delivery)?;
    let ack = histogram_from(&ack)?;
    let ack_from_write = histogram_from(&ack_from_write)?;
    let result = WorkerResult {
        sent,
        late_sends,
        errors,
        closes,
        ..WorkerResult::default()
    };
    let measured_deliveries = delivery.len();
    let report = OneToOneReport {
        peer,
        users: args.users,
        connections_held,
        rate_per_s: args.rate,
        measured_s: args.duration_s,
        sent: result.sent,
        late_sends: result.late_sends,
        delivered_total: delivered,
        acked_total: acked,
        delivery: report::percentiles(&delivery),
        ack: report::percentiles(&ack),
        ack_from_write: report::percentiles(&ack_from_write),
        delivered_per_s_measured: measured_deliveries as f64 / args.duration_s as f64,
        server_cpu_s: server_cpu_s.map(|cpu| cpu.tree_s),
        server_process_cpu_s: server_cpu_s.map(|cpu| cpu.process_s),
        delivered_per_server_cpu_s: server_cpu_s
            .filter(|cpu| cpu.tree_s > 0.0)
            .map(|cpu| measured_deliveries as f64 / cpu.tree_s),
        bench_cpu_s,
        errors: result.errors,
        closes: result.closes,
        rss_samples,
        environment: report::environment(),
    };
    Ok((report, delivery, ack))
}

/// When a run's sends are scheduled (CLOCK_MONOTONIC, shared by every process).
struct Phase {
    start_ns: u64,
    measure_from_ns: u64,
    end_ns: u64,
}

impl Phase {
    fn starting_at(args: &OneToOneArgs, start_ns: u64) -> Self {
        let measure_from_ns = start_ns + args.warmup_s * 1_000_000_000;
        Phase {
            start_ns,
            measure_from_ns,
            end_ns: measure_from_ns + args.duration_s * 1_000_000_000,
        }
    }

    fn starting_soon(args: &OneToOneArgs) -> Self {
        Self::starting_at(args, monotonic_ns() + 300_000_000)
    }
}

/// What one process measured; histograms as exact (value, count) pairs so
/// worker processes can hand them to the parent.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Totals {
    delivery: Vec<(u64, u64)>,
    ack: Vec<(u64, u64)>,
    #[serde(default)]
    ack_from_write: Vec<(u64, u64)>,
    sent: u64,
    late_sends: u64,
    delivered: u64,
    acked: u64,
    closes: u64,
    errors: BTreeMap<String, u64>,
    connections_held: usize,
    bench_cpu_s: Option<f64>,
}

impl Totals {
    fn add(&mut self, other: Totals) {
        self.delivery.extend(other.delivery);
        self.ack.extend(other.ack);
        self.ack_from_write.extend(other.ack_from_write);
        self.sent += other.sent;
        self.late_sends += other.late_sends;
        self.delivered += other.delivered;
        self.acked += other.acked;
        self.closes += other.closes;
        for (code, count) in other.errors {
            *self.errors.entry(code).or_default() += count;
        }
        self.connections_held += other.connections_held;
        self.bench_cpu_s = match (self.bench_cpu_s, other.bench_cpu_s) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
    }
}

fn pairs_of(histogram: &Histogram<u64>) -> Vec<(u64, u64)> {
    histogram
        .iter_recorded()
        .map(|step| (step.value_iterated_to(), step.count_at_value()))
        .collect()
}

fn histogram_from(pairs: &[(u64, u64)]) -> anyhow::Result<Histogram<u64>> {
    let mut histogram = report::new_histogram();
    for &(value, count) in pairs {
        histogram.record_n(value, count)?;
    }
    Ok(histogram)
}

/// Connects users `range` (global indices), paced, spread over the threads.
fn connect_users(
    args: &OneToOneArgs,
    peer: Peer,
    address: std::net::SocketAddr,
    range: std::ops::Range<usize>,
) -> anyhow::Result<Vec<Vec<Conn>>> {
    let mut per_thread: Vec<Vec<Conn>> = (0..args.threads).map(|_| Vec::new()).collect();
    let connect_interval = Duration::from_secs_f64(1.0 / args.connect_rate.max(1) as f64);
    for (slot, user_index) in range.enumerate() {
        let user = format!("{}{user_index}", args.user_prefix);
        let source = args.gateway.source(slot);
        let (stream, rest) = match peer {
            Peer::Gateway => wsclient::open(address, source, &args.gateway.token(&user)?)?,
            Peer::NatsWs => nats_peer::open(address, source, &user)?,
        };
        stream.set_nonblocking(true)?;
        per_thread[slot % args.threads].push(Conn {
            stream: TcpStream::from_std(stream),
            user_index,
            input: rest,
            output: Vec::new(),
            nats: Vec::new(),
        });
        std::thread::sleep(connect_interval);
    }
    Ok(per_thread)
}

/// This process's worker threads, running.
struct Running {
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<anyhow::Result<WorkerResult>>>,
    connections_held: usize,
    bench_cpu_before: Option<f64>,
}

/// Starts one thread per connection group on `phase`'s schedule. This process
/// sends `args.rate` (its share when it is one of several).
fn spawn_threads(
    args: &OneToOneArgs,
    peer: Peer,
    per_thread: Vec<Vec<Conn>>,
    phase: &Phase,
) -> anyhow::Result<Running> {
    // A worker process sees only its own users' deliveries.
    let complete_view = !args.worker;
    let total_sends = (args.rate * (args.warmup_s + args.duration_s) as f64) as u64;
    let connections_held = per_thread.iter().map(Vec::len).sum();
    let shared = Arc::new(Shared {
        peer,
        complete_view,
        users: args.users,
        start_ns: phase.start_ns,
        measure_from_ns: phase.measure_from_ns,
        end_ns: phase.end_ns,
        total_sends,
        delivered: AtomicU64::new(0),
        acked: AtomicU64::new(0),
    });
    let bench_cpu_before = procfs::process_cpu_seconds(std::process::id()).ok();
    let threads = per_thread
        .into_iter()
        .enumerate()
        .map(|(index, conns)| {
            let shared = shared.clone();
            let args = args.clone();
            let share = total_sends / args.threads as u64
                + u64::from((index as u64) < total_sends % args.threads as u64);
            std::thread::spawn(move || worker(conns, &shared, &args, share))
        })
        .collect();
    Ok(Running {
        shared,
        threads,
        connections_held,
        bench_cpu_before,
    })
}

impl Running {
    fn join(self) -> anyhow::Result<Totals> {
        let mut delivery = report::new_histogram();
        let mut ack = report::new_histogram();
        let mut ack_from_write = report::new_histogram();
        let mut totals = Totals {
            connections_held: self.connections_held,
            ..Totals::default()
        };
        for thread in self.threads {
            let part = thread
                .join()
                .map_err(|_| anyhow::anyhow!("worker panicked"))??;
            delivery.add(part.delivery.as_ref().expect("set"))?;
            ack.add(part.ack.as_ref().expect("set"))?;
            ack_from_write.add(part.ack_from_write.as_ref().expect("set"))?;
            totals.sent += part.sent;
            totals.late_sends += part.late_sends;
            totals.closes += part.closes;
            for (code, count) in part.errors {
                *totals.errors.entry(code).or_default() += count;
            }
        }
        totals.delivery = pairs_of(&delivery);
        totals.ack = pairs_of(&ack);
        totals.ack_from_write = pairs_of(&ack_from_write);
        totals.delivered = self.shared.delivered.load(Relaxed);
        totals.acked = self.shared.acked.load(Relaxed);
        totals.bench_cpu_s = self.bench_cpu_before.and_then(|before| {
            procfs::process_cpu_seconds(std::process::id())
                .ok()
                .map(|after| after - before)
        });
        Ok(totals)
    }
}

/// The servers' CPU seconds over the measured window, and (with `rss_every`)
/// their resident memory from the first send to the end.
fn sample_server(
    phase: &Phase,
    server_cpu: &dyn Fn() -> Option<ServerCpu>,
    pids: &[u32],
    rss_every: Option<Duration>,
) -> (Option<ServerCpu>, Vec<RssSample>) {
    let sleep_until = |target_ns: u64| {
        let now = monotonic_ns();
        if target_ns > now {
            std::thread::sleep(Duration::from_nanos(target_ns - now));
        }
    };
    let mut samples = Vec::new();
    let mut sample_at = |at_ns: u64| {
        sleep_until(at_ns);
        let rss = |pid: u32| procfs::process_memory(pid).map_or(0, |m| m.rss_bytes);
        samples.push(RssSample {
            t_s: at_ns.saturating_sub(phase.start_ns) as f64 / 1e9,
            gateway_bytes: pids.iter().map(|pid| rss(*pid)).sum(),
            writer_bytes: pids
                .iter()
                .flat_map(|pid| procfs::children(*pid))
                .map(rss)
                .sum(),
        });
    };
    let mut start = None;
    let mut measured = false;
    let step = rss_every.map(|every| every.as_nanos() as u64);
    let mut next = phase.start_ns;
    loop {
        let sample_due = step.is_some() && next <= phase.end_ns;
        if !measured && (!sample_due || phase.measure_from_ns <= next) {
            sleep_until(phase.measure_from_ns);
            start = server_cpu();
            measured = true;
        }
        if !sample_due {
            break;
        }
        sample_at(next);
        next += step.expect("sampling");
    }
    sleep_until(phase.end_ns);
    let end = server_cpu();
    (start.zip(end).map(|(start, end)| end.since(start)), samples)
}

/// Worker-process mode: connect this worker's users, say so, wait for the
/// shared start time on stdin, run, and print the totals as one JSON line.
pub fn run_worker(args: &OneToOneArgs) -> anyhow::Result<()> {
    use std::io::BufRead;
    let count = args
        .user_count
        .context("--user-count is required with --worker")?;
    let per_thread = connect_users(
        args,
        args.peer,
        args.gateway.target,
        args.user_offset..args.user_offset + count,
    )?;
    println!("ready");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let start_ns: u64 = line.trim().parse().context("start time from the parent")?;
    let running = spawn_threads(
        args,
        args.peer,
        per_thread,
        &Phase::starting_at(args, start_ns),
    )?;
    println!("{}", serde_json::to_string(&running.join()?)?);
    Ok(())
}

/// Spreads the users over `args.processes` worker processes (disjoint users
/// and source addresses), starts them together, and merges what they measured.
fn run_in_processes(
    args: &OneToOneArgs,
    peer: Peer,
    address: std::net::SocketAddr,
    server_cpu: &dyn Fn() -> Option<ServerCpu>,
) -> anyhow::Result<(Totals, Option<ServerCpu>)> {
    use std::io::BufRead;
    let processes = args.processes;
    let mut children = Vec::with_capacity(processes);
    let mut offset = 0;
    for index in 0..processes {
        let count = args.users / processes + usize::from(index < args.users % processes);
        let peer_name = match peer {
            Peer::Gateway => "gateway",
            Peer::NatsWs => "nats-ws",
        };
        let child = args
            .gateway
            .worker_command("one-to-one", index, processes)?
            .args(["--peer", peer_name, "--target", &address.to_string()])
            .args([
                "--users",
                &args.users.to_string(),
                "--user-offset",
                &offset.to_string(),
                "--user-count",
                &count.to_string(),
            ])
            .args([
                "--rate",
                &(args.rate / processes as f64).to_string(),
                "--duration-s",
                &args.duration_s.to_string(),
            ])
            .args([
                "--warmup-s",
                &args.warmup_s.to_string(),
                "--threads",
                &args.threads.to_string(),
            ])
            .args([
                "--body-bytes",
                &args.body_bytes.to_string(),
                "--user-prefix",
                &args.user_prefix,
            ])
            .args([
                "--connect-rate",
                &(args.connect_rate / processes as u64).max(1).to_string(),
            ])
            .spawn()?;
        children.push(child);
        offset += count;
    }
    let mut outputs = Vec::with_capacity(processes);
    for child in children.iter_mut() {
        let mut output = std::io::BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        output.read_line(&mut line)?;
        anyhow::ensure!(line.trim() == "ready", "worker did not get ready: {line:?}");
        outputs.push(output);
    }
    let phase = Phase::starting_soon(args);
    for child in children.iter_mut() {
        writeln!(child.stdin.as_mut().expect("piped"), "{}", phase.start_ns)?;
    }
    let (server_cpu_s, _) = sample_server(&phase, server_cpu, &[], None);
    let mut totals = Totals::default();
    for (child, mut output) in children.iter_mut().zip(outputs) {
        let mut line = String::new();
        output.read_line(&mut line)?;
        totals.add(
            serde_json::from_str(line.trim())
                .with_context(|| format!("worker reported {line:?}"))?,
        );
        child.wait()?;
    }
    Ok((totals, server_cpu_s))
}

fn print_table(report: &OneToOneReport) {
    println!(
        "one-to-one: {} users ({} connected), {} msgs/s open loop, {} s measured",
        report.users, report.connections_held, report.rate_per_s, report.measured_s
    );
    println!(
        "  sent {} (late {}), delivered {}, acknowledged {}, errors {:?}, closes {}",
        report.sent,
        report.late_sends,
        report.delivered_total,
        report.acked_total,
        report.errors,
        report.closes
    );
    println!(
        "  {:<10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}",
        "latency", "p50", "p90", "p95", "p99", "p99.9", "max", "count"
    );
    for (name, p) in [
        ("delivery", &report.delivery),
        ("ack", &report.ack),
        ("ack/write", &report.ack_from_write),
    ] {
        let ms = |us: u64| format!("{:.3}", us as f64 / 1000.0);
        println!(
            "  {:<10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}  (ms)",
            name,
            ms(p.p50_us),
            ms(p.p90_us),
            ms(p.p95_us),
            ms(p.p99_us),
            ms(p.p999_us),
            ms(p.max_us),
            p.count
        );
    }
    println!(
        "  delivered/s (measured) {:.0}",
        report.delivered_per_s_measured
    );
    if let (Some(cpu), Some(per_cpu)) = (report.server_cpu_s, report.delivered_per_server_cpu_s) {
        println!("  server CPU {cpu:.2} s in the window: {per_cpu:.0} delivered msgs per server CPU-second");
        if let Some(own) = report.server_process_cpu_s.filter(|own| cpu - own > 0.005) {
            println!(
                "    of which the server process {own:.2} s and its children (the storage-writer) {:.2} s",
                cpu - own
            );
        }
    }
    if let Some(cpu) = report.bench_cpu_s {
        println!("  load generator CPU {cpu:.2} s over the whole run");
    }
}

#[derive(serde::Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default, borrow)]
    id: Option<&'a str>,
    #[serde(default, borrow)]
    body: Option<&'a str>,
    #[serde(default, borrow)]
    code: Option<&'a str>,
}

fn worker(
    mut conns: Vec<Conn>,
    shared: &Shared,
    args: &OneToOneArgs,
    share: u64,
) -> anyhow::Result<WorkerResult> {
    let mut poll = Poll::new()?;
    for (index, conn) in conns.iter_mut().enumerate() {
        poll.registry()
            .register(&mut conn.stream, Token(index), Interest::READABLE)?;
    }
    let mut events = Events::with_capacity(1024);
    let mut timer = SendTimer::new()?;
    poll.registry().register(
        &mut mio::unix::SourceFd(&timer.raw_fd()),
        TIMER_TOKEN,
        Interest::READABLE,
    )?;
    let mut schedule = OpenLoop::new(shared.start_ns, args.rate / args.threads as f64, share);
    let mut result = WorkerResult {
        delivery: Some(report::new_histogram()),
        ack: Some(report::new_histogram()),
        ack_from_write: Some(report::new_histogram()),
        ..WorkerResult::default()
    };
    let mut next_sender = 0usize;
    let mut sequence = 0u64;
    let pings_per_s = conns.len() as f64 * 1e9 / PING_INTERVAL_NS as f64;
    let mut pings = OpenLoop::new(shared.start_ns, pings_per_s.max(1e-3), u64::MAX);
    let mut next_pinged = 0usize;
    let mut frame = Vec::with_capacity(args.body_bytes + 256);
    let mut scratch = vec![0u8; 64 * 1024];
    let padding = "x".repeat(args.body_bytes.saturating_sub(24));
    let hard_stop_ns = shared.end_ns + DRAIN_GRACE_NS + 10_000_000_000;
    if conns.is_empty() {
        return Ok(result);
    }
    loop {
        let now = monotonic_ns();
        assert!(now < hard_stop_ns, "worker exceeded its time bound");
        while let Some(intended) = schedule.due(now) {
            if now - intended > LATE_SEND_NS {
                result.late_sends += 1;
            }
            let sender = next_sender % conns.len();
            next_sender += 1;
            let mut recipient = fastrand::usize(..shared.users);
            if recipient == conns[sender].user_index {
                recipient = (recipient + 1) % shared.users;
            }
            frame.clear();
            match shared.peer {
                Peer::Gateway => {
                    let json = format!(
                        r#"{{"type":"send","id":"{sequence}-{intended}-{now}","to":"{}{recipient}","body":"t{intended}:{padding}"}}"#,
                        args.user_prefix
                    );
                    wsclient::encode_text(json.as_bytes(), &mut frame);
                }
                Peer::NatsWs => {
                    let subject = format!("{}{recipient}", args.user_prefix);
                    nats_peer::encode_publish(
                        &subject,
                        format!("t{intended}:{padding}").as_bytes(),
                        &mut frame,
                    );
                }
            }
            sequence += 1;
            queue_write(&mut conns[sender], &frame, &poll, sender)?;
            result.sent += 1;
        }
        // nats-server pings its clients itself (answered on receipt).
        while shared.peer == Peer::Gateway && pings.due(now).is_some() {
            let index = next_pinged % conns.len();
            next_pinged += 1;
            frame.clear();
            wsclient::encode_text(br#"{"type":"ping"}"#, &mut frame);
            queue_write(&mut conns[index], &frame, &poll, index)?;
        }
        let all_sent = schedule.next_due_ns().is_none();
        if all_sent {
            // NATS core has no acknowledgement to wait for.
            let acked =
                shared.peer == Peer::NatsWs || shared.acked.load(Relaxed) >= shared.total_sends;
            let settled = shared.complete_view
                && shared.delivered.load(Relaxed) >= shared.total_sends
                && acked;
            if settled || now > shared.end_ns + DRAIN_GRACE_NS {
                return Ok(result);
            }
        }
        let ping_due = (shared.peer == Peer::Gateway)
            .then(|| pings.next_due_ns())
            .flatten();
        let next_wake = [schedule.next_due_ns(), ping_due]
            .into_iter()
            .flatten()
            .min();
        if let Some(due) = next_wake {
            timer.arm(due)?;
        }
        // The timerfd wakes us for the next send; the timeout only bounds the drain checks.
        poll.poll(&mut events, Some(Duration::from_millis(10)))?;
        for event in events.iter() {
            if event.token() == TIMER_TOKEN {
                timer.acknowledge();
                continue;
            }
            let index = event.token().0;
            let conn = &mut conns[index];
            if event.is_writable() {
                flush(conn, &poll, index)?;
            }
            if event.is_readable() {
                read_and_record(conn, &mut scratch, shared, &mut result, &poll, index)?;
            }
        }
    }
}

fn queue_write(conn: &mut Conn, bytes: &[u8], poll: &Poll, index: usize) -> anyhow::Result<()> {
    nonblocking::queue_write(
        &mut conn.stream,
        &mut conn.output,
        bytes,
        poll,
        Token(index),
    )
}

fn flush(conn: &mut Conn, poll: &Poll, index: usize) -> anyhow::Result<()> {
    nonblocking::flush(&mut conn.stream, &mut conn.output, poll, Token(index))
}

/// Counts one arrival and, when its send was intended inside the measured
/// window, records its latency from that intended time.
fn record_latency(
    intended: Option<&str>,
    now: u64,
    shared: &Shared,
    counter: &AtomicU64,
    histogram: &mut Histogram<u64>,
) {
    let Some(intended) = intended.and_then(|text| text.parse::<u64>().ok()) else {
        return;
    };
    counter.fetch_add(1, Relaxed);
    if shared.measures(intended) {
        let _ = histogram.record((now.saturating_sub(intended) / 1000).max(1));
    }
}

/// Records the latency of a `sent` from the moment its send was written,
/// when the send was intended inside the measured window (the same sends
/// `record_latency` measures from their intended time).
fn record_from_write(
    intended: Option<&str>,
    written: Option<&str>,
    now: u64,
    shared: &Shared,
    histogram: &mut Histogram<u64>,
) {
    let parse = |text: Option<&str>| text.and_then(|text| text.parse::<u64>().ok());
    let (Some(intended), Some(written)) = (parse(intended), parse(written)) else {
        return;
    };
    if shared.measures(intended) {
        let _ = histogram.record((now.saturating_sub(written) / 1000).max(1));
    }
}

fn read_and_record(
    conn: &mut Conn,
    scratch: &mut [u8],
    shared: &Shared,
    result: &mut WorkerResult,
    poll: &Poll,
    index: usize,
) -> anyhow::Result<()> {
    loop {
        match conn.stream.read(scratch) {
            Ok(0) => {
                result.closes += 1;
                return Ok(());
            }
            Ok(read) => conn.input.extend_from_slice(&scratch[..read]),
            Err(error) if error.kind() == ErrorKind::WouldBlock => break,
            Err(error) if error.kind() == ErrorKind::Interrupted => continue,
            Err(error) => return Err(error.into()),
        }
    }
    let now = monotonic_ns();
    let mut used = 0;
    while let Some((frame, length)) = wsclient::decode(&conn.input[used..]) {
        used += length;
        match frame {
            wsclient::ServerFrame::Text(bytes) if shared.peer == Peer::NatsWs => {
                conn.nats.extend_from_slice(bytes)
            }
            wsclient::ServerFrame::Text(text) => {
                let Ok(incoming) = serde_json::from_slice::<Incoming<'_>>(text) else {
                    continue;
                };
                match incoming.kind {
                    "message" => {
                        // The body starts `t<intended ns>:`.
                        let intended = incoming
                            .body
                            .and_then(|b| b.strip_prefix('t'))
                            .and_then(|b| b.split(':').next());
                        let histogram = result.delivery.as_mut().expect("set");
                        record_latency(intended, now, shared, &shared.delivered, histogram);
                    }
                    "sent" => {
                        // The id is `<sequence>-<intended ns>-<written ns>`.
                        let mut parts = incoming.id.unwrap_or_default().split('-').skip(1);
                        let (intended, written) = (parts.next(), parts.next());
                        record_latency(
                            intended,
                            now,
                            shared,
                            &shared.acked,
                            result.ack.as_mut().expect("set"),
                        );
                        record_from_write(
                            intended,
                            written,
                            now,
                            shared,
                            result.ack_from_write.as_mut().expect("set"),
                        );
                    }
                    "error" => {
                        *result
                            .errors
                            .entry(incoming.code.unwrap_or("?").to_owned())
                            .or_default() += 1
                    }
                    _ => {}
                }
            }
            wsclient::ServerFrame::Binary(bytes) => conn.nats.extend_from_slice(bytes),
            wsclient::ServerFrame::Close(_) => result.closes += 1,
            wsclient::ServerFrame::Other => {}
        }
    }
    conn.input.drain(..used);
    if !conn.nats.is_empty() {
        let mut answer_ping = false;
        let mut nats = std::mem::take(&mut conn.nats);
        nats_peer::parse(&mut nats, |event| match event {
            NatsEvent::Message(payload) => {
                // The payload starts `t<intended ns>:`.
                let text = std::str::from_utf8(payload).unwrap_or("");
                let intended = text
                    .strip_prefix('t')
                    .and_then(|rest| rest.split(':').next());
                record_latency(
                    intended,
                    now,
                    shared,
                    &shared.delivered,
                    result.delivery.as_mut().expect("set"),
                );
            }
            NatsEvent::Ping => answer_ping = true,
            NatsEvent::Error(line) => {
                *result
                    .errors
                    .entry(String::from_utf8_lossy(line).into_owned())
                    .or_default() += 1;
            }
        })?;
        conn.nats = nats;
        if answer_ping {
            let mut pong = Vec::new();
            wsclient::encode_binary(b"PONG\r\n", &mut pong);
            queue_write(conn, &pong, poll, index)?;
        }
    }
    Ok(())
}
