//! Central actions on a staff user's access at the branches (admin tokens; the router's
//! authentication refuses a viewer's `POST` with 403). Each raises an epoch in the user's
//! configuration, committed as a configuration revision like any edit (so it is in the
//! revision history with who did it), and reaches every site of the user with it:
//!
//! - `POST /staff/{username}/sign-out-everywhere` — every session the user holds at any branch
//!   ends when the configuration reaches it (the sessions are bound to the epoch).
//! - `POST /staff/{username}/unlock` — lifts a sign-in lockout of the user at every branch.
//!
//! Both answer 200 with `{username, sessions_epoch, unlock_epoch, revision, sites_published}`,
//! 404 for an unknown user.

use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Extension, Json, Router};
use meridian_shared::config::{Resource, ResourceKey, ResourceKind, StaffUser};
use serde::Serialize;

use super::error::ApiResult;
use super::resources::notify;
use super::{ApiState, Caller};
use crate::config_admin::{self, ChangeMode};
use crate::error::Error;

/// The operations of this part of the API, relative to `/api/v1`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(sign_out_everywhere, unlock))]
pub(super) struct Doc;

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/staff/{username}/sign-out-everywhere", post(sign_out_everywhere))
        .route("/staff/{username}/unlock", post(unlock))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AccessChanged {
    pub username: String,
    pub sessions_epoch: u32,
    pub unlock_epoch: u32,
    pub revision: u64,
    pub sites_published: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
enum Action {
    SignOut,
    Unlock,
}

#[utoipa::path(post, path = "/staff/{username}/sign-out-everywhere", tag = "configuration",
    summary = "End every session the staff user holds at any branch",
    params(("username" = String, Path)),
    responses((status = 200, description = "the new epochs and the revision", body = AccessChanged)))]
async fn sign_out_everywhere(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    Path(username): Path<String>,
) -> ApiResult<Json<AccessChanged>> {
    raise(&s, &c, &username, Action::SignOut).await
}

#[utoipa::path(post, path = "/staff/{username}/unlock", tag = "configuration",
    summary = "Lift a sign-in lockout of the staff user at every branch",
    params(("username" = String, Path)),
    responses((status = 200, description = "the new epochs and the revision", body = AccessChanged)))]
async fn unlock(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    Path(username): Path<String>,
) -> ApiResult<Json<AccessChanged>> {
    raise(&s, &c, &username, Action::Unlock).await
}

async fn raise(
    state: &ApiState,
    caller: &Caller,
    username: &str,
    action: Action,
) -> ApiResult<Json<AccessChanged>> {
    let key = ResourceKey { kind: ResourceKind::StaffUser, site: None, code: username.to_owned() };
    let raised = |current: &meridian_shared::config::ConfigSet| -> crate::error::Result<StaffUser> {
        let Some(Resource::StaffUser(user)) = current.get(&key) else {
            return Err(Error::NotFound(format!("staff user {username:?}")));
        };
        let mut user = user.clone();
        match action {
            Action::SignOut => user.sessions_epoch = user.sessions_epoch.saturating_add(1),
            Action::Unlock => user.unlock_epoch = user.unlock_epoch.saturating_add(1),
        }
        Ok(user)
    };
    let report = config_admin::change_with(
        state.store.as_ref(),
        &caller.token_name,
        ChangeMode::Upsert,
        |current| Ok((vec![Resource::StaffUser(raised(current)?)], vec![])),
    )
    .await?;
    notify(state, &report);
    let (_, resources) = state.store.load_config().await?;
    let set = meridian_shared::config::ConfigSet::from_resources(resources);
    let Some(Resource::StaffUser(user)) = set.get(&key) else {
        return Err(Error::NotFound(format!("staff user {username:?}")).into());
    };
    tracing::info!(actor = %caller.token_name, username = %username, action = ?action, revision = report.revision, "staff access changed centrally");
    Ok(Json(AccessChanged {
        username: username.to_owned(),
        sessions_epoch: user.sessions_epoch,
        unlock_epoch: user.unlock_epoch,
        revision: report.revision,
        sites_published: report.sites_published,
    }))
}
