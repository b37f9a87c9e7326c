//! When scheduled jobs run (DESIGN.md 9): cron in UTC with the grammar of DESIGN.md 9 (minute,
//! hour, day of month, month `1-12`/`JAN-DEC`, day of week `0-6`/`SUN-SAT`; `* / , -`, and `?` in
//! the day fields), Harbor's 6-field form whose seconds field is `0`, and the presets None,
//! Hourly, Daily and Weekly.
//!
//! The times come from `croner`, which accepts more (`L`, `W`, `#`, a seconds field, weekday 7):
//! [`Cron::parse`] checks the grammar first and refuses anything beyond it, naming the field.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// When a policy runs by itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "cron", rename_all = "snake_case")]
pub enum Schedule {
    /// Only by hand.
    None,
    /// At minute 0 of every hour.
    Hourly,
    /// Every day at 00:00 UTC.
    Daily,
    /// Every Saturday at 00:00 UTC.
    Weekly,
    /// A cron expression.
    Custom(String),
}

impl Schedule {
    /// The cron expression it stands for (`None` for [`Schedule::None`]), checked.
    pub fn cron(&self) -> Result<Option<Cron>, ScheduleError> {
        let text = match self {
            Schedule::None => return Ok(None),
            Schedule::Hourly => "0 * * * *",
            Schedule::Daily => "0 0 * * *",
            Schedule::Weekly => "0 0 * * 6",
            Schedule::Custom(text) => text,
        };
        Cron::parse(text).map(Some)
    }

    /// Whether a run falls due after `since` and at or before `now` (what the scheduler asks
    /// at each tick, `since` being its previous tick). A refused expression never is.
    pub fn due_between(&self, since: SystemTime, now: SystemTime) -> bool {
        self.due_at(since, now).is_some()
    }

    /// When it falls due after `since` and at or before `now`, if it does.
    pub fn due_at(&self, since: SystemTime, now: SystemTime) -> Option<SystemTime> {
        match self.cron() {
            Ok(Some(cron)) => cron.next_after(since).filter(|at| *at <= now),
            _ => None,
        }
    }
}

/// A job's schedule, as stored and as the API takes it (`{"schedule": {...}}`): a registry's
/// cleanup, garbage collection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSettings {
    /// The schedule (UTC).
    pub schedule: Schedule,
}

impl ScheduleSettings {
    /// Only by hand.
    pub const NONE: ScheduleSettings = ScheduleSettings {
        schedule: Schedule::None,
    };

    /// The settings, refused (with the field named) when the cron is beyond the grammar.
    pub fn checked(self) -> Result<ScheduleSettings, ScheduleError> {
        self.schedule.cron()?;
        Ok(self)
    }
}

/// A cron expression berth accepts.
#[derive(Debug, Clone)]
pub struct Cron {
    text: String,
    inner: croner::Cron,
}

/// Why a schedule is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cron {text:?}: {why}")]
pub struct ScheduleError {
    /// The expression as given.
    pub text: String,
    /// What is wrong, naming the field.
    pub why: String,
}

const FIELDS: [&str; 5] = ["minute", "hour", "day of month", "month", "day of week"];
const MONTHS: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const DAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

impl Cron {
    /// Parses `text`: five fields, or six whose first (seconds) is `0`.
    pub fn parse(text: &str) -> Result<Cron, ScheduleError> {
        let refuse = |why: String| ScheduleError {
            text: text.to_string(),
            why,
        };
        let mut fields: Vec<&str> = text.split_whitespace().collect();
        match fields.len() {
            5 => {}
            6 if fields[0] == "0" => {
                fields.remove(0);
            }
            6 => {
                return Err(refuse(format!(
                    "a seconds field must be 0 (schedules have minute granularity), not {:?}",
                    fields[0]
                )))
            }
            n => {
                return Err(refuse(format!(
                    "{n} fields; expected 5 (minute hour day-of-month month day-of-week), or 6 with seconds 0"
                )))
            }
        }
        for (i, field) in fields.iter().enumerate() {
            check_field(i, field)
                .map_err(|why| refuse(format!("{} field {field:?}: {why}", FIELDS[i])))?;
        }
        let five = fields.join(" ");
        let inner = croner::Cron::new(&five)
            .parse()
            .map_err(|e| refuse(e.to_string()))?;
        Ok(Cron {
            text: text.to_string(),
            inner,
        })
    }

