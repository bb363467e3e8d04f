#!/usr/bin/env bash
# The main job: start a local 7-node RS(4,2) farm, store a file, read it back, lose a node for
# good and watch the survivors rebuild its shards, lose two more, read the file again, stop.
# Installs what the build needs on a fresh machine (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
FARM="${FARM:-$(mktemp -d)/farm}"
echo "==> set-up: what the build needs (first run on a fresh machine: apt-get, ~1 min)"
bash scripts/install-deps.sh
bash scripts/install-deps.sh --check
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/shardfarm-target}"
echo "==> build (a cold build compiles RocksDB's C++: ~15-20 min on 2 cores; later runs reuse $CARGO_TARGET_DIR)"
cargo build --workspace --all-targets --locked
echo "==> starting a 7-node RS(4,2) farm in $FARM"
SF="$CARGO_TARGET_DIR/debug/shardfarm"

"$SF" local up --data "$FARM" --nodes 7 --grace 5 --no-restart &
UP=$!
trap 'kill -TERM $UP 2>/dev/null; wait $UP 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do [ -f "$FARM/farm.json" ] && break; sleep 0.2; done

head -c $((20 * 1024 * 1024 + 7)) /dev/urandom > "$FARM/../input.bin"
CAP=$("$SF" --farm "$FARM" put "$FARM/../input.bin")
echo "stored; read capability: $CAP"
"$SF" --farm "$FARM" stat "$CAP"
"$SF" --farm "$FARM" get "$CAP" -o "$FARM/../output.bin"
cmp "$FARM/../input.bin" "$FARM/../output.bin" && echo "read back identical"

pid() { python3 -c "import json;print(json.load(open('$FARM/node-$1/endpoints.json'))['$2'])"; }
LOST=$(pid 6 node_id)
echo "node 6 dies for good (kill -9); after 5 s of silence the coordinator re-places its slots…"
kill -9 "$(pid 6 pid)"
for i in $(seq 1 120); do
  if "$SF" --farm "$FARM" --json stat "$CAP" | python3 -c "
import json, sys
v = json.load(sys.stdin)
ok = all(s['present'] == s['total'] and '$LOST' not in s['holders'] for s in v['segments'])
sys.exit(0 if ok else 1)"; then
    echo "…and the survivors rebuilt every shard it held ($((i / 2)) s):"; break
  fi
  sleep 0.5
done
"$SF" --farm "$FARM" stat "$CAP"

echo "two more nodes die (kill -9): any m = 2 lost nodes lose nothing"
for n in 0 1; do kill -9 "$(pid $n pid)"; done
"$SF" --farm "$FARM" nodes
"$SF" --farm "$FARM" get "$CAP" -o "$FARM/../output2.bin"
cmp "$FARM/../input.bin" "$FARM/../output2.bin" && echo "read back identical with three nodes gone"
