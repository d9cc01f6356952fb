#!/usr/bin/env bash
# The layers of ../shared/DESIGN.md point down only: every #include "<layer>/..." in a layer's
# sources names that layer or one it may use. Fails listing each include that points up.
set -uo pipefail
root="${1:-$(dirname "$0")/..}"
cd "$root" || exit 2
declare -A allowed=(
  [base]="base"
  [kernels]="kernels base"
  [io]="io base"
  [runtime]="runtime kernels base"
  [profiling]="profiling runtime kernels base"
  [models]="models runtime io kernels base"
  [app]="app models profiling runtime io kernels base"
)
bad=0
for layer in "${!allowed[@]}"; do
  while IFS= read -r line; do
    file="${line%%:*}"
    target="$(sed -E 's/.*#include "([a-z_]+)\/.*/\1/' <<<"$line")"
    case " ${allowed[$layer]} " in
      *" $target "*) ;;
      *) echo "layer $layer may not include $target/: $line"; bad=1 ;;
    esac
  done < <(grep -rnE '^#include "[a-z_]+/' "$layer" --include='*.h' --include='*.cpp' \
             --include='*.cu' --include='*.cuh' 2>/dev/null)
done
# runtime/ names no model.
if grep -rniE 'gpt-?2|llama|qwen|mistral' runtime --include='*.h' --include='*.cpp' \
     --include='*.cu'; then
  echo "runtime/ names a model (above)"
  bad=1
fi
[ "$bad" -eq 0 ] && echo "ok: every include points down; runtime/ names no model"
exit "$bad"
