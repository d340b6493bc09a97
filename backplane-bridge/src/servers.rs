//! Where NATS is: the `nats_url` setting parsed into server addresses.
//!
//! Owns the one parse of that setting, used by the bridge and the lease
//! alike. Never connects.

/// The NATS servers in `urls`: one address, or several separated by commas
/// (the servers of a cluster; the client also learns the others from the
/// first it reaches). An error names the address that does not parse.
pub fn server_addrs(urls: &str) -> Result<Vec<async_nats::ServerAddr>, String> {
    let addresses: Vec<_> = urls
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| {
            url.parse::<async_nats::ServerAddr>()
                .map_err(|error| format!("NATS address {url:?}: {error}"))
        })
        .collect::<Result<_, _>>()?;
    if addresses.is_empty() {
        return Err(format!("no NATS address in {urls:?}"));
    }
    Ok(addresses)
}
