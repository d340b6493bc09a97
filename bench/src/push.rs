//! The `push` scenario: offline recipients with Web Push subscriptions get
//! messages at a fixed rate; how long from durable to the push being
//! accepted, how many pushes per second one writer's push worker sends, and
//! what a pending push costs in memory.
//!
//! Owns running the local Web Push service (`web-push-testing`, from
//! `clients/js/node_modules`: it checks VAPID and decrypts every push, so it
//! is the real work of a push service), the VAPID key (made with the
//! `openssl` command), registering one subscription per recipient, pacing
//! the senders, and reading the storage-writer's push metrics and memory.
//! Phase 1: each recipient gets one message (one push each, no coalescing).
//! Phase 2: each gets a second within the coalescing window, so every
//! device holds a pending push; the writer's memory before and after gives
//! the cost of one. Bounded by count and time.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use base64ct::{Base64UrlUnpadded, Encoding};
use serde_json::{json, Value};

use crate::gateway_process::GatewayTarget;
use crate::offline_sync::read_frames;
use crate::{procfs, wsclient};

/// Longest any phase may take.
const PHASE_LIMIT: Duration = Duration::from_secs(300);

#[derive(clap::Args, Debug, Clone)]
pub struct PushArgs {
    #[command(flatten)]
    pub gateway: GatewayTarget,
    /// Offline recipients, each with its own subscription; each gets one
    /// message per phase.
    #[arg(long, default_value_t = 10_000)]
    pub users: usize,
    /// Messages per second to them (phase 1 and 2).
    #[arg(long, default_value_t = 1_000)]
    pub rate: u64,
    /// Sender connections (each stays under the per-user send allowance).
    #[arg(long, default_value_t = 100)]
    pub senders: usize,
    /// How long a device has to acknowledge before it is pushed (the
    /// recipients here are offline, so this is added to every push's latency).
    #[arg(long, default_value_t = 0)]
    pub ack_wait_ms: u64,
    /// The web-push-testing server script.
    #[arg(
        long,
        default_value = "clients/js/node_modules/web-push-testing/src/bin/server.js"
    )]
    pub service_script: String,
    /// Skip phase 2 (the pending-push memory).
    #[arg(long)]
    pub no_pending_phase: bool,
    #[arg(long, default_value = "push")]
    pub user_prefix: String,
    /// JSON summary.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Debug, serde::Serialize)]
pub struct PushReport {
    pub users: usize,
    pub rate: u64,
    pub ack_wait_ms: u64,
    pub sent: u64,
    pub failed: u64,
    pub phase1_seconds: f64,
    pub pushes_per_s: f64,
    /// Durable to accepted by the push service, from the writer's
    /// histogram: the upper bound of the bucket holding each percentile.
    pub latency_p50_ms_at_most: f64,
    pub latency_p99_ms_at_most: f64,
    pub latency_mean_ms: f64,
    pub writer_rss_before: u64,
    pub writer_rss_after_phase1: u64,
    pub writer_rss_with_pending: Option<u64>,
    pub pending: u64,
    pub bytes_per_pending_push: Option<f64>,
    pub writer_cpu_seconds_phase1: f64,
    /// The local push service's CPU in phase 1 (it decrypts every push).
    pub service_cpu_seconds_phase1: f64,
}

