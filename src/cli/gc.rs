//! `berth gc run|schedule|executions|history|stop`: garbage collection of blobs no image
//! references, through the management API (an admin of every registry).

use clap::Subcommand;

use super::jobs::JobCommands;
use super::Place;

#[derive(Subcommand)]
pub enum GcCommand {
    /// Collect now (or a dry run), and follow it to its end.
    Run {
        /// Report only; nothing is deleted.
        #[arg(long)]
        dry_run: bool,
        /// Start it and return at once.
        #[arg(long)]
        no_wait: bool,
        /// The ended execution and its history as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the schedule and next runs, or set it: none, hourly, daily, weekly or a cron
    /// expression in UTC.
    Schedule {
        /// The new schedule.
        schedule: Option<String>,
    },
    /// The executions, newest first.
    Executions {
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// What an execution deleted.
    History {
        /// Execution id.
        id: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Stop a running execution.
    Stop {
        /// Execution id.
        id: String,
    },
}

pub fn run(place: &Place, cmd: GcCommand) -> Result<(), String> {
    let gc = JobCommands {
        place,
        base: "/gc".into(),
        what: "garbage collection".into(),
        units: "tasks",
        acted: "deleted",
    };
    match cmd {
        GcCommand::Run {
            dry_run,
            no_wait,
            json,
        } => gc.run(dry_run, no_wait, json, 0),
        GcCommand::Schedule { schedule } => gc.schedule(schedule),
        GcCommand::Executions { limit, json } => gc.executions(limit, json),
        GcCommand::History { id, json } => gc.history(&id, json),
        GcCommand::Stop { id } => gc.stop(&id),
    }
}
