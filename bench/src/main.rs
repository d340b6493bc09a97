//! `bench`: the load generator benchmark engineers use to reproduce our figures.
//!
//! Scenarios are subcommands. This file owns the command line; each scenario
//! lives in its own module and prints a table plus an optional JSON summary.
//! Never asserts speed: it measures and reports.

mod chaos;
mod child;
mod clock;
mod connect;
mod cross_node;
mod fleet;
mod gateway_process;
mod group;
mod nats_peer;
mod nonblocking;
mod offline_sync;
mod one_to_one;
mod procfs;
mod push;
mod reconnect_storm;
mod report;
mod schedule;
mod timer;
mod writer;
mod wsclient;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "bench", about = "Load generator for the chat gateway")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Open and hold N authenticated connections; report time, errors and the
    /// gateway's memory per connection.
    Connect(connect::ConnectArgs),
    /// N users sending 1:1 messages between random pairs at a fixed open-loop
    /// rate; delivery and acknowledgement latency from each send's intended time.
    OneToOne(one_to_one::OneToOneArgs),
    /// N connected clients drop and reconnect at once; time, rate, errors and
    /// drop-to-hello latency until every client is back.
    ReconnectStorm(reconnect_storm::ReconnectStormArgs),
    /// Messages pile up for offline users, who then connect and drain them
    /// through the connect-time sync; drain time, rate and completeness.
    OfflineSync(offline_sync::OfflineSyncArgs),
    /// The storage-writer alone, fed by a synthetic shard: records/s, CPU,
    /// batch sizes, and append-to-durable latency, for any backend.
    Writer(writer::WriterArgs),
    /// Groups of G members, one sender each, at a fixed open-loop rate:
    /// delivery to every member, fan-out completion, and (with offline
    /// members) their sync afterwards.
    Group(group::GroupArgs),
    /// Two gateway nodes and nats-server: delivery latency across nodes next
    /// to within one node, in the same run.
    CrossNode(cross_node::CrossNodeArgs),
    /// The fleet's routing simulated with the real code over thousands of
    /// nodes and millions of users: balance, moves on join and leave, NATS
    /// subscriptions, per-node-subject rates. No processes.
    Fleet(fleet::FleetArgs),
    /// Chaos across a cluster for minutes: kill -9 of gateways, writers and
    /// NATS servers and PostgreSQL outages at random moments under load,
    /// then an audit of every acknowledged message.
    Chaos(chaos::ChaosArgs),
    /// Offline recipients with Web Push subscriptions, against a local push
    /// service: durable-to-push latency, pushes/s, memory per pending push.
    Push(push::PushArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().scenario {
        Scenario::Connect(args) => connect::run(&args),
        Scenario::OneToOne(args) => one_to_one::run(&args),
        Scenario::ReconnectStorm(args) => reconnect_storm::run(&args),
        Scenario::OfflineSync(args) => offline_sync::run(&args),
        Scenario::Writer(args) => writer::run(&args),
        Scenario::CrossNode(args) => cross_node::run(&args),
        Scenario::Group(args) => group::run(&args),
        Scenario::Fleet(args) => fleet::run(&args),
        Scenario::Push(args) => push::run(&args),
        Scenario::Chaos(args) => chaos::run(&args),
    }
}
