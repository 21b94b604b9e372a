//! The service requests terminal page (`/requests`, staff behind the workstation login),
//! through `Router::oneshot` with no controller: the agent never has a link in these tests, so
//! every page here is also served offline (the offline banner is shown). Creating from the
//! form, refusals on the form, search, a read-only copy that arrived from another site, and a
//! transfer started from the page.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use chrono::{DateTime, TimeZone, Utc};
use meridian_agent::store::queries;
use meridian_agent::{Context, Settings};
use meridian_shared::clock::ManualClock;
use meridian_shared::config::SiteConfig;
use meridian_shared::transfers::{ApplyOperation, Move, OpKind, RequestState, TransferMode};
use meridian_shared::{Code, SiteCode};
use serde_json::json;
use tower::ServiceExt;

const PASSWORD: &str = "correct horse";

fn password_hash() -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::encode_b64(b"0123456789abcdef").expect("salt");
    argon2::Argon2::default().hash_password(PASSWORD.as_bytes(), &salt).expect("hash").to_string()
}

fn site_config() -> SiteConfig {
    serde_json::from_value(json!({
        "revision": 1,
        "site": {"code": "SFO", "name": "San Francisco", "time_zone": "America/Los_Angeles"},
        "services": [], "queues": [], "service_points": [], "work_profiles": [],
        "connector_keys": [], "webhooks": [],
        "staff": [
            {"username": "alice", "name": "Alice", "roles": ["staff"], "sites": ["SFO"],
             "password_hash": password_hash()}
        ],
        "request_types": [
            {"code": "REPAIR", "name": "Furniture repair", "fields": [
                {"name": "summary", "type": "text", "max_length": 20, "required": true},
                {"name": "category", "type": "enum", "values": ["chair", "table"], "required": true},
                {"name": "legs", "type": "number", "integer": true},
                {"name": "due", "type": "date"},
                {"name": "pickup", "type": "date_time"},
                {"name": "upholstery", "type": "boolean", "default": false}
            ]},
            {"code": "WORKSHOP", "name": "Workshop job", "fields": [
                {"name": "title", "type": "text", "max_length": 80, "required": true}
            ]}
        ],
        "request_mappings": [
            {"code": "TO-WORKSHOP", "name": "To the workshop", "source_type": "REPAIR",
             "target_type": "WORKSHOP", "fields": {"title": {"from": "summary"}}}
        ]
    }))
    .expect("site config")
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 22, 17, 0, 0).unwrap()
}

struct Branch {
    ctx: Arc<Context>,
    terminals: Router,
    cookies: String,
}

async fn branch() -> Branch {
    let dir =
        std::env::temp_dir().join(format!("meridian-requests-{}", uuid::Uuid::new_v4().simple()));
    let settings = Settings { data_dir: dir, ..Settings::default() };
    let ctx = Context::open(&settings, Arc::new(ManualClock::new(now()))).await.expect("open");
    let config = site_config();
    let applied = config.clone();
    ctx.db.write(move |c| queries::apply_config(c, &applied, now())).await.expect("apply config");
    ctx.config.send_replace(Some(Arc::new(config)));
    let terminals = meridian_agent::terminals::router(ctx.clone());
    let login = terminals
        .clone()
        .oneshot(form("/workstation/login", "", "username=alice&password=correct+horse&counter="))
        .await
        .expect("login");
    assert_eq!(login.status(), StatusCode::SEE_OTHER);
    let cookies = login
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok()?.split(';').next().map(str::to_owned))
        .filter(|kv| !kv.ends_with('='))
        .collect::<Vec<_>>()
        .join("; ");
    Branch { ctx, terminals, cookies }
}

fn form(path: &str, cookies: &str, body: &str) -> Request<Body> {
    Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("cookie", cookies)
        .body(Body::from(body.to_owned()))
        .expect("request")
}

/// Status, `Location` and body of a response.
async fn send(b: &Branch, req: Request<Body>) -> (StatusCode, String, String) {
    let resp = b.terminals.clone().oneshot(req).await.expect("response");
    let status = resp.status();
    let location =
        resp.headers().get("location").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 22).await.expect("body");
    (status, location, String::from_utf8(body.to_vec()).expect("html"))
}

