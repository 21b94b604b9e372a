//! The statistics SQL both backends share. Facts are written in batches: every row of a table
//! goes into one statement as [`Rows`], which PostgreSQL receives as one array per column
//! (`UNNEST`) and SQLite as one JSON array (`json_each`) — the backend builds that statement
//! and binds the rows, see [`Backend::insert_rows`] — so a projected batch costs a handful of
//! round trips, not one per visit.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::stats::{QuarantinedEvent, RollupRow};
use crate::error::{Error, Result};
use crate::stats::facts::{Quarantined, SessionFact, TransactionFact, VisitFact};
use crate::stats::hist::Histogram;
use crate::stats::report::{Dims, Tally};

/// How a column is typed in the rows written to it.
#[derive(Debug, Clone, Copy)]
pub enum Col {
    Text,
    Int,
    Time,
}

/// A table written in batches of [`Rows`]: its columns, conflict key, and whether a conflicting
/// row is updated (`true`) or left alone when written with [`Write::Upsert`].
#[derive(Debug)]
pub struct Table {
    pub name: &'static str,
    pub cols: &'static [(&'static str, Col)],
    pub key: &'static [&'static str],
    pub update: bool,
}

/// How a batch meets rows already stored under the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// None can exist (new visits, rollups just deleted): a plain insert, which refuses a
    /// duplicate loudly rather than paying for conflict handling.
    Insert,
    /// The table's conflict rule: update the stored row, or leave it.
    Upsert,
}

impl Table {
    /// The conflict clause of `write`.
    pub fn conflict_clause(&self, write: Write) -> String {
        match write {
            Write::Insert => String::new(),
            Write::Upsert => self.on_conflict(),
        }
    }

    pub fn col_list(&self) -> String {
        self.cols.iter().map(|(c, _)| *c).collect::<Vec<_>>().join(", ")
    }

    pub fn on_conflict(&self) -> String {
        let key = self.key.join(", ");
        if !self.update {
            return format!("ON CONFLICT ({key}) DO NOTHING");
        }
        let set: Vec<String> = self
            .cols
            .iter()
            .filter(|(c, _)| !self.key.contains(c))
            .map(|(c, _)| format!("{c} = excluded.{c}"))
            .collect();
        format!("ON CONFLICT ({key}) DO UPDATE SET {}", set.join(", "))
    }
}

use Col::{Int, Text, Time};

pub const VISIT_FACTS: Table = Table {
    name: "visit_facts",
    cols: &[
        ("visit_id", Text),
        ("agent_id", Text),
        ("site", Text),
        ("ticket", Text),
        ("service", Text),
        ("queue", Text),
        ("business_day", Text),
        ("created_at", Time),
        ("created_local", Text),
        ("first_called_at", Time),
        ("ended_at", Time),
        ("outcome", Text),
        ("waiting_ms", Int),
        ("service_ms", Int),
        ("counter", Text),
        ("staff", Text),
        ("transfers", Int),
        ("recalls", Int),
    ],
    // The partition column is part of the key: PostgreSQL partitions by it (0004).
    key: &["visit_id", "created_at"],
    update: true,
};

pub const TRANSACTION_FACTS: Table = Table {
    name: "transaction_facts",
    cols: &[
        ("visit_id", Text),
        ("n", Int),
        ("agent_id", Text),
        ("site", Text),
        ("service", Text),
        ("queue", Text),
        ("place", Text),
        ("business_day", Text),
        ("entered_at", Time),
        ("entered_local", Text),
        ("called_at", Time),
        ("ended_at", Time),
        ("outcome", Text),
        ("waiting_ms", Int),
        ("service_ms", Int),
        ("counter", Text),
        ("staff", Text),
    ],
    // The partition column is part of the key: PostgreSQL partitions by it (0004).
    key: &["visit_id", "n", "entered_at"],
    update: true,
};

pub const SESSION_FACTS: Table = Table {
    name: "session_facts",
    cols: &[
        ("agent_id", Text),
        ("kind", Text),
        ("subject", Text),
        ("opened_at", Time),
        ("opened_local", Text),
        ("site", Text),
        ("other", Text),
        ("closed_at", Time),
        ("serving_ms", Int),
        ("served", Int),
    ],
    key: &["agent_id", "kind", "subject", "opened_at"],
    update: true,
};

pub const QUARANTINE: Table = Table {
    name: "quarantined_events",
    cols: &[
        ("agent_id", Text),
        ("seq", Int),
        ("site", Text),
        ("kind", Text),
        ("stage", Text),
        ("reason", Text),
        ("payload", Text),
        ("occurred_at", Time),
        ("received_at", Time),
    ],
    key: &["agent_id", "seq"],
    update: false,
};

pub const DIRTY: Table = Table {
    name: "rollup_dirty",
    cols: &[("site", Text), ("day", Text)],
    key: &["site", "day"],
    update: false,
};

const TALLY_COLS: [(&str, Col); 13] = [
    ("service", Text),
    ("queue", Text),
    ("counter", Text),
    ("staff", Text),
    ("visits", Int),
    ("served", Int),
    ("no_shows", Int),
    ("waited", Int),
    ("wait_sum_ms", Int),
    ("wait_max_ms", Int),
    ("waits", Text),
    ("served_waits", Text),
    ("service_sum_ms", Int),
];

const fn rollup_cols(period: &'static str) -> [(&'static str, Col); 15] {
    let mut out = [("site", Text); 15];
    out[1] = (period, Text);
    let mut i = 0;
    while i < TALLY_COLS.len() {
        out[i + 2] = TALLY_COLS[i];
        i += 1;
    }
    out
}

const DAY_COLS: [(&str, Col); 15] = rollup_cols("day");
const MONTH_COLS: [(&str, Col); 15] = rollup_cols("month");

pub const ROLLUP_DAY: Table = Table {
    name: "rollup_day",
    cols: &DAY_COLS,
    key: &["site", "day", "service", "queue", "counter", "staff"],
    update: true,
};

