//! The `cross-node` scenario: delivery latency between two gateway nodes over
//! the NATS backplane, next to delivery within one node, in the same run.
//!
//! Owns starting nats-server and two gateway nodes (separate ports, node ids
//! 1 and 2, each with its own storage-writer), then an open-loop schedule that
//! alternates between pairs whose sender and recipient share node 1 and pairs
//! whose recipient is on node 2. Latency runs from each send's intended time
//! to the recipient's `message`. Bounded by count and time.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::child::free_port;
use crate::clock::monotonic_ns;
use crate::gateway_process::GatewayProcess;
use crate::nats_peer::NatsServer;
use crate::report::{self, Percentiles};
use crate::wsclient;

#[derive(clap::Args, Debug, Clone)]
pub struct CrossNodeArgs {
    /// The gateway binary (started twice).
    #[arg(long, default_value = "target/release/gateway")]
    pub gateway: String,
    /// Extra flags for both gateways.
    #[arg(long = "gateway-arg", allow_hyphen_values = true)]
    pub gateway_args: Vec<String>,
    #[arg(long, default_value = "nats-server")]
    pub nats_server: String,
    #[arg(long, env = "GATEWAY_AUTH_SECRET", hide_env_values = true)]
    pub secret: String,
    /// Gateway nodes: senders on the first, cross-node recipients spread
    /// over the others. With 3 or more, a recipient's home is often neither
    /// node, and its messages take two hops (sender → home → recipient).
    #[arg(long, default_value_t = 2)]
    pub nodes: u16,
    /// Sender-recipient pairs in each group (same node, cross node).
    #[arg(long, default_value_t = 50)]
    pub pairs: usize,
    /// Total sends per second, alternating between the groups.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    #[arg(long, default_value_t = 10)]
    pub duration_s: u64,
    #[arg(long, default_value_t = 2)]
    pub warmup_s: u64,
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Debug, serde::Serialize)]
pub struct CrossNodeReport {
    pub nodes: u16,
    pub pairs_per_group: usize,
    pub rate_per_s: u64,
    pub sent: u64,
    pub late_sends: u64,
    pub same_node: Percentiles,
    pub cross_node: Percentiles,
    pub environment: serde_json::Value,
}

fn token(secret: &str, user: &str) -> anyhow::Result<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    chat_protocol::token::mint(secret.as_bytes(), user, "d0", now, now + 3600)
        .map_err(|error| anyhow::anyhow!("{error}"))
}

/// Opens a connection and reads through its connect-time sync, so the node's
/// backplane subscription for the user is in place before anyone sends.
fn open_synced(
    node: std::net::SocketAddr,
    secret: &str,
    user: &str,
) -> anyhow::Result<(TcpStream, Vec<u8>)> {
    let source = std::net::IpAddr::from([127, 0, 0, 1]);
    let (mut stream, mut buffer) = wsclient::open(node, source, &token(secret, user)?)?;
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut used = 0;
        let mut synced = false;
        while let Some((frame, length)) = wsclient::decode(&buffer[used..]) {
            used += length;
            if let wsclient::ServerFrame::Text(text) = frame {
                synced |= text.starts_with(br#"{"type":"synced""#);
            }
        }
        buffer.drain(..used);
        if synced {
            return Ok((stream, buffer));
        }
        anyhow::ensure!(Instant::now() < deadline, "no synced for {user}");
        let read = stream.read(&mut chunk)?;
        anyhow::ensure!(read > 0, "closed before synced");
        buffer.extend_from_slice(&chunk[..read]);
    }
}

