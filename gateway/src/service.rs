//! The gateway's state and what every area shares: the per-key locks, storing and streaming
//! an object's bytes, committing and discarding, S3 errors and headers. The `S3` trait is
//! implemented here, each operation a call into its area's module.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use md5::{Digest, Md5};
use s3s::dto::*;
use s3s::{S3, S3Error, S3Request, S3Response, S3Result, s3_error};
use shardfarm_client::PoolClient;
use shardfarm_core::cap::ReadCap;

use crate::auth::User;
use crate::namespace::{
    BucketRecord, Check, CommitError, Expect, HttpHeaders, Index, Intent, Log, ObjectRecord, Op,
    Piece, Refusal, Target,
};
use crate::objects::{precondition_failed, refusal};
use crate::{buckets, listing, multipart, objects};

/// Largest object one PUT (or one part) may carry, as in S3.
pub(crate) const MAX_PUT: u64 = 5 << 30;
/// Most keys one listing returns, as in S3.
pub(crate) const MAX_KEYS: usize = 1000;
/// Stripes of the per-key lock.
pub(crate) const STRIPES: usize = 256;
/// Largest user metadata (names and values), as in S3.
pub(crate) const MAX_METADATA: usize = 2048;

/// The gateway's state.
pub(crate) struct Gateway {
    pub(crate) users: HashMap<String, User>,
    pub(crate) index: Arc<Index>,
    pub(crate) log: Log,
    pub(crate) spool: PathBuf,
    /// Bucket creation and deletion hold it for writing; every change of an object holds it
    /// for reading (so a bucket cannot vanish under a put, nor be emptied-then-filled while
    /// its deletion checks it).
    pub(crate) buckets: tokio::sync::RwLock<()>,
    /// Held from an object's ownership check to its commit, striped by bucket and key: two
    /// changes of one key never race past each other, and changes of different keys commit
    /// concurrently (the log writer puts them in one entry).
    pub(crate) stripes: Vec<tokio::sync::Mutex<()>>,
    /// The capabilities of the data being written now (from its intent to its commit): the
    /// collector leaves them alone whatever their age.
    pub(crate) writing: InFlight,
}

/// Capabilities of data being written (see [`Gateway::begin_write`]).
pub(crate) type InFlight = Arc<Mutex<std::collections::HashSet<String>>>;

/// A write in progress: its intent is recorded, and it is in flight until this is dropped.
pub(crate) struct Writing {
    writing: InFlight,
    index: Arc<Index>,
    /// The object key the data is stored under.
    pub(crate) key: [u8; 32],
    /// Its capability.
    pub(crate) cap: String,
}

impl Writing {
    /// The data is referenced by a committed entry: its intent is dropped (a failure only
    /// leaves it to the collector, which finds it referenced).
    pub(crate) fn committed(&self) {
        if let Err(e) = self.index.drop_intent(&self.cap) {
            tracing::warn!(error = %e, "could not drop a write's intent");
        }
    }
}

impl Drop for Writing {
    fn drop(&mut self) {
        self.writing.lock().unwrap().remove(&self.cap);
    }
}

pub(crate) fn now_ms() -> u64 {
    shardfarm_core::auth::now_ms()
}

pub(crate) fn ts(ms: u64) -> Timestamp {
    Timestamp::from(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
}

pub(crate) fn etag(s: &str) -> ETag {
    ETag::Strong(s.to_string())
}

/// A failure of the gateway's own (its index): 500.
pub(crate) fn internal(e: impl std::fmt::Display) -> S3Error {
    tracing::error!(error = %e, "gateway error");
    s3_error!(InternalError, "{e}")
}

/// A failure of the pool (nodes unreachable, too few shards): 503, which clients retry.
pub(crate) fn unavailable(e: impl std::fmt::Display) -> S3Error {
    tracing::warn!(error = %e, "pool error");
    s3_error!(ServiceUnavailable, "the pool could not serve this request: {e}")
}

/// Whole seconds since the epoch of an S3 timestamp (HTTP dates have a one-second
/// resolution, so Last-Modified is compared in seconds).
pub(crate) fn secs(t: &Timestamp) -> i64 {
    let mut buf = Vec::new();
    if t.format(TimestampFormat::EpochSeconds, &mut buf).is_err() {
        return 0;
    }
    String::from_utf8_lossy(&buf).parse::<f64>().map_or(0, |f| f.floor() as i64)
}

/// The timestamp of unix milliseconds.
pub(crate) fn ts_ms(ms: i64) -> Timestamp {
    let t = if ms >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    };
    Timestamp::from(t)
}

