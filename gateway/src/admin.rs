//! The admin HTTP listener: /healthz, /readyz and /metrics.
//!
//! Owns one plain thread with blocking sockets, far from the shards' hot path;
//! it only reads atomics the shards publish. Requests are served one at a
//! time with short timeouts and a size bound: it is for probes and scrapers,
//! not for the public.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;

use backplane_bridge::Backplane;
use std::time::Duration;

use crate::mesh::Mesh;
use crate::metrics::{render, NodeState};

/// Largest admin request read.
const REQUEST_BYTES_MAX: usize = 4096;
/// Read and write timeout per admin request.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

pub fn spawn(
    listener: TcpListener,
    node: Arc<NodeState>,
    mesh: Arc<Mesh>,
    backplane: Option<Arc<Backplane>>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => serve(stream, &node, &mesh, backplane.as_deref()),
                    Err(error) => {
                        tracing::debug!(%error, "admin accept failed");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })?;
    Ok(())
}

fn serve(
    mut stream: std::net::TcpStream,
    node: &NodeState,
    mesh: &Mesh,
    backplane: Option<&Backplane>,
) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let mut buffer = [0u8; REQUEST_BYTES_MAX];
    let mut filled = 0;
    let path = loop {
        match stream.read(&mut buffer[filled..]) {
            Ok(0) | Err(_) => return,
            Ok(read) => filled += read,
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buffer[..filled]) {
            Ok(httparse::Status::Complete(_)) => break request.path.unwrap_or("/").to_owned(),
            Ok(httparse::Status::Partial) if filled < buffer.len() => {}
            _ => {
                return respond(
                    &mut stream,
                    400,
                    "Bad Request",
                    "text/plain",
                    "bad request\n",
                )
            }
        }
    };
    match path.as_str() {
        "/healthz" => respond(&mut stream, 200, "OK", "text/plain", "ok\n"),
        "/readyz" if node.is_ready() => respond(&mut stream, 200, "OK", "text/plain", "ready\n"),
        "/readyz" => respond(
            &mut stream,
            503,
            "Service Unavailable",
            "text/plain",
            "not ready\n",
        ),
        "/metrics" => respond(
            &mut stream,
            200,
            "OK",
            "text/plain; version=0.0.4",
            &render(node, mesh, backplane),
        ),
        _ => respond(&mut stream, 404, "Not Found", "text/plain", "not found\n"),
    }
}

fn respond(
    stream: &mut std::net::TcpStream,
    status: u16,
    reason: &str,
    content_type: &str,
    body: &str,
) {
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body.as_bytes()));
}
