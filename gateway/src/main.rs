//! `gateway`: the chat connection gateway of one node.
//!
//! `gateway` (or `gateway run`) serves WebSockets until drained;
//! `gateway token` mints a bearer token with the node's secret. This file owns
//! only the command line, logging set-up and the global allocator.

#![deny(unsafe_code)]

mod admin;
mod backplane_link;
mod clock;
mod config;
mod doctor;
mod limits;
mod link;
mod mesh;
mod metrics;
mod node;
mod secret;
mod shard;
#[allow(unsafe_code)] // socket syscalls; see its header
mod sock;
#[allow(unsafe_code)] // process syscalls; see its header
mod sys;
mod systemd_notify;
mod tls;
mod web;
mod writer_process;

use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::ConfigArgs;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "Thread-per-core WebSocket chat gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve WebSockets (the default).
    Run {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Audit this host for a connection target: prints each setting that falls
    /// short, why it matters and the line that fixes it. Exits 1 when the host
    /// cannot hold the target.
    Doctor {
        /// Connections one gateway process should hold.
        #[arg(long, default_value_t = 100_000)]
        connections: u64,
        /// Shards the gateway will run (default: one per core).
        #[arg(long)]
        shards: Option<u64>,
    },
    /// Revoke a device (or, without --device, every device of the user)
    /// through a running node's admin API: its tokens stop working, its
    /// connections close on every node, its keys leave the key directory.
    /// Needs the node's admin_token (GATEWAY_ADMIN_TOKEN or --config).
    Revoke {
        #[arg(long)]
        user: String,
        #[arg(long)]
        device: Option<String>,
        /// The node's admin listener (default: `admin_listen` of the config).
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Delete a user's account through a running node's admin API: every
    /// device is revoked and closed on every node, then every row of the
    /// user is removed from storage (messages they sent stay in their
    /// conversations; see docs/design/storage-lifecycle.md).
    DeleteAccount {
        #[arg(long)]
        user: String,
        /// The node's admin listener (default: `admin_listen` of the config).
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Print a bearer token signed with this node's secret.
    Token {
        #[arg(long)]
        user: String,
        #[arg(long)]
        device: String,
        /// Lifetime, e.g. `1h`, `30m`, `7d`.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

fn main() {
    tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        None => cli.config.load().and_then(node::run),
        Some(Command::Run { config }) => config.load().and_then(node::run),
        Some(Command::Doctor {
            connections,
            shards,
        }) => {
            let host = doctor::HostFacts::read();
            let shards = shards.unwrap_or(host.cores as u64);
            let (report, holds) =
                doctor::render(&doctor::evaluate(&host, connections, shards), connections);
            print!("{report}");
            std::process::exit(if holds { 0 } else { 1 });
        }
        Some(Command::Token {
            user,
            device,
            ttl,
            config,
        }) => print_token(&config, &user, &device, ttl),
        Some(Command::Revoke {
            user,
            device,
            admin,
            config,
        }) => admin_post(&config, "/revoke", &user, device.as_deref(), admin),
        Some(Command::DeleteAccount {
            user,
            admin,
            config,
        }) => admin_post(&config, "/delete-account", &user, None, admin),
    };
    if let Err(error) = result {
        tracing::error!("{error:#}");
        std::process::exit(2);
    }
}

/// mimalloc commits its arenas eagerly, and where transparent huge pages are
/// in `madvise` mode the kernel backs them with 2 MiB pages: measured here that
/// costs about 700 bytes of resident memory per idle connection (1,877 vs
/// about 1,100 at 19,000 connections). Connections are many small long-lived
/// objects, so the process opts out of THP before it allocates for them.
fn tune_allocator() {
    sys::disable_transparent_huge_pages();
}

/// `gateway revoke` and `gateway delete-account`: one authenticated POST
/// to the admin listener's `path`.
fn admin_post(
    args: &ConfigArgs,
    path: &str,
    user: &str,
    device: Option<&str>,
    admin: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let config = args.load()?;
    let token = config
        .admin_token
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("no admin_token: set GATEWAY_ADMIN_TOKEN (the node's)"))?;
    let address = admin.unwrap_or(config.admin_listen);
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("user", user);
    if let Some(device) = device {
        query.append_pair("device", device);
    }
    let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(5))
        .map_err(|error| anyhow::anyhow!("connecting to the admin listener {address}: {error}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "POST {path}?{} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        query.finish()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    println!("{body}");
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200"),
        "{path} refused: {}",
        head.lines().next().unwrap_or("no answer")
    );
    Ok(())
}

fn print_token(args: &ConfigArgs, user: &str, device: &str, ttl: Duration) -> anyhow::Result<()> {
    let config = args.load()?;
    let secret = secret::resolve(&config)?;
    let now = clock::unix_s();
    let exp = now + ttl.as_secs();
    let token = chat_protocol::token::mint(&secret, user, device, now, exp).map_err(|error| {
        anyhow::anyhow!("{error}: user and device ids are 1-64 characters of [A-Za-z0-9_.-]")
    })?;
    println!("{token}");
    Ok(())
}
