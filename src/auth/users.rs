//! Users and their access keys: records in sled, secrets kept only as argon2 hashes.

use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use serde::{Deserialize, Serialize};

use super::Role;
use crate::store::meta::{now_ms, Change, MetaError, MetaStore, Records};

/// The tree of users.
const USERS: &str = "users";
/// The tree of access keys.
const KEYS: &str = "access_keys";

/// Users by name.
type UserMap = Arc<parking_lot::RwLock<std::collections::HashMap<String, Arc<UserRecord>>>>;

/// At most this many access keys per user (DESIGN.md 1).
pub const MAX_KEYS_PER_USER: usize = 5;

/// Keys older than this are flagged in listings.
pub const KEY_ROTATION_AGE: Duration = Duration::from_secs(90 * 24 * 3600);

/// A user.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserRecord {
    /// Login name.
    pub name: String,
    /// What the user may do.
    pub role: Role,
    /// Registries the role applies to; empty means all.
    #[serde(default)]
    pub registries: Vec<String>,
    /// Creation time, Unix ms.
    pub created_ms: u64,
}

impl UserRecord {
    /// Whether the user's role covers `registry`.
    pub fn covers(&self, registry: &str) -> bool {
        self.registries.is_empty() || self.registries.iter().any(|r| r == registry)
    }
}

/// An access key: an id and an argon2 hash of its secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Access Key ID (public, the login name of `docker login`).
    pub id: String,
    /// Owner.
    pub user: String,
    /// argon2 PHC string of the secret.
    pub secret_hash: String,
    /// Creation time, Unix ms.
    pub created_ms: u64,
}

impl KeyRecord {
    /// Age of the key.
    pub fn age(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.created_ms))
    }

    /// Whether the key is due for rotation.
    pub fn is_old(&self) -> bool {
        self.age() > KEY_ROTATION_AGE
    }
}

/// A failure to manage users or keys.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// Name breaks the grammar.
    #[error("invalid user name {0:?}: use 1-64 lowercase letters, digits, '-', '_' or '.'")]
    InvalidName(String),
    /// User exists already.
    #[error("user {0:?} already exists")]
    Exists(String),
    /// No such user.
    #[error("user {0:?} does not exist")]
    UnknownUser(String),
    /// No such key for that user.
    #[error("user {user:?} has no access key {id:?}")]
    UnknownKey {
        /// The user.
        user: String,
        /// The key asked for.
        id: String,
    },
    /// Key limit reached.
    #[error("user {0:?} already has {MAX_KEYS_PER_USER} access keys (revoke one first)")]
    TooManyKeys(String),
    /// Would leave the registry without an administrator.
    #[error(
        "user {0:?} is the last admin with access to every registry; create another admin first"
    )]
    LastAdmin(String),
    /// Metadata failure.
    #[error("metadata error: {0}")]
    Meta(#[from] crate::store::meta::MetaError),
    /// Hashing failure.
    #[error("cannot hash secret: {0}")]
    Hash(String),
}

/// Why a presented key was not accepted (the client only ever learns "unauthorized").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginFailure {
    /// No key with that id.
    UnknownKey,
    /// Secret does not match.
    WrongSecret,
    /// The key's user is gone.
    UnknownUser,
}

/// Users and keys of one data directory.
pub struct Users {
    users: Records<UserRecord>,
    keys: Records<KeyRecord>,
    /// Every user by name: a copy that follows the user records through the metadata's change
    /// notifications, whoever changes them (a token names its user on every management
    /// request, and authorization does not wait for storage).
    by_name: UserMap,
    /// Recently verified (key id, SHA-256 of secret) → user: argon2 costs tens of ms, and
    /// clients that send Basic credentials do so on every request.
    verified: moka::sync::Cache<(String, [u8; 32]), Arc<UserRecord>>,
}

fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
        })
}

/// `n` random characters from `alphabet`.
fn random_text(alphabet: &[u8], n: usize) -> String {
    let mut out = String::with_capacity(n);
    let mut buf = [0u8; 64];
    while out.len() < n {
        OsRng.fill_bytes(&mut buf);
        for b in buf {
            // Rejection sampling keeps every character equally likely.
            let limit = 256 - (256 % alphabet.len());
            if (b as usize) < limit && out.len() < n {
                out.push(alphabet[b as usize % alphabet.len()] as char);
            }
        }
    }
    out
}

fn secret_digest(secret: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(secret.as_bytes()).into()
}

