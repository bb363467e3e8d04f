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
use super::namespace::{BucketRecord, Index, Log, ObjectRecord, Op, Piece};

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

    /// Commits a new object under `bucket/key` for `owner` (refusing to replace another
    /// user's), then deletes what it replaced (but any piece the new record still uses).
    async fn commit_object(&self, bucket: &str, key: &str, record: ObjectRecord) -> S3Result<()> {
        let _ns = self.lock_key(bucket, key).await;
        let old = self.commit_locked(bucket, key, record.clone()).await?;
        drop(_ns);
        self.discard_replaced(&record, old).await;
        Ok(())
    }

    /// The check and the commit, under the namespace lock the caller holds.
    async fn commit_locked(
        &self,
        bucket: &str,
        key: &str,
        record: ObjectRecord,
    ) -> S3Result<Option<ObjectRecord>> {
        self.bucket(bucket)?;
        let old = self.index.object(bucket, key).map_err(internal)?;
        if let Some(o) = &old
            && o.owner != record.owner
        {
            return Err(s3_error!(AccessDenied, "this key holds another user's object"));
        }
        let op = Op::PutObject { bucket: bucket.into(), key: key.into(), record };
        self.log.commit(vec![op]).await.map_err(unavailable)?;
        Ok(old)
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

    /// Deletes `bucket/key` for `owner`: Ok if it is gone (or never was).
    async fn delete(&self, owner: &str, bucket: &str, key: &str) -> S3Result<()> {
        let old = {
            let _ns = self.lock_key(bucket, key).await;
            self.bucket(bucket)?;
            let Some(old) = self.index.object(bucket, key).map_err(internal)? else {
                return Ok(());
            };
            if old.owner != owner {
                return Err(s3_error!(
                    AccessDenied,
                    "only the user who stored an object may delete it"
                ));
            }
            let op = Op::DeleteObject { bucket: bucket.into(), key: key.into() };
            self.log.commit(vec![op]).await.map_err(unavailable)?;
            old
        };
        self.discard(owner, old.pieces).await;
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

    fn to_object(key: String, r: &ObjectRecord) -> Object {
        Object {
            key: Some(key),
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
        let checked = async {
            self.bucket(&input.bucket)?;
            let metadata = check_metadata(&input.metadata)?;
            if let Some(o) = self.index.object(&input.bucket, &input.key).map_err(internal)?
                && o.owner != owner
            {
                return Err(s3_error!(AccessDenied, "this key holds another user's object"));
            }
            Ok(metadata)
        }
        .await;
        let metadata = match checked {
            Ok(m) => m,
            Err(e) => return Err(refuse_body(input.body.take(), e).await),
        };
        let (piece, md5) = self.store(&user.client, input.body, input.content_length).await?;
        let record = ObjectRecord {
            size: piece.size,
            pieces: vec![piece],
            etag: md5.clone(),
            content_type: input.content_type,
            metadata,
            modified_ms: now_ms(),
            owner,
        };
        self.commit_object(&input.bucket, &input.key, record).await?;
        Ok(S3Response::new(PutObjectOutput { e_tag: Some(etag(&md5)), ..Default::default() }))
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let (_, user) = self.caller(&req)?;
        let input = req.input;
        let rec = self.object(&input.bucket, &input.key)?;
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
        let out = GetObjectOutput {
            body: Some(body),
            content_length: Some(len as i64),
            content_range,
            accept_ranges: Some("bytes".into()),
            content_type: rec.content_type.clone(),
            e_tag: Some(etag(&rec.etag)),
            last_modified: Some(ts(rec.modified_ms)),
            metadata: Some(rec.metadata.clone().into_iter().collect()),
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
        let rec = self.object(&req.input.bucket, &req.input.key)?;
        Ok(S3Response::new(HeadObjectOutput {
            content_length: Some(rec.size as i64),
            accept_ranges: Some("bytes".into()),
            content_type: rec.content_type.clone(),
            e_tag: Some(etag(&rec.etag)),
            last_modified: Some(ts(rec.modified_ms)),
            metadata: Some(rec.metadata.clone().into_iter().collect()),
            ..Default::default()
        }))
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        let (owner, _) = self.caller(&req)?;
        self.delete(&owner, &req.input.bucket, &req.input.key).await?;
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
            match self.delete(&owner, &input.bucket, &o.key).await {
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
        let (content_type, metadata) = if replace {
            (input.content_type.clone(), check_metadata(&input.metadata)?)
        } else {
            (src.content_type.clone(), src.metadata.clone())
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
        };
        self.commit_object(&input.bucket, &input.key, record).await?;
        let result = CopyObjectResult {
            e_tag: Some(etag(&md5)),
            last_modified: Some(ts(modified_ms)),
            ..Default::default()
        };
        Ok(S3Response::new(CopyObjectOutput {
            copy_object_result: Some(result),
            ..Default::default()
        }))
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        self.caller(&req)?;
        let input = req.input;
        let prefix = input.prefix.clone().unwrap_or_default();
        let max = input.max_keys.unwrap_or(MAX_KEYS as i32).clamp(0, MAX_KEYS as i32) as usize;
        let after = match &input.continuation_token {
            Some(t) => Some(Resume::from_token(t).ok_or_else(|| {
                s3_error!(InvalidArgument, "the continuation token is not valid")
            })?),
            None => input.start_after.clone().map(Resume::Key),
        };
        let (objects, prefixes, next) =
            self.list(&input.bucket, &prefix, input.delimiter.as_deref(), after.as_ref(), max)?;
        let count = (objects.len() + prefixes.len()) as i32;
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(input.bucket),
            prefix: Some(prefix),
            delimiter: input.delimiter,
            max_keys: Some(max as i32),
            key_count: Some(count),
            is_truncated: Some(next.is_some()),
            continuation_token: input.continuation_token,
            next_continuation_token: next.map(|n| n.token()),
            start_after: input.start_after,
            encoding_type: input.encoding_type,
            contents: Some(objects.into_iter().map(|(k, r)| Self::to_object(k, &r)).collect()),
            common_prefixes: Some(
                prefixes.into_iter().map(|p| CommonPrefix { prefix: Some(p) }).collect(),
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
        let prefix = input.prefix.clone().unwrap_or_default();
        let max = input.max_keys.unwrap_or(MAX_KEYS as i32).clamp(0, MAX_KEYS as i32) as usize;
        let marker =
            input.marker.as_deref().map(|m| Resume::from_marker(m, input.delimiter.as_deref()));
        let (objects, prefixes, next) =
            self.list(&input.bucket, &prefix, input.delimiter.as_deref(), marker.as_ref(), max)?;
        Ok(S3Response::new(ListObjectsOutput {
            name: Some(input.bucket),
            prefix: Some(prefix),
            delimiter: input.delimiter,
            marker: input.marker,
            max_keys: Some(max as i32),
            is_truncated: Some(next.is_some()),
            next_marker: next.map(Resume::into_string),
            encoding_type: input.encoding_type,
            contents: Some(objects.into_iter().map(|(k, r)| Self::to_object(k, &r)).collect()),
            common_prefixes: Some(
                prefixes.into_iter().map(|p| CommonPrefix { prefix: Some(p) }).collect(),
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
        let metadata = check_metadata(&input.metadata)?;
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
        };
        self.index
            .put_local(&upload_key(&id), &serde_json::to_vec(&u).map_err(internal)?)
            .map_err(internal)?;
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(id),
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
        Ok(S3Response::new(UploadPartOutput { e_tag: Some(etag(&md5)), ..Default::default() }))
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let (owner, _) = self.caller(&req)?;
        let input = req.input;
        // The whole completion holds the namespace lock: the parts it reads are the parts an
        // UploadPart or Abort may not change meanwhile, and a second Complete finds no upload.
        let ns = self.lock_key(&input.bucket, &input.key).await;
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
        };
        let old = self.commit_locked(&input.bucket, &input.key, record.clone()).await?;
        self.index.delete_local_prefix(&format!("p/{}/", input.upload_id)).map_err(internal)?;
        self.index.delete_local_prefix(&upload_key(&input.upload_id)).map_err(internal)?;
        drop(ns);
        self.discard_replaced(&record, old).await;
        // Parts uploaded but not named are not part of the object.
        self.discard(&owner, stored.into_values().map(|p| p.piece).collect()).await;
        Ok(S3Response::new(CompleteMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            e_tag: Some(etag(&etag_value)),
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
        let prefix = input.prefix.clone().unwrap_or_default();
        let max = input.max_uploads.unwrap_or(1000).clamp(0, 1000) as usize;
        let mut uploads = Vec::new();
        for (k, v) in self.index.scan_local("u/").map_err(internal)? {
            let u: Upload = serde_json::from_slice(&v).map_err(internal)?;
            if u.bucket != input.bucket || !u.key.starts_with(&prefix) {
                continue;
            }
            uploads.push(MultipartUpload {
                key: Some(u.key),
                upload_id: k.strip_prefix("u/").map(str::to_string),
                initiated: Some(ts(u.created_ms)),
                ..Default::default()
            });
        }
        uploads.sort_by(|a, b| a.key.cmp(&b.key));
        let truncated = uploads.len() > max;
        uploads.truncate(max);
        Ok(S3Response::new(ListMultipartUploadsOutput {
            bucket: Some(input.bucket),
            prefix: input.prefix,
            max_uploads: Some(max as i32),
            is_truncated: Some(truncated),
            uploads: Some(uploads),
            ..Default::default()
        }))
    }
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

/// Serves S3 on `listen` until SIGTERM/SIGINT, then lets requests in flight finish for up
/// to `grace`. Clients may sign for any region: SigV4 is checked against the region each
/// request's credential scope names.
pub async fn serve(gateway: Gateway, listen: SocketAddr, grace: Duration) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let secrets = gateway.users.iter().map(|(k, u)| (k.clone(), u.secret.clone())).collect();
    let mut builder = s3s::service::S3ServiceBuilder::new(gateway);
    builder.set_auth(Auth(secrets));
    let service = builder.build();
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
