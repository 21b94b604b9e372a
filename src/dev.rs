//! Dev mode: one command from a fresh clone gives a working fleet — a controller on the embedded
//! SQLite store (http://127.0.0.1:8080, gateway :8081) and agents for San Francisco, Chicago and
//! Tokyo (http://127.0.0.1:8101-8103) with demo services, queues, counters and staff. State lives
//! in `.meridian-dev/`; running it again reuses it (same admin token, same agents, same data).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use chrono::Utc;
use meridian_controller::config_admin::{self, ChangeMode, ResourceInput};
use meridian_controller::store::{EnrollmentToken, Role, Store};
use meridian_controller::{auth, server};
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct DevArgs {
    /// Where dev state lives.
    #[arg(long, default_value = ".meridian-dev")]
    dir: PathBuf,
    #[arg(long, default_value_t = 8080)]
    api_port: u16,
    #[arg(long, default_value_t = 8081)]
    gateway_port: u16,
    /// First branch server port; the agents use it and the next two.
    #[arg(long, default_value_t = 8101)]
    branch_port: u16,
}

/// Demo sites: code, name, time zone.
const SITES: [(&str, &str, &str); 3] = [
    ("SFO", "San Francisco", "America/Los_Angeles"),
    ("CHI", "Chicago", "America/Chicago"),
    ("TYO", "Tokyo", "Asia/Tokyo"),
];

/// The demo staff password (every demo user).
pub const DEMO_PASSWORD: &str = "meridian-demo";

