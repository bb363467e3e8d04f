#!/usr/bin/env bash
# The main job: start a local 6-node RS(4,2) farm, store a file, read it back, kill two nodes,
# read it again, stop the farm. Installs what the build needs on a fresh machine (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/shardfarm-target}"
cargo build --workspace --all-targets --locked
SF="$CARGO_TARGET_DIR/debug/shardfarm"
FARM="${FARM:-$(mktemp -d)/farm}"

"$SF" local up --data "$FARM" --no-restart &
UP=$!
trap 'kill -TERM $UP 2>/dev/null; wait $UP 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do [ -f "$FARM/farm.json" ] && break; sleep 0.2; done

head -c $((20 * 1024 * 1024 + 7)) /dev/urandom > "$FARM/../input.bin"
CAP=$("$SF" --farm "$FARM" put "$FARM/../input.bin")
echo "stored; read capability: $CAP"
"$SF" --farm "$FARM" stat "$CAP"
"$SF" --farm "$FARM" get "$CAP" -o "$FARM/../output.bin"
cmp "$FARM/../input.bin" "$FARM/../output.bin" && echo "read back identical"

echo "killing two nodes (kill -9)…"
for n in 0 3; do kill -9 "$(python3 -c "import json;print(json.load(open('$FARM/node-$n/endpoints.json'))['pid'])")"; done
"$SF" --farm "$FARM" nodes
"$SF" --farm "$FARM" get "$CAP" -o "$FARM/../output2.bin"
cmp "$FARM/../input.bin" "$FARM/../output2.bin" && echo "read back identical with two nodes down"
