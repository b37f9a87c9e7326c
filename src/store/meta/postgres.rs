//! The PostgreSQL backend of the metadata seam: what several berth nodes share. One table per
//! kind of record (`COLLATE "C"` keys, so index order is the byte order every listing pages
//! by), schema migrations applied at open under an advisory lock, writes that change several
//! rows in one transaction, and the writes of one repository serialized by a transaction-level
//! advisory lock on its name (what the sled backend does with its striped locks, here across
//! nodes).
//!
//! Changes reach other nodes through `LISTEN/NOTIFY`: each write sends its [`Change`]s with
//! `pg_notify` inside its transaction (delivered at commit, never for a rolled-back write), and
//! every node's listener hands the changes of the other nodes to its subscribers. When the
//! listening connection is lost, notifications sent meanwhile are lost too: the listener
//! reconnects and tells its subscribers [`Change::Lost`], so in-memory copies start over.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Transaction;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_postgres::NoTls;

use super::usage::registry_of;
use super::{
    from_json, json, prefix_end, ArtifactRecord, Change, CredentialRecord, ImageCacheRecord, Lease,
    MetaError, MetaResult, MetaStore, Missing, Refers, RegistryRecord, Subscriber, Usage,
};
use crate::oci::digest::Digest;
use crate::oci::manifest::Descriptor;

/// How to reach the database (`[metadata]` with `kind = "postgres"`). `Debug` hides the
/// password.
#[derive(Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PostgresSettings {
    /// `postgres://user:password@host:port/database` (or the key=value form).
    pub url: String,
    /// A file holding the password (one line), instead of writing it in `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<std::path::PathBuf>,
    /// Connections this node keeps open at most.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// How long a request waits for a connection, or for the database to answer one
    /// statement, before it fails.
    #[serde(default = "default_timeout", with = "crate::durations")]
    pub timeout: Duration,
    /// What this node keeps in memory of the shared records (manifests by tag, registries,
    /// users, webhook policies) is read again at least this often: a safety net under the
    /// change notices, which keep it current within milliseconds.
    #[serde(default = "default_refresh", with = "crate::durations")]
    pub refresh: Duration,
}

impl PostgresSettings {
    /// What is wrong with the settings, said for the operator.
    pub fn validate(&self) -> Result<(), String> {
        if let Err(e) = self.url.parse::<tokio_postgres::Config>() {
            return Err(format!(
                "metadata.url {:?} is not a PostgreSQL URL: {e}",
                self.redacted().url
            ));
        }
        if self.pool_size == 0 || self.timeout.is_zero() || self.refresh.is_zero() {
            return Err(
                "metadata.pool_size, metadata.timeout and metadata.refresh must be above 0".into(),
            );
        }
        Ok(())
    }

    /// The settings with the URL's password replaced (what logs and `check-config` show).
    pub fn redacted(&self) -> PostgresSettings {
        let url = match self.url.split_once("://") {
            Some((scheme, rest)) => match rest.rsplit_once('@') {
                Some((userinfo, host)) => match userinfo.split_once(':') {
                    Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}"),
                    None => self.url.clone(),
                },
                None => self.url.clone(),
            },
            None => self
                .url
                .split_whitespace()
                .map(|kv| {
                    if kv.starts_with("password=") {
                        "password=<redacted>"
                    } else {
                        kv
                    }
                })
                .collect::<Vec<_>>()
                .join(" "),
        };
        PostgresSettings {
            url,
            ..self.clone()
        }
    }
}

impl std::fmt::Debug for PostgresSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = self.redacted();
        f.debug_struct("PostgresSettings")
            .field("url", &shown.url)
            .field("password_file", &self.password_file)
            .field("pool_size", &self.pool_size)
            .field("timeout", &self.timeout)
            .field("refresh", &self.refresh)
            .finish()
    }
}

fn default_pool_size() -> usize {
    16
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_refresh() -> Duration {
    Duration::from_secs(60)
}

/// The channel every node listens on.
const CHANNEL: &str = "berth_changes";

/// Notifications read from the connection and not yet handed to the subscribers, at most.
const NOTICES_QUEUED: usize = 1024;

/// The `application_name` of the listening connection (what `pg_stat_activity` shows).
const LISTENER_NAME: &str = "berth-listener";

/// PostgreSQL refuses notification payloads of 8000 bytes or more.
const PAYLOAD_LIMIT: usize = 7900;

/// The schema, one migration per step; a step is never changed once released, only followed.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE registries (name text COLLATE "C" PRIMARY KEY, record bytea NOT NULL);
CREATE TABLE image_caches (name text COLLATE "C" PRIMARY KEY, record bytea NOT NULL);
CREATE TABLE credentials (name text COLLATE "C" PRIMARY KEY, record bytea NOT NULL);
CREATE TABLE repositories (name text COLLATE "C" PRIMARY KEY, created_ms bigint NOT NULL);
CREATE TABLE blob_links (
    repo text COLLATE "C" NOT NULL, digest text COLLATE "C" NOT NULL, size bigint NOT NULL,
    PRIMARY KEY (repo, digest));
CREATE TABLE artifacts (
    repo text COLLATE "C" NOT NULL, digest text COLLATE "C" NOT NULL, record bytea NOT NULL,
    PRIMARY KEY (repo, digest));
CREATE TABLE tags (
    repo text COLLATE "C" NOT NULL, tag text COLLATE "C" NOT NULL,
    digest text COLLATE "C" NOT NULL, PRIMARY KEY (repo, tag));
CREATE INDEX tags_by_artifact ON tags (repo, digest);
CREATE TABLE referrers (
    repo text COLLATE "C" NOT NULL, subject text COLLATE "C" NOT NULL,
    referrer text COLLATE "C" NOT NULL, descriptor bytea NOT NULL,
    PRIMARY KEY (repo, subject, referrer));
CREATE TABLE pulls (
    repo text COLLATE "C" NOT NULL, digest text COLLATE "C" NOT NULL, at_ms bigint NOT NULL,
    PRIMARY KEY (repo, digest));
CREATE TABLE records (
    tree text COLLATE "C" NOT NULL, key bytea NOT NULL, value bytea NOT NULL,
    PRIMARY KEY (tree, key));
-- What each registry holds, each distinct digest once with how many links and artifacts of
-- its repositories hold it, and the sums of it: kept by the writes, read by quota checks.
CREATE TABLE holdings (
    registry text COLLATE "C" NOT NULL, digest text COLLATE "C" NOT NULL,
    refs integer NOT NULL, size bigint NOT NULL, PRIMARY KEY (registry, digest));
CREATE INDEX holdings_by_digest ON holdings (digest);
CREATE TABLE usage (
    registry text COLLATE "C" PRIMARY KEY, bytes bigint NOT NULL, blobs bigint NOT NULL,
    artifacts bigint NOT NULL);
"#,
    r#"
CREATE TABLE sequences (name text COLLATE "C" PRIMARY KEY, value bigint NOT NULL);
"#,
    r#"
CREATE TABLE leases (
    name text COLLATE "C" PRIMARY KEY,
    holder text NOT NULL,
    expires timestamptz NOT NULL);
"#,
];