pub async fn run(args: DevArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Dev state holds the admin token and the demo keys: owner only, like production state.
    meridian_shared::private_files::create_dir(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let settings = meridian_controller::Settings {
        data_dir: args.dir.join("controller"),
        api_listen: format!("127.0.0.1:{}", args.api_port),
        gateway_listen: format!("127.0.0.1:{}", args.gateway_port),
        dev_mode: true,
        ..Default::default()
    };
    meridian_shared::private_files::create_dir(&settings.data_dir)?;
    let store = meridian_controller::store::open(&settings.database_url()).await?;
    let token_file = args.dir.join("admin-token");
    admin_token(store.as_ref(), &token_file).await?;
    let key_file = args.dir.join("connector-key");
    let connector_key = connector_key(&key_file)?;
    seed(store.as_ref(), &auth::hash_secret(&connector_key)).await?;
    let listeners = server::Listeners::bind(&settings).await.with_context(|| {
        format!("binding {} and {}", settings.api_listen, settings.gateway_listen)
    })?;
    let controller =
        tokio::spawn(server::serve(settings, store.clone(), listeners, shutdown.clone()));

    let mut agents = Vec::new();
    let mut urls = Vec::new();
    for (i, (code, name, _)) in SITES.iter().enumerate() {
        let port = args.branch_port + i as u16;
        let agent_settings = meridian_agent::Settings {
            controller_url: format!("http://127.0.0.1:{}", args.gateway_port),
            data_dir: args.dir.join(format!("agent-{code}")),
            http_listen: format!("127.0.0.1:{port}"),
            heartbeat_ms: 3_000,
            dev_mode: true,
            ..Default::default()
        };
        let ctx = meridian_agent::Context::open_on(
            &agent_settings,
            meridian_agent::clock::ClockSource::system(),
            None,
        )
        .await?;
        let enrolled = ctx.db.read(meridian_agent::store::queries::identity).await?.is_some();
        let agent_settings = if enrolled {
            agent_settings
        } else {
            meridian_agent::Settings {
                enrollment_token: enrollment_token(store.as_ref(), code).await?,
                ..agent_settings
            }
        };
        let http = tokio::net::TcpListener::bind(&agent_settings.http_listen)
            .await
            .with_context(|| format!("binding {}", agent_settings.http_listen))?;
        agents.push(tokio::spawn(meridian_agent::run_with(
            ctx,
            agent_settings,
            http,
            shutdown.clone(),
        )));
        urls.push(format!("  {code} {name:<14} http://127.0.0.1:{port}"));
    }

    println!("\nMeridian dev fleet is up (Ctrl-C stops it; state in {}).", args.dir.display());
    println!(
        "  controller API     http://127.0.0.1:{}   (agent gateway :{})",
        args.api_port, args.gateway_port
    );
    for u in &urls {
        println!("{u}");
    }
    // Secrets stay in their files (0600), out of terminals and captured output.
    println!("  admin token        in {}", token_file.display());
    println!("  connector API key  in {} (all three branches)", key_file.display());
    println!(
        "  demo staff         alice (SFO), bob (CHI), chiyo (supervisor, all) — password {DEMO_PASSWORD}\n"
    );

    let result = controller.await;
    for agent in agents {
        if let Ok(Err(e)) = agent.await {
            tracing::error!(error = %e, "agent stopped with an error");
        }
    }
    result??;
    Ok(())
}

/// Reuses the token in `file` when it is still valid; otherwise creates one and writes it.
async fn admin_token(store: &dyn Store, file: &Path) -> anyhow::Result<String> {
    if let Ok(existing) = std::fs::read_to_string(file) {
        let existing = existing.trim().to_owned();
        if store.api_token_by_hash(&auth::hash_secret(&existing)).await?.is_some() {
            return Ok(existing);
        }
    }
    let (token, secret) = meridian_controller::api::new_api_token("dev", Role::Admin);
    store.insert_api_token(&token).await?;
    server::write_secret_file(file, &secret)?;
    Ok(secret)
}

/// The dev fleet's connector API key: created once, kept in `file`.
fn connector_key(file: &Path) -> anyhow::Result<String> {
    if let Ok(existing) = std::fs::read_to_string(file) {
        let existing = existing.trim().to_owned();
        if !existing.is_empty() {
            return Ok(existing);
        }
    }
    let secret = auth::new_secret("mrd_ck_");
    server::write_secret_file(file, &secret)?;
    Ok(secret)
}

async fn enrollment_token(store: &dyn Store, site: &str) -> anyhow::Result<String> {
    let token = auth::new_secret("mrd_enr_");
    let now = Utc::now();
    store
        .insert_enrollment_token(&EnrollmentToken {
            id: uuid_like(),
            site: meridian_shared::SiteCode::parse(site)?,
            token_hash: auth::hash_secret(&token),
            created_at: now,
            expires_at: now + chrono::Duration::hours(1),
            used_at: None,
            used_by_agent: None,
        })
        .await?;
    Ok(token)
}

fn uuid_like() -> String {
    meridian_shared::AgentId::new().to_string()
}

/// The demo configuration, applied idempotently (unchanged on later runs unless edited).
pub fn demo_resources(connector_key_hash: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let hours = json!({
        "mon": ["09:00-12:30", "13:30-17:00"], "tue": ["09:00-17:00"], "wed": ["09:00-17:00"],
        "thu": ["09:00-17:00"], "fri": ["09:00-16:00"], "sat": ["10:00-13:00"]
    });
    for (code, name, tz) in SITES {
        out.push(json!({"kind": "site", "code": code, "name": name, "time_zone": tz, "business_hours": hours, "tags": ["demo"]}));
        for (q, qname, letter) in [
            ("general", "General", "A"),
            ("accounts", "Accounts", "B"),
            ("repairs", "Repairs", "C"),
        ] {
            out.push(
                json!({"kind": "queue", "site": code, "code": q, "name": qname, "letter": letter}),
            );
        }
        for (s, sname, q, kpi) in [
            ("GEN", "General enquiry", "general", 10),
            ("ACC", "Open an account", "accounts", 15),
            ("REP", "Repair drop-off", "repairs", 20),
        ] {
            let mut service = json!({"kind": "service", "site": code, "code": s, "name": sname, "queue": q, "kpi_wait_minutes": kpi});
            if s == "ACC" {
                // Accounts are opened by appointment too: 15-minute slots, two desks.
                service["appointments"] = json!({"slot_minutes": 15, "capacity": 2});
            }
            out.push(service);
        }
        out.push(json!({"kind": "work_profile", "site": code, "code": "default", "name": "Default",
            "queues": [{"queue": "accounts", "min_wait_minutes": 20}, {"queue": "general"}, {"queue": "accounts"}, {"queue": "repairs"}]}));
        out.push(json!({"kind": "connector_key", "site": code, "code": "demo", "name": "Demo integrations", "key_hash": connector_key_hash}));
        for n in 1..=3 {
            out.push(json!({"kind": "service_point", "site": code, "code": format!("C{n}"), "name": format!("Counter {n}"), "work_profile": "default"}));
        }
    }
    for (user, name, roles, sites) in [
        ("alice", "Alice Park", vec!["staff"], vec!["SFO"]),
        ("bob", "Bob Novak", vec!["staff"], vec!["CHI"]),
        ("chiyo", "Chiyo Sato", vec!["staff", "supervisor"], vec!["TYO", "SFO", "CHI"]),
    ] {
        out.push(json!({"kind": "staff_user", "username": user, "name": name, "roles": roles, "sites": sites, "password": DEMO_PASSWORD}));
    }
    // Distributed requests: repairs; chairs go to the Chicago workshop when created in San
    // Francisco; open repairs follow the sun SFO -> TYO -> CHI at each site's close; closed
    // ones are broadcast to every site as a knowledge base.
    out.push(json!({"kind": "request_type", "code": "REPAIR", "name": "Furniture repair", "fields": [
        {"name": "summary", "type": "text", "max_length": 200, "required": true},
        {"name": "category", "type": "enum", "values": ["chair", "table", "sofa"], "required": true},
        {"name": "upholstery", "type": "boolean", "default": false},
        {"name": "status", "type": "enum", "values": ["open", "closed"], "default": "open"}
    ]}));
    out.push(json!({"kind": "request_mapping", "code": "REPAIR", "name": "Repair as is",
        "source_type": "REPAIR", "target_type": "REPAIR", "return_mapping": "REPAIR",
        "duplicates": "overwrite"}));
    out.push(json!({"kind": "request_pool", "code": "default", "name": "Default", "timeout_minutes": 1440}));
    out.push(
        json!({"kind": "request_rule", "code": "CHAIRS", "name": "Chairs to the Chicago workshop",
        "request_type": "REPAIR", "sites": ["SFO"], "trigger": {"on": "create"},
        "condition": "fields.category == 'chair'", "action": "transfer", "mode": "ownership",
        "mapping": "REPAIR", "target": {"site": "CHI"}}),
    );
    out.push(json!({"kind": "request_rule", "code": "SUN", "name": "Follow the sun",
        "request_type": "REPAIR", "trigger": {"on": "close_of_business"},
        "condition": "fields.status == 'open'", "action": "transfer", "mode": "ownership",
        "mapping": "REPAIR", "target": {"follow_the_sun": ["SFO", "TYO", "CHI"]}}));
    out.push(json!({"kind": "request_rule", "code": "KB", "name": "Closed repairs to every site",
        "request_type": "REPAIR", "trigger": {"on": "status_change", "field": "status"},
        "condition": "fields.status == 'closed'", "action": "transfer", "mode": "data_only",
        "mapping": "REPAIR", "target": {"all_sites": true}, "update": "never"}));
    out
}

async fn seed(store: &dyn Store, connector_key_hash: &str) -> anyhow::Result<()> {
    let inputs = demo_resources(connector_key_hash)
        .into_iter()
        .map(serde_json::from_value::<ResourceInput>)
        .collect::<Result<Vec<_>, _>>()?;
    let report = config_admin::change(store, "dev", inputs, vec![], ChangeMode::Upsert).await?;
    tracing::info!(revision = report.revision, published = ?report.sites_published, "demo configuration applied");
    Ok(())
}

#[cfg(test)]
mod tests {
    use meridian_shared::config::Resource;

    use super::*;

    #[tokio::test]
    async fn the_demo_configuration_applies_and_books_accounts() {
        let url = meridian_controller::testing::fresh_sqlite_url();
        let store = meridian_controller::store::open(&url).await.expect("store");
        seed(store.as_ref(), &"0".repeat(64)).await.expect("demo configuration");
        let (_, resources) = store.load_config().await.expect("config");
        let bookable: Vec<String> = resources
            .iter()
            .filter_map(|r| match r {
                Resource::Service(s) if s.appointments.is_some() => Some(s.code.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(bookable, ["ACC"; 3]);
    }
}
