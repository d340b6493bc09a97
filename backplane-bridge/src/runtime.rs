//! The threads async-nats runs on: each a current-thread tokio runtime of
//! its own.
//!
//! Owns starting them. Never runs anything a shard waits on: shards are
//! monoio and reach these threads through queues only.

/// Runs `task` on a new thread named `name`, in a current-thread tokio
/// runtime of its own: async-nats needs tokio, and the shards (monoio) must
/// never run or await it.
pub(crate) fn runtime_thread(
    name: &str,
    task: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime builds")
                .block_on(task)
        })
}
