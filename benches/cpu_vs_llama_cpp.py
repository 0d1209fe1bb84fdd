#!/usr/bin/env python3
"""Prompt and decode speed of mixtral-q and llama.cpp on the same GGUF, same thread count, one run.

Usage: cpu_vs_llama_cpp.py MIXTRAL_Q_BINARY MODEL.gguf [--threads N] [-p 64] [-n 32] [-r 3]

llama.cpp runs through llama-cpp-python (`pip install llama-cpp-python`, built from source for this
CPU); mixtral-q through `mixtral-q bench -o json`. Both: prompt = one batch of p tokens on an empty
cache, decode = n single-token steps after BOS; the best-of and the mean over r repetitions after a
warm-up are reported.
"""
import argparse
import json
import os
import statistics
import subprocess
import time

import llama_cpp

ap = argparse.ArgumentParser()
ap.add_argument("binary")
ap.add_argument("model")
ap.add_argument("--threads", type=int, default=os.cpu_count())
ap.add_argument("-p", type=int, default=64)
ap.add_argument("-n", type=int, default=32)
ap.add_argument("-r", type=int, default=3)
a = ap.parse_args()

llm = llama_cpp.Llama(model_path=a.model, n_ctx=max(a.p, a.n + 1) + 16, n_batch=max(a.p, 1), n_threads=a.threads,
                      n_threads_batch=a.threads, verbose=False)
vocab = llm.n_vocab()
prompt = [(i * 7919 + 1) % vocab for i in range(a.p)]
gen = [(i * 7919 + 1) % vocab for i in range(a.n)]


def llama_pp():
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    return a.p / (time.perf_counter() - t)


def llama_tg():
    llm.reset()
    llm.eval([1])
    t = time.perf_counter()
    for tok in gen:
        llm.eval([tok])
    return a.n / (time.perf_counter() - t)


def measure(f):
    f()  # warm-up
    return [f() for _ in range(a.r)]


results = {"llama.cpp": {"pp": measure(llama_pp), "tg": measure(llama_tg)}}
del llm
out = subprocess.run([a.binary, "bench", "-m", a.model, "-p", str(a.p), "-n", str(a.n), "-r", str(a.r),
                      "-o", "json", "--threads", str(a.threads)], check=True, capture_output=True, text=True).stdout
rows = json.loads(out)
results["mixtral-q"] = {r["test"][:2]: r["samples_ts"] for r in rows}

print(f"model {a.model} ({os.path.getsize(a.model) / 2**30:.2f} GiB), {a.threads} threads, pp{a.p}, tg{a.n}, {a.r} reps")
print(f"| engine | prompt tok/s (mean ± sd) | decode tok/s (mean ± sd) |")
print(f"| --- | ---: | ---: |")
for name, r in results.items():
    cell = lambda s: f"{statistics.mean(s):.1f} ± {statistics.stdev(s) if len(s) > 1 else 0:.1f}"
    print(f"| {name} | {cell(r['pp'])} | {cell(r['tg'])} |")
print(json.dumps(results))