/// The PostgreSQL backend of [`MetaStore`].
pub struct PostgresMeta {
    pool: Pool,
    /// This node, as its notifications name it (its own are not delivered twice).
    node: uuid::Uuid,
    subscribers: Arc<parking_lot::RwLock<Vec<Subscriber>>>,
    /// The listener of other nodes' changes (stopped with the store).
    listener: tokio::task::JoinHandle<()>,
    /// [`PostgresSettings::refresh`].
    refresh: Duration,
}

impl Drop for PostgresMeta {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

fn pg(e: tokio_postgres::Error) -> MetaError {
    let text = match e.as_db_error() {
        Some(db) => format!("postgres: {} ({})", db.message(), db.code().code()),
        None => match std::error::Error::source(&e) {
            Some(cause) => format!("postgres: {e}: {cause}"),
            None => format!("postgres: {e}"),
        },
    };
    MetaError::Backend(text)
}

fn pool_error(e: deadpool_postgres::PoolError) -> MetaError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg(e),
        other => MetaError::Backend(format!("postgres connection pool: {other}")),
    }
}

/// A count or size as the database stores it.
fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A limit as SQL takes it (`usize::MAX`: no limit).
fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn digest(text: &str) -> MetaResult<Digest> {
    Digest::parse(text).map_err(|e| MetaError::Corrupt(format!("stored digest {text:?}: {e}")))
}

/// The bounds `[low, high)` of the names under `registry/`.
fn registry_range(registry: &str) -> (String, String) {
    // '0' follows '/': every name starting with `registry/` sorts in between.
    (format!("{registry}/"), format!("{registry}0"))
}

/// A change as it is sent to other nodes (and kept until the writer's transaction commits).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "lowercase")]
enum Owned {
    Tag {
        repo: String,
        tag: String,
    },
    Artifact {
        repo: String,
        digest: Digest,
    },
    Registry {
        name: String,
        record: Option<RegistryRecord>,
    },
    Record {
        tree: String,
        key: String,
        /// The new bytes (base64), `None` when removed.
        value: Option<String>,
        /// Too large to send: receivers read it from the database.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        fetch: bool,
    },
}

impl Owned {
    fn record(tree: &str, key: &str, value: Option<&[u8]>) -> Owned {
        use base64::Engine as _;
        Owned::Record {
            tree: tree.into(),
            key: key.into(),
            value: value.map(|v| base64::engine::general_purpose::STANDARD.encode(v)),
            fetch: false,
        }
    }

    /// Tells `subscribers` of this change (`value`: the record's bytes, decoded).
    fn deliver(&self, subscribers: &[Subscriber], value: Option<&[u8]>) {
        let change = match self {
            Owned::Tag { repo, tag } => Change::Tag { repo, tag },
            Owned::Artifact { repo, digest } => Change::Artifact { repo, digest },
            Owned::Registry { name, record } => Change::Registry {
                name,
                record: record.as_ref(),
            },
            Owned::Record { tree, key, .. } => Change::Record { tree, key, value },
        };
        for s in subscribers {
            s(change);
        }
    }

    fn decoded_value(&self) -> Option<Vec<u8>> {
        use base64::Engine as _;
        match self {
            Owned::Record { value: Some(v), .. } => {
                base64::engine::general_purpose::STANDARD.decode(v).ok()
            }
            _ => None,
        }
    }
}

/// What one notification carries.
#[derive(Serialize, Deserialize)]
struct Notice {
    node: uuid::Uuid,
    changes: Vec<Owned>,
}

/// The changes of one write, sent in notifications of at most [`PAYLOAD_LIMIT`] bytes.
fn notices(node: uuid::Uuid, changes: &[Owned]) -> Vec<String> {
    let encode = |changes: Vec<Owned>| {
        serde_json::to_string(&Notice { node, changes }).expect("notices serialize")
    };
    let mut out = Vec::new();
    let mut batch: Vec<Owned> = Vec::new();
    for change in changes {
        let mut change = change.clone();
        if encode(vec![change.clone()]).len() > PAYLOAD_LIMIT {
            if let Owned::Record { value, fetch, .. } = &mut change {
                *fetch = value.take().is_some();
            }
        }
        batch.push(change);
        if encode(batch.clone()).len() > PAYLOAD_LIMIT {
            let last = batch.pop().expect("just pushed");
            out.push(encode(std::mem::take(&mut batch)));
            batch.push(last);
        }
    }
    if !batch.is_empty() {
        out.push(encode(batch));
    }
    out
}

impl PostgresMeta {
    /// Connects, applies the schema migrations this version knows, and starts listening to
    /// the other nodes' changes.
    pub async fn open(settings: &PostgresSettings) -> MetaResult<PostgresMeta> {
        let mut config: tokio_postgres::Config = settings
            .url
            .parse()
            .map_err(|e| MetaError::Backend(format!("postgres URL: {e}")))?;
        if let Some(file) = &settings.password_file {
            let password = std::fs::read_to_string(file).map_err(|e| {
                MetaError::Backend(format!("postgres password file {}: {e}", file.display()))
            })?;
            config.password(password.trim_end_matches(['\n', '\r']));
        }
        config.connect_timeout(settings.timeout);
        config.options(format!(
            "-c statement_timeout={}",
            settings.timeout.as_millis()
        ));
        config.application_name("berth");
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(settings.timeout))
            .create_timeout(Some(settings.timeout))
            .recycle_timeout(Some(settings.timeout))
            .build()
            .map_err(|e| MetaError::Backend(format!("postgres connection pool: {e}")))?;
        migrate(&pool).await?;
        let node = uuid::Uuid::new_v4();
        let subscribers: Arc<parking_lot::RwLock<Vec<Subscriber>>> = Default::default();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let listener = tokio::spawn(listen(
            config,
            pool.clone(),
            node,
            subscribers.clone(),
            ready_tx,
        ));
        // Listening before the first read: no change of another node falls in between.
        match tokio::time::timeout(settings.timeout, ready_rx).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(e),
            _ => {
                return Err(MetaError::Backend(
                    "postgres: the change listener did not start".into(),
                ))
            }
        }
        Ok(PostgresMeta {
            pool,
            node,
            subscribers,
            listener,
            refresh: settings.refresh,
        })
    }

    /// The schema version of the database (migrations applied), and the newest this berth
    /// knows.
    pub async fn schema_version(&self) -> MetaResult<(i32, i32)> {
        let client = self.client().await?;
        Ok((applied_version(&client).await?, known_version()))
    }

    async fn client(&self) -> MetaResult<deadpool_postgres::Object> {
        self.pool.get().await.map_err(pool_error)
    }

    /// Sends `changes` to the other nodes when `tx` commits.
    async fn publish(&self, tx: &Transaction<'_>, changes: &[Owned]) -> MetaResult<()> {
        for payload in notices(self.node, changes) {
            tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
                .await
                .map_err(pg)?;
        }
        Ok(())
    }

    /// Commits `tx` with `changes` sent to other nodes, then tells this node's subscribers.
    async fn commit(&self, tx: Transaction<'_>, changes: Vec<Owned>) -> MetaResult<()> {
        if !changes.is_empty() {
            self.publish(&tx, &changes).await?;
        }
        tx.commit().await.map_err(pg)?;
        let subscribers = self.subscribers.read();
        for change in &changes {
            let value = change.decoded_value();
            change.deliver(&subscribers, value.as_deref());
        }
        Ok(())
    }

    async fn query_strings(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> MetaResult<Vec<String>> {
        let client = self.client().await?;
        let rows = client.query(sql, params).await.map_err(pg)?;
        Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
    }

    async fn query_json<T: for<'de> Deserialize<'de>>(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> MetaResult<Vec<T>> {
        let client = self.client().await?;
        let rows = client.query(sql, params).await.map_err(pg)?;
        rows.iter()
            .map(|r| from_json(r.get::<_, &[u8]>(0)))
            .collect()
    }

    async fn get_json<T: for<'de> Deserialize<'de>>(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> MetaResult<Option<T>> {
        Ok(self.query_json(sql, params).await?.into_iter().next())
    }

    async fn get_i64(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> MetaResult<Option<i64>> {
        let client = self.client().await?;
        let row = client.query_opt(sql, params).await.map_err(pg)?;
        Ok(row.map(|r| r.get::<_, i64>(0)))
    }
}

/// Applies the migrations not applied yet, one node at a time (the others wait on the lock).
/// The newest migration applied to the database.
async fn applied_version(client: &tokio_postgres::Client) -> MetaResult<i32> {
    Ok(client
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            &[],
        )
        .await
        .map_err(pg)?
        .get(0))
}

/// The newest migration this berth knows.
fn known_version() -> i32 {
    i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX)
}

async fn migrate(pool: &Pool) -> MetaResult<()> {
    let mut client = pool.get().await.map_err(pool_error)?;
    // A fixed key: the schema's lock, held across the migrations of one node.
    const SCHEMA_LOCK: i64 = 0x6265_7274_6873_6368; // "berthsch"
    client
        .execute("SELECT pg_advisory_lock($1)", &[&SCHEMA_LOCK])
        .await
        .map_err(pg)?;
    let outcome = async {
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                    version integer PRIMARY KEY, applied_ms bigint NOT NULL)",
            )
            .await
            .map_err(pg)?;
        let applied = applied_version(&client).await?;
        let known = known_version();
        if applied > known {
            return Err(MetaError::Backend(format!(
                "postgres: the database's schema is version {applied}, newer than this berth \
                 knows ({known}): upgrade berth"
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
            let version = i as i32 + 1;
            let tx = client.transaction().await.map_err(pg)?;
            tx.batch_execute(sql).await.map_err(pg)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_ms) VALUES ($1, $2)",
                &[&version, &int(super::now_ms())],
            )
            .await
            .map_err(pg)?;
            tx.commit().await.map_err(pg)?;
            tracing::info!(version, "metadata schema migrated");
        }
        Ok(())
    }
    .await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&SCHEMA_LOCK])
        .await
        .map_err(pg)?;
    outcome
}

