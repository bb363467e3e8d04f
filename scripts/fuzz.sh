#!/usr/bin/env bash
# Coverage-guided fuzzing of the decoders that take bytes from the network or disk (cargo-fuzz,
# libFuzzer), on the stable toolchain. Builds the targets of fuzz/ in their own target dir,
# runs each on a scratch copy of the committed seeds (fuzz/corpus/<target>/, so the work tree
# stays clean), prints executions, exec/s and coverage per target, and fails on any crash,
# naming the input that caused it. The targets' bodies are the functions of fuzz/lib
# (shardfarm_fuzz::targets); fuzz/fuzz_targets/ hands each to libFuzzer.
#
# This is the campaign, run by hand or as a separate CI-length job (a cold instrumented build is
# ~14 min on 2 cores): the test command does not fuzz, it replays the committed corpus through
# the same functions in the ordinary build (fuzz/lib/tests/corpus.rs). Commit a crash's input,
# once fixed, as fuzz/corpus/<target>/regression-<what>.
#
# Usage: bash scripts/fuzz.sh [--seconds N] [--runs N] [TARGET...] [-- LIBFUZZER_ARGS...]
#   --seconds N   run each target N seconds (default 30)
#   --runs N      stop each target after N executions instead (with --seconds: whichever first)
#   TARGET...     some of: segment_header capability credential capacity_report tombstone
#                 coordinator_state ledger (default: all)
# A crash's input is kept in $CARGO_TARGET_DIR/fuzz/artifacts/<target>/; replay it with
#   $CARGO_TARGET_DIR/fuzz/<triple>/release/<target> <file>
#
# Stable Rust: `--sanitizer none`. cargo-fuzz's default, AddressSanitizer, needs the nightly
# `-Zsanitizer`; everything else it uses (SanitizerCoverage through -Cpasses/-Cllvm-args,
# `--cfg fuzzing`) is stable. The targets are safe Rust, so what the fuzzer finds are panics:
# failed assertions of the targets' properties, overflow checks (debug assertions stay on),
# out-of-bounds indexing, and timeouts.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib-setup.sh
source scripts/lib-setup.sh

ALL_TARGETS=(segment_header capability credential capacity_report tombstone coordinator_state ledger)

seconds="" runs="" targets=() extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) [ $# -ge 2 ] || fail "--seconds needs a number"; seconds=$2; shift 2 ;;
    --runs) [ $# -ge 2 ] || fail "--runs needs a number"; runs=$2; shift 2 ;;
    -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    -*) fail "unknown option $1 (see --help)" ;;
    *) targets+=("$1"); shift ;;
  esac
done
for n in "$seconds" "$runs"; do
  [ -z "$n" ] || [[ "$n" =~ ^[0-9]+$ ]] || fail "not a number: $n"
done
[ -n "$seconds$runs" ] || seconds=30
[ ${#targets[@]} -gt 0 ] || targets=("${ALL_TARGETS[@]}")
for t in "${targets[@]}"; do
  [[ " ${ALL_TARGETS[*]} " == *" $t "* ]] || fail "unknown target $t (targets: ${ALL_TARGETS[*]})"
done

# ---- Tools: cargo-fuzz, and a C++ compiler for libFuzzer itself ----
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 \
  || apt_install g++ "a C++ compiler (libfuzzer-sys compiles libFuzzer)"
if ! cargo fuzz --version >/dev/null 2>&1; then
  step "installing cargo-fuzz (cargo install cargo-fuzz --locked, ~1 min)"
  cargo install cargo-fuzz --locked >&2 || fail "cargo install cargo-fuzz failed"
fi

# Its own target dir below the main one: the instrumented build never invalidates the main
# build, and the main build's artefacts are never picked up here.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/shardfarm-target}/fuzz"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
triple=$(rustc -vV | sed -n 's/^host: //p')
bin_dir="$CARGO_TARGET_DIR/$triple/release"
artifacts_root="$CARGO_TARGET_DIR/artifacts"

start=$(date +%s)
step "build: $(cargo fuzz --version | head -1), $(rustc --version), no sanitizer, debug assertions on"
if [ ${#targets[@]} -eq ${#ALL_TARGETS[@]} ]; then
  cargo fuzz build --sanitizer none --debug-assertions >&2
else
  for t in "${targets[@]}"; do
    cargo fuzz build --sanitizer none --debug-assertions "$t" >&2
  done
fi
step "build took $(( $(date +%s) - start )) s"

work=$(mktemp -d "${TMPDIR:-/tmp}/shardfarm-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT

limits=()
[ -z "$seconds" ] || limits+=("-max_total_time=$seconds")
[ -z "$runs" ] || limits+=("-runs=$runs")

# libFuzzer's last status line: "#N DONE cov: C ft: F corp: … exec/s: E rss: …" (on a crash
# there is no DONE line; the last progress line is the best there is).
field() { sed -n "s/.* $1: \([0-9]*\).*/\1/p" <<<"$2"; }

failed=() summary=()
for t in "${targets[@]}"; do
  corpus="$work/$t"
  artifacts="$artifacts_root/$t"
  mkdir -p "$corpus" "$artifacts"
  [ ! -d "fuzz/corpus/$t" ] || cp -R "fuzz/corpus/$t/." "$corpus/"
  seeds=$(find "$corpus" -type f | wc -l)
  step "$t: ${limits[*]} from $seeds seeds"
  log="$work/$t.log"
  t0=$(date +%s)
  rc=0
  # -timeout: an input that runs 10 s is a hang worth reporting (default is 20 min).
  "$bin_dir/$t" "$corpus" -artifact_prefix="$artifacts/" -timeout=10 -print_final_stats=1 \
    "${limits[@]}" "${extra[@]}" >"$log" 2>&1 || rc=$?
  elapsed=$(( $(date +%s) - t0 ))
  last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  [ -n "$execs" ] || execs=$(sed -n 's/^#\([0-9]*\).*/\1/p' <<<"$last")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  [ -n "$rate" ] || rate=$(field "exec/s" "$last")
  line=$(printf '%-18s %12s execs %8s exec/s %6s s  cov %6s  ft %6s  corpus %s' "$t" \
    "${execs:-?}" "${rate:-?}" "$elapsed" "$(field cov "$last")" "$(field ft "$last")" \
    "$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")")
  if [ "$rc" != 0 ]; then
    crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
    echo "==> $t FAILED (libFuzzer exit $rc):" >&2
    grep -E "panicked at|^(thread|Error|ERROR|SUMMARY)|ALARM|timeout" -A2 "$log" | head -20 >&2 || true
    echo "    input: ${crash:-none written; full log below}" >&2
    [ -n "$crash" ] || tail -30 "$log" >&2
    failed+=("$t")
    summary+=("$line  CRASH ${crash:-}")
  else
    summary+=("$line  ok")
  fi
  echo "$line" >&2
done

echo "==> fuzzing summary ($(( $(date +%s) - start )) s with the build)"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "==> crashes in: ${failed[*]} (inputs in $artifacts_root/<target>/)" >&2
  exit 1
fi
