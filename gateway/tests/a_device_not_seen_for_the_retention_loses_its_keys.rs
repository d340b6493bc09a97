//! Device retention with the real processes, on the embedded store
//! (`testkit::retention`): a device that left and is not seen for the
//! writer's `--device-retention-ms` loses its keys (and its cursor and push
//! target) from storage, so senders stop encrypting for it; a device that
//! stays connected is seen again every `device_seen_interval_ms` and keeps
//! them. The table-by-table check is the storage-writer's
//! `devices_not_seen_for_the_retention_lose_their_per_device_rows`; the
//! same scenario on ScyllaDB is in `scylla_backend.rs`.

#[test]
fn a_device_gone_past_the_retention_loses_its_keys_and_a_connected_one_keeps_them() {
    testkit::retention::a_device_gone_past_the_retention_loses_its_keys(&[]);
}