/// Listens to the changes of other nodes and tells `subscribers`, for as long as the store
/// lives; reconnects after a lost connection and then tells them [`Change::Lost`].
async fn listen(
    config: tokio_postgres::Config,
    pool: Pool,
    node: uuid::Uuid,
    subscribers: Arc<parking_lot::RwLock<Vec<Subscriber>>>,
    ready: tokio::sync::oneshot::Sender<MetaResult<()>>,
) {
    let mut ready = Some(ready);
    let mut lost = false;
    loop {
        let outcome = listen_once(&config, &pool, node, &subscribers, &mut ready, lost).await;
        if let Err(e) = outcome {
            if let Some(ready) = ready.take() {
                let _ = ready.send(Err(e));
                return;
            }
            tracing::warn!(error = %e, "metadata change listener lost its connection; reconnecting");
        }
        lost = true;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn listen_once(
    config: &tokio_postgres::Config,
    pool: &Pool,
    node: uuid::Uuid,
    subscribers: &parking_lot::RwLock<Vec<Subscriber>>,
    ready: &mut Option<tokio::sync::oneshot::Sender<MetaResult<()>>>,
    lost: bool,
) -> MetaResult<()> {
    let mut config = config.clone();
    config.application_name(LISTENER_NAME);
    let (client, mut connection) = config.connect(NoTls).await.map_err(pg)?;
    // Bounded: a listener behind on its work stops reading the connection, and the server
    // holds the notifications (its queue is on disk) instead of this node's memory.
    let (tx, mut rx) = tokio::sync::mpsc::channel(NOTICES_QUEUED);
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_owned()).await.is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "metadata change listener connection failed");
                    break;
                }
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {CHANNEL}"))
        .await
        .map_err(pg)?;
    if let Some(ready) = ready.take() {
        let _ = ready.send(Ok(()));
    }
    if lost {
        // Whatever other nodes changed while this one was not listening is unknown.
        for s in subscribers.read().iter() {
            s(Change::Lost);
        }
    }
    while let Some(payload) = rx.recv().await {
        let notice: Notice = match serde_json::from_str(&payload) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "unreadable metadata change notification ignored");
                continue;
            }
        };
        if notice.node == node {
            continue;
        }
        for change in &notice.changes {
            let value = match change {
                Owned::Record {
                    tree,
                    key,
                    fetch: true,
                    ..
                } => fetch_record(pool, tree, key).await,
                other => other.decoded_value(),
            };
            change.deliver(&subscribers.read(), value.as_deref());
        }
    }
    driver.abort();
    drop(client);
    Err(MetaError::Backend(
        "postgres: notification stream ended".into(),
    ))
}

/// A record too large for its notification, read back (`None` if gone meanwhile: a later
/// notification tells of its removal).
async fn fetch_record(pool: &Pool, tree: &str, key: &str) -> Option<Vec<u8>> {
    let client = pool.get().await.ok()?;
    client
        .query_opt(
            "SELECT value FROM records WHERE tree = $1 AND key = $2",
            &[&tree, &key.as_bytes()],
        )
        .await
        .ok()
        .flatten()
        .map(|r| r.get::<_, Vec<u8>>(0))
}

