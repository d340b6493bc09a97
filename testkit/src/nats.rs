//! A private nats-server for a test: its own loopback port and JetStream
//! store directory (kept across a restart, as a real server's disk is),
//! stoppable and restartable on the same port (to test a backplane outage),
//! with its monitoring endpoint on another (to read what each client holds),
//! killed when dropped. Also `NatsCluster`: three (or more) such servers
//! routed to each other, with clustered JetStream.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

const WAIT: Duration = Duration::from_secs(10);
/// Longest a start may take: a loaded machine (the whole suite in parallel)
/// has been seen to need more than `WAIT`.
const START_WAIT: Duration = Duration::from_secs(30);
/// Fresh ports tried when a new server's port was taken in between.
const START_ATTEMPTS: usize = 3;

pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    /// The HTTP monitoring port (`-m`): `/connz`, `/subsz`.
    pub monitor_port: u16,
    dir: tempfile::TempDir,
    /// In a cluster: this server's name, route port, and the others' route ports.
    cluster: Option<(String, u16, Vec<u16>)>,
}

impl NatsServer {
    /// Starts `nats-server` (from PATH; `scripts/test` installs it) on a free port.
    pub fn start() -> NatsServer {
        let mut server = NatsServer {
            child: None,
            port: free_port(),
            monitor_port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            cluster: None,
        };
        for _ in 1..START_ATTEMPTS {
            match server.spawn() {
                Ok(()) => return server,
                // A free port is only free until someone else binds it.
                Err(log) => {
                    eprintln!("nats-server exited at start ({log}); trying other ports");
                    server.port = free_port();
                    server.monitor_port = free_port();
                }
            }
        }
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGKILL: an outage, not a goodbye).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and waits until it accepts connections.
    pub fn restart(&mut self) {
        if let Err(log) = self.spawn() {
            panic!("nats-server exited at start: {log}");
        }
    }

    /// Starts the server and waits until it accepts connections. `Err` with
    /// its log when it exited instead; panics when it neither exits nor
    /// answers in `START_WAIT`.
    fn spawn(&mut self) -> Result<(), String> {
        self.stop();
        let log_path = self.dir.path().join("nats-server.log");
        let log = std::fs::File::create(&log_path).expect("a log file in the server's directory");
        let child = Command::new("nats-server")
            // JetStream: gateways lease their node ids from it.
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js"])
            .args(["-m", &self.monitor_port.to_string()])
            .arg("--store_dir")
            .arg(self.dir.path())
            .args(self.cluster.iter().flat_map(|(name, port, routes)| {
                let routes: Vec<String> = routes
                    .iter()
                    .map(|port| format!("nats://127.0.0.1:{port}"))
                    .collect();
                [
                    "--server_name".to_owned(),
                    name.clone(),
                    "--cluster_name".to_owned(),
                    "chat-test".to_owned(),
                    "--cluster".to_owned(),
                    format!("nats://127.0.0.1:{port}"),
                    "--routes".to_owned(),
                    routes.join(","),
                ]
            }))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server is installed (scripts/test installs it)");
        self.child = Some(child);
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        let deadline = Instant::now() + START_WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            let child = self.child.as_mut().expect("just spawned");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(format!("{status}: {}", log().trim()));
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not accept connections on {} within {START_WAIT:?}: {}",
                self.port,
                log().trim()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl NatsServer {
    /// GET on the monitoring endpoint, parsed as JSON.
    pub fn monitor(&self, path: &str) -> serde_json::Value {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.monitor_port))
            .expect("the monitoring port answers");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        write!(stream, "GET {path} HTTP/1.0\r\nHost: nats\r\n\r\n").unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).unwrap();
        let response = String::from_utf8(response).expect("monitoring answers in UTF-8");
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.contains(" 200 "), "{path}: {head}");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    /// The subscriptions each named client connection holds on this server
    /// (from `/connz?subs=1`), by connection name.
    pub fn subscriptions_by_client(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        let connz = self.monitor("/connz?subs=1&limit=1024");
        connz["connections"]
            .as_array()
            .expect("connz lists connections")
            .iter()
            .filter_map(|conn| {
                let name = conn["name"].as_str()?.to_owned();
                let subs = conn["subscriptions_list"]
                    .as_array()
                    .map(|list| {
                        list.iter()
                            .filter_map(|s| s.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                Some((name, subs))
            })
            .collect()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Servers routed into one cluster with clustered JetStream (a meta leader
/// elected before `start` returns); each can be stopped and restarted.
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// One server, no cluster (what most fleet tests run on).
    pub fn single() -> NatsCluster {
        NatsCluster {
            servers: vec![NatsServer::start()],
        }
    }

    pub fn start(size: usize) -> NatsCluster {
        let route_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let mut servers: Vec<NatsServer> = (0..size)
            .map(|index| NatsServer {
                child: None,
                port: free_port(),
                monitor_port: free_port(),
                dir: tempfile::tempdir().unwrap(),
                cluster: Some((
                    format!("n{index}"),
                    route_ports[index],
                    route_ports
                        .iter()
                        .enumerate()
                        .filter(|(other, _)| *other != index)
                        .map(|(_, port)| *port)
                        .collect(),
                )),
            })
            .collect();
        for server in &mut servers {
            server.restart();
        }
        let cluster = NatsCluster { servers };
        cluster.wait_jetstream();
        cluster
    }

    /// Every server's client URL, comma-separated (as `nats_url` takes them).
    pub fn url(&self) -> String {
        let urls: Vec<String> = self.servers.iter().map(NatsServer::url).collect();
        urls.join(",")
    }

    /// Waits until the running servers agree on a JetStream meta leader.
    pub fn wait_jetstream(&self) {
        let deadline = Instant::now() + START_WAIT;
        loop {
            let led = self
                .servers
                .iter()
                .filter(|server| server.child.is_some())
                .all(|server| {
                    server.monitor("/jsz")["meta_cluster"]["leader"]
                        .as_str()
                        .is_some_and(|leader| !leader.is_empty())
                });
            if led {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the NATS cluster elected no JetStream leader within {START_WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