    /// The expression as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first run strictly after `after` (UTC), if there is one.
    pub fn next_after(&self, after: SystemTime) -> Option<SystemTime> {
        let at: DateTime<Utc> = after.into();
        let next = self.inner.find_next_occurrence(&at, false).ok()?;
        let ms = u64::try_from(next.timestamp_millis()).ok()?;
        Some(UNIX_EPOCH + Duration::from_millis(ms))
    }

    /// The next `n` runs after `after`.
    pub fn next_runs(&self, after: SystemTime, n: usize) -> Vec<SystemTime> {
        let mut out = Vec::with_capacity(n);
        let mut at = after;
        while out.len() < n {
            match self.next_after(at) {
                Some(t) => {
                    out.push(t);
                    at = t;
                }
                None => break,
            }
        }
        out
    }
}

/// Checks one field against the grammar (ranges of numbers are croner's to check, but the
/// weekday 7 it would take for Sunday).
fn check_field(index: usize, field: &str) -> Result<(), String> {
    let day_field = index == 2 || index == 4;
    if field == "?" {
        return if day_field {
            Ok(())
        } else {
            Err("`?` stands only in the day fields".into())
        };
    }
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => (range, Some(step)),
            None => (item, None),
        };
        if let Some(step) = step {
            if step.is_empty() || !step.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("step {step:?} is not a number"));
            }
            if step.bytes().all(|b| b == b'0') {
                return Err("a step of 0".into());
            }
        }
        if range == "*" {
            continue;
        }
        let bounds: Vec<&str> = range.split('-').collect();
        if bounds.len() > 2 || bounds.iter().any(|b| b.is_empty()) {
            return Err(format!("{range:?} is not a value or a range"));
        }
        for value in bounds {
            check_value(index, value)?;
        }
    }
    Ok(())
}

