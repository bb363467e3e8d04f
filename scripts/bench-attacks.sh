#!/usr/bin/env bash
# The hostile round's five attacks (issue 34) at full length, with honest latency measured
# without the attacker first on the same farm: one root identity with many delegated keys,
# connections and loopback addresses, against a 6-agent RS(4,2) local farm while an honest
# client puts and reads back 1 MiB files and lists the nodes. Prints, per attack, the honest
# operations, failures, median latency with and without the attacker (and their ratio), and the
# peak RSS of the agents and the coordinator. Prints figures only; the test command runs the
# same attacks for 20 s each and asserts (cli/tests/attacks.rs).
#
#   bash scripts/bench-attacks.sh [--seconds N] [--shared-cores] [ATTACK_FILTER]
#
# --seconds: length of each attack and of its baseline (default 60). ATTACK_FILTER: a part of
# a test name in cli/tests/attacks.rs (default: all five). --shared-cores: the attacker runs
# on the farm's cores; by default (on a machine with 2 or more) the farm's agents and
# coordinator run on the first half of the cores with the honest client, and the attacker on
# the other half, as if it were another machine (baseline included).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/shardfarm-target}"

SECS=60
FILTER=""
SHARED=0
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) SECS="$2"; shift 2 ;;
    --shared-cores) SHARED=1; shift ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    *) FILTER="$1"; shift ;;
  esac
done

# The test build's features (no RocksDB rebuild); one attack at a time, so the farm under
# attack has the machine to itself.
CORES=$(nproc)
if [ "$SHARED" = 0 ] && [ "$CORES" -ge 2 ]; then
  HALF=$((CORES / 2))
  export SHARDFARM_FARM_CPUS="0-$((HALF - 1))" SHARDFARM_ATTACK_CPUS="$HALF-$((CORES - 1))"
  echo "farm on cores $SHARDFARM_FARM_CPUS, attacker on cores $SHARDFARM_ATTACK_CPUS (baseline too)"
else
  echo "farm and attacker share all $CORES cores"
fi
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT
SHARDFARM_ATTACK_SECONDS="$SECS" SHARDFARM_ATTACK_BASELINE=1 \
  cargo nextest run --workspace --locked --test attacks --test-threads 1 --no-capture \
  --no-fail-fast ${FILTER:+-E "test(/$FILTER/)"} 2>&1 | tee "$OUT" |
  grep -E '^(baseline|[A-Za-z]+ for|attacker|uploads refused|connections closed|requests paced|tombstones refused|agent 2 rejoined|\s+(PASS|FAIL))' || true

python3 - "$OUT" "$SECS" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
secs = sys.argv[2]
base = {m[0]: (float(m[2]), float(m[3]), float(m[4])) for m in re.findall(
    r"baseline (\w+): (\d+) honest ops, median put (\S+) ms, get (\S+) ms, nodes (\S+) ms", text)}
print(f"\nattack ({secs} s each)   honest ops  failed  put ms (base→attack, ×)   get ms (base→attack, ×)   nodes ms (×)   peak RSS agent / coordinator MiB")
for m in re.findall(r"(\w+) for \S+: (\d+) honest ops, (\d+) failed, median put (\S+) ms, get (\S+) ms, "
                    r"nodes (\S+) ms; peak RSS agents (\d+) MiB, coordinator (\d+) MiB", text):
    name, ops, failed, put, get, nodes, ra, rc = m
    b = base.get(name, (float("nan"),) * 3)
    r = lambda a, x: f"{x:.0f}→{a:.0f} ({a / x:.2f}×)" if x == x and x > 0 else f"{a:.0f}"
    print(f"{name:<22} {ops:>10} {failed:>7}  {r(float(put), b[0]):<24} {r(float(get), b[1]):<24} "
          f"{r(float(nodes), b[2]):<14} {ra:>5} / {rc}")
EOF
