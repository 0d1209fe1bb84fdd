#!/usr/bin/env bash
# Makes tests/fixtures/rustdoc-mixtral/llama-imatrix.{gguf,dat}: llama.cpp's own importance matrix of the
# trained demo model, which tests/imatrix.rs compares ours with.
#
# Usage: quantize/make_llamacpp_imatrix.sh MIXTRAL_Q_BINARY LLAMA_BIN_DIR
# LLAMA_BIN_DIR holds llama-imatrix, built from the llama.cpp sources vendored in llama-cpp-python's
# sdist (0.3.36: llama.cpp 0c1e570): cmake -B build -DLLAMA_CURL=OFF && cmake --build build --target llama-imatrix
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
fixture="$repo/tests/fixtures/rustdoc-mixtral"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$1" quantize "$repo/models/rustdoc-mixtral" -o "$tmp/f32.gguf" --type f32
cd "$repo"  # the dataset name recorded in the files is this relative path
for fmt in gguf dat; do
    "$2/llama-imatrix" -m "$tmp/f32.gguf" -f tests/fixtures/rustdoc-mixtral/calibration.txt -c 256 --chunks 20 \
        --output-format "$fmt" -o "$fixture/llama-imatrix.$fmt"
done
