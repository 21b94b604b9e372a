//! `meridianctl`: a command-line client of the admin REST API (`crate::api`).
//!
//! The binary parses flags and prints; everything else is here, so tests drive the same code
//! against an in-process server. Each command is a function that talks to the API and returns
//! data, plus a pure renderer (`render`) that turns the data into a table, JSON or YAML.
//! Manifest parsing (`manifest`) is pure too.
//!
//! Invariants: a manifest is parsed and checked completely before anything is sent, and
//! `apply` sends the whole file in one `/api/v1/apply` call, so the controller commits all of it
//! in one revision or none of it. Errors carry the server's stable `code`, its message and its
//! per-field details; a server that cannot be reached is named.
//!
//! Listing site-scoped kinds (services, queues, service points, work profiles) without `--site`
//! reads `GET /api/v1/config` once and shows every site's resources (one consistent revision);
//! with `--site` it reads `GET /api/v1/sites/{site}/{kind}`, which fails for an unknown site.
//! Staff, agents and enrollment tokens are filtered by `--site` on the client.
//!
//! This module has its own error type, `CtlError`: its failures (an HTTP error body, an
//! unreachable server, a bad manifest) are a client's, unlike `crate::Error`, which the server
//! maps to responses.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use meridian_shared::SiteCode;
use meridian_shared::config::{ResourceKey, ResourceKind};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub mod appointments;
pub mod manifest;
pub mod releases;
pub mod render;
pub mod requests;
pub mod rollouts;

/// How long one request may take before meridianctl gives up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The server answered with an error status.
    #[error("{0}")]
    Api(ApiFailure),
    #[error("could not reach the Meridian controller at {server}: {reason}")]
    Unreachable { server: String, reason: String },
    #[error("request to {server} failed: {reason}")]
    Http { server: String, reason: String },
    #[error("unexpected response from {server}: {reason}")]
    Protocol { server: String, reason: String },
    #[error("{0}")]
    Manifest(String),
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

pub type Result<T, E = CtlError> = std::result::Result<T, E>;

/// An error response of the admin API: `{"code", "message", "details"?}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiFailure {
    pub status: u16,
    pub code: String,
    pub message: String,
    /// `(field, message)` for each entry of `details`.
    pub details: Vec<(String, String)>,
    /// The request carried no token.
    pub without_token: bool,
}

impl ApiFailure {
    /// Reads an error body; a body that is not the API's JSON (a proxy's page, say) becomes
    /// `http_<status>` with the start of the body as the message.
    pub fn from_body(status: StatusCode, body: &[u8]) -> Self {
        #[derive(Deserialize)]
        struct Body {
            code: String,
            message: String,
            #[serde(default)]
            details: Vec<Detail>,
        }
        #[derive(Deserialize)]
        struct Detail {
            field: String,
            message: String,
        }
        match serde_json::from_slice::<Body>(body) {
            Ok(b) => ApiFailure {
                status: status.as_u16(),
                code: b.code,
                message: b.message,
                details: b.details.into_iter().map(|d| (d.field, d.message)).collect(),
                without_token: false,
            },
            Err(_) => {
                let text: String = String::from_utf8_lossy(body).trim().chars().take(300).collect();
                ApiFailure {
                    status: status.as_u16(),
                    code: format!("http_{}", status.as_u16()),
                    message: if text.is_empty() {
                        status.canonical_reason().unwrap_or("error").to_owned()
                    } else {
                        text
                    },
                    details: vec![],
                    without_token: false,
                }
            }
        }
    }
}

impl fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)?;
        for (field, message) in &self.details {
            write!(f, "\n  {field}: {message}")?;
        }
        if self.without_token && self.status == 401 {
            write!(f, "\n(no API token given: use --token, --token-file or MERIDIAN_TOKEN)")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
    Yaml,
}

