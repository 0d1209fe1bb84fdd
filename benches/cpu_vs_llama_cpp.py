#!/usr/bin/env python3
"""Prompt and decode speed of mixtral-q and llama.cpp on the same GGUF, same thread count, one run.

Usage: cpu_vs_llama_cpp.py MIXTRAL_Q_BINARY MODEL.gguf [--threads N] [-p 64] [-n 32] [-d 0] [-r 3]

llama.cpp runs through llama-cpp-python (`pip install llama-cpp-python`, built from source for this
CPU); mixtral-q through `mixtral-q bench -o json`. Both: prompt = one batch of p tokens on an empty
cache, decode = n single-token steps after BOS; with -d, both start from d tokens already in the cache
(processed first, not timed: long-context speed). The engines take turns, one repetition each per round
(r rounds after a warm-up), so that a change in the machine's load (shared cores, shared memory
bandwidth) hits both alike; the mean, spread and best of the r samples are reported.
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
ap.add_argument("-d", type=int, default=0)
ap.add_argument("-r", type=int, default=3)
a = ap.parse_args()

llm = llama_cpp.Llama(model_path=a.model, n_ctx=a.d + max(a.p, a.n + 1) + 16, n_batch=max(a.p, 512), n_threads=a.threads,
                      n_threads_batch=a.threads, verbose=False)
vocab = llm.n_vocab()
prompt = [(i * 7919 + 1) % vocab for i in range(a.p)]
gen = [(i * 7919 + 1) % vocab for i in range(a.n)]
depth = [(i * 7919 + 1) % vocab for i in range(a.d)]


def start():
    """An empty cache, or one holding the depth tokens (recomputed: llama-cpp-python keeps one sequence)."""
    llm.reset()
    if depth:
        llm.eval(depth)


def llama_pp():
    start()
    t = time.perf_counter()
    llm.eval(prompt)
    return a.p / (time.perf_counter() - t)


def llama_tg():
    start()
    if not depth:
        llm.eval([1])
    t = time.perf_counter()
    for tok in gen:
        llm.eval([tok])
    return a.n / (time.perf_counter() - t)


def mixtral_q():
    out = subprocess.run([a.binary, "bench", "-m", a.model, "-p", str(a.p), "-n", str(a.n), "-d", str(a.d), "-r", "1",
                          "-o", "json", "--threads", str(a.threads)], check=True, capture_output=True, text=True).stdout
    return {r["test"][:2]: r["samples_ts"][0] for r in json.loads(out)}


results = {"llama.cpp": {"pp": [], "tg": []}, "mixtral-q": {"pp": [], "tg": []}}
llama_pp(), llama_tg(), mixtral_q()  # warm-up
for _ in range(a.r):
    results["llama.cpp"]["pp"].append(llama_pp())
    results["llama.cpp"]["tg"].append(llama_tg())
    for test, ts in mixtral_q().items():
        results["mixtral-q"][test].append(ts)

print(f"model {a.model} ({os.path.getsize(a.model) / 2**30:.2f} GiB), {a.threads} threads, pp{a.p}, tg{a.n}, "
      f"depth {a.d}, {a.r} reps")
print(f"| engine | prompt tok/s (mean ± sd, best) | decode tok/s (mean ± sd, best) |")
print(f"| --- | ---: | ---: |")
for name, r in results.items():
    cell = lambda s: f"{statistics.mean(s):.1f} ± {statistics.stdev(s) if len(s) > 1 else 0:.1f}, {max(s):.1f}"
    print(f"| {name} | {cell(r['pp'])} | {cell(r['tg'])} |")
print(json.dumps(results))
