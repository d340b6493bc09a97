//! `wss://` with the real processes: a rustls client (TLS 1.2 and 1.3)
//! against certificates made in the test by rcgen. A chat goes across; plain
//! bytes on the TLS port get a plain 400; a client that refuses the
//! certificate (wrong name, expired, unknown issuer) leaves the node serving;
//! SIGHUP swaps the certificate while messages flow, without dropping a
//! connection, and a bad file keeps the old one; bad files stop start-up
//! with an error naming the file.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use serde_json::{json, Value};
use testkit::gateway::{token, Gateway, WAIT};
use tungstenite::{Message, WebSocket};

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// A test CA and what it signs.
struct Authority {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Authority {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Self { cert, key }
    }

    /// A leaf for `localhost` and 127.0.0.1: (certificate PEM, key PEM, DER).
    fn leaf(&self, common_name: &str, expired: bool) -> (String, String, CertificateDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().clone())
    }

    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        roots
    }
}

/// Writes a certificate and key where the gateway's config points.
fn write_pair(dir: &Path, cert_pem: &str, key_pem: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    // Written beside and renamed, as a certificate manager does: a reload
    // never reads half a file.
    for (path, text) in [(&cert, cert_pem), (&key, key_pem)] {
        let temporary = path.with_extension("new");
        std::fs::write(&temporary, text).unwrap();
        std::fs::rename(&temporary, path).unwrap();
    }
    (cert, key)
}

fn start_tls_gateway(cert: &Path, key: &Path) -> Gateway {
    Gateway::start(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ])
}

