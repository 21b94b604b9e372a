//! Distributed service requests at the branch (first step): requests are created and
//! edited here, checked against their type from the applied configuration
//! (`meridian_shared::requests`), with a globally unique id (UUIDv7) and a human id of this
//! site (`SFO-000123`, from a counter that is never reused). Each change is one store job with
//! its outbox event (`REQUEST_CREATED` / `REQUEST_UPDATED`, the request's whole new state), so
//! central learns it exactly once. A request created here is its own master; only the master
//! is edited (read-only copies, once transfers exist, refuse with `read_only_copy`).
//!
//! Transfers, updates, returns and deletes between sites, rules, mappings and the controller's
//! ledger come in later steps; the distribution columns are here already so every API answer
//! carries them.

use chrono::{DateTime, Utc};
use meridian_shared::config::SiteConfig;
use meridian_shared::events::{AgentEvent, RequestChanged, RequestEventKind};
use meridian_shared::requests::{Values, human_id};
use meridian_shared::transfers::{Move, RequestState};
use meridian_shared::{Code, SiteCode, ValidationErrors};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::store::queries::append_event;

/// Where a request is in the distribution (the DSO fields), as the API shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Distribution {
    /// Whether this copy is the master (the one that may be edited).
    pub master: bool,
    /// Where the master copy is, as far as this site knows.
    pub current_site: SiteCode,
    pub from_site: Option<String>,
    pub to_site: Option<String>,
    pub from_request_id: Option<String>,
    pub to_request_id: Option<String>,
    pub mapping: Option<String>,
    pub transfer_status: Option<String>,
    pub update_status: Option<String>,
    /// The operation this site started that is moving the ownership away (the copy is
    /// read-only until the controller settles it).
    pub pending_operation: Option<String>,
    /// Why the last operation this site started failed.
    pub transfer_error: Option<String>,
    /// Every move of the request (time, source, target, mapping, mode).
    pub history: Vec<Move>,
}

/// A request as the branch holds and shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: Uuid,
    pub human_id: String,
    #[serde(rename = "type")]
    pub request_type: Code,
    pub fields: Values,
    pub distribution: Distribution,
    pub revision: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `POST /api/v1/requests`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewRequest {
    #[serde(rename = "type")]
    pub request_type: String,
    #[serde(default)]
    pub fields: Values,
}

/// `PATCH /api/v1/requests/{id}`: fields to change (null clears an optional field).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestPatch {
    pub fields: Values,
    /// Refuse (409 `stale_revision`) unless the request is still at this revision.
    #[serde(default)]
    pub expected_revision: Option<u64>,
}

fn invalid(field: &str, message: impl Into<String>) -> Error {
    let mut errs = ValidationErrors::default();
    errs.push(field, message);
    Error::InvalidFields(errs)
}

fn request_type<'a>(
    config: &'a SiteConfig,
    code: &str,
) -> Option<&'a meridian_shared::requests::RequestType> {
    config.request_types.iter().find(|t| t.code.as_str() == code)
}

/// Creates a request of a configured type; 422 with every problem otherwise.
pub fn create(
    conn: &Connection,
    config: &SiteConfig,
    input: &NewRequest,
    now: DateTime<Utc>,
) -> Result<Request> {
    let Some(t) = request_type(config, &input.request_type) else {
        return Err(invalid("type", format!("unknown request type {:?}", input.request_type)));
    };
    let fields = t.check_new(&input.fields).map_err(Error::InvalidFields)?;
    let site = config.site.code.clone();
    let request = Request {
        id: Uuid::now_v7(),
        human_id: next_human_id(conn, &site)?,
        request_type: t.code.clone(),
        fields,
        distribution: Distribution {
            master: true,
            current_site: site,
            from_site: None,
            to_site: None,
            from_request_id: None,
            to_request_id: None,
            mapping: None,
            transfer_status: None,
            update_status: None,
            pending_operation: None,
            transfer_error: None,
            history: vec![],
        },
        revision: 1,
        created_at: now,
        updated_at: now,
    };
    write(conn, &request)?;
    record(conn, RequestEventKind::Created, &request, now)?;
    Ok(request)
}

