//! The token secret: from config or GATEWAY_AUTH_SECRET, else a development
//! secret generated once into the data directory.
//!
//! Owns where the secret comes from and the generated file's permissions.
//! Never logs the secret.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::config::Config;

/// Name of the generated secret inside the data directory.
pub const SECRET_FILE: &str = "auth-secret";

/// The secret bytes the node signs and verifies tokens with.
pub fn resolve(config: &Config) -> anyhow::Result<Vec<u8>> {
    if let Some(secret) = &config.auth_secret {
        return Ok(secret.as_bytes().to_vec());
    }
    let path = config.data_dir.join(SECRET_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let secret = text.trim();
            anyhow::ensure!(
                secret.len() >= 32,
                "{} holds fewer than 32 bytes",
                path.display()
            );
            Ok(secret.as_bytes().to_vec())
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            generate(&config.data_dir, &path)
        }
        Err(error) => Err(error).with_context(|| format!("reading {}", path.display())),
    }
}

fn generate(data_dir: &Path, path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let mut random = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut urandom| urandom.read_exact(&mut random))
        .context("reading /dev/urandom")?;
    let secret: String = random.iter().map(|byte| format!("{byte:02x}")).collect();
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    match created {
        Ok(mut file) => {
            file.write_all(secret.as_bytes())?;
            file.sync_all()?;
            tracing::warn!(path = %path.display(), "no auth secret configured: generated a development secret; set GATEWAY_AUTH_SECRET in production");
            Ok(secret.into_bytes())
        }
        // Another process (gateway or `gateway token`) won the race: use its secret.
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok(std::fs::read_to_string(path)?.trim().as_bytes().to_vec())
        }
        Err(error) => Err(error).with_context(|| format!("creating {}", path.display())),
    }
}
