#!/usr/bin/env python3
"""Makes tests/fixtures/rustdoc-mixtral/rustdoc-q4_k_m.gguf: llama.cpp's Q4_K_M of the trained demo model.

Usage: make_rustdoc_q4_k_m.py MIXTRAL_Q_BINARY
Needs: pip install llama-cpp-python

`mixtral-q quantize --type f32` of models/rustdoc-mixtral (temporary), then llama.cpp's own
`llama_model_quantize` (Q4_K_M) of that file. tests/demo_model.rs scores it with our engine beside our
Q4_K file: perplexity increase and KL divergence from the f32 model.
"""
import ctypes
import os
import subprocess
import sys
import tempfile

import llama_cpp

repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
out = os.path.join(repo, "tests/fixtures/rustdoc-mixtral/rustdoc-q4_k_m.gguf")
with tempfile.TemporaryDirectory() as tmp:
    f32 = os.path.join(tmp, "rustdoc-f32.gguf")
    subprocess.run([sys.argv[1], "quantize", os.path.join(repo, "models/rustdoc-mixtral"), "-o", f32, "--type", "f32"], check=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert llama_cpp.llama_model_quantize(f32.encode(), out.encode(), ctypes.byref(params)) == 0
print(f"wrote {out} ({os.path.getsize(out) / 2**20:.2f} MiB) with llama.cpp {llama_cpp.__version__}")
