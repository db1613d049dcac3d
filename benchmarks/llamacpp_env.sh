#!/usr/bin/env bash
# A separate venv with llama-cpp-python built from its source package, for
# benchmarks/export_llamacpp.py (which never imports polymodal or torch).
#
#   benchmarks/llamacpp_env.sh [VENV]        # default benchmarks/.llamacpp-venv
#
# Idempotent: when VENV's python already imports llama_cpp, nothing is done.
# The build takes about 8 minutes on one core (CMAKE_BUILD_PARALLEL_LEVEL=1 keeps a shared
# machine usable); run it under `flock /tmp/cpu.lock nice -n 19` where others share the CPU.
set -euo pipefail

venv="${1:-$(dirname "$0")/.llamacpp-venv}"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
    echo "llama-cpp-python already in $venv: $("$venv/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)')"
    exit 0
fi

# The CPU's own flags decide the instruction sets, never an assumption: GGML_NATIVE=ON was
# tried and is off on purpose: on a VM whose CPU reports AMX, the native build used AMX and
# segfaulted in llama_decode (llama-cpp-python 0.3.36); AMX is therefore always off.
flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
has() { [[ "$flags" == *" $1 "* ]] && echo ON || echo OFF; }
cmake_args="-DGGML_NATIVE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF"
cmake_args+=" -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c)"
cmake_args+=" -DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VNNI=$(has avx512_vnni)"
cmake_args+=" -DGGML_AVX512_BF16=$(has avx512_bf16) -DGGML_AVX_VNNI=$(has avx_vnni)"
cmake_args+=" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
echo "building llama-cpp-python into $venv with: $cmake_args"

python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-1}" CMAKE_ARGS="$cmake_args" \
    "$venv/bin/pip" install --no-binary llama-cpp-python llama-cpp-python
"$venv/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
