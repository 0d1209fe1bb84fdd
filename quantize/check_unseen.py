#!/usr/bin/env python3
"""End-to-end check of `mixtral-q quantize` on a checkpoint it has never seen.

Usage: check_unseen.py MIXTRAL_Q_BINARY WORKDIR

1. `mixtral-q synth --hf` writes a Mixtral checkpoint of unusual shapes (f16 instead of bf16, 3 shards,
   4 experts, 3 layers, hidden 320, 5 heads / 1 KV head, head_dim 64, vocab 1000).
2. `mixtral-q quantize --type f32` converts it.
3. Hugging Face transformers (float64) and llama.cpp (the f32 GGUF, `llama-cpp-python`) compute logits
   on the same tokens; the relative error ||llama - hf|| / ||hf|| is printed (llama.cpp reaches ~4e-4 on
   the tiny fixture's F32 file, its f16 KV cache being the main source).
4. `mixtral-q perplexity` on the same text is compared with the perplexity of the transformers logits.
Needs: pip install torch transformers llama-cpp-python numpy.
"""
import json
import os
import subprocess
import sys

import numpy as np
import torch
import transformers

binary, work = sys.argv[1], sys.argv[2]
os.makedirs(work, exist_ok=True)
hf, f32 = os.path.join(work, "hf"), os.path.join(work, "unseen-f32.gguf")
shape = ["--layers", "3", "--hidden", "320", "--ffn", "640", "--heads", "5", "--kv-heads", "1",
         "--experts", "4", "--experts-used", "2", "--vocab", "1000", "--seed", "11"]
subprocess.run([binary, "synth", "--hf", "-o", hf, "--dtype", "f16", "--shard-mib", "1", *shape], check=True)
shards = sorted(f for f in os.listdir(hf) if f.endswith(".safetensors"))
subprocess.run([binary, "quantize", hf, "-o", f32, "--type", "f32"], check=True)

text = "The quick brown fox jumps over the lazy dog. Mixtral routes every token to two experts, " * 3
tok = transformers.AutoTokenizer.from_pretrained(hf)
ids = tok(text)["input_ids"]
model = transformers.MixtralForCausalLM.from_pretrained(
    hf, dtype=torch.float64, attn_implementation="eager", experts_implementation="eager")
with torch.no_grad():
    ref = model(torch.tensor([ids])).logits[0].numpy()

import llama_cpp

llm = llama_cpp.Llama(model_path=f32, logits_all=True, n_ctx=512, n_threads=os.cpu_count(), verbose=False)
llm.eval(ids)
ours_llama = np.array(llm.scores[: len(ids)], dtype=np.float64)
rel = float(np.linalg.norm(ours_llama - ref) / np.linalg.norm(ref))

logp = ref - np.log(np.exp(ref - ref.max(1, keepdims=True)).sum(1, keepdims=True)) - ref.max(1, keepdims=True)
ppl_ref = float(np.exp(-np.mean([logp[i, ids[i + 1]] for i in range(len(ids) - 1)])))
text_file = os.path.join(work, "text.txt")
with open(text_file, "w") as f:
    f.write(text)
out = subprocess.run([binary, "perplexity", "-m", f32, "-f", text_file, "--ctx", "512", "--json"],
                     check=True, capture_output=True, text=True).stdout
ppl_ours = json.loads(out)["perplexity"]
print(json.dumps({
    "shards": len(shards), "dtype": "f16", "tokens": len(ids),
    "llama_cpp_vs_transformers_rel_error": rel,
    "top1_agreement_llama_cpp": float(np.mean(ours_llama.argmax(1) == ref.argmax(1))),
    "perplexity_transformers": ppl_ref, "perplexity_mixtral_q": ppl_ours,
    "perplexity_rel_diff": abs(ppl_ours - ppl_ref) / ppl_ref,
}, indent=1))