/// Changes fields of the master copy `id` (an id or human id).
pub fn update(
    conn: &Connection,
    config: &SiteConfig,
    id: &str,
    patch: &RequestPatch,
    now: DateTime<Utc>,
) -> Result<Request> {
    let current = get(conn, id)?.ok_or_else(|| Error::NotFound(format!("request {id}")))?;
    check_master(&current)?;
    if let Some(expected) = patch.expected_revision
        && expected != current.revision
    {
        return Err(Error::Conflict(format!(
            "request {} is at revision {}, not {expected}; reload and retry",
            current.human_id, current.revision
        )));
    }
    let Some(t) = request_type(config, current.request_type.as_str()) else {
        return Err(Error::Conflict(format!(
            "request type {} is no longer configured at this site",
            current.request_type
        )));
    };
    if patch.fields.is_empty() {
        return Err(invalid("fields", "give at least one field to change"));
    }
    let fields = t.check_patch(&current.fields, &patch.fields).map_err(Error::InvalidFields)?;
    let updated = Request { fields, revision: current.revision + 1, updated_at: now, ..current };
    conn.prepare_cached(
        "UPDATE requests SET fields = ?2, revision = ?3, updated_at = ?4 WHERE id = ?1",
    )?
    .execute(params![
        updated.id.to_string(),
        json(&updated.fields)?,
        i64::try_from(updated.revision).unwrap_or(i64::MAX),
        now.to_rfc3339()
    ])?;
    record(conn, RequestEventKind::Updated, &updated, now)?;
    Ok(updated)
}

/// Refuses (409) a change to a copy that is not the master here.
pub(crate) fn check_master(r: &Request) -> Result<()> {
    if let Some(op) = &r.distribution.pending_operation {
        return Err(Error::Conflict(format!(
            "request {} is being handed over to {} (operation {op}); it is read-only until that ends",
            r.human_id,
            r.distribution.to_site.as_deref().unwrap_or("another site")
        )));
    }
    if !r.distribution.master {
        return Err(Error::Conflict(format!(
            "request {} is a read-only copy; its master is at {}",
            r.human_id, r.distribution.current_site
        )));
    }
    Ok(())
}

/// Inserts or replaces the whole row of `r`.
pub(crate) fn write(conn: &Connection, r: &Request) -> Result<()> {
    let d = &r.distribution;
    conn.prepare_cached(
        "INSERT INTO requests (id, human_id, request_type, fields, is_master, current_site, \
         from_site, to_site, from_request_id, to_request_id, mapping, transfer_status, \
         update_status, history, revision, created_at, updated_at, pending_op, transfer_error) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19) \
         ON CONFLICT (id) DO UPDATE SET human_id = excluded.human_id, \
         request_type = excluded.request_type, fields = excluded.fields, \
         is_master = excluded.is_master, current_site = excluded.current_site, \
         from_site = excluded.from_site, to_site = excluded.to_site, \
         from_request_id = excluded.from_request_id, to_request_id = excluded.to_request_id, \
         mapping = excluded.mapping, transfer_status = excluded.transfer_status, \
         update_status = excluded.update_status, history = excluded.history, \
         revision = excluded.revision, updated_at = excluded.updated_at, \
         pending_op = excluded.pending_op, transfer_error = excluded.transfer_error",
    )?
    .execute(params![
        r.id.to_string(),
        r.human_id,
        r.request_type.as_str(),
        json(&r.fields)?,
        d.master,
        d.current_site.as_str(),
        d.from_site,
        d.to_site,
        d.from_request_id,
        d.to_request_id,
        d.mapping,
        d.transfer_status,
        d.update_status,
        json(&d.history)?,
        i64::try_from(r.revision).unwrap_or(i64::MAX),
        r.created_at.to_rfc3339(),
        r.updated_at.to_rfc3339(),
        d.pending_operation,
        d.transfer_error,
    ])?;
    Ok(())
}

/// Takes the next human id of this site (never reused).
pub(crate) fn next_human_id(conn: &Connection, site: &SiteCode) -> Result<String> {
    let n: i64 = conn
        .prepare_cached("UPDATE request_counter SET last = last + 1 WHERE id = 1 RETURNING last")?
        .query_row([], |r| r.get(0))?;
    Ok(human_id(site, n.max(0) as u64))
}

impl Request {
    /// What a target needs to hold a copy.
    pub fn state(&self) -> RequestState {
        RequestState {
            request_id: self.id,
            human_id: self.human_id.clone(),
            request_type: self.request_type.clone(),
            fields: self.fields.clone(),
            revision: self.revision,
            created_at: self.created_at,
            history: self.distribution.history.clone(),
        }
    }
}