/// What `meridianctl get` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Listing {
    #[value(alias = "site")]
    Sites,
    #[value(alias = "service")]
    Services,
    #[value(alias = "queue")]
    Queues,
    #[value(alias = "service-point")]
    ServicePoints,
    #[value(alias = "work-profile")]
    WorkProfiles,
    #[value(alias = "staff-users", alias = "staff-user")]
    Staff,
    #[value(alias = "connector-key")]
    ConnectorKeys,
    #[value(alias = "webhook")]
    Webhooks,
    #[value(alias = "agent")]
    Agents,
    #[value(alias = "enrollment-token")]
    EnrollmentTokens,
    #[value(alias = "api-token")]
    ApiTokens,
    #[value(alias = "revision")]
    Revisions,
}

impl Listing {
    /// The configuration kind listed, for configuration listings.
    pub fn resource_kind(self) -> Option<ResourceKind> {
        match self {
            Listing::Sites => Some(ResourceKind::Site),
            Listing::Services => Some(ResourceKind::Service),
            Listing::Queues => Some(ResourceKind::Queue),
            Listing::ServicePoints => Some(ResourceKind::ServicePoint),
            Listing::WorkProfiles => Some(ResourceKind::WorkProfile),
            Listing::Staff => Some(ResourceKind::StaffUser),
            Listing::ConnectorKeys => Some(ResourceKind::ConnectorKey),
            Listing::Webhooks => Some(ResourceKind::Webhook),
            _ => None,
        }
    }

    /// The collection segment under `/api/v1/sites/{site}/`, for site-scoped kinds.
    fn site_segment(self) -> Option<&'static str> {
        match self {
            Listing::Services => Some("services"),
            Listing::Queues => Some("queues"),
            Listing::ServicePoints => Some("service-points"),
            Listing::WorkProfiles => Some("work-profiles"),
            Listing::ConnectorKeys => Some("connector-keys"),
            Listing::Webhooks => Some("webhooks"),
            _ => None,
        }
    }
}

/// What a change did and the report of `POST /api/v1/apply` and `/delete` — the API's own types.
pub use crate::config_admin::{Action, Change, ChangeReport};

/// A connection to one controller's admin API. `Debug` hides the token.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base.as_str())
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

