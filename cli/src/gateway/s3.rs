//! The S3 operations over the pool and the namespace, and the HTTP server.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use md5::{Digest, Md5};
use s3s::dto::*;
use s3s::{S3, S3Error, S3Request, S3Response, S3Result, s3_error};
use serde::{Deserialize, Serialize};
use shardfarm_client::PoolClient;
use shardfarm_core::cap::ReadCap;

use super::User;
use super::namespace::{
    BucketRecord, Check, CommitError, Expect, HttpHeaders, Index, Log, ObjectRecord, Op, Piece,
    Refusal,
};

/// Largest object one PUT (or one part) may carry, as in S3.
const MAX_PUT: u64 = 5 << 30;
/// Smallest part but the last, as in S3.
const MIN_PART: u64 = 5 << 20;
/// Most parts of one upload, as in S3.
const MAX_PARTS: i32 = 10_000;
/// Most keys one listing returns, as in S3.
const MAX_KEYS: usize = 1000;
/// Stripes of the per-key lock.
const STRIPES: usize = 256;
/// Most connections served at once (each holds a task and a socket).
const MAX_CONNECTIONS: usize = 1024;
/// How long a connection may take to send a request's headers (slow-header floods).
const HEADER_DEADLINE: Duration = Duration::from_secs(30);
/// Largest user metadata (names and values), as in S3.
const MAX_METADATA: usize = 2048;

/// The gateway's state.
pub struct Gateway {
    users: HashMap<String, User>,
    index: Arc<Index>,
    log: Log,
    spool: PathBuf,
    /// Bucket creation and deletion hold it for writing; every change of an object holds it
    /// for reading (so a bucket cannot vanish under a put, nor be emptied-then-filled while
    /// its deletion checks it).
    buckets: tokio::sync::RwLock<()>,
    /// Held from an object's ownership check to its commit, striped by bucket and key: two
    /// changes of one key never race past each other, and changes of different keys commit
    /// concurrently (the log writer puts them in one entry).
    stripes: Vec<tokio::sync::Mutex<()>>,
}

/// An upload in progress (kept by this gateway only; see ARCHITECTURE.md).
#[derive(Serialize, Deserialize)]
struct Upload {
    bucket: String,
    key: String,
    owner: String,
    created_ms: u64,
    content_type: Option<String>,
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    headers: HttpHeaders,
}

/// A part of an upload in progress.
#[derive(Serialize, Deserialize)]
struct PartRecord {
    piece: Piece,
    md5: String,
    modified_ms: u64,
}

fn now_ms() -> u64 {
    shardfarm_core::auth::now_ms()
}

fn ts(ms: u64) -> Timestamp {
    Timestamp::from(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
}

fn etag(s: &str) -> ETag {
    ETag::Strong(s.to_string())
}

/// A failure of the gateway's own (its index): 500.
fn internal(e: impl std::fmt::Display) -> S3Error {
    tracing::error!(error = %e, "gateway error");
    s3_error!(InternalError, "{e}")
}

/// A failure of the pool (nodes unreachable, too few shards): 503, which clients retry.
fn unavailable(e: impl std::fmt::Display) -> S3Error {
    tracing::warn!(error = %e, "pool error");
    s3_error!(ServiceUnavailable, "the pool could not serve this request: {e}")
}

/// S3's `encoding-type=url` for listings: every byte of a key (prefix, delimiter, marker) but
/// the unreserved characters (RFC 3986: `A-Z a-z 0-9 - . _ ~`) and `/` as `%XX` of its UTF-8.
/// SDKs decode with a form decoder (botocore: `unquote_plus`), so `+` must be sent as `%2B`
/// and space as `%20` (a raw `+` would come back as a space).
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether a listing asked for `encoding-type=url`.
fn url_encoding(t: &Option<EncodingType>) -> bool {
    t.as_ref().is_some_and(|t| t.as_str() == EncodingType::URL)
}

/// Applies a listing's encoding to one value.
fn encoded(url: bool, s: String) -> String {
    if url { url_encode(&s) } else { s }
}

/// Whole seconds since the epoch of an S3 timestamp (HTTP dates have a one-second
/// resolution, so Last-Modified is compared in seconds).
fn secs(t: &Timestamp) -> i64 {
    let mut buf = Vec::new();
    if t.format(TimestampFormat::EpochSeconds, &mut buf).is_err() {
        return 0;
    }
    String::from_utf8_lossy(&buf).parse::<f64>().map_or(0, |f| f.floor() as i64)
}

/// The timestamp of unix milliseconds.
fn ts_ms(ms: i64) -> Timestamp {
    let t = if ms >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    };
    Timestamp::from(t)
}

/// Whether an ETag condition names this object (`*` names any).
fn etag_matches(cond: &ETagCondition, rec: &ObjectRecord) -> bool {
    match cond {
        ETagCondition::Any => true,
        ETagCondition::ETag(e) => e.value() == rec.etag,
    }
}

/// A read's preconditions that did not hold.
#[derive(Debug, PartialEq)]
enum Unmet {
    /// 304 Not Modified (GET and HEAD; CopyObject answers 412 instead).
    NotModified,
    /// 412 Precondition Failed.
    Failed,
}

/// The conditional headers of a read, with S3's precedence (RFC 7232 §6): If-Match decides
/// and If-Unmodified-Since is then ignored (If-Match true + If-Unmodified-Since false = 200);
/// If-None-Match decides and If-Modified-Since is then ignored (If-None-Match false +
/// If-Modified-Since true = 304). The 412 checks come before the 304 ones.
fn read_preconditions(
    rec: &ObjectRecord,
    if_match: Option<&ETagCondition>,
    if_none_match: Option<&ETagCondition>,
    if_modified_since: Option<&Timestamp>,
    if_unmodified_since: Option<&Timestamp>,
) -> Result<(), Unmet> {
    let modified = (rec.modified_ms / 1000) as i64;
    match (if_match, if_unmodified_since) {
        (Some(m), _) if !etag_matches(m, rec) => return Err(Unmet::Failed),
        (None, Some(t)) if modified > secs(t) => return Err(Unmet::Failed),
        _ => {}
    }
    match (if_none_match, if_modified_since) {
        (Some(m), _) if etag_matches(m, rec) => Err(Unmet::NotModified),
        (None, Some(t)) if modified <= secs(t) => Err(Unmet::NotModified),
        _ => Ok(()),
    }
}

fn precondition_failed() -> S3Error {
    s3_error!(PreconditionFailed, "At least one of the pre-conditions you specified did not hold")
}

/// A write's If-None-Match / If-Match headers as conditions on the object it replaces.
/// If-None-Match takes only `*` on writes (S3: "Expects the '*' character").
fn write_conditions(
    if_none_match: Option<&ETagCondition>,
    if_match: Option<&ETagCondition>,
) -> S3Result<Vec<Expect>> {
    let mut out = Vec::new();
    match if_none_match {
        None => {}
        Some(ETagCondition::Any) => out.push(Expect::Absent),
        Some(ETagCondition::ETag(_)) => {
            return Err(s3_error!(
                NotImplemented,
                "If-None-Match on a write takes only '*' (create only)"
            ));
        }
    }
    match if_match {
        None => {}
        Some(ETagCondition::Any) => out.push(Expect::ETag(None)),
        Some(ETagCondition::ETag(e)) => out.push(Expect::ETag(Some(e.value().to_string()))),
    }
    Ok(out)
}

/// A condition checked now, before the body is read (the log writer checks it again at the
/// commit, which decides).
fn check_now(check: &Check, current: Option<&ObjectRecord>) -> Result<(), Refusal> {
    check.verdict(current)
}

/// The S3 error of a refused conditional change.
fn refusal(r: Refusal) -> S3Error {
    match r {
        Refusal::PreconditionFailed => precondition_failed(),
        Refusal::NoSuchKey => s3_error!(NoSuchKey),
        Refusal::NotOwner => s3_error!(AccessDenied, "this key holds another user's object"),
    }
}

/// Checks a write's server-side encryption request: SSE-S3 (AES256) is what the pool does to
/// every object (AES-256-GCM before any byte leaves the gateway), so it is granted; SSE-KMS
/// and SSE-C are not done, and are refused rather than silently ignored.
fn check_sse(
    sse: Option<&ServerSideEncryption>,
    kms_key: Option<&str>,
    sse_c: Option<&str>,
) -> S3Result<()> {
    if sse_c.is_some() {
        return Err(s3_error!(
            NotImplemented,
            "SSE-C (customer-provided keys) is not implemented: the pool encrypts every object \
             with AES-256-GCM under keys of its own (SSE-S3, AES256)"
        ));
    }
    if kms_key.is_some() || sse.is_some_and(|s| s.as_str() != ServerSideEncryption::AES256) {
        return Err(s3_error!(
            NotImplemented,
            "SSE-KMS is not implemented: the pool encrypts every object with AES-256-GCM under \
             keys of its own (SSE-S3, AES256)"
        ));
    }
    Ok(())
}

