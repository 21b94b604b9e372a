//! `meridianctl`: manage a Meridian controller through its admin API. Parses flags, calls
//! `meridian_controller::ctl`, prints; exits 1 on any error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use meridian_controller::ctl::{self, Client, Listing, Output};

#[derive(Parser)]
#[command(
    name = "meridianctl",
    version,
    about = "Manage a Meridian controller through its admin API"
)]
struct Cli {
    /// Base URL of the controller's admin API.
    #[arg(long, env = "MERIDIAN_SERVER", default_value = "http://127.0.0.1:8080", global = true)]
    server: String,
    /// Admin API token.
    #[arg(long, env = "MERIDIAN_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// File holding the admin API token (first line); takes precedence over --token.
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List resources. Site-scoped kinds list every site unless --site is given.
    Get {
        #[arg(value_enum)]
        what: Listing,
        /// Only this site's resources.
        #[arg(long)]
        site: Option<String>,
    },
    /// Create or update every resource of a YAML file, in one configuration revision.
    Apply {
        /// YAML file with one or more resources (`-` for standard input).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Report what would change without storing anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete one resource (`delete queue A --site SFO`) or every resource of a file.
    Delete(DeleteArgs),
    /// Enrollment tokens, which let one agent join a site.
    #[command(subcommand)]
    EnrollToken(EnrollTokenCommand),
    /// Enrolled agents.
    #[command(subcommand)]
    Agents(AgentsCommand),
    /// A staff user's access at the branches: end every session, lift a sign-in lockout.
    #[command(subcommand)]
    Staff(StaffCommand),
    /// Admin API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Connector API keys for a site's local systems (kiosks, displays, CRM).
    #[command(subcommand)]
    ConnectorKey(ConnectorKeyCommand),
    /// Central statistics.
    #[command(subcommand)]
    Stats(StatsCommand),
    /// Appointments booked centrally (times are the site's wall clock, YYYY-MM-DDTHH:MM).
    #[command(subcommand)]
    Appointments(AppointmentsCommand),
    /// The distributed-request ledger: cross-site operations, their backlog, who holds a
    /// request.
    #[command(subcommand)]
    Requests(RequestsCommand),
    /// Agent upgrade rollouts: roll a release out to sites in waves, follow, pause, resume,
    /// abort.
    #[command(subcommand)]
    Rollouts(RolloutsCommand),
    /// Signed agent releases: make a signing key, sign a binary, upload it, list releases.
    #[command(subcommand)]
    Release(ReleaseCommand),
}

#[derive(Subcommand)]
enum ReleaseCommand {
    /// Create a release signing key: the private key goes to --out (mode 0600, never
    /// overwritten); the public key line (`ed25519:…`) is printed, for `release_keys` in the
    /// controller's and the agents' settings.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign an agent binary: writes its manifest (version, platform, SHA-256, size, signature).
    /// Offline; keep the private key away from the controller.
    Sign {
        /// The private key file `release keygen` wrote.
        #[arg(long)]
        key: PathBuf,
        /// Semantic version of the binary, e.g. 1.4.0.
        #[arg(long)]
        version: String,
        /// ARCH-OS the binary runs on, e.g. x86_64-linux (default: this machine's).
        #[arg(long)]
        platform: Option<String>,
        #[arg(long)]
        binary: PathBuf,
        /// Release notes (shown to admins; not signed).
        #[arg(long, default_value = "")]
        notes: String,
        /// Write the manifest here (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Upload a signed release: its manifest and the binary it names.
    Upload {
        #[arg(long)]
        manifest: PathBuf,
        #[arg(long)]
        binary: PathBuf,
    },
    /// List releases, newest version first.
    List,
    /// Show a version's releases (every platform, or --platform's).
    Show {
        version: String,
        #[arg(long)]
        platform: Option<String>,
    },
}

#[derive(Subcommand)]
enum RolloutsCommand {
    /// Roll a release out to sites: in waves (one canary site, then the rest, by default),
    /// each site inside its maintenance window (outside its business hours by default).
    Create {
        /// The release's version, e.g. 1.4.0.
        #[arg(long)]
        version: String,
        /// The release's platform, e.g. x86_64-linux.
        #[arg(long)]
        platform: String,
        /// A target site (repeat it, or comma-separate); the order cuts the waves.
        #[arg(long = "site")]
        sites: Vec<String>,
        /// Every site with this tag.
        #[arg(long)]
        tag: Option<String>,
        /// Every site.
        #[arg(long)]
        all: bool,
        /// The waves: sites, percentages and rest, like 1,10%,rest, or a JSON list.
        #[arg(long)]
        waves: Option<String>,
        /// Seconds to wait between the end of a wave and the next.
        #[arg(long)]
        wave_pause: Option<u64>,
        /// More failed or rolled back sites than this halt the rollout (default 0).
        #[arg(long)]
        max_failures: Option<u32>,
        /// HH:MM-HH:MM in each site's time (default: outside the site's business hours).
        #[arg(long)]
        window: Option<String>,
        /// Allow sites to go to a lower version than they run.
        #[arg(long)]
        allow_downgrade: bool,
        /// Seconds a switched agent has to come up healthy before it rolls back.
        #[arg(long)]
        health_timeout: Option<u32>,
    },
    /// List rollouts, newest first.
    List {
        /// running, paused, halted, aborted or completed.
        #[arg(long)]
        state: Option<String>,
        /// At most this many (1-1000, default 100).
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Show one rollout and every site's state.
    Show { id: String },
    /// Stop sending upgrades until resumed (what was sent runs its course).
    Pause { id: String },
    /// Resume a paused rollout.
    Resume { id: String },
    /// Abort a rollout: what has not switched is cancelled.
    Abort {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Subcommand)]
enum RequestsCommand {
    /// List operations, newest first.
    Ops {
        /// queued, pending, retry, applied, failed, superseded, or open (the first three).
        #[arg(long)]
        status: Option<String>,
        /// Source or target site.
        #[arg(long)]
        site: Option<String>,
        #[arg(long)]
        pool: Option<String>,
        /// A request's id or human id.
        #[arg(long)]
        request: Option<String>,
        /// At most this many (1-1000, default 100).
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Show one operation towards one target site.
    Op { op: String, target: String },
    /// Cancel an open operation; an ownership transfer's request goes back to its source.
    Cancel {
        op: String,
        target: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Send an operation again now (one waiting to retry, or a failed copy or delete).
    Retry { op: String, target: String },
    /// Open and retrying operations per lane (pool × target site), with the oldest's age.
    Backlog,
    /// Who holds a request (its id or human id): master site, copies, operations.
    Owner { id: String },
}

#[derive(Subcommand)]
enum AppointmentsCommand {
    /// Book an appointment.
    Book {
        #[arg(long)]
        site: String,
        #[arg(long)]
        service: String,
        /// Start in the site's time zone, e.g. 2026-03-09T09:15.
        #[arg(long)]
        start: String,
        /// The customer's name.
        #[arg(long)]
        customer: String,
        /// Phone number or e-mail address.
        #[arg(long)]
        contact: Option<String>,
        #[arg(long)]
        notes: Option<String>,
        /// Reference of the booking system (unique per site).
        #[arg(long)]
        external_ref: Option<String>,
    },
    /// List appointments by start.
    List {
        #[arg(long)]
        site: Option<String>,
        /// First site-local day (YYYY-MM-DD), inclusive.
        #[arg(long)]
        from: Option<String>,
        /// Last site-local day (YYYY-MM-DD), inclusive.
        #[arg(long)]
        to: Option<String>,
        /// booked or cancelled.
        #[arg(long)]
        status: Option<String>,
        /// Only appointments flagged with a conflict (a central change met an arrival at the
        /// branch).
        #[arg(long)]
        conflict: bool,
    },
    /// Show one appointment.
    Show { id: String },
    /// Send a site's appointments of today and the coming days to its agent now (what the
    /// nightly job does at the site's sync time).
    Sync { site: String },
    /// Bulk syncs, newest first, with their state (requested, sending, completed, failed,
    /// superseded).
    Syncs {
        #[arg(long)]
        site: Option<String>,
    },
    /// A service's slots on one day, with what each has left.
    Slots {
        #[arg(long)]
        site: String,
        #[arg(long)]
        service: String,
        /// Site-local day (YYYY-MM-DD).
        #[arg(long)]
        date: String,
    },
    /// Move an appointment to another slot of its service.
    Reschedule {
        id: String,
        /// New start in the site's time zone.
        #[arg(long)]
        start: String,
        /// Refuse if the appointment is no longer at this revision (default: its current one).
        #[arg(long)]
        revision: Option<u64>,
    },
    /// Cancel an appointment.
    Cancel {
        id: String,
        #[arg(long)]
        reason: Option<String>,
        /// Refuse if the appointment is no longer at this revision.
        #[arg(long)]
        revision: Option<u64>,
    },
}

#[derive(Subcommand)]
enum StatsCommand {
    /// Visits, outcomes, waiting and service times, service level.
    Visits {
        /// site, service, queue, counter, staff, all or day.
        #[arg(long, default_value = "site")]
        group_by: String,
        /// 15m, hour, day or week, in each site's local time.
        #[arg(long)]
        interval: Option<String>,
        #[arg(long)]
        site: Option<String>,
        #[arg(long)]
        service: Option<String>,
        /// First business day (YYYY-MM-DD), inclusive.
        #[arg(long)]
        from: Option<String>,
        /// Last business day (YYYY-MM-DD), inclusive.
        #[arg(long)]
        to: Option<String>,
    },
}

#[derive(Subcommand)]
enum ConnectorKeyCommand {
    /// Create a key; its secret is printed once (only its hash is kept and synced).
    Create {
        #[arg(long)]
        site: String,
        /// The key's code, e.g. `kiosk-1`.
        code: String,
        /// A description, e.g. "Entrance kiosk".
        #[arg(long)]
        name: String,
    },
    /// List keys (never their secrets).
    List {
        #[arg(long)]
        site: Option<String>,
    },
}

#[derive(Args)]
struct DeleteArgs {
    /// site, service, queue, service-point, work-profile or staff-user.
    #[arg(required_unless_present = "file", conflicts_with = "file", requires = "code")]
    kind: Option<String>,
    /// The resource's code (the username for a staff user).
    code: Option<String>,
    /// The site of a site-scoped resource.
    #[arg(long)]
    site: Option<String>,
    /// Delete every resource named in this YAML file (`-` for standard input).
    #[arg(short = 'f', long = "filename")]
    file: Option<PathBuf>,
    /// Report what would change without storing anything.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Subcommand)]
enum EnrollTokenCommand {
    /// Create a one-time enrollment token for a site.
    Create {
        #[arg(long)]
        site: String,
        /// Lifetime, e.g. 30m, 12h, 7d (the controller's default is 24h, its maximum 30d).
        #[arg(long)]
        ttl: Option<String>,
    },
    /// List enrollment tokens.
    List {
        #[arg(long)]
        site: Option<String>,
    },
}

#[derive(Subcommand)]
enum AgentsCommand {
    /// List agents.
    List {
        #[arg(long)]
        site: Option<String>,
    },
    /// Revoke an agent (its full id or a unique prefix).
    Revoke { id: String },
}

#[derive(Subcommand)]
enum StaffCommand {
    /// End every session the user holds at any branch (when the configuration reaches it).
    SignOutEverywhere { username: String },
    /// Lift the user's sign-in lockout at every branch.
    Unlock { username: String },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create an admin API token; its secret is printed once.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = ["admin", "viewer"])]
        role: String,
    },
    /// List admin API tokens.
    List,
    /// Delete an admin API token.
    Delete { id: String },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn appointments(
    client: &Client,
    cmd: AppointmentsCommand,
    out: Output,
) -> ctl::Result<String> {
    use meridian_controller::appointments::{BookRequest, CancelRequest};
    use meridian_controller::ctl::appointments as appt;
    match cmd {
        AppointmentsCommand::Book {
            site,
            service,
            start,
            customer,
            contact,
            notes,
            external_ref,
        } => {
            let req = BookRequest {
                site,
                service,
                start,
                customer_name: customer,
                customer_contact: contact,
                notes,
                external_ref,
            };
            appt::render_one(&appt::book(client, &req).await?, out)
        }
        AppointmentsCommand::List { site, from, to, status, conflict } => {
            let filter = appt::ListFilter {
                site: site.as_deref(),
                from: from.as_deref(),
                to: to.as_deref(),
                status: status.as_deref(),
                conflict,
            };
            appt::render_list(&appt::list(client, &filter).await?, out)
        }
        AppointmentsCommand::Show { id } => appt::render_one(&appt::show(client, &id).await?, out),
        AppointmentsCommand::Sync { site } => {
            appt::render_syncs(&appt::request_sync(client, &site).await?, out)
        }
        AppointmentsCommand::Syncs { site } => {
            appt::render_syncs(&appt::syncs(client, site.as_deref()).await?, out)
        }
        AppointmentsCommand::Slots { site, service, date } => {
            appt::render_slots(&appt::slots(client, &site, &service, &date).await?, out)
        }
        AppointmentsCommand::Reschedule { id, start, revision } => {
            appt::render_one(&appt::reschedule(client, &id, &start, revision).await?, out)
        }
        AppointmentsCommand::Cancel { id, reason, revision } => {
            let req = CancelRequest { expected_revision: revision, reason };
            appt::render_one(&appt::cancel(client, &id, &req).await?, out)
        }
    }
}

async fn requests(client: &Client, cmd: RequestsCommand, out: Output) -> ctl::Result<String> {
    use meridian_controller::ctl::requests as req;
    let now = chrono::Utc::now();
    match cmd {
        RequestsCommand::Ops { status, site, pool, request, limit } => {
            let filter = req::OpsFilter {
                status: status.as_deref(),
                site: site.as_deref(),
                pool: pool.as_deref(),
                request: request.as_deref(),
                limit,
            };
            req::render_ops(&req::ops(client, &filter).await?, out, now)
        }
        RequestsCommand::Op { op, target } => {
            req::render_op(&req::op(client, &op, &target).await?, out, now)
        }
        RequestsCommand::Cancel { op, target, reason } => {
            req::render_op(&req::cancel(client, &op, &target, reason.as_deref()).await?, out, now)
        }
        RequestsCommand::Retry { op, target } => {
            req::render_op(&req::retry(client, &op, &target).await?, out, now)
        }
        RequestsCommand::Backlog => req::render_backlog(&req::backlog(client).await?, out),
        RequestsCommand::Owner { id } => {
            req::render_owner(&req::owner(client, &id).await?, out, now)
        }
    }
}

/// `release keygen` and `release sign` work offline (`client` is `None` for them); the other
/// release commands need the API.
async fn release(client: Option<&Client>, cmd: ReleaseCommand, out: Output) -> ctl::Result<String> {
    use meridian_controller::ctl::releases as rel;
    let api = || client.ok_or_else(|| ctl::CtlError::Usage("this command needs --server".into()));
    match cmd {
        ReleaseCommand::Keygen { out: path } => {
            let key = rel::keygen(&path)?;
            eprintln!(
                "private key {} written to {} (keep it secret, away from the controller)",
                key.key_id,
                path.display()
            );
            Ok(format!("{}\n", key.public))
        }
        ReleaseCommand::Sign { key, version, platform, binary, notes, out: manifest_out } => {
            let platform = platform.unwrap_or_else(meridian_shared::releases::current_platform);
            let manifest = rel::sign(rel::SignArgs {
                key: &key,
                version: &version,
                platform: &platform,
                binary: &binary,
                notes: &notes,
            })?;
            let json = rel::manifest_json(&manifest)?;
            match manifest_out {
                None => Ok(json),
                Some(path) => {
                    std::fs::write(&path, json).map_err(|source| ctl::CtlError::Io {
                        path: path.display().to_string(),
                        source,
                    })?;
                    Ok(rel::render_signed(&manifest, &path))
                }
            }
        }
        ReleaseCommand::Upload { manifest, binary } => {
            rel::render_uploaded(&rel::upload(api()?, &manifest, &binary).await?, out)
        }
        ReleaseCommand::List => rel::render_list(&rel::list(api()?).await?, out),
        ReleaseCommand::Show { version, platform } => {
            rel::render_show(&rel::show(api()?, &version, platform.as_deref()).await?, out)
        }
    }
}

async fn rollouts(client: &Client, cmd: RolloutsCommand, out: Output) -> ctl::Result<String> {
    use meridian_controller::ctl::rollouts as ro;
    match cmd {
        RolloutsCommand::Create {
            version,
            platform,
            sites,
            tag,
            all,
            waves,
            wave_pause,
            max_failures,
            window,
            allow_downgrade,
            health_timeout,
        } => {
            let body = ro::create_body(&ro::CreateArgs {
                version: &version,
                platform: &platform,
                sites: &sites,
                tag: tag.as_deref(),
                all,
                waves: waves.as_deref(),
                wave_pause_s: wave_pause,
                max_failures,
                window: window.as_deref(),
                allow_downgrade,
                health_timeout_s: health_timeout,
            })?;
            ro::render_one(&ro::create(client, &body).await?, out)
        }
        RolloutsCommand::List { state, limit } => ro::render_list(
            &ro::list(client, state.as_deref(), limit).await?,
            out,
            chrono::Utc::now(),
        ),
        RolloutsCommand::Show { id } => ro::render_one(&ro::show(client, &id).await?, out),
        RolloutsCommand::Pause { id } => ro::render_one(&ro::pause(client, &id).await?, out),
        RolloutsCommand::Resume { id } => ro::render_one(&ro::resume(client, &id).await?, out),
        RolloutsCommand::Abort { id, reason } => {
            ro::render_one(&ro::abort(client, &id, reason.as_deref()).await?, out)
        }
    }
}

async fn run(cli: Cli) -> ctl::Result<String> {
    let command = match cli.command {
        // Offline: no server or token needed.
        Command::Release(cmd @ (ReleaseCommand::Keygen { .. } | ReleaseCommand::Sign { .. })) => {
            return release(None, cmd, cli.output).await;
        }
        other => other,
    };
    let token = match &cli.token_file {
        Some(path) => Some(ctl::read_token_file(path)?),
        None => cli.token,
    };
    let client = Client::new(&cli.server, token)?;
    let out = cli.output;
    let list = |what: Listing, site: Option<String>| {
        let client = client.clone();
        async move {
            let items = ctl::list(&client, what, site.as_deref()).await?;
            ctl::render_list(what, &items, out, chrono::Utc::now())
        }
    };
    match command {
        Command::Get { what, site } => list(what, site).await,
        Command::Apply { file, dry_run } => {
            let text = ctl::read_manifest(&file)?;
            ctl::render_report(&ctl::apply(&client, &text, dry_run).await?, out)
        }
        Command::Delete(DeleteArgs { file: Some(file), dry_run, .. }) => {
            let text = ctl::read_manifest(&file)?;
            ctl::render_report(&ctl::delete_manifest(&client, &text, dry_run).await?, out)
        }
        Command::Delete(DeleteArgs { kind, code, site, dry_run, file: None }) => {
            let key = ctl::key_from_args(
                kind.as_deref().unwrap_or_default(),
                code.as_deref().unwrap_or_default(),
                site.as_deref(),
            )?;
            ctl::render_report(&ctl::delete(&client, &[key], dry_run).await?, out)
        }
        Command::EnrollToken(EnrollTokenCommand::Create { site, ttl }) => {
            let token = ctl::create_enrollment_token(&client, &site, ttl.as_deref()).await?;
            ctl::render_enrollment_token(&token, out)
        }
        Command::EnrollToken(EnrollTokenCommand::List { site }) => {
            list(Listing::EnrollmentTokens, site).await
        }
        Command::Agents(AgentsCommand::List { site }) => list(Listing::Agents, site).await,
        Command::Agents(AgentsCommand::Revoke { id }) => {
            ctl::render_agent(&ctl::revoke_agent(&client, &id).await?, out)
        }
        Command::Staff(command) => {
            let (username, action) = match &command {
                StaffCommand::SignOutEverywhere { username } => (username, "sign-out-everywhere"),
                StaffCommand::Unlock { username } => (username, "unlock"),
            };
            let changed = ctl::staff_access(&client, username, action).await?;
            ctl::render_staff_access(&changed, out)
        }
        Command::Token(TokenCommand::Create { name, role }) => {
            ctl::render_api_token(&ctl::create_api_token(&client, &name, &role).await?, out)
        }
        Command::Token(TokenCommand::List) => list(Listing::ApiTokens, None).await,
        Command::ConnectorKey(ConnectorKeyCommand::Create { site, code, name }) => {
            let created = ctl::create_connector_key(&client, &site, &code, &name).await?;
            Ok(format!(
                "connector key {code} created for {site}\nsecret: {}\n(shown only now; give it to the local system as `Authorization: Bearer <secret>`)\n",
                created.get("secret").and_then(|s| s.as_str()).unwrap_or_default()
            ))
        }
        Command::ConnectorKey(ConnectorKeyCommand::List { site }) => {
            list(Listing::ConnectorKeys, site).await
        }
        Command::Stats(StatsCommand::Visits { group_by, interval, site, service, from, to }) => {
            let filter = ctl::StatsFilter {
                group_by: &group_by,
                interval: interval.as_deref(),
                site: site.as_deref(),
                service: service.as_deref(),
                from: from.as_deref(),
                to: to.as_deref(),
            };
            let rows = ctl::visit_stats(&client, &filter).await?;
            ctl::render_stats(&rows, out)
        }
        Command::Appointments(cmd) => appointments(&client, cmd, out).await,
        Command::Requests(cmd) => requests(&client, cmd, out).await,
        Command::Rollouts(cmd) => rollouts(&client, cmd, out).await,
        Command::Release(cmd) => release(Some(&client), cmd, out).await,
        Command::Token(TokenCommand::Delete { id }) => {
            ctl::delete_api_token(&client, &id).await?;
            Ok(format!("API token {id} deleted\n"))
        }
    }
}
