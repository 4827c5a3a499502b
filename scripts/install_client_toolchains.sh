#!/usr/bin/env bash
# Installs what the polyglot client tests need (tests/test_clients.py, tests/test_buf.py):
#   - Go: Debian's golang-go, the gRPC and protobuf Go sources (GOPATH mode, offline) and
#     the protoc-gen-go / protoc-gen-go-grpc plugins;
#   - Node: `npm ci` in examples/clients/node (@grpc/grpc-js, protobuf-ts, the `openai`
#     client the HTTP gateway's Node test drives, and buf, which the buf tests use too);
#   - Debian's chromium, which the HTTP gateway's playground test drives headless through
#     Playwright (the pinned Python package, from the dev extras; it never downloads a browser).
# Idempotent and quiet: does nothing when everything is there. It never fails the caller:
# where apt or npm cannot run, it says so and the tests skip with the reason.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
log="$(mktemp -t llmcluster-toolchains.XXXXXX)"
trap 'rm -f "$log"' EXIT

note() { echo "install_client_toolchains: $*" >&2; }

# golang-github-golang-protobuf-1-5-dev: grpc-go's codec goes through the
# github.com/golang/protobuf API, and only its 1.5 line (a shim over
# google.golang.org/protobuf) can marshal the messages protoc-gen-go 1.28 generates;
# naming it makes apt pick it over the 1.3 line grpc-dev would pull in otherwise.
go_packages=(golang-go golang-google-grpc-dev golang-google-protobuf-dev
  golang-github-golang-protobuf-1-5-dev protoc-gen-go protoc-gen-go-grpc)
browser_packages=(chromium)

# apt_install WHAT PACKAGE...: installs the missing ones; says what skips where it cannot.
apt_install() {
  local what="$1" missing=() pkg
  shift
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
      || missing+=("$pkg")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if ! command -v apt-get >/dev/null 2>&1; then
    note "no apt-get: $what will skip"
    return 0
  fi
  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    if sudo -n true 2>/dev/null; then sudo=(sudo -n); else
      note "not root and no passwordless sudo: $what will skip"
      return 0
    fi
  fi
  # Say what goes onto the system before it does (set LLMCLUSTER_SKIP_TOOLCHAINS=1 to
  # skip: those tests then skip with the reason).
  note "installing system packages for $what with apt-get: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y -qq \
    --no-install-recommends "$@"; } >"$log" 2>&1; then
    note "apt-get install failed ($what will skip):"
    tail -n 5 "$log" >&2
  fi
}

install_node() {
  local dir="$root/examples/clients/node"
  if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
    note "no node/npm: Node client and buf tests will skip"
    return 0
  fi
  # npm writes node_modules/.package-lock.json on every install: newer than the lock
  # file means node_modules matches it.
  if [[ -x "$dir/node_modules/.bin/buf" && "$dir/node_modules/.package-lock.json" -nt "$dir/package-lock.json" ]]; then
    return 0
  fi
  note "installing the Node client's packages into $dir/node_modules (npm ci)"
  if ! (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error) >"$log" 2>&1; then
    note "npm ci failed (Node client and buf tests will skip):"
    tail -n 5 "$log" >&2
  fi
}

if [[ "${LLMCLUSTER_SKIP_TOOLCHAINS:-}" == 1 ]]; then
  note "LLMCLUSTER_SKIP_TOOLCHAINS=1: not installing; the Go, Node, buf and browser tests will skip"
  exit 0
fi
apt_install "Go client tests" "${go_packages[@]}"
apt_install "the playground's browser test" "${browser_packages[@]}"
install_node
exit 0
