#!/usr/bin/env bash
# One development option, both sides: solve deltas/options/NAME.toml (its groups) into
# build/options/NAME, measure it on the development choice rows (MultiJail 120-159, everyday
# val, no MGSM) and append its figures to build/options/summary.jsonl; then print every option
# measured so far, one line per option and side:
#
#   bash scripts/try-option.sh paper [more names...]
#
# Nothing here touches the shipped deltas or the held-out test rows.
set -euo pipefail
cd "$(dirname "$0")/.."
for name in "$@"; do
  config=deltas/options/$name.toml
  out=build/options/$name
  [ -f "$config" ] || { echo "no option config $config" >&2; exit 2; }
  rm -rf "$out"
  # Statistics are kept in build/solve-stats: an option that changes only solve settings
  # (weights, rank, ridge) against one solved before skips its forward passes.
  .venv/bin/vsp solve --config "$config" --out "$out" --stats-cache build/solve-stats
  bash scripts/measure-option.sh "$name"
done
