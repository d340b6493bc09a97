//! The node: start-up checks, listeners, shard threads, admin, signals, exit.
//!
//! Owns the process-wide decisions: how many connections the fd limit allows,
//! binding one SO_REUSEPORT listener per shard, pinning shards to cores, and
//! turning SIGTERM/SIGINT into a drain (a second signal exits at once) and
//! SIGHUP into a TLS certificate reload.
//! Never touches a connection: shards own those.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use anyhow::Context;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use crate::config::{Config, WriterMode};
use crate::mesh::{Mesh, Sender, ShardMessage};
use crate::metrics::NodeState;
use crate::shard::{self, ShardSetup};
use crate::tls::Tls;
use crate::{admin, backplane_link, secret, systemd_notify, writer_process};
use backplane_bridge::lease::{LeaseConfig, NodeIdLease};

/// Descriptors kept back from connections: stdio, log files, the admin
/// listener, the signal pipe and similar.
const FD_RESERVE_BASE: u64 = 64;
/// Per shard: its listener, io_uring or epoll fd, eventfd, timer.
const FD_RESERVE_PER_SHARD: u64 = 8;

pub fn run(config: Config) -> anyhow::Result<()> {
    let secret = Arc::new(secret::resolve(&config)?);
    // Before anything starts: a bad certificate or key is a start-up error.
    let tls = if config.tls() {
        Some(Arc::new(Tls::load(&config.tls_cert, &config.tls_key)?))
    } else {
        None
    };
    let connections_max = connection_budget(&config)?;

    let listeners = bind_shard_listeners(config.listen, config.shards)?;
    let listen = listeners[0].local_addr()?;
    let admin_listener = TcpListener::bind(config.admin_listen)
        .with_context(|| format!("binding admin listener {}", config.admin_listen))?;
    let admin_listen = admin_listener.local_addr()?;

    std::fs::create_dir_all(&config.ring_dir)
        .with_context(|| format!("creating ring_dir {}", config.ring_dir.display()))?;
    if !config.nats_url.is_empty()
        && config.storage_writer == WriterMode::Spawn
        && !config
            .storage_writer_args
            .iter()
            .any(|arg| arg.starts_with("--backend"))
    {
        tracing::warn!("this node joins a backplane but stores messages in its own embedded store: a device syncs only what this node stored; give the fleet a shared PostgreSQL or ScyllaDB");
    }
    let writer = match config.storage_writer {
        WriterMode::Spawn => Some(writer_process::spawn(&config)?),
        WriterMode::External => None,
    };

    // In a fleet the node id is leased before any shard makes an id.
    let mut config = config;
    let lease = if config.leases_node_id() {
        let lease = NodeIdLease::acquire(LeaseConfig {
            url: config.nats_url.clone(),
            subject_prefix: config.nats_subject_prefix.clone(),
            ttl: std::time::Duration::from_millis(config.node_id_lease_ttl_ms),
            ids: chat_protocol::snowflake::NODE_ID_MAX + 1,
            acquire_timeout: std::time::Duration::from_millis(config.storage_timeout_ms.max(5_000)),
            replicas: config.node_id_lease_replicas,
        })
        .context("leasing this node's id (set node_id_lease = false and a unique node_id to assign it by hand)")?;
        tracing::info!(node_id = lease.node_id, "node id leased from NATS");
        config.node_id = lease.node_id;
        Some(lease)
    } else {
        None
    };
    let node = Arc::new(NodeState::new(
        config.shards,
        connections_max,
        config.node_id,
        lease.as_ref().map(NodeIdLease::validity),
        config.storage_stall_ms_max,
    ));
    let mesh = Arc::new(Mesh::new(config.shards, config.cross_shard_queue_capacity));
    let backplane = backplane_link::start(&config, &mesh)?;
    let config = Arc::new(config);
    let cores = if config.pin_shards {
        core_affinity::get_core_ids().unwrap_or_default()
    } else {
        Vec::new()
    };

    let web = Arc::new(crate::web::WebClient::new(
        config.web_client,
        config.dev_sign_in,
        &secret,
    ));
    if config.echo_endpoint {
        tracing::warn!("echo_endpoint is on: /echo echoes anything to anyone, without a token (for conformance tests only)");
    }
    if config.web_client && config.dev_sign_in {
        tracing::warn!("dev_sign_in is on: anyone who reaches the listener can sign in as anyone (development only)");
    }
    let mut threads = Vec::with_capacity(config.shards);
    for (id, listener) in listeners.into_iter().enumerate() {
        let setup = ShardSetup {
            id,
            config: config.clone(),
            node: node.clone(),
            mesh: mesh.clone(),
            secret: secret.clone(),
            web: web.clone(),
            tls: tls.as_ref().map(|tls| tls.server_config()),
            listener,
            core: cores.get(id % cores.len().max(1)).copied(),
            backplane: backplane.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("shard-{id}"))
            .spawn(move || shard::run(setup))?;
        threads.push(thread);
    }
    admin::spawn(
        admin_listener,
        config.clone(),
        node.clone(),
        mesh.clone(),
        backplane.clone(),
    )?;
    spawn_signal_handler(node.clone(), mesh.clone(), backplane.clone(), tls)?;

    while node.shards_ready.load(Relaxed) < config.shards
        && !threads.iter().any(|t| t.is_finished())
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // A shard that failed to start ends its thread; the joins below report it.
    if node.shards_ready.load(Relaxed) == config.shards {
        systemd_notify::spawn_watchdog(node.clone())?;
        systemd_notify::ready(&format!(
            "serving {listen}, up to {connections_max} connections"
        ));
        tracing::info!(%listen, %admin_listen, tls = config.tls(), shards = config.shards, node_id = config.node_id,
            driver = node.io_driver.get().copied().unwrap_or("?"), connections_max, "gateway ready");
    }

    let result = supervise(threads, &node);
    if let Some(writer) = writer {
        writer.stop();
    }
    // After the drain: the id is free for another node at once.
    if let Some(lease) = lease {
        lease.release();
    }
    result
}

