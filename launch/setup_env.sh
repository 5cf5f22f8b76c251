# Sourced by quickstart.sh and test.sh: make .venv once, install requirements.txt, activate it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# llama-cpp-python builds llama.cpp from source (docs/export.md): its CPU backend only, for any x86-64 CPU (the
# cached wheel may serve another machine), without llama.cpp's examples, tools, server, tests, multimodal library
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_SSE42=OFF -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_BMI2=OFF \
-DGGML_FMA=OFF -DGGML_F16C=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
# quiet when nothing changed; requirements.txt pins torch to the CPU-available 2.13.0
python -m pip install --disable-pip-version-check -q -r requirements.txt
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