pub const ROLLUP_MONTH: Table = Table {
    name: "rollup_month",
    cols: &MONTH_COLS,
    key: &["site", "month", "service", "queue", "counter", "staff"],
    update: true,
};

/// The columns of a family that keeps `keep` of the fine dimensions (service, queue, counter,
/// staff), in that order; `N` is 2 + kept dimensions + 9 tally columns.
const fn family_cols<const N: usize>(
    period: &'static str,
    keep: [bool; 4],
) -> [(&'static str, Col); N] {
    let fine = rollup_cols(period);
    let mut out = [("site", Text); N];
    let (mut i, mut j) = (0, 0);
    while i < fine.len() {
        if i < 2 || i >= 6 || keep[i - 2] {
            out[j] = fine[i];
            j += 1;
        }
        i += 1;
    }
    out
}

const SERVICE: [bool; 4] = [true, true, false, false];
const SERVICE_DAY_COLS: [(&str, Col); 13] = family_cols("day", SERVICE);
const SERVICE_WEEK_COLS: [(&str, Col); 13] = family_cols("week", SERVICE);
const SERVICE_MONTH_COLS: [(&str, Col); 13] = family_cols("month", SERVICE);
const COUNTER_MONTH_COLS: [(&str, Col); 13] = family_cols("month", [true, false, true, false]);
const STAFF_MONTH_COLS: [(&str, Col); 13] = family_cols("month", [true, false, false, true]);

pub const SERVICE_DAY: Table = Table {
    name: "rollup_service_day",
    cols: &SERVICE_DAY_COLS,
    key: &["site", "day", "service", "queue"],
    update: true,
};

pub const SERVICE_WEEK: Table = Table {
    name: "rollup_service_week",
    cols: &SERVICE_WEEK_COLS,
    key: &["site", "week", "service", "queue"],
    update: true,
};

pub const SERVICE_MONTH: Table = Table {
    name: "rollup_service_month",
    cols: &SERVICE_MONTH_COLS,
    key: &["site", "month", "service", "queue"],
    update: true,
};

pub const COUNTER_MONTH: Table = Table {
    name: "rollup_counter_month",
    cols: &COUNTER_MONTH_COLS,
    key: &["site", "month", "service", "counter"],
    update: true,
};

pub const STAFF_MONTH: Table = Table {
    name: "rollup_staff_month",
    cols: &STAFF_MONTH_COLS,
    key: &["site", "month", "service", "staff"],
    update: true,
};

/// Every rollup table (what a rebuild clears).
pub const ROLLUP_TABLES: [&Table; 7] = [
    &ROLLUP_DAY,
    &ROLLUP_MONTH,
    &SERVICE_DAY,
    &SERVICE_WEEK,
    &SERVICE_MONTH,
    &COUNTER_MONTH,
    &STAFF_MONTH,
];

/// The rollup table a query reads (`None`: that family is not kept at that grain).
pub fn rollup_table(q: &super::stats::RollupQuery) -> Option<&'static Table> {
    use super::stats::{Family, Grain};
    match (q.family, q.grain) {
        (Family::Fine, Grain::Day) => Some(&ROLLUP_DAY),
        (Family::Fine, Grain::Month) => Some(&ROLLUP_MONTH),
        (Family::Service, Grain::Day) => Some(&SERVICE_DAY),
        (Family::Service, Grain::Week) => Some(&SERVICE_WEEK),
        (Family::Service, Grain::Month) => Some(&SERVICE_MONTH),
        (Family::Counter, Grain::Month) => Some(&COUNTER_MONTH),
        (Family::Staff, Grain::Month) => Some(&STAFF_MONTH),
        (Family::Fine | Family::Counter | Family::Staff, Grain::Week)
        | (Family::Counter | Family::Staff, Grain::Day) => None,
    }
}

impl Table {
    fn has(&self, column: &str) -> bool {
        self.cols.iter().any(|(c, _)| *c == column)
    }
}

/// Merges tallies into one per dimensions `table` keeps (the others are blanked): a week's or a
/// month's rows from its days, or a coarser family from a finer one.
pub fn merge_for<'a>(
    table: &Table,
    rows: impl IntoIterator<Item = (&'a Dims, &'a Tally)>,
) -> BTreeMap<Dims, Tally> {
    let keep = |c: &str, v: &String| if table.has(c) { v.clone() } else { String::new() };
    let mut out: BTreeMap<Dims, Tally> = BTreeMap::new();
    for (d, t) in rows {
        let key = Dims {
            site: d.site.clone(),
            service: keep("service", &d.service),
            queue: keep("queue", &d.queue),
            counter: keep("counter", &d.counter),
            staff: keep("staff", &d.staff),
        };
        out.entry(key).or_default().merge(t);
    }
    out
}

/// Timestamps as SQLite stores them: one fixed format, so its text columns sort correctly.
fn ts(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// One value of a row being written, typed as its column.
#[derive(Debug, Clone, Copy)]
pub enum Cell<'a> {
    Text(Option<&'a str>),
    Int(Option<i64>),
    Time(Option<DateTime<Utc>>),
}

fn text(s: &str) -> Cell<'_> {
    Cell::Text(Some(s))
}

fn opt_text(s: &Option<String>) -> Cell<'_> {
    Cell::Text(s.as_deref())
}

fn int(n: impl Into<i64>) -> Cell<'static> {
    Cell::Int(Some(n.into()))
}

fn time(t: DateTime<Utc>) -> Cell<'static> {
    Cell::Time(Some(t))
}

/// The values of one column of [`Rows`].
#[derive(Debug, Clone)]
pub enum Column {
    Text(Vec<Option<String>>),
    Int(Vec<Option<i64>>),
    Time(Vec<Option<DateTime<Utc>>>),
}

