#!/usr/bin/env bash
# Hot-patch every replica of a release: runs `vsp deltas activate` inside each running pod
# against its own loopback, with the token file the pod already mounts. A call through the
# Service would reach one replica only.
#
#   deploy/k8s/hotpatch-all.sh [-n NAMESPACE] RELEASE NAME [NAME...]   # or: RELEASE none
#
# Exits non-zero when any pod failed (the others keep the new set: run it again, or roll
# back with the previous names). A hot-patch lasts until the pod restarts: set `deltas` in
# the release's values as well (helm upgrade --reuse-values --set deltas=NAME).
set -euo pipefail

namespace=()
if [ "${1:-}" = -n ]; then
  [ $# -ge 2 ] || { echo "usage: $0 [-n NAMESPACE] RELEASE NAME [NAME...]" >&2; exit 2; }
  namespace=(-n "$2")
  shift 2
fi
if [ $# -lt 2 ]; then
  echo "usage: $0 [-n NAMESPACE] RELEASE NAME [NAME...]   (NAME 'none' = base weights)" >&2
  exit 2
fi
release=$1
shift

selector="app.kubernetes.io/name=vllm-safety-patch,app.kubernetes.io/instance=$release"
pods=$(kubectl get pods "${namespace[@]}" -l "$selector" --field-selector=status.phase=Running \
  -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
if [ -z "$pods" ]; then
  echo "hotpatch-all: no running pods of release '$release' (selector $selector)" >&2
  exit 1
fi

failed=()
for pod in $pods; do
  echo "== $pod"
  if ! kubectl exec "${namespace[@]}" "$pod" -c vsp -- \
    vsp deltas activate "$@" --url http://127.0.0.1:8000 \
    --token-file /var/run/secrets/vsp/admin-token; then
    failed+=("$pod")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "hotpatch-all: failed on ${failed[*]}" >&2
  exit 1
fi
echo "hotpatch-all: $(echo "$pods" | wc -l) pod(s) now serve: $*"
