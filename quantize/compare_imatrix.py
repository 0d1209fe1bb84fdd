#!/usr/bin/env python3
"""Quantization quality with and without an importance matrix, ours against llama.cpp's tools.

Usage: compare_imatrix.py MIXTRAL_Q LLAMA_BIN_DIR [--types Q2_K,Q3_K_M,Q4_K_M] [--work DIR] [--json]

MIXTRAL_Q is our release binary; LLAMA_BIN_DIR holds llama.cpp's `llama-imatrix` and `llama-quantize`
(built from the llama.cpp sources vendored in llama-cpp-python's sdist: `cmake -B build
-DLLAMA_CURL=OFF && cmake --build build --target llama-imatrix llama-quantize`).

On the trained demo model (models/rustdoc-mixtral): its f32 GGUF is the base; the importance matrices
come from the calibration text tests/fixtures/rustdoc-mixtral/calibration.txt (training sections, not
the validation text), windows of 256 tokens (the model's training length), one from `mixtral-q
imatrix` and one from `llama-imatrix`. For each type: llama.cpp's file without and with its imatrix,
ours without and with ours, and each quantizer with the other's imatrix (the files are
interchangeable), and llama.cpp's file with our mix's token_embd and output types
(`--token-embedding-type`, `--output-tensor-type`: where our mixes differ from llama.cpp's, this
row tells the type choice from the block search). Every file is scored by our engine on valid.txt (`perplexity --ctx 256
--all-tokens`), with the KL divergence from the f32 model.
"""
import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(REPO, "models/rustdoc-mixtral")
FIXTURE = os.path.join(REPO, "tests/fixtures/rustdoc-mixtral")
CTX = "256"


def run(*cmd):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{p.stderr[-2000:]}")
    return p.stdout


def head_types(verbose_report):
    """The types `quantize -v` printed for token_embd.weight and output.weight."""
    types = {}
    for line in verbose_report.splitlines():
        parts = line.split()
        if parts and parts[0] in ("token_embd.weight", "output.weight"):
            types[parts[0]] = parts[1]
    return types


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mixtral_q")
    ap.add_argument("llama_bin")
    ap.add_argument("--types", default="Q2_K,Q3_K_M,Q4_K_M")
    ap.add_argument("--work", default="/tmp/compare-imatrix")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    w = lambda name: os.path.join(args.work, name)
    ours, llama_quantize, llama_imatrix = (
        args.mixtral_q,
        os.path.join(args.llama_bin, "llama-quantize"),
        os.path.join(args.llama_bin, "llama-imatrix"),
    )
    calibration, valid = os.path.join(FIXTURE, "calibration.txt"), os.path.join(FIXTURE, "valid.txt")

    run(ours, "quantize", MODEL, "-o", w("f32.gguf"), "--type", "f32")
    run(ours, "perplexity", "-m", w("f32.gguf"), "-f", valid, "--ctx", CTX, "--all-tokens",
        "--kl-divergence-base", w("base.kld"))
    run(ours, "imatrix", "-m", w("f32.gguf"), "-f", calibration, "--ctx", CTX, "-o", w("ours.imatrix.gguf"))
    run(llama_imatrix, "-m", w("f32.gguf"), "-f", calibration, "-c", CTX, "-o", w("llama.imatrix.gguf"))

    rows = []
    for ty in args.types.split(","):
        head = head_types(run(ours, "quantize", MODEL, "-o", w(f"ours-{ty}.gguf"), "--type", ty, "-v"))
        files = {
            "llama.cpp": [llama_quantize, w("f32.gguf"), w(f"llama-{ty}.gguf"), ty],
            "llama.cpp + its imatrix": [llama_quantize, "--imatrix", w("llama.imatrix.gguf"), w("f32.gguf"),
                                        w(f"llama-im-{ty}.gguf"), ty],
            "llama.cpp + our imatrix": [llama_quantize, "--imatrix", w("ours.imatrix.gguf"), w("f32.gguf"),
                                        w(f"llama-oim-{ty}.gguf"), ty],
            "llama.cpp, our token_embd/output types": [
                llama_quantize, "--token-embedding-type", head["token_embd.weight"], "--output-tensor-type",
                head["output.weight"], w("f32.gguf"), w(f"llama-head-{ty}.gguf"), ty],
            "ours": [ours, "quantize", MODEL, "-o", w(f"ours-{ty}.gguf"), "--type", ty],
            "ours + our imatrix": [ours, "quantize", MODEL, "-o", w(f"ours-im-{ty}.gguf"), "--type", ty,
                                   "--imatrix", w("ours.imatrix.gguf")],
            "ours + llama.cpp's imatrix": [ours, "quantize", MODEL, "-o", w(f"ours-lim-{ty}.gguf"), "--type", ty,
                                           "--imatrix", w("llama.imatrix.gguf")],
        }
        for who, cmd in files.items():
            run(*cmd)
            out = cmd[-2] if cmd[0] == llama_quantize else cmd[cmd.index("-o") + 1]
            j = json.loads(run(ours, "perplexity", "-m", out, "-f", valid, "--ctx", CTX, "--all-tokens",
                               "--kl-divergence", "--kl-divergence-base", w("base.kld"), "--json"))
            kl = j["kl_divergence"]
            rows.append({"type": ty, "file": who, "bytes": os.path.getsize(out), "ppl": j["perplexity"],
                         "delta_ppl": j["perplexity"] - kl["base_perplexity"],
                         # The paired error of ΔPPL: both files scored on the same tokens.
                         "delta_ppl_error": j["perplexity"] * kl["mean_ln_ppl_ratio_error"], "kl": kl["mean"],
                         "same_top": kl["same_top_p"]})
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print("| type | file | bytes | PPL | ΔPPL | mean KL | same top token |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['type']} | {r['file']} | {r['bytes']:,} | {r['ppl']:.4f} | {r['delta_ppl']:+.3f} ± {r['delta_ppl_error']:.3f} | "
              f"{r['kl']:.6f} | {100 * r['same_top']:.2f}% |")


if __name__ == "__main__":
    main()