/// What every object is: encrypted with AES-256 (the answer to SSE-S3).
fn aes256() -> Option<ServerSideEncryption> {
    Some(ServerSideEncryption::from_static(ServerSideEncryption::AES256))
}

/// The stored HTTP headers of a write.
fn http_headers(
    cache_control: Option<String>,
    content_disposition: Option<String>,
    content_encoding: Option<String>,
    content_language: Option<String>,
    expires: Option<&Timestamp>,
) -> HttpHeaders {
    HttpHeaders {
        cache_control,
        content_disposition,
        content_encoding,
        content_language,
        expires_ms: expires.map(|t| secs(t).saturating_mul(1000)),
    }
}

fn check_metadata(meta: &Option<Metadata>) -> S3Result<BTreeMap<String, String>> {
    let m: BTreeMap<String, String> = meta.clone().unwrap_or_default().into_iter().collect();
    let size: usize = m.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_METADATA {
        return Err(s3_error!(
            MetadataTooLarge,
            "user metadata is {size} bytes, above {MAX_METADATA}"
        ));
    }
    Ok(m)
}

/// Reads (and drops) up to 1 MiB of a body the gateway refuses before answering, so an HTTP/1.1
/// connection stays in step: a client that sent `Expect: 100-continue` gets its 100 and sends
/// the body, which is consumed instead of being left where the next request on that
/// connection would start. A larger body is left to the server, which closes the connection.
async fn refuse_body(body: Option<StreamingBlob>, error: S3Error) -> S3Error {
    if let Some(mut body) = body {
        let drain = async {
            let mut seen = 0usize;
            while let Some(Ok(chunk)) = body.next().await {
                seen += chunk.len();
                if seen > 1 << 20 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    }
    error
}

/// The Location of a completed upload: the object's path.
fn location(bucket: &str, key: &str) -> String {
    format!("/{bucket}/{}", url_encode(key))
}

fn upload_key(id: &str) -> String {
    format!("u/{id}")
}

fn part_key(id: &str, n: i32) -> String {
    format!("p/{id}/{n:05}")
}

/// Where a listing resumes: after a key, or after every key under a common prefix.
#[derive(Debug, Clone, PartialEq)]
enum Resume {
    Key(String),
    Prefix(String),
}

impl Resume {
    /// The continuation token: hex of a tag byte and the key or prefix.
    fn token(&self) -> String {
        match self {
            Resume::Key(k) => hex::encode(format!("k{k}")),
            Resume::Prefix(p) => hex::encode(format!("p{p}")),
        }
    }

    fn from_token(t: &str) -> Option<Self> {
        let s = String::from_utf8(hex::decode(t).ok()?).ok()?;
        match s.split_at_checked(1)? {
            ("k", k) => Some(Resume::Key(k.to_string())),
            ("p", p) => Some(Resume::Prefix(p.to_string())),
            _ => None,
        }
    }

    /// ListObjects v1's marker: a key, or (ending in the delimiter) the common prefix the
    /// previous page ended on.
    fn from_marker(m: &str, delimiter: Option<&str>) -> Self {
        match delimiter {
            Some(d) if !d.is_empty() && m.ends_with(d) => Resume::Prefix(m.to_string()),
            _ => Resume::Key(m.to_string()),
        }
    }

    fn into_string(self) -> String {
        match self {
            Resume::Key(s) | Resume::Prefix(s) => s,
        }
    }
}

/// Hashes what is read through it.
struct Md5Reader<R> {
    inner: R,
    md5: Arc<Mutex<Md5>>,
}

impl<R: Read> Read for Md5Reader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.md5.lock().unwrap().update(&buf[..n]);
        Ok(n)
    }
}

/// Feeds what is written into a channel in 1 MiB chunks. It blocks when the client reads
/// slowly, so it is written only from blocking sections (the client library decodes and
/// writes in one); the last partial chunk is sent by the caller ([`ChannelWriter::rest`]).
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    buf: Vec<u8>,
    rt: tokio::runtime::Handle,
}

/// How long a GET's client may take to accept the next MiB before the gateway gives up on it
/// (a reader that stops reading must not hold a thread and the pool reads forever).
const READER_DEADLINE: Duration = Duration::from_secs(60);

impl ChannelWriter {
    fn rest(&mut self) -> Option<Bytes> {
        (!self.buf.is_empty()).then(|| Bytes::from(std::mem::take(&mut self.buf)))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 1 << 20 {
            let chunk = Bytes::from(std::mem::take(&mut self.buf));
            let sent =
                self.rt.block_on(tokio::time::timeout(READER_DEADLINE, self.tx.send(Ok(chunk))));
            match sent {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::BrokenPipe,
                        "the client left",
                    ));
                }
                Err(_) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client stopped reading",
                    ));
                }
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Hashes what is written through it.
struct Md5Writer<W> {
    inner: W,
    md5: Md5,
}