fn client_config(
    roots: RootCertStore,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    Arc::new(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A TLS session to `address` for `name`, handshake done (or its error).
fn tls_connect(
    address: SocketAddr,
    config: Arc<ClientConfig>,
    name: &str,
) -> Result<Tls, std::io::Error> {
    let server_name = ServerName::try_from(name.to_owned()).unwrap();
    let session = ClientConnection::new(config, server_name).unwrap();
    let socket = TcpStream::connect(address)?;
    socket.set_read_timeout(Some(WAIT))?;
    let mut tls = StreamOwned::new(session, socket);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

/// A signed-in WebSocket over `tls`; returns it after `hello` and the sync.
fn upgrade(tls: Tls, address: SocketAddr, user: &str, device: &str) -> WebSocket<Tls> {
    let mut request = tungstenite::client::IntoClientRequest::into_client_request(format!(
        "wss://localhost:{}/ws",
        address.port()
    ))
    .unwrap();
    request.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", token(user, device)).parse().unwrap(),
    );
    let (mut socket, _) = tungstenite::client(request, tls).expect("upgrade over TLS accepted");
    let hello = recv(&mut socket);
    assert_eq!(hello["type"], "hello", "{hello}");
    assert_eq!(hello["user"], user);
    assert_eq!(recv(&mut socket)["type"], "synced");
    socket
}

fn recv(socket: &mut WebSocket<Tls>) -> Value {
    loop {
        match socket.read().expect("a frame within the read timeout") {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected frame: {other:?}"),
        }
    }
}

fn recv_type(socket: &mut WebSocket<Tls>, kind: &str) -> Value {
    for _ in 0..1000 {
        let frame = recv(socket);
        if frame["type"] == kind {
            return frame;
        }
    }
    panic!("no {kind} frame");
}

fn send(socket: &mut WebSocket<Tls>, id: &str, to: &str, body: &str) {
    let frame = json!({"type": "send", "id": id, "to": to, "body": body});
    socket.send(Message::text(frame.to_string())).unwrap();
}

/// The leaf certificate a fresh handshake is shown.
fn presented(address: SocketAddr, roots: RootCertStore) -> CertificateDer<'static> {
    let tls = tls_connect(
        address,
        client_config(roots, rustls::DEFAULT_VERSIONS),
        "localhost",
    )
    .expect("handshake");
    tls.conn.peer_certificates().unwrap()[0].clone()
}

#[test]
fn a_chat_goes_across_wss_on_tls_1_2_and_1_3() {
    let authority = Authority::new("test CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert_pem, key_pem, _) = authority.leaf("gateway", false);
    let (cert, key) = write_pair(dir.path(), &cert_pem, &key_pem);
    let gateway = start_tls_gateway(&cert, &key);

    for (version, expected) in [
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
    ] {
        let config = client_config(authority.roots(), &[version]);
        let connect = |user: &str| {
            let tls = tls_connect(gateway.ws, config.clone(), "localhost").expect("handshake");
            assert_eq!(tls.conn.protocol_version(), Some(expected));
            upgrade(tls, gateway.ws, user, "phone")
        };
        let tag = format!("{expected:?}");
        let (alice, bob) = (format!("alice-{tag}"), format!("bob-{tag}"));
        let mut alice_socket = connect(&alice);
        let mut bob_socket = connect(&bob);
        // Bodies across several TLS records, and a frame larger than one.
        for (index, size) in [5usize, 20_000, 40_000].into_iter().enumerate() {
            let body = "x".repeat(size);
            send(&mut alice_socket, &format!("m{index}"), &bob, &body);
            let message = recv_type(&mut bob_socket, "message");
            assert_eq!(message["from"], alice.as_str());
            assert_eq!(message["body"].as_str().map(str::len), Some(size));
            assert_eq!(
                recv_type(&mut alice_socket, "sent")["id"],
                format!("m{index}")
            );
        }
    }
    // The page is served over https too.
    let mut tls = tls_connect(
        gateway.ws,
        client_config(authority.roots(), rustls::DEFAULT_VERSIONS),
        "localhost",
    )
    .unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut page = Vec::new();
    let _ = tls.read_to_end(&mut page);
    let page = String::from_utf8_lossy(&page);
    assert!(page.starts_with("HTTP/1.1 200"), "{page:.200}");
    assert!(page.contains("<html"), "{page:.400}");
}

#[test]
fn plain_bytes_and_refused_certificates_leave_the_node_serving() {
    let authority = Authority::new("test CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert_pem, key_pem, _) = authority.leaf("gateway", false);
    let (cert, key) = write_pair(dir.path(), &cert_pem, &key_pem);
    let gateway = start_tls_gateway(&cert, &key);

    // ws:// or http:// on the TLS port: a plain answer that says what to do.
    let mut plain = TcpStream::connect(gateway.ws).unwrap();
    plain.set_read_timeout(Some(WAIT)).unwrap();
    plain
        .write_all(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = plain.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("speaks TLS"), "{answer}");
    assert_eq!(
        gateway.metric("gateway_handshakes_refused_total", &["reason=\"not_tls\""]),
        1
    );

    // Clients that refuse what they are shown.
    let good = client_config(authority.roots(), rustls::DEFAULT_VERSIONS);
    let wrong_name = tls_connect(gateway.ws, good.clone(), "chat.example.org");
    assert!(wrong_name.is_err(), "a certificate for another name");
    let stranger = Authority::new("another CA");
    let unknown_issuer = tls_connect(
        gateway.ws,
        client_config(stranger.roots(), rustls::DEFAULT_VERSIONS),
        "localhost",
    );
    assert!(unknown_issuer.is_err(), "a certificate from an unknown CA");
    // A "client" that opens with an empty ServerHello in a TLS record.
    let mut garbage = TcpStream::connect(gateway.ws).unwrap();
    garbage.set_read_timeout(Some(WAIT)).unwrap();
    garbage
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0x04, 0x02, 0x00, 0x00, 0x00])
        .unwrap();
    let mut alert = Vec::new();
    let _ = garbage.read_to_end(&mut alert);
    assert_eq!(alert.first(), Some(&0x15), "a TLS alert record: {alert:?}");
    gateway.wait_metric(
        "gateway_handshakes_refused_total",
        &["reason=\"tls_handshake\""],
        3,
    );

    // An expired certificate is refused by the client; the node lives on.
    let (cert_pem, key_pem, _) = authority.leaf("expired", true);
    let expired_dir = tempfile::tempdir().unwrap();
    let (cert, key) = write_pair(expired_dir.path(), &cert_pem, &key_pem);
    let expired_gateway = start_tls_gateway(&cert, &key);
    let error = tls_connect(expired_gateway.ws, good.clone(), "localhost")
        .expect_err("an expired certificate is refused");
    assert!(
        error.to_string().to_lowercase().contains("expired"),
        "{error}"
    );
    assert_eq!(
        expired_gateway
            .admin_get("/healthz")
            .map(|(status, _)| status),
        Some(200)
    );

    // After all that, the node still serves a good client.
    let tls = tls_connect(gateway.ws, good, "localhost").expect("handshake");
    let mut socket = upgrade(tls, gateway.ws, "carol", "phone");
    socket
        .send(Message::text(json!({"type": "ping"}).to_string()))
        .unwrap();
    assert_eq!(recv_type(&mut socket, "pong")["type"], "pong");
}

#[test]
fn sighup_swaps_the_certificate_while_messages_flow() {
    let authority = Authority::new("test CA");
    let dir = tempfile::tempdir().unwrap();
    let (first_pem, first_key, first_der) = authority.leaf("first", false);
    let (cert, key) = write_pair(dir.path(), &first_pem, &first_key);
    let gateway = start_tls_gateway(&cert, &key);
    let config = client_config(authority.roots(), rustls::DEFAULT_VERSIONS);
    assert_eq!(presented(gateway.ws, authority.roots()), first_der);

    let connect = |user: &str| {
        let tls = tls_connect(gateway.ws, config.clone(), "localhost").unwrap();
        upgrade(tls, gateway.ws, user, "phone")
    };
    let mut alice = connect("alice");
    let mut bob = connect("bob");

    // Messages flow before, during and after the reload, on the same two
    // connections (bounded: 300 sends, paced under the send allowance).
    let (second_pem, second_key, second_der) = authority.leaf("second", false);
    const SENDS: usize = 300;
    let mut delivered = 0;
    let started = Instant::now();
    for index in 0..SENDS {
        if index == SENDS / 2 {
            write_pair(dir.path(), &second_pem, &second_key);
            testkit::signal(gateway.pid(), "HUP");
            gateway.wait_metric("gateway_tls_reloads_total", &["result=\"ok\""], 1);
        }
        send(
            &mut alice,
            &format!("m{index}"),
            "bob",
            &format!("body {index}"),
        );
        let message = recv_type(&mut bob, "message");
        assert_eq!(message["body"], format!("body {index}"));
        assert_eq!(recv_type(&mut alice, "sent")["id"], format!("m{index}"));
        delivered += 1;
        // Under the default allowance of 20 sends/s with a burst of 100.
        std::thread::sleep(Duration::from_millis(40));
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "bounded in time"
        );
    }
    assert_eq!(delivered, SENDS);
    assert_eq!(
        gateway.metric("gateway_closes_total", &["code=\"1000\""]),
        0,
        "no connection was closed"
    );
    // New handshakes present the new certificate.
    assert_eq!(presented(gateway.ws, authority.roots()), second_der);

    // A key that is not the certificate's: the reload fails, the second stays.
    let (_, other_key, _) = authority.leaf("third", false);
    let (third_pem, _, _) = authority.leaf("third", false);
    write_pair(dir.path(), &third_pem, &other_key);
    testkit::signal(gateway.pid(), "HUP");
    gateway.wait_metric("gateway_tls_reloads_total", &["result=\"failed\""], 1);
    assert_eq!(presented(gateway.ws, authority.roots()), second_der);
    // The old connections still talk.
    send(&mut alice, "after", "bob", "after the failed reload");
    assert_eq!(
        recv_type(&mut bob, "message")["body"],
        "after the failed reload"
    );
}