/// Rows for one table, held column by column: PostgreSQL binds each column as one array
/// (`UNNEST`, no text parsing on either side), SQLite reads them as one JSON array of objects.
#[derive(Debug, Clone)]
pub struct Rows {
    pub table: &'static Table,
    pub columns: Vec<Column>,
    len: usize,
}

impl Rows {
    pub fn new(table: &'static Table) -> Self {
        let columns = table
            .cols
            .iter()
            .map(|(_, ty)| match ty {
                Col::Text => Column::Text(Vec::new()),
                Col::Int => Column::Int(Vec::new()),
                Col::Time => Column::Time(Vec::new()),
            })
            .collect();
        Rows { table, columns, len: 0 }
    }

    /// Appends one row; its cells are in the table's column order and of their types.
    pub fn push(&mut self, cells: &[Cell<'_>]) -> Result<()> {
        let mismatch = |i: usize| {
            Error::Internal(format!(
                "row for {}: cell {i} does not fit column {:?}",
                self.table.name,
                self.table.cols.get(i).map(|(c, _)| *c)
            ))
        };
        if cells.len() != self.columns.len() {
            return Err(mismatch(cells.len()));
        }
        // Check every cell before changing anything, so a bad row leaves no partial row behind.
        for (i, (column, cell)) in self.columns.iter().zip(cells).enumerate() {
            match (column, cell) {
                (Column::Text(_), Cell::Text(_))
                | (Column::Int(_), Cell::Int(_))
                | (Column::Time(_), Cell::Time(_)) => {}
                _ => return Err(mismatch(i)),
            }
        }
        for (column, cell) in self.columns.iter_mut().zip(cells) {
            match (column, *cell) {
                (Column::Text(v), Cell::Text(s)) => v.push(s.map(str::to_owned)),
                (Column::Int(v), Cell::Int(n)) => v.push(n),
                (Column::Time(v), Cell::Time(t)) => v.push(t),
                _ => {}
            }
        }
        self.len += 1;
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The rows as a JSON array of objects keyed by column (SQLite's `json_each`).
    pub fn to_json(&self) -> String {
        let mut out = Vec::with_capacity(self.len);
        for i in 0..self.len {
            let mut row = serde_json::Map::with_capacity(self.columns.len());
            for ((name, _), column) in self.table.cols.iter().zip(&self.columns) {
                let value = match column {
                    Column::Text(v) => v[i].clone().map_or(Value::Null, Value::String),
                    Column::Int(v) => v[i].map_or(Value::Null, Value::from),
                    Column::Time(v) => v[i].map_or(Value::Null, |t| Value::String(ts(t))),
                };
                row.insert((*name).to_owned(), value);
            }
            out.push(Value::Object(row));
        }
        Value::Array(out).to_string()
    }
}

pub fn visit_cells(f: &VisitFact) -> [Cell<'_>; 18] {
    [
        text(&f.visit_id),
        text(&f.agent_id),
        text(&f.site),
        text(&f.ticket),
        text(&f.service),
        text(&f.queue),
        text(&f.business_day),
        time(f.created_at),
        text(&f.created_local),
        Cell::Time(f.first_called_at),
        Cell::Time(f.ended_at),
        opt_text(&f.outcome),
        Cell::Int(f.waiting_ms),
        int(f.service_ms),
        opt_text(&f.counter),
        opt_text(&f.staff),
        int(f.transfers),
        int(f.recalls),
    ]
}

pub fn transaction_cells(t: &TransactionFact) -> [Cell<'_>; 17] {
    [
        text(&t.visit_id),
        int(t.n),
        text(&t.agent_id),
        text(&t.site),
        text(&t.service),
        text(&t.queue),
        text(&t.place),
        text(&t.business_day),
        time(t.entered_at),
        text(&t.entered_local),
        Cell::Time(t.called_at),
        Cell::Time(t.ended_at),
        opt_text(&t.outcome),
        Cell::Int(t.waiting_ms),
        int(t.service_ms),
        opt_text(&t.counter),
        opt_text(&t.staff),
    ]
}

pub fn session_cells(s: &SessionFact) -> [Cell<'_>; 10] {
    [
        text(&s.agent_id),
        text(&s.kind),
        text(&s.subject),
        time(s.opened_at),
        text(&s.opened_local),
        text(&s.site),
        opt_text(&s.other),
        Cell::Time(s.closed_at),
        int(s.serving_ms),
        int(s.served),
    ]
}

pub fn quarantine_cells<'a>(
    q: &'a Quarantined,
    stage: &'a str,
    payload: &'a str,
    occurred_at: Option<DateTime<Utc>>,
    received_at: DateTime<Utc>,
) -> [Cell<'a>; 9] {
    [
        text(&q.agent_id),
        Cell::Int(i64::try_from(q.seq).ok()),
        text(&q.site),
        text(&q.kind),
        text(stage),
        text(&q.reason),
        text(payload),
        Cell::Time(occurred_at),
        time(received_at),
    ]
}

/// Appends the rollup row of `dims` in `period` to `rows` (any rollup table: the columns it
/// lacks, e.g. counter and staff in the service rollups, are left out).
pub fn push_rollup(
    rows: &mut Rows,
    site: &str,
    period: &str,
    dims: &Dims,
    t: &Tally,
) -> Result<()> {
    let (waits, served_waits) = (t.waits.encode(), t.served_waits.encode());
    let cells: Vec<Cell<'_>> = rows
        .table
        .cols
        .iter()
        .enumerate()
        .map(|(i, (name, _))| match (i, *name) {
            (0, _) => text(site),
            (1, _) => text(period),
            (_, "service") => text(&dims.service),
            (_, "queue") => text(&dims.queue),
            (_, "counter") => text(&dims.counter),
            (_, "staff") => text(&dims.staff),
            (_, "visits") => Cell::Int(i64::try_from(t.visits).ok()),
            (_, "served") => Cell::Int(i64::try_from(t.served).ok()),
            (_, "no_shows") => Cell::Int(i64::try_from(t.no_shows).ok()),
            (_, "waited") => Cell::Int(i64::try_from(t.waited).ok()),
            (_, "wait_sum_ms") => int(t.wait_sum_ms),
            (_, "wait_max_ms") => int(t.wait_max_ms),
            (_, "waits") => text(&waits),
            (_, "served_waits") => text(&served_waits),
            (_, "service_sum_ms") => int(t.service_sum_ms),
            _ => Cell::Text(None),
        })
        .collect();
    rows.push(&cells)
}

pub const FACT_COLUMNS: &str = "visit_id, agent_id, site, ticket, service, queue, business_day, \
    created_at, created_local, first_called_at, ended_at, outcome, waiting_ms, service_ms, counter, \
    staff, transfers, recalls";

#[derive(sqlx::FromRow)]
pub struct VisitFactRow {
    visit_id: String,
    agent_id: String,
    site: String,
    ticket: String,
    service: String,
    queue: String,
    business_day: String,
    created_at: DateTime<Utc>,
    created_local: String,
    first_called_at: Option<DateTime<Utc>>,
    ended_at: Option<DateTime<Utc>>,
    outcome: Option<String>,
    waiting_ms: Option<i64>,
    service_ms: i64,
    counter: Option<String>,
    staff: Option<String>,
    transfers: i32,
    recalls: i32,
}

impl VisitFactRow {
    pub fn visit_id(&self) -> &str {
        &self.visit_id
    }
}

impl From<VisitFactRow> for VisitFact {
    fn from(r: VisitFactRow) -> Self {
        VisitFact {
            visit_id: r.visit_id,
            agent_id: r.agent_id,
            site: r.site,
            ticket: r.ticket,
            service: r.service,
            queue: r.queue,
            business_day: r.business_day,
            created_at: r.created_at,
            created_local: r.created_local,
            first_called_at: r.first_called_at,
            ended_at: r.ended_at,
            outcome: r.outcome,
            waiting_ms: r.waiting_ms,
            service_ms: r.service_ms,
            counter: r.counter,
            staff: r.staff,
            transfers: r.transfers,
            recalls: r.recalls,
        }
    }
}

pub const TRANSACTION_COLUMNS: &str = "visit_id, n, agent_id, site, service, queue, place, \
    business_day, entered_at, entered_local, called_at, ended_at, outcome, waiting_ms, service_ms, \
    counter, staff";

#[derive(sqlx::FromRow)]
pub struct TransactionRow {
    visit_id: String,
    n: i32,
    agent_id: String,
    site: String,
    service: String,
    queue: String,
    place: String,
    business_day: String,
    entered_at: DateTime<Utc>,
    entered_local: String,
    called_at: Option<DateTime<Utc>>,
    ended_at: Option<DateTime<Utc>>,
    outcome: Option<String>,
    waiting_ms: Option<i64>,
    service_ms: i64,
    counter: Option<String>,
    staff: Option<String>,
}

impl From<TransactionRow> for TransactionFact {
    fn from(r: TransactionRow) -> Self {
        TransactionFact {
            visit_id: r.visit_id,
            n: r.n,
            agent_id: r.agent_id,
            site: r.site,
            service: r.service,
            queue: r.queue,
            place: r.place,
            business_day: r.business_day,
            entered_at: r.entered_at,
            entered_local: r.entered_local,
            called_at: r.called_at,
            ended_at: r.ended_at,
            outcome: r.outcome,
            waiting_ms: r.waiting_ms,
            service_ms: r.service_ms,
            counter: r.counter,
            staff: r.staff,
        }
    }
}

pub const SESSION_COLUMNS: &str =
    "agent_id, kind, subject, opened_at, opened_local, site, other, closed_at, serving_ms, served";

#[derive(sqlx::FromRow)]
pub struct SessionRow {
    agent_id: String,
    kind: String,
    subject: String,
    opened_at: DateTime<Utc>,
    opened_local: String,
    site: String,
    other: Option<String>,
    closed_at: Option<DateTime<Utc>>,
    serving_ms: i64,
    served: i32,
}

impl From<SessionRow> for SessionFact {
    fn from(r: SessionRow) -> Self {
        SessionFact {
            agent_id: r.agent_id,
            site: r.site,
            kind: r.kind,
            subject: r.subject,
            other: r.other,
            opened_at: r.opened_at,
            opened_local: r.opened_local,
            closed_at: r.closed_at,
            serving_ms: r.serving_ms,
            served: r.served,
        }
    }
}

/// Rollup columns with the period column aliased to `period` (and empty counter and staff for
/// the service-level tables).
pub fn rollup_select(table: &Table) -> String {
    let dim = |c: &str| if table.has(c) { c.to_owned() } else { format!("'' AS {c}") };
    format!(
        "SELECT site, {} AS period, service, {}, {}, {}, visits, served, no_shows, waited, \
         wait_sum_ms, wait_max_ms, waits, served_waits, service_sum_ms FROM {}",
        table.cols[1].0,
        dim("queue"),
        dim("counter"),
        dim("staff"),
        table.name
    )
}

#[derive(sqlx::FromRow)]
pub struct RollupSqlRow {
    site: String,
    period: String,
    service: String,
    queue: String,
    counter: String,
    staff: String,
    visits: i64,
    served: i64,
    no_shows: i64,
    waited: i64,
    wait_sum_ms: i64,
    wait_max_ms: i64,
    waits: String,
    served_waits: String,
    service_sum_ms: i64,
}

impl TryFrom<RollupSqlRow> for RollupRow {
    type Error = Error;
    fn try_from(r: RollupSqlRow) -> Result<Self> {
        let hist = |text: &str| {
            Histogram::decode(text)
                .map_err(|e| Error::Internal(format!("corrupt rollup histogram: {e}")))
        };
        Ok(RollupRow {
            tally: Tally {
                visits: r.visits as u64,
                served: r.served as u64,
                no_shows: r.no_shows as u64,
                waited: r.waited as u64,
                wait_sum_ms: r.wait_sum_ms,
                wait_max_ms: r.wait_max_ms,
                waits: hist(&r.waits)?,
                served_waits: hist(&r.served_waits)?,
                service_sum_ms: r.service_sum_ms,
            },
            dims: Dims {
                site: r.site,
                service: r.service,
                queue: r.queue,
                counter: r.counter,
                staff: r.staff,
            },
            period: r.period,
        })
    }
}

/// Rows a query reads before their histograms are decoded on more than one core.
const PARALLEL_DECODE_ROWS: usize = 4_000;

/// Decodes rollup rows, in order. Their histograms are most of a large query's work (a year of
/// weekly rows for 100 sites: 16,000 rows, ~1 KB of histogram text each), so large reads are
/// split across the machine's cores.
pub async fn decode_rollups(rows: Vec<RollupSqlRow>) -> Result<Vec<RollupRow>> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    if rows.len() < PARALLEL_DECODE_ROWS || cores < 2 {
        return rows.into_iter().map(TryInto::try_into).collect();
    }
    let per_task = rows.len().div_ceil(cores);
    let mut rows = rows.into_iter();
    let mut tasks = Vec::with_capacity(cores);
    loop {
        let chunk: Vec<RollupSqlRow> = rows.by_ref().take(per_task).collect();
        if chunk.is_empty() {
            break;
        }
        tasks.push(tokio::task::spawn_blocking(move || {
            chunk.into_iter().map(TryInto::try_into).collect::<Result<Vec<RollupRow>>>()
        }));
    }
    let mut out = Vec::new();
    for task in tasks {
        let decoded =
            task.await.map_err(|e| Error::Internal(format!("decoding rollups stopped: {e}")))??;
        out.extend(decoded);
    }
    Ok(out)
}

#[derive(sqlx::FromRow)]
pub struct QuarantineRow {
    agent_id: String,
    seq: i64,
    site: String,
    kind: String,
    reason: String,
    payload: String,
    occurred_at: Option<DateTime<Utc>>,
    received_at: DateTime<Utc>,
}

impl From<QuarantineRow> for QuarantinedEvent {
    fn from(r: QuarantineRow) -> Self {
        QuarantinedEvent {
            agent_id: r.agent_id,
            seq: r.seq as u64,
            site: r.site,
            kind: r.kind,
            reason: r.reason,
            payload: r.payload,
            occurred_at: r.occurred_at,
            received_at: r.received_at,
        }
    }
}

/// The day after a `YYYY-MM-DD` day, for exclusive upper bounds on local timestamps.
pub fn next_day(day: &str) -> Option<String> {
    let d: chrono::NaiveDate = day.parse().ok()?;
    d.succ_opt().map(|d| d.to_string())
}

/// Expands to `#[async_trait] impl StatsStore for $ty`.
macro_rules! impl_stats_store {
    ($ty:ty) => {
        impl $ty {
            /// Writes `rows` in one statement.
            async fn write_rows(
                tx: &mut sqlx::Transaction<'static, <$ty as $crate::store::sql_common::Backend>::Db>,
                rows: &$crate::store::stats_sql::Rows,
                write: $crate::store::stats_sql::Write,
            ) -> $crate::error::Result<()> {
                use $crate::store::sql_common::Backend;
                if rows.is_empty() {
                    return Ok(());
                }
                let sql = <$ty as Backend>::insert_rows(rows.table, write);
                <$ty as Backend>::bind_rows(sqlx::query(sqlx::AssertSqlSafe(sql)), rows)
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::stats::StatsStore for $ty {
            async fn project_facts(
                &self,
                agent: meridian_shared::AgentId,
                limit: u32,
                zones: &$crate::stats::facts::Zones,
            ) -> $crate::error::Result<usize> {
                use $crate::store::stats_sql as sql;
                use $crate::stats::facts::{self, Projection, Quarantined, VisitState};
                use $crate::store::sql_common::Backend;
                let agent_id = $crate::store::sql_common::agent_key(agent);
                // The cursor row exists before any projection (committed at once, so concurrent
                // projectors never wait on each other's insert); the projection then locks it,
                // skipping an agent another projector (a replica) is working on right now.
                sqlx::query("INSERT INTO fact_cursors (agent_id, seq) VALUES ($1, 0) ON CONFLICT (agent_id) DO NOTHING")
                    .bind(&agent_id)
                    .execute(&self.pool)
                    .await?;
                let mut tx = self.tx().await?;
                let cursor: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT seq FROM fact_cursors WHERE agent_id = $1{}",
                    <$ty as Backend>::LOCK_OR_SKIP
                )))
                .bind(&agent_id)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(cursor) = cursor else {
                    tx.commit().await?;
                    return Ok(0);
                };
                // Read the acknowledgement before the events: every event up to it is visible to
                // the next statement, so a short read covers it (some sequences never reach the
                // events table: the gateway quarantined them).
                let acked: i64 = sqlx::query_scalar("SELECT acked_seq FROM agents WHERE id = $1")
                    .bind(&agent_id)
                    .fetch_optional(&mut *tx)
                    .await?
                    .unwrap_or(0);
                let rows: Vec<$crate::store::sql_common::EventRow> = sqlx::query_as(
                    "SELECT agent_id, seq, site, kind, occurred_at, received_at, CAST(payload AS TEXT) AS payload \
                     FROM events WHERE agent_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                )
                .bind(&agent_id)
                .bind(cursor)
                .bind(i64::from(limit))
                .fetch_all(&mut *tx)
                .await?;
                let consumed = rows.len();
                let mut next_cursor = rows.last().map_or(cursor, |r| r.seq());
                if consumed < limit as usize {
                    next_cursor = next_cursor.max(acked);
                }
                if consumed == 0 {
                    if next_cursor != cursor {
                        sqlx::query("UPDATE fact_cursors SET seq = $2 WHERE agent_id = $1")
                            .bind(&agent_id)
                            .bind(next_cursor)
                            .execute(&mut *tx)
                            .await?;
                    }
                    tx.commit().await?;
                    return Ok(0);
                }
                let decoded: Vec<_> = rows
                    .into_iter()
                    .map(|row| {
                        let parts = row.into_parts();
                        let event = meridian_shared::events::AgentEvent::decode(&parts.kind, parts.payload.as_bytes());
                        (parts, event)
                    })
                    .collect();
                let visit_events: Vec<(String, chrono::NaiveDate)> = decoded
                    .iter()
                    .filter_map(|(_, e)| e.as_ref().ok().and_then(|e| e.as_ref()))
                    .filter_map(|e| Some((facts::visit_of(e)?, facts::day_of(e)?)))
                    .collect();
                let ids: std::collections::BTreeSet<&String> = visit_events.iter().map(|(id, _)| id).collect();
                let mut p = Projection::default();
                if !ids.is_empty() {
                    // A visit's creation lies within a day of its business day (time zones), so
                    // the lookups only touch the partitions of those days.
                    let days = visit_events.iter().map(|(_, d)| *d);
                    let (first, last) = days.fold((chrono::NaiveDate::MAX, chrono::NaiveDate::MIN), |(a, b), d| (a.min(d), b.max(d)));
                    let since = (first - chrono::Duration::days(1)).and_time(chrono::NaiveTime::MIN).and_utc();
                    let until = (last + chrono::Duration::days(2)).and_time(chrono::NaiveTime::MIN).and_utc();
                    let ids: Vec<&str> = ids.iter().map(|s| s.as_str()).collect();
                    let stored: Vec<sql::VisitFactRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                        "SELECT {} FROM visit_facts WHERE {} AND created_at >= $2 AND created_at < $3",
                        sql::FACT_COLUMNS,
                        <$ty as Backend>::in_ids("visit_id")
                    )))
                    .bind(<$ty as Backend>::ids(&ids))
                    .bind(since)
                    .bind(until)
                    .fetch_all(&mut *tx)
                    .await?;
                    if !stored.is_empty() {
                        let known: Vec<&str> = stored.iter().map(|f| f.visit_id()).collect();
                        let stints: Vec<sql::TransactionRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                            "SELECT {} FROM transaction_facts WHERE {} AND entered_at >= $2 AND entered_at < $3 \
                             ORDER BY visit_id, n",
                            sql::TRANSACTION_COLUMNS,
                            <$ty as Backend>::in_ids("visit_id")
                        )))
                        .bind(<$ty as Backend>::ids(&known))
                        .bind(since)
                        .bind(until)
                        .fetch_all(&mut *tx)
                        .await?;
                        for f in stored {
                            let fact: facts::VisitFact = f.into();
                            p.visits.insert(fact.visit_id.clone(), VisitState { fact, stints: vec![] });
                        }
                        for t in stints {
                            let t: facts::TransactionFact = t.into();
                            if let Some(v) = p.visits.get_mut(&t.visit_id) {
                                v.stints.push(t);
                            }
                        }
                    }
                }
                let stored_ids: std::collections::HashSet<String> = p.visits.keys().cloned().collect();
                let open: Vec<sql::SessionRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {} FROM session_facts WHERE agent_id = $1 AND closed_at IS NULL",
                    sql::SESSION_COLUMNS
                )))
                .bind(&agent_id)
                .fetch_all(&mut *tx)
                .await?;
                for s in open {
                    let s: facts::SessionFact = s.into();
                    p.open.insert((s.kind.clone(), s.subject.clone()), s);
                }
                let mut quarantine = sql::Rows::new(&sql::QUARANTINE);
                let mut payloads = std::collections::HashMap::new();
                for (parts, event) in &decoded {
                    let before = p.quarantined.len();
                    match event {
                        Ok(Some(e)) => p.apply(&agent_id, parts.seq as u64, &parts.site, e, zones),
                        Ok(None) => {} // a kind this version derives no facts from
                        Err(e) => p.quarantined.push(Quarantined {
                            agent_id: agent_id.clone(),
                            seq: parts.seq as u64,
                            site: parts.site.clone(),
                            kind: parts.kind.clone(),
                            reason: format!("the payload does not decode: {e}"),
                        }),
                    }
                    if p.quarantined.len() > before {
                        payloads.insert(parts.seq as u64, parts);
                    }
                }
                for q in &p.quarantined {
                    if let Some(parts) = payloads.get(&q.seq) {
                        tracing::warn!(agent = %agent_id, seq = q.seq, kind = %q.kind, reason = %q.reason, "event quarantined by statistics");
                        quarantine.push(&sql::quarantine_cells(q, "projection", &parts.payload, Some(parts.occurred_at), parts.received_at))?;
                    }
                }
                // Visits the lookup did not find are new, and so are their stints: plain inserts.
                // Stored ones are updated (their stints may be new or changed).
                let mut new_visits = sql::Rows::new(&sql::VISIT_FACTS);
                let mut new_stints = sql::Rows::new(&sql::TRANSACTION_FACTS);
                let mut old_visits = sql::Rows::new(&sql::VISIT_FACTS);
                let mut old_stints = sql::Rows::new(&sql::TRANSACTION_FACTS);
                for v in p.touched.iter().filter_map(|id| p.visits.get(id)) {
                    let (visits, stints) = if stored_ids.contains(&v.fact.visit_id) {
                        (&mut old_visits, &mut old_stints)
                    } else {
                        (&mut new_visits, &mut new_stints)
                    };
                    visits.push(&sql::visit_cells(&v.fact))?;
                    for t in &v.stints {
                        stints.push(&sql::transaction_cells(t))?;
                    }
                }
                let mut sessions = sql::Rows::new(&sql::SESSION_FACTS);
                for s in p.sessions() {
                    sessions.push(&sql::session_cells(s))?;
                }
                let mut dirty = sql::Rows::new(&sql::DIRTY);
                for (site, day) in &p.dirty_days {
                    dirty.push(&[sql::Cell::Text(Some(site)), sql::Cell::Text(Some(day))])?;
                }
                use sql::Write::{Insert, Upsert};
                Self::write_rows(&mut tx, &new_visits, Insert).await?;
                Self::write_rows(&mut tx, &new_stints, Insert).await?;
                Self::write_rows(&mut tx, &old_visits, Upsert).await?;
                Self::write_rows(&mut tx, &old_stints, Upsert).await?;
                Self::write_rows(&mut tx, &sessions, Upsert).await?;
                Self::write_rows(&mut tx, &quarantine, Upsert).await?;
                Self::write_rows(&mut tx, &dirty, Upsert).await?;
                sqlx::query("UPDATE fact_cursors SET seq = $2 WHERE agent_id = $1")
                    .bind(&agent_id)
                    .bind(next_cursor)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(consumed)
            }

            async fn refresh_rollups(&self, limit: u32) -> $crate::error::Result<usize> {
                use $crate::store::stats_sql as sql;
                use $crate::store::sql_common::Backend;
                let sites: Vec<String> = sqlx::query_scalar(
                    "SELECT DISTINCT site FROM rollup_dirty ORDER BY site LIMIT $1",
                )
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                let mut done = 0;
                for site in sites {
                    let mut tx = self.tx().await?;
                    // One refresher per site at a time, so week and month rows are never computed
                    // from a stale view of their days.
                    sqlx::query(<$ty as Backend>::SITE_LOCK).bind(&site).execute(&mut *tx).await?;
                    let mut days: Vec<String> =
                        sqlx::query_scalar("DELETE FROM rollup_dirty WHERE site = $1 RETURNING day")
                            .bind(&site)
                            .fetch_all(&mut *tx)
                            .await?;
                    days.sort();
                    let mut months = std::collections::BTreeSet::new();
                    let mut weeks = std::collections::BTreeSet::new();
                    for day in &days {
                        let facts: Vec<sql::VisitFactRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                            "SELECT {} FROM visit_facts WHERE site = $1 AND business_day = $2",
                            sql::FACT_COLUMNS
                        )))
                        .bind(&site)
                        .bind(day)
                        .fetch_all(&mut *tx)
                        .await?;
                        let facts: Vec<$crate::stats::facts::VisitFact> = facts.into_iter().map(Into::into).collect();
                        let fine = $crate::stats::report::rollup(&facts);
                        let coarse = sql::merge_for(&sql::SERVICE_DAY, &fine);
                        for (table, rows) in [(&sql::ROLLUP_DAY, &fine), (&sql::SERVICE_DAY, &coarse)] {
                            sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {} WHERE site = $1 AND day = $2", table.name)))
                                .bind(&site)
                                .bind(day)
                                .execute(&mut *tx)
                                .await?;
                            let mut out = sql::Rows::new(table);
                            for (d, t) in rows {
                                sql::push_rollup(&mut out, &site, day, d, t)?;
                            }
                            Self::write_rows(&mut tx, &out, sql::Write::Insert).await?;
                        }
                        months.insert(day.get(..7).unwrap_or(day).to_owned());
                        if let Ok(d) = day.parse::<chrono::NaiveDate>() {
                            weeks.insert($crate::stats::report::monday(d));
                        }
                    }
                    // Each touched month and week once, from its days; the counter and staff
                    // months from the fine month.
                    type Period = (&'static sql::Table, &'static [&'static sql::Table], &'static str, String, String, String);
                    let mut periods: Vec<Period> = Vec::new();
                    for month in &months {
                        let (from, to) = (format!("{month}-01"), format!("{month}-31"));
                        periods.push((&sql::ROLLUP_DAY, &[&sql::ROLLUP_MONTH, &sql::COUNTER_MONTH, &sql::STAFF_MONTH], "month", month.clone(), from.clone(), to.clone()));
                        periods.push((&sql::SERVICE_DAY, &[&sql::SERVICE_MONTH], "month", month.clone(), from, to));
                    }
                    for monday in &weeks {
                        let to = (*monday + chrono::Duration::days(6)).to_string();
                        periods.push((&sql::SERVICE_DAY, &[&sql::SERVICE_WEEK], "week", monday.to_string(), monday.to_string(), to));
                    }
                    for (source, targets, column, period, from, to) in periods {
                        let rows: Vec<sql::RollupSqlRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                            "{} WHERE site = $1 AND day >= $2 AND day <= $3",
                            sql::rollup_select(source)
                        )))
                        .bind(&site)
                        .bind(&from)
                        .bind(&to)
                        .fetch_all(&mut *tx)
                        .await?;
                        let rows = rows.into_iter().map(TryInto::try_into).collect::<$crate::error::Result<Vec<$crate::store::stats::RollupRow>>>()?;
                        let days = rows.iter().map(|r| (&r.dims, &r.tally));
                        let merged = sql::merge_for(source, days);
                        for target in targets {
                            sqlx::query(sqlx::AssertSqlSafe(format!(
                                "DELETE FROM {} WHERE site = $1 AND {column} = $2",
                                target.name
                            )))
                            .bind(&site)
                            .bind(&period)
                            .execute(&mut *tx)
                            .await?;
                            let mut out = sql::Rows::new(target);
                            for (d, t) in &sql::merge_for(target, &merged) {
                                sql::push_rollup(&mut out, &site, &period, d, t)?;
                            }
                            Self::write_rows(&mut tx, &out, sql::Write::Insert).await?;
                        }
                    }
                    tx.commit().await?;
                    done += days.len();
                }
                Ok(done)
            }

            async fn pending_rollups(&self) -> $crate::error::Result<u64> {
                let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM rollup_dirty")
                    .fetch_one(&self.pool)
                    .await?;
                Ok(n as u64)
            }

            async fn projection_lag(&self) -> $crate::error::Result<u64> {
                let n: Option<i64> = sqlx::query_scalar(
                    "SELECT CAST(SUM(a.acked_seq - COALESCE(c.seq, 0)) AS BIGINT) FROM agents a \
                     LEFT JOIN fact_cursors c ON c.agent_id = a.id WHERE a.acked_seq > COALESCE(c.seq, 0)",
                )
                .fetch_one(&self.pool)
                .await?;
                Ok(n.unwrap_or(0).max(0) as u64)
            }

            async fn visit_facts(
                &self,
                filter: &$crate::store::stats::FactFilter,
            ) -> $crate::error::Result<Vec<$crate::stats::facts::VisitFact>> {
                use $crate::store::stats_sql as sql;
                let rows: Vec<sql::VisitFactRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {} FROM visit_facts WHERE ($1 IS NULL OR site = $1) AND ($2 IS NULL OR service = $2) \
                     AND ($3 IS NULL OR business_day >= $3) AND ($4 IS NULL OR business_day <= $4) \
                     ORDER BY created_at, visit_id",
                    sql::FACT_COLUMNS
                )))
                .bind(&filter.site)
                .bind(&filter.service)
                .bind(&filter.from_day)
                .bind(&filter.to_day)
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(Into::into).collect())
            }

            async fn transaction_facts(
                &self,
                filter: &$crate::store::stats::FactFilter,
            ) -> $crate::error::Result<Vec<$crate::stats::facts::TransactionFact>> {
                use $crate::store::stats_sql as sql;
                let rows: Vec<sql::TransactionRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {} FROM transaction_facts WHERE ($1 IS NULL OR site = $1) AND ($2 IS NULL OR service = $2) \
                     AND ($3 IS NULL OR business_day >= $3) AND ($4 IS NULL OR business_day <= $4) \
                     ORDER BY entered_at, visit_id, n",
                    sql::TRANSACTION_COLUMNS
                )))
                .bind(&filter.site)
                .bind(&filter.service)
                .bind(&filter.from_day)
                .bind(&filter.to_day)
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(Into::into).collect())
            }

            async fn session_facts(
                &self,
                filter: &$crate::store::stats::FactFilter,
            ) -> $crate::error::Result<Vec<$crate::stats::facts::SessionFact>> {
                use $crate::store::stats_sql as sql;
                let until = filter.to_day.as_deref().and_then(sql::next_day);
                let rows: Vec<sql::SessionRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {} FROM session_facts WHERE ($1 IS NULL OR site = $1) \
                     AND ($2 IS NULL OR opened_local >= $2) AND ($3 IS NULL OR opened_local < $3) \
                     ORDER BY opened_at, kind, subject",
                    sql::SESSION_COLUMNS
                )))
                .bind(&filter.site)
                .bind(&filter.from_day)
                .bind(until)
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(Into::into).collect())
            }

            async fn open_transactions(
                &self,
                site: Option<&str>,
            ) -> $crate::error::Result<Vec<$crate::stats::facts::TransactionFact>> {
                use $crate::store::stats_sql as sql;
                let rows: Vec<sql::TransactionRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {} FROM transaction_facts WHERE outcome IS NULL AND ($1 IS NULL OR site = $1) \
                     ORDER BY entered_at",
                    sql::TRANSACTION_COLUMNS
                )))
                .bind(site)
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(Into::into).collect())
            }

            async fn open_sessions(
                &self,
                site: Option<&str>,
            ) -> $crate::error::Result<Vec<$crate::stats::facts::SessionFact>> {
                use $crate::store::stats_sql as sql;
                let rows: Vec<sql::SessionRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {} FROM session_facts WHERE closed_at IS NULL AND ($1 IS NULL OR site = $1) \
                     ORDER BY site, kind, subject",
                    sql::SESSION_COLUMNS
                )))
                .bind(site)
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(Into::into).collect())
            }

            async fn rollups(
                &self,
                q: &$crate::store::stats::RollupQuery,
            ) -> $crate::error::Result<Vec<$crate::store::stats::RollupRow>> {
                use $crate::store::stats_sql as sql;
                let table = sql::rollup_table(q).ok_or_else(|| {
                    $crate::error::Error::Internal(format!("no {:?} rollups by {:?}", q.family, q.grain))
                })?;
                let col = table.cols[1].0;
                let rows: Vec<sql::RollupSqlRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "{} WHERE ($1 IS NULL OR site = $1) AND ($2 IS NULL OR service = $2) \
                     AND ($3 IS NULL OR {col} >= $3) AND ($4 IS NULL OR {col} <= $4)",
                    sql::rollup_select(table)
                )))
                .bind(&q.site)
                .bind(&q.service)
                .bind(&q.from)
                .bind(&q.to)
                .fetch_all(&self.pool)
                .await?;
                sql::decode_rollups(rows).await
            }

            async fn quarantined(
                &self,
                limit: u32,
            ) -> $crate::error::Result<Vec<$crate::store::stats::QuarantinedEvent>> {
                let rows: Vec<$crate::store::stats_sql::QuarantineRow> = sqlx::query_as(
                    "SELECT agent_id, seq, site, kind, reason, payload, occurred_at, received_at \
                     FROM quarantined_events ORDER BY received_at DESC, agent_id, seq DESC LIMIT $1",
                )
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(Into::into).collect())
            }

            async fn reset_facts(&self) -> $crate::error::Result<()> {
                let mut tx = self.tx().await?;
                let rollups = $crate::store::stats_sql::ROLLUP_TABLES.map(|t| t.name);
                let facts = ["visit_facts", "transaction_facts", "session_facts", "rollup_dirty", "fact_cursors"];
                for table in facts.into_iter().chain(rollups) {
                    sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table}"))).execute(&mut *tx).await?;
                }
                sqlx::query("DELETE FROM quarantined_events WHERE stage = 'projection'")
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }
        }
    };
}

pub(crate) use impl_stats_store;
