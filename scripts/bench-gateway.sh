#!/usr/bin/env bash
# S3 gateway benchmark: put and get of one 1 GiB file on a 6-node RS(4,2) local farm, through
# the gateway with the AWS CLI and rclone, beside the native client (`shardfarm put/get`) in the
# same run on the same farm. Prints figures only (a benchmark, not a test).
# Usage: bash scripts/bench-gateway.sh        (SIZE_MIB=1024 by default)
#        bash scripts/bench-gateway.sh rebuild
#   rebuild: the namespace log's rebuild at the issue's scale (issue 31): 10 000 changes, a
#   snapshot every 1 000, a gateway rebuilt on an empty disk; prints the snapshot loaded and the
#   entries replayed after it (the test suite runs the same test at 2 000 / 200). CHANGES and
#   EVERY override the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib-bench.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/shardfarm-target}"
if [ "${1:-}" = rebuild ]; then
  SHARDFARM_REBUILD_CHANGES="${CHANGES:-10000}" SHARDFARM_REBUILD_SNAPSHOT_EVERY="${EVERY:-1000}" \
    cargo nextest run --workspace --locked --no-capture \
    -E 'package(shardfarm-gateway) and test(a_rebuild_loads_the_newest_snapshot)' 2>&1 |
    grep -E "rebuilt after|PASS|FAIL|panicked"
  exit "${PIPESTATUS[0]}"
fi
cargo build --workspace --locked >/dev/null
SF="$CARGO_TARGET_DIR/debug/shardfarm"
mapfile -t TOOLS < <(bash scripts/s3-tools.sh 2>/dev/null)
PY="${TOOLS[0]}"; RCLONE="${TOOLS[1]}"; AWS="$(dirname "$PY")/aws"
SIZE_MIB="${SIZE_MIB:-1024}"
BASE="${BASE_PORT:-18400}"; S3PORT=$((BASE - 10))
WORK="${WORK:-$(mktemp -d -p "$PWD" bench.XXXX)}"
trap 'kill -TERM $GW $UP 2>/dev/null; wait $GW $UP 2>/dev/null; rm -rf "$WORK"' EXIT
unset AWS_CA_BUNDLE   # plain HTTP on loopback

"$SF" local up --data "$WORK/farm" --no-restart --base-port "$BASE" >"$WORK/up.log" 2>&1 &
UP=$!
for _ in $(seq 1 600); do grep -q "stop with Ctrl-C" "$WORK/up.log" && break; sleep 0.2; done
start_gateway "$SF" "$WORK" "$S3PORT"

head -c $((SIZE_MIB << 20)) /dev/urandom > "$WORK/in"
cat "$WORK/in" > /dev/null
rate() { python3 -c "print(f'{$SIZE_MIB*2**20/$1/1e6:.0f} MB/s')"; }
timed() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>"$WORK/err" || { cat "$WORK/err"; exit 1; }; t1=$(date +%s.%N); python3 -c "print(f'{$t1-$t0:.2f}')"; }

echo "== ${SIZE_MIB} MiB, RS(4,2), 6 agents on 127.0.0.1, 2 cores shared by everything"
s=$(timed "$SF" --farm "$WORK/farm" put "$WORK/in"); echo "native put:        $s s  $(rate "$s")"
CAP=$("$SF" --farm "$WORK/farm" put "$WORK/in" 2>/dev/null)
s=$(timed "$SF" --farm "$WORK/farm" get "$CAP" -o "$WORK/out"); echo "native get:        $s s  $(rate "$s")"
cmp "$WORK/in" "$WORK/out"; rm -f "$WORK/out"

export AWS_ACCESS_KEY_ID=BENCH AWS_SECRET_ACCESS_KEY=bench-secret-key AWS_DEFAULT_REGION=us-east-1
A=("$AWS" --endpoint-url "http://127.0.0.1:$S3PORT")
"${A[@]}" s3 mb s3://bench >/dev/null
s=$(timed "${A[@]}" s3 cp "$WORK/in" s3://bench/aws); echo "aws s3 cp (put):   $s s  $(rate "$s")"
s=$(timed "${A[@]}" s3 cp s3://bench/aws "$WORK/out"); echo "aws s3 cp (get):   $s s  $(rate "$s")"
cmp "$WORK/in" "$WORK/out"; rm -f "$WORK/out"

cat > "$WORK/rclone.conf" <<CONF
[sf]
type = s3
provider = Other
access_key_id = BENCH
secret_access_key = bench-secret-key
endpoint = http://127.0.0.1:$S3PORT
region = us-east-1
force_path_style = true
CONF
R=("$RCLONE" --config "$WORK/rclone.conf")
mkdir -p "$WORK/up" && mv "$WORK/in" "$WORK/up/in"
s=$(timed "${R[@]}" copy "$WORK/up" sf:bench/rclone); echo "rclone copy (put): $s s  $(rate "$s")"
s=$(timed "${R[@]}" copy sf:bench/rclone "$WORK/down"); echo "rclone copy (get): $s s  $(rate "$s")"
cmp "$WORK/up/in" "$WORK/down/in" && echo "(every copy read back identical)"
