#!/usr/bin/env bash
# The one GPU check of the CUDA backend.
#
#   bench/gpu_check.sh [--cpu-mode] [--build DIR] [--no-build] [--jobs N] [--pack]
#
# With a GPU (nvidia-smi finds one): configures and builds for the card's compute capability
# with all cores (only the targets it runs), runs the GPU tests, compute-sanitizer memcheck and
# racecheck on gpu_test_kernels_gpu at small sizes, the kernel benchmark (remat's attention and
# cuDNN's fused attention beside PyTorch SDPA measured in the same run; LayerNorm, GeLU, AdamW and
# the classifier as a fraction of the measured copy bandwidth), then GPT-2 124M training at B=8
# T=1024 for 12 steps with each recompute preset (none, full, selective, attention; then none
# with --attention cudnn when built with cuDNN; tokens/s and peak memory) beside our own
# PyTorch GPT-2 with torch.compile and SDPA (bench/gpu/torch_gpt2.py) at the same batch. The
# training data is a shard of random tokens made by bench/gpu/make_shard.py. summary.md gets a
# "targets" table (attention >= 0.9 x SDPA, memory-bound ops >= 70% of copy bandwidth, tokens/s
# >= torch.compile) with PASS / MISS / n.a. Budget: under 5 minutes on an H100; each step gets
# at most its cap and what is left (GPU_CHECK_BUDGET_S, default 290 s, sets the whole).
#
# Without a GPU, or with --cpu-mode: builds everything it can (the CUDA sources must compile),
# runs the GPU test programs to show that their device tests skip, checks its own pieces
# (py_compile of the Python files, the token shard, `remat train --help`, that
# `remat train --device cuda` fails clearly, a tiny CPU training run on the shard through the
# same summary), says what it would run on a GPU, and exits 0 (1 if the CUDA code does not
# build or a check fails).
#
# --build DIR: build folder (default build-gpu-check). --no-build: use the binaries already in
# DIR (configure and build only if some are missing), e.g. a build carried to the GPU machine.
# --pack: at the end, move everything under $OUT except summary.md into gpu_check_logs.tar.gz
# (the shards are dropped), for transports that bring back only a few files.
#
# Logs and summary.md go to $OUT (default ./gpu_check_out); a short table is printed last.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$PWD/gpu_check_out}"
BUILD=""
JOBS="$(nproc 2>/dev/null || echo 4)"
CPU_MODE=0
NO_BUILD=0
PACK=0
BUDGET_S="${GPU_CHECK_BUDGET_S:-290}"  # whole run, seconds
PY="${PYTHON:-python3}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu-mode) CPU_MODE=1 ;;
    --build) BUILD="$2"; shift ;;
    --no-build) NO_BUILD=1 ;;
    --jobs) JOBS="$2"; shift ;;
    --pack) PACK=1 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
# No stale results (the training logs are appended to, so they must go).
rm -f "$OUT"/bench_kernels.{md,csv} "$OUT"/sdpa.csv "$OUT"/train_*.jsonl "$OUT"/train_*.log \
      "$OUT"/torch_gpt2.{json,csv,log} "$OUT"/perf.{md,txt} "$OUT"/gpu_check_logs.tar.gz
START=$(date +%s)
SUMMARY_ROWS=()   # "step|status|detail"
FAILED=0

