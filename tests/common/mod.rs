//! Shared test harness: berth processes, OCI layouts, real clients.
#![allow(dead_code)]

pub mod clients;
pub mod doubles;
pub mod metrics;
pub mod oci_layout;
pub mod process;
pub mod registry;
pub mod server;

/// Runs a future of berth's async API to its end from synchronous test code (a helper called
/// inside a test's runtime, or outside any): on a thread of its own, with a runtime of its own.
pub fn block<F>(f: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for a blocking helper")
                .block_on(f)
        })
        .join()
        .expect("blocked future panicked")
    })
}
