"""Drives a shardfarm S3 gateway with boto3, as a real S3 client does.

Usage: python s3_client.py ENDPOINT PHASE STATE_DIR
  ENDPOINT   http://127.0.0.1:PORT
  PHASE      populate | verify | abuse | stalled | listing | conditional | refusals | sigv2 |
             upload_begin | upload_finish
  STATE_DIR  where the expected contents are kept between phases

The access keys come from the environment: ALICE_KEY/ALICE_SECRET, BOB_KEY/BOB_SECRET.
Every check raises on failure (a non-zero exit with the reason), prints one line on success.
"""

import hashlib
import json
import os
import random
import sys

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

ENDPOINT, PHASE, STATE = sys.argv[1], sys.argv[2], sys.argv[3]
BUCKET = "data"
SEGMENT = 1 << 20  # the test farm's segment size (local up --segment-size 1MiB)
MIB = 1 << 20


def client(key, secret):
    return boto3.client(
        "s3",
        endpoint_url=ENDPOINT,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 2, "mode": "standard"},
            read_timeout=300,
        ),
    )


alice = client(os.environ["ALICE_KEY"], os.environ["ALICE_SECRET"])
bob = client(os.environ["BOB_KEY"], os.environ["BOB_SECRET"])


def data(n, seed):
    return random.Random(seed).randbytes(n)


def code(e):
    return e.response["Error"]["Code"]


def expect_error(wanted, f, *args, **kwargs):
    try:
        f(*args, **kwargs)
    except ClientError as e:
        assert code(e) in wanted, f"expected {wanted}, got {code(e)}: {e}"
        return
    raise AssertionError(f"expected {wanted}, but the call succeeded")


def ok(msg):
    print(f"ok: {msg}", flush=True)


def state_path():
    return os.path.join(STATE, "expected.json")


