//! Users and their access keys: `/api/v1/users[/{name}[/keys[/{id}]]]`. Secrets are shown once,
//! in the answer that creates a key.

use http::{Response, StatusCode};
use serde::Deserialize;

use super::page::{matches_q, Page};
use super::views::{KeyRevoked, KeyView, UserDeleted, UserView};
use super::{json, Ctx};
use crate::auth::users::{UserRecord, Users};
use crate::auth::{Action, Principal, Role};
use crate::config::AuthMode;
use crate::error::{Error, Result};
use crate::http::body::Body;

/// The view of a user (keys counted, not listed).
pub async fn user_view(users: &Users, u: &UserRecord) -> Result<UserView> {
    Ok(UserView::of(u, users.keys_of(&u.name).await?.len()))
}

fn check_registries(registries: &[String]) -> Result<()> {
    for r in registries {
        crate::oci::reference::validate_registry_name(r)?;
    }
    Ok(())
}

/// `GET /api/v1/users?q=`.
pub async fn list(ctx: &Ctx<'_>) -> Result<Response<Body>> {
    ctx.check(Action::Manage(None))?;
    let q = ctx.query("q");
    let users = &ctx.app.auth.users;
    let all: Vec<UserRecord> = users
        .list()
        .await?
        .into_iter()
        .filter(|u| matches_q(&q, &u.name))
        .collect();
    let page = Page::of(ctx)?;
    let (total, all) = page.slice(all);
    let mut shown = Vec::with_capacity(all.len());
    for u in all {
        shown.push(user_view(users, &u).await?);
    }
    page.envelope(ctx, total, shown)
}

pub use super::views::NewUser;

/// `POST /api/v1/users`.
pub async fn create(ctx: &Ctx<'_>, body: NewUser) -> Result<Response<Body>> {
    ctx.check(Action::Manage(None))?;
    check_registries(&body.registries)?;
    let auth = &ctx.app.auth;
    // Bootstrap through a running server: auth turns on with the first user, so a remote
    // caller creating it could not create its key afterwards. The first user must be an admin
    // of everything (else nobody could manage the server) and comes with its first key.
    let first = ctx.app.config.auth.mode == AuthMode::Auto
        && !auth.enforced()
        && matches!(ctx.req.principal, Principal::Anonymous);
    if first && (body.role != Role::Admin || !body.registries.is_empty()) {
        return Err(Error::Conflict(
            "the first user of a server must be an admin of every registry (`berth user create NAME --admin`): auth turns on with it, and nobody could manage the server otherwise".into(),
        ));
    }
    let user = auth
        .users
        .create(&body.name, body.role, body.registries)
        .await?;
    let first_key = if first {
        let (key, secret) = auth.users.create_key(&user.name).await?;
        let mut v = KeyView::of(&key);
        v.secret = Some(secret);
        Some(v)
    } else {
        None
    };
    ctx.app.store.meta.flush().await?;
    let mut view = user_view(&auth.users, &user).await?;
    view.first_key = first_key;
    json(StatusCode::CREATED, &view)
}

/// `GET /api/v1/users/{name}`, with the user's keys.
pub async fn get(ctx: &Ctx<'_>, name: &str) -> Result<Response<Body>> {
    ctx.check(Action::Manage(None))?;
    let users = &ctx.app.auth.users;
    let keys: Vec<KeyView> = users.keys_of(name).await?.iter().map(KeyView::of).collect();
    let mut v = UserView::of(&users.get(name).await?, keys.len());
    v.keys = Some(keys);
    json(StatusCode::OK, &v)
}

/// Body of `PATCH /api/v1/users/{name}`: only the fields given change.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserPatch {
    /// New role.
    pub role: Option<Role>,
    /// New registries (empty: all).
    pub registries: Option<Vec<String>>,
}

/// `PATCH /api/v1/users/{name}`; the last admin of every registry cannot be demoted (409).
pub async fn patch(ctx: &Ctx<'_>, name: &str, body: UserPatch) -> Result<Response<Body>> {
    ctx.check(Action::Manage(None))?;
    let users = &ctx.app.auth.users;
    let current = users.get(name).await?;
    let registries = body.registries.unwrap_or(current.registries);
    check_registries(&registries)?;
    let user = users
        .update(name, body.role.unwrap_or(current.role), registries)
        .await?;
    ctx.app.store.meta.flush().await?;
    json(StatusCode::OK, &user_view(users, &user).await?)
}

/// `DELETE /api/v1/users/{name}` and their keys; the last admin of every registry stays (409).
pub async fn delete(ctx: &Ctx<'_>, name: &str) -> Result<Response<Body>> {
    ctx.check(Action::Manage(None))?;
    let auth = &ctx.app.auth;
    auth.users.delete(name).await?;
    ctx.app.store.meta.flush().await?;
    json(
        StatusCode::OK,
        &UserDeleted {
            name: name.to_string(),
        },
    )
}

/// `GET /api/v1/users/{name}/keys`.
pub async fn keys(ctx: &Ctx<'_>, name: &str) -> Result<Response<Body>> {
    ctx.check(Action::Manage(None))?;
    let users = &ctx.app.auth.users;
    users.get(name).await?;
    let keys = users.keys_of(name).await?;
    Page::of(ctx)?.respond(ctx, keys, |k| Ok(KeyView::of(&k)))
}

/// `POST /api/v1/users/{name}/keys`: `{"id","secret"}`, the only time the secret is shown.
pub async fn create_key(ctx: &Ctx<'_>, name: &str) -> Result<Response<Body>> {
    ctx.check(Action::Manage(None))?;
    // argon2 hashing takes tens of milliseconds: `create_key` does it on the blocking pool.
    let (key, secret) = ctx.app.auth.users.create_key(name).await?;
    ctx.app.store.meta.flush().await?;
    let mut v = KeyView::of(&key);
    v.secret = Some(secret);
    json(StatusCode::CREATED, &v)
}

/// `DELETE /api/v1/users/{name}/keys/{id}`.
pub async fn revoke_key(ctx: &Ctx<'_>, name: &str, id: &str) -> Result<Response<Body>> {
    ctx.check(Action::Manage(None))?;
    ctx.app.auth.users.revoke_key(name, id).await?;
    ctx.app.store.meta.flush().await?;
    json(
        StatusCode::OK,
        &KeyRevoked {
            id: id.to_string(),
            user: name.to_string(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::users::KeyRecord;

    #[test]
    fn keys_show_age_and_rotation_never_the_secret() {
        let day = 86_400_000;
        let k = KeyRecord {
            id: "BKX".into(),
            user: "u".into(),
            secret_hash: "$argon2id$hash".into(),
            created_ms: crate::store::meta::now_ms() - 91 * day,
        };
        let v = KeyView::of(&k);
        assert_eq!(v.age_days, 91);
        assert!(v.rotation_due);
        assert!(!serde_json::to_string(&v).unwrap().contains("argon2"));
        let fresh = KeyRecord {
            created_ms: crate::store::meta::now_ms() - 89 * day,
            ..k
        };
        assert!(!KeyView::of(&fresh).rotation_due);
    }
}
