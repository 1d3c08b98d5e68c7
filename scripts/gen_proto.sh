#!/usr/bin/env bash
# Regenerate the Python protobuf/gRPC code from proto/ into ef21_wire/v1/ (committed, never edited by hand).
# --check: regenerate into a temporary folder and fail if the committed files differ.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
out=.
if [ "${1:-}" = "--check" ]; then out=$(mktemp -d); trap 'rm -rf "$out"' EXIT; fi
"$PY" -m grpc_tools.protoc -I proto --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  proto/ef21_wire/v1/ef21.proto
if [ "${1:-}" = "--check" ]; then
  for f in ef21_pb2.py ef21_pb2.pyi ef21_pb2_grpc.py; do
    if ! cmp -s "$out/ef21_wire/v1/$f" "ef21_wire/v1/$f"; then
      echo "ef21_wire/v1/$f is out of date with proto/: run scripts/gen_proto.sh" >&2
      exit 1
    fi
  done
  echo "generated protobuf code is up to date"
fi