/// Creates or replaces the record `name` of a table of named records.
async fn put_named(
    tx: &Transaction<'_>,
    table: &str,
    name: &str,
    record: Vec<u8>,
) -> MetaResult<()> {
    tx.execute(
        &format!(
            "INSERT INTO {table} (name, record) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET record = EXCLUDED.record"
        ),
        &[&name, &record],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

/// Takes the write lock of `repo` until `tx` ends (every node's writers of it wait).
async fn lock_repo(tx: &Transaction<'_>, repo: &str) -> MetaResult<()> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&format!("repo:{repo}")],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

/// `repo` now holds `digest` once more (a new link or artifact): counted for its registry.
async fn hold(
    tx: &Transaction<'_>,
    repo: &str,
    digest: &Digest,
    size: u64,
    artifact: bool,
) -> MetaResult<()> {
    let registry = registry_of(repo);
    let refs: i32 = tx
        .query_one(
            "INSERT INTO holdings (registry, digest, refs, size) VALUES ($1, $2, 1, $3)
             ON CONFLICT (registry, digest) DO UPDATE SET refs = holdings.refs + 1
             RETURNING refs",
            &[&registry, &digest.as_str(), &int(size)],
        )
        .await
        .map_err(pg)?
        .get(0);
    let (bytes, blobs) = if refs == 1 { (int(size), 1i64) } else { (0, 0) };
    count(tx, registry, bytes, blobs, i64::from(artifact)).await
}

/// `repo` holds `digest` once less (a removed link or artifact).
async fn release(
    tx: &Transaction<'_>,
    repo: &str,
    digest: &Digest,
    artifact: bool,
) -> MetaResult<()> {
    let registry = registry_of(repo);
    let row = tx
        .query_opt(
            "UPDATE holdings SET refs = refs - 1 WHERE registry = $1 AND digest = $2
             RETURNING refs, size",
            &[&registry, &digest.as_str()],
        )
        .await
        .map_err(pg)?;
    let (mut bytes, mut blobs) = (0, 0);
    if let Some(row) = row {
        if row.get::<_, i32>(0) <= 0 {
            tx.execute(
                "DELETE FROM holdings WHERE registry = $1 AND digest = $2",
                &[&registry, &digest.as_str()],
            )
            .await
            .map_err(pg)?;
            bytes = -row.get::<_, i64>(1);
            blobs = -1;
        }
    }
    count(tx, registry, bytes, blobs, -i64::from(artifact)).await
}

async fn count(
    tx: &Transaction<'_>,
    registry: &str,
    bytes: i64,
    blobs: i64,
    artifacts: i64,
) -> MetaResult<()> {
    if (bytes, blobs, artifacts) == (0, 0, 0) {
        return Ok(());
    }
    tx.execute(
        "INSERT INTO usage (registry, bytes, blobs, artifacts)
         VALUES ($1, GREATEST($2::bigint, 0), GREATEST($3::bigint, 0), GREATEST($4::bigint, 0))
         ON CONFLICT (registry) DO UPDATE SET
           bytes = GREATEST(usage.bytes + $2::bigint, 0),
           blobs = GREATEST(usage.blobs + $3::bigint, 0),
           artifacts = GREATEST(usage.artifacts + $4::bigint, 0)",
        &[&registry, &bytes, &blobs, &artifacts],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

/// The first of `wanted` not among `present`.
fn first_missing<'a>(wanted: &'a [Digest], present: &HashSet<String>) -> Option<&'a Digest> {
    wanted.iter().find(|d| !present.contains(d.as_str()))
}

async fn present(
    tx: &Transaction<'_>,
    table: &str,
    repo: &str,
    digests: &[Digest],
) -> MetaResult<HashSet<String>> {
    if digests.is_empty() {
        return Ok(HashSet::new());
    }
    let wanted: Vec<&str> = digests.iter().map(Digest::as_str).collect();
    let rows = tx
        .query(
            &format!("SELECT digest FROM {table} WHERE repo = $1 AND digest = ANY($2)"),
            &[&repo, &wanted],
        )
        .await
        .map_err(pg)?;
    Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
}

/// [`MetaStore::delete_artifact`] inside `tx` (the repository's lock taken), its changes added
/// to `changes`.
async fn delete_artifact_in(
    tx: &Transaction<'_>,
    repo: &str,
    digest: &Digest,
    changes: &mut Vec<Owned>,
) -> MetaResult<Option<Vec<String>>> {
    let Some(row) = tx
        .query_opt(
            "DELETE FROM artifacts WHERE repo = $1 AND digest = $2 RETURNING record",
            &[&repo, &digest.as_str()],
        )
        .await
        .map_err(pg)?
    else {
        return Ok(None);
    };
    let record: ArtifactRecord = from_json(row.get::<_, &[u8]>(0))?;
    let mut removed: Vec<String> = tx
        .query(
            "DELETE FROM tags WHERE repo = $1 AND digest = $2 RETURNING tag",
            &[&repo, &digest.as_str()],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    removed.sort();
    if let Some(subject) = &record.subject {
        tx.execute(
            "DELETE FROM referrers WHERE repo = $1 AND subject = $2 AND referrer = $3",
            &[&repo, &subject.as_str(), &digest.as_str()],
        )
        .await
        .map_err(pg)?;
    }
    tx.execute(
        "DELETE FROM pulls WHERE repo = $1 AND digest = $2",
        &[&repo, &digest.as_str()],
    )
    .await
    .map_err(pg)?;
    release(tx, repo, digest, true).await?;
    changes.push(Owned::Artifact {
        repo: repo.into(),
        digest: digest.clone(),
    });
    for tag in &removed {
        changes.push(Owned::Tag {
            repo: repo.into(),
            tag: tag.clone(),
        });
    }
    Ok(Some(removed))
}

#[async_trait::async_trait]
impl MetaStore for PostgresMeta {
    fn subscribe(&self, subscriber: Subscriber) {
        self.subscribers.write().push(subscriber);
    }

    /// Every write is durable when its transaction commits.
    async fn flush(&self) -> MetaResult<()> {
        Ok(())
    }

    // --- registries ---

    async fn put_registry(&self, record: &RegistryRecord) -> MetaResult<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        put_named(&tx, "registries", &record.name, json(record)).await?;
        let change = Owned::Registry {
            name: record.name.clone(),
            record: Some(record.clone()),
        };
        self.commit(tx, vec![change]).await
    }

    async fn registries(&self) -> MetaResult<Vec<RegistryRecord>> {
        self.query_json("SELECT record FROM registries ORDER BY name", &[])
            .await
    }

    async fn registry(&self, name: &str) -> MetaResult<Option<RegistryRecord>> {
        self.get_json("SELECT record FROM registries WHERE name = $1", &[&name])
            .await
    }

    async fn delete_registry(&self, name: &str) -> MetaResult<()> {
        let (low, high) = registry_range(name);
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        tx.execute(
            "DELETE FROM repositories WHERE name >= $1 AND name < $2",
            &[&low, &high],
        )
        .await
        .map_err(pg)?;
        for table in ["blob_links", "artifacts", "tags", "referrers", "pulls"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE repo >= $1 AND repo < $2"),
                &[&low, &high],
            )
            .await
            .map_err(pg)?;
        }
        for table in ["holdings", "usage"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE registry = $1"),
                &[&name],
            )
            .await
            .map_err(pg)?;
        }
        tx.execute("DELETE FROM registries WHERE name = $1", &[&name])
            .await
            .map_err(pg)?;
        let change = Owned::Registry {
            name: name.into(),
            record: None,
        };
        self.commit(tx, vec![change]).await
    }

    // --- image caches ---

    async fn put_image_cache(
        &self,
        record: &ImageCacheRecord,
        credentials: Option<&CredentialRecord>,
    ) -> MetaResult<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        put_named(&tx, "image_caches", &record.name, json(record)).await?;
        match credentials.filter(|c| !c.is_empty()) {
            Some(c) => put_named(&tx, "credentials", &record.name, json(c)).await?,
            None => {
                tx.execute("DELETE FROM credentials WHERE name = $1", &[&record.name])
                    .await
                    .map_err(pg)?;
            }
        }
        self.commit(tx, Vec::new()).await
    }

    async fn image_caches(&self) -> MetaResult<Vec<ImageCacheRecord>> {
        self.query_json("SELECT record FROM image_caches ORDER BY name", &[])
            .await
    }

    async fn image_cache(&self, name: &str) -> MetaResult<Option<ImageCacheRecord>> {
        self.get_json("SELECT record FROM image_caches WHERE name = $1", &[&name])
            .await
    }

    async fn credentials(&self, image_cache: &str) -> MetaResult<Option<CredentialRecord>> {
        self.get_json(
            "SELECT record FROM credentials WHERE name = $1",
            &[&image_cache],
        )
        .await
    }

    async fn delete_image_cache(&self, name: &str) -> MetaResult<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        tx.execute("DELETE FROM credentials WHERE name = $1", &[&name])
            .await
            .map_err(pg)?;
        let n = tx
            .execute("DELETE FROM image_caches WHERE name = $1", &[&name])
            .await
            .map_err(pg)?;
        self.commit(tx, Vec::new()).await?;
        Ok(n > 0)
    }

    // --- repositories ---

    async fn repositories(
        &self,
        registry: Option<&str>,
        last: Option<&str>,
        n: usize,
    ) -> MetaResult<Vec<String>> {
        let (low, high) = match registry {
            Some(r) => {
                let (low, high) = registry_range(r);
                (Some(low), Some(high))
            }
            None => (None, None),
        };
        self.query_strings(
            "SELECT name FROM repositories
             WHERE ($1::text IS NULL OR (name >= $1 AND name < $2))
               AND ($3::text IS NULL OR name > $3)
             ORDER BY name LIMIT $4",
            &[&low, &high, &last, &limit(n)],
        )
        .await
    }

    async fn repo_exists(&self, repo: &str) -> MetaResult<bool> {
        Ok(self
            .get_i64(
                "SELECT 1::bigint FROM repositories WHERE name = $1",
                &[&repo],
            )
            .await?
            .is_some())
    }

    async fn remove_repo_if_empty(&self, repo: &str) -> MetaResult<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        lock_repo(&tx, repo).await?;
        let n = tx
            .execute(
                "DELETE FROM repositories WHERE name = $1
                 AND NOT EXISTS (SELECT 1 FROM artifacts WHERE repo = $1)",
                &[&repo],
            )
            .await
            .map_err(pg)?;
        self.commit(tx, Vec::new()).await?;
        Ok(n > 0)
    }

    // --- blob links ---

    async fn link_blob(&self, repo: &str, digest: &Digest, size: u64) -> MetaResult<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        let inserted: bool = tx
            .query_one(
                "INSERT INTO blob_links (repo, digest, size) VALUES ($1, $2, $3)
                 ON CONFLICT (repo, digest) DO UPDATE SET size = EXCLUDED.size
                 RETURNING (xmax = 0)",
                &[&repo, &digest.as_str(), &int(size)],
            )
            .await
            .map_err(pg)?
            .get(0);
        if inserted {
            hold(&tx, repo, digest, size, false).await?;
        }
        self.commit(tx, Vec::new()).await
    }

    async fn blob_link(&self, repo: &str, digest: &Digest) -> MetaResult<Option<u64>> {
        Ok(self
            .get_i64(
                "SELECT size FROM blob_links WHERE repo = $1 AND digest = $2",
                &[&repo, &digest.as_str()],
            )
            .await?
            .map(|s| s.max(0) as u64))
    }

    async fn unlink_blob(&self, repo: &str, digest: &Digest) -> MetaResult<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        let n = tx
            .execute(
                "DELETE FROM blob_links WHERE repo = $1 AND digest = $2",
                &[&repo, &digest.as_str()],
            )
            .await
            .map_err(pg)?;
        if n > 0 {
            release(&tx, repo, digest, false).await?;
        }
        self.commit(tx, Vec::new()).await?;
        Ok(n > 0)
    }

    async fn referenced(&self) -> MetaResult<HashSet<Digest>> {
        self.query_strings(
            "SELECT digest FROM blob_links UNION SELECT digest FROM artifacts",
            &[],
        )
        .await?
        .iter()
        .map(|d| digest(d))
        .collect()
    }

    async fn linked_blobs(
        &self,
        repo: &str,
        after: Option<&Digest>,
        n: usize,
    ) -> MetaResult<Vec<Digest>> {
        let after = after.map_or("", Digest::as_str);
        self.query_strings(
            "SELECT digest FROM blob_links WHERE repo = $1 AND digest > $2
             ORDER BY digest LIMIT $3",
            &[&repo, &after, &limit(n)],
        )
        .await?
        .iter()
        .map(|d| digest(d))
        .collect()
    }

    // --- artifacts, tags, referrers ---

    async fn put_artifact(
        &self,
        repo: &str,
        digest: &Digest,
        record: &ArtifactRecord,
        tag: Option<&str>,
        referrer: Option<&Descriptor>,
        refers: &Refers,
    ) -> MetaResult<Result<(), Missing>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        lock_repo(&tx, repo).await?;
        let blobs = present(&tx, "blob_links", repo, &refers.blobs).await?;
        if let Some(missing) = first_missing(&refers.blobs, &blobs) {
            return Ok(Err(Missing::Blob(missing.clone())));
        }
        let manifests = present(&tx, "artifacts", repo, &refers.manifests).await?;
        if let Some(missing) = first_missing(&refers.manifests, &manifests) {
            return Ok(Err(Missing::Manifest(missing.clone())));
        }
        tx.execute(
            "INSERT INTO repositories (name, created_ms) VALUES ($1, $2)
             ON CONFLICT (name) DO NOTHING",
            &[&repo, &int(record.pushed_ms)],
        )
        .await
        .map_err(pg)?;
        // The first push time of an artifact pushed again (under a new tag) is kept.
        let inserted = tx
            .execute(
                "INSERT INTO artifacts (repo, digest, record) VALUES ($1, $2, $3)
                 ON CONFLICT (repo, digest) DO NOTHING",
                &[&repo, &digest.as_str(), &json(record)],
            )
            .await
            .map_err(pg)?;
        if inserted > 0 {
            hold(&tx, repo, digest, record.size, true).await?;
        }
        if let (Some(subject), Some(desc)) = (&record.subject, referrer) {
            tx.execute(
                "INSERT INTO referrers (repo, subject, referrer, descriptor)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (repo, subject, referrer) DO UPDATE SET descriptor = EXCLUDED.descriptor",
                &[&repo, &subject.as_str(), &digest.as_str(), &json(desc)],
            )
            .await
            .map_err(pg)?;
        }
        let mut changes = vec![Owned::Artifact {
            repo: repo.into(),
            digest: digest.clone(),
        }];
        if let Some(tag) = tag {
            tx.execute(
                "INSERT INTO tags (repo, tag, digest) VALUES ($1, $2, $3)
                 ON CONFLICT (repo, tag) DO UPDATE SET digest = EXCLUDED.digest",
                &[&repo, &tag, &digest.as_str()],
            )
            .await
            .map_err(pg)?;
            changes.push(Owned::Tag {
                repo: repo.into(),
                tag: tag.into(),
            });
        }
        self.commit(tx, changes).await?;
        Ok(Ok(()))
    }

    async fn artifact(&self, repo: &str, digest: &Digest) -> MetaResult<Option<ArtifactRecord>> {
        self.get_json(
            "SELECT record FROM artifacts WHERE repo = $1 AND digest = $2",
            &[&repo, &digest.as_str()],
        )
        .await
    }

    async fn delete_artifact(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> MetaResult<Option<Vec<String>>> {
        Ok(self
            .delete_artifacts(repo, std::slice::from_ref(digest))
            .await?
            .pop()
            .flatten())
    }

    async fn delete_artifacts(
        &self,
        repo: &str,
        digests: &[Digest],
    ) -> MetaResult<Vec<Option<Vec<String>>>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        lock_repo(&tx, repo).await?;
        let mut changes = Vec::new();
        let mut out = Vec::with_capacity(digests.len());
        for d in digests {
            out.push(delete_artifact_in(&tx, repo, d, &mut changes).await?);
        }
        self.commit(tx, changes).await?;
        Ok(out)
    }

    async fn artifacts(
        &self,
        repo: &str,
        after: Option<&Digest>,
        n: usize,
    ) -> MetaResult<Vec<(Digest, ArtifactRecord)>> {
        let after = after.map_or("", Digest::as_str);
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT digest, record FROM artifacts WHERE repo = $1 AND digest > $2
                 ORDER BY digest LIMIT $3",
                &[&repo, &after, &limit(n)],
            )
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|r| Ok((digest(r.get(0))?, from_json(r.get::<_, &[u8]>(1))?)))
            .collect()
    }

    async fn tag(&self, repo: &str, tag: &str) -> MetaResult<Option<Digest>> {
        self.query_strings(
            "SELECT digest FROM tags WHERE repo = $1 AND tag = $2",
            &[&repo, &tag],
        )
        .await?
        .first()
        .map(|d| digest(d))
        .transpose()
    }

    async fn tag_artifact(&self, repo: &str, digest: &Digest, tag: &str) -> MetaResult<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        lock_repo(&tx, repo).await?;
        let n = tx
            .execute(
                "INSERT INTO tags (repo, tag, digest)
                 SELECT $1, $2, $3 WHERE EXISTS
                   (SELECT 1 FROM artifacts WHERE repo = $1 AND digest = $3)
                 ON CONFLICT (repo, tag) DO UPDATE SET digest = EXCLUDED.digest",
                &[&repo, &tag, &digest.as_str()],
            )
            .await
            .map_err(pg)?;
        let changes = if n > 0 {
            vec![Owned::Tag {
                repo: repo.into(),
                tag: tag.into(),
            }]
        } else {
            Vec::new()
        };
        self.commit(tx, changes).await?;
        Ok(n > 0)
    }

    async fn delete_tag(&self, repo: &str, tag: &str) -> MetaResult<Option<Digest>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        lock_repo(&tx, repo).await?;
        let row = tx
            .query_opt(
                "DELETE FROM tags WHERE repo = $1 AND tag = $2 RETURNING digest",
                &[&repo, &tag],
            )
            .await
            .map_err(pg)?;
        let changes = if row.is_some() {
            vec![Owned::Tag {
                repo: repo.into(),
                tag: tag.into(),
            }]
        } else {
            Vec::new()
        };
        self.commit(tx, changes).await?;
        row.map(|r| digest(r.get(0))).transpose()
    }

    async fn tags(&self, repo: &str, last: Option<&str>, n: usize) -> MetaResult<Vec<String>> {
        self.query_strings(
            "SELECT tag FROM tags WHERE repo = $1 AND tag > $2 ORDER BY tag LIMIT $3",
            &[&repo, &last.unwrap_or(""), &limit(n)],
        )
        .await
    }

    async fn tagged(&self, repo: &str) -> MetaResult<Vec<(String, Digest)>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT tag, digest FROM tags WHERE repo = $1 ORDER BY tag",
                &[&repo],
            )
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|r| Ok((r.get(0), digest(r.get(1))?)))
            .collect()
    }

    async fn referrers(
        &self,
        repo: &str,
        subject: &Digest,
        after: Option<&Digest>,
        n: usize,
    ) -> MetaResult<Vec<Descriptor>> {
        self.query_json(
            "SELECT descriptor FROM referrers
             WHERE repo = $1 AND subject = $2 AND referrer > $3
             ORDER BY referrer LIMIT $4",
            &[
                &repo,
                &subject.as_str(),
                &after.map_or("", Digest::as_str),
                &limit(n),
            ],
        )
        .await
    }

    // --- pull times ---

    async fn record_pulls(&self, batch: &[(Arc<str>, u64)]) -> MetaResult<()> {
        // One row per artifact (the latest time), as one statement.
        let mut latest: HashMap<(&str, &str), i64> = HashMap::new();
        for (key, at) in batch {
            if let Some((repo, digest)) = key.split_once('\0') {
                let at = int(*at);
                let slot = latest.entry((repo, digest)).or_insert(at);
                *slot = (*slot).max(at);
            }
        }
        let (mut repos, mut digests, mut times) = (Vec::new(), Vec::new(), Vec::new());
        for ((repo, digest), at) in latest {
            repos.push(repo);
            digests.push(digest);
            times.push(at);
        }
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO pulls (repo, digest, at_ms)
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[])
                 ON CONFLICT (repo, digest) DO UPDATE SET at_ms = EXCLUDED.at_ms",
                &[&repos, &digests, &times],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn last_pull(&self, repo: &str, digest: &Digest) -> MetaResult<Option<u64>> {
        Ok(self
            .get_i64(
                "SELECT at_ms FROM pulls WHERE repo = $1 AND digest = $2",
                &[&repo, &digest.as_str()],
            )
            .await?
            .map(|t| t.max(0) as u64))
    }

    async fn last_pulls(&self, repo: &str) -> MetaResult<HashMap<Digest, u64>> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT digest, at_ms FROM pulls WHERE repo = $1", &[&repo])
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|r| Ok((digest(r.get(0))?, r.get::<_, i64>(1).max(0) as u64)))
            .collect()
    }

    // --- typed records ---

    async fn record_put(&self, tree: &str, key: &str, value: Vec<u8>) -> MetaResult<()> {
        self.record_put_many(tree, vec![(key.to_owned(), value)])
            .await
    }

    async fn record_put_many(&self, tree: &str, entries: Vec<(String, Vec<u8>)>) -> MetaResult<()> {
        // The last value of a key put twice wins, as it would one put after the other.
        let mut unique: HashMap<&str, &[u8]> = HashMap::new();
        for (key, value) in &entries {
            unique.insert(key, value);
        }
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for (key, value) in &unique {
            keys.push(key.as_bytes());
            values.push(*value);
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        tx.execute(
            "INSERT INTO records (tree, key, value)
             SELECT $1, k, v FROM UNNEST($2::bytea[], $3::bytea[]) AS t(k, v)
             ON CONFLICT (tree, key) DO UPDATE SET value = EXCLUDED.value",
            &[&tree, &keys, &values],
        )
        .await
        .map_err(pg)?;
        let changes = entries
            .iter()
            .map(|(key, value)| Owned::record(tree, key, Some(value)))
            .collect();
        self.commit(tx, changes).await
    }

    async fn record_create(&self, tree: &str, key: &str, value: Vec<u8>) -> MetaResult<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        let created = tx
            .execute(
                "INSERT INTO records (tree, key, value) VALUES ($1, $2, $3)
                 ON CONFLICT (tree, key) DO NOTHING",
                &[&tree, &key.as_bytes(), &value],
            )
            .await
            .map_err(pg)?
            > 0;
        let changes = if created {
            vec![Owned::record(tree, key, Some(&value))]
        } else {
            Vec::new()
        };
        self.commit(tx, changes).await?;
        Ok(created)
    }

    async fn sequence_next(&self, name: &str, floor: u64) -> MetaResult<u64> {
        let client = self.client().await?;
        let next: i64 = client
            .query_one(
                "INSERT INTO sequences (name, value) VALUES ($1, $2::bigint + 1)
                 ON CONFLICT (name) DO UPDATE SET value = GREATEST(sequences.value, $2::bigint) + 1
                 RETURNING value",
                &[&name, &int(floor)],
            )
            .await
            .map_err(pg)?
            .get(0);
        Ok(next.max(0) as u64)
    }

    async fn lease_take(&self, name: &str, holder: &str, ttl: Duration) -> MetaResult<Lease> {
        let client = self.client().await?;
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        // Taken (or renewed) when free, expired or ours; otherwise the row as it stands. The
        // outer SELECT sees the snapshot from before the statement: when a racing taker
        // inserted the row meanwhile, neither branch has it, and a second statement (with a
        // new snapshot) reads it.
        for _ in 0..3 {
            let row = client
                .query_opt(
                    "WITH taken AS (
                         INSERT INTO leases (name, holder, expires)
                         VALUES ($1, $2, now() + $3::bigint * interval '1 millisecond')
                         ON CONFLICT (name) DO UPDATE
                             SET holder = EXCLUDED.holder, expires = EXCLUDED.expires
                             WHERE leases.holder = EXCLUDED.holder OR leases.expires <= now()
                         RETURNING holder, expires)
                     SELECT holder, GREATEST(0, (EXTRACT(EPOCH FROM expires - now()) * 1000))::bigint
                         FROM taken
                     UNION ALL
                     SELECT holder, GREATEST(0, (EXTRACT(EPOCH FROM expires - now()) * 1000))::bigint
                         FROM leases WHERE name = $1 AND NOT EXISTS (SELECT 1 FROM taken)",
                    &[&name, &holder, &ttl_ms],
                )
                .await
                .map_err(pg)?;
            let row = match row {
                Some(row) => Some(row),
                None => client
                    .query_opt(
                        "SELECT holder, GREATEST(0, (EXTRACT(EPOCH FROM expires - now()) * 1000))::bigint
                             FROM leases WHERE name = $1",
                        &[&name],
                    )
                    .await
                    .map_err(pg)?,
            };
            // Gone again too (taken and released in between): free, try again.
            let Some(row) = row else { continue };
            let remaining: i64 = row.get(1);
            return Ok(Lease {
                holder: row.get(0),
                remaining: Duration::from_millis(remaining.max(0) as u64),
            });
        }
        Err(MetaError::Backend(format!(
            "lease {name}: taken and released three times while asking"
        )))
    }

    async fn lease_release(&self, name: &str, holder: &str) -> MetaResult<()> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM leases WHERE name = $1 AND holder = $2",
                &[&name, &holder],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    fn shared(&self) -> bool {
        true
    }

    fn refresh(&self) -> Option<Duration> {
        Some(self.refresh)
    }

    async fn record_get(&self, tree: &str, key: &str) -> MetaResult<Option<Vec<u8>>> {
        let client = self.client().await?;
        Ok(client
            .query_opt(
                "SELECT value FROM records WHERE tree = $1 AND key = $2",
                &[&tree, &key.as_bytes()],
            )
            .await
            .map_err(pg)?
            .map(|r| r.get(0)))
    }

    async fn record_remove(&self, tree: &str, key: &str) -> MetaResult<Option<Vec<u8>>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        let removed: Option<Vec<u8>> = tx
            .query_opt(
                "DELETE FROM records WHERE tree = $1 AND key = $2 RETURNING value",
                &[&tree, &key.as_bytes()],
            )
            .await
            .map_err(pg)?
            .map(|r| r.get(0));
        let changes = match removed {
            Some(_) => vec![Owned::record(tree, key, None)],
            None => Vec::new(),
        };
        self.commit(tx, changes).await?;
        Ok(removed)
    }

    async fn record_list(
        &self,
        tree: &str,
        prefix: &str,
        after: Option<&str>,
        n: usize,
    ) -> MetaResult<Vec<(String, Vec<u8>)>> {
        let mut low = prefix.as_bytes().to_vec();
        let exclusive = after.is_some();
        if let Some(a) = after {
            low.extend_from_slice(a.as_bytes());
        }
        let high = prefix_end(prefix.as_bytes());
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT key, value FROM records
                 WHERE tree = $1
                   AND (key > $2 OR (NOT $3 AND key = $2))
                   AND ($4::bytea IS NULL OR key < $4)
                 ORDER BY key LIMIT $5",
                &[&tree, &low, &exclusive, &high, &limit(n)],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|r| {
                let key: &[u8] = r.get(0);
                (
                    String::from_utf8_lossy(&key[prefix.len()..]).into_owned(),
                    r.get(1),
                )
            })
            .collect())
    }

    async fn record_remove_prefix(&self, tree: &str, prefix: &str) -> MetaResult<usize> {
        let high = prefix_end(prefix.as_bytes());
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        let rows = tx
            .query(
                "DELETE FROM records WHERE tree = $1 AND key >= $2
                   AND ($3::bytea IS NULL OR key < $3)
                 RETURNING key",
                &[&tree, &prefix.as_bytes(), &high],
            )
            .await
            .map_err(pg)?;
        let mut keys: Vec<String> = rows
            .iter()
            .map(|r| String::from_utf8_lossy(r.get::<_, &[u8]>(0)).into_owned())
            .collect();
        keys.sort();
        let changes = keys
            .iter()
            .map(|key| Owned::record(tree, key, None))
            .collect();
        self.commit(tx, changes).await?;
        Ok(keys.len())
    }

    async fn usage(&self) -> MetaResult<Vec<(String, Usage)>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT registry, bytes, blobs, artifacts FROM usage
                 WHERE blobs > 0 OR artifacts > 0 ORDER BY registry",
                &[],
            )
            .await
            .map_err(pg)?;
        Ok(rows.iter().map(|r| (r.get(0), usage_of(r, 1))).collect())
    }

    async fn registry_usage(&self, registry: &str) -> MetaResult<Usage> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT bytes, blobs, artifacts FROM usage WHERE registry = $1",
                &[&registry],
            )
            .await
            .map_err(pg)?;
        Ok(row.map(|r| usage_of(&r, 0)).unwrap_or_default())
    }

    async fn shared_blobs(&self, registry: &str) -> MetaResult<u64> {
        Ok(self
            .get_i64(
                "SELECT count(*) FROM holdings h WHERE h.registry = $1 AND EXISTS
                   (SELECT 1 FROM holdings o WHERE o.digest = h.digest AND o.registry <> $1)",
                &[&registry],
            )
            .await?
            .unwrap_or(0)
            .max(0) as u64)
    }

    async fn record_trees(&self) -> MetaResult<Vec<String>> {
        self.query_strings("SELECT DISTINCT tree FROM records ORDER BY tree", &[])
            .await
    }
}