impl Client {
    /// `server` is the API's base URL, e.g. `https://controller.example.com:8080`.
    pub fn new(server: &str, token: Option<String>) -> Result<Self> {
        let base = Url::parse(server.trim())
            .map_err(|e| CtlError::Usage(format!("invalid --server {server:?}: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(CtlError::Usage(format!(
                "invalid --server {server:?}: use http://host:port or https://host:port"
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("meridianctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CtlError::Http { server: server.to_owned(), reason: error_chain(&e) })?;
        let token = token.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty());
        Ok(Client { http, base, token })
    }

    /// The server as the user named it, for messages.
    pub fn server(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    fn url(&self, segments: &[&str]) -> Result<Url> {
        let mut url = self.base.clone();
        {
            let mut path = url
                .path_segments_mut()
                .map_err(|_| CtlError::Usage(format!("invalid --server {}", self.server())))?;
            path.pop_if_empty().extend(["api", "v1"]).extend(segments);
        }
        Ok(url)
    }

    /// Sends one request under `/api/v1`; `None` for an empty success body (204).
    async fn send(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&Value>,
    ) -> Result<Option<Value>> {
        self.send_to(method, self.url(segments)?, body).await
    }

    async fn send_to(
        &self,
        method: Method,
        url: Url,
        body: Option<&Value>,
    ) -> Result<Option<Value>> {
        let mut req = self.http.request(method, url);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(|e| self.transport_error(&e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.transport_error(&e))?;
        if !status.is_success() {
            let mut failure = ApiFailure::from_body(status, &bytes);
            failure.without_token = self.token.is_none();
            return Err(CtlError::Api(failure));
        }
        if bytes.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(&bytes).map(Some).map_err(|e| CtlError::Protocol {
            server: self.server().to_owned(),
            reason: format!("the body is not JSON: {e}"),
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&Value>,
    ) -> Result<T> {
        let value = self.send(method, segments, body).await?.unwrap_or(Value::Null);
        serde_json::from_value(value).map_err(|e| CtlError::Protocol {
            server: self.server().to_owned(),
            reason: format!("unexpected body: {e}"),
        })
    }

    fn transport_error(&self, e: &reqwest::Error) -> CtlError {
        let server = self.server().to_owned();
        if e.is_timeout() {
            CtlError::Unreachable {
                server,
                reason: format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()),
            }
        } else if e.is_connect() {
            CtlError::Unreachable { server, reason: root_cause(e) }
        } else {
            CtlError::Http { server, reason: error_chain(e) }
        }
    }
}

/// The causes of an error, without the outer layer that repeats the URL.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(err) = cur {
        parts.push(err.to_string());
        cur = err.source();
    }
    if parts.is_empty() { e.to_string() } else { parts.join(": ") }
}

/// The innermost cause, which says what went wrong (`Connection refused`, a DNS or TLS error).
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Reads a token file (the token is its first line).
pub fn read_token_file(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| CtlError::Io { path: path.display().to_string(), source })?;
    let token = text.lines().next().unwrap_or_default().trim().to_owned();
    if token.is_empty() {
        return Err(CtlError::Usage(format!("{}: the token file is empty", path.display())));
    }
    Ok(token)
}

/// Reads a manifest; `-` reads standard input.
pub fn read_manifest(path: &Path) -> Result<String> {
    let io = |source| CtlError::Io { path: path.display().to_string(), source };
    if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).map_err(io)
    } else {
        std::fs::read_to_string(path).map_err(io)
    }
}

fn site_arg(site: &str) -> Result<SiteCode> {
    SiteCode::parse(site).map_err(|e| CtlError::Usage(format!("--site: {}", e.message)))
}

/// Lists `listing`, optionally one site's only, as the API's JSON objects.
pub async fn list(client: &Client, listing: Listing, site: Option<&str>) -> Result<Vec<Value>> {
    let site = site.map(site_arg).transpose()?;
    let site_str = site.as_ref().map(SiteCode::as_str);
    let of_site = |items: Vec<Value>, field: &str| -> Vec<Value> {
        let Some(site) = site_str else { return items };
        items
            .into_iter()
            .filter(|v| match v.get(field) {
                Some(Value::String(s)) => s == site,
                Some(Value::Array(list)) => list.iter().any(|s| s.as_str() == Some(site)),
                _ => false,
            })
            .collect()
    };
    match listing {
        Listing::Sites => match site_str {
            Some(site) => Ok(vec![client.call(Method::GET, &["sites", site], None).await?]),
            None => client.call(Method::GET, &["sites"], None).await,
        },
        Listing::Services
        | Listing::Queues
        | Listing::ServicePoints
        | Listing::WorkProfiles
        | Listing::ConnectorKeys
        | Listing::Webhooks => match (site_str, listing.site_segment(), listing.resource_kind()) {
            (Some(site), Some(segment), _) => {
                client.call(Method::GET, &["sites", site, segment], None).await
            }
            (_, _, Some(kind)) => {
                #[derive(Deserialize)]
                struct Export {
                    resources: Vec<Value>,
                }
                let export: Export = client.call(Method::GET, &["config"], None).await?;
                Ok(export
                    .resources
                    .into_iter()
                    .filter(|r| r.get("kind").and_then(Value::as_str) == Some(kind.as_str()))
                    .collect())
            }
            _ => Ok(vec![]),
        },
        Listing::Staff => Ok(of_site(client.call(Method::GET, &["staff"], None).await?, "sites")),
        Listing::Agents => {
            let mut agents = of_site(client.call(Method::GET, &["agents"], None).await?, "site");
            let sort_key = |v: &Value| (text_field(v, "site"), text_field(v, "id"));
            agents.sort_by_key(sort_key);
            Ok(agents)
        }
        Listing::EnrollmentTokens => {
            Ok(of_site(client.call(Method::GET, &["enrollment-tokens"], None).await?, "site"))
        }
        Listing::ApiTokens | Listing::Revisions if site.is_some() => {
            Err(CtlError::Usage("--site does not apply to api-tokens or revisions".into()))
        }
        Listing::ApiTokens => client.call(Method::GET, &["api-tokens"], None).await,
        Listing::Revisions => client.call(Method::GET, &["config", "revisions"], None).await,
    }
}

fn text_field(v: &Value, field: &str) -> String {
    v.get(field).and_then(Value::as_str).unwrap_or_default().to_owned()
}

/// Renders a listing: a table, or the API's JSON as JSON or YAML.
pub fn render_list(
    listing: Listing,
    items: &[Value],
    output: Output,
    now: DateTime<Utc>,
) -> Result<String> {
    match output {
        Output::Table => Ok(render::table(listing, items, now)),
        _ => structured(&items, output),
    }
}

/// Applies every resource of a manifest in one call. Nothing is sent when the manifest does not
/// parse.
pub async fn apply(client: &Client, manifest_text: &str, dry_run: bool) -> Result<ChangeReport> {
    let resources = manifest::resources_for_apply(manifest_text).map_err(CtlError::Manifest)?;
    let body = json!({ "resources": resources, "dry_run": dry_run });
    client.call(Method::POST, &["apply"], Some(&body)).await
}

/// The key of one resource named on the command line: `kind` as `site`, `queue`,
/// `service-points`, `ServicePoint`, `staff`…; `site` is required for site-scoped kinds.
pub fn key_from_args(kind: &str, code: &str, site: Option<&str>) -> Result<ResourceKey> {
    let kind = manifest::normalise_kind(kind)
        .or_else(|| kind.parse().ok())
        .ok_or_else(|| CtlError::Usage(format!(
            "unknown kind {kind:?}: use site, service, queue, service-point, work-profile or staff-user"
        )))?;
    let site = match (kind.is_site_scoped(), site) {
        (true, Some(site)) => Some(site_arg(site)?),
        (true, None) => return Err(CtlError::Usage(format!("deleting a {kind} needs --site"))),
        (false, Some(_)) => {
            return Err(CtlError::Usage(format!("--site does not apply to a {kind}")));
        }
        (false, None) => None,
    };
    if kind == ResourceKind::Site {
        site_arg(code)?;
    }
    Ok(ResourceKey { kind, site, code: code.to_owned() })
}

/// Deletes resources in one revision (all or nothing).
pub async fn delete(client: &Client, keys: &[ResourceKey], dry_run: bool) -> Result<ChangeReport> {
    let body = json!({ "resources": keys, "dry_run": dry_run });
    client.call(Method::POST, &["delete"], Some(&body)).await
}

/// Deletes every resource a manifest names.
pub async fn delete_manifest(
    client: &Client,
    manifest_text: &str,
    dry_run: bool,
) -> Result<ChangeReport> {
    let keys = manifest::keys_for_delete(manifest_text).map_err(CtlError::Manifest)?;
    delete(client, &keys, dry_run).await
}

pub fn render_report(report: &ChangeReport, output: Output) -> Result<String> {
    match output {
        Output::Table => Ok(render::report(report)),
        _ => structured(report, output),
    }
}

/// What `meridianctl stats visits` asks for.
#[derive(Debug, Clone, Copy, Default)]
pub struct StatsFilter<'a> {
    pub group_by: &'a str,
    pub interval: Option<&'a str>,
    pub site: Option<&'a str>,
    pub service: Option<&'a str>,
    pub from: Option<&'a str>,
    pub to: Option<&'a str>,
}

