//! Streams a request body into a blob writer: large buffered writes on the blocking pool,
//! hashing in the same pass, one write in flight while the next buffer fills.

use bytes::BytesMut;
use hyper::body::Incoming;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::http::body::next_frame;
use crate::store::blobs::BlobWriter;

/// Bytes gathered before one write.
const WRITE_CHUNK: usize = 2 << 20;

type Pending = JoinHandle<(BlobWriter, std::io::Result<()>)>;

/// Waits for the write in flight. A storage error comes back with the writer, which is still
/// consistent (writes are all or nothing); only a panicked write task loses it.
async fn settle(pending: Pending) -> (Option<BlobWriter>, Result<()>) {
    match pending.await {
        Ok((writer, outcome)) => (Some(writer), outcome.map_err(Error::from)),
        Err(e) => (None, Err(Error::Internal(format!("blob writer task: {e}")))),
    }
}

fn spawn_write(mut writer: BlobWriter, chunk: bytes::Bytes) -> Pending {
    tokio::task::spawn_blocking(move || {
        let r = writer.write(&chunk);
        (writer, r)
    })
}

/// Appends the body to `writer`, at most `max` bytes (the length the client announced, by
/// `Content-Length` or `Content-Range`; bodies without one, chunked or HTTP/2, are read to their
/// end). Bytes that arrived before a failure are written and hashed, so the writer's count and
/// hash always agree; a body longer than `max` stops before the excess is written. The caller
/// compares `writer.written` with what it expected. A body that sends nothing for
/// `limits.body_idle_timeout` is cut. Returns the writer back (`None` only if a write task
/// panicked) and how the body ended.
pub async fn receive(
    mut body: Incoming,
    writer: BlobWriter,
    max: Option<u64>,
) -> (Option<BlobWriter>, Result<()>) {
    let mut buf = BytesMut::new();
    // Exactly one of `idle` and `pending` holds the writer.
    let mut idle = Some(writer);
    let mut pending: Option<Pending> = None;
    let mut received: u64 = 0;
    let mut outcome = Ok(());
    loop {
        let frame = match next_frame(&mut body).await {
            None => break,
            Some(Err(e)) => {
                outcome = Err(Error::BlobUploadInvalid(e.to_string()));
                break;
            }
            Some(Ok(frame)) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        received += data.len() as u64;
        if let Some(max) = max.filter(|&m| received > m) {
            outcome = Err(Error::SizeInvalid(format!(
                "body is longer than the {max} bytes announced"
            )));
            break;
        }
        if buf.is_empty() {
            buf.reserve(WRITE_CHUNK);
        }
        buf.extend_from_slice(&data);
        if buf.len() >= WRITE_CHUNK {
            if let Some(p) = pending.take() {
                match settle(p).await {
                    (w, Ok(())) => idle = w,
                    failed => return failed,
                }
            }
            let Some(writer) = idle.take() else {
                return (None, Err(Error::Internal("blob writer lost".into())));
            };
            pending = Some(spawn_write(writer, buf.split().freeze()));
        }
    }
    if let Some(p) = pending.take() {
        match settle(p).await {
            (w, Ok(())) => idle = w,
            failed => return failed,
        }
    }
    let Some(writer) = idle else {
        return (None, Err(Error::Internal("blob writer lost".into())));
    };
    if buf.is_empty() {
        return (Some(writer), outcome);
    }
    match settle(spawn_write(writer, buf.freeze())).await {
        (w, Ok(())) => (w, outcome),
        failed => failed,
    }
}