pub(crate) fn record(
    conn: &Connection,
    kind: RequestEventKind,
    r: &Request,
    now: DateTime<Utc>,
) -> Result<()> {
    append_event(
        conn,
        &AgentEvent::Request(
            kind,
            RequestChanged {
                request_id: r.id,
                human_id: r.human_id.clone(),
                request_type: r.request_type.clone(),
                revision: r.revision,
                fields: r.fields.clone(),
                at: now,
            },
        ),
        now,
    )?;
    Ok(())
}

pub(crate) fn json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::Internal(e.to_string()))
}

const SELECT: &str = "SELECT id, human_id, request_type, fields, is_master, current_site, \
     from_site, to_site, from_request_id, to_request_id, mapping, transfer_status, update_status, \
     history, revision, created_at, updated_at, pending_op, transfer_error FROM requests";

/// One request by id or human id.
pub fn get(conn: &Connection, id: &str) -> Result<Option<Request>> {
    let column = if id.contains('-') && id.len() == 36 { "id" } else { "human_id" };
    conn.prepare_cached(&format!("{SELECT} WHERE {column} = ?1"))?
        .query_row([id], row)
        .optional()?
        .map(decode)
        .transpose()
}

/// The latest `limit` requests (of one type when given), newest change first.
pub fn list(conn: &Connection, request_type: Option<&str>, limit: u32) -> Result<Vec<Request>> {
    let rows = conn
        .prepare_cached(&format!(
            "{SELECT} WHERE (?1 IS NULL OR request_type = ?1) ORDER BY updated_at DESC, id DESC LIMIT ?2"
        ))?
        .query_map(params![request_type, i64::from(limit)], row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().map(decode).collect()
}

type Row = (
    String,
    String,
    String,
    String,
    bool,
    String,
    [Option<String>; 9],
    String,
    i64,
    String,
    String,
);

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        [
            r.get(6)?,
            r.get(7)?,
            r.get(8)?,
            r.get(9)?,
            r.get(10)?,
            r.get(11)?,
            r.get(12)?,
            r.get(17)?,
            r.get(18)?,
        ],
        r.get(13)?,
        r.get(14)?,
        r.get(15)?,
        r.get(16)?,
    ))
}