pub fn run(args: &CrossNodeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.pairs >= 1 && args.rate >= 1,
        "need 1+ pairs and a rate"
    );
    anyhow::ensure!((2..=8).contains(&args.nodes), "--nodes must be 2-8");
    let nats = NatsServer::start(&args.nats_server)?;
    let mut nodes = Vec::new();
    for node_id in 1..=args.nodes {
        let ws: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let mut extra = args.gateway_args.clone();
        extra.extend([
            "--node-id".into(),
            node_id.to_string(),
            "--nats-url".into(),
            format!("nats://{}", nats.client),
        ]);
        nodes.push((
            ws,
            GatewayProcess::start(&args.gateway, &args.secret, &extra, ws)?,
        ));
    }
    for (_, process) in &nodes {
        // A settled membership: no home moves during the run.
        process.wait_metric("gateway_backplane_nodes_live", u64::from(args.nodes))?;
    }
    let node_a = nodes[0].0;
    let others: Vec<std::net::SocketAddr> = nodes[1..].iter().map(|(ws, _)| *ws).collect();

    // Recipients first (each waits for its subscription), then senders on node 1.
    let mut readers = Vec::new();
    let measure_from_ns = monotonic_ns() + 3_000_000_000 + args.warmup_s * 1_000_000_000;
    let end_ns = measure_from_ns + args.duration_s * 1_000_000_000;
    for group in ["s", "x"] {
        for pair in 0..args.pairs {
            let node = match group {
                "s" => node_a,
                _ => others[pair % others.len()],
            };
            let (stream, rest) = open_synced(node, &args.secret, &format!("cn-{group}r{pair}"))?;
            readers.push(std::thread::spawn(move || {
                read_deliveries(stream, rest, measure_from_ns, end_ns)
            }));
        }
    }
    let mut senders = Vec::new();
    for group in ["s", "x"] {
        for pair in 0..args.pairs {
            senders.push(open_synced(node_a, &args.secret, &format!("cn-{group}s{pair}"))?.0);
        }
    }

    // Open loop from `start_ns`: send k is due at start + k / rate; groups alternate.
    let start_ns = measure_from_ns - args.warmup_s * 1_000_000_000;
    let interval_ns = 1_000_000_000 / args.rate;
    let total = (end_ns - start_ns) / interval_ns;
    let mut late_sends = 0;
    let mut frame = Vec::with_capacity(256);
    for k in 0..total {
        let due = start_ns + k * interval_ns;
        let now = monotonic_ns();
        if now < due {
            std::thread::sleep(Duration::from_nanos(due - now));
        } else if now - due > 1_000_000 {
            late_sends += 1;
        }
        let (group, index) = if k % 2 == 0 {
            ("s", 0)
        } else {
            ("x", args.pairs)
        };
        let pair = (k / 2) as usize % args.pairs;
        let json = serde_json::json!({
            "type": "send",
            "id": format!("k{k}"),
            "to": format!("cn-{group}r{pair}"),
            "body": format!("t{due}:{group}"),
        })
        .to_string();
        frame.clear();
        wsclient::encode_text(json.as_bytes(), &mut frame);
        senders[index + pair].write_all(&frame)?;
    }
    let mut same = report::new_histogram();
    let mut cross = report::new_histogram();
    for reader in readers {
        let (s, x) = reader
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))??;
        same.add(&s)?;
        cross.add(&x)?;
    }
    drop(senders);
    drop(nodes);
    drop(nats);

    let report = CrossNodeReport {
        nodes: args.nodes,
        pairs_per_group: args.pairs,
        rate_per_s: args.rate,
        sent: total,
        late_sends,
        same_node: report::percentiles(&same),
        cross_node: report::percentiles(&cross),
        environment: report::environment(),
    };
    println!(
        "cross-node: {} nodes, {} msgs/s for {} s ({} sent, {} late), {} pairs per group",
        report.nodes,
        report.rate_per_s,
        args.duration_s,
        report.sent,
        report.late_sends,
        report.pairs_per_group
    );
    println!("  latency         p50      p90      p99    p99.9      max     count");
    for (name, p) in [
        ("same node", &report.same_node),
        ("cross node", &report.cross_node),
    ] {
        println!(
            "  {name:<12} {:>7.3}  {:>7.3}  {:>7.3}  {:>7.3}  {:>7.3}  {:>8}  (ms)",
            p.p50_us as f64 / 1000.0,
            p.p90_us as f64 / 1000.0,
            p.p99_us as f64 / 1000.0,
            p.p999_us as f64 / 1000.0,
            p.max_us as f64 / 1000.0,
            p.count
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

/// Reads `message` frames until `end_ns` (plus a second of grace), recording
/// latency from the intended time in each body, split by group.
fn read_deliveries(
    mut stream: TcpStream,
    mut buffer: Vec<u8>,
    measure_from_ns: u64,
    end_ns: u64,
) -> anyhow::Result<(Histogram<u64>, Histogram<u64>)> {
    let mut same = report::new_histogram();
    let mut cross = report::new_histogram();
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut chunk = vec![0u8; 16 * 1024];
    while monotonic_ns() < end_ns + 1_000_000_000 {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(read) => buffer.extend_from_slice(&chunk[..read]),
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(error) => return Err(error.into()),
        }
        let now = monotonic_ns();
        let mut used = 0;
        while let Some((frame, length)) = wsclient::decode(&buffer[used..]) {
            used += length;
            let wsclient::ServerFrame::Text(text) = frame else {
                continue;
            };
            let Ok(value) = serde_json::from_slice::<serde_json::Value>(text) else {
                continue;
            };
            let Some(body) = value["body"].as_str().and_then(|b| b.strip_prefix('t')) else {
                continue;
            };
            let Some((intended, group)) = body.split_once(':') else {
                continue;
            };
            let Ok(intended) = intended.parse::<u64>() else {
                continue;
            };
            if intended < measure_from_ns || intended >= end_ns {
                continue;
            }
            let micros = (now.saturating_sub(intended) / 1000).max(1);
            let histogram = if group == "x" { &mut cross } else { &mut same };
            let _ = histogram.record(micros);
        }
        buffer.drain(..used);
    }
    Ok((same, cross))
}