def populate():
    alice.create_bucket(Bucket=BUCKET)
    expect_error({"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}, alice.create_bucket, Bucket=BUCKET)
    names = [b["Name"] for b in alice.list_buckets()["Buckets"]]
    assert BUCKET in names, names
    alice.head_bucket(Bucket=BUCKET)
    expect_error({"404", "NoSuchBucket"}, alice.head_bucket, Bucket="missing")
    ok("bucket created, listed, head")

    expected = {}
    for name, n in [("empty", 0), ("one", 1), ("five", 5 * MIB + 1)]:
        body = data(n, name)
        r = alice.put_object(Bucket=BUCKET, Key=f"sizes/{name}", Body=body,
                             ContentType="application/x-test", Metadata={"origin": name})
        assert r["ETag"].strip('"') == hashlib.md5(body).hexdigest(), r["ETag"]
        got = alice.get_object(Bucket=BUCKET, Key=f"sizes/{name}")
        assert got["Body"].read() == body, name
        assert got["ContentType"] == "application/x-test"
        assert got["Metadata"] == {"origin": name}, got["Metadata"]
        expected[f"sizes/{name}"] = hashlib.sha256(body).hexdigest()
    ok("put/get 0 B, 1 B, 5 MiB + 1 identical, with content type and metadata")

    # 200 MiB in 8 MiB parts through boto3's multipart upload.
    big = data(200 * MIB, "big")
    cfg = TransferConfig(multipart_threshold=8 * MIB, multipart_chunksize=8 * MIB, max_concurrency=4)
    import io
    alice.upload_fileobj(io.BytesIO(big), BUCKET, "big/200mib", Config=cfg)
    head = alice.head_object(Bucket=BUCKET, Key="big/200mib")
    assert head["ContentLength"] == len(big)
    assert head["ETag"].strip('"').endswith("-25"), head["ETag"]
    out = io.BytesIO()
    alice.download_fileobj(BUCKET, "big/200mib", out, Config=cfg)
    assert out.getvalue() == big, "200 MiB multipart object differs"
    expected["big/200mib"] = hashlib.sha256(big).hexdigest()
    ok("200 MiB multipart put/get identical")

    # Ranged reads at segment and part boundaries.
    five = data(5 * MIB + 1, "five")
    for first, last in [(0, 0), (SEGMENT - 1, SEGMENT), (SEGMENT, 2 * SEGMENT - 1),
                        (5 * MIB - 3, 5 * MIB), (3 * SEGMENT + 17, 4 * SEGMENT + 100)]:
        r = alice.get_object(Bucket=BUCKET, Key="sizes/five", Range=f"bytes={first}-{last}")
        assert r["Body"].read() == five[first:last + 1], (first, last)
        assert r["ContentRange"] == f"bytes {first}-{last}/{len(five)}", r["ContentRange"]
    r = alice.get_object(Bucket=BUCKET, Key="sizes/five", Range="bytes=-10")
    assert r["Body"].read() == five[-10:]
    for first, last in [(8 * MIB - 1, 8 * MIB), (100 * MIB - 5, 100 * MIB + 5 * SEGMENT)]:
        r = alice.get_object(Bucket=BUCKET, Key="big/200mib", Range=f"bytes={first}-{last}")
        assert r["Body"].read() == big[first:last + 1], (first, last)
    expect_error({"InvalidRange"}, alice.get_object, Bucket=BUCKET, Key="sizes/five",
                 Range=f"bytes={len(five)}-{len(five) + 10}")
    ok("ranged GETs at segment and part boundaries, suffix range, InvalidRange")

    # 1 500 keys under three prefixes, listed with prefix, delimiter and pagination.
    from concurrent.futures import ThreadPoolExecutor
    keys = [f"many/{d}/k{i:04d}" for d in ("a", "b", "c") for i in range(500)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: alice.put_object(Bucket=BUCKET, Key=k, Body=k.encode()), keys))
    pages = alice.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix="many/", PaginationConfig={"PageSize": 100})
    listed, page_count = [], 0
    for p in pages:
        page_count += 1
        listed += [o["Key"] for o in p.get("Contents", [])]
    assert listed == sorted(keys), (len(listed), listed[:3])
    assert page_count == 15, page_count
    r = alice.list_objects_v2(Bucket=BUCKET, Prefix="many/", Delimiter="/")
    assert [c["Prefix"] for c in r["CommonPrefixes"]] == ["many/a/", "many/b/", "many/c/"], r
    assert r.get("KeyCount") == 3 and not r.get("Contents")
    r = alice.list_objects_v2(Bucket=BUCKET, Delimiter="/", MaxKeys=2)
    assert [c["Prefix"] for c in r["CommonPrefixes"]] == ["big/", "many/"] and r["IsTruncated"], r
    r = alice.list_objects_v2(Bucket=BUCKET, Delimiter="/", MaxKeys=2,
                              ContinuationToken=r["NextContinuationToken"])
    assert [c["Prefix"] for c in r["CommonPrefixes"]] == ["sizes/"] and not r["IsTruncated"], r
    r = alice.list_objects(Bucket=BUCKET, Prefix="many/b/", MaxKeys=7)
    assert [o["Key"] for o in r["Contents"]] == keys[500:507] and r["IsTruncated"]
    # A key ending in the delimiter (a "folder" object) at the end of a page: the next page
    # starts after that key, not after everything under it.
    for k in ("dirs/x/", "dirs/x/a"):
        alice.put_object(Bucket=BUCKET, Key=k, Body=b"")
    r = alice.list_objects_v2(Bucket=BUCKET, Prefix="dirs/x/", Delimiter="/", MaxKeys=1)
    assert [o["Key"] for o in r["Contents"]] == ["dirs/x/"] and r["IsTruncated"], r
    r = alice.list_objects_v2(Bucket=BUCKET, Prefix="dirs/x/", Delimiter="/", MaxKeys=1,
                              ContinuationToken=r["NextContinuationToken"])
    assert [o["Key"] for o in r["Contents"]] == ["dirs/x/a"] and not r["IsTruncated"], r
    alice.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": "dirs/x/"}, {"Key": "dirs/x/a"}]})
    for k in keys[10::97]:
        expected[k] = hashlib.sha256(k.encode()).hexdigest()
    ok("1 500 keys: paginated 15 × 100, prefixes with delimiter, v1 listing")

    # Copy, then delete the source: the copy stays.
    alice.copy_object(Bucket=BUCKET, Key="copies/five", CopySource={"Bucket": BUCKET, "Key": "sizes/five"})
    alice.put_object(Bucket=BUCKET, Key="tmp/gone", Body=b"soon deleted")
    alice.copy_object(Bucket=BUCKET, Key="copies/gone", CopySource={"Bucket": BUCKET, "Key": "tmp/gone"})
    alice.delete_object(Bucket=BUCKET, Key="tmp/gone")
    expect_error({"NoSuchKey"}, alice.get_object, Bucket=BUCKET, Key="tmp/gone")
    assert alice.get_object(Bucket=BUCKET, Key="copies/gone")["Body"].read() == b"soon deleted"
    assert alice.get_object(Bucket=BUCKET, Key="copies/five")["Body"].read() == five
    expected["copies/five"] = hashlib.sha256(five).hexdigest()
    expected["copies/gone"] = hashlib.sha256(b"soon deleted").hexdigest()
    ok("copy; delete of the source leaves the copy")

    # DeleteObjects.
    r = alice.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": k} for k in keys[:10]]})
    assert len(r["Deleted"]) == 10 and not r.get("Errors"), r
    assert alice.list_objects_v2(Bucket=BUCKET, Prefix="many/a/")["KeyCount"] == 490
    expect_error({"BucketNotEmpty"}, alice.delete_bucket, Bucket=BUCKET)
    alice.create_bucket(Bucket="scratch")
    alice.delete_bucket(Bucket="scratch")
    expect_error({"NoSuchBucket"}, alice.list_objects_v2, Bucket="scratch")
    ok("DeleteObjects, BucketNotEmpty, empty bucket deleted")

    # Multipart bookkeeping: list uploads and parts, abort.
    up = alice.create_multipart_upload(Bucket=BUCKET, Key="aborted")
    alice.upload_part(Bucket=BUCKET, Key="aborted", UploadId=up["UploadId"], PartNumber=1, Body=data(MIB, "p1"))
    ups = alice.list_multipart_uploads(Bucket=BUCKET)["Uploads"]
    assert [u["UploadId"] for u in ups] == [up["UploadId"]], ups
    parts = alice.list_parts(Bucket=BUCKET, Key="aborted", UploadId=up["UploadId"])["Parts"]
    assert [(p["PartNumber"], p["Size"]) for p in parts] == [(1, MIB)], parts
    alice.abort_multipart_upload(Bucket=BUCKET, Key="aborted", UploadId=up["UploadId"])
    expect_error({"NoSuchUpload"}, alice.list_parts, Bucket=BUCKET, Key="aborted", UploadId=up["UploadId"])
    expect_error({"404", "NoSuchKey"}, alice.head_object, Bucket=BUCKET, Key="aborted")
    ok("ListMultipartUploads, ListParts, AbortMultipartUpload")

    with open(state_path(), "w") as f:
        json.dump(expected, f)


