#!/usr/bin/env bash
# Generates the Go stubs of llmcluster from protos/ with protoc-gen-go and
# protoc-gen-go-grpc, and builds the example client in GOPATH mode (offline, against
# Debian's golang-google-grpc-dev / golang-google-protobuf-dev in /usr/share/gocode).
#
# The stubs land where their go_package import path resolves in GOPATH mode:
#   gen/src/github.com/llmcluster/llmcluster/gen/go/llmcluster/v1/*.pb.go
#
# protoc: the first of $PROTOC, `protoc` on PATH, or `python3 -m grpc_tools.protoc`
# (pip install grpcio-tools); $PYTHON picks the interpreter for the latter.
#
# Usage: ./generate.sh [PROTO_DIR]    -> bin/llmcluster-go-client
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
proto_dir="$(cd "${1:-$here/../../../protos}" && pwd)"
cd "$here"

if [[ -n "${PROTOC:-}" ]]; then
  protoc=($PROTOC)
elif command -v protoc >/dev/null 2>&1; then
  protoc=(protoc)
else
  protoc=("${PYTHON:-python3}" -m grpc_tools.protoc)
fi

rm -rf gen bin
mkdir -p gen/src bin
(cd "$proto_dir" && "${protoc[@]}" -I. \
  --go_out="$here/gen/src" --go-grpc_out="$here/gen/src" \
  llmcluster/v1/*.proto)

# GOPATH mode: our generated package first, then the Debian Go packages.
export GO111MODULE=off
export GOPATH="$here/gen:${GOCODE:-/usr/share/gocode}"
export GOFLAGS="${GOFLAGS:-}"
go build -o bin/llmcluster-go-client .
echo "built $here/bin/llmcluster-go-client from $proto_dir"
