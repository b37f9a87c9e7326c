//! Streams a request body into a blob write: large writes, each hashed once written (a
//! [`Pipeline`]), while the next buffer fills.

use crate::http::req::RequestBody;

use crate::error::{Error, Result};
use crate::http::body::next_frame;
use crate::store::blobs::{HashingWrite, Pieces, Pipeline};

/// Bytes gathered before one write.
const WRITE_CHUNK: usize = 2 << 20;

/// Appends the body to `writer`, at most `max` bytes (the length the client announced, by
/// `Content-Length` or `Content-Range`; bodies without one, chunked or HTTP/2, are read to their
/// end). Bytes that arrived before a failure are written and hashed, so the writer's count and
/// hash always agree; a body longer than `max` stops before the excess is written. The caller
/// compares `writer.written()` with what it expected. A body that sends nothing for
/// `limits.body_idle_timeout` is cut. Returns the writer back (`None` only if a write task
/// panicked) and how the body ended.
pub async fn receive(
    mut body: impl RequestBody,
    writer: HashingWrite,
    max: Option<u64>,
) -> (Option<HashingWrite>, Result<()>) {
    // Frames as they arrived, written together with one `pwritev` (no copy into one buffer).
    let mut buf = Pieces::default();
    let mut pipe = Pipeline::new(writer);
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
        buf.push(data);
        if buf.len() >= WRITE_CHUNK {
            if let Err(e) = pipe.submit(buf.take()).await {
                return (pipe.take().ok(), Err(e.into()));
            }
        }
    }
    // Counted once per body (not per frame): what clients sent, kept or not.
    metrics::counter!("berth_upload_received_bytes_total").increment(received);
    let mut last = pipe.submit(buf).await;
    if last.is_ok() {
        last = pipe.settle().await;
    }
    let writer = pipe.take().ok();
    if writer.is_none() {
        return (None, Err(Error::Internal("blob writer lost".into())));
    }
    match last {
        Ok(()) => (writer, outcome),
        Err(e) => (writer, Err(e.into())),
    }
}
