#!/usr/bin/env bash
# ip, tc (iproute2) and Debian's iptables: tests/netns.py builds network namespaces with them for the network
# fault tests (tests/test_network_faults.py) and benchmarks/liveness.py's smoke run.
set -euo pipefail
command -v ip >/dev/null && command -v tc >/dev/null && command -v iptables >/dev/null && exit 0
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends iproute2 iptables >/dev/null
iptables --version
