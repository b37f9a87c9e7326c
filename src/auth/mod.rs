//! Who is asking and what they may do: credentials to a principal, and the one authorization
//! check that both `/v2/` and `/api/v1/` go through.

pub mod endpoint;
pub mod throttle;
pub mod token;
pub mod users;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http::HeaderMap;
use serde::{Deserialize, Serialize};

use crate::config::{AuthConfig, AuthMode};
use crate::error::{Error, Result};
use crate::store::meta::RegistryRecord;
use crate::store::Store;
use token::{Claims, TokenKeys};
use users::{UserRecord, Users};

/// What a user may do, within the registries their role covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything.
    Admin,
    /// Read and pull.
    Viewer,
    /// Read, pull and push; no delete.
    ImageUploader,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
            Role::ImageUploader => "image_uploader",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "admin" => Ok(Role::Admin),
            "viewer" => Ok(Role::Viewer),
            "image_uploader" | "uploader" => Ok(Role::ImageUploader),
            _ => Err(format!(
                "unknown role {s:?} (admin, viewer or image_uploader)"
            )),
        }
    }
}

/// Who sent a request.
#[derive(Debug, Clone)]
pub enum Principal {
    /// No credentials.
    Anonymous,
    /// Access key (Basic credentials), resolved to its user.
    User(Arc<UserRecord>),
    /// A bearer token issued by `/service/token`.
    Token(Arc<Claims>),
    /// The operator at the data directory's console: the CLI without `--server`, which may do
    /// anything there (whoever can write the data directory owns it anyway).
    Operator,
}

impl Principal {
    /// Name shown as the operator of events and in logs.
    pub fn name(&self) -> &str {
        match self {
            Principal::Anonymous => "anonymous",
            Principal::User(u) => &u.name,
            Principal::Token(c) if c.sub.is_empty() => "anonymous",
            Principal::Token(c) => &c.sub,
            Principal::Operator => "operator",
        }
    }
}

