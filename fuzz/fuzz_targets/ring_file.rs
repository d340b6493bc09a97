//! A ring file the storage-writer finds in its ring directory, corrupted:
//! attaching and reading it must refuse or read records, never crash (the
//! mapping is `unsafe`, so a bad header must not turn into an access past
//! the file).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("chat-fuzz-ring-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("shard-0.ring");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(mut consumer) = chat_ring::attach_existing_consumer(&path) {
        for _ in 0..64 {
            match consumer.next_record() {
                Ok(Some(_)) => {}
                _ => break,
            }
        }
    }
    let _ = std::fs::remove_file(&path);
});
