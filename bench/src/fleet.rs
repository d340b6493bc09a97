//! `bench fleet`: the fleet's routing, simulated with the real code, over
//! thousands of nodes and millions of users, with no processes.
//!
//! Owns the simulation: users spread over `--nodes` by `HomeTable` (the
//! table every node computes from the live membership), how many users'
//! homes move when one node leaves and when one joins, the NATS
//! subscriptions per server (per-node subjects against per-user ones), the
//! devices away from home (`--away-share`) and the exceptions their homes
//! hold, the rate each node subject carries at `--rate` messages/s between
//! random users (one publish to the home, one more forward for a device
//! away from it), and the heartbeats each node hears. Prints a table and
//! writes JSON. Never starts a process or opens a socket.

use std::time::Instant;

use backplane_bridge::routing::{user_hash, HomeTable};
use serde_json::json;

/// Subscriptions each node holds under per-node routing: its own node
/// subject, the membership heartbeats, group-membership changes, and
/// async-nats's request inbox (measured: `fleet_routing.rs`).
const SUBJECTS_PER_NODE: u64 = 4;
/// nats-server 2.9.10 per subscription on these machines (500,000 `SUB`s on
/// distinct subjects: RSS 11.8 MB to 420.2 MB).
const NATS_BYTES_PER_SUBSCRIPTION: f64 = 817.0;

#[derive(clap::Args, Debug)]
pub struct FleetArgs {
    /// Connection nodes in the fleet.
    #[arg(long, default_value_t = 4000)]
    pub nodes: u16,
    /// Users (each with a device online, for the subscription count).
    #[arg(long, default_value_t = 10_000_000)]
    pub users: u64,
    /// Messages per second across the fleet (the reference design's peak: 5M).
    #[arg(long, default_value_t = 5_000_000)]
    pub rate: u64,
    /// Messages sampled between random users for the per-subject rates.
    #[arg(long, default_value_t = 5_000_000)]
    pub messages: u64,
    /// Share of devices on a node other than their user's home. Default
    /// (negative): a uniformly random node, as behind a least-connections
    /// load balancer with clients that ignore `hello.home` (1 - 1/nodes).
    /// 0: every client follows `hello.home`.
    #[arg(long, default_value_t = -1.0, allow_hyphen_values = true)]
    pub away_share: f64,
    /// The membership heartbeat interval (`membership_heartbeat_ms`).
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// Write the summary here as JSON.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

pub fn run(args: &FleetArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.nodes >= 2, "--nodes must be at least 2");
    anyhow::ensure!(
        u32::from(args.nodes) <= u32::from(chat_protocol::snowflake::NODE_ID_MAX) + 1,
        "--nodes must fit the node ids (at most 4,096)"
    );
    let nodes: Vec<u16> = (0..args.nodes).collect();
    let started = Instant::now();
    let table = HomeTable::new(&nodes).expect("nodes");
    let build_ms = started.elapsed().as_secs_f64() * 1e3;

    // Users are identified by their hash: the ids are `user<i>`.
    let started = Instant::now();
    let hashes: Vec<u64> = (0..args.users)
        .map(|index| user_hash(&format!("user{index}")))
        .collect();
    let hash_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let homes: Vec<u16> = hashes
        .iter()
        .map(|hash| table.home_of_hash(*hash))
        .collect();
    let lookup_ns = started.elapsed().as_secs_f64() * 1e9 / args.users as f64;
    let (max, mean, min) = spread(&homes, args.nodes);

    // One node leaves (the one with the most users, the worst case), then a
    // node joins (a new id).
    let busiest = busiest(&homes, args.nodes);
    let without: Vec<u16> = nodes.iter().copied().filter(|n| *n != busiest).collect();
    let left = HomeTable::new(&without).expect("nodes");
    let moved_on_leave = moved(&hashes, &homes, &left);
    let joined_nodes: Vec<u16> = nodes.iter().copied().chain([args.nodes]).collect();
    let joined = HomeTable::new(&joined_nodes).expect("nodes");
    let moved_on_join = moved(&hashes, &homes, &joined);