fn check_value(index: usize, value: &str) -> Result<(), String> {
    if value.bytes().all(|b| b.is_ascii_digit()) {
        if index == 4 && value.parse::<u32>().is_ok_and(|d| d > 6) {
            return Err(format!("day of week {value} is out of 0-6 (SUN-SAT)"));
        }
        return Ok(());
    }
    let upper = value.to_ascii_uppercase();
    let names: &[&str] = match index {
        3 => &MONTHS,
        4 => &DAYS,
        _ => &[],
    };
    if names.contains(&upper.as_str()) {
        Ok(())
    } else if names.is_empty() {
        Err(format!("{value:?} is not a number"))
    } else {
        Err(format!(
            "{value:?} is neither a number nor one of {}",
            names.join(" ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_due_once_between_two_ticks() {
        let minute = Schedule::Custom("* * * * *".into());
        // (schedule, previous tick, this tick, due)
        let table = [
            (
                &minute,
                "2026-11-30T12:00:30Z",
                "2026-11-30T12:00:59Z",
                false,
            ),
            (
                &minute,
                "2026-11-30T12:00:30Z",
                "2026-11-30T12:01:00Z",
                true,
            ),
            (
                &minute,
                "2026-11-30T12:01:00Z",
                "2026-11-30T12:01:15Z",
                false,
            ),
            (
                &Schedule::Daily,
                "2026-11-30T23:59:50Z",
                "2026-12-01T00:00:05Z",
                true,
            ),
            (
                &Schedule::Daily,
                "2026-12-01T00:00:05Z",
                "2026-12-01T00:00:20Z",
                false,
            ),
            (
                &Schedule::Weekly,
                "2026-12-04T23:59:50Z",
                "2026-12-05T00:00:05Z",
                true,
            ),
            (
                &Schedule::None,
                "2026-11-30T00:00:00Z",
                "2026-12-30T00:00:00Z",
                false,
            ),
            (
                &Schedule::Custom("0 3 L * *".into()),
                "2026-11-30T00:00:00Z",
                "2026-12-30T00:00:00Z",
                false,
            ),
        ];
        for (schedule, since, now, due) in table {
            assert_eq!(
                schedule.due_between(at(since), at(now)),
                due,
                "{schedule:?} between {since} and {now}"
            );
        }
    }

    /// Unix seconds of a UTC date and time.
    fn at(text: &str) -> SystemTime {
        let t: DateTime<Utc> = text.parse().unwrap();
        UNIX_EPOCH + Duration::from_secs(t.timestamp() as u64)
    }

    fn show(t: SystemTime) -> String {
        DateTime::<Utc>::from(t)
            .format("%Y-%m-%d %a %H:%M")
            .to_string()
    }

    #[test]
    fn every_field_form_and_its_next_run() {
        // 2026-11-30 is a Monday.
        let from = at("2026-11-30T10:07:30Z");
        // (expression, next run after `from`)
        let table = [
            ("* * * * *", "2026-11-30 Mon 10:08"),
            ("*/15 * * * *", "2026-11-30 Mon 10:15"),
            ("5,35 * * * *", "2026-11-30 Mon 10:35"),
            ("10-20 * * * *", "2026-11-30 Mon 10:10"),
            ("0-30/10 * * * *", "2026-11-30 Mon 10:10"),
            ("0 * * * *", "2026-11-30 Mon 11:00"),
            ("30 2 * * *", "2026-12-01 Tue 02:30"),
            ("0 0 1 * *", "2026-12-01 Tue 00:00"),
            ("0 0 1 JAN ?", "2027-01-01 Fri 00:00"),
            ("0 0 1 jan-mar *", "2027-01-01 Fri 00:00"),
            ("0 0 1 6 *", "2027-06-01 Tue 00:00"),
            ("0 9 ? * MON-FRI", "2026-12-01 Tue 09:00"),
            ("0 9 * * SAT,SUN", "2026-12-05 Sat 09:00"),
            ("0 0 * * 0", "2026-12-06 Sun 00:00"),
            ("0 0 * * SUN", "2026-12-06 Sun 00:00"),
            ("0 12 ? * 1", "2026-11-30 Mon 12:00"),
            ("0 0 */10 * *", "2026-12-01 Tue 00:00"),
            // Harbor's six fields with seconds 0.
            ("0 0 0 * * *", "2026-12-01 Tue 00:00"),
            ("0 */5 * * * ?", "2026-11-30 Mon 10:10"),
        ];
        for (text, next) in table {
            let cron = Cron::parse(text).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(show(cron.next_after(from).unwrap()), next, "{text}");
        }
    }

    #[test]
    fn what_the_grammar_refuses_names_its_field() {
        // (expression, words the refusal holds)
        let table = [
            ("* * * *", "4 fields"),
            ("* * * * * * *", "7 fields"),
            ("5 0 0 * * *", "seconds field must be 0"),
            ("? * * * *", "minute field"),
            ("* ? * * *", "hour field"),
            ("0 0 L * *", "day of month field"),
            ("0 0 15W * *", "day of month field"),
            ("0 0 * * 1#2", "day of week field"),
            ("0 0 * * 5L", "day of week field"),
            ("0 0 * * 7", "out of 0-6"),
            ("0 0 * FOO *", "month field"),
            ("0 0 * * MONDAY", "day of week field"),
            ("0 0 * MON *", "month field"),
            ("*/0 * * * *", "a step of 0"),
            ("*/x * * * *", "not a number"),
            ("1- * * * *", "not a value or a range"),
            ("60 * * * *", "invalid cron"),
            ("0 24 * * *", "invalid cron"),
            ("0 0 32 * *", "invalid cron"),
            ("0 0 * 13 *", "invalid cron"),
            ("@daily", "1 fields"),
        ];
        for (text, words) in table {
            let e = Cron::parse(text).expect_err(text).to_string();
            assert!(e.contains(words), "{text}: {e}");
        }
    }

    #[test]
    fn presets_and_next_runs() {
        let from = at("2026-11-30T10:07:30Z");
        let runs = |s: Schedule| {
            s.cron().unwrap().map(|c| {
                c.next_runs(from, 3)
                    .into_iter()
                    .map(show)
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(runs(Schedule::None), None);
        assert_eq!(
            runs(Schedule::Hourly).unwrap(),
            [
                "2026-11-30 Mon 11:00",
                "2026-11-30 Mon 12:00",
                "2026-11-30 Mon 13:00"
            ]
        );
        assert_eq!(
            runs(Schedule::Daily).unwrap(),
            [
                "2026-12-01 Tue 00:00",
                "2026-12-02 Wed 00:00",
                "2026-12-03 Thu 00:00"
            ]
        );
        assert_eq!(
            runs(Schedule::Weekly).unwrap(),
            [
                "2026-12-05 Sat 00:00",
                "2026-12-12 Sat 00:00",
                "2026-12-19 Sat 00:00"
            ]
        );
        assert!(Schedule::Custom("0 0 L * *".into()).cron().is_err());
        let json = serde_json::to_value(Schedule::Custom("0 3 * * *".into())).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "custom", "cron": "0 3 * * *"})
        );
        let daily: Schedule = serde_json::from_value(serde_json::json!({"type": "daily"})).unwrap();
        assert_eq!(daily, Schedule::Daily);
    }
}
