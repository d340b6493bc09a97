//! The read path: a Unix socket on which gateway shards say hello, read, and
//! hear about durability.
//!
//! Owns the listener and one thread per connected shard (a node has one per
//! core, so a thread each is cheap and keeps reads off the commit thread).
//! Every read first waits until the records appended before it arrived are
//! committed (`Progress::wait_for`): a device syncing right after it
//! connected sees every message sent before it did. Never writes to the
//! store, and answers a failed read with `Failed` instead of closing.

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use chat_protocol::store_wire::{self, Request, Response, READ_USERS_MAX};

use crate::rings::Rings;
use crate::sessions::{self, SessionSocket, Sessions, WRITE_TIMEOUT};
use crate::store::Backend;
use crate::store::{self, DeviceKeys, ReadRefused, Tables};

/// Longest a read waits for the writer to catch up before it fails.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(10);
/// Most entries and bytes of one sync page.
const SYNC_LIMIT_MAX: usize = 1_000;
const SYNC_BYTES_MAX: usize = 4 * 1024 * 1024;
const RECENT_LIMIT_MAX: usize = 4_096;
/// Sessions (threads) at once: a node has one per shard, at most 64, and a
/// few more during a gateway restart. Past this a connection is closed.
const SESSIONS_MAX: usize = 256;

pub struct Server {
    pub backend: Arc<dyn Backend>,
    pub rings: Arc<Rings>,
    pub sessions: Arc<Sessions>,
    pub stop: Arc<AtomicBool>,
    /// Rings must live here (a shard cannot make the writer map other files).
    pub ring_dir: PathBuf,
    pub sessions_open: std::sync::atomic::AtomicUsize,
    /// The hot retention (`None`: forever): history and sync show nothing
    /// older, whether or not the cleanup has removed it yet.
    pub message_retention: Option<std::time::Duration>,
}

/// Binds the socket (replacing a stale one) with owner-and-group permissions.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error).context(format!("removing stale {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    let mode = std::os::unix::fs::PermissionsExt::from_mode(0o660);
    std::fs::set_permissions(path, mode)?;
    Ok(listener)
}

impl Server {
    pub fn run(self: Arc<Self>, listener: UnixListener) {
        for stream in listener.incoming() {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            match stream {
                Ok(stream) => {
                    if self.sessions_open.fetch_add(1, Ordering::Relaxed) >= SESSIONS_MAX {
                        self.sessions_open.fetch_sub(1, Ordering::Relaxed);
                        tracing::warn!("too many read-path sessions; closing a new one");
                        continue;
                    }
                    let server = self.clone();
                    let spawned =
                        std::thread::Builder::new()
                            .name("session".into())
                            .spawn(move || {
                                server.session(stream);
                                server.sessions_open.fetch_sub(1, Ordering::Relaxed);
                            });
                    if let Err(error) = spawned {
                        self.sessions_open.fetch_sub(1, Ordering::Relaxed);
                        tracing::warn!(%error, "could not start a session thread");
                    }
                }
                Err(error) => tracing::warn!(%error, "accept failed"),
            }
        }
    }

    fn session(&self, stream: UnixStream) {
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        let writer: SessionSocket = match stream.try_clone() {
            Ok(writer) => Arc::new(Mutex::new(writer)),
            Err(error) => {
                tracing::warn!(%error, "could not clone a session socket");
                return;
            }
        };
        let mut ring: Option<PathBuf> = None;
        let result = self.serve_requests(stream, &writer, &mut ring);
        if let Some(ring) = &ring {
            self.sessions.unregister(ring, &writer);
        }
        match result {
            Ok(()) => tracing::debug!("shard session ended"),
            Err(error) => tracing::info!(%error, "shard session ended"),
        }
    }

    fn serve_requests(
        &self,
        mut stream: UnixStream,
        writer: &SessionSocket,
        ring: &mut Option<PathBuf>,
    ) -> Result<()> {
        let mut tables = self.backend.reader()?;
        let mut buffer = Vec::new();
        loop {
            let Some(body) = read_frame(&mut stream, &mut buffer)? else {
                return Ok(());
            };
            let request = Request::decode(body)?;
            match request {
                Request::Hello {
                    shard, ring: path, ..
                } => {
                    let path = Path::new(&path);
                    let inside = path
                        .parent()
                        .and_then(|p| p.canonicalize().ok())
                        .is_some_and(|p| Some(p) == self.ring_dir.canonicalize().ok());
                    anyhow::ensure!(
                        inside,
                        "shard {shard} named ring {} outside the ring directory {}",
                        path.display(),
                        self.ring_dir.display()
                    );
                    let index = self.rings.attach(path, Some(shard))?;
                    let (path, committed) = {
                        let rings = self.rings.progress.rings.lock().expect("progress lock");
                        (rings[index].path.clone(), rings[index].committed)
                    };
                    tracing::info!(shard, ring = %path.display(), "shard connected");
                    self.sessions.register(path.clone(), writer.clone());
                    *ring = Some(path);
                    sessions::send(
                        writer,
                        &Response::Durable {
                            position: committed,
                        }
                        .encode(),
                    )?;
                }
                // A stopping writer answers nothing more: the shard reconnects
                // to the next one and sends its open requests again.
                _ if self.stop.load(Ordering::Relaxed) => return Ok(()),
                request => {
                    let mut response = self.answer(&mut *tables, request.clone());
                    if matches!(
                        response,
                        Response::Failed {
                            retryable: true,
                            ..
                        }
                    ) {
                        // The backend's connection may be gone (PostgreSQL
                        // restarted): take a new handle and try once more,
                        // so one outage does not fail this session forever.
                        if let Ok(fresh) = self.backend.reader() {
                            tables = fresh;
                            response = self.answer(&mut *tables, request);
                        }
                    }
                    sessions::send(writer, &response.encode())?;
                }
            }
        }
    }

