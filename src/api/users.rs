//! Users and their access keys: `/api/v1/users[/{name}[/keys[/{id}]]]`. Secrets are shown once,
//! in the answer that creates a key.

use http::{Response, StatusCode};
use serde::Deserialize;

use super::page::{matches_q, Page};
use super::{blocking, json, rfc3339, Ctx};
use crate::auth::users::{KeyRecord, UserRecord, Users};
use crate::auth::{Action, Role};
use crate::error::Result;
use crate::http::body::Body;

/// The JSON of a user (keys counted, never shown here).
pub fn user_json(users: &Users, u: &UserRecord) -> Result<serde_json::Value> {
    Ok(serde_json::json!({
        "name": u.name,
        "role": u.role,
        "registries": u.registries,
        "created": rfc3339(u.created_ms),
        "key_count": users.keys_of(&u.name)?.len(),
    }))
}

/// The JSON of an access key: id, age and whether it is due for rotation; never the secret.
pub fn key_json(k: &KeyRecord) -> serde_json::Value {
    serde_json::json!({
        "id": k.id,
        "user": k.user,
        "created": rfc3339(k.created_ms),
        "age_days": k.age().as_secs() / 86_400,
        "rotation_due": k.is_old(),
    })
}

fn check_registries(registries: &[String]) -> Result<()> {
    for r in registries {
        crate::oci::reference::validate_registry_name(r)?;
    }
    Ok(())
}

/// `GET /api/v1/users?q=`.
pub fn list(ctx: &Ctx<'_>) -> Result<Response<Body>> {
    ctx.check(Action::Manage(None))?;
    let q = ctx.query("q");
    let users = &ctx.app.auth.users;
    let all: Vec<UserRecord> = users
        .list()?
        .into_iter()
        .filter(|u| matches_q(&q, &u.name))
        .collect();
    Page::of(ctx)?.respond(ctx, all, |u| user_json(users, &u))
}

/// Body of `POST /api/v1/users`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    /// Login name.
    pub name: String,
    /// admin, viewer or image_uploader.
    pub role: Role,
    /// Registries the role covers; empty or absent: all.
    #[serde(default)]
    pub registries: Vec<String>,
}

/// `POST /api/v1/users`.
pub async fn create(ctx: &Ctx<'_>, body: NewUser) -> Result<Response<Body>> {
    ctx.check(Action::Manage(None))?;
    check_registries(&body.registries)?;
    let auth = &ctx.app.auth;
    let user = auth.users.create(&body.name, body.role, body.registries)?;
    auth.refresh()?;
    ctx.app.store.meta.flush().await?;
    json(StatusCode::CREATED, &user_json(&auth.users, &user)?)
}

/// `GET /api/v1/users/{name}`, with the user's keys.
pub fn get(ctx: &Ctx<'_>, name: &str) -> Result<Response<Body>> {
    ctx.check(Action::Manage(None))?;
    let users = &ctx.app.auth.users;
    let mut v = user_json(users, &users.get(name)?)?;
    v["keys"] = users.keys_of(name)?.iter().map(key_json).collect();
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
    let current = users.get(name)?;
    let registries = body.registries.unwrap_or(current.registries);
    check_registries(&registries)?;
    let user = users.update(name, body.role.unwrap_or(current.role), registries)?;
    ctx.app.store.meta.flush().await?;
    json(StatusCode::OK, &user_json(users, &user)?)
}

/// `DELETE /api/v1/users/{name}` and their keys; the last admin of every registry stays (409).
pub async fn delete(ctx: &Ctx<'_>, name: &str) -> Result<Response<Body>> {
    ctx.check(Action::Manage(None))?;
    let auth = &ctx.app.auth;
    auth.users.delete(name)?;
    auth.refresh()?;
    ctx.app.store.meta.flush().await?;
    json(StatusCode::OK, &serde_json::json!({ "name": name }))
}

/// `GET /api/v1/users/{name}/keys`.
pub fn keys(ctx: &Ctx<'_>, name: &str) -> Result<Response<Body>> {
    ctx.check(Action::Manage(None))?;
    let users = &ctx.app.auth.users;
    users.get(name)?;
    let keys = users.keys_of(name)?;
    Page::of(ctx)?.respond(ctx, keys, |k| Ok(key_json(&k)))
}

/// `POST /api/v1/users/{name}/keys`: `{"id","secret"}`, the only time the secret is shown.
pub async fn create_key(ctx: &Ctx<'_>, name: &str) -> Result<Response<Body>> {
    ctx.check(Action::Manage(None))?;
    let app = ctx.app.clone();
    let user = name.to_string();
    // argon2 hashing takes tens of milliseconds: keep it off the async workers.
    let (key, secret) = blocking(move || Ok(app.auth.users.create_key(&user)?)).await?;
    ctx.app.store.meta.flush().await?;
    let mut v = key_json(&key);
    v["secret"] = secret.into();
    json(StatusCode::CREATED, &v)
}

/// `DELETE /api/v1/users/{name}/keys/{id}`.
pub async fn revoke_key(ctx: &Ctx<'_>, name: &str, id: &str) -> Result<Response<Body>> {
    ctx.check(Action::Manage(None))?;
    ctx.app.auth.users.revoke_key(name, id)?;
    ctx.app.store.meta.flush().await?;
    json(
        StatusCode::OK,
        &serde_json::json!({ "id": id, "user": name }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_show_age_and_rotation_never_the_secret() {
        let day = 86_400_000;
        let k = KeyRecord {
            id: "BKX".into(),
            user: "u".into(),
            secret_hash: "$argon2id$hash".into(),
            created_ms: crate::store::meta::now_ms() - 91 * day,
        };
        let v = key_json(&k);
        assert_eq!(v["age_days"], 91);
        assert_eq!(v["rotation_due"], true);
        assert!(!v.to_string().contains("argon2"));
        let fresh = KeyRecord {
            created_ms: crate::store::meta::now_ms() - 89 * day,
            ..k
        };
        assert_eq!(key_json(&fresh)["rotation_due"], false);
    }
}
