#!/usr/bin/env python3
"""Makes tests/fixtures/llamacpp: a GGUF written by llama.cpp itself and llama.cpp's logits on it.

Usage: make_llamacpp_fixture.py MIXTRAL_Q_BINARY
Needs: pip install llama-cpp-python safetensors numpy

- tiny-f32 GGUF: `mixtral-q quantize --type f32` of models/tiny-mixtral (temporary)
- tiny-q4_k_m.gguf: llama.cpp's `llama_model_quantize` (Q4_K_M) of it: a file written by llama.cpp
- logits.safetensors: llama.cpp's logits on every fixture case, for both files (`<case>.f32`, `<case>.q4_k_m`)
- llamacpp.json: llama.cpp's own relative error and top-1 agreement against transformers, per case
The tests check that mixtral-q reads llama.cpp's file and that both engines agree.
"""
import ctypes
import json
import os
import subprocess
import sys
import tempfile

import llama_cpp
import numpy as np
from safetensors.numpy import load_file, save_file

repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
out_dir = os.path.join(repo, "tests/fixtures/llamacpp")
os.makedirs(out_dir, exist_ok=True)
tmp = tempfile.mkdtemp()
f32 = os.path.join(tmp, "tiny-f32.gguf")
subprocess.run([sys.argv[1], "quantize", os.path.join(repo, "models/tiny-mixtral"), "-o", f32, "--type", "f32"], check=True)
q4 = os.path.join(out_dir, "tiny-q4_k_m.gguf")
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
assert llama_cpp.llama_model_quantize(f32.encode(), q4.encode(), ctypes.byref(params)) == 0

ref = json.load(open(os.path.join(repo, "tests/fixtures/reference.json")))
ref_logits = load_file(os.path.join(repo, "tests/fixtures/reference.safetensors"))
logits, summary = {}, {"llama_cpp_version": llama_cpp.__version__, "cases": {}}
for label, path in (("f32", f32), ("q4_k_m", q4)):
    llm = llama_cpp.Llama(model_path=path, logits_all=True, n_ctx=512, n_threads=1, verbose=False)
    for c in ref["cases"]:
        case, ids = c["name"], c["input_ids"]
        llm.reset()
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)], dtype=np.float32)
        logits[f"{case}.{label}"] = got
        want = ref_logits[f"{case}.logits_f64"]
        summary["cases"].setdefault(case, {})[label] = {
            "rel_error": float(np.linalg.norm(got - want) / np.linalg.norm(want)),
            "top1_agreement": float(np.mean(got.argmax(1) == want.argmax(1))),
        }
    del llm
save_file(logits, os.path.join(out_dir, "logits.safetensors"))
json.dump(summary, open(os.path.join(out_dir, "llamacpp.json"), "w"), indent=1)
print(json.dumps(summary, indent=1))
