#!/usr/bin/env bash
# Scale benchmark (issues 32, 36): a 6-agent RS(4,2) local farm filled through the S3 gateway
# by one user (THREADS boto3 clients, SIZE-byte objects, each put tried once). At 0 objects and
# after each fill step it prints, with the object count:
#   - idle CPU: CPU-seconds per minute of the agents, the coordinator and the gateway over
#     IDLE_SECONDS with no client traffic (after SETTLE_SECONDS for the passes a fill causes);
#   - the agents' summed peak RSS;
#   - disk: what the agents' data directories take on disk beside their apparent size;
#   - repair: partitions compared by summary (agreed) and listed, over the idle window.
# After the step that reaches REPLACE_AT objects (20 000), the "disk replaced" case: one agent
# is killed with kill -9 and its data directory taken away; `local up` starts a new agent with
# an empty disk in its place. Prints the time until the coordinator reports nothing degraded
# (after reporting something) and the layout in sync, and the audits failed meanwhile.
# Not part of the test command (it takes tens of minutes at the default sizes).
# Usage: bash scripts/bench-scale.sh           STEPS="20000 100000" SIZE=4096 THREADS=16
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib-bench.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/shardfarm-target}"
cargo build --workspace --all-targets --locked >/dev/null   # the test build's features: no rebuild
SF="$CARGO_TARGET_DIR/debug/shardfarm"
mapfile -t TOOLS < <(bash scripts/s3-tools.sh 2>/dev/null)
PY="${TOOLS[0]}"
STEPS="${STEPS:-20000 100000}"
SIZE="${SIZE:-4096}"
THREADS="${THREADS:-16}"
IDLE="${IDLE_SECONDS:-60}"
SETTLE="${SETTLE_SECONDS:-75}"
REPLACE_AT="${REPLACE_AT:-20000}"   # the fill step after which one disk is replaced (0: none)
BASE="${BASE_PORT:-19400}"; S3PORT=$((BASE - 10)); CMETRICS=$((BASE - 1))
WORK="${WORK:-$(mktemp -d -p "$PWD" bench.XXXX)}"
trap 'kill -TERM $GW $UP 2>/dev/null; wait $GW $UP 2>/dev/null; rm -rf "$WORK"' EXIT
unset AWS_CA_BUNDLE

"$SF" local up --data "$WORK/farm" --base-port "$BASE" >"$WORK/up.log" 2>&1 &
UP=$!
for _ in $(seq 1 600); do grep -q "stop with Ctrl-C" "$WORK/up.log" && break; sleep 0.2; done
start_gateway "$SF" "$WORK" "$S3PORT"

agents() { pgrep -f "shardfarm agent --data-dir $WORK/farm" || true; }
coordinator() { pgrep -f "shardfarm coordinator .*$WORK/farm" | head -1 || true; }
ticks() { # summed utime+stime of the given pids, in clock ticks
  local t=0 p; for p in "$@"; do
    [ -r "/proc/$p/stat" ] && t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done; echo "$t"; }
hwm() { local t=0 p; for p in "$@"; do
    [ -r "/proc/$p/status" ] && t=$((t + $(awk '/VmHWM/{print $2}' "/proc/$p/status")))
  done; echo $((t / 1024)); }
metric() { # sum of one agent metric over the agents' /metrics
  local sum=0 port v
  for addr in $(python3 -c 'import json,sys; [print(n["http"]) for n in json.load(open(sys.argv[1]))["nodes"]]' "$WORK/farm/farm.json"); do
    v=$(curl -sf "http://$addr/metrics" | awk -v m="$1" '$1 == m {print $2}' | head -1)
    sum=$(python3 -c "print(int($sum + float('${v:-0}')))")
  done; echo "$sum"; }
tick_hz=$(getconf CLK_TCK)

