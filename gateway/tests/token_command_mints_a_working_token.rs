//! First dev run: with no secret configured the gateway generates one into its
//! data directory, and `gateway token` signs with that same secret.

use testkit::gateway as support;

use std::process::Command;

use support::{gateway_command, Gateway};

#[test]
fn a_token_from_the_cli_connects_to_a_node_with_a_generated_secret() {
    let gateway = Gateway::start_with(&[], None);
    let secret_file = gateway.data_dir.path().join("auth-secret");
    let secret = std::fs::read_to_string(&secret_file).expect("secret generated into the data dir");
    assert!(secret.trim().len() >= 32);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&secret_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "only the owner may read the secret");

    let data_dir = gateway.data_dir.path().to_str().unwrap();
    let args = [
        "token",
        "--user",
        "alice",
        "--device",
        "phone",
        "--ttl",
        "10m",
        "--data-dir",
        data_dir,
    ];
    let token = gateway_command(&args, None).trim().to_owned();

    let mut client = gateway
        .connect_with_token(&token)
        .expect("CLI token accepted");
    assert_eq!(client.recv()["user"], "alice");
    // A token from another secret is not.
    assert_eq!(
        gateway
            .connect_with_token(&support::token("alice", "phone"))
            .err(),
        Some(401)
    );
}

#[test]
fn the_cli_refuses_ids_outside_the_grammar() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["token", "--user", "not valid", "--device", "phone"])
        .args(["--data-dir", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("[A-Za-z0-9_.-]"));
}
