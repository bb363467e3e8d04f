//! Bucket operations: create, delete, head, list, location, default encryption, and S3's
//! bucket naming rules.

use s3s::dto::*;
use s3s::{S3Request, S3Response, S3Result, s3_error};

use crate::namespace::{BucketRecord, Op};
use crate::service::{Gateway, check_sse, internal, now_ms, ts, unavailable};

pub(crate) async fn list_buckets(
    gw: &Gateway,
    req: S3Request<ListBucketsInput>,
) -> S3Result<S3Response<ListBucketsOutput>> {
    gw.caller(&req)?;
    let buckets = gw
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

pub(crate) async fn create_bucket(
    gw: &Gateway,
    req: S3Request<CreateBucketInput>,
) -> S3Result<S3Response<CreateBucketOutput>> {
    let (owner, _) = gw.caller(&req)?;
    let bucket = req.input.bucket;
    if !bucket_name_allowed(&bucket) {
        return Err(s3_error!(InvalidBucketName, "the bucket name is not valid in S3"));
    }
    let _ns = gw.buckets.write().await;
    if let Some(b) = gw.index.bucket(&bucket).map_err(internal)? {
        return Err(if b.owner == owner {
            s3_error!(BucketAlreadyOwnedByYou)
        } else {
            s3_error!(BucketAlreadyExists)
        });
    }
    let record = BucketRecord { owner, created_ms: now_ms() };
    gw.log
        .commit(vec![Op::CreateBucket { bucket: bucket.clone(), record }])
        .await
        .map_err(unavailable)?;
    Ok(S3Response::new(CreateBucketOutput { location: Some(format!("/{bucket}")) }))
}

pub(crate) async fn delete_bucket(
    gw: &Gateway,
    req: S3Request<DeleteBucketInput>,
) -> S3Result<S3Response<DeleteBucketOutput>> {
    let (owner, _) = gw.caller(&req)?;
    let bucket = req.input.bucket;
    let _ns = gw.buckets.write().await;
    let b = gw.bucket(&bucket)?;
    if b.owner != owner {
        return Err(s3_error!(AccessDenied, "only the bucket's creator may delete it"));
    }
    if !gw.index.bucket_is_empty(&bucket).map_err(internal)? {
        return Err(s3_error!(BucketNotEmpty));
    }
    gw.log.commit(vec![Op::DeleteBucket { bucket }]).await.map_err(unavailable)?;
    Ok(S3Response::new(DeleteBucketOutput {}))
}

pub(crate) async fn head_bucket(
    gw: &Gateway,
    req: S3Request<HeadBucketInput>,
) -> S3Result<S3Response<HeadBucketOutput>> {
    gw.caller(&req)?;
    gw.bucket(&req.input.bucket)?;
    Ok(S3Response::new(HeadBucketOutput::default()))
}

pub(crate) async fn get_bucket_encryption(
    gw: &Gateway,
    req: S3Request<GetBucketEncryptionInput>,
) -> S3Result<S3Response<GetBucketEncryptionOutput>> {
    gw.caller(&req)?;
    gw.bucket(&req.input.bucket)?;
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

pub(crate) async fn put_bucket_encryption(
    gw: &Gateway,
    req: S3Request<PutBucketEncryptionInput>,
) -> S3Result<S3Response<PutBucketEncryptionOutput>> {
    let (owner, _) = gw.caller(&req)?;
    let input = req.input;
    if gw.bucket(&input.bucket)?.owner != owner {
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

pub(crate) async fn get_bucket_location(
    gw: &Gateway,
    req: S3Request<GetBucketLocationInput>,
) -> S3Result<S3Response<GetBucketLocationOutput>> {
    gw.caller(&req)?;
    gw.bucket(&req.input.bucket)?;
    Ok(S3Response::new(GetBucketLocationOutput::default()))
}

/// S3's bucket naming rules beyond the syntax s3s checks (3-63 of `a-z 0-9 . -`, a letter or
/// digit at both ends, no `..`, not an IP address, no `xn--`): every dot-separated label
/// starts and ends with a letter or digit (no `.-` or `-.`), and the names S3 reserves.
pub(crate) fn bucket_name_allowed(name: &str) -> bool {
    const PREFIXES: [&str; 4] = ["xn--", "sthree-", "sthree-configurator", "amzn-s3-demo-"];
    const SUFFIXES: [&str; 5] = ["-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3"];
    s3s::path::check_bucket_name(name)
        && !name.contains(".-")
        && !name.contains("-.")
        && !PREFIXES.iter().any(|p| name.starts_with(p))
        && !SUFFIXES.iter().any(|s| name.ends_with(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names_s3_refuses_are_refused() {
        for bad in ["foo.-bar", "foo-.bar", "xn--abc", "sthree-x", "abc-s3alias", "a..b", "AB"] {
            assert!(!bucket_name_allowed(bad), "{bad}");
        }
        for good in ["foo.bar", "foo-bar", "a1.b-2.c3", "abc"] {
            assert!(bucket_name_allowed(good), "{good}");
        }
    }
}
