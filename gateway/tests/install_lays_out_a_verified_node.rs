//! `scripts/install --destdir` lays out a node that systemd would accept: the
//! binary, a unit that passes `systemd-analyze verify` (via `systemd/check`),
//! a config the gateway loads, a 0600 secret, the tuning profile and docs; and a
//! second install keeps the operator's config and secret.

use testkit::gateway as support;

use support::run_script;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|_| panic!("{} exists", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn install_into(root: &Path) {
    support::ensure_storage_writer_built();
    run_script(
        "scripts/install",
        &[
            "--destdir",
            root.to_str().unwrap(),
            "--binary",
            env!("CARGO_BIN_EXE_gateway"),
        ],
    );
}

#[test]
fn install_stages_a_complete_node() {
    let root = tempfile::tempdir().unwrap();
    install_into(root.path());
    let at = |path: &str| root.path().join(path.trim_start_matches('/'));

    assert_eq!(mode(&at("/usr/local/bin/chat-gateway")), 0o755);
    assert_eq!(mode(&at("/usr/local/bin/chat-storage-writer")), 0o755);
    assert_eq!(
        mode(&at("/etc/chat-gateway/storage-writer.env")),
        0o600,
        "backend credentials are private"
    );
    assert_eq!(
        mode(&at("/etc/chat-gateway/gateway.env")),
        0o600,
        "the secret is private"
    );
    for file in [
        "/etc/systemd/system/chat-gateway.service",
        "/etc/systemd/system/chat-storage-writer.service",
        "/etc/chat-gateway/gateway.toml",
        "/etc/sysctl.d/60-chat-gateway.conf",
        "/etc/security/limits.d/60-chat-gateway.conf",
        "/usr/local/share/doc/chat-gateway/operations.md",
    ] {
        assert_eq!(mode(&at(file)), 0o644, "{file}");
    }
    assert_eq!(
        mode(&at("/usr/local/share/chat-gateway/cpu-placement")),
        0o755
    );

    let unit = std::fs::read_to_string(at("/etc/systemd/system/chat-gateway.service")).unwrap();
    assert!(unit
        .contains("ExecStart=/usr/local/bin/chat-gateway --config /etc/chat-gateway/gateway.toml"));
    assert!(
        !unit.contains("@BINDIR@") && !unit.contains("@DOCDIR@"),
        "every placeholder replaced"
    );
    assert!(unit.contains("After=network-online.target chat-storage-writer.service"));
    assert!(at("/etc/systemd/system/chat-nats.service").exists());
    let nats_check = Command::new("nats-server")
        .arg("-c")
        .arg(at("/etc/chat-gateway/nats.conf"))
        .arg("-t")
        .output()
        .expect("nats-server is installed (scripts/test installs it)");
    assert!(
        nats_check.status.success(),
        "the installed nats.conf is valid: {}",
        String::from_utf8_lossy(&nats_check.stderr)
    );
    let writer_unit =
        std::fs::read_to_string(at("/etc/systemd/system/chat-storage-writer.service")).unwrap();
    assert!(writer_unit.contains(
        "ExecStart=/usr/local/bin/chat-storage-writer --ring-dir /run/chat-gateway --socket /run/chat-gateway/writer.sock"
    ));
    assert!(writer_unit.contains("RuntimeDirectory=chat-gateway"));

    let env = std::fs::read_to_string(at("/etc/chat-gateway/gateway.env")).unwrap();
    let secret = env
        .lines()
        .find_map(|line| line.strip_prefix("GATEWAY_AUTH_SECRET="))
        .expect("secret line");
    assert_eq!(secret.len(), 64);
    assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()));

    // The installed config loads (and the installed binary signs with the installed secret).
    let data_dir = tempfile::tempdir().unwrap();
    let output = Command::new(at("/usr/local/bin/chat-gateway"))
        .args(["token", "--user", "ops", "--device", "laptop"])
        .args([
            "--config",
            at("/etc/chat-gateway/gateway.toml").to_str().unwrap(),
        ])
        .args(["--data-dir", data_dir.path().to_str().unwrap()])
        .env("GATEWAY_AUTH_SECRET", secret)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "installed config loads: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let token = String::from_utf8(output.stdout).unwrap();
    let claims = chat_protocol::token::TokenVerifier::new(secret.as_bytes())
        .verify(token.trim(), support::unix_s());
    assert_eq!(claims.unwrap().sub, "ops");
}

#[test]
fn reinstalling_keeps_the_operators_config_and_secret() {
    let root = tempfile::tempdir().unwrap();
    install_into(root.path());
    let config = root.path().join("etc/chat-gateway/gateway.toml");
    let env = root.path().join("etc/chat-gateway/gateway.env");
    std::fs::write(&config, "node_id = 42\n").unwrap();
    let secret_before = std::fs::read_to_string(&env).unwrap();
    install_into(root.path());
    assert_eq!(std::fs::read_to_string(&config).unwrap(), "node_id = 42\n");
    assert_eq!(std::fs::read_to_string(&env).unwrap(), secret_before);
}

#[test]
fn every_unit_passes_systemd_analyze_verify_and_security() {
    let report = run_script(
        "systemd/check",
        &["--binary", env!("CARGO_BIN_EXE_gateway")],
    );
    assert!(
        report.contains("chat-gateway.service: verify ok"),
        "{report}"
    );
    assert!(report.contains("security exposure"), "{report}");
}