impl Users {
    /// Opens the user and key trees.
    pub async fn open(meta: &Arc<dyn MetaStore>) -> Result<Users, MetaError> {
        let users = Users {
            users: Records::new(meta.clone(), USERS),
            keys: Records::new(meta.clone(), KEYS),
            by_name: UserMap::default(),
            verified: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
        };
        // Subscribed before the first read: no change falls between the two.
        let (by_name, verified) = (users.by_name.clone(), users.verified.clone());
        meta.subscribe(Box::new(move |change| {
            let Change::Record { tree, key, value } = change else {
                if matches!(change, Change::Lost) {
                    verified.invalidate_all();
                }
                return;
            };
            if tree == USERS {
                let mut map = by_name.write();
                match value.map(serde_json::from_slice::<UserRecord>) {
                    Some(Ok(user)) => {
                        map.insert(key.to_string(), Arc::new(user));
                    }
                    Some(Err(e)) => {
                        tracing::error!(user = key, error = %e, "unreadable user record ignored");
                        map.remove(key);
                    }
                    None => {
                        map.remove(key);
                    }
                }
            }
            // A user changed or a key went away: what was verified may no longer hold.
            if tree == USERS || (tree == KEYS && value.is_none()) {
                verified.invalidate_all();
            }
        }));
        let reloaded = users.by_name.clone();
        crate::store::meta::reload_on_lost(meta, move |meta| {
            let map = reloaded.clone();
            async move {
                match Records::<UserRecord>::new(meta, USERS).list(&[]).await {
                    Ok(all) => {
                        *map.write() = all.into_iter().map(|(n, u)| (n, Arc::new(u))).collect();
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "users not read again after lost changes")
                    }
                }
            }
        });
        let loaded = users.users.list(&[]).await?;
        {
            let mut map = users.by_name.write();
            for (name, user) in loaded {
                map.entry(name).or_insert_with(|| Arc::new(user));
            }
        }
        Ok(users)
    }

    /// Whether any user exists (turns `auth.mode = "auto"` on), from memory.
    pub fn exist(&self) -> bool {
        !self.by_name.read().is_empty()
    }

    /// Creates a user.
    pub async fn create(
        &self,
        name: &str,
        role: Role,
        registries: Vec<String>,
    ) -> Result<UserRecord, UserError> {
        if !valid_user_name(name) {
            return Err(UserError::InvalidName(name.into()));
        }
        if self.users.get(&[name]).await?.is_some() {
            return Err(UserError::Exists(name.into()));
        }
        let user = UserRecord {
            name: name.into(),
            role,
            registries,
            created_ms: now_ms(),
        };
        self.users.put(&[name], &user).await?;
        Ok(user)
    }

    /// Changes a user's role and registries.
    pub async fn update(
        &self,
        name: &str,
        role: Role,
        registries: Vec<String>,
    ) -> Result<UserRecord, UserError> {
        let mut user = self.get(name).await?;
        if user.role == Role::Admin
            && user.registries.is_empty()
            && (role != Role::Admin || !registries.is_empty())
            && self.full_admins().await? <= 1
        {
            return Err(UserError::LastAdmin(name.into()));
        }
        user.role = role;
        user.registries = registries;
        self.users.put(&[name], &user).await?;
        self.verified.invalidate_all();
        Ok(user)
    }

    /// One user.
    pub async fn get(&self, name: &str) -> Result<UserRecord, UserError> {
        self.users
            .get(&[name])
            .await?
            .ok_or_else(|| UserError::UnknownUser(name.into()))
    }

    /// All users by name.
    pub async fn list(&self) -> Result<Vec<UserRecord>, UserError> {
        Ok(self
            .users
            .list(&[])
            .await?
            .into_iter()
            .map(|(_, u)| u)
            .collect())
    }

    async fn full_admins(&self) -> Result<usize, UserError> {
        Ok(self
            .list()
            .await?
            .iter()
            .filter(|u| u.role == Role::Admin && u.registries.is_empty())
            .count())
    }

    /// Deletes a user and their keys; the last full admin cannot be deleted.
    pub async fn delete(&self, name: &str) -> Result<(), UserError> {
        let user = self.get(name).await?;
        if user.role == Role::Admin && user.registries.is_empty() && self.full_admins().await? <= 1
        {
            return Err(UserError::LastAdmin(name.into()));
        }
        for k in self.keys_of(name).await? {
            self.keys.remove(&[&k.id]).await?;
        }
        self.users.remove(&[name]).await?;
        self.verified.invalidate_all();
        Ok(())
    }

    /// Creates an access key; returns it with its secret, which is not stored and never shown again.
    /// The secret is hashed on the blocking pool (argon2).
    pub async fn create_key(&self, user: &str) -> Result<(KeyRecord, String), UserError> {
        self.get(user).await?;
        if self.keys_of(user).await?.len() >= MAX_KEYS_PER_USER {
            return Err(UserError::TooManyKeys(user.into()));
        }
        let id = format!("BK{}", random_text(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", 18));
        let secret = random_text(
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
            40,
        );
        let plain = secret.clone();
        let secret_hash = tokio::task::spawn_blocking(move || {
            let salt = SaltString::generate(&mut OsRng);
            Argon2::default()
                .hash_password(plain.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| UserError::Hash(e.to_string()))
        })
        .await
        .map_err(|e| UserError::Hash(format!("hashing task: {e}")))??;
        let key = KeyRecord {
            id,
            user: user.into(),
            secret_hash,
            created_ms: now_ms(),
        };
        self.keys.put(&[&key.id], &key).await?;
        Ok((key, secret))
    }

    /// Keys of a user, oldest first.
    pub async fn keys_of(&self, user: &str) -> Result<Vec<KeyRecord>, UserError> {
        let mut keys: Vec<KeyRecord> = self
            .keys
            .list(&[])
            .await?
            .into_iter()
            .map(|(_, k)| k)
            .filter(|k| k.user == user)
            .collect();
        keys.sort_by_key(|k| k.created_ms);
        Ok(keys)
    }

    /// Revokes a key of a user.
    pub async fn revoke_key(&self, user: &str, id: &str) -> Result<(), UserError> {
        match self.keys.get(&[id]).await? {
            Some(k) if k.user == user => {
                self.keys.remove(&[id]).await?;
                self.verified.invalidate_all();
                Ok(())
            }
            _ => Err(UserError::UnknownKey {
                user: user.into(),
                id: id.into(),
            }),
        }
    }

    /// Checks an Access Key ID and Secret Key; returns the key's user. The secret is checked
    /// on the blocking pool (argon2 costs tens of ms of CPU) unless [`Users::verified`]
    /// answers.
    pub async fn verify(&self, id: &str, secret: &str) -> Result<Arc<UserRecord>, LoginFailure> {
        let memo = (id.to_string(), secret_digest(secret));
        if let Some(user) = self.verified.get(&memo) {
            return Ok(user);
        }
        let key = self
            .keys
            .get(&[id])
            .await
            .ok()
            .flatten()
            .ok_or(LoginFailure::UnknownKey)?;
        let (hash, plain) = (key.secret_hash.clone(), secret.to_string());
        tokio::task::spawn_blocking(move || check_secret(&hash, &plain))
            .await
            .map_err(|_| LoginFailure::WrongSecret)??;
        let user = Arc::new(
            self.users
                .get(&[&key.user])
                .await
                .ok()
                .flatten()
                .ok_or(LoginFailure::UnknownUser)?,
        );
        self.verified.insert(memo, user.clone());
        Ok(user)
    }

    /// The user of a recently verified key, without hashing (the async fast path).
    pub fn verified(&self, id: &str, secret: &str) -> Option<Arc<UserRecord>> {
        self.verified.get(&(id.to_string(), secret_digest(secret)))
    }

    /// A user by name, for tokens (whose subject is a user name).
    pub fn user(&self, name: &str) -> Option<UserRecord> {
        self.by_name.read().get(name).map(|u| UserRecord::clone(u))
    }
}

/// Whether `secret` matches the stored argon2 `hash`. Blocking (argon2).
pub fn check_secret(hash: &str, secret: &str) -> Result<(), LoginFailure> {
    let hash = PasswordHash::new(hash).map_err(|_| LoginFailure::WrongSecret)?;
    Argon2::default()
        .verify_password(secret.as_bytes(), &hash)
        .map_err(|_| LoginFailure::WrongSecret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keys_verify_and_limits_hold() {
        let dir = tempfile::tempdir().unwrap();
        let meta = crate::store::meta::open(dir.path()).unwrap();
        let users = Users::open(&meta).await.unwrap();
        assert!(!users.exist());
        users.create("root", Role::Admin, vec![]).await.unwrap();
        assert!(matches!(
            users.create("root", Role::Viewer, vec![]).await,
            Err(UserError::Exists(_))
        ));
        assert!(matches!(
            users.create("Bad Name", Role::Viewer, vec![]).await,
            Err(UserError::InvalidName(_))
        ));
        let (key, secret) = users.create_key("root").await.unwrap();
        assert!(key.id.starts_with("BK") && key.id.len() == 20);
        assert_eq!(secret.len(), 40);
        assert!(!key.secret_hash.contains(&secret));
        assert_eq!(users.verify(&key.id, &secret).await.unwrap().name, "root");
        assert!(users.verified(&key.id, &secret).is_some());
        assert_eq!(
            users.verify(&key.id, "wrong").await.unwrap_err(),
            LoginFailure::WrongSecret
        );
        assert_eq!(
            users.verify("BKNOPE", &secret).await.unwrap_err(),
            LoginFailure::UnknownKey
        );
        for _ in 1..MAX_KEYS_PER_USER {
            users.create_key("root").await.unwrap();
        }
        assert!(matches!(
            users.create_key("root").await,
            Err(UserError::TooManyKeys(_))
        ));
        users.revoke_key("root", &key.id).await.unwrap();
        assert_eq!(
            users.verify(&key.id, &secret).await.unwrap_err(),
            LoginFailure::UnknownKey
        );
        assert!(matches!(
            users.delete("root").await,
            Err(UserError::LastAdmin(_))
        ));
        users.create("ops", Role::Admin, vec![]).await.unwrap();
        users.delete("root").await.unwrap();
        assert!(users.keys_of("root").await.unwrap().is_empty());
        assert!(matches!(
            users.update("ops", Role::Viewer, vec![]).await,
            Err(UserError::LastAdmin(_))
        ));
    }
}