fn decode(r: Row) -> Result<Request> {
    let corrupt = |what: &str, v: &str| {
        Error::Internal(format!(
            "corrupt value in requests.{what}: {:?}",
            v.chars().take(40).collect::<String>()
        ))
    };
    let instant = |what: &str, v: &str| {
        DateTime::parse_from_rfc3339(v).map(|t| t.with_timezone(&Utc)).map_err(|_| corrupt(what, v))
    };
    let [
        from_site,
        to_site,
        from_request_id,
        to_request_id,
        mapping,
        transfer_status,
        update_status,
        pending_operation,
        transfer_error,
    ] = r.6;
    Ok(Request {
        id: r.0.parse().map_err(|_| corrupt("id", &r.0))?,
        human_id: r.1,
        request_type: Code::parse(&r.2).map_err(|_| corrupt("request_type", &r.2))?,
        fields: serde_json::from_str(&r.3).map_err(|_| corrupt("fields", &r.3))?,
        distribution: Distribution {
            master: r.4,
            current_site: SiteCode::parse(&r.5).map_err(|_| corrupt("current_site", &r.5))?,
            from_site,
            to_site,
            from_request_id,
            to_request_id,
            mapping,
            transfer_status,
            update_status,
            pending_operation,
            transfer_error,
            history: serde_json::from_str(&r.7).map_err(|_| corrupt("history", &r.7))?,
        },
        revision: u64::try_from(r.8).map_err(|_| corrupt("revision", &r.8.to_string()))?,
        created_at: instant("created_at", &r.9)?,
        updated_at: instant("updated_at", &r.10)?,
    })
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use serde_json::json;

    use super::*;

    fn db() -> Connection {
        let mut conn = Connection::open_in_memory().expect("db");
        crate::store::migrate(&mut conn).expect("migrate");
        conn
    }

    fn config() -> SiteConfig {
        serde_json::from_value(json!({
            "revision": 1,
            "site": {"code": "SFO", "name": "SF", "time_zone": "America/Los_Angeles"},
            "services": [], "queues": [], "service_points": [], "work_profiles": [],
            "staff": [], "connector_keys": [], "webhooks": [],
            "request_types": [{"code": "REPAIR", "name": "Furniture repair", "fields": [
                {"name": "summary", "type": "text", "max_length": 80, "required": true},
                {"name": "category", "type": "enum", "values": ["chair", "table"], "required": true},
                {"name": "upholstery", "type": "boolean", "default": false}
            ]}]
        }))
        .expect("config")
    }

    fn values(v: serde_json::Value) -> Values {
        serde_json::from_value(v).expect("values")
    }

    fn outbox(conn: &Connection) -> Vec<String> {
        conn.prepare("SELECT kind FROM outbox ORDER BY seq")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    #[test]
    fn requests_get_site_prefixed_ids_defaults_and_one_event_per_change() {
        let conn = db();
        let now = Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap();
        let new = |summary: &str| NewRequest {
            request_type: "REPAIR".into(),
            fields: values(json!({"summary": summary, "category": "chair"})),
        };
        let a = create(&conn, &config(), &new("Wobbly leg"), now).unwrap();
        let b = create(&conn, &config(), &new("Torn seat"), now).unwrap();
        assert_eq!((a.human_id.as_str(), b.human_id.as_str()), ("SFO-000001", "SFO-000002"));
        assert_eq!(a.fields["upholstery"], json!(false));
        assert!(a.distribution.master);
        assert_eq!(a.distribution.current_site.as_str(), "SFO");
        assert_eq!(get(&conn, "SFO-000002").unwrap().map(|r| r.id), Some(b.id));
        assert_eq!(get(&conn, &a.id.to_string()).unwrap(), Some(a.clone()));

        let patch = RequestPatch {
            fields: values(json!({"category": "table", "upholstery": true})),
            expected_revision: Some(1),
        };
        let later = now + chrono::Duration::minutes(5);
        let changed = update(&conn, &config(), "SFO-000001", &patch, later).unwrap();
        assert_eq!((changed.revision, changed.fields["category"].clone()), (2, json!("table")));
        assert!(matches!(
            update(&conn, &config(), "SFO-000001", &patch, later),
            Err(Error::Conflict(_))
        ));
        let listed = list(&conn, Some("REPAIR"), 10).unwrap();
        assert_eq!(
            listed.iter().map(|r| r.human_id.as_str()).collect::<Vec<_>>(),
            ["SFO-000001", "SFO-000002"]
        );
        assert_eq!(outbox(&conn), ["REQUEST_CREATED", "REQUEST_CREATED", "REQUEST_UPDATED"]);
    }

    #[test]
    fn bad_requests_are_refused_field_by_field_and_change_nothing() {
        let conn = db();
        let now = Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap();
        let refused = |input: NewRequest| match create(&conn, &config(), &input, now) {
            Err(Error::InvalidFields(errs)) => {
                errs.0.into_iter().map(|e| e.field).collect::<Vec<_>>()
            }
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert_eq!(
            refused(NewRequest { request_type: "NOPE".into(), fields: Values::new() }),
            ["type"]
        );
        assert_eq!(
            refused(NewRequest {
                request_type: "REPAIR".into(),
                fields: values(json!({"summary": 5, "colour": "red"}))
            }),
            ["fields.colour", "fields.summary", "fields.category"]
        );
        assert!(list(&conn, None, 10).unwrap().is_empty());
        assert!(outbox(&conn).is_empty());
        let ok = create(
            &conn,
            &config(),
            &NewRequest {
                request_type: "REPAIR".into(),
                fields: values(json!({"summary": "x", "category": "chair"})),
            },
            now,
        )
        .unwrap();
        let clear =
            RequestPatch { fields: values(json!({"summary": null})), expected_revision: None };
        assert!(matches!(
            update(&conn, &config(), &ok.human_id, &clear, now),
            Err(Error::InvalidFields(_))
        ));
        let empty = RequestPatch { fields: Values::new(), expected_revision: None };
        assert!(matches!(
            update(&conn, &config(), &ok.human_id, &empty, now),
            Err(Error::InvalidFields(_))
        ));
        assert!(matches!(
            update(&conn, &config(), "SFO-999999", &clear, now),
            Err(Error::NotFound(_))
        ));
        assert_eq!(get(&conn, &ok.human_id).unwrap().map(|r| r.revision), Some(1));
        // The counter is never reused: a refused create took no number.
        assert_eq!(ok.human_id, "SFO-000001");
    }
}
