//! The `writer` scenario: the storage-writer alone, fed by a synthetic shard.
//!
//! Owns standing in for one gateway shard: it creates a ring, starts the
//! storage-writer on it (any backend, via `--writer-arg`), says hello on the
//! read-path socket, appends message records (open-loop at `--rate`, or as
//! fast as the ring allows), and times each record from its append to the
//! `Durable` notice that covers it. Reports records/s committed, the writer's
//! CPU seconds, its batch-size histogram (from its exit statistics) and the
//! append-to-durable percentiles. Bounded by count and time.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use chat_protocol::records::MessageRecord;
use chat_protocol::snowflake::SnowflakeGenerator;
use chat_protocol::store_wire::{self, Request, Response};
use chat_ring::{attach_producer, RingOptions};

use crate::report::{self, Percentiles};

/// Longest a run may take, all phases together, unless `--time-limit-s` says otherwise.
const RUN_LIMIT_DEFAULT_S: u64 = 600;
/// The most `--time-limit-s` accepts: a run is always bounded.
const RUN_LIMIT_MAX_S: u64 = 3 * 60 * 60;

#[derive(clap::Args, Debug, Clone)]
pub struct WriterArgs {
    /// The storage-writer binary.
    #[arg(long, default_value = "target/release/storage-writer")]
    pub writer: PathBuf,
    /// Extra flags for the writer, e.g. --writer-arg=--backend --writer-arg=postgres.
    #[arg(long = "writer-arg", allow_hyphen_values = true)]
    pub writer_args: Vec<String>,
    /// Messages to append (with --acks, as many acknowledgements again).
    #[arg(long, default_value_t = 200_000)]
    pub records: u64,
    /// Appends per second (open loop); 0 appends as fast as the ring has room.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    #[arg(long, default_value_t = 100)]
    pub body_bytes: usize,
    /// Also append the recipient's acknowledgement after each message (as a
    /// device that reads everything would): twice the records. 1:1 only.
    #[arg(long)]
    pub acks: bool,
    /// Distinct users (each message goes from user i to user i+1).
    #[arg(long, default_value_t = 1000)]
    pub users: usize,
    /// Group messages instead of 1:1: each goes to a group of this many
    /// members (a window of `--users`, moving with each message), with
    /// every member an inbox entry. 0: 1:1 messages.
    #[arg(long, default_value_t = 0)]
    pub group_members: usize,
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub ring_bytes: u64,
    /// Pin the writer (all its threads) to this core, for a one-core figure.
    #[arg(long)]
    pub writer_core: Option<usize>,
    /// Directory for the ring and the embedded store (a temporary one if absent).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// JSON summary.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Longest the run may take, all phases together (at most three hours):
    /// a run of ten million records on one core needs more than the default.
    #[arg(long, default_value_t = RUN_LIMIT_DEFAULT_S)]
    pub time_limit_s: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct WriterReport {
    pub records: u64,
    pub seconds: f64,
    pub records_per_s: f64,
    pub writer_cpu_s: f64,
    pub records_per_writer_cpu_s: f64,
    pub ring_full_waits: u64,
    pub append_to_durable: Percentiles,
    /// The writer's own count of batches and their sizes (power-of-two buckets).
    pub writer_statistics: String,
    /// Log lines where the embedded store (fjall) held writes back: a full
    /// write buffer or journal, or too many level-0 segments.
    pub store_write_stalls: usize,
    /// Bytes of the embedded store on disk after the run (journals not yet
    /// flushed included), and per message appended.
    pub store_bytes: Option<u64>,
    pub store_bytes_per_message: Option<f64>,
    pub writer_args: Vec<String>,
    pub writer_core: Option<usize>,
    pub environment: serde_json::Value,
}

struct Waiting {
    queue: Mutex<VecDeque<(u64, Instant)>>,
    durable: AtomicU64,
}

pub fn run(args: &WriterArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.records >= 1 && args.users >= 2,
        "need 1+ records and 2+ users"
    );
    anyhow::ensure!(
        args.group_members <= args.users
            && args.group_members <= chat_protocol::records::RECIPIENTS_MAX,
        "--group-members is at most --users and {}",
        chat_protocol::records::RECIPIENTS_MAX
    );
    anyhow::ensure!(
        (1..=RUN_LIMIT_MAX_S).contains(&args.time_limit_s),
        "--time-limit-s is 1 to {RUN_LIMIT_MAX_S}"
    );
    let temporary = args.dir.is_none();
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("bench-writer-{}", std::process::id())),
    };
    let rings = dir.join("rings");
    std::fs::create_dir_all(&rings)?;
    let ring_path = rings.join("shard-0.ring");
    let mut producer = attach_producer(
        &ring_path,
        RingOptions {
            capacity_bytes: args.ring_bytes,
            shard_id: 0,
        },
    )?;
    let socket_path = rings.join("writer.sock");
    let mut command = match args.writer_core {
        Some(core) => {
            let mut command = Command::new("taskset");
            command.args(["-c", &core.to_string()]).arg(&args.writer);
            command
        }
        None => Command::new(&args.writer),
    };
    crate::child::die_with_this_thread(&mut command);
    let mut writer = command
        .arg("--ring-dir")
        .arg(&rings)
        .arg("--socket")
        .arg(&socket_path)
        .arg("--data-dir")
        .arg(&dir)
        .args(["--stats-interval-s", "0"])
        .args(&args.writer_args)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", args.writer.display()))?;
    let stderr = writer.stderr.take().context("writer stderr")?;
    let log = Arc::new(Mutex::new(String::new()));
    let log_reader = {
        let log = log.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::BufReader::new(stderr).read_to_string(&mut text);
            log.lock().expect("log").push_str(&text);
        })
    };
    let result = drive(args, &mut producer, &ring_path, &socket_path, writer.id());
    let _ = Command::new("kill")
        .args(["-TERM", &writer.id().to_string()])
        .status();
    let _ = writer.wait();
    let _ = log_reader.join();
    // The embedded store's files once the writer has stopped (journal and
    // segments; absent for the other backends).
    let store_bytes = tree_bytes(&dir.join("store"));
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let (seconds, latency, ring_full_waits, writer_cpu_s) = result?;
    // Every message, and with --acks its acknowledgement.
    let appended = args.records * if args.acks { 2 } else { 1 };
    let text = log.lock().expect("log").clone();
    let statistics = text
        .lines()
        .rfind(|line| line.contains("writer statistics"))
        .map(|line| {
            line.split_once("writer statistics")
                .map_or(line, |(_, rest)| rest)
                .trim()
                .to_owned()
        })
        .unwrap_or_default();
    let store_write_stalls = text
        .lines()
        .filter(|line| {
            [
                "write stall",
                "write halt",
                "Stalling writes",
                "Halting writes",
            ]
            .iter()
            .any(|what| line.contains(what))
        })
        .count();
    let report = WriterReport {
        records: appended,
        seconds,
        records_per_s: appended as f64 / seconds,
        writer_cpu_s,
        records_per_writer_cpu_s: appended as f64 / writer_cpu_s.max(1e-9),
        ring_full_waits,
        append_to_durable: report::percentiles(&latency),
        writer_statistics: statistics,
        store_write_stalls,
        store_bytes,
        store_bytes_per_message: store_bytes.map(|bytes| bytes as f64 / args.records as f64),
        writer_args: args.writer_args.clone(),
        writer_core: args.writer_core,
        environment: report::environment(),
    };
    let p = &report.append_to_durable;
    println!(
        "writer: {} records in {:.2} s = {:.0} records/s; writer CPU {:.2} s ({:.0} records per CPU-second); ring-full waits {}",
        report.records,
        report.seconds,
        report.records_per_s,
        report.writer_cpu_s,
        report.records_per_writer_cpu_s,
        report.ring_full_waits
    );
    println!(
        "  append to durable: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
        p.p50_us as f64 / 1000.0,
        p.p90_us as f64 / 1000.0,
        p.p99_us as f64 / 1000.0,
        p.p999_us as f64 / 1000.0,
        p.max_us as f64 / 1000.0
    );
    println!("  writer: {}", report.writer_statistics);
    println!("  store write stalls logged: {}", report.store_write_stalls);
    if let (Some(bytes), Some(per)) = (report.store_bytes, report.store_bytes_per_message) {
        println!("  embedded store on disk: {bytes} bytes, {per:.0} per message");
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

fn connect(socket_path: &Path, ring_path: &Path) -> anyhow::Result<UnixStream> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stream = loop {
        match UnixStream::connect(socket_path) {
            Ok(stream) => break stream,
            Err(error) => {
                anyhow::ensure!(Instant::now() < deadline, "writer socket: {error}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let hello = Request::Hello {
        version: store_wire::READ_PATH_VERSION,
        shard: 0,
        ring: ring_path.canonicalize()?.display().to_string(),
    };
    stream.write_all(&hello.encode())?;
    Ok(stream)
}

type Outcome = (f64, hdrhistogram::Histogram<u64>, u64, f64);

/// Appends one record, waiting (and counting the waits) while the ring is full.
fn append(
    producer: &mut chat_ring::Producer,
    record: &[u8],
    waiting: &Waiting,
    last_end: &mut u64,
    ring_full_waits: &mut u64,
) {
    loop {
        match producer.try_append(record) {
            Ok(end) => {
                waiting
                    .queue
                    .lock()
                    .expect("queue")
                    .push_back((end, Instant::now()));
                *last_end = end;
                return;
            }
            Err(_) => {
                *ring_full_waits += 1;
                producer.wake_consumer();
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }
}

fn drive(
    args: &WriterArgs,
    producer: &mut chat_ring::Producer,
    ring_path: &Path,
    socket_path: &Path,
    writer_pid: u32,
) -> anyhow::Result<Outcome> {
    let stream = connect(socket_path, ring_path)?;
    let waiting = Arc::new(Waiting {
        queue: Mutex::new(VecDeque::new()),
        durable: AtomicU64::new(0),
    });
    let notices = {
        let waiting = waiting.clone();
        let mut stream = stream.try_clone()?;
        std::thread::spawn(move || -> anyhow::Result<hdrhistogram::Histogram<u64>> {
            let mut latency = report::new_histogram();
            let mut buffer = Vec::new();
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                let read = stream.read(&mut chunk)?;
                if read == 0 {
                    return Ok(latency);
                }
                buffer.extend_from_slice(&chunk[..read]);
                let mut used = 0;
                while let Some(len) = store_wire::frame_len(&buffer[used..])? {
                    if buffer.len() - used < len {
                        break;
                    }
                    if let Response::Durable { position } =
                        Response::decode(&buffer[used + 4..used + len])?
                    {
                        let now = Instant::now();
                        let mut queue = waiting.queue.lock().expect("queue");
                        while queue.front().is_some_and(|(end, _)| *end <= position) {
                            let (_, appended) = queue.pop_front().expect("front");
                            let _ = latency
                                .record((now.duration_since(appended).as_micros() as u64).max(1));
                        }
                        waiting.durable.fetch_max(position, Relaxed);
                    }
                    used += len;
                }
                buffer.drain(..used);
            }
        })
    };

    let run_limit = Duration::from_secs(args.time_limit_s);
    let cpu_before = crate::procfs::process_cpu_seconds(writer_pid)?;
    let body = "b".repeat(args.body_bytes);
    let mut ids = SnowflakeGenerator::new(0, 0);
    let users: Vec<String> = (0..args.users).map(|i| format!("u{i}")).collect();
    let started = Instant::now();
    let interval = (args.rate > 0).then(|| Duration::from_secs_f64(1.0 / args.rate as f64));
    let mut ring_full_waits = 0;
    let mut last_end = 0;
    for index in 0..args.records {
        anyhow::ensure!(started.elapsed() < run_limit, "run exceeded its time bound");
        if let Some(interval) = interval {
            let due = started + interval * index as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let from = &users[index as usize % users.len()];
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as u64;
        let message_id = ids.next_id(now_ms);
        let client_msg_id = format!("b{index}");
        // A group: its members from the sender on; its id names the window.
        let (to, conversation, recipients) = if args.group_members > 0 {
            let first = index as usize % users.len();
            let members: Vec<&str> = (0..args.group_members)
                .map(|offset| users[(first + offset) % users.len()].as_str())
                .collect();
            let group = format!("g{first}");
            let conversation = chat_protocol::ids::group_conversation_id(&group);
            (group, conversation, members)
        } else {
            let to = users[(index as usize + 1) % users.len()].clone();
            let conversation = chat_protocol::ids::direct_conversation_id(from, &to);
            (to, conversation, Vec::new())
        };
        let to = to.as_str();
        let record = MessageRecord {
            message_id,
            ts: now_ms,
            conversation: &conversation,
            from,
            from_device: "d0",
            to,
            client_msg_id: &client_msg_id,
            body: &body,
            media: None,
            event: None,
            recipients,
            bodies: Vec::new(),
        }
        .encode();
        let ack = (args.acks && args.group_members == 0).then(|| {
            chat_protocol::records::AckRecord {
                user: to,
                device: "d0",
                message_id,
            }
            .encode()
        });
        for record in std::iter::once(&record).chain(ack.as_ref()) {
            append(
                producer,
                record,
                &waiting,
                &mut last_end,
                &mut ring_full_waits,
            );
        }
        producer.wake_consumer();
    }
    while waiting.durable.load(Relaxed) < last_end {
        anyhow::ensure!(
            started.elapsed() < run_limit,
            "writer did not catch up in time"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    let seconds = started.elapsed().as_secs_f64();
    let writer_cpu_s = crate::procfs::process_cpu_seconds(writer_pid)? - cpu_before;
    stream.shutdown(std::net::Shutdown::Both)?;
    let latency = notices
        .join()
        .map_err(|_| anyhow::anyhow!("notice thread panicked"))??;
    Ok((seconds, latency, ring_full_waits, writer_cpu_s))
}

/// The disk bytes allocated to every file under `dir`, or `None` when it
/// does not exist.
fn tree_bytes(dir: &Path) -> Option<u64> {
    let mut total = 0;
    let mut pending = vec![std::fs::read_dir(dir).ok()?];
    while let Some(entries) = pending.pop() {
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                if let Ok(more) = std::fs::read_dir(entry.path()) {
                    pending.push(more);
                }
            } else if let Ok(meta) = entry.metadata() {
                // Allocated, as `du` counts: journals are preallocated sparse.
                total += std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
            }
        }
    }
    Some(total)
}
