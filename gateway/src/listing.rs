//! Listings: ListObjects v1 and v2 (prefix, delimiter, markers, continuation tokens) and S3's
//! `encoding-type=url`, which the multipart listings use as well.

use s3s::dto::*;
use s3s::{S3Request, S3Response, S3Result, s3_error};

use crate::namespace::ObjectRecord;
use crate::service::{Gateway, MAX_KEYS, etag, internal, ts};

/// S3's `encoding-type=url` for listings: every byte of a key (prefix, delimiter, marker) but
/// the unreserved characters (RFC 3986: `A-Z a-z 0-9 - . _ ~`) and `/` as `%XX` of its UTF-8.
/// SDKs decode with a form decoder (botocore: `unquote_plus`), so `+` must be sent as `%2B`
/// and space as `%20` (a raw `+` would come back as a space).
pub(crate) fn url_encode(s: &str) -> String {
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
pub(crate) fn url_encoding(t: &Option<EncodingType>) -> bool {
    t.as_ref().is_some_and(|t| t.as_str() == EncodingType::URL)
}

/// Applies a listing's encoding to one value.
pub(crate) fn encoded(url: bool, s: String) -> String {
    if url { url_encode(&s) } else { s }
}

/// Where a listing resumes: after a key, or after every key under a common prefix.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Resume {
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

impl Gateway {
    /// One page of a listing: objects and common prefixes after `after`, and where the next
    /// page starts if there is one.
    #[allow(clippy::type_complexity)]
    pub(crate) fn list(
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
    pub(crate) fn to_object(key: String, r: &ObjectRecord, url: bool, owner: bool) -> Object {
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
}

pub(crate) async fn list_objects_v2(
    gw: &Gateway,
    req: S3Request<ListObjectsV2Input>,
) -> S3Result<S3Response<ListObjectsV2Output>> {
    gw.caller(&req)?;
    let input = req.input;
    let url = url_encoding(&input.encoding_type);
    let prefix = input.prefix.clone().unwrap_or_default();
    let max = input.max_keys.unwrap_or(MAX_KEYS as i32).clamp(0, MAX_KEYS as i32) as usize;
    // An empty token is no token (S3 lists from the start, or from StartAfter).
    let token = input.continuation_token.clone().filter(|t| !t.is_empty());
    let after = match &token {
        Some(t) => Some(
            Resume::from_token(t)
                .ok_or_else(|| s3_error!(InvalidArgument, "the continuation token is not valid"))?,
        ),
        None => input.start_after.clone().filter(|s| !s.is_empty()).map(Resume::Key),
    };
    let (objects, prefixes, next) =
        gw.list(&input.bucket, &prefix, input.delimiter.as_deref(), after.as_ref(), max)?;
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
            objects.into_iter().map(|(k, r)| Gateway::to_object(k, &r, url, owner)).collect(),
        ),
        common_prefixes: Some(
            prefixes.into_iter().map(|p| CommonPrefix { prefix: Some(encoded(url, p)) }).collect(),
        ),
        ..Default::default()
    }))
}

pub(crate) async fn list_objects(
    gw: &Gateway,
    req: S3Request<ListObjectsInput>,
) -> S3Result<S3Response<ListObjectsOutput>> {
    gw.caller(&req)?;
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
        gw.list(&input.bucket, &prefix, input.delimiter.as_deref(), marker.as_ref(), max)?;
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
            objects.into_iter().map(|(k, r)| Gateway::to_object(k, &r, url, true)).collect(),
        ),
        common_prefixes: Some(
            prefixes.into_iter().map(|p| CommonPrefix { prefix: Some(encoded(url, p)) }).collect(),
        ),
        ..Default::default()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_encoding_is_what_form_decoders_undo() {
        assert_eq!(url_encode("foo+1/bar baz"), "foo%2B1/bar%20baz");
        assert_eq!(url_encode("%2B~._-"), "%252B~._-");
        assert_eq!(url_encode("é/日"), "%C3%A9/%E6%97%A5");
        assert_eq!(url_encode("a&b=c?d;"), "a%26b%3Dc%3Fd%3B");
    }
}
