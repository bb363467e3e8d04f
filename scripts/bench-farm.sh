#!/usr/bin/env bash
# Local-farm benchmark: put and get of a 1 GiB file on a 6-node RS(4,2) farm, beside the
# loopback TCP rate and a raw write + fsync of 1.5 GiB (what RS(4,2) stores for 1 GiB) to the
# same disk; and the client's peak RSS while putting 1 GiB and 4 GiB. Prints figures only.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/shardfarm-target}"
cargo build --workspace --all-targets --locked >/dev/null
SF="$CARGO_TARGET_DIR/debug/shardfarm"
WORK="${WORK:-$(mktemp -d -p "$PWD" bench.XXXX)}"
trap 'kill -TERM $UP 2>/dev/null; wait $UP 2>/dev/null; rm -rf "$WORK"' EXIT

"$CARGO_TARGET_DIR/debug/examples/bench" tcp 4
dd if=/dev/zero of="$WORK/raw" bs=1M count=1536 conv=fsync 2>&1 | tail -1 | sed 's/^/raw write + fsync of 1.5 GiB: /'
rm -f "$WORK/raw"

"$SF" local up --data "$WORK/farm" --no-restart --base-port "${BASE_PORT:-17400}" >/dev/null &
UP=$!
for _ in $(seq 1 300); do [ -f "$WORK/farm/farm.json" ] && break; sleep 0.2; done
sleep 1

for gib in 1 4; do
  head -c $((gib << 30)) /dev/urandom > "$WORK/in"
  cat "$WORK/in" > /dev/null   # warm the page cache: measure the farm, not the input disk
  read -r secs rss < <(/usr/bin/time -f "%e %M" "$SF" --farm "$WORK/farm" put "$WORK/in" 2>&1 >"$WORK/cap" | tail -1)
  echo "put ${gib} GiB: ${secs} s = $(python3 -c "print(f'{$gib*2**30/$secs/1e9:.2f}')") GB/s, client peak RSS $((rss / 1024)) MiB"
  read -r secs rss < <(/usr/bin/time -f "%e %M" "$SF" --farm "$WORK/farm" get "$(cat "$WORK/cap")" -o "$WORK/out" 2>&1 | tail -1)
  echo "get ${gib} GiB: ${secs} s = $(python3 -c "print(f'{$gib*2**30/$secs/1e9:.2f}')") GB/s, client peak RSS $((rss / 1024)) MiB"
  cmp "$WORK/in" "$WORK/out" && echo "  (read back identical)"
  "$SF" --farm "$WORK/farm" rm "$(cat "$WORK/cap")" 2>/dev/null
  rm -f "$WORK/in" "$WORK/out"
done
