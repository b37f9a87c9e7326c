//! Streams a request body into a blob writer: large buffered writes on the blocking pool,
//! hashing in the same pass, one write in flight while the next buffer fills.

use std::time::Duration;

use bytes::BytesMut;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::store::blobs::BlobWriter;

/// Bytes gathered before one write.
const WRITE_CHUNK: usize = 2 << 20;
/// Longest a client may send nothing in the middle of a body.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

type Pending = JoinHandle<(BlobWriter, std::io::Result<()>)>;

async fn settle(pending: Pending) -> Result<BlobWriter> {
    let (writer, outcome) = pending
        .await
        .map_err(|e| Error::Internal(format!("blob writer task: {e}")))?;
    outcome?;
    Ok(writer)
}

fn spawn_write(mut writer: BlobWriter, chunk: bytes::Bytes) -> Pending {
    tokio::task::spawn_blocking(move || {
        let r = writer.write(&chunk);
        (writer, r)
    })
}

/// Appends the whole body to `writer`. Every byte that arrived is written and hashed even when
/// the body fails midway, so the writer's count and hash always agree (a session can resume).
/// Returns the writer back and how the body ended. `None` writer means a storage failure lost it.
pub async fn receive(
    mut body: Incoming,
    writer: BlobWriter,
    limit: Option<u64>,
) -> (Option<BlobWriter>, Result<()>) {
    let mut buf = BytesMut::new();
    let mut idle = Some(writer);
    let mut pending: Option<Pending> = None;
    let mut received: u64 = 0;
    let mut outcome = Ok(());
    loop {
        let frame = match tokio::time::timeout(IDLE_TIMEOUT, body.frame()).await {
            Err(_) => {
                outcome = Err(Error::BlobUploadInvalid(
                    "client sent nothing for 120 s".into(),
                ));
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                outcome = Err(Error::BlobUploadInvalid(format!(
                    "request body ended early: {e}"
                )));
                break;
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        received += data.len() as u64;
        if limit.is_some_and(|l| received > l) {
            outcome = Err(Error::SizeInvalid(format!(
                "body is longer than the {} bytes announced",
                limit.unwrap_or(0)
            )));
            break;
        }
        if buf.is_empty() {
            buf.reserve(WRITE_CHUNK);
        }
        buf.extend_from_slice(&data);
        if buf.len() >= WRITE_CHUNK {
            let writer = match pending.take() {
                Some(p) => match settle(p).await {
                    Ok(w) => w,
                    Err(e) => return (None, Err(e)),
                },
                None => idle.take().expect("writer is idle when nothing is pending"),
            };
            pending = Some(spawn_write(writer, buf.split().freeze()));
        }
    }
    let mut writer = match pending.take() {
        Some(p) => match settle(p).await {
            Ok(w) => w,
            Err(e) => return (None, Err(e)),
        },
        None => idle.take().expect("writer is idle when nothing is pending"),
    };
    if !buf.is_empty() {
        match settle(spawn_write(writer, buf.freeze())).await {
            Ok(w) => writer = w,
            Err(e) => return (None, Err(e)),
        }
    }
    (Some(writer), outcome)
}
