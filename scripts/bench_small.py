"""Small-object load for one S3 endpoint: COUNT objects of SIZE bytes put, then got, by THREADS
concurrent boto3 clients. Prints one JSON line: ops/s and p50/p99 latency for each phase.

Usage: python bench_small.py ENDPOINT ACCESS SECRET BUCKET SIZE COUNT THREADS [REGION]
"""

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
from botocore.config import Config

endpoint, access, secret, bucket = sys.argv[1:5]
size, count, threads = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
region = sys.argv[8] if len(sys.argv) > 8 else "us-east-1"

session = boto3.session.Session()
cfg = Config(s3={"addressing_style": "path"}, max_pool_connections=threads * 2,
             retries={"max_attempts": 1}, request_checksum_calculation="when_required",
             response_checksum_validation="when_required")
clients = [session.client("s3", endpoint_url=endpoint, aws_access_key_id=access,
                          aws_secret_access_key=secret, region_name=region, config=cfg)
           for _ in range(threads)]
body = os.urandom(size)
prefix = f"small-{size}-{int(time.time())}"


def timed(phase):
    lat = []

    def one(i):
        c = clients[i % threads]
        t = time.perf_counter()
        if phase == "put":
            c.put_object(Bucket=bucket, Key=f"{prefix}/{i:06d}", Body=body)
        else:
            got = c.get_object(Bucket=bucket, Key=f"{prefix}/{i:06d}")["Body"].read()
            assert len(got) == size
        return time.perf_counter() - t

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        lat = sorted(pool.map(one, range(count)))
    secs = time.perf_counter() - start
    return {"ops_per_s": round(count / secs, 1), "p50_ms": round(lat[len(lat) // 2] * 1e3, 1),
            "p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1e3, 1)}


out = {"size": size, "count": count, "threads": threads}
out["put"] = timed("put")
out["get"] = timed("get")
print(json.dumps(out), flush=True)
