//! Streaming a raw body into its `Body` as it arrives, and resuming a body cut short without
//! ever mixing the bytes of two versions.

use super::*;

impl HttpSource {
    /// Reads a streamed body into `filler` as it arrives, within the fetch's deadline. A body
    /// cut short is asked for again (as often as a GET is retried): the new answer must
    /// announce the same length, ETag and type and repeat the bytes already read, or the
    /// readers get an error rather than a mix of two versions.
    pub(super) async fn fill(
        self: Arc<Self>,
        mut response: reqwest::Response,
        mut filler: Filler,
        resume: Resume,
        deadline: Instant,
        mut permit: Permit,
    ) {
        let len = response.content_length().unwrap_or(0);
        let changed = || SourceError::BadBody("the Binary changed while it was being read".into());
        let mut resumes = 0;
        // Where the current response is in the body.
        let mut at = 0u64;
        loop {
            let chunk = tokio::time::timeout_at(deadline.into(), response.chunk()).await;
            let error = match chunk {
                Ok(Ok(Some(chunk))) => {
                    if filler.abandoned() {
                        debug!(url = %resume.url, "nobody reads this body any more: stopped");
                        return;
                    }
                    let repeated = filler.written().saturating_sub(at).min(chunk.len() as u64);
                    if !filler.matches(at, &chunk[..repeated as usize]) {
                        return filler.fail(changed());
                    }
                    at += chunk.len() as u64;
                    if let Err(e) = filler.push(&chunk[repeated as usize..]) {
                        return filler.fail(e);
                    }
                    continue;
                }
                Ok(Ok(None)) if filler.written() == len => {
                    let _ = filler.finish();
                    return;
                }
                Ok(Ok(None)) => SourceError::BadBody(format!(
                    "body has {} bytes, Content-Length said {len}",
                    filler.written()
                )),
                Ok(Err(e)) => transport(e),
                Err(_) => return filler.fail(SourceError::Timeout(self.config.timeout)),
            };
            resumes += 1;
            if resumes > MAX_RETRIES {
                return filler.fail(error);
            }
            debug!(url = %resume.url, %error, "body cut short: asking again");
            // This request is over: its place goes back before the next one waits for one.
            drop(permit);
            let get = Get {
                url: &resume.url,
                accept: &resume.accept,
                if_none_match: None,
                limit: len,
                reserve: None,
                stream: true,
                decode: false,
            };
            // The retries keep their waits inside the deadline; the deadline bounds the rest.
            let again = tokio::time::timeout_at(deadline.into(), self.get(&get, deadline)).await;
            let again = again.unwrap_or(Err(SourceError::Timeout(self.config.timeout)));
            match again {
                Ok(Answer { rest: Some(again), permit: held, .. }) if resume.same(&again, len) => {
                    response = again;
                    permit = held;
                    at = 0;
                }
                Ok(_) => return filler.fail(changed()),
                Err(e) => return filler.fail(e),
            }
        }
    }
}
