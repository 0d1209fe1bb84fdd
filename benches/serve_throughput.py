#!/usr/bin/env python3
"""Aggregate decode throughput of `mixtral-q serve` with 1, 4 and 8 concurrent streaming clients.

Starts the server (`--slots` = the largest client count, so that no request waits for a slot), then
for each client count runs that many clients at once, each streaming `--requests` completions of
exactly `--tokens` tokens (ignore_eos). Aggregate tokens/s = all generated tokens / wall time of the
run (prompts included); per-stream decode = a stream's tokens after its first / the time they took.
The client counts take turns, round after round, so that a machine whose load changes affects
them alike. The engine runs one sequence per forward call, so concurrent requests share its speed
(interleaved decode steps, no batching across requests): the numbers say what that costs or gains.
Each round also runs `mixtral-q bench` (decode of the same number of tokens, engine alone, no server)
on the same file, as the reference for what one stream can do at that moment.

    python3 benches/serve_throughput.py -m FILE.gguf [--clients 1,4,8] [--tokens 64] [--rounds 3]

Only the standard library (raw HTTP, server-sent events).
"""

import argparse
import http.client
import json
import statistics
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path


def start_server(args, slots):
    cmd = [args.bin, "serve", "--port", "0", "--slots", str(slots), "--ctx", str(slots * args.slot_ctx)]
    if args.model:
        cmd += ["-m", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    for line in server.stderr:
        if "listening on http://" in line:
            print(line.strip())
            url = urllib.parse.urlparse(line.split("listening on ")[1].strip())
            # Keep reading the log so that the server never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
            return server, url
    raise SystemExit(f"the server did not start: {server.wait()}")


def stream_completion(url, prompt, tokens, seed):
    """Streams one completion; returns (generated tokens, seconds to the first token, total seconds)."""
    body = {"prompt": prompt, "max_tokens": tokens, "ignore_eos": True, "stream": True, "seed": seed}
    c = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200, r.read()
    first = None
    usage = None
    for line in r:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if first is None:
            first = time.perf_counter() - t0
        usage = chunk.get("usage") or usage
    c.close()
    return usage["completion_tokens"], first, time.perf_counter() - t0


def run_clients(url, clients, args, round_no):
    """All clients at once; returns (aggregate tokens/s, mean time to first token, mean decode
    tokens/s of one stream after its first token)."""
    results = []
    lock = threading.Lock()

    def client(i):
        for k in range(args.requests):
            prompt = f"Client {i}, round {round_no}, request {k}: a story about"
            r = stream_completion(url, prompt, args.tokens, seed=1000 * i + k)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    generated = sum(r[0] for r in results)
    assert generated == clients * args.requests * args.tokens, generated
    decode = statistics.mean((n - 1) / (total - first) for n, first, total in results)
    return generated / wall, statistics.mean(r[1] for r in results), decode


def engine_alone(args):
    """`mixtral-q bench`'s decode tokens/s for `--tokens` tokens (no server), or None without -m."""
    cmd = [args.bin, "bench", "-p", "16", "-n", str(args.tokens), "-r", "1", "-o", "json"]
    if args.model:
        cmd += ["-m", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    rows = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return next(r["avg_ts"] for r in rows if r["test"].startswith("tg"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", help="GGUF file (default: the bundled demo model)")
    p.add_argument("--bin", default=str(Path(__file__).resolve().parent.parent / "target/release/mixtral-q"))
    p.add_argument("--clients", default="1,4,8")
    p.add_argument("--tokens", type=int, default=64, help="tokens per request")
    p.add_argument("--requests", type=int, default=2, help="requests per client per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--slot-ctx", type=int, default=512, help="context per slot")
    p.add_argument("-t", "--threads", type=int)
    args = p.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    server, url = start_server(args, max(counts))
    try:
        run_clients(url, 1, args, -1)  # warm-up
        rates = {c: [] for c in counts}
        firsts = {c: [] for c in counts}
        decodes = {c: [] for c in counts}
        alone = []
        for round_no in range(args.rounds):
            alone.append(engine_alone(args))
            print(f"round {round_no + 1}: engine alone (mixtral-q bench): {alone[-1]:.1f} tokens/s")
            for c in counts:
                rate, first, decode = run_clients(url, c, args, round_no)
                rates[c].append(rate)
                firsts[c].append(first)
                decodes[c].append(decode)
                print(
                    f"round {round_no + 1}: {c} client(s): {rate:.1f} tokens/s in all, first token after "
                    f"{first:.3f} s, then {decode:.1f} tokens/s per stream"
                )
    finally:
        server.terminate()
        server.wait()
    base = statistics.mean(rates[counts[0]])
    print()
    sd = statistics.stdev(alone) if len(alone) > 1 else 0.0
    print(f"engine alone (mixtral-q bench, tg{args.tokens}): {statistics.mean(alone):.1f} ± {sd:.1f} tokens/s")
    print(
        f"| clients | aggregate tokens/s (mean ± sd of {args.rounds}) | vs {counts[0]} client | "
        "time to first token | decode tokens/s per stream |"
    )
    print("|---:|---:|---:|---:|---:|")
    for c in counts:
        mean = statistics.mean(rates[c])
        sd = statistics.stdev(rates[c]) if len(rates[c]) > 1 else 0.0
        first = statistics.mean(firsts[c])
        print(f"| {c} | {mean:.1f} ± {sd:.1f} | {mean / base:.2f}× | {first:.3f} s | {statistics.mean(decodes[c]):.1f} |")


if __name__ == "__main__":
    main()
