//! The HTTP front: hyper's server, and what S3 does around every operation that s3s leaves to
//! its user (request ids, presigned-URL limits, PUTs of unknown length, SigV2 bucket paths).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use s3s::dto::StreamingBlob;

use crate::auth::{Auth, presigned_refusal};
use crate::service::{Gateway, MAX_PUT};

/// Most connections served at once (each holds a task and a socket).
pub(crate) const MAX_CONNECTIONS: usize = 1024;
/// How long a connection may take to send a request's headers (slow-header floods).
pub(crate) const HEADER_DEADLINE: Duration = Duration::from_secs(30);

// ---- The HTTP front ----
//
// What S3 does around every operation and s3s leaves to its user: a request id in the
// `x-amz-request-id` header and in the `<RequestId>` of every error body (clients print it,
// operators grep for it), the presigned-URL expiry limit (at most 7 days, checked before the
// signature), and PUTs whose length is unknown (`Transfer-Encoding: chunked`, no
// Content-Length), which s3s refuses: their body is spooled to disk first, bounded by 5 GiB,
// and then handed to s3s with its length. And SigV2-signed requests for a bucket alone, which
// clients sign over `/bucket/` (botocore) or `/bucket` (minio-go) and S3 accepts either way,
// while s3s checks only the path as sent (see `Front::call`).

/// Marks a GET or HEAD response whose preconditions answer 304 Not Modified.
#[derive(Clone, Copy)]
pub(crate) struct NotModified;

/// The s3s service behind the HTTP front.
pub(crate) struct Front {
    s3: s3s::service::S3Service,
    spool: PathBuf,
}

/// A fresh request id: 16 upper-case hex digits, as S3's.
pub(crate) fn request_id() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    hex::encode_upper(b)
}

/// An S3 error response of the front's own.
pub(crate) fn error_response(
    status: http::StatusCode,
    code: &str,
    message: &str,
) -> http::Response<s3s::Body> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    let mut resp = http::Response::new(s3s::Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/xml"));
    resp
}

impl Front {
    async fn handle(&self, req: http::Request<hyper::body::Incoming>) -> http::Response<s3s::Body> {
        let id = request_id();
        let head = req.method() == http::Method::HEAD;
        let mut resp = match presigned_refusal(req.uri()) {
            Some(refused) => refused,
            None => match self.with_length(req.map(s3s::Body::from)).await {
                Err(refused) => refused,
                Ok(req) => self.call(req).await,
            },
        };
        if let Ok(v) = http::HeaderValue::from_str(&id) {
            resp.headers_mut().insert("x-amz-request-id", v);
        }
        if resp.extensions_mut().remove::<NotModified>().is_some() {
            // 304 carries the validators (ETag, Last-Modified) and no body (RFC 9110 §15.4.5).
            *resp.status_mut() = http::StatusCode::NOT_MODIFIED;
            *resp.body_mut() = s3s::Body::empty();
            resp.headers_mut().remove(http::header::CONTENT_LENGTH);
        }
        let failed = resp.status().is_client_error() || resp.status().is_server_error();
        if failed && !head {
            let body = std::mem::take(resp.body_mut());
            let body = match body.bytes() {
                Some(b) => with_request_id(&b, &id),
                None => body,
            };
            if let Some(len) = body.bytes().map(|b| b.len()) {
                resp.headers_mut().insert(http::header::CONTENT_LENGTH, len.into());
            }
            *resp.body_mut() = body;
        }
        resp
    }

    /// One request through s3s; a failure of the service itself is a 500.
    async fn call_once(&self, req: http::Request<s3s::Body>) -> http::Response<s3s::Body> {
        match self.s3.call(req).await {
            Ok(resp) => resp,
            Err(e) => {
                tracing::error!(error = ?e, "the S3 service failed");
                error_response(
                    http::StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    "We encountered an internal error. Please try again.",
                )
            }
        }
    }

