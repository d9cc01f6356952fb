#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz/fuzz_*.cpp) and the seed generator with clang and
# -fsanitize=fuzzer,address,undefined, compiling only the remat sources the readers need.
# Independent of CMake: it writes a small build.ninja and runs ninja, so rebuilds are
# incremental.
#   FUZZ_BUILD_DIR  output directory (default: build-fuzz in the repository root)
#   FUZZ_CXX        the compiler (default: clang++, then clang++-14)
#   FUZZ_JOBS       parallel jobs (default: 2)
# Prints the build directory's path on its last line.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${FUZZ_BUILD_DIR:-$root/build-fuzz}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

cxx="${FUZZ_CXX:-}"
if [ -z "$cxx" ]; then
  for c in clang++ clang++-14; do
    if command -v "$c" >/dev/null; then cxx="$c"; break; fi
  done
fi
if [ -z "$cxx" ]; then
  echo "fuzz/build.sh: clang++ not found (libFuzzer needs clang; apt-get install clang)" >&2
  exit 1
fi

# The readers of outside bytes and what they use; nothing that trains.
sources=(io/llmc_model.cpp io/shards.cpp io/tokenizer.cpp io/train_state.cpp
         io/atomic_file.cpp app/cli.cpp io/config.cpp io/params.cpp base/bytes.cpp
         runtime/plan.cpp io/safetensors.cpp io/hf_tokenizer.cpp)
targets=()
for f in "$root"/tests/fuzz/fuzz_*.cpp; do targets+=("$(basename "$f" .cpp)"); done

flags="-std=c++17 -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined"
flags="$flags -fno-sanitize-recover=all -I$root"
{
  echo "cxx = $cxx"
  echo "flags = $flags"
  echo "rule cc"
  echo "  command = \$cxx \$flags \$sflags -MMD -MF \$out.d -c \$in -o \$out"
  echo "  depfile = \$out.d"
  echo "  deps = gcc"
  echo "  description = CXX \$out"
  echo "rule link"
  echo "  command = \$cxx \$flags \$lflags \$in -o \$out -lpcre2-8"
  echo "  description = LINK \$out"
  objs=()
  for s in "${sources[@]}"; do
    o="obj/${s//\//_}.o"
    objs+=("$o")
    echo "build $o: cc $root/$s"
    echo "  sflags = -fsanitize=fuzzer-no-link"
  done
  for t in "${targets[@]}"; do
    echo "build obj/$t.o: cc $root/tests/fuzz/$t.cpp"
    echo "  sflags = -fsanitize=fuzzer-no-link"
    echo "build $t: link obj/$t.o ${objs[*]}"
    echo "  lflags = -fsanitize=fuzzer"
  done
  echo "build obj/make_seeds.o: cc $root/tests/fuzz/make_seeds.cpp"
  echo "  sflags = -fsanitize=fuzzer-no-link"
  echo "build make_seeds: link obj/make_seeds.o ${objs[*]}"
  echo "  lflags = -fsanitize=fuzzer-no-link"
} >"$out/build.ninja.new"
# Replace only on change, so ninja does not rebuild everything for an identical file.
if ! cmp -s "$out/build.ninja.new" "$out/build.ninja" 2>/dev/null; then
  mv "$out/build.ninja.new" "$out/build.ninja"
else
  rm "$out/build.ninja.new"
fi
ninja -C "$out" -j "${FUZZ_JOBS:-2}" >&2
echo "$out"
