//! `berth user` and `berth key` on the data directory (server stopped): how the first admin is
//! created, since berth has no default password.

use serde_json::Value;

use super::err;
use crate::api::users::{key_json, user_json};
use crate::auth::users::Users;
use crate::auth::Role;
use crate::store::meta::Meta;

fn users(meta: &Meta) -> Result<Users, String> {
    Users::open(meta).map_err(err)
}

/// Creates a user; returns its JSON (the API's shape).
pub fn create_user(
    meta: &Meta,
    name: &str,
    role: Role,
    registries: Vec<String>,
) -> Result<Value, String> {
    for r in &registries {
        crate::oci::reference::validate_registry_name(r).map_err(err)?;
    }
    let users = users(meta)?;
    let user = users.create(name, role, registries).map_err(err)?;
    meta.flush_blocking().map_err(err)?;
    user_json(&users, &user).map_err(err)
}

/// Every user.
pub fn list_users(meta: &Meta) -> Result<Vec<Value>, String> {
    let users = users(meta)?;
    users
        .list()
        .map_err(err)?
        .iter()
        .map(|u| user_json(&users, u).map_err(err))
        .collect()
}

/// Deletes a user and their keys (never the last admin of every registry).
pub fn delete_user(meta: &Meta, name: &str) -> Result<(), String> {
    users(meta)?.delete(name).map_err(err)?;
    meta.flush_blocking().map_err(err)
}

/// Creates an access key; the JSON carries the secret, shown this once.
pub fn create_key(meta: &Meta, user: &str) -> Result<Value, String> {
    let (key, secret) = users(meta)?.create_key(user).map_err(err)?;
    meta.flush_blocking().map_err(err)?;
    let mut v = key_json(&key);
    v["secret"] = secret.into();
    Ok(v)
}

/// A user's keys (never their secrets).
pub fn list_keys(meta: &Meta, user: &str) -> Result<Vec<Value>, String> {
    let users = users(meta)?;
    users.get(user).map_err(err)?;
    Ok(users
        .keys_of(user)
        .map_err(err)?
        .iter()
        .map(key_json)
        .collect())
}

/// Revokes a key.
pub fn revoke_key(meta: &Meta, user: &str, id: &str) -> Result<(), String> {
    users(meta)?.revoke_key(user, id).map_err(err)?;
    meta.flush_blocking().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_admin_and_keys_on_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Meta::open(dir.path()).unwrap();
        let root = create_user(&meta, "root", Role::Admin, vec![]).unwrap();
        assert_eq!(root["role"], "admin");
        assert!(create_user(&meta, "root", Role::Viewer, vec![]).is_err());
        assert!(create_user(&meta, "ci", Role::Viewer, vec!["Bad Reg".into()]).is_err());
        let key = create_key(&meta, "root").unwrap();
        let (id, secret) = (key["id"].as_str().unwrap(), key["secret"].as_str().unwrap());
        let listed = list_keys(&meta, "root").unwrap();
        assert_eq!(listed.len(), 1);
        assert!(!serde_json::to_string(&listed).unwrap().contains(secret));
        assert_eq!(
            users(&meta).unwrap().verify(id, secret).unwrap().name,
            "root"
        );
        revoke_key(&meta, "root", id).unwrap();
        assert!(list_keys(&meta, "root").unwrap().is_empty());
        assert!(delete_user(&meta, "root")
            .unwrap_err()
            .contains("last admin"));
        assert!(list_keys(&meta, "nobody").is_err());
    }
}