def abuse():
    # A wrong secret is refused.
    wrong = client(os.environ["ALICE_KEY"], "not-the-secret-key")
    expect_error({"SignatureDoesNotMatch"}, wrong.get_object, Bucket=BUCKET, Key="sizes/one")
    expect_error({"SignatureDoesNotMatch"}, wrong.put_object, Bucket=BUCKET, Key="sizes/one", Body=b"x")
    unknown = client("NOBODY", "whatever-secret")
    expect_error({"InvalidAccessKeyId"}, unknown.list_buckets)
    ok("wrong secret: SignatureDoesNotMatch; unknown key: InvalidAccessKeyId")

    # Bob reads Alice's objects but cannot delete or overwrite them, nor delete her bucket.
    assert bob.get_object(Bucket=BUCKET, Key="sizes/one")["Body"].read() == data(1, "one")
    expect_error({"AccessDenied"}, bob.delete_object, Bucket=BUCKET, Key="sizes/one")
    expect_error({"AccessDenied"}, bob.put_object, Bucket=BUCKET, Key="sizes/one", Body=b"mine now")
    r = bob.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": "sizes/five"}]})
    assert [e["Code"] for e in r.get("Errors", [])] == ["AccessDenied"], r
    expect_error({"AccessDenied"}, bob.delete_bucket, Bucket=BUCKET)
    assert alice.get_object(Bucket=BUCKET, Key="sizes/one")["Body"].read() == data(1, "one")
    ok("another user's key cannot delete or overwrite: AccessDenied, object intact")

    # Malformed and oversized requests get S3 errors and change nothing.
    import urllib.request
    before = alice.list_objects_v2(Bucket=BUCKET, Prefix="sizes/")["KeyCount"]
    req = urllib.request.Request(f"{ENDPOINT}/{BUCKET}/sizes/anon", data=b"x", method="PUT")
    try:
        urllib.request.urlopen(req)
        raise AssertionError("an unsigned PUT succeeded")
    except urllib.error.HTTPError as e:
        body = e.read().decode()
        assert e.code == 403 and "AccessDenied" in body, (e.code, body)
    expect_error({"NoSuchUpload"}, alice.upload_part, Bucket=BUCKET, Key="x", UploadId="0" * 32,
                 PartNumber=1, Body=b"x")
    expect_error({"MetadataTooLarge"}, alice.put_object, Bucket=BUCKET, Key="sizes/meta",
                 Body=b"x", Metadata={"big": "v" * 3000})
    up = alice.create_multipart_upload(Bucket=BUCKET, Key="sizes/small-parts")
    ids = []
    for n in (1, 2):
        r = alice.upload_part(Bucket=BUCKET, Key="sizes/small-parts", UploadId=up["UploadId"],
                              PartNumber=n, Body=b"tiny part")
        ids.append({"PartNumber": n, "ETag": r["ETag"]})
    expect_error({"EntityTooSmall"}, alice.complete_multipart_upload, Bucket=BUCKET,
                 Key="sizes/small-parts", UploadId=up["UploadId"], MultipartUpload={"Parts": ids})
    expect_error({"InvalidPartOrder"}, alice.complete_multipart_upload, Bucket=BUCKET,
                 Key="sizes/small-parts", UploadId=up["UploadId"],
                 MultipartUpload={"Parts": list(reversed(ids))})
    alice.abort_multipart_upload(Bucket=BUCKET, Key="sizes/small-parts", UploadId=up["UploadId"])
    # A Complete repeated after it succeeded (an SDK that lost the answer retries) gets the
    # same answer again, as from S3; the object stays whole; another user's retry is refused.
    up = alice.create_multipart_upload(Bucket=BUCKET, Key="sizes/twice")
    r = alice.upload_part(Bucket=BUCKET, Key="sizes/twice", UploadId=up["UploadId"], PartNumber=1,
                          Body=b"only part")
    parts = {"Parts": [{"PartNumber": 1, "ETag": r["ETag"]}]}
    first = alice.complete_multipart_upload(Bucket=BUCKET, Key="sizes/twice",
                                            UploadId=up["UploadId"], MultipartUpload=parts)
    again = alice.complete_multipart_upload(Bucket=BUCKET, Key="sizes/twice",
                                            UploadId=up["UploadId"], MultipartUpload=parts)
    assert (again["ETag"], again["Location"], again["Key"]) == \
        (first["ETag"], first["Location"], first["Key"]), (first, again)
    expect_error({"AccessDenied"}, bob.complete_multipart_upload, Bucket=BUCKET,
                 Key="sizes/twice", UploadId=up["UploadId"], MultipartUpload=parts)
    expect_error({"NoSuchUpload"}, alice.upload_part, Bucket=BUCKET, Key="sizes/twice",
                 UploadId=up["UploadId"], PartNumber=2, Body=b"late")
    assert alice.get_object(Bucket=BUCKET, Key="sizes/twice")["Body"].read() == b"only part"
    alice.delete_object(Bucket=BUCKET, Key="sizes/twice")
    expect_error({"InvalidArgument", "InvalidBucketName"}, alice.list_objects_v2, Bucket=BUCKET,
                 ContinuationToken="zz-not-a-token")
    after = alice.list_objects_v2(Bucket=BUCKET, Prefix="sizes/")["KeyCount"]
    assert before == after, (before, after)
    ok("unsigned PUT, bad upload id, oversized metadata, small parts, bad order, bad token: "
       "S3 errors, nothing changed; a retried Complete answers the same ETag and Location")


def stalled():
    # One agent is stopped (SIGSTOP: it accepts connections and never answers).
    body = data(3 * MIB + 7, "stalled")
    alice.put_object(Bucket=BUCKET, Key="stalled/three", Body=body)
    assert alice.get_object(Bucket=BUCKET, Key="stalled/three")["Body"].read() == body
    with open(state_path()) as f:
        expected = json.load(f)
    expected["stalled/three"] = hashlib.sha256(body).hexdigest()
    with open(state_path(), "w") as f:
        json.dump(expected, f)
    ok("put and get with a stalled agent")


def verify():
    with open(state_path()) as f:
        expected = json.load(f)
    for key, digest in sorted(expected.items()):
        body = alice.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == digest, f"{key} differs"
    listed = sum(p.get("KeyCount", 0) for p in
                 alice.get_paginator("list_objects_v2").paginate(Bucket=BUCKET))
    assert listed == 1490 + 3 + 1 + 2 + 1, listed
    ok(f"all {len(expected)} checked objects read back identical; {listed} keys listed")


def weird_keys(n):
    """`n` keys that a form decoder mangles if they travel raw: `+`, spaces, `%2B`, a raw `%`,
    unicode, `/` and keys ending in the delimiter."""
    shapes = ["plus+{i}/a+b", "space {i}/x y", "pct%2B{i}/%2Bz", "raw%{i}%", "ünï/cödé {i}/ß",
              "dir {i}/", "mix+ %2B/{i}/é+ ", "日本/{i}+語/", "a/b/c+{i}", "tilde~{i}&=?;"]
    return [shapes[i % len(shapes)].format(i=f"{i:04d}") for i in range(n)]