    /// A request through s3s. A SigV2-signed one that addresses only a bucket, path-style
    /// (`/bucket`), may have been signed over `/bucket` or over `/bucket/` (botocore's
    /// `signature_version='s3'` signs `/bucket/`; minio-go signs `/bucket`; S3 accepts both),
    /// while s3s checks only the path as sent: when that answers SignatureDoesNotMatch, the
    /// request is tried once more as `/bucket/`, which s3s routes to the same bucket. Nothing is
    /// done before a signature matches, so the first attempt changed nothing. Its body (a
    /// bucket configuration, a DeleteObjects list) is held in memory for the second attempt, up
    /// to [`SIGV2_RETRY_BODY`]; a larger one is checked as sent only.
    async fn call(&self, req: http::Request<s3s::Body>) -> http::Response<s3s::Body> {
        let Some(alt) = sigv2_bucket_alternative(req.uri(), req.headers()) else {
            return self.call_once(req).await;
        };
        let h = req.headers();
        let len = match h.get(http::header::CONTENT_LENGTH) {
            Some(v) => v.to_str().ok().and_then(|v| v.parse::<u64>().ok()),
            None if h.contains_key(http::header::TRANSFER_ENCODING) => None,
            None => Some(0),
        };
        if len.is_none_or(|len| len > SIGV2_RETRY_BODY) {
            return self.call_once(req).await;
        }
        let (parts, mut body) = req.into_parts();
        let mut buf = Vec::new();
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(c) if (buf.len() + c.len()) as u64 <= SIGV2_RETRY_BODY => {
                    buf.extend_from_slice(&c)
                }
                _ => {
                    return error_response(
                        http::StatusCode::BAD_REQUEST,
                        "IncompleteBody",
                        "the body could not be read",
                    );
                }
            }
        }
        let body = bytes::Bytes::from(buf);
        let rebuild = |uri: http::Uri| {
            let mut r = http::Request::new(s3s::Body::from(body.clone()));
            *r.method_mut() = parts.method.clone();
            *r.uri_mut() = uri;
            *r.version_mut() = parts.version;
            *r.headers_mut() = parts.headers.clone();
            *r.extensions_mut() = parts.extensions.clone();
            r
        };
        let resp = self.call_once(rebuild(parts.uri.clone())).await;
        if !signature_mismatch(&resp) {
            return resp;
        }
        self.call_once(rebuild(alt)).await
    }

    /// A PUT sent with `Transfer-Encoding: chunked` and no length is spooled to disk (at most
    /// 5 GiB), then passed on with its Content-Length. The length is not part of such a
    /// request's signature (it had none), so adding it changes no signed byte.
    async fn with_length(
        &self,
        req: http::Request<s3s::Body>,
    ) -> Result<http::Request<s3s::Body>, http::Response<s3s::Body>> {
        let h = req.headers();
        let chunked = h
            .get(http::header::TRANSFER_ENCODING)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let streaming = h
            .get("x-amz-content-sha256")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("STREAMING-"));
        if req.method() != http::Method::PUT
            || !chunked
            || streaming
            || h.contains_key(http::header::CONTENT_LENGTH)
        {
            return Ok(req);
        }
        let (mut parts, mut body) = req.into_parts();
        let spooled = async {
            use tokio::io::AsyncWriteExt;
            let file = tempfile::tempfile_in(&self.spool)?;
            let mut out = tokio::fs::File::from_std(file.try_clone()?);
            let mut len = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(std::io::Error::other)?;
                len += chunk.len() as u64;
                if len > MAX_PUT {
                    return Ok(None);
                }
                out.write_all(&chunk).await?;
            }
            out.flush().await?;
            Ok::<_, std::io::Error>(Some((file, len)))
        }
        .await;
        match spooled {
            Ok(Some((file, len))) => {
                use std::io::Seek;
                let mut file = file;
                if file.rewind().is_err() {
                    return Err(error_response(
                        http::StatusCode::INTERNAL_SERVER_ERROR,
                        "InternalError",
                        "could not spool the body",
                    ));
                }
                let stream = tokio_util::io::ReaderStream::with_capacity(
                    tokio::fs::File::from_std(file),
                    1 << 20,
                );
                parts.headers.remove(http::header::TRANSFER_ENCODING);
                parts.headers.insert(http::header::CONTENT_LENGTH, len.into());
                Ok(http::Request::from_parts(parts, s3s::Body::from(StreamingBlob::wrap(stream))))
            }
            Ok(None) => Err(error_response(
                http::StatusCode::BAD_REQUEST,
                "EntityTooLarge",
                "Your proposed upload exceeds the maximum allowed object size.",
            )),
            Err(e) => {
                tracing::warn!(error = %e, "could not spool a chunked PUT");
                Err(error_response(
                    http::StatusCode::BAD_REQUEST,
                    "IncompleteBody",
                    "the body could not be read",
                ))
            }
        }
    }
}

/// Largest body of a SigV2-signed bucket request kept to be tried as `/bucket/` too (a
/// DeleteObjects of 1 000 keys of 1 024 bytes fits).
pub(crate) const SIGV2_RETRY_BODY: u64 = 4 << 20;