/// Visit statistics (`GET /api/v1/stats/visits`), grouped as asked, optionally filtered.
pub async fn visit_stats(
    client: &Client,
    f: &StatsFilter<'_>,
) -> Result<Vec<crate::stats::report::Row>> {
    let mut url = client.url(&["stats", "visits"])?;
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("group_by", f.group_by);
        let pairs = [
            ("interval", f.interval),
            ("site", f.site),
            ("service", f.service),
            ("from", f.from),
            ("to", f.to),
        ];
        for (k, v) in pairs {
            if let Some(v) = v {
                q.append_pair(k, v);
            }
        }
    }
    let value = client.send_to(Method::GET, url, None).await?.unwrap_or(Value::Null);
    serde_json::from_value(value).map_err(|e| CtlError::Protocol {
        server: client.server().to_owned(),
        reason: e.to_string(),
    })
}

/// Statistics rows as a table (times in minutes).
pub fn render_stats(rows: &[crate::stats::report::Row], output: Output) -> Result<String> {
    if output != Output::Table {
        return structured(rows, output);
    }
    let min = |ms: f64| format!("{:.1}", ms / 60_000.0);
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    t.set_header(vec![
        "GROUP",
        "INTERVAL",
        "VISITS",
        "SERVED",
        "NO-SHOWS",
        "WAIT MEAN",
        "WAIT P90",
        "SERVICE MEAN",
        "SERVICE LEVEL",
    ]);
    for r in rows {
        t.add_row(vec![
            r.group.clone(),
            r.interval.clone().unwrap_or_else(|| "-".into()),
            r.visits.to_string(),
            r.served.to_string(),
            format!("{} ({:.1}%)", r.no_shows, r.no_show_pct),
            r.waiting_ms.as_ref().map(|w| min(w.mean)).unwrap_or_else(|| "-".into()),
            r.waiting_ms.as_ref().map(|w| min(w.p90 as f64)).unwrap_or_else(|| "-".into()),
            r.service_ms_mean.map(min).unwrap_or_else(|| "-".into()),
            r.service_level_pct.map(|p| format!("{p:.1}%")).unwrap_or_else(|| "-".into()),
        ]);
    }
    Ok(format!("{t}\n(times in minutes)\n"))
}

