#!/usr/bin/env bash
# Roll a delta set out to every replica of a Helm release, all or nothing:
#
#   deploy/k8s/rollout.sh [-n NAMESPACE] [--token-file PATH] [--no-canary] RELEASE NAME [NAME...]
#   deploy/k8s/rollout.sh [-n NAMESPACE] RELEASE none          # base weights everywhere
#
# Finds the release's running pods, then runs `vsp deltas rollout` inside the first of them
# (one `kubectl exec`): it reaches every pod at its pod IP, checks the set on every replica
# without switching, switches them one at a time, each with its canary, and if any replica
# fails it switches back those already switched. The admin token never leaves the cluster:
# the command reads the token file the pod mounts (--token-file: its path in the pod).
# Pod-to-pod traffic on the server port must be allowed (NetworkPolicy).
#
# Exit 0: every replica serves the set; 1: it failed, no replica changed (the output names
# the replica and the reason); 3: a rollback failed too (the output says where).
# A hot switch lasts until a pod restarts: on success this prints the `helm upgrade` that
# makes the release's values say the same, so a restarted pod serves what the fleet serves.
set -euo pipefail

usage="usage: $0 [-n NAMESPACE] [--token-file PATH] [--no-canary] RELEASE NAME [NAME...]   (NAME 'none' = base weights)"
namespace=()
token_file=/var/run/secrets/vsp/admin-token
options=()
while [ $# -gt 0 ]; do
  case "$1" in
    -n|--namespace)
      [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
      namespace=(-n "$2"); shift 2 ;;
    --token-file)
      [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
      token_file=$2; shift 2 ;;
    --no-canary)
      options+=(--no-canary); shift ;;
    -h|--help)
      echo "$usage"; exit 0 ;;
    -*)
      echo "rollout: unknown option $1" >&2; echo "$usage" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [ $# -lt 2 ]; then
  echo "$usage" >&2
  exit 2
fi
release=$1
shift

selector="app.kubernetes.io/name=vllm-safety-patch,app.kubernetes.io/instance=$release"
pods=$(kubectl get pods "${namespace[@]}" -l "$selector" --field-selector=status.phase=Running \
  -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.status.podIP}{" "}{.spec.containers[?(@.name=="vsp")].ports[0].containerPort}{"\n"}{end}')

replicas=()
first=""
while read -r name ip port; do
  [ -n "$name" ] || continue
  [ -n "$ip" ] || { echo "rollout: pod $name has no IP yet; retry when it is ready" >&2; exit 1; }
  case "$ip" in *:*) ip="[$ip]" ;; esac  # IPv6
  replicas+=(--url "http://$ip:${port:-8000}" --name "$name")
  [ -n "$first" ] || first=$name
done <<< "$pods"
if [ -z "$first" ]; then
  echo "rollout: no running pods of release '$release' (selector $selector)" >&2
  exit 1
fi

status=0
kubectl exec "${namespace[@]}" "$first" -c vsp -- \
  vsp deltas rollout "$@" "${replicas[@]}" --token-file "$token_file" "${options[@]}" || status=$?
if [ "$status" -eq 0 ]; then
  names=$(IFS=,; echo "$*")
  echo "rollout: to keep this set across pod restarts, make the release's values say it:"
  echo "  helm upgrade $release deploy/k8s/vllm-safety-patch ${namespace[*]} --reuse-values --set deltas=$names"
fi
exit "$status"
