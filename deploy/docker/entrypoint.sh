#!/usr/bin/env bash
# Container entry point: the image's environment -> one `vsp serve` command line.
#
#   VSP_MODEL             checkpoint folder (baked at build time, or a mount)
#   VSP_DELTA_DIR         folder of named deltas (baked, or a mount)
#   VSP_DELTAS            all | none | NAME[,NAME...]  (read by vsp serve itself)
#   VSP_ADMIN_TOKEN_FILE  admin token file (compose secret, Kubernetes Secret); an empty
#                         file, like an unset variable, leaves the admin routes off (403)
#   VSP_ADMIN_TOKEN       the token itself, when no file is used
#   VSP_HOST, VSP_PORT    where to listen (0.0.0.0:8000)
# Arguments go to vLLM unchanged (e.g. --max-model-len 4096 --tensor-parallel-size 2), with
# or without a leading `--` (`docker run IMAGE -- --max-model-len 8192`).
set -euo pipefail

fail() {
  echo "vsp-entrypoint: $1" >&2
  exit 2
}

model=${VSP_MODEL:?VSP_MODEL is not set: name the checkpoint folder}
delta_dir=${VSP_DELTA_DIR:?VSP_DELTA_DIR is not set: name the folder of delta files}
[ -f "$model/config.json" ] \
  || fail "no model at $model (no config.json): mount a prepared checkpoint there (vsp model prepare), set VSP_MODEL, or build the image with --build-arg PREPARE_MODEL=1"
[ -d "$delta_dir" ] \
  || fail "no delta folder $delta_dir: mount one there or set VSP_DELTA_DIR (VSP_DELTAS=none serves base weights)"

args=(serve --model "$model" --delta-dir "$delta_dir"
  --host "${VSP_HOST:-0.0.0.0}" --port "${VSP_PORT:-8000}")

token_file=${VSP_ADMIN_TOKEN_FILE:-}
if [ -n "$token_file" ]; then
  [ -f "$token_file" ] || fail "VSP_ADMIN_TOKEN_FILE=$token_file does not exist: mount the secret or unset the variable"
  if [ -s "$token_file" ]; then
    args+=(--admin-token-file "$token_file")
  else
    # Compose makes an empty secret when VSP_ADMIN_TOKEN is unset on the host.
    echo "vsp-entrypoint: $token_file is empty: admin routes are off (403); set a token to hot-patch" >&2
  fi
fi
# An empty variable (compose's ${VSP_ADMIN_TOKEN:-}) means "no token", not a bad token.
[ -n "${VSP_ADMIN_TOKEN:-}" ] || unset VSP_ADMIN_TOKEN

# The `--` below already separates vLLM's arguments; a second one would reach vLLM.
if [ "${1:-}" = "--" ]; then
  shift
fi
exec vsp "${args[@]}" -- "$@"