fn usage_of(row: &tokio_postgres::Row, first: usize) -> Usage {
    let at = |i: usize| row.get::<_, i64>(first + i).max(0) as u64;
    Usage {
        bytes: at(0),
        blobs: at(1),
        artifacts: at(2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::meta::Records;

    #[test]
    fn the_password_is_never_shown() {
        for url in [
            "postgres://berth:s3cret@db.example:5432/berth",
            "host=db.example user=berth password=s3cret dbname=berth",
        ] {
            let s = PostgresSettings {
                url: url.into(),
                password_file: None,
                pool_size: 1,
                timeout: Duration::from_secs(1),
                refresh: Duration::from_secs(60),
            };
            let shown = format!("{s:?} {}", s.redacted().url);
            assert!(
                !shown.contains("s3cret") && shown.contains("db.example"),
                "{shown}"
            );
        }
    }

    #[test]
    fn settings_are_checked_without_showing_the_password() {
        let bad = PostgresSettings {
            url: "postgres://berth:s3cret@db.example:notaport/berth".into(),
            password_file: None,
            pool_size: 1,
            timeout: Duration::from_secs(1),
            refresh: Duration::from_secs(60),
        };
        let said = bad.validate().unwrap_err();
        assert!(
            said.contains("not a PostgreSQL URL") && !said.contains("s3cret"),
            "{said}"
        );
        let none = PostgresSettings {
            url: "postgres://db.example/berth".into(),
            pool_size: 0,
            ..bad
        };
        assert!(none.validate().unwrap_err().contains("pool_size"));
    }

    async fn settings() -> PostgresSettings {
        PostgresSettings {
            url: crate::testbed::postgres().database().await,
            password_file: None,
            pool_size: 8,
            timeout: Duration::from_secs(10),
            refresh: Duration::from_secs(60),
        }
    }

    /// Collects what subscribers are told, as text.
    fn recorder(meta: &PostgresMeta) -> Arc<parking_lot::Mutex<Vec<String>>> {
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let sink = seen.clone();
        meta.subscribe(Box::new(move |change| {
            sink.lock().push(match change {
                Change::Tag { repo, tag } => format!("tag {repo}:{tag}"),
                Change::Artifact { repo, digest } => format!("artifact {repo}@{digest}"),
                Change::Registry { name, record } => {
                    format!("registry {name} {}", record.is_some())
                }
                Change::Record { tree, key, value } => {
                    format!("record {tree}/{key} {}", value.map_or(0, <[u8]>::len))
                }
                Change::Lost => "lost".into(),
            })
        }));
        seen
    }

    async fn wait_for(seen: &parking_lot::Mutex<Vec<String>>, want: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !seen.lock().iter().any(|s| s == want) {
            assert!(
                std::time::Instant::now() < deadline,
                "{want:?} never told; told {:?}",
                seen.lock()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn passes_the_metadata_conformance_suite() {
        let meta = PostgresMeta::open(&settings().await).await.unwrap();
        crate::store::meta::conformance::meta_store(Arc::new(meta)).await;
    }

    #[tokio::test]
    async fn a_change_on_one_node_reaches_the_subscribers_of_another() {
        let settings = settings().await;
        let a = PostgresMeta::open(&settings).await.unwrap();
        let b = PostgresMeta::open(&settings).await.unwrap();
        let (seen_a, seen_b) = (recorder(&a), recorder(&b));
        let d = Digest::sha256(b"m");
        let record = ArtifactRecord {
            media_type: "m".into(),
            size: 1,
            pushed_ms: 1,
            artifact_type: None,
            subject: None,
        };
        let started = std::time::Instant::now();
        a.put_artifact("r/x", &d, &record, Some("v1"), None, &Refers::default())
            .await
            .unwrap()
            .unwrap();
        wait_for(&seen_b, "tag r/x:v1").await;
        let lag = started.elapsed();
        assert!(seen_b.lock().contains(&format!("artifact r/x@{d}")));
        // The writer's own subscribers are told once, at the write, not again by the echo.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            seen_a.lock().clone(),
            [format!("artifact r/x@{d}"), "tag r/x:v1".to_string()]
        );
        // A record too large for a notification arrives whole: read back by the receiver.
        let users: Records<String> = Records::new(Arc::new(a), "users");
        let big = "x".repeat(20_000);
        users.put(&["alice"], &big).await.unwrap();
        wait_for(&seen_b, "record users/alice 20002").await;
        users.remove(&["alice"]).await.unwrap();
        wait_for(&seen_b, "record users/alice 0").await;
        eprintln!("notification lag: {lag:?}");
    }

    #[tokio::test]
    async fn a_lost_listener_reconnects_and_says_changes_were_lost() {
        let settings = settings().await;
        let a = PostgresMeta::open(&settings).await.unwrap();
        let b = PostgresMeta::open(&settings).await.unwrap();
        let seen_b = recorder(&b);
        let client = a.client().await.unwrap();
        let killed = client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE application_name = $1 AND datname = current_database()",
                &[&LISTENER_NAME],
            )
            .await
            .unwrap();
        assert_eq!(killed, 2, "both nodes' listeners");
        wait_for(&seen_b, "lost").await;
        // Listening again: later changes arrive.
        a.put_registry(&RegistryRecord {
            name: "lib".into(),
            kind: crate::store::meta::RegistryKind::Normal,
            created_ms: 1,
            cache: None,
            public_uri: true,
            anonymous_pull: false,
            quota_bytes: None,
        })
        .await
        .unwrap();
        wait_for(&seen_b, "registry lib true").await;
    }

    #[tokio::test]
    async fn nodes_migrate_the_schema_once_and_refuse_a_newer_one() {
        let settings = settings().await;
        let (a, b) = tokio::join!(PostgresMeta::open(&settings), PostgresMeta::open(&settings));
        let (a, _b) = (a.unwrap(), b.unwrap());
        let client = a.client().await.unwrap();
        let versions: i64 = client
            .query_one("SELECT count(*) FROM schema_migrations", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(versions, MIGRATIONS.len() as i64);
        client
            .execute(
                "INSERT INTO schema_migrations (version, applied_ms) VALUES (999, 0)",
                &[],
            )
            .await
            .unwrap();
        let refused = PostgresMeta::open(&settings).await.err().unwrap();
        assert!(refused.to_string().contains("upgrade berth"), "{refused}");
    }

    #[test]
    fn notices_stay_under_the_payload_limit() {
        let node = uuid::Uuid::new_v4();
        let many: Vec<Owned> = (0..500)
            .map(|i| Owned::Tag {
                repo: "r/x".into(),
                tag: format!("tag-{i}"),
            })
            .chain([Owned::record("users", "big", Some(&[b'x'; 9000]))])
            .collect();
        let sent = notices(node, &many);
        assert!(sent.len() > 1);
        let mut back = Vec::new();
        for payload in &sent {
            assert!(payload.len() <= PAYLOAD_LIMIT, "{}", payload.len());
            back.extend(serde_json::from_str::<Notice>(payload).unwrap().changes);
        }
        assert_eq!(back.len(), many.len());
        assert!(matches!(
            back.last(),
            Some(Owned::Record {
                fetch: true,
                value: None,
                ..
            })
        ));
    }
}