    // Where each user's device is: at home, or (with the away share) on
    // another node, picked at random.
    let away_share = if args.away_share < 0.0 {
        1.0 - 1.0 / f64::from(args.nodes)
    } else {
        args.away_share.min(1.0)
    };
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        splitmix(state)
    };
    let devices: Vec<u16> = homes
        .iter()
        .map(|home| {
            if (next() % 1_000_000) as f64 >= away_share * 1e6 {
                return *home;
            }
            let other = (next() % u64::from(args.nodes - 1)) as u16;
            if other >= *home {
                other + 1
            } else {
                other
            }
        })
        .collect();
    let mut exceptions = vec![0u64; usize::from(args.nodes)];
    for (home, device) in homes.iter().zip(&devices) {
        if home != device {
            exceptions[usize::from(*home)] += 1;
        }
    }
    let exceptions_max = exceptions.iter().max().copied().unwrap_or(0);
    let exceptions_mean = exceptions.iter().sum::<u64>() as f64 / f64::from(args.nodes);

    // A message from a device on node S to a user homed on H whose device
    // is on D: one publish to H unless S is H, and one forward from H to D
    // unless D is H or S.
    let mut per_subject = vec![0u64; usize::from(args.nodes)];
    let mut publishes = 0u64;
    for _ in 0..args.messages {
        let sender = devices[(next() % args.users) as usize];
        let recipient = (next() % args.users) as usize;
        let (home, device) = (homes[recipient], devices[recipient]);
        if home != sender {
            per_subject[usize::from(home)] += 1;
            publishes += 1;
        }
        if device != home && device != sender {
            per_subject[usize::from(device)] += 1;
            publishes += 1;
        }
    }
    let scale = args.rate as f64 / args.messages as f64;
    let subject_max = *per_subject.iter().max().unwrap_or(&0) as f64 * scale;
    let subject_mean = publishes as f64 * scale / f64::from(args.nodes);
    let publishes_per_message = publishes as f64 / args.messages as f64;
    let heartbeats_per_node_s =
        f64::from(args.nodes - 1) * 1000.0 / args.heartbeat_ms.max(1) as f64;

    let subscriptions_per_node_routing = SUBJECTS_PER_NODE * u64::from(args.nodes);
    let subscriptions_per_user_routing = args.users;
    println!(
        "fleet: {} nodes, {} users, {} msgs/s (routing simulated with HomeTable, no processes)",
        args.nodes, args.users, args.rate
    );
    println!(
        "  table build {build_ms:.1} ms; user hash {:.0} ns; home look-up {lookup_ns:.1} ns",
        hash_s * 1e9 / args.users as f64
    );
    println!(
        "  users per node      max {max}  mean {mean:.1}  min {min}  (max/mean {:.3})",
        max as f64 / mean
    );
    println!(
        "  homes moved         one node leaves: {:.4}% of users ({:.2}x its share); one joins: {:.4}%",
        moved_on_leave * 100.0,
        moved_on_leave * f64::from(args.nodes),
        moved_on_join * 100.0
    );
    println!(
        "  NATS subscriptions  per-node routing {} ({:.1} MB at {NATS_BYTES_PER_SUBSCRIPTION} B); per-user routing {} ({:.1} GB)",
        subscriptions_per_node_routing,
        subscriptions_per_node_routing as f64 * NATS_BYTES_PER_SUBSCRIPTION / 1e6,
        subscriptions_per_user_routing,
        subscriptions_per_user_routing as f64 * NATS_BYTES_PER_SUBSCRIPTION / 1e9
    );
    println!(
        "  devices away        {:.1}% of users; exceptions per home max {exceptions_max}  mean {exceptions_mean:.1}",
        away_share * 100.0
    );
    println!(
        "  per node subject    mean {subject_mean:.0} msgs/s  max {subject_max:.0} msgs/s; {publishes_per_message:.3} publishes per message ({} messages sampled)",
        args.messages
    );
    println!(
        "  heartbeats          {heartbeats_per_node_s:.0} received per node per second (every {} ms)",
        args.heartbeat_ms
    );
    if let Some(path) = &args.json {
        let summary = json!({
            "nodes": args.nodes,
            "users": args.users,
            "rate_per_s": args.rate,
            "table_build_ms": build_ms,
            "home_lookup_ns": lookup_ns,
            "users_per_node": {"max": max, "mean": mean, "min": min},
            "moved_share": {"one_leaves": moved_on_leave, "one_joins": moved_on_join},
            "nats_subscriptions": {
                "per_node_routing": subscriptions_per_node_routing,
                "per_user_routing": subscriptions_per_user_routing,
                "bytes_per_subscription": NATS_BYTES_PER_SUBSCRIPTION,
            },
            "away_share": away_share,
            "exceptions_per_home": {"max": exceptions_max, "mean": exceptions_mean},
            "per_node_subject_msgs_per_s": {"mean": subject_mean, "max": subject_max},
            "publishes_per_message": publishes_per_message,
            "heartbeats_per_node_per_s": heartbeats_per_node_s,
            "messages_sampled": args.messages,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)?;
    }
    Ok(())
}

fn spread(homes: &[u16], nodes: u16) -> (u64, f64, u64) {
    let mut counts = vec![0u64; usize::from(nodes)];
    for home in homes {
        counts[usize::from(*home)] += 1;
    }
    let max = *counts.iter().max().unwrap_or(&0);
    let min = *counts.iter().min().unwrap_or(&0);
    (max, homes.len() as f64 / f64::from(nodes), min)
}

fn busiest(homes: &[u16], nodes: u16) -> u16 {
    let mut counts = vec![0u64; usize::from(nodes)];
    for home in homes {
        counts[usize::from(*home)] += 1;
    }
    (0..nodes)
        .max_by_key(|n| counts[usize::from(*n)])
        .unwrap_or(0)
}

fn moved(hashes: &[u64], homes: &[u16], after: &HomeTable) -> f64 {
    let moved = hashes
        .iter()
        .zip(homes)
        .filter(|(hash, home)| after.home_of_hash(**hash) != **home)
        .count();
    moved as f64 / hashes.len() as f64
}

fn splitmix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
