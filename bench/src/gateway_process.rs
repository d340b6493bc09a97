//! Starting the gateway under test from `bench`, so a figure is one command.
//!
//! Owns spawning the binary on a free loopback port with its own data
//! directory and secret, waiting (bounded) for `/readyz`, and stopping it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::child::{die_with_this_thread, free_port};
use crate::procfs;

/// Which gateway a scenario talks to, and how clients reach it. Shared by every scenario.
#[derive(clap::Args, Debug, Clone)]
pub struct GatewayTarget {
    /// Gateway WebSocket address (ignored with --spawn-gateway).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub target: SocketAddr,
    /// Start this gateway binary (on a free loopback port) instead of using --target.
    #[arg(long)]
    pub spawn_gateway: Option<String>,
    /// Extra flags for the spawned gateway, e.g. --gateway-arg=--shards --gateway-arg=1.
    #[arg(long = "gateway-arg", allow_hyphen_values = true)]
    pub gateway_args: Vec<String>,
    /// With --spawn-gateway: how many gateway processes share the port
    /// (SO_REUSEPORT); one process may hold at most RLIMIT_NOFILE sockets.
    #[arg(long, default_value_t = 1)]
    pub gateway_processes: usize,
    /// With several --gateway-processes: start a nats-server and join them
    /// through the backplane, so users on different processes reach each other.
    #[arg(long)]
    pub backplane: bool,
    /// The nats-server binary for --backplane.
    #[arg(long, default_value = "nats-server")]
    pub backplane_nats_server: String,
    /// Process ids of gateways started elsewhere, to read their memory and CPU
    /// from /proc (repeat for several).
    #[arg(long = "gateway-pid")]
    pub gateway_pids: Vec<u32>,
    /// Token secret (the gateway's GATEWAY_AUTH_SECRET).
    #[arg(long, env = "GATEWAY_AUTH_SECRET", hide_env_values = true)]
    pub secret: String,
    /// Source addresses 127.0.0.B .. 127.0.0.(B+N-1) are used round-robin
    /// (B = --source-base), so one host can open more than 64k connections.
    #[arg(long, default_value_t = 8)]
    pub source_addresses: u8,
    /// First source address's last byte (workers use disjoint ranges).
    #[arg(long, default_value_t = 2, hide = true)]
    pub source_base: u8,
}

/// The gateway a scenario runs against; holds spawned processes until dropped.
pub struct ResolvedTarget {
    pub address: SocketAddr,
    /// Every gateway process behind `address` (empty when unknown).
    pub pids: Vec<u32>,
    _spawned: Vec<GatewayProcess>,
    /// Declared after the gateways so it stops after them.
    _nats: Option<crate::nats_peer::NatsServer>,
}

impl ResolvedTarget {
    /// The backplane's nats-server's memory (`--backplane` only).
    pub fn nats_memory(&self) -> Option<procfs::ProcessMemory> {
        let nats = self._nats.as_ref()?;
        procfs::process_memory(nats.pid()).ok()
    }

    /// Summed memory of every gateway process.
    pub fn memory(&self) -> anyhow::Result<Option<crate::procfs::ProcessMemory>> {
        if self.pids.is_empty() {
            return Ok(None);
        }
        let mut total = crate::procfs::ProcessMemory::default();
        for pid in &self.pids {
            let memory = crate::procfs::process_memory(*pid)?;
            total.rss_bytes += memory.rss_bytes;
            total.anonymous_bytes += memory.anonymous_bytes;
        }
        Ok(Some(total))
    }
}

