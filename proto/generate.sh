#!/usr/bin/env bash
# Regenerates pdserve_pb2.py, pdserve_pb2.pyi and pdserve_pb2_grpc.py from pdserve.proto.
#
# The .proto is compiled from a staging folder that mirrors the installed package path
# (pdserve/proto/pdserve.proto), so the generated gRPC module imports
# `from pdserve.proto import pdserve_pb2` and the descriptor is registered under a
# name that cannot clash with another package's pdserve.proto.
#
# Usage (from anywhere): proto/generate.sh   [PYTHON defaults to the repo's .venv]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-$here/../.venv/bin/python}"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/pdserve/proto"
cp "$here/pdserve.proto" "$stage/pdserve/proto/"
"$python" -m grpc_tools.protoc -I "$stage" \
    --python_out="$stage" --pyi_out="$stage" --grpc_python_out="$stage" \
    "$stage/pdserve/proto/pdserve.proto"
cp "$stage"/pdserve/proto/pdserve_pb2.py "$stage"/pdserve/proto/pdserve_pb2.pyi \
    "$stage"/pdserve/proto/pdserve_pb2_grpc.py "$here/"