    fn answer(&self, tables: &mut dyn Tables, request: Request) -> Response {
        let req = match &request {
            Request::Sync { req, .. }
            | Request::History { req, .. }
            | Request::Recent { req, .. }
            | Request::KeysUpload { req, .. }
            | Request::KeysFetch { req, .. }
            | Request::SendOf { req, .. }
            | Request::MemberRoles { req, .. }
            | Request::GroupsOf { req, .. }
            | Request::Devices { req, .. }
            | Request::Presence { req, .. }
            | Request::Revoke { req, .. }
            | Request::RevokedAt { req, .. }
            | Request::PutPushTarget { req, .. }
            | Request::DeleteAccount { req, .. }
            | Request::DeviceSeen { req, .. } => *req,
            Request::Hello { .. } => 0,
        };
        // The key directory and revocations are not fed by the rings: no
        // barrier to wait for.
        let request = match request {
            Request::Revoke {
                req,
                user,
                device,
                at_unix_ms,
            } => {
                let revoked = tables.revoke(&user, device.as_deref(), at_unix_ms);
                return refused_or(req, revoked, |keys_removed| Response::Revoked {
                    req,
                    keys_removed,
                });
            }
            Request::RevokedAt { req, user, device } => {
                return refused_or(req, tables.revoked_at(&user, &device), |at_unix_ms| {
                    Response::RevokedAt { req, at_unix_ms }
                });
            }
            Request::PutPushTarget {
                req,
                user,
                device,
                target,
            } => {
                let stored = tables.put_push_target(&user, &device, target.as_deref());
                return refused_or(req, stored, |()| Response::PushTargetStored { req });
            }
            Request::KeysUpload {
                req,
                user,
                device,
                identity_key,
                signed_prekey,
                signed_prekey_signature,
                one_time_prekeys,
            } => {
                let upload = DeviceKeys {
                    user: &user,
                    device: &device,
                    identity_key: &identity_key,
                    signed_prekey: &signed_prekey,
                    signed_prekey_signature: &signed_prekey_signature,
                    one_time_prekeys: &one_time_prekeys,
                };
                return refused_or(req, tables.put_device_keys(&upload), |stored| {
                    Response::KeysUploaded { req, stored }
                });
            }
            Request::Devices { req, users } => {
                let mut devices = Vec::new();
                for user in users.iter().take(READ_USERS_MAX) {
                    match tables.devices_of(user) {
                        Ok(found) => devices.extend(found.into_iter().map(|d| (user.clone(), d))),
                        Err(error) => return refused_or(req, Err(error), |r: Response| r),
                    }
                }
                return Response::Devices { req, devices };
            }
            Request::KeysFetch { req, user } => {
                return refused_or(req, tables.take_bundles(&user), |bundles| Response::Keys {
                    req,
                    bundles,
                });
            }
            Request::DeviceSeen {
                req,
                user,
                device,
                at_unix_ms,
            } => {
                // A device of an account deleted since (its connection's
                // close arrives after the deletion) leaves no row behind.
                let stored = tables.account_deleted_at(&user).and_then(|deleted_at| {
                    if deleted_at.is_some_and(|deleted| deleted >= at_unix_ms) {
                        return Ok(());
                    }
                    tables.put_device_seen(&user, &device, at_unix_ms)
                });
                return refused_or(req, stored, |()| Response::DeviceSeenStored { req });
            }
            Request::DeleteAccount {
                req,
                user,
                at_unix_ms,
            } => {
                // The revocation first, so no token of theirs connects
                // again; the caller has closed their connections, and the
                // barrier lets what they sent before commit, so none of it
                // lands after the rows are gone.
                if let Err(error) = tables.revoke(&user, None, at_unix_ms) {
                    return refused_or(req, Err(error), |r: Response| r);
                }
                let barrier = self.rings.progress.barrier();
                if !self.rings.progress.wait_for(&barrier, BARRIER_TIMEOUT) {
                    return behind(req);
                }
                let removed = tables.delete_account(&user, at_unix_ms);
                return refused_or(req, removed, |removed| {
                    tracing::info!(%user, rows = removed.rows, "account deleted");
                    Response::AccountDeleted {
                        req,
                        rows: removed.rows,
                        groups: removed.groups,
                    }
                });
            }
            other => other,
        };
        let barrier = self.rings.progress.barrier();
        if !self.rings.progress.wait_for(&barrier, BARRIER_TIMEOUT) {
            return behind(req);
        }
        let floor = store::retention_floor(store::unix_ms_now(), self.message_retention);
        let result = match request {
            Request::Sync {
                req,
                user,
                device,
                from,
                limit,
                bytes_max,
            } => store::sync_page(
                tables,
                &user,
                &device,
                from,
                floor,
                usize::from(limit).min(SYNC_LIMIT_MAX),
                (bytes_max as usize).min(SYNC_BYTES_MAX),
            )
            .map(|page| Response::SyncPage {
                req,
                entries: page.entries,
                last_seq: page.last_seq,
                more: page.more,
                expired: page.expired,
            }),
            Request::History {
                req,
                asker,
                conversation,
                before,
                since,
                limit,
            } => store::account_from(tables, &asker).and_then(|account_from| {
                let floor = floor.max(account_from);
                store::history(
                    tables,
                    &conversation,
                    before,
                    since,
                    floor,
                    usize::from(limit),
                )
                .map(|records| Response::Messages { req, records })
            }),
            Request::Recent {
                req,
                user,
                device,
                since_unix_ms,
                limit,
            } => store::recent_sends(
                tables,
                &user,
                &device,
                since_unix_ms,
                usize::from(limit).min(RECENT_LIMIT_MAX),
            )
            .map(|sends| Response::RecentSends { req, sends }),
            Request::SendOf {
                req,
                user,
                device,
                client_msg_id,
            } => tables
                .send_of(&user, &device, &client_msg_id)
                .map(|message_id| Response::SendOf { req, message_id }),
            Request::MemberRoles { req, group } => {
                tables.member_roles(&group).and_then(|members| {
                    Ok(Response::MemberRoles {
                        req,
                        members,
                        admins_only: tables.admins_only(&group)?,
                    })
                })
            }
            Request::GroupsOf { req, user } => tables
                .groups_of(&user)
                .map(|groups| Response::Groups { req, groups }),
            Request::Presence { req, asker, users } => {
                if users.len() > READ_USERS_MAX {
                    Err(ReadRefused("too many users in one presence request").into())
                } else {
                    store::presence(tables, &asker, &users)
                        .map(|users| Response::Presence { req, users })
                }
            }
            Request::Hello { .. }
            | Request::KeysUpload { .. }
            | Request::KeysFetch { .. }
            | Request::Devices { .. }
            | Request::Revoke { .. }
            | Request::RevokedAt { .. }
            | Request::PutPushTarget { .. }
            | Request::DeleteAccount { .. }
            | Request::DeviceSeen { .. } => {
                unreachable!("answered above")
            }
        };
        refused_or(req, result, |response| response)
    }
}

