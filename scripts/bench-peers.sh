#!/usr/bin/env bash
# Shardfarm beside Garage, the peer a small-farm owner would pick instead, in one run on this
# machine. A benchmark, not a test: prints a table of figures and ratios.
#
#   Garage v2.5.0 (crates.io, built into ~/.cache/shardfarm-peers when missing, ~25 min):
#     3 nodes on 127.0.0.1, replication factor 3, lmdb, each with its own data dir; with its
#     defaults (no fsync before acknowledging) and, for puts, a second cluster with
#     data_fsync/metadata_fsync on (durable on acknowledgement, as Shardfarm is).
#   Shardfarm: a 6-agent RS(4,2) local farm and its S3 gateway, on their own data dirs.
#   Workloads, the same client and concurrency against both S3 endpoints:
#     - 1 GiB put and get with rclone (16 MiB parts, 8 at once); our native client as well;
#     - small objects (4 KiB, 64 KiB, 1 MiB): put then get, 8 concurrent boto3 clients,
#       ops/s and p50/p99 latency (scripts/bench_small.py);
#     - references: loopback TCP, raw write + fsync of what each system stores for 1 GiB
#       (3 GiB for Garage, 1.5 GiB for RS(4,2)).
# Usage: bash scripts/bench-peers.sh   (SMALL_COUNT=10000 objects per size, SMALL_1M_COUNT=1000
#        for 1 MiB: 10 000 × 1 MiB × 3 replicas would not fit most disks)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/shardfarm-target}"
PEERS="${SHARDFARM_PEERS:-$HOME/.cache/shardfarm-peers}"
GARAGE="$PEERS/bin/garage"
if ! "$GARAGE" --version >/dev/null 2>&1; then
  echo "==> installing Garage 2.5.0 from crates.io into $PEERS (~25 min on 2 cores)" >&2
  CARGO_TARGET_DIR="$PEERS/target" cargo install garage --version 2.5.0 --locked --root "$PEERS" >&2
fi
cargo build --workspace --all-targets --locked >/dev/null 2>&1
SF="$CARGO_TARGET_DIR/debug/shardfarm"
mapfile -t TOOLS < <(bash scripts/s3-tools.sh 2>/dev/null)
PY="${TOOLS[0]}"; RCLONE="${TOOLS[1]}"
SMALL_COUNT="${SMALL_COUNT:-10000}"; SMALL_1M_COUNT="${SMALL_1M_COUNT:-1000}"
WORK="${WORK:-$(mktemp -d -p "$PWD" bench-peers.XXXX)}"
PIDS=()
trap 'kill -TERM "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"' EXIT
unset AWS_CA_BUNDLE   # plain HTTP on loopback for both

# ---- Garage: 3 nodes, RF 3, twice ----
# Garage's defaults (data_fsync = false, metadata_fsync = false) acknowledge a write before it
# is on disk; a Shardfarm agent fsyncs every shard before it answers. So the puts also run
# against a second Garage cluster with both set to true: the configuration that promises what
# ours does (nothing acknowledged is lost on power failure).
SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
start_garage() {  # NAME PORT_BASE FSYNC(true|false); sets GK_<NAME>, GS_<NAME>
  local name=$1 port=$2 fsync=$3 i id keys
  for i in 0 1 2; do
    mkdir -p "$WORK/$name$i"
    cat > "$WORK/$name$i.toml" <<TOML
metadata_dir = "$WORK/$name$i/meta"
data_dir = "$WORK/$name$i/data"
db_engine = "lmdb"
replication_factor = 3
data_fsync = $fsync
metadata_fsync = $fsync
rpc_bind_addr = "127.0.0.1:$((port + 1 + 10 * i))"
rpc_public_addr = "127.0.0.1:$((port + 1 + 10 * i))"
rpc_secret = "$SECRET"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$((port + 10 * i))"
root_domain = ".s3.garage.localhost"
TOML
    "$GARAGE" -c "$WORK/$name$i.toml" server >"$WORK/$name$i.log" 2>&1 &
    PIDS+=($!)
  done
  g() { "$GARAGE" -c "$WORK/${name}0.toml" "$@"; }
  for _ in $(seq 1 100); do g status >/dev/null 2>&1 && break; sleep 0.2; done
  for i in 1 2; do
    id=$("$GARAGE" -c "$WORK/$name$i.toml" node id -q 2>/dev/null)
    g node connect "$id" >/dev/null
  done
  for i in 0 1 2; do
    id=$("$GARAGE" -c "$WORK/$name$i.toml" node id -q 2>/dev/null | cut -d@ -f1)
    g layout assign -z "dc$i" -c 20G "$id" >/dev/null
  done
  g layout apply --version 1 >/dev/null
  keys=$(g key create bench)
  printf -v "GK_$name" '%s' "$(echo "$keys" | awk '/Key ID/ {print $NF}')"
  printf -v "GS_$name" '%s' "$(echo "$keys" | awk '/Secret key/ {print $NF}')"
  g bucket create bench >/dev/null
  g bucket allow --read --write --owner bench --key bench >/dev/null
  unset -f g
}
start_garage garage 3900 false
start_garage gsync 3950 true
GK=$GK_garage; GS=$GS_garage
GARAGE_EP="http://127.0.0.1:3900"; GSYNC_EP="http://127.0.0.1:3950"