/// Checks a write's server-side encryption request: SSE-S3 (AES256) is what the pool does to
/// every object (AES-256-GCM before any byte leaves the gateway), so it is granted; SSE-KMS
/// and SSE-C are not done, and are refused rather than silently ignored.
pub(crate) fn check_sse(
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
pub(crate) fn aes256() -> Option<ServerSideEncryption> {
    Some(ServerSideEncryption::from_static(ServerSideEncryption::AES256))
}

/// The stored HTTP headers of a write.
pub(crate) fn http_headers(
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

pub(crate) fn check_metadata(meta: &Option<Metadata>) -> S3Result<BTreeMap<String, String>> {
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
pub(crate) async fn refuse_body(body: Option<StreamingBlob>, error: S3Error) -> S3Error {
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

/// Hashes what is read through it.
pub(crate) struct Md5Reader<R> {
    pub(crate) inner: R,
    pub(crate) md5: Arc<Mutex<Md5>>,
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
pub(crate) struct ChannelWriter {
    pub(crate) tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    pub(crate) buf: Vec<u8>,
    pub(crate) rt: tokio::runtime::Handle,
}

/// How long a GET's client may take to accept the next MiB before the gateway gives up on it
/// (a reader that stops reading must not hold a thread and the pool reads forever).
pub(crate) const READER_DEADLINE: Duration = Duration::from_secs(60);

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
pub(crate) struct Md5Writer<W> {
    pub(crate) inner: W,
    pub(crate) md5: Md5,
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
    pub(crate) async fn lock_key(&self, bucket: &str, key: &str) -> KeyGuard<'_> {
        let read = self.buckets.read().await;
        let h = shardfarm_core::identity::blake2b256(&[bucket.as_bytes(), b"/", key.as_bytes()]);
        let i = u64::from_le_bytes(h[..8].try_into().expect("8 bytes")) as usize % STRIPES;
        (read, self.stripes[i].lock().await)
    }

    /// A gateway over `index` and `log`, for `users`.
    pub fn new(
        users: HashMap<String, User>,
        index: Arc<Index>,
        log: Log,
        spool: PathBuf,
        writing: InFlight,
    ) -> Self {
        let stripes = (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect();
        let buckets = tokio::sync::RwLock::new(());
        Gateway { users, index, log, spool, buckets, stripes, writing }
    }

    pub(crate) fn bucket(&self, bucket: &str) -> S3Result<BucketRecord> {
        self.index.bucket(bucket).map_err(internal)?.ok_or_else(|| s3_error!(NoSuchBucket))
    }

    pub(crate) fn object(&self, bucket: &str, key: &str) -> S3Result<ObjectRecord> {
        self.bucket(bucket)?;
        self.index.object(bucket, key).map_err(internal)?.ok_or_else(|| s3_error!(NoSuchKey))
    }

    /// Stores `len` bytes of `body` as one pool object signed by `client`: its piece and MD5.
    pub(crate) async fn store(
        &self,
        client: &Arc<PoolClient>,
        owner: &str,
        at: Target,
        body: Option<StreamingBlob>,
        len: Option<i64>,
    ) -> S3Result<(Piece, String, Writing)> {
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
        let writing = self.begin_write(client, owner, at)?;
        let cap = client.put_reader_with_key(writing.key, hashing, len).await.map_err(|e| {
            let msg = format!("{e:#}");
            if msg.contains("before its declared length") {
                s3_error!(IncompleteBody, "the body ended before its declared length")
            } else {
                unavailable(msg)
            }
        })?;
        let digest = hex::encode(md5.lock().unwrap().clone().finalize());
        Ok((Piece { cap: cap.encode(), size: len, segment_size }, digest, writing))
    }

    /// Before data is stored for `owner` to be referenced `at`: a fresh random object key,
    /// and the intent for its capability recorded (synced) and marked in flight.
    pub(crate) fn begin_write(
        &self,
        client: &Arc<PoolClient>,
        owner: &str,
        at: Target,
    ) -> S3Result<Writing> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(internal)?;
        let cap = client.cap_for_key(key).encode();
        self.writing.lock().unwrap().insert(cap.clone());
        let writing =
            Writing { writing: self.writing.clone(), index: self.index.clone(), key, cap };
        let intent = Intent { owner: owner.to_string(), created_ms: now_ms(), at: Some(at) };
        self.index.add_intent(&writing.cap, &intent).map_err(internal)?;
        Ok(writing)
    }

    /// Deletes pieces from the pool, signed by their uploader (the user `owner`); failures
    /// leave unreferenced shards, never a broken object.
    pub(crate) async fn discard(&self, owner: &str, pieces: Vec<Piece>) {
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
            // An intent first (unless its write's is still there): a deletion that fails is
            // tried again by the collector.
            let intent = Intent { owner: owner.to_string(), created_ms: now_ms(), at: None };
            if !self.index.has_intent(&p.cap).unwrap_or(false)
                && let Err(e) = self.index.add_intent(&p.cap, &intent)
            {
                tracing::warn!(error = %e, "could not record a deletion's intent");
            }
            match user.client.rm(&cap).await {
                Ok(_) => {
                    if let Err(e) = self.index.drop_intent(&p.cap) {
                        tracing::warn!(error = %e, "could not drop a deletion's intent");
                    }
                }
                Err(e) => tracing::warn!(
                    error = %format!("{e:#}"),
                    "could not delete replaced data: the collector tries again"
                ),
            }
        }
    }

    /// Commits a new object under `bucket/key` for its owner if `conds` hold (and it replaces
    /// no other user's object), then deletes what it replaced (but any piece the new record
    /// still uses). A refused object's pieces are deleted: nothing will ever reference them.
    pub(crate) async fn commit_object(
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
    pub(crate) async fn commit_locked(
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
    pub(crate) async fn discard_replaced(&self, new: &ObjectRecord, old: Option<ObjectRecord>) {
        let Some(old) = old else { return };
        let keep: std::collections::HashSet<&str> =
            new.pieces.iter().map(|p| p.cap.as_str()).collect();
        let gone = old.pieces.into_iter().filter(|p| !keep.contains(p.cap.as_str())).collect();
        self.discard(&old.owner, gone).await;
    }

    /// Deletes `bucket/key` for `owner`: Ok if it is gone (or never was). `expect` is the
    /// DELETE's own condition (If-Match, or a DeleteObjects entry's ETag), decided by the log
    /// writer with the change; `matches` checks the rest (size, last-modified time) first.
    pub(crate) async fn delete(
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
    pub(crate) async fn stream(
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
}

#[async_trait::async_trait]
impl S3 for Gateway {
    async fn list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        buckets::list_buckets(self, req).await
    }

    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        buckets::create_bucket(self, req).await
    }

    async fn delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        buckets::delete_bucket(self, req).await
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        buckets::head_bucket(self, req).await
    }

    async fn get_bucket_encryption(
        &self,
        req: S3Request<GetBucketEncryptionInput>,
    ) -> S3Result<S3Response<GetBucketEncryptionOutput>> {
        buckets::get_bucket_encryption(self, req).await
    }

    async fn put_bucket_encryption(
        &self,
        req: S3Request<PutBucketEncryptionInput>,
    ) -> S3Result<S3Response<PutBucketEncryptionOutput>> {
        buckets::put_bucket_encryption(self, req).await
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        buckets::get_bucket_location(self, req).await
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        objects::put_object(self, req).await
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        objects::get_object(self, req).await
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        objects::head_object(self, req).await
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        objects::delete_object(self, req).await
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        objects::delete_objects(self, req).await
    }

    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        objects::copy_object(self, req).await
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        listing::list_objects_v2(self, req).await
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        listing::list_objects(self, req).await
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        multipart::create_multipart_upload(self, req).await
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        multipart::upload_part(self, req).await
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        multipart::complete_multipart_upload(self, req).await
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        multipart::abort_multipart_upload(self, req).await
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        multipart::list_parts(self, req).await
    }

    async fn list_multipart_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        multipart::list_multipart_uploads(self, req).await
    }
}
