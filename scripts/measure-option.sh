#!/usr/bin/env bash
# Measure an option already solved by scripts/try-option.sh (its solve kept in
# build/options/NAME) on the development choice rows again, e.g. after a measurement was
# stopped; appends to build/options/summary.jsonl and prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
for name in "$@"; do
  out=build/options/$name
  ls "$out"/*.safetensors > /dev/null || { echo "no solved option in $out" >&2; exit 2; }
  .venv/bin/vsp measure "$out"/*.safetensors --no-write --samples "$out/samples" \
    --multijail-rows 120-160 --everyday-split val --harmless-val 0 --mgsm-rows 200-200 \
    --summary build/options/summary.jsonl
done
.venv/bin/python -m vllm_safety_patch.eval.options_table build/options/summary.jsonl
