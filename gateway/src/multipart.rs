//! Multipart uploads: create, upload a part, complete (and a retried complete), abort, and
//! their listings (parts, uploads in progress).

use std::collections::BTreeMap;

use md5::{Digest, Md5};
use s3s::dto::*;
use s3s::{S3Request, S3Response, S3Result, s3_error};

use crate::listing::{encoded, url_encode, url_encoding};
use crate::namespace::{ObjectRecord, Op, PartRecord, Target, UploadRecord};
use crate::objects::{refusal, write_conditions};
use crate::service::{
    Gateway, aes256, check_metadata, check_sse, etag, http_headers, internal, now_ms, refuse_body,
    ts, unavailable,
};

/// Smallest part but the last, as in S3.
pub(crate) const MIN_PART: u64 = 5 << 20;
/// Most parts of one upload, as in S3.
pub(crate) const MAX_PARTS: i32 = 10_000;

/// The Location of a completed upload: the object's path.
pub(crate) fn location(bucket: &str, key: &str) -> String {
    format!("/{bucket}/{}", url_encode(key))
}

impl Gateway {
    /// The upload `id` in progress, if `owner` began it.
    pub(crate) fn upload(&self, id: &str, owner: &str) -> S3Result<UploadRecord> {
        let u = self.index.upload(id).map_err(internal)?.ok_or_else(|| s3_error!(NoSuchUpload))?;
        if u.owner != owner {
            return Err(s3_error!(AccessDenied, "this upload belongs to another user"));
        }
        Ok(u)
    }

    /// The parts of upload `id`, by number.
    pub(crate) fn parts(&self, id: &str) -> S3Result<Vec<(i32, PartRecord)>> {
        self.index.parts(id).map_err(internal)
    }
}

pub(crate) async fn create_multipart_upload(
    gw: &Gateway,
    req: S3Request<CreateMultipartUploadInput>,
) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
    let (owner, _) = gw.caller(&req)?;
    let input = req.input;
    gw.bucket(&input.bucket)?;
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
    let upload = UploadRecord {
        bucket: input.bucket.clone(),
        key: input.key.clone(),
        owner,
        created_ms: now_ms(),
        content_type: input.content_type,
        metadata,
        headers,
    };
    gw.log.commit(vec![Op::CreateUpload { id: id.clone(), upload }]).await.map_err(unavailable)?;
    Ok(S3Response::new(CreateMultipartUploadOutput {
        bucket: Some(input.bucket),
        key: Some(input.key),
        upload_id: Some(id),
        server_side_encryption: aes256(),
        ..Default::default()
    }))
}

