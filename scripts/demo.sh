#!/usr/bin/env bash
# The main job: start a local 7-node RS(4,2) farm, store a file, read it back, kill for good the
# node holding the most of its shards and wait until the survivors have rebuilt every one of
# them elsewhere (failing loudly if they do not), lose two more nodes, read the file again, stop.
# Installs what the build needs on a fresh machine (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
# A scratch farm unless FARM is given; removed after a successful run, kept (with its logs) after
# a failed one.
if [ -n "${FARM:-}" ]; then SCRATCH=""; else SCRATCH=$(mktemp -d); FARM="$SCRATCH/farm"; fi
# How long the survivors get to rebuild the lost node's shards: it takes seconds (5 s of grace,
# a new layout, one repair pass of a few MiB); far more means repair is broken.
REPAIR_TIMEOUT="${REPAIR_TIMEOUT:-180}"
echo "==> set-up: what the build needs (first run on a fresh machine: apt-get, ~1 min)"
bash scripts/install-deps.sh
bash scripts/install-deps.sh --check
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/shardfarm-target}"
# Only the binary: no test, bench or example (the test command builds those). RocksDB's C++ is
# built with the same features as in the workspace build, so the tests reuse it.
echo "==> build the shardfarm binary (a cold build compiles RocksDB's C++: ~15-20 min on 2 cores; later runs reuse $CARGO_TARGET_DIR)"
start=$(date +%s)
cargo build --locked -p shardfarm --bin shardfarm
echo "==> build took $(( $(date +%s) - start )) s"
SF="$CARGO_TARGET_DIR/debug/shardfarm"
sf() { "$SF" --farm "$FARM" "$@"; }

# 4 MiB segments: the 20 MiB file is 6 segments of 6 shards, spread over the partitions, so
# the node killed below holds several shards (with 64 MiB it would be one segment, of which a
# node holds one shard or none).
echo "==> starting a 7-node RS(4,2) farm in $FARM (4 MiB segments)"
"$SF" local up --data "$FARM" --nodes 7 --grace 5 --no-restart --segment-size 4MiB &
UP=$!
stop() {
  local rc=$?
  kill -TERM "$UP" 2>/dev/null
  wait "$UP" 2>/dev/null || true
  if [ "$rc" = 0 ] && [ -n "$SCRATCH" ]; then rm -rf "$SCRATCH"; fi
}
trap stop EXIT
for _ in $(seq 1 300); do [ -f "$FARM/farm.json" ] && break; sleep 0.2; done

head -c $((20 * 1024 * 1024 + 7)) /dev/urandom > "$FARM/../input.bin"
CAP=$(sf put "$FARM/../input.bin")
echo "stored; read capability: $CAP"
sf get "$CAP" -o "$FARM/../output.bin"
cmp "$FARM/../input.bin" "$FARM/../output.bin" && echo "read back identical"

# ---- `stat --json` readers (python3; the JSON is ObjectStat of client/src/pool.rs) ----
# Every segment has all n shards answering audits, on nodes none of which is $1 (may be empty).
# shellcheck disable=SC2016
HEALTHY='
import json, sys
v = json.load(sys.stdin)
sys.exit(0 if all(s["present"] == s["total"] and sys.argv[1] not in s["holders"]
                  for s in v["segments"]) else 1)'
# Which node to kill: of the nodes whose loss the pool can re-place, the one holding the most
# shards. Placement puts at most m shards of a segment in one zone (with fewer zones than n),
# and `local up` puts node i in zone i % 3: zone-0 has nodes 0, 3 and 6, the other zones two
# each. Losing a node of a two-node zone leaves 5 slots for 6 shards, so nothing can be
# rebuilt; only a zone with more than m nodes can spare one. Prints "INDEX ID SHARDS".
PICK='
import collections, json, sys
farm = sys.argv[1]
v = json.load(sys.stdin)
nodes = json.load(open(f"{farm}/farm.json"))["nodes"]
ids = {}
for n in nodes:
    i = n["index"]
    ids[i] = json.load(open(f"{farm}/node-{i}/endpoints.json"))["node_id"]