impl GatewayTarget {
    /// Starts the gateway if asked to, and says where it is.
    pub fn resolve(&self) -> anyhow::Result<ResolvedTarget> {
        anyhow::ensure!(
            self.source_addresses >= 1
                && u16::from(self.source_base) + u16::from(self.source_addresses) <= 255,
            "source addresses must stay within 127.0.0.1-254"
        );
        anyhow::ensure!(
            (1..=64).contains(&self.gateway_processes),
            "gateway_processes must be 1-64"
        );
        Ok(match &self.spawn_gateway {
            Some(binary) => {
                let address: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
                let nats = if self.backplane {
                    Some(crate::nats_peer::NatsServer::start(
                        &self.backplane_nats_server,
                    )?)
                } else {
                    None
                };
                let spawned = (0..self.gateway_processes)
                    .map(|index| {
                        let mut args = self.gateway_args.clone();
                        if let Some(nats) = &nats {
                            args.extend(["--nats-url".into(), format!("nats://{}", nats.client)]);
                        }
                        // Separate processes are separate nodes: distinct message ids.
                        if !args.iter().any(|a| a.starts_with("--node-id")) {
                            args.extend(["--node-id".into(), index.to_string()]);
                        }
                        GatewayProcess::start(binary, &self.secret, &args, address)
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                if nats.is_some() {
                    // Measure a settled fleet: every node knows every other
                    // (a membership change mid-run moves homes and resyncs).
                    for process in &spawned {
                        process
                            .wait_metric("gateway_backplane_nodes_live", spawned.len() as u64)?;
                    }
                }
                ResolvedTarget {
                    address,
                    pids: spawned.iter().map(GatewayProcess::pid).collect(),
                    _spawned: spawned,
                    _nats: nats,
                }
            }
            None => ResolvedTarget {
                address: self.target,
                pids: self.gateway_pids.clone(),
                _spawned: Vec::new(),
                _nats: None,
            },
        })
    }

    /// The loopback source address for the `index`-th connection.
    pub fn source(&self, index: usize) -> std::net::IpAddr {
        std::net::IpAddr::from([
            127,
            0,
            0,
            self.source_base + (index % usize::from(self.source_addresses)) as u8,
        ])
    }

    /// A command running this same `bench` as worker `index` of `processes` for
    /// `scenario`: its own range of source addresses, the secret, piped stdio
    /// (the parent talks to workers over stdin and stdout). Callers add the
    /// scenario's own arguments.
    pub fn worker_command(
        &self,
        scenario: &str,
        index: usize,
        processes: usize,
    ) -> anyhow::Result<std::process::Command> {
        let addresses = usize::from(self.source_addresses);
        anyhow::ensure!(
            2 + processes * addresses <= 255,
            "processes x source_addresses must fit in 127.0.0.2-254"
        );
        let mut command = std::process::Command::new(std::env::current_exe()?);
        command
            .args([scenario, "--worker"])
            .args([
                "--source-base",
                &(2 + index * addresses).to_string(),
                "--source-addresses",
                &addresses.to_string(),
            ])
            .env("GATEWAY_AUTH_SECRET", &self.secret)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        Ok(command)
    }

    /// A token for `user`'s device `d0`, valid for an hour.
    pub fn token(&self, user: &str) -> anyhow::Result<String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        chat_protocol::token::mint(self.secret.as_bytes(), user, "d0", now, now + 3600)
            .map_err(|error| anyhow::anyhow!("{error}"))
    }
}

pub struct GatewayProcess {
    child: Child,
    admin: SocketAddr,
    _data_dir: TempDir,
}

/// A directory removed on drop (bench has no tempfile dependency).
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl GatewayProcess {
    /// Starts `binary` listening on `ws` (other processes may share it through
    /// SO_REUSEPORT) with `secret` and `extra` flags, and waits until it is ready.
    pub fn start(
        binary: &str,
        secret: &str,
        extra: &[String],
        ws: SocketAddr,
    ) -> anyhow::Result<Self> {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        // One directory per process (its rings, store and secret); processes
        // sharing `ws` differ by their admin port.
        let data_dir = std::env::temp_dir().join(format!(
            "bench-gateway-{}-{}",
            std::process::id(),
            admin.port()
        ));
        std::fs::create_dir_all(&data_dir)?;
        let data_dir = TempDir(data_dir);
        let mut command = Command::new(binary);
        die_with_this_thread(&mut command);
        let child = command
            .args([
                "--listen",
                &ws.to_string(),
                "--admin-listen",
                &admin.to_string(),
            ])
            .args(["--data-dir", data_dir.0.to_str().context("data dir path")?])
            .args(extra)
            .env("GATEWAY_AUTH_SECRET", secret)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {binary}"))?;
        let mut gateway = GatewayProcess {
            child,
            admin,
            _data_dir: data_dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = gateway.child.try_wait()? {
                anyhow::bail!("gateway exited during start-up: {status}");
            }
            if ready(admin) {
                return Ok(gateway);
            }
            anyhow::ensure!(Instant::now() < deadline, "gateway not ready within 15 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (at most 15 s) until the unlabelled metric `name` reads `value`.
    pub fn wait_metric(&self, name: &str, value: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let body = admin_get(self.admin, "/metrics").unwrap_or_default();
            let current = body.lines().find_map(|line| {
                let (metric, number) = line.split_once(' ')?;
                (metric == name).then(|| number.trim().parse::<u64>().ok())?
            });
            if current == Some(value) {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{name} stayed at {current:?}, not {value}, for 15 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// GET on an admin listener: the whole response, or `None`.
fn admin_get(admin: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&admin, Duration::from_secs(1)).ok()?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    Some(response)
}

fn ready(admin: SocketAddr) -> bool {
    admin_get(admin, "/readyz").is_some_and(|response| response.starts_with("HTTP/1.1 200"))
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
