#!/usr/bin/env bash
# What recompute costs on the CPU backend: the step time of `small` (B=8, T=128) with none,
# selective and full, beside the recompute ops' own time (their forward-pass durations in a
# traced step: the same kernels on the same shapes, run without anything beside them).
#   bash bench/cpu_recompute_cost.sh [REMAT_BINARY] [OUTDIR]
set -euo pipefail
bin="${1:-build/remat}"
out="${2:-/tmp/remat_recompute_cost}"
mkdir -p "$out"
for p in none selective full; do
  rm -f "$out/$p.jsonl"
  "$bin" train --model small --batch 8 --seq 128 --steps 10 --recompute "$p" --eval-every 0 \
    --out "$out/o" --log "$out/$p.jsonl" --trace "$out/$p.trace.json" --trace-steps 8:8 \
    >"$out/$p.log" 2>&1
done
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
def median_ms(p):
    rows = [json.loads(l) for l in open(f"{out}/{p}.jsonl") if '"ms"' in l]
    ts = sorted(r["ms"] for r in rows[2:])  # steps 3..10
    return ts[len(ts) // 2]
def op_times(p):
    tr = json.load(open(f"{out}/{p}.trace.json"))
    ev = tr["traceEvents"] if isinstance(tr, dict) else tr
    fwd, rc = {}, {}
    for e in ev:
        if e.get("ph") != "X": continue
        n, d = e["name"], e.get("dur", 0) / 1000
        if n.startswith("fwd."): fwd[n[4:]] = fwd.get(n[4:], 0) + d
        if n.startswith("recompute."): rc[n[10:]] = rc.get(n[10:], 0) + d
    return fwd, rc
base = median_ms("none")
print(f"| policy | step ms (median of 8) | increase | recompute ops' own time |")
print(f"| --- | --- | --- | --- |")
print(f"| none | {base:.1f} | | |")
for p in ["selective", "full"]:
    ms = median_ms(p)
    fwd, rc = op_times(p)
    # Each replayed op's own time: the same op in this step's forward pass (the label the
    # replay uses, or the old hand-written schedule's names for the same kernels).
    alias = {"ln2": "residual_ln2", "ln1": "ln1"}
    own = sum(fwd.get(k, fwd.get(alias.get(k, k), 0)) for k in rc)
    print(f"| {p} | {ms:.1f} | +{ms - base:.1f} ms ({100 * (ms - base) / base:.0f}%) | {own:.1f} ms |")
PY