struct Service {
    child: Child,
    port: u16,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http(port: u16, request: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").context("an HTTP answer")?;
    Ok((
        head.get(9..12).context("a status")?.parse()?,
        body.to_owned(),
    ))
}

fn post_json(port: u16, path: &str, body: &Value) -> Result<(u16, String)> {
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    http(
        port,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

fn start_service(script: &str) -> Result<Service> {
    anyhow::ensure!(
        std::path::Path::new(script).exists(),
        "{script} is missing: run `npm ci` in clients/js"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new("node")
        .args([script, &port.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .context("starting web-push-testing with node")?;
    let service = Service { child, port };
    let deadline = Instant::now() + Duration::from_secs(15);
    while post_json(port, "/status", &Value::Null)
        .map(|(s, _)| s)
        .ok()
        != Some(200)
    {
        anyhow::ensure!(Instant::now() < deadline, "web-push-testing did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(service)
}

/// A P-256 VAPID key in `dir` (by the openssl command): its path and the
/// base64url public key.
fn vapid_key(dir: &std::path::Path) -> Result<(std::path::PathBuf, String)> {
    let key = dir.join("vapid.pem");
    let status = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
        ])
        .arg(&key)
        .status()
        .context("running openssl")?;
    anyhow::ensure!(status.success(), "openssl genpkey failed");
    let der = Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(&key)
        .output()?
        .stdout;
    anyhow::ensure!(der.len() >= 65, "openssl gave no public key");
    // The uncompressed point is the SubjectPublicKeyInfo's last 65 bytes.
    Ok((
        key,
        Base64UrlUnpadded::encode_string(&der[der.len() - 65..]),
    ))
}

/// The storage-writer's metrics text.
fn writer_metrics(address: SocketAddr) -> Result<String> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: writer\r\n\r\n")?;
    let mut body = String::new();
    stream.read_to_string(&mut body)?;
    Ok(body)
}

fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.split(['{', ' ']).next() == Some(name))
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The upper bound (ms) of the bucket holding quantile `q` of the writer's
/// Web Push latency histogram.
fn bucket_quantile(text: &str, q: f64) -> f64 {
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|line| {
            line.starts_with("storage_writer_push_latency_seconds_bucket{provider=\"webpush\"")
        })
        .filter_map(|line| {
            let le = line.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, line.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map_or(0.0, |b| b.1);
    buckets
        .iter()
        .find(|(_, count)| *count >= q * total)
        .map_or(f64::NAN, |(le, _)| le * 1000.0)
}

fn writer_pid(gateway_pid: u32) -> Option<u32> {
    procfs::children(gateway_pid).into_iter().next()
}

/// Sends one message to each recipient, from `senders` connections, paced at `rate`.
fn send_round(args: &PushArgs, senders: &mut [(TcpStream, Vec<u8>)], round: usize) -> Result<()> {
    let interval = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let started = Instant::now();
    let deadline = started + PHASE_LIMIT;
    let mut frame = Vec::with_capacity(256);
    for user in 0..args.users {
        let due = started + interval.mul_f64(user as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let (stream, buffer) = &mut senders[user % args.senders];
        let text = json!({"type": "send", "id": format!("r{round}-{user}"), "to": format!("{}-r{user}", args.user_prefix), "body": "opaque"}).to_string();
        frame.clear();
        wsclient::encode_text(text.as_bytes(), &mut frame);
        stream.write_all(&frame)?;
        // Each sender's `sent` before its next send (durable, so countable).
        read_frames(stream, buffer, deadline, |text| {
            text.starts_with(br#"{"type":"sent""#)
        })
        .with_context(|| format!("waiting for `sent` of round {round}, recipient {user}"))?;
    }
    Ok(())
}

pub fn run(args: &PushArgs) -> Result<()> {
    anyhow::ensure!(
        args.users >= 1 && args.senders >= 1,
        "need 1+ users and senders"
    );
    anyhow::ensure!(
        args.rate as f64 / args.senders as f64 <= 20.0,
        "keep --rate / --senders at most 20 (the gateway's per-user send rate)"
    );
    let service = start_service(&args.service_script)?;
    let dir = std::env::temp_dir().join(format!("bench-push-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (key, public) = vapid_key(&dir)?;
    let metrics_address: SocketAddr = format!(
        "127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    )
    .parse()?;
    let mut target = args.gateway.clone();
    target.gateway_args.extend(
        [
            "--push-vapid-key".to_owned(),
            key.display().to_string(),
            "--push-ack-wait-ms".into(),
            args.ack_wait_ms.to_string(),
            // Long enough that phase 2's message to each device waits in its window.
            "--push-coalesce-ms".into(),
            "600000".into(),
            "--metrics-listen".into(),
            metrics_address.to_string(),
        ]
        .map(|arg| format!("--storage-writer-arg={arg}")),
    );
    target
        .gateway_args
        .extend(["--push-loopback-endpoints".into(), "true".into()]);
    let gateway = target.resolve()?;
    let gateway_pid = *gateway
        .pids
        .first()
        .context("a spawned gateway (--spawn-gateway)")?;
    let writer = writer_pid(gateway_pid).context("the gateway's storage-writer")?;
    let rss = || {
        procfs::process_memory(writer)
            .map(|m| m.rss_bytes)
            .unwrap_or(0)
    };

    // Subscriptions and registrations: each recipient registers, then leaves.
    let started = Instant::now();
    for user in 0..args.users {
        let (status, body) = post_json(
            service.port,
            "/subscribe",
            &json!({"userVisibleOnly": "true", "applicationServerKey": public}),
        )?;
        anyhow::ensure!(status == 200, "subscribe: {body}");
        let data: Value = serde_json::from_str(&body)?;
        let data = &data["data"];
        let token = args
            .gateway
            .token(&format!("{}-r{user}", args.user_prefix))?;
        let (mut stream, mut buffer) =
            wsclient::open(gateway.address, args.gateway.source(user), &token)?;
        let text = json!({"type": "push_register", "id": "r", "push": {
            "kind": "webpush", "endpoint": data["endpoint"], "p256dh": data["keys"]["p256dh"], "auth": data["keys"]["auth"],
        }})
        .to_string();
        let mut frame = Vec::new();
        wsclient::encode_text(text.as_bytes(), &mut frame);
        stream.write_all(&frame)?;
        let mut refused = None;
        read_frames(&mut stream, &mut buffer, started + PHASE_LIMIT, |text| {
            if text.starts_with(br#"{"type":"error""#) {
                refused = Some(String::from_utf8_lossy(text).into_owned());
                return true;
            }
            text.starts_with(br#"{"type":"push_registered""#)
        })
        .with_context(|| format!("registering recipient {user}"))?;
        if let Some(refused) = refused {
            anyhow::bail!("registering recipient {user}: {refused}");
        }
    }
    println!(
        "push: {} subscriptions registered in {:.1} s",
        args.users,
        started.elapsed().as_secs_f64()
    );
    let mut senders = Vec::with_capacity(args.senders);
    for index in 0..args.senders {
        let token = args
            .gateway
            .token(&format!("{}-s{index}", args.user_prefix))?;
        senders.push(wsclient::open(
            gateway.address,
            args.gateway.source(index),
            &token,
        )?);
    }

    // Phase 1: one message to each; wait until every push is settled.
    let rss_before = rss();
    let cpu_before = procfs::process_cpu_seconds(writer).unwrap_or(0.0);
    let service_cpu = || procfs::process_cpu_seconds(service.child.id()).unwrap_or(0.0);
    let service_cpu_before = service_cpu();
    let phase1 = Instant::now();
    send_round(args, &mut senders, 1)?;
    let deadline = Instant::now() + PHASE_LIMIT;
    let (sent, failed) = loop {
        let text = writer_metrics(metrics_address)?;
        let sent = metric(
            &text,
            "storage_writer_push_sent_total",
            &["provider=\"webpush\""],
        );
        let failed = metric(&text, "storage_writer_push_failed_total", &[]);
        if sent + failed >= args.users as f64 || Instant::now() > deadline {
            break (sent as u64, failed as u64);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let phase1_seconds = phase1.elapsed().as_secs_f64();
    let cpu_phase1 = procfs::process_cpu_seconds(writer).unwrap_or(0.0) - cpu_before;
    let service_cpu_phase1 = service_cpu() - service_cpu_before;
    let text = writer_metrics(metrics_address)?;
    let count = metric(
        &text,
        "storage_writer_push_latency_seconds_count",
        &["provider=\"webpush\""],
    );
    let sum = metric(
        &text,
        "storage_writer_push_latency_seconds_sum",
        &["provider=\"webpush\""],
    );
    let rss_phase1 = rss();

    // Phase 2: a second message each, inside the window: every device pending.
    let (rss_pending, pending) = if args.no_pending_phase {
        (None, 0)
    } else {
        send_round(args, &mut senders, 2)?;
        let deadline = Instant::now() + PHASE_LIMIT;
        let pending = loop {
            let pending = metric(
                &writer_metrics(metrics_address)?,
                "storage_writer_push_pending",
                &[],
            );
            if pending >= args.users as f64 || Instant::now() > deadline {
                break pending as u64;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (Some(rss()), pending)
    };
    let report = PushReport {
        users: args.users,
        rate: args.rate,
        ack_wait_ms: args.ack_wait_ms,
        sent,
        failed,
        phase1_seconds,
        pushes_per_s: sent as f64 / phase1_seconds,
        latency_p50_ms_at_most: bucket_quantile(&text, 0.50),
        latency_p99_ms_at_most: bucket_quantile(&text, 0.99),
        latency_mean_ms: if count > 0.0 {
            sum / count * 1000.0
        } else {
            f64::NAN
        },
        writer_rss_before: rss_before,
        writer_rss_after_phase1: rss_phase1,
        writer_rss_with_pending: rss_pending,
        pending,
        bytes_per_pending_push: rss_pending
            .filter(|_| pending > 0)
            .map(|with| (with as f64 - rss_phase1 as f64) / pending as f64),
        writer_cpu_seconds_phase1: cpu_phase1,
        service_cpu_seconds_phase1: service_cpu_phase1,
    };
    println!(
        "push: {} pushes sent, {} failed, {:.0}/s over {:.1} s; durable to accepted p50 <= {} ms, p99 <= {} ms (mean {:.1} ms; ack wait {} ms)",
        report.sent, report.failed, report.pushes_per_s, report.phase1_seconds,
        report.latency_p50_ms_at_most, report.latency_p99_ms_at_most, report.latency_mean_ms, report.ack_wait_ms
    );
    println!(
        "  writer rss {:.1} -> {:.1} MiB after phase 1; writer CPU {:.2} s for phase 1 ({:.0} µs per push); push service CPU {:.2} s",
        report.writer_rss_before as f64 / 1048576.0,
        report.writer_rss_after_phase1 as f64 / 1048576.0,
        report.writer_cpu_seconds_phase1,
        report.writer_cpu_seconds_phase1 * 1e6 / report.sent.max(1) as f64,
        report.service_cpu_seconds_phase1
    );
    if let (Some(with), Some(bytes)) = (
        report.writer_rss_with_pending,
        report.bytes_per_pending_push,
    ) {
        println!(
            "  {} pushes pending: writer rss {:.1} MiB, {bytes:.0} B per pending push",
            report.pending,
            with as f64 / 1048576.0
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