/// How often the main thread checks on the shard threads.
const SUPERVISE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// Waits for the shards. A shard that ends while the node is not draining
/// (an error or a panic) ends the process with an error at once: a node with a
/// dead shard would refuse that shard's users forever, so it is better
/// restarted whole by its supervisor. After a drain, waits for every shard.
fn supervise(
    threads: Vec<std::thread::JoinHandle<anyhow::Result<()>>>,
    node: &NodeState,
) -> anyhow::Result<()> {
    let mut running: Vec<(usize, std::thread::JoinHandle<anyhow::Result<()>>)> =
        threads.into_iter().enumerate().collect();
    while !running.is_empty() {
        let Some(position) = running.iter().position(|(_, thread)| thread.is_finished()) else {
            std::thread::sleep(SUPERVISE_INTERVAL);
            continue;
        };
        let (id, thread) = running.swap_remove(position);
        match thread.join() {
            Ok(Ok(())) if node.draining.load(Relaxed) => {}
            Ok(Ok(())) => anyhow::bail!("shard {id} stopped although the node was not draining"),
            Ok(Err(error)) => return Err(error.context(format!("shard {id} failed"))),
            Err(_) => anyhow::bail!("shard {id} panicked"),
        }
    }
    tracing::info!("all shards drained; exiting");
    Ok(())
}

/// Raises RLIMIT_NOFILE's soft limit to the hard one and says how many
/// connections fit. Fails when not even one does.
fn connection_budget(config: &Config) -> anyhow::Result<usize> {
    let (soft_before, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    let soft = rlimit::increase_nofile_limit(hard).unwrap_or(soft_before);
    let reserve = FD_RESERVE_BASE + FD_RESERVE_PER_SHARD * config.shards as u64;
    let by_fds = soft.saturating_sub(reserve) as usize;
    anyhow::ensure!(
        by_fds > 0,
        "RLIMIT_NOFILE is {soft}: no room for connections after reserving {reserve}"
    );
    let connections_max = if config.connections_max == 0 {
        by_fds
    } else {
        config.connections_max.min(by_fds)
    };
    tracing::info!(
        nofile_soft = soft,
        nofile_hard = hard,
        connections_max,
        "this process can hold {connections_max} connections (raise LimitNOFILE for more)"
    );
    Ok(connections_max)
}

/// One listener per shard on the same address (SO_REUSEPORT); the kernel
/// spreads new connections across them. Port 0 is resolved by the first.
fn bind_shard_listeners(address: SocketAddr, shards: usize) -> anyhow::Result<Vec<TcpListener>> {
    let mut address = address;
    let mut listeners = Vec::with_capacity(shards);
    for _ in 0..shards {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(address),
            socket2::Type::STREAM,
            None,
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket
            .bind(&address.into())
            .with_context(|| format!("binding {address}"))?;
        socket.listen(crate::limits::LISTEN_BACKLOG as i32)?;
        let listener: TcpListener = socket.into();
        address = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// First SIGTERM or SIGINT: drain. Second: exit at once. SIGHUP: read the
/// TLS certificate and key again (open connections keep their sessions).
fn spawn_signal_handler(
    node: Arc<NodeState>,
    mesh: Arc<Mesh>,
    backplane: Option<Arc<backplane_bridge::Backplane>>,
    tls: Option<Arc<Tls>>,
) -> anyhow::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal == SIGHUP {
                    reload_tls(tls.as_deref(), &node);
                    continue;
                }
                if node.draining.swap(true, Relaxed) {
                    tracing::warn!(signal, "second signal: exiting now");
                    std::process::exit(1);
                }
                tracing::info!(
                    signal,
                    "draining: no new connections; clients told to reconnect (1012)"
                );
                systemd_notify::stopping();
                // Home to nobody from now: the users' homes move while this
                // node still serves them, so they miss nothing live.
                if let Some(backplane) = &backplane {
                    backplane.stop_serving();
                }
                for shard in 0..mesh.shard_count() {
                    if mesh
                        .send(Sender::External, shard, ShardMessage::Drain)
                        .is_err()
                    {
                        tracing::error!(shard, "could not deliver drain request");
                    }
                }
            }
        })?;
    Ok(())
}

/// SIGHUP: the certificate and key are read again; a bad file keeps the
/// current ones (and says why).
fn reload_tls(tls: Option<&Tls>, node: &NodeState) {
    let Some(tls) = tls else {
        tracing::info!("SIGHUP: no TLS configured; nothing to reload");
        return;
    };
    match tls.reload() {
        Ok(()) => {
            node.tls_reloads[0].fetch_add(1, Relaxed);
            tracing::info!("SIGHUP: TLS certificate reloaded; new handshakes present it");
        }
        Err(error) => {
            node.tls_reloads[1].fetch_add(1, Relaxed);
            tracing::error!(
                "SIGHUP: TLS certificate not reloaded, the current one stays: {error:#}"
            );
        }
    }
}
