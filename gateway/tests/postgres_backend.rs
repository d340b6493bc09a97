//! The PostgreSQL backend behind a real gateway and storage-writer, against a
//! real PostgreSQL server started for the test: what is acknowledged is in
//! the database, so a node that restarts on an empty data directory still
//! syncs it, answers history from it and recognises a retried send.

use testkit::gateway as support;

use support::postgres::Postgres;

#[test]
fn messages_live_in_postgres_across_a_gateway_kill_on_a_fresh_data_dir() {
    let database = Postgres::start();
    let flags = database.writer_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    support::messages_survive_a_node_replacement(&flags);
}
