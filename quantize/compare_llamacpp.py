#!/usr/bin/env python3
"""Quantization quality of mixtral-q against llama.cpp, tensor by tensor.

Usage: compare_llamacpp.py F32.gguf OURS.gguf [--llama-out LLAMA.gguf] [--json]

F32.gguf is `mixtral-q quantize --type f32` of a checkpoint, OURS.gguf is `mixtral-q quantize`
(default q4_k) of the same checkpoint. The script quantizes F32.gguf with llama.cpp's own quantizer
(`llama_model_quantize`, Q4_K_M, from `pip install llama-cpp-python`), then prints for every tensor the
relative RMSE ||dequant(W) - W|| / ||W|| of both files against F32.gguf, and the mean over the tensors
that both store as Q4_K (the like-for-like comparison).
"""
import argparse
import ctypes
import json
import os
import sys
import tempfile

import numpy as np
import gguf


def tensors(path):
    r = gguf.GGUFReader(path)
    return {t.name: t for t in r.tensors}


def dequant(t):
    return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).ravel()


def llama_quantize(src, dst):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        sys.exit(f"llama_model_quantize failed with {rc}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("f32")
    ap.add_argument("ours")
    ap.add_argument("--llama-out")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    llama_out = a.llama_out or os.path.join(tempfile.mkdtemp(), "llama-q4_k_m.gguf")
    if not os.path.exists(llama_out):
        llama_quantize(a.f32, llama_out)
    ref, ours, theirs = tensors(a.f32), tensors(a.ours), tensors(llama_out)
    rows = []
    for name, t in ref.items():
        w = dequant(t)
        norm = np.linalg.norm(w) or 1.0
        row = {"name": name}
        for side, ts in (("ours", ours), ("llama", theirs)):
            q = ts[name]
            row[side + "_type"] = q.tensor_type.name
            row[side + "_rel_rmse"] = float(np.linalg.norm(dequant(q) - w) / norm)
        rows.append(row)
    both = [r for r in rows if r["ours_type"] == r["llama_type"] == "Q4_K"]
    summary = {
        "tensors_both_q4_k": len(both),
        "mean_rel_rmse_ours": float(np.mean([r["ours_rel_rmse"] for r in both])) if both else None,
        "mean_rel_rmse_llama": float(np.mean([r["llama_rel_rmse"] for r in both])) if both else None,
        "size_ours": os.path.getsize(a.ours),
        "size_llama": os.path.getsize(llama_out),
    }
    if a.json:
        print(json.dumps({"tensors": rows, "summary": summary}, indent=1))
        return
    print(f"{'tensor':34} {'ours':>6} {'rel.rmse':>9} {'llama':>6} {'rel.rmse':>9}")
    for r in rows:
        print(f"{r['name']:34} {r['ours_type']:>6} {r['ours_rel_rmse']:9.5f} {r['llama_type']:>6} {r['llama_rel_rmse']:9.5f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
