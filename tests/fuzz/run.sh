#!/usr/bin/env bash
# Builds the fuzz targets (tests/fuzz/build.sh), writes their seed corpora (make_seeds), replays
# the saved regression inputs (tests/fuzz/regressions/<target>/), then fuzzes each target for
# a bounded time. Fails on any crash, hang, leak, oversized allocation, sanitizer report or
# uncaught exception; prints each target's execution count.
#   FUZZ_SECONDS    seconds per target (default 60)
#   FUZZ_TARGETS    space-separated subset, e.g. "shard cli" (default: all)
#   FUZZ_BUILD_DIR  build directory (default: build-fuzz); corpora grow in its corpus/
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
seconds="${FUZZ_SECONDS:-60}"
out="$("$here/build.sh" | tail -n 1)"
cd "$out"

rm -rf seeds artifacts
mkdir -p artifacts corpus
./make_seeds seeds

targets="${FUZZ_TARGETS:-$(cd "$here" && ls fuzz_*.cpp | sed 's/^fuzz_//; s/\.cpp$//')}"
# -malloc_limit_mb: a header that makes a reader allocate what the input does not hold is a
# finding, not an out-of-memory later.
common=(-max_len=65536 -rss_limit_mb=2048 -malloc_limit_mb=512 -timeout=10 -print_final_stats=1)
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}"

failed=()
summary=()
# Runs one fuzzer command in the background so its pid names its scratch directory.
run_one() {
  local log="$1"
  shift
  local rc=0
  "$@" >"$log" 2>&1 &
  local pid=$!
  wait "$pid" || rc=$?
  rm -rf "/dev/shm/remat-fuzz-$pid" "/tmp/remat-fuzz-$pid"
  return "$rc"
}

for t in $targets; do
  bin="./fuzz_$t"
  [ -x "$bin" ] || { echo "fuzz: no target fuzz_$t" >&2; exit 1; }
  extra=()
  [ -f "$here/$t.dict" ] && extra+=("-dict=$here/$t.dict")
  # Regression inputs first: each must run clean.
  if [ -d "$here/regressions/$t" ]; then
    if ! run_one "regress_$t.log" "$bin" "${common[@]}" "${extra[@]}" "$here/regressions/$t"/*; then
      echo "== fuzz $t: a saved regression input fails again"
      tail -n 40 "regress_$t.log"
      failed+=("$t (regression)")
      continue
    fi
  fi
  mkdir -p "corpus/$t"
  rc=0
  run_one "fuzz_$t.log" "$bin" "corpus/$t" "seeds/$t" "${common[@]}" "${extra[@]}" \
    -max_total_time="$seconds" -artifact_prefix="artifacts/$t-" || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "fuzz_$t.log" | tail -n 1)
  added=$(sed -n 's/^stat::new_units_added: *//p' "fuzz_$t.log" | tail -n 1)
  rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "fuzz_$t.log" | tail -n 1)
  line="fuzz_$t: ${execs:-?} executions in ${seconds}s, ${added:-?} new units, peak RSS ${rss:-?} MB"
  if [ "$rc" -ne 0 ]; then
    echo "== fuzz $t FAILED (exit $rc): $out/fuzz_$t.log"
    grep -E "ERROR|SUMMARY|runtime error|FUZZ_ASSERT|terminate|what\(\)" "fuzz_$t.log" | head -n 20 || true
    tail -n 30 "fuzz_$t.log"
    ls "artifacts/$t-"* 2>/dev/null | sed 's/^/  reproducer: /' || true
    failed+=("$t")
    line="$line  FAILED"
  fi
  summary+=("$line")
  echo "$line"
done

echo "== fuzz summary"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]} (reproduce: $out/fuzz_TARGET ARTIFACT)"
  exit 1
fi
echo "fuzz: all targets clean"
