//! The `one-to-one` scenario: N users, one device each, sending 1:1 messages
//! between random pairs at a fixed open-loop rate.
//!
//! Owns the worker loop: each worker thread drives its share of connections
//! with one epoll (mio), sends on the open-loop schedule (late sends are
//! counted, never skipped), and records two latencies from each send's
//! *intended* time: delivery (to the recipient's `message`) and
//! acknowledgement (to the sender's `sent`). Warm-up is excluded. Every loop
//! is bounded by count and time.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::clock::monotonic_ns;
use crate::gateway_process::GatewayTarget;
use crate::report::{self, Percentiles};
use crate::schedule::OpenLoop;
use crate::timer::SendTimer;
use crate::{procfs, wsclient};

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
}

#[derive(Default)]
struct WorkerResult {
    delivery: Option<Histogram<u64>>,
    ack: Option<Histogram<u64>>,
    sent: u64,
    late_sends: u64,
    errors: BTreeMap<String, u64>,
    closes: u64,
}

struct Shared {
    users: usize,
    start_ns: u64,
    measure_from_ns: u64,
    end_ns: u64,
    total_sends: u64,
    delivered: AtomicU64,
    acked: AtomicU64,
}

#[derive(Debug, serde::Serialize)]
pub struct OneToOneReport {
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
    pub delivered_per_s_measured: f64,
    pub gateway_cpu_s: Option<f64>,
    pub delivered_per_gateway_cpu_s: Option<f64>,
    pub bench_cpu_s: Option<f64>,
    pub errors: BTreeMap<String, u64>,
    pub closes: u64,
    pub environment: serde_json::Value,
}

pub fn run(args: &OneToOneArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.users >= 2 && args.threads >= 1 && args.rate > 0.0,
        "need 2+ users, 1+ threads, a positive rate"
    );
    let gateway = args.gateway.resolve()?;

    // Connect everyone (paced), before any message is scheduled.
    let mut per_thread: Vec<Vec<Conn>> = (0..args.threads).map(|_| Vec::new()).collect();
    let connect_interval = Duration::from_secs_f64(1.0 / args.connect_rate.max(1) as f64);
    for user_index in 0..args.users {
        let token = args
            .gateway
            .token(&format!("{}{user_index}", args.user_prefix))?;
        let (stream, rest) =
            wsclient::open(gateway.address, args.gateway.source(user_index), &token)?;
        stream.set_nonblocking(true)?;
        per_thread[user_index % args.threads].push(Conn {
            stream: TcpStream::from_std(stream),
            user_index,
            input: rest,
            output: Vec::new(),
        });
        std::thread::sleep(connect_interval);
    }
    let connections_held = per_thread.iter().map(Vec::len).sum();

    let start_ns = monotonic_ns() + 200_000_000;
    let measure_from_ns = start_ns + args.warmup_s * 1_000_000_000;
    let end_ns = measure_from_ns + args.duration_s * 1_000_000_000;
    let total_sends = (args.rate * (args.warmup_s + args.duration_s) as f64) as u64;
    let shared = Arc::new(Shared {
        users: args.users,
        start_ns,
        measure_from_ns,
        end_ns,
        total_sends,
        delivered: AtomicU64::new(0),
        acked: AtomicU64::new(0),
    });
    let bench_cpu_before = procfs::process_cpu_seconds(std::process::id()).ok();
    let workers: Vec<_> = per_thread
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

    // Server CPU over the measured window only.
    let sleep_until = |target_ns: u64| {
        let now = monotonic_ns();
        if target_ns > now {
            std::thread::sleep(Duration::from_nanos(target_ns - now));
        }
    };
    sleep_until(measure_from_ns);
    let gateway_cpu_start = gateway.cpu_seconds();
    sleep_until(end_ns);
    let gateway_cpu_end = gateway.cpu_seconds();

    let mut delivery = report::new_histogram();
    let mut ack = report::new_histogram();
    let mut result = WorkerResult::default();
    for worker in workers {
        let part = worker
            .join()
            .map_err(|_| anyhow::anyhow!("worker panicked"))??;
        delivery.add(part.delivery.as_ref().expect("set"))?;
        ack.add(part.ack.as_ref().expect("set"))?;
        result.sent += part.sent;
        result.late_sends += part.late_sends;
        result.closes += part.closes;
        for (code, count) in part.errors {
            *result.errors.entry(code).or_default() += count;
        }
    }
    let bench_cpu_s = bench_cpu_before.and_then(|before| {
        procfs::process_cpu_seconds(std::process::id())
            .ok()
            .map(|after| after - before)
    });
    let gateway_cpu_s = gateway_cpu_start
        .zip(gateway_cpu_end)
        .map(|(start, end)| end - start);
    let measured_deliveries = delivery.len();
    let report = OneToOneReport {
        users: args.users,
        connections_held,
        rate_per_s: args.rate,
        measured_s: args.duration_s,
        sent: result.sent,
        late_sends: result.late_sends,
        delivered_total: shared.delivered.load(Relaxed),
        acked_total: shared.acked.load(Relaxed),
        delivery: report::percentiles(&delivery),
        ack: report::percentiles(&ack),
        delivered_per_s_measured: measured_deliveries as f64 / args.duration_s as f64,
        gateway_cpu_s,
        delivered_per_gateway_cpu_s: gateway_cpu_s
            .filter(|cpu| *cpu > 0.0)
            .map(|cpu| measured_deliveries as f64 / cpu),
        bench_cpu_s,
        errors: result.errors,
        closes: result.closes,
        environment: report::environment(),
    };
    print_table(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    if let Some(prefix) = &args.hgrm_prefix {
        std::fs::write(format!("{prefix}-delivery.hgrm"), report::hgrm(&delivery))?;
        std::fs::write(format!("{prefix}-ack.hgrm"), report::hgrm(&ack))?;
    }
    if let Some(path) = &args.svg {
        let title = format!(
            "one-to-one: {} users, {} msgs/s, {} B bodies",
            args.users, args.rate, args.body_bytes
        );
        std::fs::write(
            path,
            report::svg(&title, &[("delivery", &delivery), ("ack (sent)", &ack)]),
        )?;
    }
    Ok(())
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
    for (name, p) in [("delivery", &report.delivery), ("ack", &report.ack)] {
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
    if let (Some(cpu), Some(per_cpu)) = (report.gateway_cpu_s, report.delivered_per_gateway_cpu_s) {
        println!("  gateway CPU {cpu:.2} s in the window: {per_cpu:.0} delivered msgs per gateway CPU-second");
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
            let json = format!(
                r#"{{"type":"send","id":"{sequence}-{intended}","to":"{}{recipient}","body":"t{intended}:{padding}"}}"#,
                args.user_prefix
            );
            sequence += 1;
            frame.clear();
            wsclient::encode_text(json.as_bytes(), &mut frame);
            queue_write(&mut conns[sender], &frame, &poll, sender)?;
            result.sent += 1;
        }
        while pings.due(now).is_some() {
            let index = next_pinged % conns.len();
            next_pinged += 1;
            frame.clear();
            wsclient::encode_text(br#"{"type":"ping"}"#, &mut frame);
            queue_write(&mut conns[index], &frame, &poll, index)?;
        }
        let all_sent = schedule.next_due_ns().is_none();
        if all_sent {
            let settled = shared.delivered.load(Relaxed) >= shared.total_sends
                && shared.acked.load(Relaxed) >= shared.total_sends;
            if settled || now > shared.end_ns + DRAIN_GRACE_NS {
                return Ok(result);
            }
        }
        let next_wake = [schedule.next_due_ns(), pings.next_due_ns()]
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
                read_and_record(conn, &mut scratch, shared, &mut result)?;
            }
        }
    }
}

