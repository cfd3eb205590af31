#!/usr/bin/env bash
# The tools the tests run besides .venv: Debian's Prometheus (`prometheus` and `promtool`,
# for tests/test_deploy_prometheus.py). Run by `make test`; a no-op when both are on PATH.
# Installs with apt-get, as root or through sudo; no service is started (the package's
# postinst finds no systemd in a container, and the tests start their own server).
# Where it cannot install (no apt-get, no root and no sudo) it says so and goes on: those
# tests then skip, naming the fix (under CI, CI=1, they fail).
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
cannot() {
  echo "test-tools: $1: install Prometheus 2.x (prometheus, promtool) by hand," \
    "or the deploy tests skip" >&2
  exit 0
}
command -v apt-get >/dev/null 2>&1 || cannot "no apt-get here"
as_root=()
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || cannot "not root and no sudo"
  as_root=(sudo)
fi
echo "test-tools: installing Debian's prometheus (for tests/test_deploy_prometheus.py)"
${as_root[@]+"${as_root[@]}"} apt-get update -qq
${as_root[@]+"${as_root[@]}"} env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends prometheus