# ---- Shardfarm: 6 agents RS(4,2), and the gateway ----
BASE=18600; S3PORT=18590
"$SF" local up --data "$WORK/farm" --no-restart --base-port "$BASE" >"$WORK/up.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 600); do grep -q "stop with Ctrl-C" "$WORK/up.log" && break; sleep 0.2; done
for who in root user; do
  "$SF" identity delegate --days 1 --root "$WORK/farm/farm-root.key" --out "$WORK/$who.key" 2>/dev/null
done
printf '[[users]]\naccess_key = "BENCH"\nsecret_key = "bench-secret-key"\nidentity_file = "%s"\n' \
  "$WORK/user.key" > "$WORK/users.toml"
"$SF" --farm "$WORK/farm" gateway --listen "127.0.0.1:$S3PORT" --data "$WORK/gw" \
  --users "$WORK/users.toml" --root-key "$WORK/root.key" >"$WORK/gw.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 600); do grep -q "listening" "$WORK/gw.log" && break; sleep 0.2; done
SF_EP="http://127.0.0.1:$S3PORT"
AWS_ACCESS_KEY_ID=BENCH AWS_SECRET_ACCESS_KEY=bench-secret-key "$(dirname "$PY")/aws" \
  --endpoint-url "$SF_EP" --region us-east-1 s3 mb s3://bench >/dev/null

cat > "$WORK/rclone.conf" <<CONF
[garage]
type = s3
provider = Other
access_key_id = $GK
secret_access_key = $GS
endpoint = $GARAGE_EP
region = garage
force_path_style = true
[gsync]
type = s3
provider = Other
access_key_id = $GK_gsync
secret_access_key = $GS_gsync
endpoint = $GSYNC_EP
region = garage
force_path_style = true
[sf]
type = s3
provider = Other
access_key_id = BENCH
secret_access_key = bench-secret-key
endpoint = $SF_EP
region = us-east-1
force_path_style = true
CONF
R=("$RCLONE" --config "$WORK/rclone.conf" --s3-chunk-size 16M --s3-upload-concurrency 8 --s3-upload-cutoff 16M)

secs() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>"$WORK/err" || { cat "$WORK/err" >&2; exit 1; }; t1=$(date +%s.%N); python3 -c "print(f'{$t1-$t0:.2f}')"; }
mbs() { python3 -c "print(f'{1073741824/$1/1e6:.0f}')"; }

echo "== references"
"$CARGO_TARGET_DIR/debug/examples/bench" tcp 4 | sed 's/^/   /'
for gib in 3 1.5; do
  mib=$(python3 -c "print(int($gib*1024))")
  dd if=/dev/zero of="$WORK/raw" bs=1M count="$mib" conv=fsync 2>&1 | tail -1 | sed "s/^/   raw write + fsync of $gib GiB: /"
  rm -f "$WORK/raw"
done

