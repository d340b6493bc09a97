//! The `group` scenario: groups of `--size` members, one sender each,
//! sending to the group at a fixed open-loop rate; optionally a fraction of
//! every group offline, who connect afterwards and sync.
//!
//! Owns the run: connect the online members (one connection each, one mio
//! poll), create each group with a real `group_create`, send on the
//! schedule (late sends counted, never skipped), and record from each
//! send's *intended* time: delivery to every online member's device, the
//! fan-out completion (when the last online member got it), and the
//! sender's `sent`. Then the offline members connect and drain. Warm-up is
//! excluded; every loop is bounded by count and time.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::clock::monotonic_ns;
use crate::gateway_process::GatewayTarget;
use crate::offline_sync::read_frames;
use crate::report::{self, Percentiles};
use crate::schedule::OpenLoop;
use crate::timer::SendTimer;
use crate::{nonblocking, procfs, wsclient};

const TIMER_TOKEN: Token = Token(usize::MAX);
/// How long after the last send the run waits for stragglers.
const DRAIN_GRACE: Duration = Duration::from_secs(10);
/// A send this late after its intended time is counted as late.
const LATE_SEND_NS: u64 = 1_000_000;

#[derive(clap::Args, Debug, Clone)]
pub struct GroupArgs {
    #[command(flatten)]
    pub gateway: GatewayTarget,
    /// Groups (disjoint members).
    #[arg(long, default_value_t = 1)]
    pub groups: usize,
    /// Members per group, the sender included (2-4096; the gateway's
    /// default limit is 1024).
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Group messages per second across all groups (open loop). Each group's
    /// sender is one user: keep rate/groups under its send limit (20/s).
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Measured seconds, after the warm-up.
    #[arg(long, default_value_t = 10)]
    pub duration_s: u64,
    #[arg(long, default_value_t = 2)]
    pub warmup_s: u64,
    /// Fraction of each group's members (never the sender) offline during
    /// the sends; they connect afterwards and sync.
    #[arg(long, default_value_t = 0.0)]
    pub offline_fraction: f64,
    #[arg(long, default_value_t = 100)]
    pub body_bytes: usize,
    /// Connections opened per second while setting up.
    #[arg(long, default_value_t = 4000)]
    pub connect_rate: u64,
    #[arg(long, default_value = "grp")]
    pub user_prefix: String,
    /// JSON summary.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Writes PREFIX-delivery.hgrm, PREFIX-fanout.hgrm and PREFIX-ack.hgrm.
    #[arg(long)]
    pub hgrm_prefix: Option<String>,
    /// Latency-by-percentile plot.
    #[arg(long)]
    pub svg: Option<std::path::PathBuf>,
}

#[derive(Debug, serde::Serialize)]
pub struct GroupReport {
    pub groups: usize,
    pub size: usize,
    pub online_per_group: usize,
    pub offline_per_group: usize,
    pub rate: f64,
    pub sent: u64,
    pub late_sends: u64,
    /// Copies that reached online members' devices.
    pub delivered: u64,
    /// Copies the online members should have received.
    pub expected_deliveries: u64,
    pub acknowledged: u64,
    pub errors: HashMap<String, u64>,
    /// Intended send → one member's `message`, every member, in µs.
    pub delivery_us: Percentiles,
    /// Intended send → the last online member's `message`, in µs.
    pub fanout_complete_us: Percentiles,
    /// Intended send → `sent` (durable), in µs.
    pub ack_us: Percentiles,
    /// Deliveries per second in the measured window.
    pub deliveries_per_s: f64,
    pub server_cpu_seconds: Option<f64>,
    /// The gateway alone (the rest of the server CPU is its storage-writer).
    pub gateway_cpu_seconds: Option<f64>,
    pub deliveries_per_server_cpu_second: Option<f64>,
    /// This load generator's own CPU over the same window (it shares the box).
    pub bench_cpu_seconds: Option<f64>,
    /// Offline members: connect → `synced`, in µs, and the wall time for all.
    pub offline_sync_us: Option<Percentiles>,
    pub offline_drain_seconds: Option<f64>,
    pub offline_messages_missing: u64,
    pub environment: serde_json::Value,
}

struct Member {
    stream: TcpStream,
    input: Vec<u8>,
    output: Vec<u8>,
    group: usize,
}