in_zone = collections.Counter(n["zone"] for n in nodes)
held = collections.Counter(h for s in v["segments"] for h in s["holders"])
spare = [n["index"] for n in nodes if in_zone[n["zone"]] > v["m"]]
best = max(spare, key=lambda i: (held[ids[i]], -i))
print(best, ids[best], held[ids[best]])'
# Where the shards $1 held (in the stat on fd 3, taken before the kill) are now: prints the
# count, then "node-I: N" per new holder.
MOVED='
import collections, json, os, sys
lost, farm = sys.argv[1], sys.argv[2]
before = json.load(os.fdopen(3))
after = json.load(sys.stdin)
names = {}
for d in os.listdir(farm):
    if d.startswith("node-") and os.path.isdir(f"{farm}/{d}"):
        names[json.load(open(f"{farm}/{d}/endpoints.json"))["node_id"]] = d
moved = collections.Counter()
for b, a in zip(before["segments"], after["segments"]):
    for i, h in enumerate(b["holders"]):
        if h == lost:
            assert a["holders"][i] != lost and i not in a["missing"]
            moved[names.get(a["holders"][i], a["holders"][i][:12])] += 1
print(sum(moved.values()), ", ".join(f"{n}: {c}" for n, c in sorted(moved.items())))'

# The first layouts of a young farm may still move a few slots (a node that joined last gets
# its share and copies it): wait until every shard is where the layout says before choosing.
for _ in $(seq 1 120); do
  sf --json stat "$CAP" 2>/dev/null | python3 -c "$HEALTHY" "" && break
  sleep 0.5
done
sf stat "$CAP"
BEFORE=$(sf --json stat "$CAP")
python3 -c "$HEALTHY" "" <<<"$BEFORE" || { echo "error: the stored file never had all its shards in place" >&2; exit 1; }
read -r VICTIM LOST HELD <<<"$(python3 -c "$PICK" "$FARM" <<<"$BEFORE")"
if [ "$HELD" -eq 0 ]; then
  echo "error: no node that the pool can lose holds a shard of the file: nothing to rebuild" >&2
  exit 1
fi
pid() { python3 -c "import json;print(json.load(open('$FARM/node-$1/endpoints.json'))['pid'])"; }

echo "node $VICTIM (${LOST:0:12}) holds $HELD of the file's shards: it dies for good (kill -9);"
echo "after 5 s of silence the coordinator re-places its slots and the survivors rebuild them…"
kill -9 "$(pid "$VICTIM")"
t0=$(date +%s.%N)
repaired=""
while :; do
  elapsed=$(python3 -c "import time; print(f'{time.time() - $t0:.1f}')")
  if AFTER=$(sf --json stat "$CAP" 2>/dev/null) && python3 -c "$HEALTHY" "$LOST" <<<"$AFTER"; then
    repaired=$elapsed
    break
  fi
  python3 -c "import sys; sys.exit(0 if $elapsed < $REPAIR_TIMEOUT else 1)" || break
  sleep 1
done
if [ -z "$repaired" ]; then
  sf stat "$CAP" || true
  echo "error: after ${REPAIR_TIMEOUT} s the $HELD shards node $VICTIM held are still not rebuilt elsewhere (see $FARM/node-*.log)" >&2
  exit 1
fi
read -r REBUILT WHERE <<<"$(python3 -c "$MOVED" "$LOST" "$FARM" <<<"$AFTER" 3<<<"$BEFORE")"
if [ "${REBUILT:-0}" -ne "$HELD" ] || [ "${REBUILT:-0}" -eq 0 ]; then
  echo "error: node $VICTIM held $HELD shards but $REBUILT were rebuilt elsewhere" >&2
  exit 1
fi
echo "…and the survivors rebuilt all $REBUILT shards node $VICTIM held in $repaired s ($WHERE):"
sf stat "$CAP"

# Two more nodes die: the first two still alive (the layout now spans the six survivors).
ALIVE=()
for n in $(seq 0 6); do [ "$n" = "$VICTIM" ] || ALIVE+=("$n"); done
echo "nodes ${ALIVE[0]} and ${ALIVE[1]} die too (kill -9): any m = 2 lost nodes lose nothing"
for n in "${ALIVE[@]:0:2}"; do kill -9 "$(pid "$n")"; done
sf nodes
sf get "$CAP" -o "$FARM/../output2.bin"
cmp "$FARM/../input.bin" "$FARM/../output2.bin" && echo "read back identical with three nodes gone"
echo "==> demo done: $REBUILT shards rebuilt in $repaired s after node $VICTIM was lost"
