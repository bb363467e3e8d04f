"""Drives a shardfarm S3 gateway with boto3, as a real S3 client does.

Usage: python s3_client.py ENDPOINT PHASE STATE_DIR
  ENDPOINT   http://127.0.0.1:PORT
  PHASE      populate | verify | abuse
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
    # A Complete repeated after it succeeded finds no upload, and the object stays whole.
    up = alice.create_multipart_upload(Bucket=BUCKET, Key="sizes/twice")
    r = alice.upload_part(Bucket=BUCKET, Key="sizes/twice", UploadId=up["UploadId"], PartNumber=1,
                          Body=b"only part")
    parts = {"Parts": [{"PartNumber": 1, "ETag": r["ETag"]}]}
    alice.complete_multipart_upload(Bucket=BUCKET, Key="sizes/twice", UploadId=up["UploadId"],
                                    MultipartUpload=parts)
    expect_error({"NoSuchUpload"}, alice.complete_multipart_upload, Bucket=BUCKET,
                 Key="sizes/twice", UploadId=up["UploadId"], MultipartUpload=parts)
    assert alice.get_object(Bucket=BUCKET, Key="sizes/twice")["Body"].read() == b"only part"
    alice.delete_object(Bucket=BUCKET, Key="sizes/twice")
    expect_error({"InvalidArgument", "InvalidBucketName"}, alice.list_objects_v2, Bucket=BUCKET,
                 ContinuationToken="zz-not-a-token")
    after = alice.list_objects_v2(Bucket=BUCKET, Prefix="sizes/")["KeyCount"]
    assert before == after, (before, after)
    ok("unsigned PUT, bad upload id, oversized metadata, small parts, bad order, bad token: "
       "S3 errors, nothing changed")


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


{"populate": populate, "verify": verify, "abuse": abuse, "stalled": stalled}[PHASE]()