/// An operation to authorize.
#[derive(Debug, Clone, Copy)]
pub enum Action<'a> {
    /// `GET /v2/`: any authenticated principal.
    Ping,
    /// `GET /v2/_catalog` (results are filtered by what the caller may read).
    Catalog,
    /// Pull from a repository (`REGISTRY/IMAGE`).
    Pull(&'a str),
    /// Push to a repository.
    Push(&'a str),
    /// Delete in a repository.
    Delete(&'a str),
    /// Management reads of one registry's content, or of global lists when `None`.
    Read(Option<&'a str>),
    /// Management changes in one registry, or of global objects (registries, image caches,
    /// users) when `None`.
    Manage(Option<&'a str>),
}

impl Action<'_> {
    /// The token scope that would allow this action, for the `WWW-Authenticate` challenge.
    pub fn scope(&self) -> Option<String> {
        match self {
            Action::Pull(r) => Some(format!("repository:{r}:pull")),
            Action::Push(r) => Some(format!("repository:{r}:pull,push")),
            Action::Delete(r) => Some(format!("repository:{r}:delete")),
            Action::Catalog => Some("registry:catalog:*".into()),
            _ => None,
        }
    }
}

fn registry_of(repo: &str) -> &str {
    repo.split('/').next().unwrap_or(repo)
}

/// Whether a user's role allows an action.
pub fn role_permits(user: &UserRecord, action: Action<'_>) -> bool {
    let writer = matches!(user.role, Role::Admin | Role::ImageUploader);
    match action {
        Action::Ping | Action::Catalog | Action::Read(None) => true,
        Action::Pull(repo) => user.covers(registry_of(repo)),
        Action::Read(Some(reg)) => user.covers(reg),
        Action::Push(repo) => writer && user.covers(registry_of(repo)),
        Action::Delete(repo) => user.role == Role::Admin && user.covers(registry_of(repo)),
        Action::Manage(Some(reg)) => user.role == Role::Admin && user.covers(reg),
        Action::Manage(None) => user.role == Role::Admin && user.registries.is_empty(),
    }
}

/// Authentication state of a running server.
pub struct Auth {
    /// Users and keys.
    pub users: Users,
    /// Token signing keys.
    pub keys: TokenKeys,
    /// Settings.
    pub config: AuthConfig,
    /// Failed-login slowdown.
    pub throttle: throttle::Throttle,
    /// Recently verified bearer tokens.
    tokens: moka::sync::Cache<String, Arc<Claims>>,
    /// Turns to check a secret (`auth.max_concurrent_logins`).
    verifying: tokio::sync::Semaphore,
}

/// How long a login waits for a turn to have its secret checked.
const LOGIN_QUEUE_WAIT: Duration = Duration::from_secs(10);

impl Auth {
    /// Opens users, keys and the token signing key.
    pub async fn open(
        store: &Store,
        data_dir: &std::path::Path,
        config: &AuthConfig,
    ) -> Result<Auth> {
        let users = Users::open(&store.meta).await?;
        let keys = TokenKeys::open(&store.meta, data_dir, &config.service).await?;
        let auth = Auth {
            users,
            keys,
            config: config.clone(),
            throttle: throttle::Throttle::new(
                config.failed_login_limit,
                config.failed_login_window,
            ),
            tokens: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(config.token_lifetime)
                .build(),
            verifying: tokio::sync::Semaphore::new(config.max_concurrent_logins.max(1)),
        };
        Ok(auth)
    }

    /// Whether requests must authenticate.
    /// In `auto` mode, from the users in memory: they follow every change, whichever node
    /// made it.
    pub fn enforced(&self) -> bool {
        match self.config.mode {
            AuthMode::On => true,
            AuthMode::Off => false,
            AuthMode::Auto => self.users.exist(),
        }
    }

    /// Reads the credentials of a request: `Authorization: Basic` (access key) or `Bearer`
    /// (a token of ours). Bad credentials are an error, never silently anonymous.
    pub async fn authenticate(
        self: &Arc<Self>,
        headers: &HeaderMap,
        client: IpAddr,
    ) -> Result<Principal> {
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return Ok(Principal::Anonymous);
        };
        let value = value
            .to_str()
            .map_err(|_| Error::unauthorized("malformed Authorization header", None))?;
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            // Clients send the same token on every request until it expires: a memo hit is a
            // hash lookup instead of a base64 + HMAC + JSON decode (about 3 µs).
            if let Some(claims) = self.tokens.get(rest) {
                if claims.exp > crate::store::meta::now_ms() / 1000 {
                    return Ok(Principal::Token(claims));
                }
                self.tokens.invalidate(rest);
            }
            let claims = Arc::new(
                self.keys
                    .verify(rest)
                    .map_err(|e| Error::unauthorized(&e.to_string(), None))?,
            );
            self.tokens.insert(rest.to_string(), claims.clone());
            return Ok(Principal::Token(claims));
        }
        if scheme.eq_ignore_ascii_case("basic") {
            let (id, secret) = decode_basic(rest)
                .ok_or_else(|| Error::unauthorized("malformed Basic credentials", None))?;
            return self.login(&id, &secret, client).await.map(Principal::User);
        }
        Err(Error::unauthorized(
            &format!("unsupported authorization scheme {scheme:?}"),
            None,
        ))
    }

    /// Checks an access key, slowing repeated failures per key and per client address.
    pub async fn login(
        self: &Arc<Self>,
        id: &str,
        secret: &str,
        client: IpAddr,
    ) -> Result<Arc<UserRecord>> {
        if let Some(user) = self.users.verified(id, secret) {
            return Ok(user);
        }
        let delay = self.throttle.before_check(client);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        // argon2 costs ~20 ms of CPU and 19 MiB: a bounded number run at once, whatever the
        // number of connections asking.
        let turn = tokio::time::timeout(LOGIN_QUEUE_WAIT, self.verifying.acquire())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| {
                tracing::warn!(key = id, %client, "login refused: too many secrets being checked");
                Error::TooManyRequests {
                    message: "too many logins are being checked; try again shortly".into(),
                    retry_after: Some(Duration::from_secs(1)),
                }
            })?;
        let verdict = self.users.verify(id, secret).await;
        drop(turn);
        match verdict {
            Ok(user) => {
                self.throttle.succeeded(id);
                Ok(user)
            }
            Err(why) => {
                self.throttle.failed(id, client);
                crate::metrics::login_failed();
                tracing::warn!(key = id, %client, reason = ?why, "login failed");
                let delay = self.throttle.after_failure(id);
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Err(Error::unauthorized(
                    "invalid access key id or secret key",
                    None,
                ))
            }
        }
    }

    /// The one authorization check of `/v2/` and `/api/v1/`.
    ///
    /// Refusals: no credentials or a token without the scope → 401 with a challenge (clients then
    /// ask for a token); an authenticated user whose role lacks the right → 403 `DENIED`.
    pub fn check(&self, store: &Store, principal: &Principal, action: Action<'_>) -> Result<()> {
        if !self.enforced() {
            return Ok(());
        }
        let registry = match action {
            Action::Pull(repo) => store.registry(registry_of(repo)),
            _ => None,
        };
        self.check_in(registry.as_deref(), principal, action)
    }

    /// [`Auth::check`] with the registry of the action's repository already looked up, as the
    /// caller's listener shows it: `None` when it does not exist or is hidden, so that the
    /// answer is the same for both (and for a registry the caller may not use).
    pub fn check_in(
        &self,
        registry: Option<&RegistryRecord>,
        principal: &Principal,
        action: Action<'_>,
    ) -> Result<()> {
        if !self.enforced() {
            return Ok(());
        }
        let anonymous_pull = registry.is_some_and(|r| r.anonymous_pull);
        let allowed = match (principal, action) {
            (Principal::Operator, _) => true,
            (_, Action::Pull(_)) if anonymous_pull => true,
            (Principal::Anonymous, _) => false,
            (Principal::User(user), action) => role_permits(user, action),
            (Principal::Token(claims), action) => match action {
                Action::Ping => true,
                Action::Catalog => claims.grants("registry", "catalog", "*"),
                Action::Pull(r) => claims.grants("repository", r, "pull"),
                Action::Push(r) => claims.grants("repository", r, "push"),
                Action::Delete(r) => claims.grants("repository", r, "delete"),
                // Management takes the token's user with their current role.
                Action::Read(_) | Action::Manage(_) => self
                    .users
                    .user(&claims.sub)
                    .is_some_and(|u| role_permits(&u, action)),
            },
        };
        if allowed {
            return Ok(());
        }
        match principal {
            // An anonymous token (the client asked for one without credentials) is refused like
            // no credentials at all, so clients say "unauthorized", not "insufficient scope".
            Principal::Anonymous => Err(Error::unauthorized(
                "authentication required",
                action.scope(),
            )),
            Principal::Token(c) if c.sub.is_empty() => Err(Error::unauthorized(
                "authentication required",
                action.scope(),
            )),
            Principal::Token(_) if action.scope().is_some() => Err(Error::Unauthorized {
                message: format!(
                    "token of {:?} does not grant {}",
                    principal.name(),
                    action.scope().unwrap_or_default()
                ),
                scope: action.scope(),
                insufficient: true,
            }),
            _ => Err(Error::Denied(format!(
                "{} may not {}",
                principal.name(),
                describe(action)
            ))),
        }
    }

    /// Whether the principal may read a registry's content (listings filter with it).
    pub fn can_read(&self, store: &Store, principal: &Principal, registry: &str) -> bool {
        if !self.enforced() {
            return true;
        }
        match principal {
            Principal::Token(c) => {
                c.access
                    .iter()
                    .any(|a| a.kind == "repository" && registry_of(&a.name) == registry)
                    || self.users.user(&c.sub).is_some_and(|u| u.covers(registry))
            }
            Principal::User(u) => u.covers(registry),
            Principal::Operator => true,
            Principal::Anonymous => store.registry(registry).is_some_and(|r| r.anonymous_pull),
        }
    }

    /// The `WWW-Authenticate` value of a 401.
    pub fn challenge(&self, realm_base: &str, scope: Option<&str>, insufficient: bool) -> String {
        let realm = self
            .config
            .realm
            .clone()
            .unwrap_or_else(|| format!("{realm_base}/service/token"));
        let mut c = format!(
            "Bearer realm=\"{realm}\",service=\"{}\"",
            self.config.service
        );
        if let Some(s) = scope {
            c.push_str(&format!(",scope=\"{s}\""));
        }
        if insufficient {
            c.push_str(",error=\"insufficient_scope\"");
        }
        c
    }
}

