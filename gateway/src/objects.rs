//! Object operations: PUT, GET, HEAD, DELETE, DeleteObjects, CopyObject, and the conditional
//! requests (If-Match, If-None-Match, If-Modified-Since, If-Unmodified-Since) they take.

use std::io::Write;

use md5::{Digest, Md5};
use s3s::dto::*;
use s3s::{S3Error, S3Request, S3Response, S3Result, s3_error};

use shardfarm_core::cap::ReadCap;

use crate::namespace::{Check, Expect, ObjectRecord, Piece, Refusal, Target};
use crate::server::NotModified;
use crate::service::{
    Gateway, MAX_KEYS, MAX_PUT, Md5Writer, aes256, check_metadata, check_sse, etag, http_headers,
    internal, now_ms, refuse_body, secs, ts, ts_ms, unavailable,
};

/// Whether an ETag condition names this object (`*` names any).
pub(crate) fn etag_matches(cond: &ETagCondition, rec: &ObjectRecord) -> bool {
    match cond {
        ETagCondition::Any => true,
        ETagCondition::ETag(e) => e.value() == rec.etag,
    }
}

/// A read's preconditions that did not hold.
#[derive(Debug, PartialEq)]
pub(crate) enum Unmet {
    /// 304 Not Modified (GET and HEAD; CopyObject answers 412 instead).
    NotModified,
    /// 412 Precondition Failed.
    Failed,
}

/// The conditional headers of a read, with S3's precedence (RFC 7232 §6): If-Match decides
/// and If-Unmodified-Since is then ignored (If-Match true + If-Unmodified-Since false = 200);
/// If-None-Match decides and If-Modified-Since is then ignored (If-None-Match false +
/// If-Modified-Since true = 304). The 412 checks come before the 304 ones.
pub(crate) fn read_preconditions(
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

pub(crate) fn precondition_failed() -> S3Error {
    s3_error!(PreconditionFailed, "At least one of the pre-conditions you specified did not hold")
}

/// A write's If-None-Match / If-Match headers as conditions on the object it replaces.
/// If-None-Match takes only `*` on writes (S3: "Expects the '*' character").
pub(crate) fn write_conditions(
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
pub(crate) fn check_now(check: &Check, current: Option<&ObjectRecord>) -> Result<(), Refusal> {
    check.verdict(current)
}

/// The S3 error of a refused conditional change.
pub(crate) fn refusal(r: Refusal) -> S3Error {
    match r {
        Refusal::PreconditionFailed => precondition_failed(),
        Refusal::NoSuchKey => s3_error!(NoSuchKey),
        Refusal::NotOwner => s3_error!(AccessDenied, "this key holds another user's object"),
    }
}

pub(crate) async fn put_object(
    gw: &Gateway,
    req: S3Request<PutObjectInput>,
) -> S3Result<S3Response<PutObjectOutput>> {
    let (owner, user) = gw.caller(&req)?;
    let mut input = req.input;
    // The cheap refusals come before the body is read: a create-only PUT of an existing
    // key is refused here (and, if another PUT wins the key meanwhile, at the commit).
    let checked = async {
        gw.bucket(&input.bucket)?;
        check_sse(
            input.server_side_encryption.as_ref(),
            input.ssekms_key_id.as_deref(),
            input.sse_customer_algorithm.as_deref(),
        )?;
        let metadata = check_metadata(&input.metadata)?;
        let conds = write_conditions(input.if_none_match.as_ref(), input.if_match.as_ref())?;
        let current = gw.index.object(&input.bucket, &input.key).map_err(internal)?;
        if let Some(o) = &current
            && o.owner != owner
        {
            return Err(s3_error!(AccessDenied, "this key holds another user's object"));
        }
        for c in &conds {
            let check =
                Check { bucket: input.bucket.clone(), key: input.key.clone(), expect: c.clone() };
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
    let at = Target { bucket: input.bucket.clone(), key: input.key.clone(), part: None };
    let (piece, md5, writing) =
        gw.store(&user.client, &owner, at, input.body, input.content_length).await?;
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
    gw.commit_object(&input.bucket, &input.key, record, conds).await?;
    writing.committed();
    Ok(S3Response::new(PutObjectOutput {
        e_tag: Some(etag(&md5)),
        server_side_encryption: aes256(),
        ..Default::default()
    }))
}

pub(crate) async fn get_object(
    gw: &Gateway,
    req: S3Request<GetObjectInput>,
) -> S3Result<S3Response<GetObjectOutput>> {
    let (_, user) = gw.caller(&req)?;
    let input = req.input;
    let rec = gw.object(&input.bucket, &input.key)?;
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
            let cr = format!("bytes {}-{}/{}", range.start, range.end.saturating_sub(1), rec.size);
            (range, Some(cr))
        }
    };
    let len = range.end - range.start;
    let body = gw.stream(user.client.clone(), &rec, range).await?;
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

pub(crate) async fn head_object(
    gw: &Gateway,
    req: S3Request<HeadObjectInput>,
) -> S3Result<S3Response<HeadObjectOutput>> {
    gw.caller(&req)?;
    let input = req.input;
    let rec = gw.object(&input.bucket, &input.key)?;
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

pub(crate) async fn delete_object(
    gw: &Gateway,
    req: S3Request<DeleteObjectInput>,
) -> S3Result<S3Response<DeleteObjectOutput>> {
    let (owner, _) = gw.caller(&req)?;
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
    gw.delete(&owner, &input.bucket, &input.key, expect, matches).await?;
    Ok(S3Response::new(DeleteObjectOutput::default()))
}

pub(crate) async fn delete_objects(
    gw: &Gateway,
    req: S3Request<DeleteObjectsInput>,
) -> S3Result<S3Response<DeleteObjectsOutput>> {
    let (owner, _) = gw.caller(&req)?;
    let input = req.input;
    gw.bucket(&input.bucket)?;
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
        match gw.delete(&owner, &input.bucket, &o.key, expect, matches).await {
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

pub(crate) async fn copy_object(
    gw: &Gateway,
    req: S3Request<CopyObjectInput>,
) -> S3Result<S3Response<CopyObjectOutput>> {
    let (owner, user) = gw.caller(&req)?;
    let input = req.input;
    let CopySource::Bucket { bucket: src_bucket, key: src_key, .. } = &input.copy_source else {
        return Err(s3_error!(NotImplemented, "copying from an access point"));
    };
    let src = gw.object(src_bucket, src_key)?;
    gw.bucket(&input.bucket)?;
    check_sse(
        input.server_side_encryption.as_ref(),
        input.ssekms_key_id.as_deref(),
        input.sse_customer_algorithm.as_deref(),
    )?;
    if input.copy_source_sse_customer_algorithm.is_some() {
        return Err(s3_error!(NotImplemented, "SSE-C (customer-provided keys) is not implemented"));
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
    let replace =
        input.metadata_directive.as_ref().is_some_and(|d| d.as_str() == MetadataDirective::REPLACE);
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
    let spool = tempfile::tempfile_in(&gw.spool).map_err(internal)?;
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
    let at = Target { bucket: input.bucket.clone(), key: input.key.clone(), part: None };
    let writing = gw.begin_write(&user.client, &owner, at)?;
    let len = file.metadata().map_err(internal)?.len();
    let reader = std::io::BufReader::with_capacity(1 << 20, file);
    let cap =
        user.client.put_reader_with_key(writing.key, reader, len).await.map_err(unavailable)?;
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
    gw.commit_object(&input.bucket, &input.key, record, Vec::new()).await?;
    writing.committed();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::namespace::HttpHeaders;
    use std::collections::BTreeMap;

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
}