impl<W: Write> Write for Md5Writer<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(data)?;
        self.md5.update(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Guards of one object's change: the bucket lock for reading, then the key's stripe.
type KeyGuard<'a> = (tokio::sync::RwLockReadGuard<'a, ()>, tokio::sync::MutexGuard<'a, ()>);

impl Gateway {
    /// Locks the namespace for a change of `bucket/key`.
    async fn lock_key(&self, bucket: &str, key: &str) -> KeyGuard<'_> {
        let read = self.buckets.read().await;
        let h = shardfarm_core::identity::blake2b256(&[bucket.as_bytes(), b"/", key.as_bytes()]);
        let i = u64::from_le_bytes(h[..8].try_into().expect("8 bytes")) as usize % STRIPES;
        (read, self.stripes[i].lock().await)
    }

    /// A gateway over `index` and `log`, for `users`.
    pub fn new(users: HashMap<String, User>, index: Arc<Index>, log: Log, spool: PathBuf) -> Self {
        let stripes = (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect();
        Gateway { users, index, log, spool, buckets: tokio::sync::RwLock::new(()), stripes }
    }

    /// The caller's access key and user (s3s has checked the signature).
    fn caller<T>(&self, req: &S3Request<T>) -> S3Result<(String, &User)> {
        let creds =
            req.credentials.as_ref().ok_or_else(|| s3_error!(AccessDenied, "sign the request"))?;
        let user =
            self.users.get(&creds.access_key).ok_or_else(|| s3_error!(InvalidAccessKeyId))?;
        Ok((creds.access_key.clone(), user))
    }

    fn bucket(&self, bucket: &str) -> S3Result<BucketRecord> {
        self.index.bucket(bucket).map_err(internal)?.ok_or_else(|| s3_error!(NoSuchBucket))
    }

    fn object(&self, bucket: &str, key: &str) -> S3Result<ObjectRecord> {
        self.bucket(bucket)?;
        self.index.object(bucket, key).map_err(internal)?.ok_or_else(|| s3_error!(NoSuchKey))
    }

    /// Stores `len` bytes of `body` as one pool object signed by `client`: its piece and MD5.
    async fn store(
        &self,
        client: &Arc<PoolClient>,
        body: Option<StreamingBlob>,
        len: Option<i64>,
    ) -> S3Result<(Piece, String)> {
        let len = len.ok_or_else(|| s3_error!(MissingContentLength))?;
        let len = u64::try_from(len).map_err(|_| s3_error!(InvalidArgument, "negative length"))?;
        if len > MAX_PUT {
            return Err(s3_error!(
                EntityTooLarge,
                "{len} bytes: the most one request may carry is 5 GiB"
            ));
        }
        let body = match body {
            Some(b) => b,
            None if len == 0 => {
                StreamingBlob::wrap(futures::stream::empty::<Result<Bytes, std::io::Error>>())
            }
            None => return Err(s3_error!(IncompleteBody)),
        };
        let stream = body.map(|r| r.map_err(std::io::Error::other));
        let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
        let md5 = Arc::new(Mutex::new(Md5::new()));
        let hashing = Md5Reader { inner: reader, md5: md5.clone() };
        let segment_size = client.view().segment_size;
        let cap = client.put_reader(hashing, len).await.map_err(|e| {
            let msg = format!("{e:#}");
            if msg.contains("before its declared length") {
                s3_error!(IncompleteBody, "the body ended before its declared length")
            } else {
                unavailable(msg)
            }
        })?;
        let digest = hex::encode(md5.lock().unwrap().clone().finalize());
        Ok((Piece { cap: cap.encode(), size: len, segment_size }, digest))
    }

    /// Deletes pieces from the pool, signed by their uploader (the user `owner`); failures
    /// leave unreferenced shards, never a broken object.
    async fn discard(&self, owner: &str, pieces: Vec<Piece>) {
        let Some(user) = self.users.get(owner) else {
            tracing::warn!(
                owner,
                pieces = pieces.len(),
                "no identity for the owner of replaced data: left in the pool"
            );
            return;
        };
        for p in pieces {
            let Ok(cap) = p.cap.parse::<ReadCap>() else { continue };
            if let Err(e) = user.client.rm(&cap).await {
                tracing::warn!(error = %format!("{e:#}"), "could not delete replaced data");
            }
        }
    }

    /// Commits a new object under `bucket/key` for its owner if `conds` hold (and it replaces
    /// no other user's object), then deletes what it replaced (but any piece the new record
    /// still uses). A refused object's pieces are deleted: nothing will ever reference them.
    async fn commit_object(
        &self,
        bucket: &str,
        key: &str,
        record: ObjectRecord,
        conds: Vec<Expect>,
    ) -> S3Result<()> {
        let ns = self.lock_key(bucket, key).await;
        let r = self.commit_locked(bucket, key, record.clone(), conds, None).await;
        drop(ns);
        match r {
            Ok(Ok(old)) => {
                self.discard_replaced(&record, old).await;
                Ok(())
            }
            Ok(Err(r)) => {
                self.discard(&record.owner, record.pieces).await;
                Err(refusal(r))
            }
            Err(e) => Err(e),
        }
    }

    /// The commit, under the namespace lock the caller holds. The conditions (and the owner
    /// check) are decided by the log writer, atomically with the change: the inner error is a
    /// refusal (nothing was written), the outer one a failure (the change may still land).
    async fn commit_locked(
        &self,
        bucket: &str,
        key: &str,
        record: ObjectRecord,
        conds: Vec<Expect>,
        upload: Option<String>,
    ) -> S3Result<Result<Option<ObjectRecord>, Refusal>> {
        self.bucket(bucket)?;
        let check = |expect| Check { bucket: bucket.into(), key: key.into(), expect };
        let mut checks = vec![check(Expect::OwnedByOrAbsent(record.owner.clone()))];
        checks.extend(conds.into_iter().map(check));
        let op = Op::PutObject { bucket: bucket.into(), key: key.into(), record, upload };
        match self.log.commit_checked(checks, vec![op]).await {
            Ok(replaced) => Ok(Ok(replaced.into_iter().next().flatten())),
            Err(CommitError::Refused(r)) => Ok(Err(r)),
            Err(CommitError::Failed(e)) => Err(unavailable(format!("{e:#}"))),
        }
    }

    /// Deletes the pieces of `old` that `new` does not use (a repeated CompleteMultipartUpload
    /// commits the same pieces again: they must stay).
    async fn discard_replaced(&self, new: &ObjectRecord, old: Option<ObjectRecord>) {
        let Some(old) = old else { return };
        let keep: std::collections::HashSet<&str> =
            new.pieces.iter().map(|p| p.cap.as_str()).collect();
        let gone = old.pieces.into_iter().filter(|p| !keep.contains(p.cap.as_str())).collect();
        self.discard(&old.owner, gone).await;
    }

    /// Deletes `bucket/key` for `owner`: Ok if it is gone (or never was). `expect` is the
    /// DELETE's own condition (If-Match, or a DeleteObjects entry's ETag), decided by the log
    /// writer with the change; `matches` checks the rest (size, last-modified time) first.
    async fn delete(
        &self,
        owner: &str,
        bucket: &str,
        key: &str,
        expect: Option<Expect>,
        matches: impl Fn(&ObjectRecord) -> bool,
    ) -> S3Result<()> {
        let old = {
            let _ns = self.lock_key(bucket, key).await;
            self.bucket(bucket)?;
            let current = self.index.object(bucket, key).map_err(internal)?;
            let Some(current) = current else {
                return match expect {
                    Some(_) => Err(s3_error!(NoSuchKey)),
                    None => Ok(()),
                };
            };
            if current.owner != owner {
                return Err(s3_error!(
                    AccessDenied,
                    "only the user who stored an object may delete it"
                ));
            }
            if !matches(&current) {
                return Err(precondition_failed());
            }
            let check = |expect| Check { bucket: bucket.into(), key: key.into(), expect };
            let mut checks = vec![check(Expect::OwnedByOrAbsent(owner.to_string()))];
            checks.extend(expect.map(check));
            let op = Op::DeleteObject { bucket: bucket.into(), key: key.into() };
            match self.log.commit_checked(checks, vec![op]).await {
                Ok(replaced) => replaced.into_iter().next().flatten(),
                Err(CommitError::Refused(r)) => return Err(refusal(r)),
                Err(CommitError::Failed(e)) => return Err(unavailable(format!("{e:#}"))),
            }
        };
        if let Some(old) = old {
            self.discard(&old.owner, old.pieces).await;
        }
        Ok(())
    }

    /// Streams bytes `range` of `record`, reading only the segments the range touches. An
    /// error before the first byte is an S3 error; after it, the body is cut short.
    async fn stream(
        &self,
        client: Arc<PoolClient>,
        record: &ObjectRecord,
        range: std::ops::Range<u64>,
    ) -> S3Result<StreamingBlob> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let pieces = record.pieces.clone();
        tokio::spawn(async move {
            let mut w = ChannelWriter {
                tx: tx.clone(),
                buf: Vec::new(),
                rt: tokio::runtime::Handle::current(),
            };
            let mut offset = 0u64;
            for p in pieces {
                let (start, end) = (offset, offset + p.size);
                offset = end;
                if end <= range.start || start >= range.end || p.size == 0 {
                    continue;
                }
                let from = range.start.max(start) - start;
                let to = range.end.min(end) - start - 1;
                let r = async {
                    let cap: ReadCap = p.cap.parse()?;
                    client.get_range(&cap, from, to, Some(p.segment_size), &mut w).await
                }
                .await;
                if let Err(e) = r {
                    let _ = tx.send(Err(std::io::Error::other(format!("{e:#}")))).await;
                    return;
                }
            }
            if let Some(rest) = w.rest() {
                let _ = tx.send(Ok(rest)).await;
            }
        });
        let first = rx.recv().await;
        if let Some(Err(e)) = &first {
            return Err(unavailable(e));
        }
        let rest = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(StreamingBlob::wrap(futures::stream::iter(first).chain(rest)))
    }

    /// One page of a listing: objects and common prefixes after `after`, and where the next
    /// page starts if there is one.
    #[allow(clippy::type_complexity)]
    fn list(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
        after: Option<&Resume>,
        max: usize,
    ) -> S3Result<(Vec<(String, ObjectRecord)>, Vec<String>, Option<Resume>)> {
        self.bucket(bucket)?;
        let (mut objects, mut prefixes) = (Vec::new(), Vec::<String>::new());
        let mut next = None;
        let mut last: Option<Resume> = None;
        // Resuming after a common prefix skips every key under it.
        let skip_under = match after {
            Some(Resume::Prefix(p)) => Some(p.as_str()),
            _ => None,
        };
        let after = after.map(|a| match a {
            Resume::Prefix(p) | Resume::Key(p) => p.as_str(),
        });
        self.index
            .scan(bucket, prefix, after, |key, rec| {
                if skip_under.is_some_and(|s| key.starts_with(s)) {
                    return true;
                }
                let grouped = delimiter.filter(|d| !d.is_empty()).and_then(|d| {
                    let rest = &key[prefix.len()..];
                    rest.find(d).map(|i| key[..prefix.len() + i + d.len()].to_string())
                });
                if let Some(cp) = &grouped
                    && prefixes.last() == Some(cp)
                {
                    return true;
                }
                if objects.len() + prefixes.len() >= max {
                    next = last.clone();
                    return false;
                }
                match grouped {
                    Some(cp) => {
                        last = Some(Resume::Prefix(cp.clone()));
                        prefixes.push(cp);
                    }
                    None => {
                        last = Some(Resume::Key(key.clone()));
                        objects.push((key, rec));
                    }
                }
                true
            })
            .map_err(internal)?;
        Ok((objects, prefixes, next))
    }

    /// A listed object; `url` applies `encoding-type=url` to its key, `owner` adds its owner.
    fn to_object(key: String, r: &ObjectRecord, url: bool, owner: bool) -> Object {
        Object {
            key: Some(encoded(url, key)),
            owner: owner
                .then(|| Owner { id: Some(r.owner.clone()), display_name: Some(r.owner.clone()) }),
            size: Some(r.size as i64),
            e_tag: Some(etag(&r.etag)),
            last_modified: Some(ts(r.modified_ms)),
            storage_class: Some(ObjectStorageClass::from_static(ObjectStorageClass::STANDARD)),
            ..Default::default()
        }
    }

    fn upload(&self, id: &str, owner: &str) -> S3Result<Upload> {
        let raw = self
            .index
            .get_local(&upload_key(id))
            .map_err(internal)?
            .ok_or_else(|| s3_error!(NoSuchUpload))?;
        let u: Upload = serde_json::from_slice(&raw).map_err(internal)?;
        if u.owner != owner {
            return Err(s3_error!(AccessDenied, "this upload belongs to another user"));
        }
        Ok(u)
    }

    fn parts(&self, id: &str) -> S3Result<Vec<(i32, PartRecord)>> {
        let mut out = Vec::new();
        for (k, v) in self.index.scan_local(&format!("p/{id}/")).map_err(internal)? {
            let n = k.rsplit('/').next().and_then(|n| n.parse().ok()).unwrap_or(0);
            out.push((n, serde_json::from_slice(&v).map_err(internal)?));
        }
        Ok(out)
    }
}