fn queue_write(conn: &mut Conn, bytes: &[u8], poll: &Poll, index: usize) -> anyhow::Result<()> {
    if conn.output.is_empty() {
        match conn.stream.write(bytes) {
            Ok(written) if written == bytes.len() => return Ok(()),
            Ok(written) => conn.output.extend_from_slice(&bytes[written..]),
            Err(error) if error.kind() == ErrorKind::WouldBlock => {
                conn.output.extend_from_slice(bytes)
            }
            Err(error) => return Err(error.into()),
        }
        poll.registry().reregister(
            &mut conn.stream,
            Token(index),
            Interest::READABLE | Interest::WRITABLE,
        )?;
    } else {
        conn.output.extend_from_slice(bytes);
    }
    Ok(())
}

fn flush(conn: &mut Conn, poll: &Poll, index: usize) -> anyhow::Result<()> {
    while !conn.output.is_empty() {
        match conn.stream.write(&conn.output) {
            Ok(written) => {
                conn.output.drain(..written);
            }
            Err(error) if error.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(error) => return Err(error.into()),
        }
    }
    poll.registry()
        .reregister(&mut conn.stream, Token(index), Interest::READABLE)?;
    Ok(())
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
    if intended >= shared.measure_from_ns && intended < shared.end_ns {
        let _ = histogram.record((now.saturating_sub(intended) / 1000).max(1));
    }
}

fn read_and_record(
    conn: &mut Conn,
    scratch: &mut [u8],
    shared: &Shared,
    result: &mut WorkerResult,
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
                        // The id is `<sequence>-<intended ns>`.
                        let intended = incoming.id.and_then(|id| id.split('-').nth(1));
                        record_latency(
                            intended,
                            now,
                            shared,
                            &shared.acked,
                            result.ack.as_mut().expect("set"),
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
            wsclient::ServerFrame::Close(_) => result.closes += 1,
            wsclient::ServerFrame::Other => {}
        }
    }
    conn.input.drain(..used);
    Ok(())
}
