#!/usr/bin/env bash
# Checks remat's per-step training losses against the independent float64 numpy reference
# (tests/reference/gpt2_numpy.py): a random GPT-2-shaped llm.c checkpoint and a random llm.c
# token shard, 10 AdamW steps (weight decay 0, no clipping, constant lr), every loss to 1e-4
# relative.
#
# usage: check_losses.sh REMAT_BINARY [CONFIG...]
#   CONFIG: small (default), large (default), gpt2 (the 124M shape, random weights; slow)
#   environment: PYTHON (default python3), REMAT_DEVICE (default cpu), RTOL (default 1e-4),
#                REMAT_EXTRA_ARGS (more `remat train` options, e.g. "--recompute full", which
#                must not change the losses), KEEP_DIR=1 keeps the work directory
# exit status: 0 when every config passes, 1 when one fails, 2 on a usage/setup error.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 REMAT_BINARY [small|large|gpt2 ...]" >&2
  exit 2
fi
REMAT=$1
shift
if [[ ! -x $REMAT ]]; then
  echo "error: $REMAT is not an executable" >&2
  exit 2
fi
REMAT=$(cd "$(dirname "$REMAT")" && pwd)/$(basename "$REMAT")
CONFIGS=("$@")
if [[ ${#CONFIGS[@]} -eq 0 ]]; then
  CONFIGS=(small large)
fi

PYTHON=${PYTHON:-python3}
DEVICE=${REMAT_DEVICE:-cpu}
RTOL=${RTOL:-1e-4}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REF=$HERE/gpt2_numpy.py

if ! "$PYTHON" -c 'import numpy' 2>/dev/null; then
  echo "error: $PYTHON cannot import numpy (pip install numpy)" >&2
  exit 2
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/remat-refcheck.XXXXXX")
if [[ ${KEEP_DIR:-0} != 1 ]]; then
  trap 'rm -rf "$WORK"' EXIT
else
  echo "work directory: $WORK"
fi

STEPS=10
LR=1e-3
BETA1=0.9
BETA2=0.95
EPS=1e-8

# name: layers channels heads vocab maxT batch seq
config_args() {
  case $1 in
    small) echo "2 64 4 300 64 4 32" ;;
    large) echo "4 128 4 1000 128 4 64" ;;
    gpt2)  echo "12 768 12 50257 1024 2 64" ;;
    *) return 1 ;;
  esac
}

failed=()
for name in "${CONFIGS[@]}"; do
  if ! args=$(config_args "$name"); then
    echo "error: unknown config '$name' (small, large, gpt2)" >&2
    exit 2
  fi
  read -r L C NH V MAXT B T <<<"$args"
  dir=$WORK/$name
  mkdir -p "$dir/out"
  ntok=$(( (STEPS + 1) * B * T + 1 ))
  echo "=== $name: L=$L C=$C NH=$NH V=$V maxT=$MAXT, B=$B T=$T, $STEPS steps, lr $LR, device $DEVICE ==="

  "$PYTHON" "$REF" write-model "$dir/model.bin" --layers "$L" --channels "$C" --heads "$NH" \
    --vocab "$V" --max-seq "$MAXT" --seed 1
  # a random Markov chain with 2 successors per token: learnable, so the loss moves in 10 steps
  "$PYTHON" "$REF" write-shard "$dir/train.bin" --vocab "$V" --tokens "$ntok" --seed 2 --successors 2

  t0=$(date +%s)
  if ! "$REMAT" train --model "$dir/model.bin" --data "$dir/train.bin" \
      --batch "$B" --seq "$T" --total-batch $((B * T)) --steps "$STEPS" --lr "$LR" \
      --schedule constant --warmup 0 --weight-decay 0 --grad-clip 0 \
      --beta1 "$BETA1" --beta2 "$BETA2" --eps "$EPS" \
      --eval-every 0 --sample-tokens 0 --out "$dir/out" --log "$dir/remat.jsonl" \
      --device "$DEVICE" ${REMAT_EXTRA_ARGS:-} >"$dir/remat.txt" 2>&1; then
    echo "remat train failed:"
    cat "$dir/remat.txt"
    failed+=("$name")
    continue
  fi
  t1=$(date +%s)
  "$PYTHON" "$REF" train --model "$dir/model.bin" --data "$dir/train.bin" \
    --batch "$B" --seq "$T" --steps "$STEPS" --lr "$LR" \
    --beta1 "$BETA1" --beta2 "$BETA2" --eps "$EPS" --weight-decay 0 \
    --json "$dir/reference.json" >"$dir/reference.txt"
  t2=$(date +%s)
  echo "(remat $((t1 - t0)) s, reference $((t2 - t1)) s)"
  if ! "$PYTHON" "$REF" compare --remat "$dir/remat.jsonl" --reference "$dir/reference.json" \
      --rtol "$RTOL"; then
    echo "--- remat output ---"
    cat "$dir/remat.txt"
    failed+=("$name")
  fi
  echo
done

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "FAIL: ${failed[*]}"
  exit 1
fi
echo "PASS: ${CONFIGS[*]}"