fn describe(action: Action<'_>) -> String {
    match action {
        Action::Ping => "use the registry".into(),
        Action::Catalog => "list the catalog".into(),
        Action::Pull(r) => format!("pull from {r}"),
        Action::Push(r) => format!("push to {r}"),
        Action::Delete(r) => format!("delete in {r}"),
        Action::Read(Some(r)) => format!("read registry {r}"),
        Action::Read(None) => "read this".into(),
        Action::Manage(Some(r)) => format!("change registry {r}"),
        Action::Manage(None) => "change server-wide settings (admin of every registry only)".into(),
    }
}

/// Decodes `base64(id:secret)`.
pub fn decode_basic(encoded: &str) -> Option<(String, String)> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_string(), secret.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(role: Role, registries: &[&str]) -> UserRecord {
        UserRecord {
            name: "u".into(),
            role,
            registries: registries.iter().map(|s| s.to_string()).collect(),
            created_ms: 0,
        }
    }

    #[test]
    fn roles_grant_what_design_says() {
        let admin = user(Role::Admin, &[]);
        let viewer = user(Role::Viewer, &[]);
        let uploader = user(Role::ImageUploader, &[]);
        let limited = user(Role::Admin, &["team"]);
        for (u, pull, push, delete, manage) in [
            (&admin, true, true, true, true),
            (&viewer, true, false, false, false),
            (&uploader, true, true, false, false),
        ] {
            assert_eq!(role_permits(u, Action::Pull("lib/a")), pull);
            assert_eq!(role_permits(u, Action::Push("lib/a")), push);
            assert_eq!(role_permits(u, Action::Delete("lib/a")), delete);
            assert_eq!(role_permits(u, Action::Manage(None)), manage);
            assert!(role_permits(u, Action::Read(Some("lib"))));
        }
        assert!(role_permits(&limited, Action::Delete("team/a")));
        assert!(!role_permits(&limited, Action::Pull("lib/a")));
        assert!(!role_permits(&limited, Action::Manage(None)));
        assert!(role_permits(&limited, Action::Manage(Some("team"))));
    }

    #[test]
    fn basic_credentials_decode() {
        assert_eq!(
            decode_basic("QktYOnNlYzpyZXQ=").unwrap(),
            ("BKX".to_string(), "sec:ret".to_string())
        );
        assert!(decode_basic("!!").is_none());
    }
}
