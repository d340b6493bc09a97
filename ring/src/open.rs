//! Creating a ring file, or attaching to one the other side created, with validation.
//!
//! Owns the initialisation protocol: the first side to arrive writes a fully
//! initialised header into a temporary file and renames it into place, so the
//! other side never sees a half-written header. Owns the role locks: at most
//! one producer and one consumer per ring (a sidecar file locked with flock).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use memmap2::MmapOptions;

use crate::consumer::Consumer;
use crate::error::RingError;
use crate::layout::*;
use crate::mapping::{read_array, Mapping};
use crate::producer::Producer;

/// What both sides must agree on.
#[derive(Debug, Clone, Copy)]
pub struct RingOptions {
    /// Data region size: a power of two, 64 KiB - 1 GiB.
    pub capacity_bytes: u64,
    /// The producing shard, recorded in the header and checked on attach.
    pub shard_id: u32,
}

impl RingOptions {
    fn validate(&self) -> Result<(), RingError> {
        if !self.capacity_bytes.is_power_of_two()
            || !(CAPACITY_BYTES_MIN..=CAPACITY_BYTES_MAX).contains(&self.capacity_bytes)
        {
            return Err(RingError::Options(
                "capacity_bytes must be a power of two from 64 KiB to 1 GiB",
            ));
        }
        Ok(())
    }
}

/// Attaches as the ring's one producer (a gateway shard), creating the file if needed.
pub fn attach_producer(path: &Path, options: RingOptions) -> Result<Producer, RingError> {
    let (mapping, lock) = attach(path, options, "producer")?;
    Ok(Producer::new(mapping, lock))
}

/// Attaches as the ring's one consumer (the storage-writer), creating the file if needed.
pub fn attach_consumer(path: &Path, options: RingOptions) -> Result<Consumer, RingError> {
    let (mapping, lock) = attach(path, options, "consumer")?;
    Ok(Consumer::new(mapping, lock))
}