#[async_trait::async_trait]
impl S3 for Gateway {
    async fn list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        self.caller(&req)?;
        let buckets = self
            .index
            .buckets()
            .map_err(internal)?
            .into_iter()
            .map(|(name, r)| Bucket {
                name: Some(name),
                creation_date: Some(ts(r.created_ms)),
                ..Default::default()
            })
            .collect();
        Ok(S3Response::new(ListBucketsOutput { buckets: Some(buckets), ..Default::default() }))
    }

    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        let (owner, _) = self.caller(&req)?;
        let bucket = req.input.bucket;
        if !bucket_name_allowed(&bucket) {
            return Err(s3_error!(InvalidBucketName, "the bucket name is not valid in S3"));
        }
        let _ns = self.buckets.write().await;
        if let Some(b) = self.index.bucket(&bucket).map_err(internal)? {
            return Err(if b.owner == owner {
                s3_error!(BucketAlreadyOwnedByYou)
            } else {
                s3_error!(BucketAlreadyExists)
            });
        }
        let record = BucketRecord { owner, created_ms: now_ms() };
        self.log
            .commit(vec![Op::CreateBucket { bucket: bucket.clone(), record }])
            .await
            .map_err(unavailable)?;
        Ok(S3Response::new(CreateBucketOutput { location: Some(format!("/{bucket}")) }))
    }

    async fn delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        let (owner, _) = self.caller(&req)?;
        let bucket = req.input.bucket;
        let _ns = self.buckets.write().await;
        let b = self.bucket(&bucket)?;
        if b.owner != owner {
            return Err(s3_error!(AccessDenied, "only the bucket's creator may delete it"));
        }
        if !self.index.bucket_is_empty(&bucket).map_err(internal)? {
            return Err(s3_error!(BucketNotEmpty));
        }
        self.log.commit(vec![Op::DeleteBucket { bucket }]).await.map_err(unavailable)?;
        Ok(S3Response::new(DeleteBucketOutput {}))
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.caller(&req)?;
        self.bucket(&req.input.bucket)?;
        Ok(S3Response::new(HeadBucketOutput::default()))
    }

    async fn get_bucket_encryption(
        &self,
        req: S3Request<GetBucketEncryptionInput>,
    ) -> S3Result<S3Response<GetBucketEncryptionOutput>> {
        self.caller(&req)?;
        self.bucket(&req.input.bucket)?;
        // Every bucket's default is what the pool does to every object: AES-256.
        let rule = ServerSideEncryptionRule {
            apply_server_side_encryption_by_default: Some(ServerSideEncryptionByDefault {
                kms_master_key_id: None,
                sse_algorithm: ServerSideEncryption::from_static(ServerSideEncryption::AES256),
            }),
            bucket_key_enabled: Some(false),
        };
        Ok(S3Response::new(GetBucketEncryptionOutput {
            server_side_encryption_configuration: Some(ServerSideEncryptionConfiguration {
                rules: vec![rule],
            }),
        }))
    }

    async fn put_bucket_encryption(
        &self,
        req: S3Request<PutBucketEncryptionInput>,
    ) -> S3Result<S3Response<PutBucketEncryptionOutput>> {
        let (owner, _) = self.caller(&req)?;
        let input = req.input;
        if self.bucket(&input.bucket)?.owner != owner {
            return Err(s3_error!(AccessDenied, "only the bucket's creator may configure it"));
        }
        // SSE-S3 (AES256) is what every object gets anyway: accepted. Anything else is refused,
        // not recorded and ignored.
        for rule in &input.server_side_encryption_configuration.rules {
            if let Some(d) = &rule.apply_server_side_encryption_by_default {
                check_sse(Some(&d.sse_algorithm), d.kms_master_key_id.as_deref(), None)?;
            }
        }
        Ok(S3Response::new(PutBucketEncryptionOutput::default()))
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        self.caller(&req)?;
        self.bucket(&req.input.bucket)?;
        Ok(S3Response::new(GetBucketLocationOutput::default()))
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        let (owner, user) = self.caller(&req)?;
        let mut input = req.input;
        // The cheap refusals come before the body is read: a create-only PUT of an existing
        // key is refused here (and, if another PUT wins the key meanwhile, at the commit).
        let checked = async {
            self.bucket(&input.bucket)?;
            check_sse(
                input.server_side_encryption.as_ref(),
                input.ssekms_key_id.as_deref(),
                input.sse_customer_algorithm.as_deref(),
            )?;
            let metadata = check_metadata(&input.metadata)?;
            let conds = write_conditions(input.if_none_match.as_ref(), input.if_match.as_ref())?;
            let current = self.index.object(&input.bucket, &input.key).map_err(internal)?;
            if let Some(o) = &current
                && o.owner != owner
            {
                return Err(s3_error!(AccessDenied, "this key holds another user's object"));
            }
            for c in &conds {
                let check = Check {
                    bucket: input.bucket.clone(),
                    key: input.key.clone(),
                    expect: c.clone(),
                };
                if let Err(r) = check_now(&check, current.as_ref()) {
                    return Err(refusal(r));
                }
            }
            Ok((metadata, conds))
        }
        .await;
        let (metadata, conds) = match checked {
            Ok(m) => m,
            Err(e) => return Err(refuse_body(input.body.take(), e).await),
        };
        let (piece, md5) = self.store(&user.client, input.body, input.content_length).await?;
        let headers = http_headers(
            input.cache_control,
            input.content_disposition,
            input.content_encoding,
            input.content_language,
            input.expires.as_ref(),
        );
        let record = ObjectRecord {
            size: piece.size,
            pieces: vec![piece],
            etag: md5.clone(),
            content_type: input.content_type,
            metadata,
            modified_ms: now_ms(),
            owner,
            headers,
        };
        self.commit_object(&input.bucket, &input.key, record, conds).await?;
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(etag(&md5)),
            server_side_encryption: aes256(),
            ..Default::default()
        }))
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let (_, user) = self.caller(&req)?;
        let input = req.input;
        let rec = self.object(&input.bucket, &input.key)?;
        let unmet = read_preconditions(
            &rec,
            input.if_match.as_ref(),
            input.if_none_match.as_ref(),
            input.if_modified_since.as_ref(),
            input.if_unmodified_since.as_ref(),
        );
        match unmet {
            Ok(()) => {}
            Err(Unmet::Failed) => return Err(precondition_failed()),
            Err(Unmet::NotModified) => {
                // 304 carries the validators and no body (RFC 7232 §4.1).
                let mut resp = S3Response::new(GetObjectOutput {
                    e_tag: Some(etag(&rec.etag)),
                    last_modified: Some(ts(rec.modified_ms)),
                    ..Default::default()
                });
                // s3s answers GET and HEAD 200 whatever the status asked: the front makes it 304.
                resp.extensions.insert(NotModified);
                return Ok(resp);
            }
        }
        let (range, content_range) = match &input.range {
            None => (0..rec.size, None),
            Some(r) => {
                let range = r.check(rec.size)?;
                let cr =
                    format!("bytes {}-{}/{}", range.start, range.end.saturating_sub(1), rec.size);
                (range, Some(cr))
            }
        };
        let len = range.end - range.start;
        let body = self.stream(user.client.clone(), &rec, range).await?;
        let h = rec.headers.clone();
        let out = GetObjectOutput {
            body: Some(body),
            content_length: Some(len as i64),
            content_range,
            accept_ranges: Some("bytes".into()),
            content_type: rec.content_type.clone(),
            e_tag: Some(etag(&rec.etag)),
            last_modified: Some(ts(rec.modified_ms)),
            metadata: Some(rec.metadata.clone().into_iter().collect()),
            cache_control: h.cache_control,
            content_disposition: h.content_disposition,
            content_encoding: h.content_encoding,
            content_language: h.content_language,
            expires: h.expires_ms.map(ts_ms),
            server_side_encryption: aes256(),
            ..Default::default()
        };
        let mut resp = S3Response::new(out);
        if input.range.is_some() {
            resp.status = Some(http::StatusCode::PARTIAL_CONTENT);
        }
        Ok(resp)
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        self.caller(&req)?;
        let input = req.input;
        let rec = self.object(&input.bucket, &input.key)?;
        let unmet = read_preconditions(
            &rec,
            input.if_match.as_ref(),
            input.if_none_match.as_ref(),
            input.if_modified_since.as_ref(),
            input.if_unmodified_since.as_ref(),
        );
        match unmet {
            Ok(()) => {}
            Err(Unmet::Failed) => return Err(precondition_failed()),
            Err(Unmet::NotModified) => {
                let mut resp = S3Response::new(HeadObjectOutput {
                    e_tag: Some(etag(&rec.etag)),
                    last_modified: Some(ts(rec.modified_ms)),
                    ..Default::default()
                });
                // s3s answers GET and HEAD 200 whatever the status asked: the front makes it 304.
                resp.extensions.insert(NotModified);
                return Ok(resp);
            }
        }
        let h = rec.headers.clone();
        Ok(S3Response::new(HeadObjectOutput {
            content_length: Some(rec.size as i64),
            accept_ranges: Some("bytes".into()),
            content_type: rec.content_type.clone(),
            e_tag: Some(etag(&rec.etag)),
            last_modified: Some(ts(rec.modified_ms)),
            metadata: Some(rec.metadata.clone().into_iter().collect()),
            cache_control: h.cache_control,
            content_disposition: h.content_disposition,
            content_encoding: h.content_encoding,
            content_language: h.content_language,
            expires: h.expires_ms.map(ts_ms),
            server_side_encryption: aes256(),
            ..Default::default()
        }))
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        let (owner, _) = self.caller(&req)?;
        let input = req.input;
        let expect = input.if_match.as_ref().map(|m| match m {
            ETagCondition::Any => Expect::ETag(None),
            ETagCondition::ETag(e) => Expect::ETag(Some(e.value().to_string())),
        });
        let (when, size) = (input.if_match_last_modified_time, input.if_match_size);
        let matches = |r: &ObjectRecord| {
            when.as_ref().is_none_or(|t| secs(t) == (r.modified_ms / 1000) as i64)
                && size.is_none_or(|s| s == r.size as i64)
        };
        let expect = match (expect, when.is_some() || size.is_some()) {
            (None, true) => Some(Expect::ETag(None)),
            (e, _) => e,
        };
        self.delete(&owner, &input.bucket, &input.key, expect, matches).await?;
        Ok(S3Response::new(DeleteObjectOutput::default()))
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let (owner, _) = self.caller(&req)?;
        let input = req.input;
        self.bucket(&input.bucket)?;
        if input.delete.objects.len() > MAX_KEYS {
            return Err(s3_error!(MalformedXML, "at most {MAX_KEYS} keys per request"));
        }
        let quiet = input.delete.quiet.unwrap_or(false);
        let (mut deleted, mut errors) = (Vec::new(), Vec::new());
        for o in input.delete.objects {
            // An entry's ETag, LastModifiedTime and Size are its conditions (412 if unmet).
            let expect = o.e_tag.as_ref().map(|e| Expect::ETag(Some(e.value().to_string())));
            let (when, size) = (o.last_modified_time.clone(), o.size);
            let matches = |r: &ObjectRecord| {
                when.as_ref().is_none_or(|t| secs(t) == (r.modified_ms / 1000) as i64)
                    && size.is_none_or(|s| s == r.size as i64)
            };
            let expect = match (expect, when.is_some() || size.is_some()) {
                (None, true) => Some(Expect::ETag(None)),
                (e, _) => e,
            };
            match self.delete(&owner, &input.bucket, &o.key, expect, matches).await {
                Ok(()) => {
                    if !quiet {
                        deleted.push(DeletedObject { key: Some(o.key), ..Default::default() })
                    }
                }
                Err(e) => errors.push(Error {
                    key: Some(o.key),
                    code: Some(e.code().as_str().to_string()),
                    message: e.message().map(str::to_string),
                    ..Default::default()
                }),
            }
        }
        Ok(S3Response::new(DeleteObjectsOutput {
            deleted: Some(deleted),
            errors: Some(errors),
            ..Default::default()
        }))
    }

    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        let (owner, user) = self.caller(&req)?;
        let input = req.input;
        let CopySource::Bucket { bucket: src_bucket, key: src_key, .. } = &input.copy_source else {
            return Err(s3_error!(NotImplemented, "copying from an access point"));
        };
        let src = self.object(src_bucket, src_key)?;
        self.bucket(&input.bucket)?;
        check_sse(
            input.server_side_encryption.as_ref(),
            input.ssekms_key_id.as_deref(),
            input.sse_customer_algorithm.as_deref(),
        )?;
        if input.copy_source_sse_customer_algorithm.is_some() {
            return Err(s3_error!(
                NotImplemented,
                "SSE-C (customer-provided keys) is not implemented"
            ));
        }
        // x-amz-copy-source-if-*: S3's precedence as for GET, and every unmet one is a 412.
        if read_preconditions(
            &src,
            input.copy_source_if_match.as_ref(),
            input.copy_source_if_none_match.as_ref(),
            input.copy_source_if_modified_since.as_ref(),
            input.copy_source_if_unmodified_since.as_ref(),
        )
        .is_err()
        {
            return Err(precondition_failed());
        }
        if src.size > MAX_PUT {
            return Err(s3_error!(
                InvalidRequest,
                "objects above 5 GiB are copied with UploadPartCopy"
            ));
        }
        let replace = input
            .metadata_directive
            .as_ref()
            .is_some_and(|d| d.as_str() == MetadataDirective::REPLACE);
        // S3 refuses a copy onto itself that changes nothing (metadata, storage class,
        // encryption, website redirect).
        if **src_bucket == *input.bucket
            && **src_key == *input.key
            && !replace
            && input.storage_class.is_none()
            && input.server_side_encryption.is_none()
            && input.website_redirect_location.is_none()
        {
            return Err(s3_error!(
                InvalidRequest,
                "This copy request is illegal because it is trying to copy an object to itself \
                 without changing the object's metadata, storage class, website redirect \
                 location or encryption attributes."
            ));
        }
        // Spool the source, then store it as the caller's own object (a copy is a new object:
        // deleting either leaves the other).
        let spool = tempfile::tempfile_in(&self.spool).map_err(internal)?;
        let file = std::io::BufWriter::new(spool.try_clone().map_err(internal)?);
        let mut writer = Md5Writer { inner: file, md5: Md5::new() };
        for p in &src.pieces {
            let cap: ReadCap = p.cap.parse().map_err(internal)?;
            user.client
                .get_range(&cap, 0, u64::MAX, Some(p.segment_size), &mut writer)
                .await
                .map_err(unavailable)?;
        }
        writer.flush().map_err(internal)?;
        let hasher = writer.md5;
        use std::io::Seek;
        let mut file = spool;
        file.rewind().map_err(internal)?;
        let segment_size = user.client.view().segment_size;
        let cap = user.client.put(file).await.map_err(unavailable)?;
        let md5 = hex::encode(hasher.finalize());
        let (content_type, metadata, headers) = if replace {
            let h = http_headers(
                input.cache_control.clone(),
                input.content_disposition.clone(),
                input.content_encoding.clone(),
                input.content_language.clone(),
                input.expires.as_ref(),
            );
            (input.content_type.clone(), check_metadata(&input.metadata)?, h)
        } else {
            (src.content_type.clone(), src.metadata.clone(), src.headers.clone())
        };
        let modified_ms = now_ms();
        let record = ObjectRecord {
            pieces: vec![Piece { cap: cap.encode(), size: src.size, segment_size }],
            size: src.size,
            etag: md5.clone(),
            content_type,
            metadata,
            modified_ms,
            owner,
            headers,
        };
        self.commit_object(&input.bucket, &input.key, record, Vec::new()).await?;
        let result = CopyObjectResult {
            e_tag: Some(etag(&md5)),
            last_modified: Some(ts(modified_ms)),
            ..Default::default()
        };
        Ok(S3Response::new(CopyObjectOutput {
            copy_object_result: Some(result),
            server_side_encryption: aes256(),
            ..Default::default()
        }))
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        self.caller(&req)?;
        let input = req.input;
        let url = url_encoding(&input.encoding_type);
        let prefix = input.prefix.clone().unwrap_or_default();
        let max = input.max_keys.unwrap_or(MAX_KEYS as i32).clamp(0, MAX_KEYS as i32) as usize;
        // An empty token is no token (S3 lists from the start, or from StartAfter).
        let token = input.continuation_token.clone().filter(|t| !t.is_empty());
        let after = match &token {
            Some(t) => Some(Resume::from_token(t).ok_or_else(|| {
                s3_error!(InvalidArgument, "the continuation token is not valid")
            })?),
            None => input.start_after.clone().filter(|s| !s.is_empty()).map(Resume::Key),
        };
        let (objects, prefixes, next) =
            self.list(&input.bucket, &prefix, input.delimiter.as_deref(), after.as_ref(), max)?;
        let count = (objects.len() + prefixes.len()) as i32;
        let owner = input.fetch_owner.unwrap_or(false);
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(input.bucket),
            prefix: Some(encoded(url, prefix)),
            delimiter: input.delimiter.map(|d| encoded(url, d)),
            max_keys: Some(max as i32),
            key_count: Some(count),
            is_truncated: Some(next.is_some()),
            continuation_token: input.continuation_token,
            next_continuation_token: next.map(|n| n.token()),
            start_after: input.start_after.map(|s| encoded(url, s)),
            encoding_type: input.encoding_type,
            contents: Some(
                objects.into_iter().map(|(k, r)| Self::to_object(k, &r, url, owner)).collect(),
            ),
            common_prefixes: Some(
                prefixes
                    .into_iter()
                    .map(|p| CommonPrefix { prefix: Some(encoded(url, p)) })
                    .collect(),
            ),
            ..Default::default()
        }))
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        self.caller(&req)?;
        let input = req.input;
        let url = url_encoding(&input.encoding_type);
        let prefix = input.prefix.clone().unwrap_or_default();
        let max = input.max_keys.unwrap_or(MAX_KEYS as i32).clamp(0, MAX_KEYS as i32) as usize;
        let marker = input
            .marker
            .as_deref()
            .filter(|m| !m.is_empty())
            .map(|m| Resume::from_marker(m, input.delimiter.as_deref()));
        let (objects, prefixes, next) =
            self.list(&input.bucket, &prefix, input.delimiter.as_deref(), marker.as_ref(), max)?;
        // S3 returns NextMarker only with a delimiter (clients resume after the last key
        // otherwise); returning it always is allowed and saves them the guess.
        Ok(S3Response::new(ListObjectsOutput {
            name: Some(input.bucket),
            prefix: Some(encoded(url, prefix)),
            delimiter: input.delimiter.map(|d| encoded(url, d)),
            marker: Some(encoded(url, input.marker.unwrap_or_default())),
            max_keys: Some(max as i32),
            is_truncated: Some(next.is_some()),
            next_marker: next.map(|n| encoded(url, n.into_string())),
            encoding_type: input.encoding_type,
            contents: Some(
                objects.into_iter().map(|(k, r)| Self::to_object(k, &r, url, true)).collect(),
            ),
            common_prefixes: Some(
                prefixes
                    .into_iter()
                    .map(|p| CommonPrefix { prefix: Some(encoded(url, p)) })
                    .collect(),
            ),
            ..Default::default()
        }))
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        let (owner, _) = self.caller(&req)?;
        let input = req.input;
        self.bucket(&input.bucket)?;
        check_sse(
            input.server_side_encryption.as_ref(),
            input.ssekms_key_id.as_deref(),
            input.sse_customer_algorithm.as_deref(),
        )?;
        let metadata = check_metadata(&input.metadata)?;
        let headers = http_headers(
            input.cache_control,
            input.content_disposition,
            input.content_encoding,
            input.content_language,
            input.expires.as_ref(),
        );
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(internal)?;
        let id = hex::encode(id);
        let u = Upload {
            bucket: input.bucket.clone(),
            key: input.key.clone(),
            owner,
            created_ms: now_ms(),
            content_type: input.content_type,
            metadata,
            headers,
        };
        self.index
            .put_local(&upload_key(&id), &serde_json::to_vec(&u).map_err(internal)?)
            .map_err(internal)?;
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(id),
            server_side_encryption: aes256(),
            ..Default::default()
        }))
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        let (owner, user) = self.caller(&req)?;
        let mut input = req.input;
        let checked = (|| {
            let u = self.upload(&input.upload_id, &owner)?;
            if u.bucket != input.bucket || u.key != input.key {
                return Err(s3_error!(NoSuchUpload, "this upload is for another key"));
            }
            if !(1..=MAX_PARTS).contains(&input.part_number) {
                return Err(s3_error!(InvalidArgument, "part numbers are 1 to {MAX_PARTS}"));
            }
            Ok(())
        })();
        if let Err(e) = checked {
            return Err(refuse_body(input.body.take(), e).await);
        }
        let (piece, md5) = self.store(&user.client, input.body, input.content_length).await?;
        let key = part_key(&input.upload_id, input.part_number);
        let rec = PartRecord { piece, md5: md5.clone(), modified_ms: now_ms() };
        // Under the lock: a Complete or Abort of this upload either saw this part or the
        // upload is gone (then this part is not kept).
        let old = {
            let _ns = self.lock_key(&input.bucket, &input.key).await;
            if let Err(e) = self.upload(&input.upload_id, &owner) {
                drop(_ns);
                self.discard(&owner, vec![rec.piece]).await;
                return Err(e);
            }
            let old = self.index.get_local(&key).map_err(internal)?;
            self.index
                .put_local(&key, &serde_json::to_vec(&rec).map_err(internal)?)
                .map_err(internal)?;
            old
        };
        if let Some(old) = old.and_then(|o| serde_json::from_slice::<PartRecord>(&o).ok()) {
            self.discard(&owner, vec![old.piece]).await;
        }
        Ok(S3Response::new(UploadPartOutput {
            e_tag: Some(etag(&md5)),
            server_side_encryption: aes256(),
            ..Default::default()
        }))
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let (owner, _) = self.caller(&req)?;
        let input = req.input;
        let conds = write_conditions(input.if_none_match.as_ref(), input.if_match.as_ref())?;
        // The whole completion holds the namespace lock: the parts it reads are the parts an
        // UploadPart or Abort may not change meanwhile, and a second Complete finds the first
        // one's result.
        let ns = self.lock_key(&input.bucket, &input.key).await;
        // A retried Complete (the SDK lost the answer) is answered again, as S3 does.
        if let Some(done) = self.index.completed_upload(&input.upload_id).map_err(internal)?
            && done.bucket == input.bucket
            && done.key == input.key
        {
            if done.owner != owner {
                return Err(s3_error!(AccessDenied, "this upload belongs to another user"));
            }
            return Ok(S3Response::new(CompleteMultipartUploadOutput {
                location: Some(location(&done.bucket, &done.key)),
                bucket: Some(done.bucket),
                key: Some(done.key),
                e_tag: Some(etag(&done.etag)),
                server_side_encryption: aes256(),
                ..Default::default()
            }));
        }
        let u = self.upload(&input.upload_id, &owner)?;
        if u.bucket != input.bucket || u.key != input.key {
            return Err(s3_error!(NoSuchUpload, "this upload is for another key"));
        }
        let wanted = input.multipart_upload.and_then(|m| m.parts).unwrap_or_default();
        if wanted.is_empty() {
            return Err(s3_error!(MalformedXML, "name at least one part"));
        }
        let numbers: Vec<i32> = wanted.iter().map(|w| w.part_number.unwrap_or(0)).collect();
        if numbers.windows(2).any(|w| w[0] >= w[1]) {
            return Err(s3_error!(InvalidPartOrder, "parts must be listed in ascending order"));
        }
        let mut stored: BTreeMap<i32, PartRecord> =
            self.parts(&input.upload_id)?.into_iter().collect();
        let (mut pieces, mut md5s, mut prev) = (Vec::new(), Vec::new(), 0);
        for (i, w) in wanted.iter().enumerate() {
            let n =
                w.part_number.ok_or_else(|| s3_error!(InvalidPart, "a part without a number"))?;
            if n <= prev {
                return Err(s3_error!(InvalidPartOrder));
            }
            prev = n;
            let p = stored
                .remove(&n)
                .ok_or_else(|| s3_error!(InvalidPart, "part {n} was not uploaded"))?;
            if let Some(e) = &w.e_tag
                && e.value() != p.md5
            {
                return Err(s3_error!(InvalidPart, "part {n}'s ETag does not match"));
            }
            if i + 1 < wanted.len() && p.piece.size < MIN_PART {
                return Err(s3_error!(
                    EntityTooSmall,
                    "part {n} is {} bytes; all but the last need 5 MiB",
                    p.piece.size
                ));
            }
            md5s.extend(hex::decode(&p.md5).map_err(internal)?);
            pieces.push(p.piece);
        }
        let etag_value = format!("{}-{}", hex::encode(Md5::digest(&md5s)), pieces.len());
        let size = pieces.iter().map(|p| p.size).sum();
        let record = ObjectRecord {
            pieces,
            size,
            etag: etag_value.clone(),
            content_type: u.content_type,
            metadata: u.metadata,
            modified_ms: now_ms(),
            owner: owner.clone(),
            headers: u.headers,
        };
        let id = Some(input.upload_id.clone());
        // A refused Complete (If-None-Match / If-Match) leaves the upload as it was.
        let old = self
            .commit_locked(&input.bucket, &input.key, record.clone(), conds, id)
            .await?
            .map_err(refusal)?;
        self.index.delete_local_prefix(&format!("p/{}/", input.upload_id)).map_err(internal)?;
        self.index.delete_local_prefix(&upload_key(&input.upload_id)).map_err(internal)?;
        drop(ns);
        self.discard_replaced(&record, old).await;
        // Parts uploaded but not named are not part of the object.
        self.discard(&owner, stored.into_values().map(|p| p.piece).collect()).await;
        Ok(S3Response::new(CompleteMultipartUploadOutput {
            location: Some(location(&input.bucket, &input.key)),
            bucket: Some(input.bucket),
            key: Some(input.key),
            e_tag: Some(etag(&etag_value)),
            server_side_encryption: aes256(),
            ..Default::default()
        }))
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        let (owner, _) = self.caller(&req)?;
        let input = req.input;
        let parts = {
            let _ns = self.lock_key(&input.bucket, &input.key).await;
            let u = self.upload(&input.upload_id, &owner)?;
            if u.bucket != input.bucket || u.key != input.key {
                return Err(s3_error!(NoSuchUpload, "this upload is for another key"));
            }
            let parts = self.parts(&input.upload_id)?;
            self.index.delete_local_prefix(&format!("p/{}/", input.upload_id)).map_err(internal)?;
            self.index.delete_local_prefix(&upload_key(&input.upload_id)).map_err(internal)?;
            parts
        };
        self.discard(&owner, parts.into_iter().map(|(_, p)| p.piece).collect()).await;
        Ok(S3Response::new(AbortMultipartUploadOutput::default()))
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        let (owner, _) = self.caller(&req)?;
        let input = req.input;
        self.upload(&input.upload_id, &owner)?;
        let max = input.max_parts.unwrap_or(1000).clamp(0, 1000) as usize;
        let marker = input.part_number_marker.unwrap_or(0);
        let all: Vec<_> =
            self.parts(&input.upload_id)?.into_iter().filter(|(n, _)| *n > marker).collect();
        let truncated = all.len() > max;
        let parts: Vec<Part> = all
            .into_iter()
            .take(max)
            .map(|(n, p)| Part {
                part_number: Some(n),
                size: Some(p.piece.size as i64),
                e_tag: Some(etag(&p.md5)),
                last_modified: Some(ts(p.modified_ms)),
                ..Default::default()
            })
            .collect();
        let next = if truncated { parts.last().and_then(|p| p.part_number) } else { None };
        Ok(S3Response::new(ListPartsOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(input.upload_id),
            max_parts: Some(max as i32),
            is_truncated: Some(truncated),
            next_part_number_marker: next,
            parts: Some(parts),
            ..Default::default()
        }))
    }

    async fn list_multipart_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        self.caller(&req)?;
        let input = req.input;
        self.bucket(&input.bucket)?;
        let url = url_encoding(&input.encoding_type);
        let prefix = input.prefix.clone().unwrap_or_default();
        let delimiter = input.delimiter.clone().filter(|d| !d.is_empty());
        let max = input.max_uploads.unwrap_or(1000).clamp(0, 1000) as usize;
        let mut all = Vec::new();
        for (k, v) in self.index.scan_local("u/").map_err(internal)? {
            let u: Upload = serde_json::from_slice(&v).map_err(internal)?;
            if u.bucket != input.bucket || !u.key.starts_with(&prefix) {
                continue;
            }
            let id = k.strip_prefix("u/").unwrap_or(&k).to_string();
            all.push((u.key, u.created_ms, id));
        }
        // S3's order: by key, then by initiation time.
        all.sort();
        // Resume after (KeyMarker, UploadIdMarker), or after every upload of KeyMarker.
        let key_marker = input.key_marker.clone().filter(|m| !m.is_empty());
        let after_marker = |(key, created, id): &(String, u64, String)| match &key_marker {
            None => true,
            Some(m) => match &input.upload_id_marker {
                Some(idm) if key == m => all
                    .iter()
                    .find(|(k, _, i)| k == m && i == idm)
                    .is_some_and(|(_, c, i)| (*created, id) > (*c, i)),
                _ => key > m,
            },
        };
        let (mut uploads, mut prefixes) = (Vec::new(), Vec::<String>::new());
        let (mut next_key, mut next_id, mut truncated) = (None, None, false);
        for entry in all.iter().filter(|e| after_marker(e)) {
            let (key, created, id) = entry;
            let grouped = delimiter.as_deref().and_then(|d| {
                key[prefix.len()..].find(d).map(|i| key[..prefix.len() + i + d.len()].to_string())
            });
            if let Some(cp) = &grouped
                && prefixes.last() == Some(cp)
            {
                continue;
            }
            // Resuming after a common prefix skips every upload under it.
            if grouped.is_some() && grouped == key_marker {
                continue;
            }
            if uploads.len() + prefixes.len() >= max {
                truncated = true;
                break;
            }
            match grouped {
                Some(cp) => {
                    next_key = Some(cp.clone());
                    next_id = None;
                    prefixes.push(cp);
                }
                None => {
                    next_key = Some(key.clone());
                    next_id = Some(id.clone());
                    uploads.push(MultipartUpload {
                        key: Some(encoded(url, key.clone())),
                        upload_id: Some(id.clone()),
                        initiated: Some(ts(*created)),
                        storage_class: Some(StorageClass::from_static(StorageClass::STANDARD)),
                        ..Default::default()
                    });
                }
            }
        }
        Ok(S3Response::new(ListMultipartUploadsOutput {
            bucket: Some(input.bucket),
            prefix: Some(encoded(url, prefix)),
            delimiter: delimiter.map(|d| encoded(url, d)),
            key_marker: input.key_marker.map(|m| encoded(url, m)),
            upload_id_marker: input.upload_id_marker,
            max_uploads: Some(max as i32),
            is_truncated: Some(truncated),
            next_key_marker: if truncated { next_key.map(|k| encoded(url, k)) } else { None },
            next_upload_id_marker: if truncated { next_id } else { None },
            encoding_type: input.encoding_type,
            uploads: Some(uploads),
            common_prefixes: Some(
                prefixes
                    .into_iter()
                    .map(|p| CommonPrefix { prefix: Some(encoded(url, p)) })
                    .collect(),
            ),
            ..Default::default()
        }))
    }
}