measure() { # $1: objects in the pool
  sleep "$SETTLE"
  mapfile -t A < <(agents); C=$(coordinator)
  local a0 c0 g0 agreed0 listed0 a1 c1 g1 agreed1 listed1
  a0=$(ticks "${A[@]}"); c0=$(ticks $C); g0=$(ticks $GW)
  agreed0=$(metric 'shardfarm_agent_repair_partitions_compared_total{result="agreed"}')
  listed0=$(metric 'shardfarm_agent_repair_partitions_compared_total{result="listed"}')
  sleep "$IDLE"
  a1=$(ticks "${A[@]}"); c1=$(ticks $C); g1=$(ticks $GW)
  agreed1=$(metric 'shardfarm_agent_repair_partitions_compared_total{result="agreed"}')
  listed1=$(metric 'shardfarm_agent_repair_partitions_compared_total{result="listed"}')
  local used apparent
  used=$(du -sk "$WORK"/farm/node-* 2>/dev/null | awk '{s+=$1} END {print s}')
  apparent=$(du -sk --apparent-size "$WORK"/farm/node-* 2>/dev/null | awk '{s+=$1} END {print s}')
  python3 - "$1" "$IDLE" "$tick_hz" "$((a1 - a0))" "$((c1 - c0))" "$((g1 - g0))" \
    "$(hwm "${A[@]}")" "$used" "$apparent" "$((agreed1 - agreed0))" "$((listed1 - listed0))" "$SIZE" <<'PY'
import sys
objects, idle, hz, a, c, g, rss, used, apparent, agreed, listed, size = map(int, sys.argv[1:])
per_min = lambda t: t / hz * 60 / idle
print(f"objects {objects:>7}: idle CPU-s/min agents {per_min(a):5.2f}  coordinator {per_min(c):4.2f}"
      f"  gateway {per_min(g):4.2f} | agents' peak RSS {rss} MiB | disk {used/1024:.1f} MiB for"
      f" {apparent/1024:.1f} MiB apparent ({used/max(apparent,1):.2f}x; objects x size x 1.5 ="
      f" {objects*size*1.5/2**20:.1f} MiB) | partitions agreed {agreed}, listed {listed}")
PY
}

# ---- The disk replaced: kill -9 one agent and take its disk away; `local up` starts a new
# agent (new identity, empty disk) in its place, and the pool re-places the lost node's slots.
degraded() { curl -sf "http://127.0.0.1:$CMETRICS/metrics" |
  awk '$1 == "shardfarm_coordinator_degraded_shards" {print $2}'; }
insync() { curl -sf "http://127.0.0.1:$CMETRICS/metrics" |
  awk '$1 == "shardfarm_coordinator_layout_in_sync" {print $2}'; }
replace_one() { # $1: objects in the pool
  local victim dir t0 d s seen=0 audits0 audits1 fresh
  victim=$(agents | head -1)
  dir=$(tr '\0' ' ' < "/proc/$victim/cmdline" | sed 's/.*--data-dir \([^ ]*\).*/\1/')
  audits0=$(wc -l < "$WORK/farm/coordinator.log")
  t0=$(date +%s)
  kill -9 "$victim"; mv "$dir" "$dir.replaced"
  echo "replace at $1 objects: killed agent $victim with kill -9 and took its disk ($dir) away"
  while :; do
    sleep 2
    d=$(degraded); s=$(insync)
    [ "${d:-0}" != 0 ] && seen=1
    [ "$seen" = 1 ] && [ "${d:-1}" = 0 ] && [ "${s:-0}" = 1 ] && break
    if [ $(( $(date +%s) - t0 )) -gt 1800 ]; then echo "  not back in sync after 30 minutes"; return 1; fi
  done
  fresh=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["node_id"])' "$dir/endpoints.json")
  audits1=$(tail -n +"$((audits0 + 1))" "$WORK/farm/coordinator.log" | grep "audit failed" | grep -c "$fresh" || true)
  echo "  back to n of n (degraded 0 after being > 0, layout in sync) $(( $(date +%s) - t0 )) s after the kill; failed audits of the new agent: $audits1"
  rm -rf "$dir.replaced"
}

echo "== 6 agents, RS(4,2), 256 partitions; one S3 user, $THREADS boto3 clients, $SIZE-byte objects"
measure 0
have=0
for n in $STEPS; do
  "$PY" scripts/bench_fill.py "http://127.0.0.1:$S3PORT" BENCH bench-secret-key fill \
    "$SIZE" "$have" "$n" "$THREADS" | sed "s/^/fill to $n: /"
  have=$n
  measure "$have"
  if [ "$have" = "$REPLACE_AT" ]; then replace_one "$have"; fi
done

