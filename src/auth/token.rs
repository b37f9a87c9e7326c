//! Docker registry tokens: scopes, the claims of a signed JWT (HS256), issuance and verification.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::store::meta::{now_ms, MetaError, MetaStore};

/// Issuer of berth's tokens.
pub const ISSUER: &str = "berth";

/// One granted (or requested) resource scope: `repository:REG/IMG:pull,push`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    /// `repository` or `registry`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Repository name, or `catalog`.
    pub name: String,
    /// `pull`, `push`, `delete`, `*`.
    pub actions: Vec<String>,
}

impl Access {
    /// Parses `type:name:action[,action]` (the name may hold `:` only before the last one).
    pub fn parse(scope: &str) -> Option<Access> {
        let (kind, rest) = scope.split_once(':')?;
        let (name, actions) = rest.rsplit_once(':')?;
        if kind.is_empty() || name.is_empty() {
            return None;
        }
        Some(Access {
            kind: kind.to_string(),
            name: name.to_string(),
            actions: actions
                .split(',')
                .filter(|a| !a.is_empty())
                .map(str::to_string)
                .collect(),
        })
    }

    /// Whether this grant includes `action` on `kind:name`.
    pub fn grants(&self, kind: &str, name: &str, action: &str) -> bool {
        self.kind == kind
            && self.name == name
            && self.actions.iter().any(|a| a == action || a == "*")
    }
}

/// The claims of a registry token (Docker token authentication spec).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer.
    pub iss: String,
    /// Subject: user name, empty for anonymous.
    pub sub: String,
    /// Audience: the service.
    pub aud: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Not before, Unix seconds.
    pub nbf: u64,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Unique id.
    pub jti: String,
    /// What the bearer may do.
    pub access: Vec<Access>,
}

impl Claims {
    /// Whether the token grants `action` on `kind:name`.
    pub fn grants(&self, kind: &str, name: &str, action: &str) -> bool {
        self.access.iter().any(|a| a.grants(kind, name, action))
    }
}

/// Why a token was not accepted.
#[derive(Debug, thiserror::Error)]
#[error("invalid token: {0}")]
pub struct TokenError(String);

/// The token signing key's record among the secrets every node shares.
const TOKEN_KEY: &str = "token_key";

/// Signs and checks tokens with a key kept in the metadata.
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    service: String,
}

impl TokenKeys {
    /// Loads the signing key from the metadata, where every node of a shared metadata store
    /// finds the same one: created there on first start (from `DATA/auth/token.key` when an
    /// older berth left one there, else 32 random bytes), so tokens stay valid across restarts
    /// and are accepted by every node.
    pub async fn open(
        meta: &Arc<dyn MetaStore>,
        data_dir: &Path,
        service: &str,
    ) -> Result<TokenKeys, MetaError> {
        let legacy = std::fs::read(data_dir.join("auth").join("token.key")).ok();
        let secret = crate::store::meta::shared_secret(meta, TOKEN_KEY, legacy).await?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[service]);
        validation.set_issuer(&[ISSUER]);
        validation.leeway = 5;
        validation.validate_nbf = true;
        Ok(TokenKeys {
            encoding: EncodingKey::from_secret(&secret),
            decoding: DecodingKey::from_secret(&secret),
            validation,
            service: service.to_string(),
        })
    }

    /// Issues a token for `sub` with `access`, valid for `lifetime`.
    pub fn issue(&self, sub: &str, access: Vec<Access>, lifetime: Duration) -> (String, Claims) {
        let now = now_ms() / 1000;
        let claims = Claims {
            iss: ISSUER.into(),
            sub: sub.into(),
            aud: self.service.clone(),
            exp: now + lifetime.as_secs(),
            nbf: now,
            iat: now,
            jti: uuid::Uuid::new_v4().simple().to_string(),
            access,
        };
        (self.sign(&claims), claims)
    }

    /// Signs claims as they are (tests use it for expired or foreign tokens).
    pub fn sign(&self, claims: &Claims) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .expect("HS256 signing cannot fail")
    }

    /// Checks signature, issuer, audience and lifetime.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|d| d.claims)
            .map_err(|e| TokenError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse() {
        let a = Access::parse("repository:lib/team/app:pull,push").unwrap();
        assert_eq!(a.name, "lib/team/app");
        assert_eq!(a.actions, ["pull", "push"]);
        assert!(a.grants("repository", "lib/team/app", "push"));
        assert!(!a.grants("repository", "lib/team/app", "delete"));
        assert!(Access::parse("registry:catalog:*")
            .unwrap()
            .grants("registry", "catalog", "x"));
        assert!(Access::parse("nonsense").is_none());
    }

    #[tokio::test]
    async fn tokens_round_trip_and_reject_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let meta = crate::store::meta::open(dir.path()).unwrap();
        let keys = TokenKeys::open(&meta, dir.path(), "berth").await.unwrap();
        let access = vec![Access::parse("repository:a/b:pull").unwrap()];
        let (token, _) = keys.issue("alice", access.clone(), Duration::from_secs(60));
        let claims = keys.verify(&token).unwrap();
        assert_eq!((claims.sub.as_str(), claims.access), ("alice", access));
        let mut tampered = token.clone().into_bytes();
        let i = token.rfind('.').unwrap() + 3;
        tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
        assert!(keys.verify(&String::from_utf8(tampered).unwrap()).is_err());
        // Same key after reopening; another service does not accept it.
        let again = TokenKeys::open(&meta, dir.path(), "berth").await.unwrap();
        assert!(again.verify(&token).is_ok());
        let other = TokenKeys::open(&meta, dir.path(), "other").await.unwrap();
        assert!(other.verify(&token).is_err());
    }

    #[tokio::test]
    async fn a_key_an_older_berth_kept_in_the_data_directory_is_adopted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("auth")).unwrap();
        std::fs::write(dir.path().join("auth/token.key"), [7u8; 32]).unwrap();
        let claims = Claims {
            iss: ISSUER.into(),
            sub: "alice".into(),
            aud: "berth".into(),
            exp: now_ms() / 1000 + 60,
            nbf: now_ms() / 1000,
            iat: now_ms() / 1000,
            jti: "j".into(),
            access: vec![],
        };
        // A token signed with the old key before the upgrade stays valid.
        let old = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&[7u8; 32]),
        )
        .unwrap();
        let meta = crate::store::meta::open(dir.path()).unwrap();
        let keys = TokenKeys::open(&meta, dir.path(), "berth").await.unwrap();
        assert!(keys.verify(&old).is_ok());
    }
}
