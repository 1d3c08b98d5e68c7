#!/usr/bin/env bash
# promtool (Debian's prometheus package) checks the master's /metrics in tests/test_metrics.py.
set -euo pipefail
command -v promtool >/dev/null && exit 0
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d keeps the package from starting a Prometheus server on machines that would.
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
promtool --version | head -1
