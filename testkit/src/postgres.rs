//! A private PostgreSQL server for a test: its own data directory and a free
//! loopback port, initialised with `initdb` (as the `postgres` user when the
//! test runs as root, which initdb requires), stoppable and restartable on
//! the same port and data (a database outage), and stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// Longest the server may take to start.
const WAIT: Duration = Duration::from_secs(30);

pub struct Postgres {
    child: Option<Child>,
    _dir: tempfile::TempDir,
    data: std::path::PathBuf,
    pub port: u16,
}

/// PostgreSQL's binaries (`apt-get install postgresql` puts them off PATH).
fn bin_dir() -> PathBuf {
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if dir.join("postgres").exists() {
            return dir;
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (scripts/test installs it)")
        .filter_map(|entry| entry.ok().map(|e| e.path().join("bin")))
        .filter(|dir| dir.join("postgres").exists())
        .collect();
    versions.sort();
    versions.pop().expect("a PostgreSQL server binary")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn id_of(flag: &str) -> u32 {
    let output = Command::new("id")
        .args([flag, "postgres"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap()
}

/// `program` as the postgres user when we are root (initdb refuses root).
fn as_postgres(program: &Path) -> Command {
    let mut command = Command::new(program);
    if is_root() {
        std::os::unix::process::CommandExt::uid(&mut command, id_of("-u"));
        std::os::unix::process::CommandExt::gid(&mut command, id_of("-g"));
    }
    command
}

impl Postgres {
    pub fn start() -> Postgres {
        let bin = bin_dir();
        let dir = tempfile::tempdir().unwrap();
        if is_root() {
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success());
        }
        let data = dir.path().join("data");
        let output = as_postgres(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "chat", "-E", "UTF8", "--no-sync"])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let port = free_port();
        let mut server = Postgres {
            child: None,
            _dir: dir,
            data,
            port,
        };
        server.restart();
        server
    }

    /// Starts the server (again) on its data directory and port, and waits
    /// until it accepts connections.
    pub fn restart(&mut self) {
        let bin = bin_dir();
        let child = as_postgres(&bin.join("postgres"))
            .arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string(), "-h", "127.0.0.1", "-k"])
            .arg(self._dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        loop {
            let ready = Command::new(bin.join("pg_isready"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "chat",
                ])
                .stdout(Stdio::null())
                .status()
                .unwrap();
            if ready.success() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("postgres exited: {status}");
            }
            assert!(Instant::now() < deadline, "postgres not ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (fast shutdown: clients are cut off, nothing
    /// committed is lost), or kills it if it will not stop.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=chat dbname=postgres",
            self.port
        )
    }

    /// One query through `psql` (unaligned, tuples only): its rows, each
    /// a list of its columns.
    pub fn query(&self, sql: &str) -> Vec<Vec<String>> {
        let output = Command::new(bin_dir().join("psql"))
            .args(["-X", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1"])
            .args(["-d", &self.url(), "-c", sql])
            .output()
            .expect("psql runs");
        assert!(
            output.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|line| !line.is_empty())
            .map(|line| line.split('\t').map(str::to_owned).collect())
            .collect()
    }

    /// Rows with `user_id = user` in every table of the schema that has a
    /// `user_id` column (partitions apart from their parent), as (table,
    /// count), for the tables with any: found by looking at every table
    /// there is, not at a list the code under test also uses.
    pub fn rows_naming(&self, user: &str) -> Vec<(String, usize)> {
        assert!(
            user.bytes().all(|b| b.is_ascii_alphanumeric()),
            "a plain user id"
        );
        let tables = self.query(
            "SELECT c.table_name FROM information_schema.columns c \
             JOIN pg_class k ON k.relname = c.table_name \
             WHERE c.column_name = 'user_id' AND c.table_schema = current_schema() \
             AND k.relkind = 'r' ORDER BY 1",
        );
        assert!(tables.len() >= 10, "the tables with users: {tables:?}");
        let mut found = Vec::new();
        for table in tables {
            let table = &table[0];
            let sql = format!("SELECT count(*) FROM {table} WHERE user_id = '{user}'");
            let count: usize = self.query(&sql)[0][0].parse().unwrap();
            if count > 0 {
                found.push((table.clone(), count));
            }
        }
        found
    }

    /// Flags that make a spawned storage-writer use this server.
    pub fn writer_flags(&self) -> Vec<String> {
        vec![
            "--storage-writer-arg=--backend".into(),
            "--storage-writer-arg=postgres".into(),
            "--storage-writer-arg=--postgres-url".into(),
            format!("--storage-writer-arg={}", self.url()),
        ]
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
