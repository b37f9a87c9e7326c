//! Background work (cleanup, garbage collection, replication, scanning): when it runs
//! (`schedule`). Executions, tasks and their history come next (issue 12).

pub mod schedule;
