#!/usr/bin/env bash
# PyTorch for the [torch] extra (the adapter's tests, the digits examples, benchmarks/vs_ddp.py): the CPU wheel,
# pinned, into the project's venv before `pip install -e '.[...,torch]'`, so that pip finds torch already
# satisfied instead of resolving `torch>=2.1` to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/pip install --quiet torch==2.13.0
