#!/usr/bin/env bash
# Checks remat's per-step training losses on Llama-family models against the independent
# float64 numpy reference (tests/reference/llama_numpy.py): a random Llama/Qwen2/Mistral-shaped
# Hugging Face directory (config.json + model.safetensors) and a random llm.c token shard,
# 10 AdamW steps (weight decay 0, no clipping, constant lr), every loss to 1e-6 relative.
#
# usage: check_llama_losses.sh REMAT_BINARY [CONFIG...]
#   CONFIG: llama-gqa, llama-tied, qwen2, mistral (default: all four)
#   environment: PYTHON (default python3), REMAT_DEVICE (default cpu), RTOL (default 1e-6),
#                LR (default 1e-3), REMAT_EXTRA_ARGS (more `remat train` options, e.g.
#                "--recompute full", which must not change the losses), KEEP_DIR=1 keeps the
#                work directory, WORK_DIR=DIR works there instead (kept; DIR must exist)
# exit status: 0 when every config passes, 1 when one fails, 2 on a usage/setup error.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 REMAT_BINARY [llama-gqa|llama-tied|qwen2|mistral ...]" >&2
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
  CONFIGS=(llama-gqa llama-tied qwen2 mistral)
fi

PYTHON=${PYTHON:-python3}
DEVICE=${REMAT_DEVICE:-cpu}
RTOL=${RTOL:-1e-6}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REF=$HERE/llama_numpy.py

if ! "$PYTHON" -c 'import numpy' 2>/dev/null; then
  echo "error: $PYTHON cannot import numpy (pip install numpy)" >&2
  exit 2
fi

if [[ -n ${WORK_DIR:-} ]]; then
  WORK=$(cd "$WORK_DIR" && pwd)
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/remat-llama-refcheck.XXXXXX")
  if [[ ${KEEP_DIR:-0} != 1 ]]; then
    trap 'rm -rf "$WORK"' EXIT
  else
    echo "work directory: $WORK"
  fi
fi

STEPS=10
LR=${LR:-1e-3}
BETA1=0.9
BETA2=0.95
EPS=1e-8

# name: model_type layers channels heads kv_heads intermediate vocab maxT batch seq head
#       bias theta rms_eps
config_args() {
  case $1 in
    llama-gqa)  echo "llama 2 64 4 2 160 300 64 4 32 --untied - 10000 1e-5" ;;
    llama-tied) echo "llama 2 48 4 2 128 200 32 2 16 --tied - 10000 1e-5" ;;
    qwen2)      echo "qwen2 2 64 4 1 176 257 64 4 32 --untied --qkv-bias 1000000 1e-6" ;;
    mistral)    echo "mistral 2 32 4 4 96 150 32 2 16 --untied - 10000 1e-5" ;;
    *) return 1 ;;
  esac
}

failed=()
for name in "${CONFIGS[@]}"; do
  if ! args=$(config_args "$name"); then
    echo "error: unknown config '$name' (llama-gqa, llama-tied, qwen2, mistral)" >&2
    exit 2
  fi
  read -r MT L C NH NKV I V MAXT B T HEAD BIAS THETA RMSEPS <<<"$args"
  [[ $BIAS == - ]] && BIAS=
  dir=$WORK/$name
  mkdir -p "$dir"
  rm -f "$dir/remat.jsonl"  # remat appends to its --log
  ntok=$(( (STEPS + 1) * B * T + 1 ))
  echo "=== $name: $MT L=$L C=$C NH=$NH NKV=$NKV I=$I V=$V maxT=$MAXT ${HEAD#--}${BIAS:+ q/k/v biases}," \
       "theta=$THETA eps=$RMSEPS, B=$B T=$T, $STEPS steps, lr $LR, device $DEVICE${REMAT_EXTRA_ARGS:+ $REMAT_EXTRA_ARGS} ==="

  "$PYTHON" "$REF" write-model "$dir/model" --model-type "$MT" --layers "$L" --channels "$C" \
    --heads "$NH" --kv-heads "$NKV" --intermediate "$I" --vocab "$V" --max-seq "$MAXT" \
    "$HEAD" $BIAS --rope-theta "$THETA" --rms-eps "$RMSEPS" --seed 1
  # a random Markov chain with 2 successors per token: learnable, so the loss moves in 10 steps
  "$PYTHON" "$REF" write-shard "$dir/train.bin" --vocab "$V" --tokens "$ntok" --seed 2 --successors 2

  t0=$(date +%s)
  if ! "$REMAT" train --model "$dir/model" --data "$dir/train.bin" \
      --batch "$B" --seq "$T" --total-batch $((B * T)) --steps "$STEPS" --lr "$LR" \
      --schedule constant --warmup 0 --weight-decay 0 --grad-clip 0 \
      --beta1 "$BETA1" --beta2 "$BETA2" --eps "$EPS" \
      --eval-every 0 --sample-tokens 0 --out "" --log "$dir/remat.jsonl" \
      --device "$DEVICE" ${REMAT_EXTRA_ARGS:-} >"$dir/remat.txt" 2>&1; then
    echo "remat train failed:"
    cat "$dir/remat.txt"
    failed+=("$name")
    continue
  fi
  t1=$(date +%s)
  "$PYTHON" "$REF" train --model "$dir/model" --data "$dir/train.bin" \
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