/// S3's bucket naming rules beyond the syntax s3s checks (3-63 of `a-z 0-9 . -`, a letter or
/// digit at both ends, no `..`, not an IP address, no `xn--`): every dot-separated label
/// starts and ends with a letter or digit (no `.-` or `-.`), and the names S3 reserves.
fn bucket_name_allowed(name: &str) -> bool {
    const PREFIXES: [&str; 4] = ["xn--", "sthree-", "sthree-configurator", "amzn-s3-demo-"];
    const SUFFIXES: [&str; 5] = ["-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3"];
    s3s::path::check_bucket_name(name)
        && !name.contains(".-")
        && !name.contains("-.")
        && !PREFIXES.iter().any(|p| name.starts_with(p))
        && !SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// SigV4 secrets by access key.
struct Auth(HashMap<String, String>);

#[async_trait::async_trait]
impl s3s::auth::S3Auth for Auth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<s3s::auth::SecretKey> {
        self.0
            .get(access_key)
            .map(|s| s.clone().into())
            .ok_or_else(|| s3_error!(InvalidAccessKeyId))
    }
}

// ---- The HTTP front ----
//
// What S3 does around every operation and s3s leaves to its user: a request id in the
// `x-amz-request-id` header and in the `<RequestId>` of every error body (clients print it,
// operators grep for it), the presigned-URL expiry limit (at most 7 days, checked before the
// signature), and PUTs whose length is unknown (`Transfer-Encoding: chunked`, no
// Content-Length), which s3s refuses: their body is spooled to disk first, bounded by 5 GiB,
// and then handed to s3s with its length.