/// Runs the gateway with `args` and expects it to refuse to start; its stderr.
fn start_up_error(args: &[&str]) -> String {
    let data = tempfile::tempdir().unwrap();
    let output = Command::new(testkit::workspace_binary("gateway"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--data-dir", data.path().to_str().unwrap()])
        .args(["--storage-writer", "external"])
        .args(args)
        .env("GATEWAY_AUTH_SECRET", testkit::gateway::SECRET)
        .output()
        .expect("the gateway runs");
    assert!(!output.status.success(), "started with {args:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn bad_tls_files_stop_start_up_naming_the_file() {
    let authority = Authority::new("test CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert_pem, key_pem, _) = authority.leaf("gateway", false);
    let (cert, key) = write_pair(dir.path(), &cert_pem, &key_pem);
    let missing = dir.path().join("missing.pem");
    let (cert, key, missing) = (
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
        missing.to_str().unwrap(),
    );

    let error = start_up_error(&["--tls-cert", missing, "--tls-key", key]);
    assert!(
        error.contains("reading tls_cert") && error.contains(missing),
        "{error}"
    );
    let error = start_up_error(&["--tls-cert", cert, "--tls-key", missing]);
    assert!(
        error.contains("reading tls_key") && error.contains(missing),
        "{error}"
    );
    let error = start_up_error(&["--tls-cert", cert]);
    assert!(
        error.contains("tls_cert and tls_key go together"),
        "{error}"
    );

    // A key that belongs to another certificate.
    let (_, other_key, _) = authority.leaf("other", false);
    let other = dir.path().join("other-key.pem");
    std::fs::write(&other, other_key).unwrap();
    let error = start_up_error(&["--tls-cert", cert, "--tls-key", other.to_str().unwrap()]);
    assert!(
        error.contains("does not belong to the certificate"),
        "{error}"
    );

    // Not PEM at all, and a key file holding a certificate.
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let error = start_up_error(&["--tls-cert", junk.to_str().unwrap(), "--tls-key", key]);
    assert!(error.contains("no PEM certificate"), "{error}");
    let error = start_up_error(&["--tls-cert", cert, "--tls-key", cert]);
    assert!(error.contains("no usable PEM private key"), "{error}");
}
