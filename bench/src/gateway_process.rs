//! Starting the gateway under test from `bench`, so a figure is one command.
//!
//! Owns spawning the binary on a free loopback port with its own data
//! directory and secret, waiting (bounded) for `/readyz`, and stopping it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

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
