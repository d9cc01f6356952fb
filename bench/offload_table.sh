#!/usr/bin/env bash
# Device and host memory of recompute and offload policies, and the largest micro-batch per
# policy on common card sizes, for gpt2-xl and a 1.5B Llama-family shape (qwen2.5-1.5b) at
# bf16, T=1024, from `remat plan --json` (the real schedule through the dry-run arenas) and
# `remat plan --max-batch`. Writes bench/results/offload_plan.md.
#   bench/offload_table.sh [path/to/remat]
set -euo pipefail
cd "$(dirname "$0")/.."
remat="${1:-build/remat}"
out=bench/results/offload_plan.md
gib() { python3 -c "print('%.2f GiB' % ($1 / 2**30))"; }
{
  echo "# Offload and fit: device totals per policy, largest batch per card (bf16, T=1024)"
  echo
  echo "From \`remat plan\` at commit $(git rev-parse --short HEAD), $(date -u +%Y-%m-%d); planned, not"
  echo "measured on a GPU (none was lent). Device total = weights + gradients + optimizer state"
  echo "(unless offloaded) + the arena's peak (activations and workspace, by the dry run); host ="
  echo "pinned memory for offloaded activations and optimizer state. Copy traffic and its time are"
  echo "modelled at 25 GB/s (PCIe); the optimizer offload's update reads and writes the fp32 state"
  echo "across the link (zero-copy), modelled at the same bandwidth."
  echo
  for model in gpt2-xl qwen2.5-1.5b; do
    echo "## $model, B=16, T=1024"
    echo
    echo "| policy | device total | host total | activation peak | copies/step | modelled copy + optimizer link |"
    echo "| --- | --- | --- | --- | --- | --- |"
    for p in "none|none|" "selective|none|" "full|none|" "full|input|" "full|input|--offload-optimizer" "fit 16GiB|fit|16GiB" "fit 24GiB|fit|24GiB"; do
      IFS='|' read -r rc off extra <<<"$p"
      if [[ $off == fit ]]; then
        args=(--fit "$extra"); name="--fit $extra"
      else
        args=(--recompute "$rc" --offload "$off" $extra); name="$rc, offload $off ${extra:++ optimizer}"
      fi
      j=$("$remat" plan --model "$model" --batch 16 --seq 1024 --dtype bf16 "${args[@]}" --json)
      if [[ $off == fit ]]; then
        chose=$("$remat" plan --model "$model" --batch 16 --seq 1024 --dtype bf16 "${args[@]}" | sed -n 's/^fit [^:]*: chose \(.*\) (device.*/\1/p')
        name="$name: $chose"
      fi
      echo "$j" | python3 -c "
import json,sys
d=json.load(sys.stdin)
g=lambda b: '%.2f GiB' % (b/2**30)
link=d['copy_seconds_model']*1e3 + d['optimizer_link_bytes_per_step']/25e9*1e3
print('| %s | %s | %s | %s | %s | %.0f ms |' % ('''$name''', g(d['device_total_bytes']), g(d['host_total_bytes']), g(d['activation_peak_bytes']), g(d['copy_bytes_per_step']), link))
"
    done
    echo
    echo "Largest micro-batch (T=1024) whose device total fits:"
    echo
    echo "| policy | 16 GB | 24 GB | 40 GB | 80 GB |"
    echo "| --- | --- | --- | --- | --- |"
    declare -A cells=()
    for mem in 16GB 24GB 40GB 80GB; do
      while IFS=$'\t' read -r name b; do
        cells["$name|$mem"]=$b
      done < <("$remat" plan --model "$model" --seq 1024 --dtype bf16 --max-batch --device-memory "$mem" --json |
        python3 -c "import json,sys; [print(r['policy'], r['max_batch'], sep='\t') for r in json.load(sys.stdin)['max_batch']]")
    done
    for name in "none" "selective" "full" "full + input offload" "full + input offload + optimizer offload"; do
      echo "| $name | ${cells["$name|16GB"]} | ${cells["$name|24GB"]} | ${cells["$name|40GB"]} | ${cells["$name|80GB"]} |"
    done
    unset cells
    echo
  done
  echo "Target (issue): gpt2-xl at B=16, T=1024 within 16 GiB of device memory: see the"
  echo "\`--fit 16GiB\` row; \`full\` with \`--offload input\` against none's activation peak:"
  none=$("$remat" plan --model gpt2-xl --batch 16 --seq 1024 --dtype bf16 --recompute none --json | python3 -c "import json,sys; print(json.load(sys.stdin)['activation_peak_bytes'])")
  fo=$("$remat" plan --model gpt2-xl --batch 16 --seq 1024 --dtype bf16 --recompute full --offload input --json | python3 -c "import json,sys; print(json.load(sys.stdin)['activation_peak_bytes'])")
  python3 -c "print('%.1f%% of none (%.2f of %.2f GiB).' % (100*$fo/$none, $fo/2**30, $none/2**30))"
} >"$out"
echo "wrote $out"
