//! One GET with its retries: send, check the status, read the body (within its limit, and
//! within what a fetch ahead may hold), back off and try again, renew the token once after a 401.

use super::*;

impl HttpSource {
    /// One try: send, check the status, read the body (up to `get.limit` bytes).
    pub(super) async fn attempt(
        &self,
        get: &Get<'_>,
        token: Option<&Secret>,
    ) -> Result<Answer, Failure> {
        let permit = self.limit.acquire().await;
        let mut request =
            self.client.request(Method::GET, get.url.clone()).header(header::ACCEPT, get.accept);
        if let (Some(token), true) = (token, self.same_origin(get.url)) {
            request =
                request.header(header::AUTHORIZATION, token.bearer().map_err(Failure::fatal)?);
        }
        if let Some(version) = get.if_none_match {
            request = request.header(header::IF_NONE_MATCH, format!("W/\"{version}\""));
        }
        // With compression on, reqwest says `gzip, deflate, br, zstd` itself.
        if !self.config.compression {
            request = request.header(header::ACCEPT_ENCODING, "identity");
        }
        // Connection errors are worth a retry; so is a body cut short.
        let response = request.send().await.map_err(|e| {
            self.config.stats.count_status(0);
            Failure::transient(transport(e))
        })?;
        let status = response.status();
        self.config.stats.count_status(status.as_u16());
        let headers = response.headers().clone();
        if is_transient(status) {
            let error = SourceError::from_status(status.as_u16());
            return Err(Failure { error, retryable: true, retry_after: retry_after(&headers) });
        }
        if !status.is_success() && status != StatusCode::NOT_MODIFIED {
            return Err(Failure::fatal(SourceError::from_status(status.as_u16())));
        }
        // reqwest decodes gzip, deflate, br and zstd, and then drops `Content-Encoding` and
        // `Content-Length` (the encoded length). A coding still named here is one it cannot
        // decode: its bytes are not the content.
        if let Some(coding) = header_text(&headers, header::CONTENT_ENCODING)
            .filter(|c| !c.trim().eq_ignore_ascii_case("identity"))
        {
            let error = format!("the answer is in an unsupported content coding {coding:?}");
            return Err(Failure::fatal(SourceError::BadBody(error)));
        }
        // A fetch ahead of the reader gives way before reading a body that would not fit.
        if let (Some(ahead), Some(len)) = (Ahead::current(), response.content_length())
            && !ahead.admits(len)
        {
            return Err(Failure::fatal(SourceError::Declined));
        }
        if let (Some(reserve), Some(len)) = (get.reserve, response.content_length())
            && len > 0
            && len <= get.limit
        {
            // JSON carries the content as base64: about 3/4 of the body, decoded in place.
            let kind = media_type(response.headers());
            let json = kind == FHIR_JSON || kind == "application/json";
            reserve(if json { len / 4 * 3 } else { len });
        }
        let native = !matches!(media_type(&headers).as_str(), FHIR_JSON | "application/json");
        let known_len = response.content_length().is_some_and(|len| len > 0 && len <= get.limit);
        if get.stream && status == StatusCode::OK && native && known_len {
            return Ok(Answer {
                status,
                headers,
                body: Vec::new(),
                rest: Some(response),
                binary: None,
                permit,
            });
        }
        if get.decode && status == StatusCode::OK && media_type(&headers) == FHIR_JSON {
            let binary = Some(Self::decoded(response, get.limit).await?);
            return Ok(Answer { status, headers, body: Vec::new(), rest: None, binary, permit });
        }
        let body = Self::body(response, get.limit).await?;
        Ok(Answer { status, headers, body, rest: None, binary: None, permit })
    }

    /// Reads a body into one buffer sized from `Content-Length`, in this task: copying a chunk
    /// costs less than handing it over from another (a listing reads a thousand pages).
    pub(super) async fn body(
        mut response: reqwest::Response,
        limit: u64,
    ) -> Result<Vec<u8>, Failure> {
        let mut body = BodyCheck::new(&response, limit)?;
        let mut buf = Vec::with_capacity(body.declared.unwrap_or(0) as usize);
        while let Some(chunk) =
            response.chunk().await.map_err(|e| Failure::transient(transport(e)))?
        {
            body.admit(chunk.len())?;
            buf.extend_from_slice(&chunk);
        }
        body.end()?;
        Ok(buf)
    }

    /// Reads a FHIR JSON Binary, decoding `data` as the body arrives (see [`JsonBinaryDecoder`]);
    /// the body's own faults (too long, cut short) are the read's, the resource's are inside.
    pub(super) async fn decoded(
        response: reqwest::Response,
        limit: u64,
    ) -> Result<Result<fhir::Binary, fhir::FhirError>, Failure> {
        let declared = response.content_length().filter(|&len| len <= limit);
        let mut decoder = JsonBinaryDecoder::new(declared.unwrap_or(0) as usize);
        Self::each_chunk(response, limit, |chunk| decoder.push(chunk)).await?;
        Ok(decoder.finish())
    }