log() { printf '[gpu_check %3ds] %s\n' "$(( $(date +%s) - START ))" "$*"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
row() { SUMMARY_ROWS+=("$1|$2|$3"); }
last_row() { SUMMARY_ROWS[${#SUMMARY_ROWS[@]}-1]="$1|$2|$3"; }  # replace the last row
one_line() { tr -s '\n\t|' '  /' | sed 's/ *$//' | cut -c1-"${1:-140}"; }  # a table-safe excerpt
show() {  # a command as one could paste it: empty and glob arguments quoted
  local a s=""
  for a; do if [[ -z "$a" || "$a" == *[\*\ \$]* ]]; then s+="\"$a\" "; else s+="$a "; fi; done
  echo "${s% }"
}

# step NAME MAX_SECONDS LOGFILE CMD... : runs CMD with a timeout of min(MAX, budget left),
# output to LOGFILE; records ok / FAILED (rc) / TIMEOUT.
step() {
  local name="$1" max="$2" logf="$3"; shift 3
  local t; t=$(left); (( t > max )) && t=$max
  if (( t < 5 )); then row "$name" "SKIPPED" "time budget spent"; log "$name: skipped (budget)"; return 99; fi
  log "$name (timeout ${t}s) -> ${logf#$OUT/}"
  local s=$(date +%s)
  timeout --kill-after=10 "$t" "$@" >"$logf" 2>&1
  local rc=$? d=$(( $(date +%s) - s ))
  if (( rc == 0 )); then row "$name" "ok" "${d}s"
  elif (( rc == 124 || rc == 137 )); then row "$name" "TIMEOUT" "after ${d}s"; FAILED=1
  else row "$name" "FAILED" "rc=$rc, ${d}s, see ${logf#$OUT/}"; FAILED=1; fi
  return $rc
}

# ---------------------------------------------------------------- what is here
GPU_NAME="" ; CAP=""
if (( CPU_MODE == 0 )) && command -v nvidia-smi >/dev/null 2>&1; then
  q=$(nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader 2>/dev/null | head -n1)
  if [[ -n "$q" ]]; then GPU_NAME="${q%%,*}"; CAP="$(echo "${q##*,}" | tr -d ' ')"; fi
fi
[[ -z "$CAP" ]] && CPU_MODE=1
if (( CPU_MODE )); then
  ARCH=90
  log "no GPU found (or --cpu-mode): CPU mode, CUDA code built for sm_${ARCH}"
else
  ARCH="${CAP/./}"
  log "GPU: $GPU_NAME, compute capability $CAP -> CMAKE_CUDA_ARCHITECTURES=$ARCH"
fi
BUILD="$(realpath -m "${BUILD:-$ROOT/build-gpu-check}")"
NVCC="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)"
SANITIZER="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
GEN=(); KEEP_GOING=(-- -k)
command -v ninja >/dev/null 2>&1 && { GEN=(-G Ninja); KEEP_GOING=(-- -k 0); }

# ---------------------------------------------------------------- configure and build
# The GPU test programs, as CMakeLists.txt names them: tests/gpu/test_X.{cu,cpp} -> gpu_test_X.
GPU_TESTS=()
for f in "$ROOT"/tests/gpu/test_*.cu "$ROOT"/tests/gpu/test_*.cpp; do
  [[ -f "$f" ]] && { f="${f##*/}"; GPU_TESTS+=("gpu_${f%.*}"); }
done
GPU_TARGETS=("${GPU_TESTS[@]}" gpu_bench_kernels)
have_binaries() { local t; for t in "${GPU_TARGETS[@]}" remat; do [[ -x "$BUILD/$t" ]] || return 1; done; }
# A carried build may not start here (another glibc, a missing shared library): then build
# afresh in a folder of its own, since the carried CMake cache names the other machine's paths.
binaries_start() {
  "$BUILD/remat" --help >"$OUT/start_check.log" 2>&1 &&
    "$BUILD/${GPU_TESTS[0]}" --gtest_list_tests >>"$OUT/start_check.log" 2>&1
}
# A build with cuDNN attention links libcudnn.so.9; where the toolkit has none (a GPU machine
# whose cuDNN is PyTorch's wheel, nvidia-cudnn-cu13), the loader is pointed at the wheel's.
cudnn_from_wheel() {
  [[ -x "$BUILD/remat" ]] && ldd "$BUILD/remat" 2>/dev/null | grep -q 'libcudnn\.so.*not found' || return 0
  local d
  d=$("$PY" -c 'import os, nvidia.cudnn as m; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null) || return 0
  [[ -d "$d" ]] || return 0
  export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  row "cuDNN library" "info" "not beside the toolkit: using $d"
}
cudnn_from_wheel
if (( NO_BUILD )) && have_binaries && ! binaries_start; then
  row "carried binaries" "WARN" "do not start here ($(grep -m1 -i 'error\|not found' "$OUT/start_check.log" | head -c 100)); building"
  BUILD="$BUILD-here"
fi
if (( NO_BUILD )) && have_binaries; then
  row "build" "skipped" "--no-build: binaries in $BUILD"
  cached=$(sed -n 's/^CMAKE_CUDA_ARCHITECTURES:[A-Z]*=//p' "$BUILD/CMakeCache.txt" 2>/dev/null)
  if [[ -n "$cached" ]] && ! tr ';' '\n' <<<"$cached" | sed 's/[-a-z].*//' | grep -qx "$ARCH"; then
    row "build architecture" "WARN" "$BUILD was built for sm_$cached, this card is sm_$ARCH"
  fi
else
  (( NO_BUILD )) && log "--no-build: $BUILD lacks some binaries, building"
  step "configure" 60 "$OUT/configure.log" \
    cmake -S "$ROOT" -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DREMAT_CUDA=ON \
    -DCMAKE_CUDA_COMPILER="$NVCC" -DCMAKE_CUDA_ARCHITECTURES="$ARCH"
  if (( CPU_MODE )); then
    # Everything: the CUDA library, GPU tests and benchmark, the CPU library, tests, program.
    BUILD_BUDGET=1800; BUDGET_S=$(( BUDGET_S + BUILD_BUDGET ))
    prev=$FAILED
    step "build (all targets, -j$JOBS)" "$BUILD_BUDGET" "$OUT/build.log" \
      cmake --build "$BUILD" -j "$JOBS" "${KEEP_GOING[@]}"
    if (( $? != 0 )); then
      # Targets outside the CUDA backend may be mid-edit by others: a warning here; whether
      # the CUDA targets build is what counts.
      last_row "build (all targets, -j$JOBS)" "WARN" "some targets failed, see build.log"
      FAILED=$prev
      step "build (CUDA targets only)" 900 "$OUT/build_cuda.log" \
        cmake --build "$BUILD" -j "$JOBS" --target "${GPU_TARGETS[@]}"
    fi
  else
    step "build (GPU targets + remat, -j$JOBS)" 200 "$OUT/build.log" \
      cmake --build "$BUILD" -j "$JOBS" --target "${GPU_TARGETS[@]}" remat
  fi
fi
cudnn_from_wheel
# In CPU mode only our targets decide the exit status.
for t in "${GPU_TARGETS[@]}"; do
  if [[ ! -x "$BUILD/$t" ]]; then row "binary $t" "MISSING" "did not build"; FAILED=1; fi
done
REMAT="$BUILD/remat"
[[ -x "$REMAT" ]] || row "binary remat" "MISSING" "did not build: no training checks"

# ---------------------------------------------------------------- training data
# Random tokens in llm.c's shard format (the GPU machine has no corpus); the format is checked
# here independently of the generator.
DATA="$OUT/data"
step "token shards (2M random tokens)" 60 "$OUT/make_shard.log" \
  "$PY" "$ROOT/bench/gpu/make_shard.py" "$DATA" --tokens 2000000 --val-tokens 262144
step "token shard format" 30 "$OUT/shard_check.log" "$PY" - "$DATA"/train_000000.bin \
  "$DATA"/val_000000.bin <<'PY'
import array, os, struct, sys
said = []
for path in sys.argv[1:]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic, version, n = struct.unpack("<256i", f.read(1024))[:3]
        toks = array.array("H", f.read())
    assert (magic, version) == (20240520, 1), f"{path}: magic {magic}, version {version}"
    assert size == 1024 + 2 * n, f"{path}: {size} bytes, header says {n} tokens"
    if sys.byteorder == "big":
        toks.byteswap()
    assert max(toks) < 50257, f"{path}: token {max(toks)} >= 50257"
    print(f"{path}: magic {magic}, version {version}, {n} tokens, {size} bytes, max {max(toks)}")
    said.append(f"{os.path.basename(path)} {n} tokens")
print(", ".join(said) + ": magic, version, size and token range ok")
PY
[[ -f "$DATA/train_000000.bin" ]] && row "  shards" "info" "$(tail -n1 "$OUT/shard_check.log" | one_line)"

# ---------------------------------------------------------------- the SDPA snippet
cat >"$OUT/sdpa_bench.py" <<'PY'
# PyTorch scaled_dot_product_attention, same shapes and FLOP convention as gpu_bench_kernels:
# causal, NH 12, HD 64, 8192 tokens per call; bwd FLOPs = 2.5 x fwd; L2 flushed before each run.
import sys
import torch
import torch.nn.functional as F
out = sys.argv[1]
dev = torch.device("cuda")
l2 = torch.cuda.get_device_properties(0).L2_cache_size
flush = torch.empty(2 * l2, dtype=torch.uint8, device=dev)
def median_ms(fn, iters=20):
    fn(); torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]
rows = []
for T in (1024, 4096):
    B, NH, HD = 8192 // T, 12, 64
    q, k, v = (torch.randn(B, NH, T, HD, device=dev, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    g = torch.randn(B, NH, T, HD, device=dev, dtype=torch.bfloat16)
    fwd = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    def fb():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.autograd.grad(o, (q, k, v), g)
    both = median_ms(fb)
    flops = 4.0 * B * T * T * NH * HD / 2
    bwd = max(both - fwd, 1e-6)
    shape = f" B={B} T={T} NH=12 HD=64 causal"
    rows.append(f"sdpa fwd{shape},{fwd:.4f},{flops / (fwd * 1e9):.2f},TFLOP/s,-1")
    rows.append(f"sdpa bwd{shape},{bwd:.4f},{2.5 * flops / (bwd * 1e9):.2f},TFLOP/s,-1")
with open(out, "w") as f:
    f.write("\n".join(rows) + "\n")
print("\n".join(rows))
PY

# ---------------------------------------------------------------- the results summary
# summarise.py OUT FLOPS_PER_TOKEN TITLE [LABEL TRAIN.jsonl]... -> OUT/perf.md (training table, targets
# table) and OUT/perf.txt (the same, short, for the terminal).
cat >"$OUT/summarise.py" <<'PY'
import json, os, statistics, sys
out, fpt, title = sys.argv[1], float(sys.argv[2]), sys.argv[3]
runs = list(zip(sys.argv[4::2], sys.argv[5::2]))

def train_stats(path):  # median over the steps after the first 2 (warm-up)
    steps = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    o = json.loads(line)
                except ValueError:
                    continue
                if isinstance(o, dict) and "tokens_per_s" in o:
                    steps.append(o)
    except OSError:
        return None
    if not steps:
        return None
    timed = [s for s in steps if s.get("step", 0) > 2] or steps
    return {"n": len(steps), "timed": len(timed),
            "tps": statistics.median(s["tokens_per_s"] for s in timed),
            "ms": statistics.median(s.get("ms", 0) for s in timed),
            "peak": max(s.get("peak_bytes") or 0 for s in steps),
            "act": max(s.get("activation_peak_bytes") or 0 for s in steps),
            "loss": steps[-1].get("loss"), "skipped": sum(bool(s.get("skipped")) for s in steps)}

def read_csv(name):  # name,ms,rate,unit,fraction_of_copy (no header)
    rows = {}
    try:
        with open(os.path.join(out, name)) as f:
            for line in f:
                p = line.strip().rsplit(",", 4)
                try:
                    rows[p[0]] = (float(p[2]), p[3], float(p[4]))
                except (IndexError, ValueError):
                    pass
    except OSError:
        pass
    return rows

def find(rows, prefix, T=None):
    for name, v in rows.items():
        if name.startswith(prefix) and (T is None or f" T={T} " in name + " "):
            return v
    return None

gib = lambda b: f"{b / 2**30:.2f} GiB" if b and b > 0 else "-"
num = lambda x, f="{:.0f}": "-" if x is None else f.format(x)
status = lambda x, goal: "n.a." if x is None else ("PASS" if x >= goal else "MISS")

stats = {label: train_stats(path) for label, path in runs}
anchor = None
try:
    with open(os.path.join(out, "torch_gpt2.json")) as f:
        anchor = json.load(f)
except (OSError, ValueError):
    pass
a_tps = anchor.get("tokens_per_s_median") if anchor else None
a_mode = anchor.get("compile", "?") if anchor else "not run"
compiled = a_mode.startswith("torch.compile")

md, txt = [], []
md += [f"## {title} (median over the steps after the first 2)", "",
       "| run | steps | tokens/s | vs PyTorch | ms/step | model TFLOP/s | peak | activation peak "
       "| final loss | skipped |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
txt += ["%-28s %10s %8s %9s %10s %10s %8s" % ("training run", "tokens/s", "vs torch", "ms/step",
                                             "peak", "act peak", "loss")]
for label, _ in runs:
    s = stats[label]
    if s is None:
        md.append(f"| {label} | no log | | | | | | | | |")
        txt.append("%-28s %10s" % (label, "no log"))
        continue
    r = s["tps"] / a_tps if a_tps else None
    tf = fpt * s["tps"] / 1e12 if fpt > 0 else None
    loss = num(s["loss"], "{:.4f}")
    md.append(f"| {label} | {s['n']} ({s['timed']} timed) | {s['tps']:.0f} | {num(r, '{:.2f}')} "
              f"| {s['ms']:.1f} | {num(tf, '{:.1f}')} | {gib(s['peak'])} | {gib(s['act'])} "
              f"| {loss} | {s['skipped']} |")
    txt.append("%-28s %10.0f %8s %9.1f %10s %10s %8s" % (label, s["tps"], num(r, "{:.2f}"),
               s["ms"], gib(s["peak"]), gib(s["act"]), loss))
if anchor:
    label = f"PyTorch, {a_mode}"
    md.append(f"| {label} | {anchor['steps']} timed | {a_tps:.0f} | 1.00 "
              f"| {anchor['step_ms_median']:.1f} | {anchor['model_tflops']:.1f} "
              f"| {gib(anchor['peak_bytes'])} | - | {anchor['final_loss']:.4f} | - |")
    short = "PyTorch " + a_mode.replace("torch.compile", "compile")
    txt.append("%-28s %10.0f %8s %9.1f %10s %10s %8.4f" % (short[:28], a_tps, "1.00",
               anchor["step_ms_median"], gib(anchor["peak_bytes"]), "-", anchor["final_loss"]))
    if anchor.get("compile_s"):
        md += ["", f"PyTorch: first step (compilation) {anchor['compile_s']:.1f} s, not timed; "
               f"torch {anchor.get('torch')}, {anchor.get('device')}. {anchor.get('note', '')}".strip()]

kern, sdpa = read_csv("bench_kernels.csv"), read_csv("sdpa.csv")
targets = []  # what, ours, anchor, measure, goal, status
for T in (1024, 4096):
    for d in ("fwd", "bwd"):
        o, a = find(kern, f"attention {d} ", T), find(sdpa, f"sdpa {d} ", T)
        r = o[0] / a[0] if o and a and a[0] > 0 else None
        targets.append((f"attention {d} T={T}, TFLOP/s vs SDPA", num(o and o[0], "{:.1f}"),
                        num(a and a[0], "{:.1f}"), num(r, "{:.2f}"), ">= 0.90", status(r, 0.9)))
for T in (1024, 4096):  # cuDNN's fused attention beside the same anchor (information only)
    for d in ("fwd", "bwd"):
        c, a = find(kern, f"cudnn attention {d} ", T), find(sdpa, f"sdpa {d} ", T)
        r = c[0] / a[0] if c and a and a[0] > 0 else None
        targets.append((f"cuDNN attention {d} T={T}, TFLOP/s vs SDPA", num(c and c[0], "{:.1f}"),
                        num(a and a[0], "{:.1f}"), num(r, "{:.2f}"), "-", "info" if c else "n.a."))
copy = find(kern, "d2d copy")
for op in ("layernorm fwd", "layernorm bwd", "adamw", "classifier softmax/loss", "gelu fwd"):
    o = find(kern, op)
    fr = o[2] if o and o[2] >= 0 else None
    targets.append((f"{op}, GB/s vs copy", num(o and o[0]), num(copy and copy[0]),
                    num(fr and 100 * fr, "{:.0f}%"), ">= 70%", status(fr, 0.7)))
for label in ("none", "full"):
    s = stats.get("remat " + label)
    r = s["tps"] / a_tps if s and a_tps else None
    st = status(r, 1.0) if compiled or r is None else f"n.a. (PyTorch ran {a_mode})"
    targets.append((f"GPT-2 124M `{label}`, tokens/s vs torch.compile", num(s and s["tps"]),
                    num(a_tps), num(r, "{:.2f}"), ">= 1.00", st))
# Recompute overlap (issue target: at least half of the recompute under main-stream work),
# the exposed recompute beside the step-time cost of the preset over `none`.
none_ms = stats.get("remat none") and stats["remat none"]["ms"]
for label in ("full", "selective"):
    try:
        with open(os.path.join(out, f"trace_{label}.overlap.json")) as f:
            ov = json.load(f)
    except (OSError, ValueError):
        continue
    s = stats.get("remat " + label)
    extra = s["ms"] - none_ms if s and none_ms else None
    hidden = ov.get("recompute_hidden_fraction")
    targets.append((f"`{label}` recompute under main-stream work", num(hidden and 100 * hidden, "{:.0f}%"),
                    "-", "-", ">= 50%", status(hidden, 0.5)))
    md_line = (f"`{label}` (traced step): recompute {ov.get('recompute_ms', 0):.2f} ms, "
               f"{100 * (hidden or 0):.0f}% under main-stream work, exposed "
               f"{ov.get('exposed_recompute_ms', 0):.2f} ms; step {num(s and s['ms'], '{:.1f}')} ms vs "
               f"`none` {num(none_ms, '{:.1f}')} ms: {num(extra, '{:+.1f}')} ms per step")
    md += ["", md_line]
    txt += ["", md_line.replace("`", "")]
md += ["", "## targets (ours beside the anchor measured in this run)", "",
       "| target | ours | anchor | ratio | goal | status |", "| --- | --- | --- | --- | --- | --- |"]
md += ["| %s | %s | %s | %s | %s | %s |" % t for t in targets]
txt += ["", "%-46s %8s %8s %6s %8s  %s" % ("target", "ours", "anchor", "ratio", "goal", "status")]
txt += ["%-46s %8s %8s %6s %8s  %s" % ((t[0].replace("`", ""),) + t[1:]) for t in targets]
with open(os.path.join(out, "perf.md"), "w") as f:
    f.write("\n".join(md) + "\n")
with open(os.path.join(out, "perf.txt"), "w") as f:
    f.write("\n".join(txt) + "\n")
PY

# ---------------------------------------------------------------- training commands
PRESETS=(none full selective attention)  # by importance: the budget may cut the last ones
# train_cmd PRESET [STEPS [LOG]] -> TRAIN: GPT-2 124M, B=8 T=1024, on the GPU, no evaluation,
# no samples, no checkpoint; one JSON object per step in LOG (default train_PRESET.jsonl).
train_cmd() {
  TRAIN=("$REMAT" train --device cuda --dtype bf16 --model gpt2 --batch 8 --seq 1024
         --steps "${2:-12}" --recompute "$1" --data "$DATA/train_*.bin" --val-data ""
         --eval-every 0 --sample-tokens 0 --out "" --log "${3:-$OUT/train_$1.jsonl}")
}
TORCH_CMD=("$PY" "$ROOT/bench/gpu/torch_gpt2.py" --batch 8 --seq 1024 --steps 15 --warmup 3
           --out "$OUT/torch_gpt2")
FLOPS_PER_TOKEN=803478528  # GPT-2 124M at T=1024: 6N + 6LCT, N = 124,475,904 (padded vocab)
SUMMARY_TITLE="GPT-2 124M training, B=8 T=1024, 12 steps"
SUMMARY_RUNS=()            # LABEL JSONL pairs for summarise.py

# `remat train --help` must list --device, --dtype and --attention (both modes).
HAVE_CUDNN=0
if [[ -x "$REMAT" ]]; then
  help=$("$REMAT" train --help 2>&1)
  for f in --device --dtype --attention; do
    if grep -q -- "^ *$f " <<<"$help"; then row "remat train --help lists $f" "ok" ""
    else row "remat train --help lists $f" "WARN" "not listed"; fi
  done
  # cuDNN's fused attention is in the build when the program links cuDNN.
  if ldd "$REMAT" 2>/dev/null | grep -q 'libcudnn\.'; then
    HAVE_CUDNN=1
    row "cuDNN attention (--attention cudnn)" "ok" "built: $(ldd "$REMAT" | grep -o 'libcudnn\.[^ ]* => [^ ]*' | head -n1)"
  else
    row "cuDNN attention (--attention cudnn)" "WARN" "not in this build (no cudnn-frontend headers when configured: scripts/setup.sh fetches them)"
  fi
fi

PLAN=(
  "ctest --test-dir $BUILD -L gpu --output-on-failure   (or directly: ${GPU_TESTS[*]})"
  "REMAT_GPU_TEST_SMALL=1 $SANITIZER --tool memcheck --error-exitcode 1 $BUILD/gpu_test_kernels_gpu"
  "REMAT_GPU_TEST_SMALL=1 $SANITIZER --tool racecheck --error-exitcode 1 $BUILD/gpu_test_kernels_gpu --gtest_filter=*LayerNorm*:*Attention*:*Classifier*:*GradNorm*"
  "$BUILD/gpu_bench_kernels --out $OUT/bench_kernels.md --csv $OUT/bench_kernels.csv"
  "$PY $OUT/sdpa_bench.py $OUT/sdpa.csv   (when torch imports)"
  "for P in ${PRESETS[*]}: $(train_cmd '$P'; show "${TRAIN[@]}")"
  "then with cuDNN's attention: $(train_cmd none 12 "$OUT/train_none_cudnn.jsonl"; show "${TRAIN[@]}" --attention cudnn)"
  "${TORCH_CMD[*]} --compile-scope model   (after none and full; blocks if under 130 s are left)"
)

if (( CPU_MODE )); then
  # ---------------------------------------------------------------- CPU mode: self-checks
  for t in "${GPU_TESTS[@]}"; do
    [[ -x "$BUILD/$t" ]] || continue
    step "$t (expect device tests to skip)" 120 "$OUT/$t.log" "$BUILD/$t"
    if [[ -f "$OUT/$t.log" ]]; then
      skipped=$(grep -c '^\[  SKIPPED \] ' "$OUT/$t.log" || true)
      said=$(grep -c 'no CUDA device: GPU test skipped' "$OUT/$t.log" || true)
      passed=$(sed -n 's/^\[  PASSED  \] \([0-9]*\) test.*/\1/p' "$OUT/$t.log")
      row "  $t" "info" "${passed:-0} passed without a device, $(( skipped / 2 )) skipped (${said} said why)"
      (( said == 0 )) && { row "  $t skip message" "FAILED" "no skip message"; FAILED=1; }
    fi
  done
  if [[ -x "$BUILD/gpu_bench_kernels" ]]; then
    "$BUILD/gpu_bench_kernels" --out "$OUT/bench_kernels.md" >"$OUT/bench_nodevice.log" 2>&1
    rc=$?
    if (( rc == 3 )); then row "gpu_bench_kernels without a device" "ok" "exits 3: $(head -c 80 "$OUT/bench_nodevice.log")"
    else row "gpu_bench_kernels without a device" "FAILED" "rc=$rc (expected 3)"; FAILED=1; fi
  fi
  pyfiles=("$OUT/sdpa_bench.py" "$OUT/summarise.py" "$ROOT/bench/gpu/torch_gpt2.py"
           "$ROOT/bench/gpu/make_shard.py")
  pyc=$(mktemp -d)
  if command -v "$PY" >/dev/null 2>&1 && "$PY" -c 'import py_compile, sys
for i, f in enumerate(sys.argv[2:]):
    py_compile.compile(f, cfile=f"{sys.argv[1]}/{i}.pyc", doraise=True)' \
      "$pyc" "${pyfiles[@]}" 2>"$OUT/py_compile.log"; then
    row "python files" "ok" "py_compile: sdpa_bench, summarise, torch_gpt2, make_shard"
  else
    row "python files" "FAILED" "see py_compile.log"; FAILED=1
  fi
  rm -rf "$pyc"
  if [[ -x "$REMAT" && -f "$DATA/train_000000.bin" ]]; then
    # The GPU training command, one step, on a machine without a GPU: it must refuse clearly.
    train_cmd none 1 "$OUT/train_nodevice.jsonl"
    timeout --kill-after=10 60 "${TRAIN[@]}" >"$OUT/train_nodevice.log" 2>&1
    rc=$?
    msg=$(grep -v '^ *$' "$OUT/train_nodevice.log" | tail -n1 | one_line 150)
    if (( rc == 124 || rc == 137 )); then
      row "remat train --device cuda, no GPU" "FAILED" "still running after 60s: should refuse"; FAILED=1
    elif (( rc == 0 )); then
      row "remat train --device cuda, no GPU" "FAILED" "exit 0 without a GPU"; FAILED=1
    elif grep -qi 'cuda\|gpu\|device' <<<"$msg"; then
      row "remat train --device cuda, no GPU" "info" "refused (rc=$rc): $msg"
    else
      row "remat train --device cuda, no GPU" "WARN" "rc=$rc, unclear message: $msg"
    fi
    # cuDNN's attention on the CPU backend: refused at once, naming --device cuda.
    timeout --kill-after=10 60 "$REMAT" train --device cpu --attention cudnn --model tiny \
      --vocab 50257 --steps 1 --data "$DATA/train_*.bin" --val-data "" --out "" \
      >"$OUT/train_cpu_cudnn.log" 2>&1
    rc=$?
    msg=$(grep -v '^ *$' "$OUT/train_cpu_cudnn.log" | tail -n1 | one_line 150)
    if (( rc != 0 && rc != 124 && rc != 137 )) && grep -q -- '--device cuda' <<<"$msg"; then
      row "remat train --device cpu --attention cudnn" "ok" "refused (rc=$rc): $msg"
    else
      row "remat train --device cpu --attention cudnn" "FAILED" "rc=$rc: $msg"; FAILED=1
    fi
    # The shard through the loader and the JSONL through the summary: a tiny CPU run.
    step "remat train on the shard (CPU, tiny, 4 steps)" 120 "$OUT/train_cpu_smoke.log" \
      "$REMAT" train --device cpu --model tiny --vocab 50257 --batch 2 --seq 64 --steps 4 \
      --data "$DATA/train_*.bin" --val-data "" --eval-every 0 --sample-tokens 0 --out "" \
      --log "$OUT/train_cpu_smoke.jsonl"
    SUMMARY_TITLE="CPU smoke training run (no GPU)"
    SUMMARY_RUNS+=("remat tiny, CPU, B=2 T=64" "$OUT/train_cpu_smoke.jsonl")
  fi
  FLOPS_PER_TOKEN=0
  if bash -n "$0"; then row "this script" "ok" "bash -n"; else row "this script" "FAILED" "bash -n"; FAILED=1; fi
  [[ -x "$SANITIZER" ]] && row "compute-sanitizer" "ok" "$SANITIZER" \
                        || row "compute-sanitizer" "info" "not on this machine (needed on the GPU one)"
  echo
  echo "On a GPU machine this script would run:"
  for c in "${PLAN[@]}"; do echo "  $c"; done
else
  # ---------------------------------------------------------------- GPU mode
  # ctest needs a build configured here; a carried folder (other paths) runs the programs.
  if grep -qF "$BUILD" "$BUILD/CTestTestfile.cmake" 2>/dev/null; then
    step "ctest -L gpu" 120 "$OUT/ctest_gpu.log" \
      ctest --test-dir "$BUILD" -L gpu --output-on-failure --timeout 100
  else
    for t in "${GPU_TESTS[@]}"; do step "$t" 60 "$OUT/$t.log" "$BUILD/$t"; done
  fi
  # compute-sanitizer refuses some machines' devices (seen on gVisor: "Device not supported"):
  # that is a skipped check, not a failed kernel.
  sanitizer_refused() {
    local rc=$1 logf=$2
    if (( rc != 0 && rc != 99 )) && grep -qiE "device not supported|error 999|not supported on this" "$logf"; then
      last_row "${3}" "SKIPPED" "compute-sanitizer refused this device: $(grep -m1 -iE 'not supported|error 999' "$logf" | one_line 90)"
      FAILED=$4
    fi
  }
  if [[ -x "$SANITIZER" ]]; then
    prev=$FAILED
    step "memcheck (small sizes)" 50 "$OUT/memcheck.log" env REMAT_GPU_TEST_SMALL=1 \
      "$SANITIZER" --tool memcheck --error-exitcode 1 "$BUILD/gpu_test_kernels_gpu"
    sanitizer_refused $? "$OUT/memcheck.log" "memcheck (small sizes)" "$prev"
    prev=$FAILED
    step "racecheck (small sizes)" 50 "$OUT/racecheck.log" env REMAT_GPU_TEST_SMALL=1 \
      "$SANITIZER" --tool racecheck --error-exitcode 1 "$BUILD/gpu_test_kernels_gpu" \
      '--gtest_filter=*LayerNorm*:*Attention*:*Classifier*:*GradNorm*'
    sanitizer_refused $? "$OUT/racecheck.log" "racecheck (small sizes)" "$prev"
  else
    row "compute-sanitizer" "MISSING" "$SANITIZER not found"; FAILED=1
  fi
  step "gpu_bench_kernels" 60 "$OUT/bench.log" "$BUILD/gpu_bench_kernels" \
    --out "$OUT/bench_kernels.md" --csv "$OUT/bench_kernels.csv"
  HAVE_TORCH=0
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1 && HAVE_TORCH=1
  if (( HAVE_TORCH )); then
    step "PyTorch SDPA (same shapes)" 45 "$OUT/sdpa.log" "$PY" "$OUT/sdpa_bench.py" "$OUT/sdpa.csv"
  else
    row "PyTorch SDPA" "SKIPPED" "torch with CUDA does not import"
  fi
  torch_anchor() {
    if (( ! HAVE_TORCH )); then row "PyTorch GPT-2 (torch.compile)" "SKIPPED" "torch with CUDA does not import"; return; fi
    # Whole-model compilation takes the longest; with little budget left compile per block.
    local scope=model; (( $(left) < 130 )) && scope=blocks
    step "PyTorch GPT-2 124M, torch.compile ($scope)" 150 "$OUT/torch_gpt2.log" \
      env PYTHONUNBUFFERED=1 "${TORCH_CMD[@]}" --compile-scope "$scope"
    local rc=$?
    (( rc != 0 && rc != 99 )) && row "  PyTorch GPT-2" "info" "$(tail -n1 "$OUT/torch_gpt2.log" | one_line)"
    grep -q 'falling back to eager' "$OUT/torch_gpt2.log" 2>/dev/null &&
      row "  PyTorch GPT-2" "WARN" "$(grep -m1 'torch.compile failed' "$OUT/torch_gpt2.log" | one_line 150)"
  }
  if [[ -x "$REMAT" ]]; then
    for P in "${PRESETS[@]}"; do
      [[ "$P" == selective ]] && torch_anchor  # the anchor right after none and full
      train_cmd "$P"
      # full and selective trace their 4th step (CUPTI kernel times): the overlap report goes
      # beside the trace (trace_P.overlap.json) and into the log; a timeline PNG follows.
      [[ "$P" == full || "$P" == selective ]] &&
        TRAIN+=(--trace "$OUT/trace_$P.json" --trace-steps 4:4)
      SUMMARY_RUNS+=("remat $P" "$OUT/train_$P.jsonl")
      prev=$FAILED
      step "train GPT-2 124M --recompute $P" 60 "$OUT/train_$P.log" "${TRAIN[@]}"
      rc=$?
      if (( rc != 0 && rc != 99 )) && grep -q "not available" "$OUT/train_$P.log"; then
        last_row "train GPT-2 124M" "SKIPPED" "remat train --device cuda not available yet"
        FAILED=$prev
        torch_anchor
        break
      fi
      (( rc != 0 && rc != 99 )) && row "  $P" "info" "$(tail -n1 "$OUT/train_$P.log" | one_line)"
      if [[ -f "$OUT/trace_$P.overlap.json" ]]; then
        row "  $P overlap" "info" "$(head -c 300 "$OUT/trace_$P.overlap.json" | one_line 200)"
        step "plot the $P trace" 20 "$OUT/plot_$P.log" "$PY" "$ROOT/profiling/plot_trace.py" \
          "$OUT/trace_$P.json" -o "$OUT/trace_$P.png" --step 4 \
          --title "GPT-2 124M B=8 T=1024 --recompute $P, step 4 ($GPU_NAME)"
      fi
    done
    # `none` again with cuDNN's fused attention, when built with it and `none` itself ran.
    if (( HAVE_CUDNN )) && [[ -s "$OUT/train_none.jsonl" ]]; then
      train_cmd none 12 "$OUT/train_none_cudnn.jsonl"
      TRAIN+=(--attention cudnn)
      SUMMARY_RUNS+=("remat none, cuDNN attention" "$OUT/train_none_cudnn.jsonl")
      step "train GPT-2 124M --recompute none --attention cudnn" 60 "$OUT/train_none_cudnn.log" \
        "${TRAIN[@]}"
      rc=$?
      (( rc != 0 && rc != 99 )) && row "  cudnn" "info" "$(tail -n1 "$OUT/train_none_cudnn.log" | one_line)"
    fi
    # The offload overhead: full recompute with every block input in pinned host memory
    # (copied out and fetched back on the copy stream), when `full` itself ran.
    if [[ -s "$OUT/train_full.jsonl" ]]; then
      train_cmd full 12 "$OUT/train_full_offload.jsonl"
      TRAIN+=(--offload input)
      SUMMARY_RUNS+=("remat full + offload input" "$OUT/train_full_offload.jsonl")
      step "train GPT-2 124M --recompute full --offload input" 60 "$OUT/train_full_offload.log" \
        "${TRAIN[@]}"
      rc=$?
      (( rc != 0 && rc != 99 )) && row "  offload" "info" "$(tail -n1 "$OUT/train_full_offload.log" | one_line)"
    fi
  else
    torch_anchor
  fi
fi

# ---------------------------------------------------------------- summary
"$PY" "$OUT/summarise.py" "$OUT" "$FLOPS_PER_TOKEN" "$SUMMARY_TITLE" "${SUMMARY_RUNS[@]}" >"$OUT/summarise.log" 2>&1 ||
  { row "summary of results" "FAILED" "see summarise.log"; FAILED=1; }
RESULT_CSVS=("$OUT/bench_kernels.csv")
[[ -f "$OUT/sdpa.csv" ]] && RESULT_CSVS+=("$OUT/sdpa.csv")
{
  echo "# gpu_check summary"
  echo
  if (( CPU_MODE )); then echo "mode: CPU (no GPU); CUDA built for sm_$ARCH"
  else echo "device: $GPU_NAME (compute capability $CAP), build: $BUILD"; fi
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ), wall: $(( $(date +%s) - START ))s"
  echo
  echo "| step | status | detail |"
  echo "| --- | --- | --- |"
  for r in "${SUMMARY_ROWS[@]}"; do IFS='|' read -r a b c <<<"$r"; echo "| $a | $b | $c |"; done
  if [[ -f "$OUT/bench_kernels.csv" ]]; then
    echo
    echo "## kernels (median, L2 flushed)"
    echo
    echo "| op | ms | rate | of copy BW |"
    echo "| --- | --- | --- | --- |"
    cat "${RESULT_CSVS[@]}" |
      awk -F, '{ f = ($5 >= 0) ? sprintf("%.0f%%", 100 * $5) : ""; printf "| %s | %.3f | %.1f %s | %s |\n", $1, $2, $3, $4, f }'
  fi
  if [[ -f "$OUT/perf.md" ]]; then echo; cat "$OUT/perf.md"; fi
} >"$OUT/summary.md"

echo
echo "gpu_check: logs and summary.md in $OUT$( (( PACK )) && echo " (the rest packed into gpu_check_logs.tar.gz)")"
printf '%-46s %-8s %s\n' "step" "status" "detail"
for r in "${SUMMARY_ROWS[@]}"; do IFS='|' read -r a b c <<<"$r"; printf '%-46s %-8s %s\n' "$a" "$b" "$c"; done
if [[ -f "$OUT/bench_kernels.csv" ]]; then
  echo
  cat "${RESULT_CSVS[@]}" |
    awk -F, '{ f = ($5 >= 0) ? sprintf("%4.0f%% of copy", 100 * $5) : ""; printf "%-46s %9.3f ms %8.1f %-8s %s\n", $1, $2, $3, $4, f }'
fi
if [[ -f "$OUT/perf.txt" ]]; then echo; cat "$OUT/perf.txt"; fi

if (( PACK )); then  # everything but summary.md into one archive; the shards are dropped
  rm -rf "$DATA"
  tgz=$(mktemp --suffix=.tar.gz)
  tar -czf "$tgz" -C "$OUT" --exclude=./summary.md . &&
    find "$OUT" -mindepth 1 -maxdepth 1 ! -name summary.md -exec rm -rf {} + &&
    chmod 644 "$tgz" && mv "$tgz" "$OUT/gpu_check_logs.tar.gz" || { echo "gpu_check: --pack failed" >&2; FAILED=1; }
fi
exit $FAILED