fn user(prefix: &str, group: usize, member: usize) -> String {
    format!("{prefix}{group}-{member}")
}

/// Members per group that are online during the sends (the sender always is).
fn online_count(args: &GroupArgs) -> usize {
    let offline = (args.size as f64 * args.offline_fraction.clamp(0.0, 1.0)).floor() as usize;
    (args.size - offline).max(1)
}

pub fn run(args: &GroupArgs) -> anyhow::Result<()> {
    anyhow::ensure!((2..=4096).contains(&args.size), "--size must be 2-4096");
    anyhow::ensure!(
        args.groups >= 1 && args.rate > 0.0,
        "--groups and --rate must be positive"
    );
    let online = online_count(args);
    anyhow::ensure!(
        args.groups * online <= 18_000,
        "at most 18,000 online members in one bench process (the fd limit)"
    );
    let target = args.gateway.resolve()?;
    let address = target.address;
    let interval = Duration::from_secs_f64(1.0 / args.connect_rate.max(1) as f64);
    let mut members = Vec::with_capacity(args.groups * online);
    let mut group_ids = Vec::with_capacity(args.groups);
    for group in 0..args.groups {
        for member in 0..online {
            let name = user(&args.user_prefix, group, member);
            let source = args.gateway.source(members.len());
            let (stream, rest) = wsclient::open(address, source, &args.gateway.token(&name)?)?;
            members.push((stream, rest, group));
            std::thread::sleep(interval);
        }
        group_ids.push(create_group(args, group, &mut members[group * online].0)?);
    }
    eprintln!(
        "{} groups of {} created; {} members online",
        args.groups,
        args.size,
        members.len()
    );
    let members: Vec<Member> = members
        .into_iter()
        .map(|(stream, input, group)| {
            stream.set_nonblocking(true)?;
            Ok(Member {
                stream: TcpStream::from_std(stream),
                input,
                output: Vec::new(),
                group,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let own_cpu = || procfs::process_cpu_seconds(std::process::id()).ok();
    let mut run = SendLoop::new(args, group_ids.clone(), online);
    let before = (procfs::ServerCpu::of(&target.pids), own_cpu());
    let outcome = run.drive(members)?;
    let spent_server = procfs::ServerCpu::of(&target.pids)
        .zip(before.0)
        .map(|(after, start)| after.since(start));
    let server_cpu = spent_server.map(|cpu| cpu.tree_s);
    let gateway_cpu = spent_server.map(|cpu| cpu.process_s);
    let bench_cpu = own_cpu().zip(before.1).map(|(after, start)| after - start);

    let (offline_sync, drain_seconds, missing) = if online < args.size {
        let (sync, seconds, missing) = drain_offline(args, address, online, run.sent_per_group())?;
        (Some(report::percentiles(&sync)), Some(seconds), missing)
    } else {
        (None, None, 0)
    };
    let measured_s = args.duration_s as f64;
    let report = GroupReport {
        groups: args.groups,
        size: args.size,
        online_per_group: online,
        offline_per_group: args.size - online,
        rate: args.rate,
        sent: outcome.sent,
        late_sends: outcome.late_sends,
        delivered: outcome.delivered,
        expected_deliveries: outcome.sent * (online as u64 - 1),
        acknowledged: outcome.acknowledged,
        errors: outcome.errors,
        delivery_us: report::percentiles(&outcome.delivery),
        fanout_complete_us: report::percentiles(&outcome.fanout),
        ack_us: report::percentiles(&outcome.ack),
        deliveries_per_s: outcome.measured_deliveries as f64 / measured_s,
        server_cpu_seconds: server_cpu,
        gateway_cpu_seconds: gateway_cpu,
        bench_cpu_seconds: bench_cpu,
        deliveries_per_server_cpu_second: server_cpu
            .filter(|s| *s > 0.0)
            .map(|s| outcome.delivered as f64 / s),
        offline_sync_us: offline_sync,
        offline_drain_seconds: drain_seconds,
        offline_messages_missing: missing,
        environment: report::environment(),
    };
    print_table(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    if let Some(prefix) = &args.hgrm_prefix {
        std::fs::write(
            format!("{prefix}-delivery.hgrm"),
            report::hgrm(&outcome.delivery),
        )?;
        std::fs::write(
            format!("{prefix}-fanout.hgrm"),
            report::hgrm(&outcome.fanout),
        )?;
        std::fs::write(format!("{prefix}-ack.hgrm"), report::hgrm(&outcome.ack))?;
    }
    if let Some(path) = &args.svg {
        let title = format!("group of {}: latency by percentile", args.size);
        let series = [
            ("delivery", &outcome.delivery),
            ("fan-out complete", &outcome.fanout),
            ("sent (durable)", &outcome.ack),
        ];
        std::fs::write(path, report::svg(&title, &series))?;
    }
    anyhow::ensure!(
        report.delivered == report.expected_deliveries && missing == 0,
        "not every member got every message: {} of {} delivered, {missing} missing after sync",
        report.delivered,
        report.expected_deliveries
    );
    anyhow::ensure!(
        report.acknowledged == report.sent,
        "only {} of {} sends were acknowledged (made durable) in time",
        report.acknowledged,
        report.sent
    );
    Ok(())
}

/// `group_create` from the group's member 0 (blocking); the new group's id.
fn create_group(
    args: &GroupArgs,
    group: usize,
    stream: &mut std::net::TcpStream,
) -> anyhow::Result<String> {
    let members: Vec<String> = (1..args.size)
        .map(|m| user(&args.user_prefix, group, m))
        .collect();
    let request = serde_json::json!({"type": "group_create", "id": format!("create-{group}"), "members": members});
    let mut frame = Vec::new();
    wsclient::encode_text(request.to_string().as_bytes(), &mut frame);
    stream.write_all(&frame)?;
    let mut buffer = Vec::new();
    let mut id = None;
    read_frames(
        stream,
        &mut buffer,
        Instant::now() + Duration::from_secs(30),
        |text| {
            let value: serde_json::Value = serde_json::from_slice(text).unwrap_or_default();
            if value["type"] == "error" {
                id = Some(Err(anyhow::anyhow!("group_create refused: {value}")));
                return true;
            }
            if value["type"] == "sent" {
                id = value["group"].as_str().map(|g| Ok(g.to_owned()));
            }
            id.is_some()
        },
    )?;
    id.unwrap_or_else(|| Err(anyhow::anyhow!("no group id")))
}

struct Outcome {
    sent: u64,
    late_sends: u64,
    delivered: u64,
    measured_deliveries: u64,
    acknowledged: u64,
    errors: HashMap<String, u64>,
    delivery: Histogram<u64>,
    fanout: Histogram<u64>,
    ack: Histogram<u64>,
}

/// The send schedule and what came back.
struct SendLoop<'a> {
    args: &'a GroupArgs,
    group_ids: Vec<String>,
    online: usize,
    start_ns: u64,
    measure_from_ns: u64,
    end_ns: u64,
    /// Per send (by sequence): intended time and online members yet to get it.
    pending: HashMap<u64, (u64, usize)>,
    sent_per_group: Vec<u64>,
}

impl<'a> SendLoop<'a> {
    fn new(args: &'a GroupArgs, group_ids: Vec<String>, online: usize) -> Self {
        let start_ns = monotonic_ns() + 100_000_000;
        let measure_from_ns = start_ns + args.warmup_s * 1_000_000_000;
        Self {
            args,
            online,
            start_ns,
            measure_from_ns,
            end_ns: measure_from_ns + args.duration_s * 1_000_000_000,
            pending: HashMap::new(),
            sent_per_group: vec![0; group_ids.len()],
            group_ids,
        }
    }

    fn sent_per_group(&self) -> &[u64] {
        &self.sent_per_group
    }

    fn drive(&mut self, mut members: Vec<Member>) -> anyhow::Result<Outcome> {
        let mut poll = Poll::new()?;
        for (index, member) in members.iter_mut().enumerate() {
            poll.registry()
                .register(&mut member.stream, Token(index), Interest::READABLE)?;
        }
        let mut timer = SendTimer::new()?;
        poll.registry().register(
            &mut mio::unix::SourceFd(&timer.raw_fd()),
            TIMER_TOKEN,
            Interest::READABLE,
        )?;
        let total = ((self.args.warmup_s + self.args.duration_s) as f64 * self.args.rate) as u64;
        let mut schedule = OpenLoop::new(self.start_ns, self.args.rate, total);
        let mut outcome = Outcome {
            sent: 0,
            late_sends: 0,
            delivered: 0,
            measured_deliveries: 0,
            acknowledged: 0,
            errors: HashMap::new(),
            delivery: report::new_histogram(),
            fanout: report::new_histogram(),
            ack: report::new_histogram(),
        };
        let padding = "x".repeat(self.args.body_bytes.saturating_sub(24));
        let hard_stop = self.end_ns + DRAIN_GRACE.as_nanos() as u64;
        let mut events = Events::with_capacity(1024);
        let mut scratch = vec![0u8; 64 * 1024];
        let mut frame = Vec::new();
        loop {
            let now = monotonic_ns();
            while let Some(intended) = schedule.due(now) {
                if now - intended > LATE_SEND_NS {
                    outcome.late_sends += 1;
                }
                let group = (outcome.sent as usize) % self.group_ids.len();
                let sequence = outcome.sent;
                let json = format!(
                    r#"{{"type":"send","id":"{sequence}-{intended}","group":"{}","body":"t{intended}:{sequence}:{padding}"}}"#,
                    self.group_ids[group]
                );
                frame.clear();
                wsclient::encode_text(json.as_bytes(), &mut frame);
                let sender = group * self.online;
                queue_write(&mut members[sender], &frame, &poll, sender)?;
                self.pending.insert(sequence, (intended, self.online - 1));
                self.sent_per_group[group] += 1;
                outcome.sent += 1;
            }
            let done = schedule.next_due_ns().is_none()
                && self.pending.is_empty()
                && outcome.acknowledged >= outcome.sent;
            if done || now > hard_stop {
                return Ok(outcome);
            }
            if let Some(due) = schedule.next_due_ns() {
                timer.arm(due)?;
            }
            poll.poll(&mut events, Some(Duration::from_millis(10)))?;
            for event in events.iter() {
                if event.token() == TIMER_TOKEN {
                    timer.acknowledge();
                    continue;
                }
                let index = event.token().0;
                if event.is_writable() {
                    flush(&mut members[index], &poll, index)?;
                }
                if event.is_readable() {
                    self.read(&mut members[index], &mut scratch, &mut outcome)?;
                }
            }
        }
    }

    fn read(
        &mut self,
        member: &mut Member,
        scratch: &mut [u8],
        outcome: &mut Outcome,
    ) -> anyhow::Result<()> {
        loop {
            match member.stream.read(scratch) {
                Ok(0) => anyhow::bail!("a member of group {} was disconnected", member.group),
                Ok(read) => member.input.extend_from_slice(&scratch[..read]),
                Err(error) if error.kind() == ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == ErrorKind::Interrupted => continue,
                Err(error) => return Err(error.into()),
            }
        }
        let now = monotonic_ns();
        let mut used = 0;
        while let Some((frame, length)) = wsclient::decode(&member.input[used..]) {
            used += length;
            let wsclient::ServerFrame::Text(text) = frame else {
                continue;
            };
            let Ok(incoming) = serde_json::from_slice::<Incoming<'_>>(text) else {
                continue;
            };
            match incoming.kind {
                "message" => {
                    // The body is `t<intended ns>:<sequence>:...` (the
                    // group's creation event has none).
                    let Some((intended, sequence)) = incoming.body.and_then(parse_body) else {
                        continue;
                    };
                    outcome.delivered += 1;
                    if self.measured(intended) {
                        outcome.measured_deliveries += 1;
                        let _ = outcome.delivery.record(micros(now, intended));
                    }
                    if let Some((_, left)) = self.pending.get_mut(&sequence) {
                        *left -= 1;
                        if *left == 0 {
                            self.pending.remove(&sequence);
                            if self.measured(intended) {
                                let _ = outcome.fanout.record(micros(now, intended));
                            }
                        }
                    }
                }
                "sent" => {
                    let intended = incoming
                        .id
                        .and_then(|id| id.split('-').nth(1))
                        .and_then(|t| t.parse::<u64>().ok());
                    if let Some(intended) = intended {
                        outcome.acknowledged += 1;
                        if self.measured(intended) {
                            let _ = outcome.ack.record(micros(now, intended));
                        }
                    }
                }
                "error" => {
                    *outcome
                        .errors
                        .entry(incoming.code.unwrap_or("?").to_owned())
                        .or_default() += 1
                }
                _ => {}
            }
        }
        member.input.drain(..used);
        Ok(())
    }

    fn measured(&self, intended: u64) -> bool {
        intended >= self.measure_from_ns && intended < self.end_ns
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

/// `t<intended>:<sequence>:...` → (intended, sequence).
fn parse_body(body: &str) -> Option<(u64, u64)> {
    let mut parts = body.strip_prefix('t')?.splitn(3, ':');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn micros(now: u64, intended: u64) -> u64 {
    (now.saturating_sub(intended) / 1000).max(1)
}

fn queue_write(member: &mut Member, bytes: &[u8], poll: &Poll, index: usize) -> anyhow::Result<()> {
    nonblocking::queue_write(
        &mut member.stream,
        &mut member.output,
        bytes,
        poll,
        Token(index),
    )
}

fn flush(member: &mut Member, poll: &Poll, index: usize) -> anyhow::Result<()> {
    nonblocking::flush(&mut member.stream, &mut member.output, poll, Token(index))
}

/// Connects every offline member (one at a time) and reads its sync:
/// connect → `synced` per member, the wall time, and messages missing.
fn drain_offline(
    args: &GroupArgs,
    address: std::net::SocketAddr,
    online: usize,
    sent_per_group: &[u64],
) -> anyhow::Result<(Histogram<u64>, f64, u64)> {
    let mut histogram = report::new_histogram();
    let mut missing = 0u64;
    let started = Instant::now();
    for (group, sent) in sent_per_group.iter().enumerate() {
        for member in online..args.size {
            let name = user(&args.user_prefix, group, member);
            let connect_at = monotonic_ns();
            let (mut stream, mut buffer) = wsclient::open(
                address,
                args.gateway.source(member),
                &args.gateway.token(&name)?,
            )?;
            let mut got = 0u64;
            read_frames(
                &mut stream,
                &mut buffer,
                Instant::now() + Duration::from_secs(60),
                |text| {
                    let value: Incoming<'_> = match serde_json::from_slice(text) {
                        Ok(value) => value,
                        Err(_) => return false,
                    };
                    if value.kind == "message" && value.body.and_then(parse_body).is_some() {
                        got += 1;
                    }
                    value.kind == "synced"
                },
            )?;
            let _ = histogram.record(micros(monotonic_ns(), connect_at));
            missing += sent.saturating_sub(got);
        }
    }
    Ok((histogram, started.elapsed().as_secs_f64(), missing))
}

fn print_table(report: &GroupReport) {
    println!(
        "group: {} groups x {} members ({} online, {} offline), {:.0} msgs/s",
        report.groups, report.size, report.online_per_group, report.offline_per_group, report.rate
    );
    println!(
        "  sent {} (late {}), delivered {} of {} copies, acknowledged {}, errors {:?}",
        report.sent,
        report.late_sends,
        report.delivered,
        report.expected_deliveries,
        report.acknowledged,
        report.errors
    );
    let row = |name: &str, p: &Percentiles| {
        println!(
            "  {name:<18} p50 {:>9.3} ms  p90 {:>9.3}  p95 {:>9.3}  p99 {:>9.3}  p99.9 {:>9.3}  max {:>9.3}",
            p.p50_us as f64 / 1000.0,
            p.p90_us as f64 / 1000.0,
            p.p95_us as f64 / 1000.0,
            p.p99_us as f64 / 1000.0,
            p.p999_us as f64 / 1000.0,
            p.max_us as f64 / 1000.0
        )
    };
    row("delivery", &report.delivery_us);
    row("fan-out complete", &report.fanout_complete_us);
    row("sent (durable)", &report.ack_us);
    println!("  deliveries/s {:.0}", report.deliveries_per_s);
    if let (Some(cpu), Some(per)) = (
        report.server_cpu_seconds,
        report.deliveries_per_server_cpu_second,
    ) {
        println!("  server CPU {cpu:.2} s, {per:.0} deliveries per server CPU-second");
    }
    if let (Some(gateway), Some(bench)) = (report.gateway_cpu_seconds, report.bench_cpu_seconds) {
        println!("  of which the gateway {gateway:.2} s; this load generator {bench:.2} s");
    }
    if let (Some(sync), Some(seconds)) = (&report.offline_sync_us, report.offline_drain_seconds) {
        row("offline sync", sync);
        println!(
            "  offline members drained in {seconds:.2} s, {} messages missing",
            report.offline_messages_missing
        );
    }
}
