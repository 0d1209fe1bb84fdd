"""A bounded load test of `mixtral-q serve` on loopback (run by tests/serve.rs against `--slots 4`):
8 concurrent streaming clients × 5 requests each, plus one client killed mid-stream.

- every request completes, and its streamed text is exactly what `mixtral-q generate --temp 0` gives
  for its prompt (a lost, repeated or foreign token would change it);
- the killed client's request stops (tests/serve.rs finds it in the server's log) and its slot is freed;
- the server's resident memory after the run is what it was after the first round.
Environment: MIXTRAL_Q_URL, MIXTRAL_Q_BIN, MIXTRAL_Q_MODEL, MIXTRAL_Q_SERVER_PID.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import openai

URL = os.environ["MIXTRAL_Q_URL"]
BIN = os.environ["MIXTRAL_Q_BIN"]
MODEL = os.environ["MIXTRAL_Q_MODEL"]
SERVER_PID = int(os.environ["MIXTRAL_Q_SERVER_PID"])

CLIENTS = 8
REQUESTS = 5
MAX_TOKENS = 24
# Growth allowed between the first round and the end (allocator noise; the KV caches are allocated at start).
RSS_SLACK = 8 << 20

SUBJECTS = ["Rivers", "Mountains", "Cities", "Forests", "Deserts", "Oceans", "Islands", "Valleys"]
prompts = [[f"{SUBJECTS[c]}, part {k + 1}: once" for k in range(REQUESTS)] for c in range(CLIENTS)]


def rss():
    with open(f"/proc/{SERVER_PID}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def health():
    with urllib.request.urlopen(URL + "/health") as h:
        return json.load(h)


def expected(prompt):
    """`generate --temp 0`: the text it prints after the prompt, and how many tokens it generated."""
    run = lambda *extra: subprocess.run(
        [BIN, "generate", "-m", MODEL, "-p", prompt, "-n", str(MAX_TOKENS), "--temp", "0", "--threads", "1", *extra],
        check=True,
        capture_output=True,
    ).stdout
    printed = run().decode("utf-8")
    assert printed.startswith(prompt) and printed.endswith("\n"), repr(printed)
    return printed[len(prompt) : -1], len(json.loads(run("--json"))["generated_ids"])


want = [[expected(p) for p in row] for row in prompts]
print(f"expected texts from generate: {CLIENTS * REQUESTS}")

# The client to kill: streams a reply that would run to the end of its slot's context.
killer_code = f"""
import openai
client = openai.OpenAI(base_url={URL + "/v1"!r}, api_key="none", max_retries=0)
stream = client.completions.create(model="any", prompt="An endless tale", max_tokens=100000, temperature=0,
                                   stream=True, extra_body={{"ignore_eos": True}})
for i, chunk in enumerate(stream):
    if i == 20:
        print(chunk.id, flush=True)
"""
victim = subprocess.Popen([sys.executable, "-c", killer_code], stdout=subprocess.PIPE, text=True)
killed = []


def kill_victim():
    """SIGKILL as soon as the victim has 20 chunks of its reply."""
    killed.append(victim.stdout.readline().strip())
    victim.send_signal(signal.SIGKILL)
    victim.wait()


killer = threading.Thread(target=kill_victim)
killer.start()

rss_start = rss()
first_round = threading.Barrier(CLIENTS + 1)
failures = []
latencies = []


def client_thread(c):
    client = openai.OpenAI(base_url=URL + "/v1", api_key="none", max_retries=0, timeout=300)
    for k, prompt in enumerate(prompts[c]):
        try:
            t0 = time.time()
            chunks = list(
                client.completions.create(model="any", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True)
            )
            latencies.append(time.time() - t0)
            text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
            want_text, want_n = want[c][k]
            finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
            want_finish = "length" if want_n == MAX_TOKENS else "stop"
            if text != want_text:
                failures.append(f"client {c} request {k}: {text!r} != {want_text!r}")
            if finishes != [want_finish] or chunks[-1].usage.completion_tokens != want_n:
                failures.append(f"client {c} request {k}: finish {finishes}, usage {chunks[-1].usage}")
            if len({ch.id for ch in chunks}) != 1:
                failures.append(f"client {c} request {k}: chunks of several requests")
        except Exception as e:  # a failed request is a test failure, reported below
            failures.append(f"client {c} request {k}: {e!r}")
        if k == 0:
            first_round.wait()


threads = [threading.Thread(target=client_thread, args=(c,)) for c in range(CLIENTS)]
t0 = time.time()
for t in threads:
    t.start()
first_round.wait()
rss_warm = rss()
for t in threads:
    t.join()
wall = time.time() - t0
killer.join()
print(f"killed request: {killed[0]}")

assert not failures, "\n".join(failures)
assert killed[0].startswith("cmpl-"), killed
print(f"ok: {CLIENTS * REQUESTS} streamed requests complete, each exactly as generate --temp 0, in {wall:.1f} s")
print(f"   latency per request: min {min(latencies):.3f} s, max {max(latencies):.3f} s")

deadline = time.time() + 30
while (h := health())["slots_processing"] or h["requests_waiting"]:
    assert time.time() < deadline, f"slots still busy: {h}"
    time.sleep(0.05)
print(f"ok: every slot free at the end: {h}")

rss_end = rss()
print(f"server RSS: start {rss_start >> 10} KiB, after the first round {rss_warm >> 10} KiB, end {rss_end >> 10} KiB")
assert rss_end <= rss_warm + RSS_SLACK, "the server's memory grew during the run"
print("ok: memory flat")
print("all load checks passed")