/// For a request signed with SigV2 (an `Authorization: AWS …` header, or a presigned URL's
/// `AWSAccessKeyId` and `Signature`) whose path names only a bucket (`/bucket`, path-style: the
/// gateway serves no virtual hosts), the same request URI with the path `/bucket/`.
pub(crate) fn sigv2_bucket_alternative(
    uri: &http::Uri,
    headers: &http::HeaderMap,
) -> Option<http::Uri> {
    let path = uri.path();
    let bucket = path.strip_prefix('/')?;
    if bucket.is_empty() || bucket.contains('/') {
        return None;
    }
    let query = uri.query();
    let has =
        |name: &str| query.is_some_and(|q| q.split('&').any(|p| p.split('=').next() == Some(name)));
    let header_v2 = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("AWS "));
    let presigned_v2 = has("Signature") && has("AWSAccessKeyId");
    if !(header_v2 || presigned_v2) {
        return None;
    }
    let path_and_query = match query {
        Some(q) => format!("{path}/?{q}"),
        None => format!("{path}/"),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().ok()?);
    http::Uri::from_parts(parts).ok()
}

/// Whether s3s refused the request's signature.
fn signature_mismatch(resp: &http::Response<s3s::Body>) -> bool {
    resp.status() == http::StatusCode::FORBIDDEN
        && resp.body().bytes().is_some_and(|b| {
            String::from_utf8_lossy(&b).contains("<Code>SignatureDoesNotMatch</Code>")
        })
}

/// An error body with `<RequestId>` set to the header's id (s3s writes none).
pub(crate) fn with_request_id(body: &[u8], id: &str) -> s3s::Body {
    let text = String::from_utf8_lossy(body);
    if !text.contains("</Error>") || text.contains("<RequestId>") {
        return s3s::Body::from(bytes::Bytes::copy_from_slice(body));
    }
    s3s::Body::from(text.replacen("</Error>", &format!("<RequestId>{id}</RequestId></Error>"), 1))
}

/// Serves S3 on `listen` until SIGTERM/SIGINT, then lets requests in flight finish for up
/// to `grace`. Clients may sign for any region: SigV4 is checked against the region each
/// request's credential scope names.
pub async fn serve(gateway: Gateway, listen: SocketAddr, grace: Duration) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let secrets = gateway.users.iter().map(|(k, u)| (k.clone(), u.secret.clone())).collect();
    let spool = gateway.spool.clone();
    let mut builder = s3s::service::S3ServiceBuilder::new(gateway);
    builder.set_auth(Auth(secrets));
    let front = Arc::new(Front { s3: builder.build(), spool });
    let service = hyper::service::service_fn(move |req| {
        let front = front.clone();
        async move { Ok::<_, std::convert::Infallible>(front.handle(req).await) }
    });
    let listener =
        tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    tracing::info!(%listen, "S3 gateway serving");
    eprintln!("S3 gateway listening on http://{}", listener.local_addr()?);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors, most likely: wait instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // Past the connection limit a newcomer is dropped at once.
                let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
                let _ = stream.set_nodelay(true);
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_DEADLINE)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service.clone());
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                    drop(slot);
                });
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tracing::info!("stopping: letting requests in flight finish");
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("requests still in flight after the grace period: stopping anyway");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sigv2_bucket_requests_get_the_trailing_slash_alternative() {
        let v2 = |auth: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::AUTHORIZATION, auth.parse().unwrap());
            h
        };
        let alt = |uri: &str, h: &http::HeaderMap| {
            sigv2_bucket_alternative(&uri.parse().unwrap(), h).map(|u| u.to_string())
        };
        let header = v2("AWS ALICE:c2lnbmF0dXJl");
        assert_eq!(alt("/b1", &header).as_deref(), Some("/b1/"));
        assert_eq!(
            alt("/b1?encoding-type=url", &header).as_deref(),
            Some("/b1/?encoding-type=url")
        );
        let presigned = "/b1?AWSAccessKeyId=ALICE&Signature=x%2By&Expires=99";
        assert_eq!(
            alt(presigned, &http::HeaderMap::new()).as_deref(),
            Some("/b1/?AWSAccessKeyId=ALICE&Signature=x%2By&Expires=99")
        );
        // Not a bucket alone, or not SigV2: nothing.
        for uri in ["/", "/b1/", "/b1/key", "/b1/key/"] {
            assert_eq!(alt(uri, &header), None, "{uri}");
        }
        let v4 = v2("AWS4-HMAC-SHA256 Credential=ALICE/20260101/us-east-1/s3/aws4_request");
        assert_eq!(alt("/b1", &v4), None);
        assert_eq!(alt("/b1", &http::HeaderMap::new()), None);
        assert_eq!(alt("/b1?X-Amz-Signature=x&X-Amz-Credential=y", &http::HeaderMap::new()), None);
    }

    #[test]
    fn error_bodies_get_the_request_id() {
        let body = b"<?xml version=\"1.0\"?><Error><Code>NoSuchKey</Code></Error>";
        let out = with_request_id(body, "ABC123").bytes().unwrap();
        assert!(String::from_utf8_lossy(&out).ends_with("<RequestId>ABC123</RequestId></Error>"));
    }
}