/// Creates a connector key (the controller generates the secret and returns it once).
pub async fn create_connector_key(
    client: &Client,
    site: &str,
    code: &str,
    name: &str,
) -> Result<Value> {
    let site = site_arg(site)?;
    let body = json!({ "code": code, "name": name });
    client.call(Method::POST, &["sites", site.as_str(), "connector-keys"], Some(&body)).await
}

/// A new enrollment token, as `POST /api/v1/enrollment-tokens` returns it (the token is shown
/// only this once; `Debug` hides it).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedEnrollmentToken {
    pub id: String,
    pub site: String,
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

impl fmt::Debug for CreatedEnrollmentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreatedEnrollmentToken")
            .field("id", &self.id)
            .field("site", &self.site)
            .field("token", &"***")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// `ttl` as `meridianctl` takes it (`3600`, `30m`, `1h`, `7d`).
pub async fn create_enrollment_token(
    client: &Client,
    site: &str,
    ttl: Option<&str>,
) -> Result<CreatedEnrollmentToken> {
    let site = site_arg(site)?;
    let ttl_seconds = ttl.map(manifest::parse_ttl).transpose().map_err(CtlError::Usage)?;
    let mut body = json!({ "site": site.as_str() });
    if let Some(ttl) = ttl_seconds {
        body["ttl_seconds"] = json!(ttl);
    }
    client.call(Method::POST, &["enrollment-tokens"], Some(&body)).await
}

pub fn render_enrollment_token(t: &CreatedEnrollmentToken, output: Output) -> Result<String> {
    match output {
        Output::Table => Ok(format!(
            "{}\nThe token is shown only once. Put it in the agent's configuration as enrollment_token; \
             it enrolls one agent for site {} and expires at {}.\n",
            render::fields(&[
                ("token", t.token.clone()),
                ("site", t.site.clone()),
                ("expires", t.expires_at.format("%Y-%m-%d %H:%M:%SZ").to_string()),
                ("id", t.id.clone()),
            ]),
            t.site,
            t.expires_at.format("%Y-%m-%d %H:%M:%SZ"),
        )),
        _ => structured(t, output),
    }
}

/// Resolves an agent id, full or a unique prefix of one (tables show 8 characters).
pub fn resolve_agent_id(id: &str, agents: &[Value]) -> Result<String> {
    let matches: Vec<&str> = agents
        .iter()
        .filter_map(|a| a.get("id").and_then(Value::as_str))
        .filter(|a| !id.is_empty() && a.starts_with(id))
        .collect();
    match matches.as_slice() {
        [one] => Ok((*one).to_owned()),
        [] => Err(CtlError::Usage(format!("no agent id starts with {id:?}"))),
        many => Err(CtlError::Usage(format!(
            "{id:?} matches {} agents; give more of the id",
            many.len()
        ))),
    }
}