mkdir -p "$WORK/up" "$WORK/down"
head -c 1073741824 /dev/urandom > "$WORK/up/big"
cat "$WORK/up/big" >/dev/null
echo "== 1 GiB (rclone, 16 MiB parts, 8 at once; medians of 3): gets stream to /dev/null (the systems, not this"
echo "   disk); \"to a file\" = rclone copy / shardfarm get -o (which fsyncs before its rename)"
catnull() { "$@" > /dev/null; }
# The median of three runs (this machine is noisy: one run can be off by a third).
med3() { local a b c; a=$(secs "$@"); b=$(secs "$@"); c=$(secs "$@"); printf '%s\n' "$a" "$b" "$c" | sort -n | sed -n 2p; }
gp=$(med3 "${R[@]}" copy --no-check-dest "$WORK/up" garage:bench/big)
gsp=$(med3 "${R[@]}" copy --no-check-dest "$WORK/up" gsync:bench/big)
gg=$(med3 catnull "${R[@]}" cat garage:bench/big/big)
gf=$(secs "${R[@]}" copy garage:bench/big "$WORK/down/g")
cmp "$WORK/up/big" "$WORK/down/g/big"; rm -rf "$WORK/down/g"
sp=$(med3 "${R[@]}" copy --no-check-dest "$WORK/up" sf:bench/big)
sg=$(med3 catnull "${R[@]}" cat sf:bench/big/big)
sf=$(secs "${R[@]}" copy sf:bench/big "$WORK/down/s")
cmp "$WORK/up/big" "$WORK/down/s/big"; rm -rf "$WORK/down/s"
np=$(med3 "$SF" --farm "$WORK/farm" put "$WORK/up/big")
CAP=$("$SF" --farm "$WORK/farm" put "$WORK/up/big" 2>/dev/null)
ng=$(med3 catnull "$SF" --farm "$WORK/farm" get "$CAP")
nf=$(secs "$SF" --farm "$WORK/farm" get "$CAP" -o "$WORK/down/native")
cmp "$WORK/up/big" "$WORK/down/native"; rm -f "$WORK/down/native"
printf '   %-28s %8s %8s %14s\n' "" "put MB/s" "get MB/s" "get to a file"
printf '   %-28s %8s %8s %14s\n' "Garage (S3, rclone)" "$(mbs "$gp")" "$(mbs "$gg")" "$(mbs "$gf")"
printf '   %-28s %8s %8s %14s\n' "Garage, fsync on (rclone)" "$(mbs "$gsp")" "" ""
printf '   %-28s %8s %8s %14s\n' "Shardfarm gateway (rclone)" "$(mbs "$sp")" "$(mbs "$sg")" "$(mbs "$sf")"
printf '   %-28s %8s %8s %14s\n' "Shardfarm native client" "$(mbs "$np")" "$(mbs "$ng")" "$(mbs "$nf")"
python3 -c "print(f'   ratios vs Garage: gateway put {$gp/$sp:.2f}x get {$gg/$sg:.2f}x | native put {$gp/$np:.2f}x get {$gg/$ng:.2f}x')"
python3 -c "print(f'   puts vs Garage with fsync on: gateway {$gsp/$sp:.2f}x | native {$gsp/$np:.2f}x')"
rm -rf "$WORK/up" "$WORK/down"

echo "== small objects (8 concurrent boto3 clients; put, then get)"
for size in 4096 65536 1048576; do
  n=$SMALL_COUNT; [ "$size" = 1048576 ] && n=$SMALL_1M_COUNT
  G=$("$PY" scripts/bench_small.py "$GARAGE_EP" "$GK" "$GS" bench "$size" "$n" 8 garage)
  GF=$("$PY" scripts/bench_small.py "$GSYNC_EP" "$GK_gsync" "$GS_gsync" bench "$size" "$n" 8 garage)
  S=$("$PY" scripts/bench_small.py "$SF_EP" BENCH bench-secret-key bench "$size" "$n" 8)
  python3 - "$G" "$S" "$GF" <<'PYEOF'
import json, sys
g, s, gf = (json.loads(a) for a in sys.argv[1:4])
for phase in ("put", "get"):
    a, b = g[phase], s[phase]
    print(f"   {g['size']:>8} B x {g['count']:<6} {phase}: Garage {a['ops_per_s']:>7} ops/s "
          f"p50 {a['p50_ms']:>6} ms p99 {a['p99_ms']:>7} ms | Shardfarm {b['ops_per_s']:>7} ops/s "
          f"p50 {b['p50_ms']:>6} ms p99 {b['p99_ms']:>7} ms | ops ratio {b['ops_per_s']/a['ops_per_s']:.2f}")
a, b = gf["put"], s["put"]
print(f"   {g['size']:>8} B x {g['count']:<6} put vs Garage with fsync on: {a['ops_per_s']:>7} ops/s "
      f"p50 {a['p50_ms']:>6} ms p99 {a['p99_ms']:>7} ms | ops ratio {b['ops_per_s']/a['ops_per_s']:.2f}")
PYEOF
done