/// Marks a GET or HEAD response whose preconditions answer 304 Not Modified.
#[derive(Clone, Copy)]
struct NotModified;

/// The longest a SigV4 presigned URL may live (S3: 604 800 s, 7 days).
const MAX_PRESIGNED_EXPIRY: i64 = 7 * 24 * 3600;

/// The s3s service behind the HTTP front.
struct Front {
    s3: s3s::service::S3Service,
    spool: PathBuf,
}

/// A fresh request id: 16 upper-case hex digits, as S3's.
fn request_id() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    hex::encode_upper(b)
}

/// An S3 error response of the front's own.
fn error_response(
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

/// The presigned-URL limits S3 enforces before the signature: a SigV4 X-Amz-Expires above 7
/// days (or not a number) is refused, a negative one has expired. A SigV2 URL (which boto3
/// makes for a custom endpoint) names its expiry as a time: one more than 7 days ahead is
/// refused the same way, so no URL the gateway serves outlives a week.
fn presigned_refusal(uri: &http::Uri) -> Option<http::Response<s3s::Body>> {
    let query = uri.query()?;
    let param = |name: &str| query.split('&').find_map(|p| p.strip_prefix(name));
    let denied = |msg: &str| Some(error_response(http::StatusCode::FORBIDDEN, "AccessDenied", msg));
    let too_long = "X-Amz-Expires must be less than a week (in seconds) that is; 604800";
    if param("X-Amz-Signature=").is_some() {
        let expires = param("X-Amz-Expires=")?;
        return match expires.parse::<i64>() {
            Ok(e) if e < 0 => denied("Request has expired"),
            Ok(e) if e <= MAX_PRESIGNED_EXPIRY => None,
            _ => denied(too_long),
        };
    }
    if param("Signature=").is_some() {
        let expires = param("Expires=")?.parse::<i64>().ok()?;
        let now = (now_ms() / 1000) as i64;
        if expires.saturating_sub(now) > MAX_PRESIGNED_EXPIRY {
            return denied(too_long);
        }
    }
    None
}

impl Front {
    async fn handle(&self, req: http::Request<hyper::body::Incoming>) -> http::Response<s3s::Body> {
        let id = request_id();
        let head = req.method() == http::Method::HEAD;
        let mut resp = match presigned_refusal(req.uri()) {
            Some(refused) => refused,
            None => match self.with_length(req.map(s3s::Body::from)).await {
                Err(refused) => refused,
                Ok(req) => match self.s3.call(req).await {
                    Ok(resp) => resp,
                    Err(e) => {
                        tracing::error!(error = ?e, "the S3 service failed");
                        error_response(
                            http::StatusCode::INTERNAL_SERVER_ERROR,
                            "InternalError",
                            "We encountered an internal error. Please try again.",
                        )
                    }
                },
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

/// An error body with `<RequestId>` set to the header's id (s3s writes none).
fn with_request_id(body: &[u8], id: &str) -> s3s::Body {
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

    fn record(etag: &str, modified_ms: u64) -> ObjectRecord {
        ObjectRecord {
            pieces: Vec::new(),
            size: 0,
            etag: etag.into(),
            content_type: None,
            metadata: BTreeMap::new(),
            modified_ms,
            owner: "ALICE".into(),
            headers: HttpHeaders::default(),
        }
    }

    #[test]
    fn url_encoding_is_what_form_decoders_undo() {
        assert_eq!(url_encode("foo+1/bar baz"), "foo%2B1/bar%20baz");
        assert_eq!(url_encode("%2B~._-"), "%252B~._-");
        assert_eq!(url_encode("é/日"), "%C3%A9/%E6%97%A5");
        assert_eq!(url_encode("a&b=c?d;"), "a%26b%3Dc%3Fd%3B");
    }

    #[test]
    fn read_preconditions_follow_s3_precedence() {
        let rec = record("abc", 1_000_000_500);
        let tag = |e: &str| ETagCondition::ETag(ETag::Strong(e.into()));
        let (yes, no, any) = (tag("abc"), tag("x"), ETagCondition::Any);
        // Last-Modified is 1 000 000 s (milliseconds are cut, as in the HTTP date).
        let (same, before) = (ts(1_000_000_000), ts(999_999_000));
        let check = |m, n, ims, ius| read_preconditions(&rec, m, n, ims, ius);
        assert_eq!(check(Some(&yes), None, None, None), Ok(()));
        assert_eq!(check(Some(&no), None, None, None), Err(Unmet::Failed));
        assert_eq!(check(Some(&any), None, None, None), Ok(()));
        assert_eq!(check(None, Some(&yes), None, None), Err(Unmet::NotModified));
        assert_eq!(check(None, Some(&any), None, None), Err(Unmet::NotModified));
        assert_eq!(check(None, Some(&no), None, None), Ok(()));
        assert_eq!(check(None, None, Some(&same), None), Err(Unmet::NotModified));
        assert_eq!(check(None, None, Some(&before), None), Ok(()));
        assert_eq!(check(None, None, None, Some(&before)), Err(Unmet::Failed));
        assert_eq!(check(None, None, None, Some(&same)), Ok(()));
        // If-Match true + If-Unmodified-Since false: 200.
        assert_eq!(check(Some(&yes), None, None, Some(&before)), Ok(()));
        // If-None-Match false + If-Modified-Since true: 304.
        assert_eq!(check(None, Some(&yes), Some(&before), None), Err(Unmet::NotModified));
        // If-None-Match true + If-Modified-Since false: 200 (If-None-Match decides).
        assert_eq!(check(None, Some(&no), Some(&same), None), Ok(()));
        // 412 before 304.
        assert_eq!(check(Some(&no), Some(&yes), None, None), Err(Unmet::Failed));
    }

    #[test]
    fn write_conditions_take_star_for_if_none_match() {
        let tag = ETagCondition::ETag(ETag::Strong("abc".into()));
        assert_eq!(write_conditions(Some(&ETagCondition::Any), None).unwrap(), [Expect::Absent]);
        assert_eq!(write_conditions(None, Some(&tag)).unwrap(), [Expect::ETag(Some("abc".into()))]);
        assert!(write_conditions(Some(&tag), None).is_err());
    }

    #[test]
    fn bucket_names_s3_refuses_are_refused() {
        for bad in ["foo.-bar", "foo-.bar", "xn--abc", "sthree-x", "abc-s3alias", "a..b", "AB"] {
            assert!(!bucket_name_allowed(bad), "{bad}");
        }
        for good in ["foo.bar", "foo-bar", "a1.b-2.c3", "abc"] {
            assert!(bucket_name_allowed(good), "{good}");
        }
    }

    #[test]
    fn presigned_urls_past_seven_days_or_negative_are_refused() {
        let uri = |q: &str| format!("/b/k?X-Amz-Signature=ab&{q}").parse::<http::Uri>().unwrap();
        assert!(presigned_refusal(&uri("X-Amz-Expires=604800")).is_none());
        assert!(presigned_refusal(&uri("X-Amz-Expires=604801")).is_some());
        assert!(presigned_refusal(&uri("X-Amz-Expires=-1")).is_some());
        assert!(presigned_refusal(&"/b/k?X-Amz-Expires=9999999".parse().unwrap()).is_none());
        let now = (now_ms() / 1000) as i64;
        let v2 = |e: i64| format!("/b/k?AWSAccessKeyId=A&Signature=x&Expires={e}").parse().unwrap();
        assert!(presigned_refusal(&v2(now + 3600)).is_none());
        assert!(presigned_refusal(&v2(now + 609_901)).is_some());
    }

    #[test]
    fn error_bodies_get_the_request_id() {
        let body = b"<?xml version=\"1.0\"?><Error><Code>NoSuchKey</Code></Error>";
        let out = with_request_id(body, "ABC123").bytes().unwrap();
        assert!(String::from_utf8_lossy(&out).ends_with("<RequestId>ABC123</RequestId></Error>"));
    }
}