/// Revokes an agent: its credential stops working and its session is closed. `id` may be a
/// unique prefix. Returns the agent as the API shows it.
pub async fn revoke_agent(client: &Client, id: &str) -> Result<Value> {
    let id = if id.parse::<uuid::Uuid>().is_ok() {
        id.to_owned()
    } else {
        let agents: Vec<Value> = client.call(Method::GET, &["agents"], None).await?;
        resolve_agent_id(id, &agents)?
    };
    client.call(Method::POST, &["agents", &id, "revoke"], None).await
}

/// `POST /staff/{username}/{action}` (`sign-out-everywhere` or `unlock`).
pub async fn staff_access(client: &Client, username: &str, action: &str) -> Result<Value> {
    client.call(Method::POST, &["staff", username, action], None).await
}

pub fn render_staff_access(changed: &Value, output: Output) -> Result<String> {
    let shown = |field: &str| match changed.get(field) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => {
            items.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")
        }
        Some(other) => other.to_string(),
        None => String::new(),
    };
    match output {
        Output::Table => Ok(render::fields(&[
            ("staff user", shown("username")),
            ("sessions epoch", shown("sessions_epoch")),
            ("unlock epoch", shown("unlock_epoch")),
            ("revision", shown("revision")),
            ("sites", shown("sites_published")),
        ])),
        _ => structured(changed, output),
    }
}

pub fn render_agent(agent: &Value, output: Output) -> Result<String> {
    match output {
        Output::Table => Ok(render::fields(&[
            ("agent", text_field(agent, "id")),
            ("site", text_field(agent, "site")),
            ("hostname", text_field(agent, "hostname")),
            ("revoked", render::timestamp(agent.get("revoked_at"))),
        ])),
        _ => structured(agent, output),
    }
}

/// Creates an admin API token; `role` is `admin` or `viewer`. The result includes the secret,
/// shown only this once.
pub async fn create_api_token(client: &Client, name: &str, role: &str) -> Result<Value> {
    client.call(Method::POST, &["api-tokens"], Some(&json!({ "name": name, "role": role }))).await
}

pub fn render_api_token(token: &Value, output: Output) -> Result<String> {
    match output {
        Output::Table => Ok(format!(
            "{}The secret is shown only once; use it as --token or MERIDIAN_TOKEN.\n",
            render::fields(&[
                ("id", text_field(token, "id")),
                ("name", text_field(token, "name")),
                ("role", text_field(token, "role")),
                ("secret", text_field(token, "secret")),
            ])
        )),
        _ => structured(token, output),
    }
}

pub async fn delete_api_token(client: &Client, id: &str) -> Result<()> {
    client.send(Method::DELETE, &["api-tokens", id], None).await.map(|_| ())
}

