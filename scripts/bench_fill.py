"""Fills one bucket through an S3 endpoint: objects FROM..TO-1 of SIZE bytes, put by THREADS
boto3 clients of one user, each put tried once (a refusal is an error, never retried away).
Prints one JSON line: objects put, errors (with the first few messages), ops/s, p50/p99.

Usage: python bench_fill.py ENDPOINT ACCESS SECRET BUCKET SIZE FROM TO THREADS
"""

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
from botocore.config import Config

endpoint, access, secret, bucket = sys.argv[1:5]
size, first, end, threads = (int(a) for a in sys.argv[5:9])

cfg = Config(s3={"addressing_style": "path"}, max_pool_connections=threads * 2,
             retries={"max_attempts": 1}, request_checksum_calculation="when_required",
             response_checksum_validation="when_required")
session = boto3.session.Session()
clients = [session.client("s3", endpoint_url=endpoint, aws_access_key_id=access,
                          aws_secret_access_key=secret, region_name="us-east-1", config=cfg)
           for _ in range(threads)]
if first == 0:
    try:
        clients[0].create_bucket(Bucket=bucket)
    except clients[0].exceptions.BucketAlreadyOwnedByYou:
        pass
body = os.urandom(size)


def one(i):
    t = time.perf_counter()
    try:
        clients[i % threads].put_object(Bucket=bucket, Key=f"fill/{i:08d}", Body=body)
        return time.perf_counter() - t, None
    except Exception as e:  # every failure is counted, whatever raised it
        return time.perf_counter() - t, f"{type(e).__name__}: {e}"[:300]


start = time.perf_counter()
with ThreadPoolExecutor(threads) as pool:
    results = list(pool.map(one, range(first, end)))
secs = time.perf_counter() - start
lat = sorted(r[0] for r in results)
errors = [r[1] for r in results if r[1]]
print(json.dumps({
    "objects": end - first, "size": size, "threads": threads, "errors": len(errors),
    "first_errors": errors[:3], "ops_per_s": round((end - first) / secs, 1),
    "p50_ms": round(lat[len(lat) // 2] * 1e3, 1),
    "p99_ms": round(lat[max(0, int(len(lat) * 0.99) - 1)] * 1e3, 1),
}), flush=True)