def listing():
    """1 000 awkward keys through boto3 at its defaults (it asks for encoding-type=url and
    decodes what it gets): every listing returns them exactly, and deleting exactly what was
    listed empties the bucket."""
    from concurrent.futures import ThreadPoolExecutor
    from urllib.parse import unquote_plus
    bucket = "encoded-keys"
    alice.create_bucket(Bucket=bucket)
    keys = weird_keys(1000)
    assert len(set(keys)) == 1000
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: alice.put_object(Bucket=bucket, Key=k, Body=k.encode()), keys))
    want = sorted(keys)  # code-point order is UTF-8 byte order, S3's listing order

    def v2(**kw):
        out, pages = [], 0
        for p in alice.get_paginator("list_objects_v2").paginate(Bucket=bucket, **kw):
            pages += 1
            assert p.get("EncodingType") == "url", p.get("EncodingType")
            out += [o["Key"] for o in p.get("Contents", [])]
            out += [c["Prefix"] for c in p.get("CommonPrefixes", [])]
        return out, pages

    listed, pages = v2(PaginationConfig={"PageSize": 100})
    assert listed == want and pages == 10, (pages, [k for k in listed if k not in keys][:5])
    listed_v1 = []
    for p in alice.get_paginator("list_objects").paginate(
            Bucket=bucket, PaginationConfig={"PageSize": 70}):
        listed_v1 += [o["Key"] for o in p.get("Contents", [])]
    assert listed_v1 == want, [k for k in listed_v1 if k not in keys][:5]
    # A delimiter, prefixes and StartAfter with the same characters.
    tops, _ = v2(Delimiter="/", PaginationConfig={"PageSize": 7})
    want_tops = sorted({k[:k.index("/") + 1] if "/" in k else k for k in keys})
    # (Each page lists its keys, then its prefixes: compare as sorted lists, duplicates kept.)
    assert sorted(tops) == want_tops, (len(tops), len(want_tops),
                                       sorted(set(tops) ^ set(want_tops))[:5])
    sub, _ = v2(Prefix="mix+ %2B/", Delimiter="/")
    assert sorted(sub) == sorted({k[:k.index("/", 9) + 1] for k in keys if k.startswith("mix+ %2B/")})
    after, _ = v2(StartAfter=want[500])
    assert after == want[501:], len(after)
    r = alice.list_objects(Bucket=bucket, Prefix="plus+", Delimiter="+", MaxKeys=3)
    assert [c["Prefix"] for c in r["CommonPrefixes"]] == ["plus+0000/a+", "plus+0010/a+", "plus+0020/a+"]
    assert r["Delimiter"] == "+" and r["IsTruncated"], r
    # The AWS CLI at its defaults (it asks for encoding-type=url too, and paginates).
    import subprocess
    aws = os.path.join(os.path.dirname(sys.executable), "aws")
    env = dict(os.environ, AWS_ACCESS_KEY_ID=os.environ["ALICE_KEY"],
               AWS_SECRET_ACCESS_KEY=os.environ["ALICE_SECRET"], AWS_DEFAULT_REGION="us-east-1")
    env.pop("AWS_CA_BUNDLE", None)
    out = subprocess.run([aws, "--endpoint-url", ENDPOINT, "s3api", "list-objects-v2",
                          "--bucket", bucket, "--page-size", "300", "--query", "Contents[].Key",
                          "--output", "json"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == want, "the AWS CLI listed other keys"
    r = alice.list_objects_v2(Bucket=bucket, ContinuationToken="", MaxKeys=2)
    assert [o["Key"] for o in r["Contents"]] == want[:2], r
    ok("1 000 keys with +, spaces, %2B, %, unicode, / and trailing / listed exactly by boto3 "
       "(v2 10 pages, v1 markers, delimiter, prefix, StartAfter; empty token = none) and the AWS CLI")

    # Uploads in progress under awkward keys: ListMultipartUploads with encoding-type=url
    # (botocore does not ask for it there, so this decodes as an SDK that asks would).
    up_keys = ["mp+1/a b", "mp%2B/ü", "mp/x+", "mp/y/"]
    ids = {k: alice.create_multipart_upload(Bucket=bucket, Key=k)["UploadId"] for k in up_keys}
    seen, marker = [], {}
    while True:
        r = alice.list_multipart_uploads(Bucket=bucket, EncodingType="url", MaxUploads=1, **marker)
        assert r["EncodingType"] == "url"
        seen += [(unquote_plus(u["Key"]), u["UploadId"]) for u in r.get("Uploads", [])]
        if not r["IsTruncated"]:
            break
        marker = {"KeyMarker": unquote_plus(r["NextKeyMarker"]),
                  "UploadIdMarker": r["NextUploadIdMarker"]}
    assert seen == sorted((k, ids[k]) for k in up_keys), seen
    r = alice.list_multipart_uploads(Bucket=bucket, Prefix="mp/", Delimiter="/")
    assert [c["Prefix"] for c in r["CommonPrefixes"]] == ["mp/y/"], r
    assert [u["Key"] for u in r["Uploads"]] == ["mp/x+"], r
    for k, i in ids.items():
        parts = alice.list_parts(Bucket=bucket, Key=k, UploadId=i)
        assert parts["Key"] == k, parts["Key"]
        alice.abort_multipart_upload(Bucket=bucket, Key=k, UploadId=i)
    ok("ListMultipartUploads: awkward keys encoded and paginated by (key, upload id) markers")

    # Delete exactly what was listed: nothing is left, and the bucket deletes.
    for i in range(0, len(listed), 500):
        batch = listed[i:i + 500]
        r = alice.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch]})
        assert len(r.get("Deleted", [])) == len(batch) and not r.get("Errors"), r.get("Errors")
    assert alice.list_objects_v2(Bucket=bucket)["KeyCount"] == 0
    alice.delete_bucket(Bucket=bucket)
    ok("deleted exactly the 1 000 listed keys; DeleteBucket succeeded")