fn structured<T: Serialize + ?Sized>(value: &T, output: Output) -> Result<String> {
    let fail = |e: String| CtlError::Protocol { server: "-".into(), reason: e };
    match output {
        Output::Yaml => serde_yaml_ng::to_string(value).map_err(|e| fail(e.to_string())),
        _ => serde_json::to_string_pretty(value).map(|s| s + "\n").map_err(|e| fail(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_from_args() {
        let check = |kind: &str,
                     code: &str,
                     site: Option<&str>,
                     expected: std::result::Result<&str, &str>| {
            let got =
                key_from_args(kind, code, site).map(|k| k.to_string()).map_err(|e| e.to_string());
            match (&got, expected) {
                (Ok(got), Ok(want)) => assert_eq!(got, want),
                (Err(got), Err(want)) => assert!(got.contains(want), "{got} / {want}"),
                _ => panic!("{kind} {code} {site:?}: got {got:?}, want {expected:?}"),
            }
        };
        check("site", "SFO", None, Ok("site/SFO"));
        check("sites", "SFO", None, Ok("site/SFO"));
        check("service", "ACC", Some("SFO"), Ok("service/SFO/ACC"));
        check("service-point", "C1", Some("SFO"), Ok("service_point/SFO/C1"));
        check("ServicePoint", "C1", Some("SFO"), Ok("service_point/SFO/C1"));
        check("staff", "alice", None, Ok("staff_user/alice"));
        check("queue", "A", None, Err("needs --site"));
        check("site", "SFO", Some("SFO"), Err("--site does not apply"));
        check("site", "sfo", None, Err("invalid site code"));
        check("queue", "A", Some("sfo"), Err("--site: invalid site code"));
        check("widget", "A", None, Err("unknown kind"));
    }

    #[test]
    fn agent_ids_resolve_by_prefix() {
        let agents = vec![
            json!({"id": "0b7e8a52-1f7e-4c1a-9d0e-8a1b2c3d4e5f"}),
            json!({"id": "0b7e9999-1f7e-4c1a-9d0e-8a1b2c3d4e5f"}),
            json!({"id": "9c6f7e1d-0000-4000-8000-000000000000"}),
        ];
        let check = |id: &str, expected: std::result::Result<&str, &str>| {
            let got = resolve_agent_id(id, &agents).map_err(|e| e.to_string());
            match (&got, expected) {
                (Ok(got), Ok(want)) => assert_eq!(got, want),
                (Err(got), Err(want)) => assert!(got.contains(want), "{got} / {want}"),
                _ => panic!("{id}: got {got:?}, want {expected:?}"),
            }
        };
        check("9c6f", Ok("9c6f7e1d-0000-4000-8000-000000000000"));
        check("0b7e8a52", Ok("0b7e8a52-1f7e-4c1a-9d0e-8a1b2c3d4e5f"));
        check("0b7e", Err("matches 2 agents"));
        check("ffff", Err("no agent id starts with"));
        check("", Err("no agent id starts with"));
    }

    #[test]
    fn api_failures_read_and_print() {
        let check = |status: u16, body: &str, expected: &str| {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            assert_eq!(ApiFailure::from_body(status, body.as_bytes()).to_string(), expected);
        };
        check(
            404,
            r#"{"code":"not_found","message":"site/XX not found"}"#,
            "not_found: site/XX not found",
        );
        check(
            422,
            r#"{"code":"validation_failed","message":"invalid input","details":[{"field":"a.queue","message":"unknown queue Z"},{"field":"b","message":"bad"}]}"#,
            "validation_failed: invalid input\n  a.queue: unknown queue Z\n  b: bad",
        );
        check(502, "<html>Bad gateway</html>", "http_502: <html>Bad gateway</html>");
        check(503, "", "http_503: Service Unavailable");
        let mut f = ApiFailure::from_body(
            StatusCode::UNAUTHORIZED,
            br#"{"code":"unauthenticated","message":"authentication required"}"#,
        );
        f.without_token = true;
        assert!(f.to_string().ends_with("use --token, --token-file or MERIDIAN_TOKEN)"));
    }

    #[test]
    fn server_urls() {
        let check = |server: &str, path: &[&str], expected: std::result::Result<&str, &str>| {
            let got = Client::new(server, None)
                .and_then(|c| c.url(path))
                .map(|u| u.to_string())
                .map_err(|e| e.to_string());
            match (&got, expected) {
                (Ok(got), Ok(want)) => assert_eq!(got, want),
                (Err(got), Err(want)) => assert!(got.contains(want), "{got} / {want}"),
                _ => panic!("{server}: got {got:?}, want {expected:?}"),
            }
        };
        check("http://127.0.0.1:8080", &["sites"], Ok("http://127.0.0.1:8080/api/v1/sites"));
        check(
            "https://c.example.com:8080/",
            &["agents", "x/y", "revoke"],
            Ok("https://c.example.com:8080/api/v1/agents/x%2Fy/revoke"),
        );
        check(
            "https://c.example.com/meridian/",
            &["sites"],
            Ok("https://c.example.com/meridian/api/v1/sites"),
        );
        check("127.0.0.1:8080", &[], Err("invalid --server"));
        check("ftp://x", &[], Err("invalid --server"));
    }
}