/// The answer when the rings' records before a request did not commit in
/// time: retry later.
fn behind(req: u32) -> Response {
    Response::Failed {
        req,
        reason: "storage is behind; try again".into(),
        retryable: true,
    }
}

/// Reads one frame body; `None` at a clean end of stream.
fn read_frame<'a>(stream: &mut UnixStream, buffer: &'a mut Vec<u8>) -> Result<Option<&'a [u8]>> {
    wait_readable(stream)?;
    let mut prefix = [0u8; 4];
    match stream.read_exact(&mut prefix) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error.into()),
    }
    let len = store_wire::frame_len(&prefix)?.expect("4 bytes read") - 4;
    buffer.resize(len, 0);
    stream.read_exact(buffer)?;
    Ok(Some(buffer))
}

/// Sleeps until the shard has sent something (or closed). A thread asleep
/// in `read` on a Unix stream wakes for any wake-up on the socket, and the
/// kernel sends one ("room to write") each time the shard reads a notice
/// the commit thread wrote on this same socket; a `poll` for input sleeps
/// through those. Measured: two needless context switches per `Durable`
/// notice without it (BENCHMARKS.md, "Spurious wake-ups").
fn wait_readable(stream: &UnixStream) -> Result<()> {
    use rustix::event::{poll, PollFd, PollFlags};
    loop {
        let mut fds = [PollFd::new(stream, PollFlags::IN)];
        match poll(&mut fds, None) {
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(error) => return Err(std::io::Error::from(error).into()),
        }
    }
}

/// `Failed` for an error (not retryable when the request itself was wrong),
/// or `answer(value)`.
fn refused_or<T>(req: u32, result: Result<T>, answer: impl FnOnce(T) -> Response) -> Response {
    match result {
        Ok(value) => answer(value),
        Err(error) => {
            if let Some(refused) = error.downcast_ref::<ReadRefused>() {
                return Response::Failed {
                    req,
                    reason: refused.0.into(),
                    retryable: false,
                };
            }
            tracing::warn!(error = format!("{error:#}"), "storage request failed");
            Response::Failed {
                req,
                reason: "storage request failed".into(),
                retryable: true,
            }
        }
    }
}