/// Attaches as the consumer of an existing ring, taking its capacity and
/// shard id from the header (the writer does not know the gateway's settings).
/// The header is validated exactly as in `attach_consumer`.
pub fn attach_existing_consumer(path: &Path) -> Result<Consumer, RingError> {
    let mut header = [0u8; HEADER_BYTES as usize];
    let mut file = File::open(path).map_err(io_error(path))?;
    let read = std::io::Read::read(&mut file, &mut header).map_err(io_error(path))?;
    if (read as u64) < HEADER_BYTES {
        return Err(RingError::Truncated {
            path: path.display().to_string(),
            found: read as u64,
            expected: HEADER_BYTES,
        });
    }
    let field = |offset: usize, len: usize| {
        let mut bytes = [0u8; 8];
        bytes[..len].copy_from_slice(&header[offset..offset + len]);
        u64::from_le_bytes(bytes)
    };
    let magic = field(OFFSET_MAGIC, 8);
    if magic != MAGIC {
        return Err(RingError::BadMagic {
            path: path.display().to_string(),
            found: magic,
        });
    }
    let options = RingOptions {
        capacity_bytes: field(OFFSET_CAPACITY, 8),
        shard_id: field(OFFSET_SHARD, 4) as u32,
    };
    if options.validate().is_err() {
        return Err(RingError::Mismatch {
            path: path.display().to_string(),
            what: "capacity (not a power of two from 64 KiB to 1 GiB)",
            found: options.capacity_bytes,
            expected: CAPACITY_BYTES_MIN,
        });
    }
    attach_consumer(path, options)
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> RingError + '_ {
    move |source| RingError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn attach(
    path: &Path,
    options: RingOptions,
    role: &'static str,
) -> Result<(Mapping, File), RingError> {
    options.validate()?;
    let lock = take_role_lock(path, role)?;
    if !path.exists() {
        create(path, options)?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_error(path))?;
    let length = file.metadata().map_err(io_error(path))?.len();
    let display = path.display().to_string();
    if length < HEADER_BYTES {
        return Err(RingError::Truncated {
            path: display,
            found: length,
            expected: HEADER_BYTES,
        });
    }
    let map = MmapOptions::new().map_raw(&file).map_err(io_error(path))?;
    let header = |offset: usize| u64::from_le_bytes(read_array(&map, offset));
    let magic = header(OFFSET_MAGIC);
    if magic != MAGIC {
        return Err(RingError::BadMagic {
            path: display,
            found: magic,
        });
    }
    let version = u32::from_le_bytes(read_array(&map, OFFSET_VERSION));
    if version != LAYOUT_VERSION {
        return Err(RingError::WrongVersion {
            path: display,
            found: version,
            expected: LAYOUT_VERSION,
        });
    }
    let header_bytes = u64::from(u32::from_le_bytes(read_array(&map, OFFSET_HEADER_BYTES)));
    if header_bytes != HEADER_BYTES {
        return Err(RingError::Mismatch {
            path: display,
            what: "header size",
            found: header_bytes,
            expected: HEADER_BYTES,
        });
    }
    let capacity = header(OFFSET_CAPACITY);
    if capacity != options.capacity_bytes {
        return Err(RingError::Mismatch {
            path: display,
            what: "capacity",
            found: capacity,
            expected: options.capacity_bytes,
        });
    }
    let shard = u64::from(u32::from_le_bytes(read_array(&map, OFFSET_SHARD)));
    if shard != u64::from(options.shard_id) {
        return Err(RingError::Mismatch {
            path: display,
            what: "shard id",
            found: shard,
            expected: options.shard_id.into(),
        });
    }
    if length < HEADER_BYTES + capacity {
        return Err(RingError::Truncated {
            path: display,
            found: length,
            expected: HEADER_BYTES + capacity,
        });
    }
    let mapping = Mapping::new(map, capacity);
    let head = mapping.atomic_u64(OFFSET_HEAD).load(Ordering::Acquire);
    let durable = mapping.atomic_u64(OFFSET_DURABLE).load(Ordering::Acquire);
    if durable > head
        || head - durable > capacity
        || !head.is_multiple_of(8)
        || !durable.is_multiple_of(8)
    {
        return Err(RingError::Corrupt {
            position: durable,
            reason: "head and durable watermark are inconsistent",
        });
    }
    Ok((mapping, lock))
}

fn create(path: &Path, options: RingOptions) -> Result<(), RingError> {
    let temporary = temporary_path(path);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&temporary)
        .map_err(io_error(&temporary))?;
    file.set_len(HEADER_BYTES + options.capacity_bytes)
        .map_err(io_error(&temporary))?;
    let mut header = vec![0u8; HEADER_BYTES as usize];
    header[OFFSET_MAGIC..OFFSET_MAGIC + 8].copy_from_slice(&MAGIC.to_le_bytes());
    header[OFFSET_VERSION..OFFSET_VERSION + 4].copy_from_slice(&LAYOUT_VERSION.to_le_bytes());
    header[OFFSET_HEADER_BYTES..OFFSET_HEADER_BYTES + 4]
        .copy_from_slice(&(HEADER_BYTES as u32).to_le_bytes());
    header[OFFSET_CAPACITY..OFFSET_CAPACITY + 8]
        .copy_from_slice(&options.capacity_bytes.to_le_bytes());
    header[OFFSET_SHARD..OFFSET_SHARD + 4].copy_from_slice(&options.shard_id.to_le_bytes());
    std::os::unix::fs::FileExt::write_all_at(&file, &header, 0).map_err(io_error(&temporary))?;
    file.sync_all().map_err(io_error(&temporary))?;
    // Publish atomically and only if absent: a hard link fails when the path
    // exists, so when both sides create at once, the first link wins and the
    // other side attaches to it (a rename would replace a ring in use).
    match std::fs::hard_link(&temporary, path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(io_error(path)(error)),
    }
    let _ = std::fs::remove_file(&temporary);
    Ok(())
}

fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".init-{}", std::process::id()));
    path.with_file_name(name)
}

fn take_role_lock(path: &Path, role: &'static str) -> Result<File, RingError> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{role}.lock"));
    let lock_path = path.with_file_name(name);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(io_error(&lock_path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(RingError::Locked {
            path: path.display().to_string(),
            role,
        }),
        Err(std::fs::TryLockError::Error(error)) => Err(io_error(&lock_path)(error)),
    }
}