pub(crate) async fn upload_part(
    gw: &Gateway,
    req: S3Request<UploadPartInput>,
) -> S3Result<S3Response<UploadPartOutput>> {
    let (owner, user) = gw.caller(&req)?;
    let mut input = req.input;
    let checked = (|| {
        let u = gw.upload(&input.upload_id, &owner)?;
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
    let at = Target {
        bucket: input.bucket.clone(),
        key: input.key.clone(),
        part: Some((input.upload_id.clone(), input.part_number)),
    };
    let (piece, md5, writing) =
        gw.store(&user.client, &owner, at, input.body, input.content_length).await?;
    let rec = PartRecord { piece, md5: md5.clone(), modified_ms: now_ms() };
    // Under the lock: a Complete or Abort of this upload either saw this part or the
    // upload is gone (then this part is not kept).
    let old = {
        let _ns = gw.lock_key(&input.bucket, &input.key).await;
        if let Err(e) = gw.upload(&input.upload_id, &owner) {
            drop(_ns);
            gw.discard(&owner, vec![rec.piece]).await;
            return Err(e);
        }
        let (id, number) = (input.upload_id.clone(), input.part_number);
        let old = gw.index.part(&id, number).map_err(internal)?;
        // A failed commit may still land (its entry is retried byte for byte): the part is
        // left to the collector, which deletes it only if no entry references it.
        gw.log.commit(vec![Op::PutPart { id, number, part: rec }]).await.map_err(unavailable)?;
        writing.committed();
        old
    };
    if let Some(old) = old {
        gw.discard(&owner, vec![old.piece]).await;
    }
    Ok(S3Response::new(UploadPartOutput {
        e_tag: Some(etag(&md5)),
        server_side_encryption: aes256(),
        ..Default::default()
    }))
}

pub(crate) async fn complete_multipart_upload(
    gw: &Gateway,
    req: S3Request<CompleteMultipartUploadInput>,
) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
    let (owner, _) = gw.caller(&req)?;
    let input = req.input;
    let conds = write_conditions(input.if_none_match.as_ref(), input.if_match.as_ref())?;
    // The whole completion holds the namespace lock: the parts it reads are the parts an
    // UploadPart or Abort may not change meanwhile, and a second Complete finds the first
    // one's result.
    let ns = gw.lock_key(&input.bucket, &input.key).await;
    // A retried Complete (the SDK lost the answer) is answered again, as S3 does.
    if let Some(done) = gw.index.completed_upload(&input.upload_id).map_err(internal)?
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
    let u = gw.upload(&input.upload_id, &owner)?;
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
    let mut stored: BTreeMap<i32, PartRecord> = gw.parts(&input.upload_id)?.into_iter().collect();
    let (mut pieces, mut md5s, mut prev) = (Vec::new(), Vec::new(), 0);
    for (i, w) in wanted.iter().enumerate() {
        let n = w.part_number.ok_or_else(|| s3_error!(InvalidPart, "a part without a number"))?;
        if n <= prev {
            return Err(s3_error!(InvalidPartOrder));
        }
        prev = n;
        let p =
            stored.remove(&n).ok_or_else(|| s3_error!(InvalidPart, "part {n} was not uploaded"))?;
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
    let old = gw
        .commit_locked(&input.bucket, &input.key, record.clone(), conds, id)
        .await?
        .map_err(refusal)?;
    // The upload and its parts are gone with that entry.
    drop(ns);
    gw.discard_replaced(&record, old).await;
    // Parts uploaded but not named are not part of the object.
    gw.discard(&owner, stored.into_values().map(|p| p.piece).collect()).await;
    Ok(S3Response::new(CompleteMultipartUploadOutput {
        location: Some(location(&input.bucket, &input.key)),
        bucket: Some(input.bucket),
        key: Some(input.key),
        e_tag: Some(etag(&etag_value)),
        server_side_encryption: aes256(),
        ..Default::default()
    }))
}

pub(crate) async fn abort_multipart_upload(
    gw: &Gateway,
    req: S3Request<AbortMultipartUploadInput>,
) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
    let (owner, _) = gw.caller(&req)?;
    let input = req.input;
    let parts = {
        let _ns = gw.lock_key(&input.bucket, &input.key).await;
        let u = gw.upload(&input.upload_id, &owner)?;
        if u.bucket != input.bucket || u.key != input.key {
            return Err(s3_error!(NoSuchUpload, "this upload is for another key"));
        }
        let parts = gw.parts(&input.upload_id)?;
        let op = Op::AbortUpload { id: input.upload_id.clone() };
        gw.log.commit(vec![op]).await.map_err(unavailable)?;
        parts
    };
    gw.discard(&owner, parts.into_iter().map(|(_, p)| p.piece).collect()).await;
    Ok(S3Response::new(AbortMultipartUploadOutput::default()))
}

pub(crate) async fn list_parts(
    gw: &Gateway,
    req: S3Request<ListPartsInput>,
) -> S3Result<S3Response<ListPartsOutput>> {
    let (owner, _) = gw.caller(&req)?;
    let input = req.input;
    gw.upload(&input.upload_id, &owner)?;
    let max = input.max_parts.unwrap_or(1000).clamp(0, 1000) as usize;
    let marker = input.part_number_marker.unwrap_or(0);
    let all: Vec<_> =
        gw.parts(&input.upload_id)?.into_iter().filter(|(n, _)| *n > marker).collect();
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

pub(crate) async fn list_multipart_uploads(
    gw: &Gateway,
    req: S3Request<ListMultipartUploadsInput>,
) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
    gw.caller(&req)?;
    let input = req.input;
    gw.bucket(&input.bucket)?;
    let url = url_encoding(&input.encoding_type);
    let prefix = input.prefix.clone().unwrap_or_default();
    let delimiter = input.delimiter.clone().filter(|d| !d.is_empty());
    let max = input.max_uploads.unwrap_or(1000).clamp(0, 1000) as usize;
    let mut all = Vec::new();
    for (id, u) in gw.index.uploads().map_err(internal)? {
        if u.bucket != input.bucket || !u.key.starts_with(&prefix) {
            continue;
        }
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
            prefixes.into_iter().map(|p| CommonPrefix { prefix: Some(encoded(url, p)) }).collect(),
        ),
        ..Default::default()
    }))
}
