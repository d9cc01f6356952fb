#!/usr/bin/env bash
# Activation memory of every checkpoint preset for the four GPT-2 sizes at bf16, T=1024, from
# `remat plan --json` (the real schedule through the dry-run arena), beside llm.c's published
# activation sizes. Writes bench/results/plan_memory.md.
#   bench/plan_table.sh [path/to/remat]
set -euo pipefail
cd "$(dirname "$0")/.."
remat="${1:-build/remat}"
out=bench/results/plan_memory.md
py() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
{
  echo "# Activation memory by checkpoint policy (bf16, T=1024)"
  echo
  echo "From \`remat plan --json --dtype bf16 --seq 1024\` at commit $(git rev-parse --short HEAD), $(date -u +%Y-%m-%d)."
  echo "Activation peak = high-water mark of activations in the arena over one training step,"
  echo "recompute transients and the look-ahead of one block included; workspace (activation"
  echo "gradients, classifier chunks) is listed apart. Ratios are to \`none\` of the same model."
  echo
  echo "| model | B | policy | activation peak | ratio to none | workspace | total with params, grads, AdamW | recompute / step FLOPs |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
  for spec in "gpt2 16" "gpt2-medium 16" "gpt2-large 16" "gpt2-xl 16" "gpt2 64"; do
    set -- $spec
    model=$1; B=$2
    none=$("$remat" plan --model "$model" --batch "$B" --seq 1024 --dtype bf16 --recompute none --json | py 'd["activation_peak_bytes"]')
    for policy in none selective attention full every:6; do
      j=$("$remat" plan --model "$model" --batch "$B" --seq 1024 --dtype bf16 --recompute "$policy" --json)
      echo "$j" | python3 -c "
import json,sys
d=json.load(sys.stdin); none=$none
mib=lambda b: '%.0f MiB' % (b/2**20)
print('| %s | %d | %s | %s | %.1f%% | %s | %s | %.2f%% |' % (d['model'], d['batch'], d['recompute'], mib(d['activation_peak_bytes']), 100*d['activation_peak_bytes']/none, mib(d['workspace_peak_bytes']), mib(d['total_bytes']), 100*d['recompute_flops_fraction']))"
    done
  done
  echo
  echo "llm.c's activation sizes from its sizing code (shared/ANCHORS.md), for scale; llm.c's"
  echo "count includes its own buffers (e.g. the attention matrix and logits), so the sets differ:"
  echo
  echo "| model | B | llm.c -r 0 | llm.c -r 1 (GeLU recomputed) | llm.c -r 2 |"
  echo "| --- | --- | --- | --- | --- |"
  echo "| 124M | 64 | 25441 MiB | 21217 MiB | 18913 MiB |"
  echo "| 1558M | 16 | 40409 MiB | 31009 MiB | 26209 MiB |"
} > "$out"
cat "$out"
