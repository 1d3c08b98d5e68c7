#!/usr/bin/env bash
# Headless Chromium (Debian's) drives the dashboard in tests/test_dashboard.py; no browser is downloaded.
set -euo pipefail
command -v chromium >/dev/null && exit 0
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
chromium --version
