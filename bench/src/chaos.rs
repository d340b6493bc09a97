//! `bench chaos`: the cluster chaos scenario of the test suite, run for
//! minutes with faults at random moments, and its audit reported.
//!
//! Owns the command line and the random fault schedule (seeded, so a run
//! can be repeated); the cluster, the clients and the audit are
//! `testkit::chaos`, the same code the suite's short version runs. Starts
//! release binaries next to this one, a private PostgreSQL and a NATS
//! cluster on loopback ports. Never asserts: it reports what was lost
//! (which must be nothing) and the longest wait for `sent`.

use std::time::Duration;

use serde_json::json;
use testkit::chaos::{self, Fault, Plan};

#[derive(clap::Args, Debug)]
pub struct ChaosArgs {
    /// How long the senders stream (the faults stop a little before).
    #[arg(long, default_value_t = 5)]
    pub minutes: u64,
    /// Gateway nodes, each with its storage-writer.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// NATS servers in the cluster.
    #[arg(long, default_value_t = 3)]
    pub nats_servers: usize,
    /// Sender → receiver pairs.
    #[arg(long, default_value_t = 8)]
    pub pairs: usize,
    /// Pause after each `sent` before a sender's next send (ms).
    #[arg(long, default_value_t = 20)]
    pub send_pause_ms: u64,
    /// Pause between faults: random in this range (s).
    #[arg(long, default_value_t = 4)]
    pub fault_every_min_s: u64,
    #[arg(long, default_value_t = 12)]
    pub fault_every_max_s: u64,
    /// Which faults to draw from: gateway, writer, nats, postgres.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "gateway,writer,nats,postgres"
    )]
    pub faults: Vec<String>,
    /// Seed of the fault schedule (0: a random one, printed).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Writes the report here as JSON.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// The names `--faults` takes.
const KINDS: [&str; 4] = ["gateway", "writer", "nats", "postgres"];

fn kind_of(fault: &Fault) -> &'static str {
    match fault {
        Fault::KillGateway { .. } => "gateway",
        Fault::KillWriter { .. } => "writer",
        Fault::KillNats { .. } => "nats",
        Fault::StopPostgres { .. } => "postgres",
    }
}

pub fn run(args: &ChaosArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.nodes >= 2, "--nodes must be at least 2");
    anyhow::ensure!(args.nats_servers >= 1, "--nats-servers must be at least 1");
    anyhow::ensure!(
        args.fault_every_min_s >= 1 && args.fault_every_min_s <= args.fault_every_max_s,
        "--fault-every-min-s must be at least 1 and at most --fault-every-max-s"
    );
    for kind in &args.faults {
        anyhow::ensure!(
            KINDS.contains(&kind.as_str()),
            "--faults: {kind:?} is none of {KINDS:?}"
        );
    }
    let seed = if args.seed == 0 {
        fastrand::u64(1..)
    } else {
        args.seed
    };
    let mut rng = fastrand::Rng::with_seed(seed);
    let streaming = Duration::from_secs(args.minutes * 60);
    // Faults until 20 s before the end, so the last one is over under load.
    let mut faults = Vec::new();
    let mut at = Duration::ZERO;
    loop {
        let pause = Duration::from_secs(rng.u64(args.fault_every_min_s..=args.fault_every_max_s));
        at += pause + Duration::from_secs(4);
        if at + Duration::from_secs(20) > streaming {
            break;
        }
        let fault =
            std::iter::repeat_with(|| Fault::random(&mut rng, args.nodes, args.nats_servers))
                .find(|fault| args.faults.iter().any(|kind| kind == kind_of(fault)))
                .expect("an endless draw finds an allowed kind");
        faults.push((pause, fault));
    }
    let plan = Plan {
        nodes: args.nodes,
        nats_servers: args.nats_servers,
        pairs: args.pairs,
        sends_per_sender: usize::MAX,
        until: streaming,
        tail: Duration::from_secs(10),
        send_pause: Duration::from_millis(args.send_pause_ms),
        faults,
    };
    println!(
        "chaos: {} nodes, {} NATS servers, {} pairs, {} faults planned over {} min (seed {seed})",
        args.nodes,
        args.nats_servers,
        args.pairs,
        plan.faults.len(),
        args.minutes
    );
    let report = chaos::run(&plan);
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for (_, fault) in &report.faults {
        *counts.entry(kind_of(fault)).or_default() += 1;
    }
    println!("faults inflicted: {} ({counts:?})", report.faults.len());
    println!(
        "acknowledged {} in {:.0} s; lost {}, duplicates {}, changed ids {}, out of order {}, undelivered after the final sync {}, never acknowledged {}",
        report.acknowledged,
        report.elapsed.as_secs_f64(),
        report.lost,
        report.duplicates,
        report.changed_ids,
        report.out_of_order,
        report.undelivered,
        report.never_acknowledged
    );
    println!(
        "reached an online receiver only on its final sync: {} (acknowledged at: {:?})",
        report.only_on_final_sync, report.undelivered_examples
    );
    println!(
        "longest wait for `sent`: {:.2} s; sender reconnects {}; refusals (overloaded/unavailable) {}; clean: {}",
        report.longest_wait_for_sent.as_secs_f64(),
        report.sender_reconnects,
        report.refusals,
        report.is_clean()
    );
    if let Some(path) = &args.json {
        let faults: Vec<_> = report
            .faults
            .iter()
            .map(|(at, fault)| json!({"at_s": at.as_secs_f64(), "fault": format!("{fault:?}")}))
            .collect();
        let out = json!({
            "scenario": "chaos",
            "seed": seed,
            "nodes": args.nodes,
            "nats_servers": args.nats_servers,
            "pairs": args.pairs,
            "minutes": args.minutes,
            "faults": faults,
            "fault_counts": counts,
            "acknowledged": report.acknowledged,
            "lost": report.lost,
            "duplicates": report.duplicates,
            "changed_ids": report.changed_ids,
            "out_of_order": report.out_of_order,
            "undelivered": report.undelivered,
            "only_on_final_sync": report.only_on_final_sync,
            "never_acknowledged": report.never_acknowledged,
            "longest_wait_for_sent_s": report.longest_wait_for_sent.as_secs_f64(),
            "sender_reconnects": report.sender_reconnects,
            "refusals": report.refusals,
            "elapsed_s": report.elapsed.as_secs_f64(),
            "clean": report.is_clean(),
            "environment": crate::report::environment(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
    }
    anyhow::ensure!(report.is_clean(), "the audit found losses: {report:#?}");
    Ok(())
}