async fn get(b: &Branch, path: &str) -> (StatusCode, String) {
    let req = Request::builder().uri(path).header("cookie", &b.cookies);
    let (status, _, body) = send(b, req.body(Body::empty()).expect("request")).await;
    (status, body)
}

async fn post(b: &Branch, path: &str, body: &str) -> (StatusCode, String, String) {
    send(b, form(path, &b.cookies, body)).await
}

async fn stored(ctx: &Context) -> Vec<meridian_agent::requests::Request> {
    ctx.db.read(|c| meridian_agent::requests::list(c, None, 100)).await.expect("list")
}

/// Creates a request through the form; its detail page's path.
async fn create(b: &Branch, body: &str) -> String {
    let (status, location, page) = post(b, "/requests", body).await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{page}");
    assert!(location.starts_with("/requests/"), "{location}");
    location
}

#[tokio::test]
async fn staff_create_a_request_from_the_form_and_see_it_offline() {
    let b = branch().await;
    // Not logged in: sent to the login.
    let anonymous = Request::builder().uri("/requests").body(Body::empty()).expect("request");
    let (status, location, _) = send(&b, anonymous).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(location.starts_with("/workstation"), "{location}");

    let (status, new) = get(&b, "/requests/new?type=REPAIR").await;
    assert_eq!(status, StatusCode::OK);
    assert!(new.contains(r#"name="f.summary" type="text" maxlength="20""#), "{new}");
    assert!(new.contains(r#"type="datetime-local""#) && new.contains(r#"type="date""#), "{new}");
    assert!(new.contains(r#"<option value="chair">chair</option>"#), "{new}");

    let location = create(
        &b,
        "type=REPAIR&f.summary=Wobbly+%3Cleg%3E&f.category=chair&f.legs=4&f.due=2026-12-01\
         &f.pickup=2026-12-01T09%3A30&f.upholstery=true",
    )
    .await;
    let (status, detail) = get(&b, &location).await;
    assert_eq!(status, StatusCode::OK);
    // No link in these tests: the page is served from the local store, offline.
    assert!(detail.contains(r#"id="offline-banner""#), "{detail}");
    assert!(detail.contains("Created SFO-000001"), "{detail}");
    assert!(detail.contains("Wobbly &lt;leg&gt;"), "escaped: {detail}");
    assert!(detail.contains(r#"id="edit""#), "the master can be edited");
    let all = stored(&b.ctx).await;
    assert_eq!(all.len(), 1);
    let r = &all[0];
    assert_eq!(r.fields["legs"], json!(4));
    assert_eq!(r.fields["upholstery"], json!(true));
    // 09:30 in San Francisco.
    assert_eq!(r.fields["pickup"], json!("2026-12-01T09:30:00-08:00"));
    assert!(r.distribution.master);

    // An edit changes only what changed; an unticked box is false.
    let edit = "revision=1&f.summary=Wobbly+%3Cleg%3E&f.category=table&f.legs=4\
                &f.due=2026-12-01&f.pickup=2026-12-01T09%3A30%3A00";
    let (status, location, page) = post(&b, &format!("/requests/{}/edit", r.id), edit).await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{page}");
    let (_, detail) = get(&b, &location).await;
    assert!(detail.contains("Saved SFO-000001"), "{detail}");
    let r = &stored(&b.ctx).await[0];
    assert_eq!((r.revision, r.fields["category"].clone()), (2, json!("table")));
    assert_eq!(r.fields["upholstery"], json!(false));
    assert_eq!(r.fields["pickup"], json!("2026-12-01T09:30:00-08:00"), "unchanged");
    // Submitting the same form again changes nothing.
    let (status, location, _) = post(&b, &format!("/requests/{}/edit", r.id), edit).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(location.contains("Nothing+to+save"), "{location}");
    // A form shown at revision 1 is stale now: 409 with the conflict on the page.
    let stale = edit.replace("f.category=table", "f.category=chair");
    let (status, _, page) = post(&b, &format!("/requests/{}/edit", r.id), &stale).await;
    assert_eq!(status, StatusCode::CONFLICT, "{page}");
    assert!(page.contains("reload and retry"), "{page}");
}

#[tokio::test]
async fn a_bad_form_is_refused_field_by_field_and_stores_nothing() {
    let b = branch().await;
    let (status, _, page) =
        post(&b, "/requests", "type=REPAIR&f.summary=&f.category=chair&f.legs=four").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(page.contains(r#"data-field="fields.legs""#), "{page}");
    assert!(page.contains("&quot;four&quot; is not a number"), "{page}");
    assert!(page.contains(r#"value="four""#), "the submitted values are kept: {page}");

    let too_long = "x".repeat(21);
    let (status, _, page) =
        post(&b, "/requests", &format!("type=REPAIR&f.summary={too_long}&f.category=sofa")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(page.contains("at most 20 characters"), "{page}");
    assert!(page.contains("must be one of chair, table"), "{page}");

    let (status, _, page) = post(&b, "/requests", "type=REPAIR&f.category=chair").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(page.contains(r#"data-field="fields.summary""#) && page.contains("required"), "{page}");

    let (status, _, page) = post(&b, "/requests", "type=NOPE&f.summary=x").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(page.contains("unknown request type"), "{page}");
    assert!(stored(&b.ctx).await.is_empty(), "nothing stored");
}

/// Stores a read-only copy of CHI's request the way the link applies `REQUEST_APPLY` for a
/// data-only transfer from CHI.
async fn copy_from_chi(b: &Branch, summary: &str) {
    let op_id = uuid::Uuid::now_v7();
    let (chi, sfo) = (SiteCode::parse("CHI").expect("site"), SiteCode::parse("SFO").expect("site"));
    let cmd = ApplyOperation {
        op_id,
        attempt: 1,
        kind: OpKind::Transfer,
        mode: Some(TransferMode::DataOnly),
        source_site: chi.clone(),
        mapping: None,
        request: RequestState {
            request_id: uuid::Uuid::now_v7(),
            human_id: "CHI-000042".into(),
            request_type: Code::parse("REPAIR").expect("type"),
            fields: serde_json::from_value(json!({"summary": summary, "category": "table"}))
                .expect("values"),
            revision: 3,
            created_at: now(),
            history: vec![Move {
                at: now(),
                op_id,
                kind: OpKind::Transfer,
                mode: Some(TransferMode::DataOnly),
                from_site: chi,
                to_site: sfo,
                mapping: None,
                rule: None,
            }],
        },
    };
    let config = b.ctx.site_config().expect("config");
    let outcome = b
        .ctx
        .db
        .write(move |c| meridian_agent::distribution::apply(c, &config, &cmd, now()))
        .await
        .expect("apply");
    assert!(matches!(outcome, meridian_shared::transfers::Outcome::Applied { .. }), "{outcome:?}");
}

#[tokio::test]
async fn the_list_searches_by_human_id_and_field_value_and_copies_are_read_only() {
    let b = branch().await;
    create(&b, "type=REPAIR&f.summary=Wobbly+leg&f.category=chair").await;
    create(&b, "type=REPAIR&f.summary=Torn+seat&f.category=chair").await;
    copy_from_chi(&b, "Scratched top").await;

    let (status, all) = get(&b, "/requests").await;
    assert_eq!(status, StatusCode::OK);
    assert!(all.contains(r#"id="offline-banner""#), "no link here: {all}");
    for id in ["SFO-000001", "SFO-000002", "CHI-000042"] {
        assert!(all.contains(&format!(r#"data-request="{id}""#)), "{id}: {all}");
    }
    assert!(all.contains(">Read-only copy<") && all.contains(">Master<"), "{all}");

    let (_, by_id) = get(&b, "/requests?q=sfo-000002").await;
    assert!(by_id.contains(r#"data-request="SFO-000002""#), "{by_id}");
    assert!(!by_id.contains(r#"data-request="SFO-000001""#), "{by_id}");
    let (_, by_value) = get(&b, "/requests?q=SCRATCHED").await;
    assert!(by_value.contains(r#"data-request="CHI-000042""#), "{by_value}");
    assert!(!by_value.contains(r#"data-request="SFO-"#), "{by_value}");
    let (_, none) = get(&b, "/requests?q=sofa&type=REPAIR").await;
    assert!(none.contains(r#"id="no-requests""#), "{none}");

    // The copy: every distribution field, its history, no edit or transfer form.
    let (status, copy) = get(&b, "/requests/CHI-000042").await;
    assert_eq!(status, StatusCode::OK, "{copy}");
    assert!(copy.contains(r#"id="read-only""#), "{copy}");
    assert!(!copy.contains(r#"id="edit""#) && !copy.contains(r#"id="transfer""#), "{copy}");
    assert!(copy.contains("Delete copy"), "{copy}");
    assert!(copy.contains("CHI → SFO") && copy.contains("transfer (data_only)"), "{copy}");
    for key in ["master", "current-site", "from-site", "to-request-id", "transfer-error"] {
        assert!(copy.contains(&format!(r#"data-key="{key}""#)), "{key}: {copy}");
    }
    let copy_id = stored(&b.ctx)
        .await
        .into_iter()
        .find(|r| r.human_id == "CHI-000042")
        .map(|r| r.id)
        .expect("the copy");
    // Editing it is refused with the conflict.
    let (status, _, page) = post(
        &b,
        &format!("/requests/{copy_id}/edit"),
        "revision=3&f.summary=Mine&f.category=table",
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{page}");
    assert!(page.contains("read-only copy"), "{page}");
    // Deleting the copy here.
    let (status, location, _) = post(&b, &format!("/requests/{copy_id}/delete"), "").await;
    assert_eq!(
        (status, location.as_str()),
        (StatusCode::SEE_OTHER, "/requests?msg=Deleted+the+copy+of+CHI-000042.")
    );
    assert_eq!(stored(&b.ctx).await.len(), 2);
    let (status, _) = get(&b, &format!("/requests/{copy_id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_transfer_form_starts_an_operation_and_the_request_turns_read_only() {
    let b = branch().await;
    let location = create(&b, "type=REPAIR&f.summary=Wobbly+leg&f.category=chair").await;
    let (_, detail) = get(&b, &location).await;
    assert!(detail.contains(r#"<option value="TO-WORKSHOP">"#), "the type's mappings: {detail}");
    assert!(!detail.contains(r#"id="return""#), "never came from elsewhere: no return");
    let id = location.trim_start_matches("/requests/").split('?').next().expect("path").to_owned();
    let ops = format!("/requests/{id}/operations");

    // Refusals come back on the page.
    let (status, _, page) = post(&b, &ops, "action=transfer&mode=ownership&target=SFO").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{page}");
    assert!(page.contains("already here"), "{page}");
    let (status, _, page) = post(&b, &ops, "action=transfer&mode=sideways&target=CHI").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{page}");
    assert!(page.contains("unknown mode"), "{page}");

    let (status, location, page) =
        post(&b, &ops, "action=transfer&mode=ownership&target=CHI&mapping=TO-WORKSHOP").await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{page}");
    let (_, detail) = get(&b, &location).await;
    assert!(detail.contains("Transfer of SFO-000001 to CHI started"), "{detail}");
    assert!(detail.contains("In transfer to CHI"), "{detail}");
    assert!(detail.contains(">Pending<"), "{detail}");
    assert!(detail.contains(r#"id="read-only""#), "{detail}");
    assert!(!detail.contains(r#"id="edit""#) && !detail.contains(r#"id="delete""#), "{detail}");
    assert!(detail.contains("SFO → CHI") && detail.contains("TO-WORKSHOP"), "{detail}");
    let (_, listed) = get(&b, "/requests").await;
    assert!(listed.contains("In transfer to CHI"), "{listed}");

    let r = &stored(&b.ctx).await[0];
    assert!(!r.distribution.master && r.distribution.pending_operation.is_some());
    // Read-only meanwhile: an edit and a delete are refused with 409.
    let edit = format!("/requests/{id}/edit");
    let (status, _, page) = post(&b, &edit, "revision=1&f.summary=x&f.category=chair").await;
    assert_eq!(status, StatusCode::CONFLICT, "{page}");
    assert!(page.contains("handed over"), "{page}");
    let (status, _, _) = post(&b, &format!("/requests/{id}/delete"), "").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(stored(&b.ctx).await.len(), 1);
}