def conditional():
    """S3's conditional requests, with its precedence rules."""
    import datetime
    import threading
    bucket = "conditions"
    alice.create_bucket(Bucket=bucket)
    k = "cond/key+1 é"
    e1 = alice.put_object(Bucket=bucket, Key=k, Body=b"one")["ETag"]
    expect_error({"PreconditionFailed"}, alice.put_object, Bucket=bucket, Key=k, Body=b"two",
                 IfNoneMatch="*")
    expect_error({"PreconditionFailed"}, alice.put_object, Bucket=bucket, Key=k, Body=b"two",
                 IfMatch='"0123456789abcdef0123456789abcdef"')
    expect_error({"NoSuchKey"}, alice.put_object, Bucket=bucket, Key="cond/missing", Body=b"x",
                 IfMatch=e1)
    assert alice.get_object(Bucket=bucket, Key=k)["Body"].read() == b"one"
    e2 = alice.put_object(Bucket=bucket, Key=k, Body=b"two", IfMatch=e1)["ETag"]
    alice.put_object(Bucket=bucket, Key="cond/new", Body=b"new", IfNoneMatch="*")
    ok("PUT If-None-Match: * and If-Match: 412 / 404 as S3, matching ones write")

    head = alice.head_object(Bucket=bucket, Key=k)
    lm = head["LastModified"]
    hour = datetime.timedelta(hours=1)
    get = lambda **kw: alice.get_object(Bucket=bucket, Key=k, **kw)
    hd = lambda **kw: alice.head_object(Bucket=bucket, Key=k, **kw)
    expect_error({"PreconditionFailed"}, get, IfMatch=e1)
    expect_error({"412"}, hd, IfMatch=e1)
    expect_error({"304"}, get, IfNoneMatch=e2)
    expect_error({"304"}, hd, IfNoneMatch=e2)
    expect_error({"304"}, get, IfModifiedSince=lm)
    expect_error({"PreconditionFailed"}, get, IfUnmodifiedSince=lm - hour)
    assert get(IfMatch=e2)["Body"].read() == b"two"
    assert get(IfNoneMatch=e1)["Body"].read() == b"two"
    assert get(IfModifiedSince=lm - hour)["Body"].read() == b"two"
    assert get(IfUnmodifiedSince=lm)["Body"].read() == b"two"
    # Precedence: If-Match true + If-Unmodified-Since false = 200; If-None-Match false +
    # If-Modified-Since true = 304.
    assert get(IfMatch=e2, IfUnmodifiedSince=lm - hour)["Body"].read() == b"two"
    expect_error({"304"}, get, IfNoneMatch=e2, IfModifiedSince=lm - hour)
    assert hd(IfMatch=e2, IfUnmodifiedSince=lm - hour)["ETag"] == e2
    ok("GET/HEAD If-Match, If-None-Match, If-(Un)Modified-Since: 304/412 with S3's precedence")

    expect_error({"PreconditionFailed"}, alice.copy_object, Bucket=bucket, Key="cond/copy",
                 CopySource={"Bucket": bucket, "Key": k}, CopySourceIfMatch=e1)
    expect_error({"PreconditionFailed"}, alice.copy_object, Bucket=bucket, Key="cond/copy",
                 CopySource={"Bucket": bucket, "Key": k}, CopySourceIfNoneMatch=e2)
    expect_error({"PreconditionFailed"}, alice.copy_object, Bucket=bucket, Key="cond/copy",
                 CopySource={"Bucket": bucket, "Key": k}, CopySourceIfModifiedSince=lm + hour)
    expect_error({"PreconditionFailed"}, alice.copy_object, Bucket=bucket, Key="cond/copy",
                 CopySource={"Bucket": bucket, "Key": k}, CopySourceIfUnmodifiedSince=lm - hour)
    expect_error({"404", "NoSuchKey"}, alice.head_object, Bucket=bucket, Key="cond/copy")
    alice.copy_object(Bucket=bucket, Key="cond/copy", CopySource={"Bucket": bucket, "Key": k},
                      CopySourceIfMatch=e2, CopySourceIfUnmodifiedSince=lm - hour)
    assert alice.get_object(Bucket=bucket, Key="cond/copy")["Body"].read() == b"two"
    ok("CopyObject x-amz-copy-source-if-*: 412 when unmet, S3's precedence")

    expect_error({"PreconditionFailed"}, alice.delete_object, Bucket=bucket, Key=k, IfMatch=e1)
    r = alice.delete_objects(Bucket=bucket, Delete={"Objects": [
        {"Key": k, "ETag": e1}, {"Key": "cond/copy", "ETag": e2}]})
    assert [(x["Key"], x["Code"]) for x in r.get("Errors", [])] == [(k, "PreconditionFailed")], r
    assert [x["Key"] for x in r.get("Deleted", [])] == ["cond/copy"], r
    assert alice.get_object(Bucket=bucket, Key=k)["Body"].read() == b"two"
    alice.delete_object(Bucket=bucket, Key=k, IfMatch=e2)
    expect_error({"404", "NoSuchKey"}, alice.head_object, Bucket=bucket, Key=k)
    ok("DELETE If-Match and DeleteObjects entries' ETag: 412 when unmet, deleted when met")

    # CompleteMultipartUpload If-None-Match / If-Match: a refused Complete keeps the upload.
    up = alice.create_multipart_upload(Bucket=bucket, Key="cond/new")
    p = alice.upload_part(Bucket=bucket, Key="cond/new", UploadId=up["UploadId"], PartNumber=1,
                          Body=b"part")
    parts = {"Parts": [{"PartNumber": 1, "ETag": p["ETag"]}]}
    complete = lambda **kw: alice.complete_multipart_upload(
        Bucket=bucket, Key="cond/new", UploadId=up["UploadId"], MultipartUpload=parts, **kw)
    expect_error({"PreconditionFailed"}, complete, IfNoneMatch="*")
    expect_error({"PreconditionFailed"}, complete, IfMatch=e1)
    new_etag = alice.head_object(Bucket=bucket, Key="cond/new")["ETag"]
    assert alice.list_parts(Bucket=bucket, Key="cond/new", UploadId=up["UploadId"])["Parts"]
    complete(IfMatch=new_etag)
    assert alice.get_object(Bucket=bucket, Key="cond/new")["Body"].read() == b"part"
    ok("CompleteMultipartUpload If-None-Match / If-Match: 412 keeps the upload, a match completes")

    # The create-only race: two threads PUT one new key with If-None-Match: *, 50 times.
    # Exactly one wins; the other gets 412; the object holds the winner's bytes.
    for n in range(50):
        key = f"race/{n} +"
        barrier = threading.Barrier(2)
        results = [None, None]

        def put(i):
            barrier.wait()
            try:
                alice.put_object(Bucket=bucket, Key=key, Body=f"writer {i}".encode(),
                                 IfNoneMatch="*")
                results[i] = "won"
            except ClientError as e:
                results[i] = code(e)

        threads = [threading.Thread(target=put, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == ["PreconditionFailed", "won"], (n, results)
        winner = results.index("won")
        body = alice.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert body == f"writer {winner}".encode(), (n, body)
    ok("create-only race, 50 rounds of two concurrent If-None-Match: * PUTs: exactly one 200, "
       "one 412, the winner's bytes stored")
    for key in [f"race/{n} +" for n in range(50)] + ["cond/new"]:
        alice.delete_object(Bucket=bucket, Key=key)
    alice.delete_bucket(Bucket=bucket)


def refusals():
    """What S3 refuses, refused; S3's headers, kept; SSE answered honestly."""
    import datetime
    import http.client
    import time
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit
    bucket = "strict"
    alice.create_bucket(Bucket=bucket)
    for name in ("foo.-bar", "foo-.bar", "sthree-x", "x--ol-s3"):
        expect_error({"InvalidBucketName"}, alice.create_bucket, Bucket=name)
    ok("bucket names S3 refuses (foo.-bar, foo-.bar, reserved prefixes/suffixes): InvalidBucketName")

    alice.put_object(Bucket=bucket, Key="self", Body=b"me", Metadata={"v": "1"})
    expect_error({"InvalidRequest"}, alice.copy_object, Bucket=bucket, Key="self",
                 CopySource={"Bucket": bucket, "Key": "self"})
    alice.copy_object(Bucket=bucket, Key="self", CopySource={"Bucket": bucket, "Key": "self"},
                      MetadataDirective="REPLACE", Metadata={"v": "2"})
    assert alice.head_object(Bucket=bucket, Key="self")["Metadata"] == {"v": "2"}
    ok("a copy onto itself changing nothing: InvalidRequest; with REPLACE it copies")

    def fetch(url, method="GET"):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method=method)) as r:
                return r.status, r.read().decode(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(), dict(e.headers)

    # boto3 presigns with SigV2 for a custom endpoint at its defaults; SigV4 when asked.
    v4 = boto3.client("s3", endpoint_url=ENDPOINT, aws_access_key_id=os.environ["ALICE_KEY"],
                      aws_secret_access_key=os.environ["ALICE_SECRET"], region_name="us-east-1",
                      config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"))
    for signer in (alice, v4):
        sign = lambda secs: signer.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": "self"}, ExpiresIn=secs)
        status, body, _ = fetch(sign(3600))
        assert status == 200 and body == "me", (status, body)
        status, body, _ = fetch(sign(609901))
        assert status == 403 and "AccessDenied" in body, (status, body)
        short = sign(1)
        time.sleep(2.5)
        status, body, headers = fetch(short)
        assert status == 403 and "AccessDenied" in body and "Request has expired" in body, \
            (status, body)
    # Every error body carries the request id of its x-amz-request-id header.
    rid = headers.get("x-amz-request-id")
    assert rid and f"<RequestId>{rid}</RequestId>" in body, (rid, body)
    status, body, headers = fetch(f"{ENDPOINT}/{bucket}/missing")
    rid = headers.get("x-amz-request-id")
    assert status == 403 and rid and f"<RequestId>{rid}</RequestId>" in body, (rid, body)
    try:
        alice.get_object(Bucket=bucket, Key="missing")
    except ClientError as e:
        assert len(e.response["ResponseMetadata"].get("RequestId", "")) == 16, e.response
    ok("presigned URLs: 7 days + 1 s refused (403), expired: 403 AccessDenied 'Request has expired'; "
       "error bodies' RequestId = x-amz-request-id")

    # Standard headers are stored and returned; the listing's FetchOwner returns the owner.
    expires = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    alice.put_object(Bucket=bucket, Key="headers", Body=b"h", CacheControl="max-age=60",
                     ContentDisposition='attachment; filename="h.txt"', ContentEncoding="identity",
                     ContentLanguage="fr", Expires=expires, ContentType="text/plain")
    for r in (alice.head_object(Bucket=bucket, Key="headers"),
              alice.get_object(Bucket=bucket, Key="headers")):
        got = (r.get("CacheControl"), r.get("ContentDisposition"), r.get("ContentEncoding"),
               r.get("ContentLanguage"), r.get("Expires"), r.get("ContentType"))
        assert got == ("max-age=60", 'attachment; filename="h.txt"', "identity", "fr", expires,
                       "text/plain"), got
    alice.copy_object(Bucket=bucket, Key="headers-copy",
                      CopySource={"Bucket": bucket, "Key": "headers"})
    assert alice.head_object(Bucket=bucket, Key="headers-copy").get("CacheControl") == "max-age=60"
    r = alice.list_objects_v2(Bucket=bucket, FetchOwner=True)
    assert all(o["Owner"]["ID"] == os.environ["ALICE_KEY"] for o in r["Contents"]), r["Contents"]
    assert "Owner" not in alice.list_objects_v2(Bucket=bucket)["Contents"][0]
    ok("Cache-Control, Content-Disposition, -Encoding, -Language, Expires stored, returned, "
       "copied; FetchOwner=true returns the owner")

    # Non-ASCII user metadata, as S3 answers it (user guide, "Working with object metadata",
    # User-defined object metadata): a value with non-US-ASCII characters comes back as an
    # RFC 2047 encoded-word of its UTF-8 (=?UTF-8?B?...?=), ASCII as is. botocore refuses to
    # send non-ASCII metadata itself (S3 metadata over REST is US-ASCII), so the client sends
    # the value RFC 2047-encoded, here with the Q encoding: it is stored decoded and returned
    # B-encoded, decoding to what was sent.
    import base64
    import email.header
    from botocore.exceptions import ParamValidationError
    text = "ÄMÄZÕÑ S3 ü 中文"
    try:
        alice.put_object(Bucket=bucket, Key="meta", Body=b"m", Metadata={"nonascii": text})
        raise AssertionError("botocore sent non-ASCII metadata")
    except ParamValidationError:
        pass
    q_word = "=?UTF-8?Q?" + "".join(
        chr(b) if chr(b).isalnum() and b < 128 else f"={b:02X}" for b in text.encode()) + "?="
    b_word = "=?UTF-8?B?" + base64.b64encode(text.encode()).decode() + "?="
    alice.put_object(Bucket=bucket, Key="meta", Body=b"m",
                     Metadata={"nonascii": q_word, "ascii": "AMAZONS3"})
    alice.copy_object(Bucket=bucket, Key="meta-copy", CopySource={"Bucket": bucket, "Key": "meta"})
    for r in (alice.head_object(Bucket=bucket, Key="meta"),
              alice.get_object(Bucket=bucket, Key="meta"),
              alice.head_object(Bucket=bucket, Key="meta-copy")):
        got = r["Metadata"]
        assert got == {"nonascii": b_word, "ascii": "AMAZONS3"}, (got, b_word)
        [(raw, charset)] = email.header.decode_header(got["nonascii"])
        assert raw.decode(charset) == text, (raw, charset)
    ok("non-ASCII metadata: refused by botocore as raw text; sent RFC 2047 (Q), returned as S3 "
       "does (=?UTF-8?B?...?=, ASCII as is), decoding to what was sent; copied alike")

    # A PUT with Transfer-Encoding: chunked and no Content-Length (a presigned PUT, as a
    # streaming uploader sends it).
    url = alice.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": "chunked"},
                                       ExpiresIn=600)
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port)
    chunks = [b"first chunk, ", b"second chunk, ", b"x" * 100_000]
    conn.request("PUT", f"{u.path}?{u.query}", body=iter(chunks), encode_chunked=True,
                 headers={"Transfer-Encoding": "chunked"})
    resp = conn.getresponse()
    text = resp.read().decode()
    assert resp.status == 200, (resp.status, text)
    assert alice.get_object(Bucket=bucket, Key="chunked")["Body"].read() == b"".join(chunks)
    ok("PUT with Transfer-Encoding: chunked and no Content-Length stored")

    # SSE: SSE-S3 is what every object gets, and is answered; KMS and SSE-C are refused.
    r = alice.put_object(Bucket=bucket, Key="sse", Body=b"s", ServerSideEncryption="AES256")
    assert r.get("ServerSideEncryption") == "AES256", r
    assert alice.head_object(Bucket=bucket, Key="sse").get("ServerSideEncryption") == "AES256"
    assert alice.get_object(Bucket=bucket, Key="headers").get("ServerSideEncryption") == "AES256"
    expect_error({"NotImplemented"}, alice.put_object, Bucket=bucket, Key="kms", Body=b"k",
                 ServerSideEncryption="aws:kms", SSEKMSKeyId="arn:aws:kms:us-east-1:1:key/x")
    expect_error({"NotImplemented"}, alice.put_object, Bucket=bucket, Key="kms", Body=b"k",
                 ServerSideEncryption="aws:kms")
    expect_error({"NotImplemented"}, alice.create_multipart_upload, Bucket=bucket, Key="kms",
                 ServerSideEncryption="aws:kms")
    ssec = client(os.environ["ALICE_KEY"], os.environ["ALICE_SECRET"])
    try:
        ssec.put_object(Bucket=bucket, Key="ssec", Body=b"c", SSECustomerAlgorithm="AES256",
                        SSECustomerKey="k" * 32)
        raise AssertionError("an SSE-C PUT succeeded")
    except ClientError as e:
        assert code(e) == "NotImplemented", e
    except Exception as e:  # botocore may refuse SSE-C over plain HTTP before sending
        assert "SSE" in str(e) or "HTTPS" in str(e) or "https" in str(e), e
    enc = alice.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]
    assert enc["Rules"][0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256", enc
    alice.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={"Rules": [
        {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]})
    expect_error({"NotImplemented"}, alice.put_bucket_encryption, Bucket=bucket,
                 ServerSideEncryptionConfiguration={"Rules": [{"ApplyServerSideEncryptionByDefault": {
                     "SSEAlgorithm": "aws:kms", "KMSMasterKeyID": "k"}}]})
    expect_error({"404", "NoSuchKey"}, alice.head_object, Bucket=bucket, Key="kms")
    ok("SSE-S3 (AES256) answered on PUT/GET/HEAD and as the bucket default; SSE-KMS and SSE-C: "
       "NotImplemented, nothing stored")

    for k in ("self", "headers", "headers-copy", "meta", "meta-copy", "chunked", "sse"):
        alice.delete_object(Bucket=bucket, Key=k)
    alice.delete_bucket(Bucket=bucket)


def sigv2():
    """SigV2 (botocore's signature_version='s3'). botocore signs a request for a bucket alone
    over the resource /bucket/ (minio-go over /bucket; S3 accepts both): bucket operations with
    and without a body work either way, and a wrong secret is still refused."""
    import base64
    import email.utils
    import hmac
    import urllib.error
    import urllib.request

    def v2client(secret):
        return boto3.client("s3", endpoint_url=ENDPOINT, aws_access_key_id=os.environ["ALICE_KEY"],
                            aws_secret_access_key=secret, region_name="us-east-1",
                            config=Config(signature_version="s3"))
    v2 = v2client(os.environ["ALICE_SECRET"])
    v2.create_bucket(Bucket="sigv2-plain")
    v2.create_bucket(Bucket="sigv2-conf",
                     CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    for b in ("sigv2-plain", "sigv2-conf"):
        v2.head_bucket(Bucket=b)
        v2.get_bucket_location(Bucket=b)
        v2.put_object(Bucket=b, Key="k +1", Body=b"v2 body")
        assert v2.get_object(Bucket=b, Key="k +1")["Body"].read() == b"v2 body"
        assert [o["Key"] for o in v2.list_objects(Bucket=b)["Contents"]] == ["k +1"]
        assert [o["Key"] for o in v2.list_objects_v2(Bucket=b)["Contents"]] == ["k +1"]
    assert {"sigv2-plain", "sigv2-conf"} <= {b["Name"] for b in v2.list_buckets()["Buckets"]}
    r = v2.delete_objects(Bucket="sigv2-conf", Delete={"Objects": [{"Key": "k +1"}]})
    assert [d["Key"] for d in r.get("Deleted", [])] == ["k +1"], r
    ok("SigV2 (botocore): CreateBucket with and without CreateBucketConfiguration, HeadBucket, "
       "GetBucketLocation, ListObjects v1/v2, ListBuckets, DeleteObjects, object PUT/GET")

    # A presigned listing: boto3 at its defaults presigns with SigV2 for a custom endpoint.
    url = alice.generate_presigned_url("list_objects", Params={"Bucket": "sigv2-plain"},
                                       ExpiresIn=600)
    assert "Signature=" in url and "X-Amz-Signature" not in url, url
    from urllib.parse import quote
    key = quote("k +1") if "encoding-type=url" in url else "k +1"
    with urllib.request.urlopen(url) as resp:
        body = resp.read().decode()
        assert resp.status == 200 and f"<Key>{key}</Key>" in body, (resp.status, body)

    bad = v2client("not-the-secret-key")
    expect_error({"SignatureDoesNotMatch"}, bad.create_bucket, Bucket="sigv2-forged")
    expect_error({"SignatureDoesNotMatch"}, bad.list_objects, Bucket="sigv2-plain")
    expect_error({"SignatureDoesNotMatch"}, bad.delete_bucket, Bucket="sigv2-conf")
    expect_error({"404", "NoSuchBucket"}, v2.head_bucket, Bucket="sigv2-forged")
    v2.head_bucket(Bucket="sigv2-conf")

    # Signed by hand over the resource without the slash, as minio-go signs it.
    def raw(method, path, resource):
        date = email.utils.formatdate(usegmt=True)
        sts = f"{method}\n\n\n{date}\n{resource}"
        sig = base64.b64encode(hmac.new(os.environ["ALICE_SECRET"].encode(), sts.encode(),
                                        "sha1").digest()).decode()
        req = urllib.request.Request(ENDPOINT + path, method=method, headers={
            "Date": date, "Authorization": f"AWS {os.environ['ALICE_KEY']}:{sig}"})
        try:
            with urllib.request.urlopen(req) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
    status, body = raw("PUT", "/sigv2-raw", "/sigv2-raw")
    assert status == 200, (status, body)
    for resource in ("/sigv2-raw", "/sigv2-raw/"):
        status, body = raw("GET", "/sigv2-raw", resource)
        assert status == 200 and "<ListBucketResult" in body, (resource, status, body)
    status, body = raw("DELETE", "/sigv2-raw", "/sigv2-plain/")
    assert status == 403 and "SignatureDoesNotMatch" in body, (status, body)
    status, body = raw("DELETE", "/sigv2-raw", "/sigv2-raw")
    assert status == 204, (status, body)
    ok("SigV2 over /bucket and /bucket/ both accepted (presigned too); a wrong secret or "
       "another resource: SignatureDoesNotMatch")

    v2.delete_object(Bucket="sigv2-plain", Key="k +1")
    for b in ("sigv2-plain", "sigv2-conf"):
        v2.delete_bucket(Bucket=b)
    expect_error({"404", "NoSuchBucket"}, alice.head_bucket, Bucket="sigv2-plain")


def upload_path():
    return os.path.join(STATE, "upload.json")


def upload_begin():
    """A multipart upload left in progress, to survive a gateway rebuilt from the pool."""
    alice.create_bucket(Bucket="inflight")
    key = "in progress/ü+%2B "
    up = alice.create_multipart_upload(Bucket="inflight", Key=key, ContentType="text/x-test",
                                       Metadata={"m": "1"})
    parts = [data(5 * MIB, "inflight-1"), data(1234, "inflight-2")]
    etags = [alice.upload_part(Bucket="inflight", Key=key, UploadId=up["UploadId"], PartNumber=n,
                               Body=body)["ETag"] for n, body in enumerate(parts, 1)]
    with open(upload_path(), "w") as f:
        json.dump({"key": key, "id": up["UploadId"], "etags": etags,
                   "sizes": [len(p) for p in parts],
                   "sha": hashlib.sha256(b"".join(parts)).hexdigest()}, f)
    ok("a multipart upload begun: 2 parts stored, not completed")


def upload_finish():
    """The upload begun before the rebuild is listed, with its parts, and completes."""
    with open(upload_path()) as f:
        u = json.load(f)
    listed = alice.list_multipart_uploads(Bucket="inflight").get("Uploads", [])
    assert [(x["Key"], x["UploadId"]) for x in listed] == [(u["key"], u["id"])], listed
    parts = alice.list_parts(Bucket="inflight", Key=u["key"], UploadId=u["id"]).get("Parts", [])
    got = [(p["PartNumber"], p["ETag"], p["Size"]) for p in parts]
    assert got == [(n, e, s) for n, (e, s) in enumerate(zip(u["etags"], u["sizes"]), 1)], got
    alice.complete_multipart_upload(
        Bucket="inflight", Key=u["key"], UploadId=u["id"],
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e}
                                   for n, e in enumerate(u["etags"], 1)]})
    obj = alice.get_object(Bucket="inflight", Key=u["key"])
    assert hashlib.sha256(obj["Body"].read()).hexdigest() == u["sha"], "the object differs"
    assert obj["ContentType"] == "text/x-test" and obj["Metadata"] == {"m": "1"}, obj
    assert alice.list_multipart_uploads(Bucket="inflight").get("Uploads", []) == []
    alice.delete_object(Bucket="inflight", Key=u["key"])
    alice.delete_bucket(Bucket="inflight")
    ok("the upload begun before the rebuild: listed with its 2 parts, completed, read back")


{"populate": populate, "verify": verify, "abuse": abuse, "stalled": stalled,
 "listing": listing, "conditional": conditional, "refusals": refusals, "sigv2": sigv2,
 "upload_begin": upload_begin, "upload_finish": upload_finish}[PHASE]()
