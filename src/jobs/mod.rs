//! Background work (cleanup, garbage collection, replication, scanning): when it runs
//! (`schedule`), and its executions with their tasks and history (`executions`).

pub mod executions;
pub mod gc;
pub mod runtime;
pub mod schedule;
