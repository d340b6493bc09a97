//! TLS for the client listener (`wss://`): the certificate and key from
//! files, the rustls server configuration, and replacing the certificate on
//! SIGHUP.
//!
//! Owns loading and checking the files (a missing, unreadable, malformed or
//! mismatched file is a clear error naming the file), the protocol choice
//! (TLS 1.2 and 1.3 with rustls's AEAD-only suites: no CBC, no RSA key
//! exchange, no renegotiation) and the one shared certificate that a reload
//! swaps. A reload changes what new handshakes present; open connections keep
//! their session untouched, so none is dropped. Never touches a socket:
//! `link.rs` runs the sessions.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert, ServerConfig};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The node's TLS set-up: one rustls configuration shared by every shard,
/// whose certificate a reload replaces.
pub struct Tls {
    config: Arc<ServerConfig>,
    certificate: Arc<CurrentCertificate>,
    cert_path: PathBuf,
    key_path: PathBuf,
}

/// The certificate every new handshake presents, whatever name the client
/// asked for (a node serves one name; a client that asked for another
/// fails the handshake on its own certificate check).
#[derive(Debug)]
struct CurrentCertificate(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

fn provider() -> Arc<CryptoProvider> {
    // ring: already built for the NATS client; aws-lc-rs would add cmake
    // and a C build to every machine.
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    /// Loads and checks the certificate chain and key; an error says which
    /// file and why.
    pub fn load(cert_path: &Path, key_path: &Path) -> anyhow::Result<Self> {
        let provider = provider();
        let key = certified_key(cert_path, key_path, &provider)?;
        let certificate = Arc::new(CurrentCertificate(ArcSwap::from_pointee(key)));
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_cert_resolver(certificate.clone());
        // Resumption by stateless tickets: a reconnect storm after a deploy
        // resumes instead of signing again, and no shard shares a session
        // cache (a lock on every handshake).
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.ticketer =
            rustls::crypto::ring::Ticketer::new().context("creating the TLS ticket key")?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            certificate,
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
        })
    }

    /// The configuration each new session starts from.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }

    /// Reads the files again and, if they are good, makes new handshakes
    /// present them. On an error the current certificate stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let key = certified_key(&self.cert_path, &self.key_path, &provider())?;
        self.certificate.0.store(Arc::new(key));
        Ok(())
    }
}

/// The chain and key from PEM files, checked to belong together.
fn certified_key(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> anyhow::Result<CertifiedKey> {
    let cert_pem = std::fs::read(cert_path)
        .with_context(|| format!("reading tls_cert {}", cert_path.display()))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| anyhow::anyhow!("tls_cert {}: {error}", cert_path.display()))?;
    if chain.is_empty() {
        bail!(
            "tls_cert {}: no PEM certificate in the file",
            cert_path.display()
        );
    }
    let key_pem = std::fs::read(key_path)
        .with_context(|| format!("reading tls_key {}", key_path.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|error| {
        anyhow::anyhow!(
            "tls_key {}: no usable PEM private key ({error})",
            key_path.display()
        )
    })?;
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|error| anyhow::anyhow!("tls_key {}: {error}", key_path.display()))?;
    let certified = CertifiedKey::new(chain, key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => bail!(
            "tls_key {} does not belong to the certificate in tls_cert {}",
            key_path.display(),
            cert_path.display()
        ),
        Err(error) => bail!("tls_cert {}: {error}", cert_path.display()),
    }
}
