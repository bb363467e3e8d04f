#!/usr/bin/env bash
# Abuse load benchmark (issue 14): a 6-node RS(4,2) local farm, honest clients mixing
# put/get/stat/list (cli/benches/abuse_load.rs), in one run: a baseline phase (honest only), a flood
# phase of the same length (an abusive client floods every agent and the coordinator with
# unsigned, unmined, replayed and badly signed requests) and a flood phase twice as long, to
# show whether memory grows with the flood's length. Every agent's and the coordinator's
# (`local up`'s) RSS is sampled each second from /proc/PID/status; the peak per phase is
# reported (VmHWM cannot be reset between phases), with the CPU time each process used.
# Prints figures only; not part of the test command.
#
#   bash scripts/bench-abuse.sh [--seconds N] [--clients N] [--sources N]
#                               [--flood-alone] [--same-address] [--per-kind]
#
# --seconds: length of the baseline and flood phases (default 20; the long flood is 2×).
# --clients: honest clients (default 64). The flood comes from 127.0.0.2, the honest clients
# and the farm's own traffic from 127.0.0.1. --sources: the flood comes from N addresses
# (127.0.0.2 on, one connection each, 128 requests in flight per target as with one), as a
# botnet's would, to limits kept per address (default 1).
# Honest puts grow the agents' memory too (RocksDB), so extra phases separate the flood's cost:
# --flood-alone: the flood for 2 × --seconds with no honest client (memory over the flood only);
# --same-address: a flood from 127.0.0.1, the honest clients' and the agents' own address;
# --per-kind: one flood phase per kind (unsigned, unmined, replay, bad-signature) alone.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/shardfarm-target}"

SECONDS_PER_PHASE=20
SOURCES=1
CLIENTS=64
PER_KIND=0
SAME_ADDRESS=0
FLOOD_ALONE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) SECONDS_PER_PHASE="$2"; shift 2 ;;
    --clients) CLIENTS="$2"; shift 2 ;;
    --sources) SOURCES="$2"; shift 2 ;;
    --per-kind) PER_KIND=1; shift ;;
    --same-address) SAME_ADDRESS=1; shift ;;
    --flood-alone) FLOOD_ALONE=1; shift ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

# One build of everything (the bench binary is not uplifted: take its path from cargo).
ABUSE=$(cargo build --workspace --all-targets --locked --message-format=json-render-diagnostics |
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "abuse_load" and m["target"]["kind"] == ["bench"] and m.get("executable"):
        print(m["executable"])')
[ -x "$ABUSE" ] || { echo "build failed: run cargo build --workspace --all-targets" >&2; exit 1; }
SF="$CARGO_TARGET_DIR/debug/shardfarm"
WORK="${WORK:-$(mktemp -d -p "$PWD" bench.XXXX)}"
UP=""
SAMPLER=""
cleanup() {
  [ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null || true
  if [ -n "$UP" ]; then
    kill -TERM "$UP" 2>/dev/null || true
    wait "$UP" 2>/dev/null || true
    # `local up` stops its agents; any it could not are ours to end, by pid.
    for p in $AGENT_PIDS; do kill -KILL "$p" 2>/dev/null || true; done
  fi
  rm -rf "$WORK"
}
AGENT_PIDS=""
trap cleanup EXIT

BASE_PORT="${BASE_PORT:-17600}"
"$SF" local up --data "$WORK/farm" --no-restart --base-port "$BASE_PORT" >"$WORK/up.log" 2>&1 &
UP=$!
for _ in $(seq 1 600); do grep -q "stop with Ctrl-C" "$WORK/up.log" 2>/dev/null && break; sleep 0.2; done
grep -q "stop with Ctrl-C" "$WORK/up.log" || { cat "$WORK/up.log" >&2; exit 1; }
NAMES="coordinator"
PIDS="$UP"
for ep in "$WORK"/farm/node-*/endpoints.json; do
  n=$(basename "$(dirname "$ep")")
  p=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$ep")
  NAMES="$NAMES $n"
  PIDS="$PIDS $p"
  AGENT_PIDS="$AGENT_PIDS $p"
done
echo "farm up: $(echo "$NAMES" | wc -w) processes (pids$PIDS); $(nproc) cores; ${SECONDS_PER_PHASE} s phases, $CLIENTS clients"

# Samples every farm process once a second: lines "name VmRSS-kB RssAnon-kB". RSS counts the
# shard files an agent has mapped to serve reads (RssFile); RssAnon is what it holds itself.
sample_rss() {
  while :; do
    set -- $NAMES
    for p in $PIDS; do
      echo "$1 $(awk '/^VmRSS:/ {r = $2} /^RssAnon:/ {a = $2} END {print r + 0, a + 0}' \
        "/proc/$p/status" 2>/dev/null || echo 0 0)"
      shift
    done
    sleep 1
  done
}

# CPU ticks (user + system) of every farm process, and of the whole machine (busy = all but
# idle and iowait), to tell what else ran during a phase: lines "name ticks".
cpu_ticks() {
  set -- $NAMES
  for p in $PIDS; do
    echo "$1 $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)"
    shift
  done
  awk '/^cpu / {print "machine", $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat
}

# The flood's shape: 128 requests in flight per target, over 2 connections from one address or
# one connection from each of --sources addresses.
if [ "$SOURCES" -gt 1 ]; then
  FLOOD_SHAPE=(--flood-sources "$SOURCES" --flood-connections "$SOURCES"
    --flood-streams $(((128 + SOURCES - 1) / SOURCES)))
else
  FLOOD_SHAPE=(--flood-connections 2 --flood-streams 64)
fi
PHASES=""
phase() { # name seconds clients [bench flags…]
  local name="$1" secs="$2" clients="$3"
  shift 3
  PHASES="$PHASES $name"
  cpu_ticks >"$WORK/$name.cpu0"
  sample_rss >"$WORK/$name.rss" &
  SAMPLER=$!
  "$ABUSE" --farm "$WORK/farm" --seconds "$secs" --clients "$clients" --label "$name" \
    --summary "$WORK/$name.json" "${FLOOD_SHAPE[@]}" "$@"
  kill "$SAMPLER" 2>/dev/null || true
  wait "$SAMPLER" 2>/dev/null || true
  SAMPLER=""
  cpu_ticks >"$WORK/$name.cpu1"
  echo
}

phase baseline "$SECONDS_PER_PHASE" "$CLIENTS"
phase flood "$SECONDS_PER_PHASE" "$CLIENTS" --flood
phase flood-2x $((2 * SECONDS_PER_PHASE)) "$CLIENTS" --flood
if [ "$FLOOD_ALONE" = 1 ]; then
  phase flood-alone $((2 * SECONDS_PER_PHASE)) 0 --flood
fi
if [ "$SAME_ADDRESS" = 1 ]; then
  phase flood-same-addr "$SECONDS_PER_PHASE" "$CLIENTS" --flood --flood-from 127.0.0.1
fi
if [ "$PER_KIND" = 1 ]; then
  for k in unsigned unmined replay bad-signature; do
    phase "only-$k" "$SECONDS_PER_PHASE" "$CLIENTS" --flood --flood-kinds "$k"
  done
fi

python3 - "$WORK" "$(getconf CLK_TCK)" $PHASES <<'EOF'
import json, sys
work, hz, phases = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
S = {p: json.load(open(f"{work}/{p}.json")) for p in phases}

def table(rows):
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths))))

