//! Starting the gateway under test from `bench`, so a figure is one command.
//!
//! Owns spawning the binary on a free loopback port with its own data
//! directory and secret, waiting (bounded) for `/readyz`, and stopping it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

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
    /// The gateway's process id, to read its memory and CPU from /proc.
    #[arg(long)]
    pub gateway_pid: Option<u32>,
    /// Token secret (the gateway's GATEWAY_AUTH_SECRET).
    #[arg(long, env = "GATEWAY_AUTH_SECRET", hide_env_values = true)]
    pub secret: String,
    /// Source addresses 127.0.0.2 .. 127.0.0.(1+N) are used round-robin.
    #[arg(long, default_value_t = 8)]
    pub source_addresses: u8,
}

/// The gateway a scenario runs against; holds a spawned process until dropped.
pub struct ResolvedTarget {
    pub address: SocketAddr,
    pub pid: Option<u32>,
    _spawned: Option<GatewayProcess>,
}

impl GatewayTarget {
    /// Starts the gateway if asked to, and says where it is.
    pub fn resolve(&self) -> anyhow::Result<ResolvedTarget> {
        anyhow::ensure!(
            (1..=200).contains(&self.source_addresses),
            "source_addresses must be 1-200"
        );
        Ok(match &self.spawn_gateway {
            Some(binary) => {
                let gateway = GatewayProcess::start(binary, &self.secret, &self.gateway_args)?;
                ResolvedTarget {
                    address: gateway.ws,
                    pid: Some(gateway.pid()),
                    _spawned: Some(gateway),
                }
            }
            None => ResolvedTarget {
                address: self.target,
                pid: self.gateway_pid,
                _spawned: None,
            },
        })
    }

    /// The loopback source address for the `index`-th connection.
    pub fn source(&self, index: usize) -> std::net::IpAddr {
        std::net::IpAddr::from([
            127,
            0,
            0,
            2 + (index % usize::from(self.source_addresses)) as u8,
        ])
    }

    /// A token for `user`'s device `d0`, valid for an hour.
    pub fn token(&self, user: &str) -> anyhow::Result<String> {
        let expires = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
            + 3600;
        chat_protocol::token::mint(self.secret.as_bytes(), user, "d0", expires)
            .map_err(|error| anyhow::anyhow!("{error}"))
    }
}

pub struct GatewayProcess {
    child: Child,
    pub ws: SocketAddr,
    _data_dir: TempDir,
}

/// A directory removed on drop (bench has no tempfile dependency).
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl GatewayProcess {
    /// Starts `binary` with `secret` and `extra` flags and waits until it is ready.
    pub fn start(binary: &str, secret: &str, extra: &[String]) -> anyhow::Result<Self> {
        let ws: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let data_dir = std::env::temp_dir().join(format!(
            "bench-gateway-{}-{}",
            std::process::id(),
            ws.port()
        ));
        std::fs::create_dir_all(&data_dir)?;
        let data_dir = TempDir(data_dir);
        let child = Command::new(binary)
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
            ws,
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
}

fn ready(admin: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&admin, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: admin\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200")
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
