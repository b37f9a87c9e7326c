//! Background jobs (cleanups, garbage collection, eviction) run on a runtime of their own, one
//! worker thread and its blocking pool, at a lower CPU priority (nice 10): on a two-core edge
//! box a long run must not take the cores from the requests it shares them with.

use std::future::Future;

/// Nice value of the job threads (0 is the server's; higher yields more).
const NICE: i32 = 10;

/// How long a server's shutdown waits for its jobs' threads to let go of what they hold.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The jobs' runtime.
pub struct JobRuntime {
    runtime: parking_lot::Mutex<Option<tokio::runtime::Runtime>>,
}

/// Lowers the calling thread's CPU priority (Linux: the nice value is per thread).
fn lower_priority() {
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), NICE) {
        tracing::debug!(error = %e, "could not lower the priority of a job thread");
    }
}

impl JobRuntime {
    /// Starts the runtime.
    pub fn start() -> std::io::Result<JobRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(4)
            .thread_name("berth-jobs")
            .on_thread_start(lower_priority)
            .enable_all()
            .build()?;
        Ok(JobRuntime {
            runtime: parking_lot::Mutex::new(Some(runtime)),
        })
    }

    /// Runs a job's future there.
    pub fn spawn<F>(&self, job: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        if let Some(rt) = &*self.runtime.lock() {
            rt.spawn(job);
        }
    }

    /// Stops the jobs (at a server's shutdown) and waits, at most [`STOP_WAIT`], until their
    /// tasks and what they hold (the state of the server, its data directory lock) are
    /// dropped; an execution cut short is marked interrupted at the next start. Later jobs are
    /// not run.
    pub async fn stop(&self) {
        let Some(rt) = self.runtime.lock().take() else {
            return;
        };
        // Waiting blocks: on a thread of the caller's blocking pool, not on its workers.
        let _ = tokio::task::spawn_blocking(move || rt.shutdown_timeout(STOP_WAIT)).await;
    }

    /// Stops the jobs without waiting for them (a runtime dropped where it cannot wait).
    fn shutdown(&self) {
        if let Some(rt) = self.runtime.lock().take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for JobRuntime {
    /// Stops without waiting (the runtime may be dropped on a server thread): an execution cut
    /// short is marked interrupted at the next start.
    fn drop(&mut self) {
        self.shutdown();
    }
}
