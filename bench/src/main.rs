//! `bench`: the load generator benchmark engineers use to reproduce our figures.
//!
//! Scenarios are subcommands. This file owns the command line; each scenario
//! lives in its own module and prints a table plus an optional JSON summary.
//! Never asserts speed: it measures and reports.

mod connect;
mod procfs;

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().scenario {
        Scenario::Connect(args) => connect::run(&args),
    }
}
