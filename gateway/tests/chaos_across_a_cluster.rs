//! Chaos under load, across a cluster (the short version that runs in the
//! suite; `bench chaos` runs it for minutes with random faults): three
//! gateway nodes with their storage-writers, a shared PostgreSQL and a
//! three-server NATS cluster. Senders stream to receivers on other nodes,
//! resending what has no `sent` after any failure (as the client library
//! does). Meanwhile, one after another: a gateway is killed with `kill -9`
//! (and started again), a storage-writer is killed with `kill -9`, a NATS
//! server is killed and restarted, PostgreSQL is stopped and started.
//! Afterwards: every acknowledged message is stored once under its id and
//! reached its receiver (live or on sync), and each conversation's history
//! is in send order.

use std::time::Duration;

use testkit::chaos::{self, Fault, Plan};

#[test]
fn kill_9_of_a_gateway_and_a_writer_and_nats_and_postgres_outages_lose_nothing_acknowledged() {
    let ms = Duration::from_millis;
    let plan = Plan {
        nodes: 3,
        nats_servers: 3,
        pairs: 4,
        sends_per_sender: 2_000,
        until: Duration::from_secs(120),
        tail: ms(1_000),
        send_pause: ms(25),
        faults: vec![
            (
                ms(800),
                Fault::KillGateway {
                    node: 2,
                    down: ms(800),
                },
            ),
            (ms(500), Fault::KillWriter { node: 0 }),
            (
                ms(800),
                Fault::KillNats {
                    server: 0,
                    down: ms(1_000),
                },
            ),
            (ms(800), Fault::StopPostgres { down: ms(2_000) }),
        ],
    };
    let report = chaos::run(&plan);
    eprintln!("chaos: {report:?}");
    assert_eq!(report.faults.len(), 4, "every fault happened under load");
    assert!(report.acknowledged >= 4 * 100, "{report:#?}");
    assert!(report.is_clean(), "{report:#?}");
}