print("== summary: baseline vs flood ==")
rows = [["", *phases]]
rows.append(["seconds", *[f"{S[p]['seconds']:.0f}" for p in phases]])
for op in ["put", "get", "stat", "list", "all"]:
    for what in ["p50_ms", "p99_ms"]:
        rows.append([f"honest {op} {what[:3]} ms",
                     *[f"{S[p]['honest'][op][what]:.1f}" for p in phases]])
rows.append(["honest ops/s", *[f"{S[p]['honest']['all']['ops_per_s']:.1f}" for p in phases]])
rows.append(["honest errors", *[S[p]["honest"]["all"]["errors"] for p in phases]])
rows.append(["flood req/s", *[f"{S[p]['flood_figures']['req_per_s']:.0f}" if S[p]["flood_figures"] else "-"
                              for p in phases]])
rows.append(["layout version", *[f"{S[p]['layout_before']}→{S[p]['layout_after']}" for p in phases]])

def rss(p, col):
    peak, first = {}, {}
    for line in open(f"{work}/{p}.rss"):
        parts = line.split()
        if len(parts) != 3:
            continue
        n, kb = parts[0], int(parts[col])
        first.setdefault(n, kb)
        peak[n] = max(peak.get(n, 0), kb)
    return peak, first

def cpu(p):
    a = dict(l.split() for l in open(f"{work}/{p}.cpu0"))
    b = dict(l.split() for l in open(f"{work}/{p}.cpu1"))
    return {n: (int(b[n]) - int(a[n])) / hz for n in a}

C = {p: cpu(p) for p in phases}
names = [n for n in C[phases[0]] if n != "machine"]
for col, what in [(1, "RSS"), (2, "RssAnon")]:
    R = {p: rss(p, col) for p in phases}
    for n in names:
        rows.append([f"{n} peak {what} MiB (start)",
                     *[f"{R[p][0].get(n, 0) / 1024:.1f} ({R[p][1].get(n, 0) / 1024:.1f})"
                       for p in phases]])
for n in names:
    rows.append([f"{n} CPU s", *[f"{C[p].get(n, 0):.1f}" for p in phases]])
farm_cpu = {p: sum(v for k, v in C[p].items() if k != "machine") for p in phases}
bench_cpu = {p: S[p].get("cpu_s", {}).get("total", 0.0) for p in phases}
rows.append(["agents CPU s (sum)", *[f"{farm_cpu[p] - C[p].get('coordinator', 0):.1f}" for p in phases]])
rows.append(["bench CPU s (flood threads)",
             *[f"{bench_cpu[p]:.1f} ({S[p].get('cpu_s', {}).get('flood', 0.0):.1f})" for p in phases]])
rows.append(["other CPU s (softirq, other processes)",
             *[f"{max(0.0, C[p]['machine'] - farm_cpu[p] - bench_cpu[p]):.1f}" for p in phases]])
table(rows)
EOF