    /// Hands a body to `sink` chunk by chunk, refusing more than `limit` bytes and a body whose
    /// length is not its `Content-Length`. Another task takes the chunks off the connection
    /// meanwhile, so receiving overlaps with what `sink` does (dropping this stops it).
    pub(super) async fn each_chunk(
        mut response: reqwest::Response,
        limit: u64,
        mut sink: impl FnMut(&[u8]),
    ) -> Result<(), Failure> {
        let mut body = BodyCheck::new(&response, limit)?;
        let (sender, mut chunks) = tokio::sync::mpsc::channel(READ_AHEAD_CHUNKS);
        let mut reader = tokio::task::JoinSet::new();
        reader.spawn(async move {
            loop {
                let next = response.chunk().await.transpose();
                let last = !matches!(next, Some(Ok(_)));
                if let Some(next) = next
                    && sender.send(next).await.is_err()
                {
                    break;
                }
                if last {
                    break;
                }
            }
        });
        while let Some(chunk) = chunks.recv().await {
            let chunk = chunk.map_err(|e| Failure::transient(transport(e)))?;
            body.admit(chunk.len())?;
            sink(&chunk);
        }
        body.end()
    }

    /// GET with retries (transient statuses and connection errors, backing off, honouring
    /// Retry-After, never past `deadline`) and one renewal of the token after a 401.
    pub(super) async fn get(
        &self,
        get: &Get<'_>,
        deadline: Instant,
    ) -> Result<Answer, SourceError> {
        let token = self.auth.token().await?;
        match self.get_with(get, token.as_ref(), deadline).await {
            Err(SourceError::Unauthorized) if self.auth.renew(token.as_ref()).await => {
                debug!(url = %get.url, "401: trying once more with a renewed token");
                let token = self.auth.token().await?;
                self.get_with(get, token.as_ref(), deadline).await
            }
            other => other,
        }
    }

    pub(super) async fn get_with(
        &self,
        get: &Get<'_>,
        token: Option<&Secret>,
        deadline: Instant,
    ) -> Result<Answer, SourceError> {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(RETRY_MIN_DELAY)
            .with_max_delay(RETRY_MAX_DELAY)
            .with_max_times(MAX_RETRIES)
            .with_jitter();
        let attempt = || self.attempt(get, token);
        attempt
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|failure: &Failure| failure.retryable)
            .adjust(|failure: &Failure, delay| {
                let wait = failure.retry_after.or(delay)?;
                // A wait that ends past the deadline is no use: give up now with this error.
                (Instant::now() + wait < deadline).then_some(wait)
            })
            .notify(|failure: &Failure, wait| {
                debug!(url = %self.shown(get.url), error = %failure.error, ?wait, "retrying");
            })
            .await
            .map_err(|failure| failure.error)
    }
}

/// What a body may be: at most `limit` bytes, its `Content-Length` if it declares one, and
/// for a fetch ahead without one, what the fetches ahead may hold.
struct BodyCheck {
    limit: u64,
    declared: Option<u64>,
    ahead: Option<Arc<Ahead>>,
    read: u64,
}

impl BodyCheck {
    fn new(response: &reqwest::Response, limit: u64) -> Result<Self, Failure> {
        let declared = response.content_length();
        if declared.is_some_and(|len| len > limit) {
            return Err(Failure::fatal(SourceError::TooLarge { limit }));
        }
        // A fetch ahead without a Content-Length is admitted as its bytes arrive.
        let ahead = Ahead::current().filter(|_| declared.is_none());
        Ok(Self { limit, declared, ahead, read: 0 })
    }

    /// Admits `len` more bytes.
    fn admit(&mut self, len: usize) -> Result<(), Failure> {
        self.read += len as u64;
        if self.read > self.limit {
            return Err(Failure::fatal(SourceError::TooLarge { limit: self.limit }));
        }
        if self.ahead.as_ref().is_some_and(|ahead| !ahead.admits(self.read)) {
            return Err(Failure::fatal(SourceError::Declined));
        }
        Ok(())
    }

    /// The body ended: it must be as long as it said.
    fn end(self) -> Result<(), Failure> {
        if let Some(declared) = self.declared.filter(|&len| len != self.read) {
            let error = format!("body has {} bytes, Content-Length said {declared}", self.read);
            return Err(Failure::transient(SourceError::BadBody(error)));
        }
        Ok(())
    }
}
