"""`mixtral-q serve` through the official `openai` Python client (run by tests/serve.rs).

What the server says is checked against what the command line computes on the same model:
`mixtral-q generate --temp 0` for the text, `mixtral-q tokenize` for the prompt token counts.
Environment: MIXTRAL_Q_URL, MIXTRAL_Q_API_KEY, MIXTRAL_Q_BIN, MIXTRAL_Q_MODEL.
"""

import json
import os
import subprocess
import tempfile
import urllib.error
import urllib.request

import openai

URL = os.environ["MIXTRAL_Q_URL"]
KEY = os.environ["MIXTRAL_Q_API_KEY"]
BIN = os.environ["MIXTRAL_Q_BIN"]
MODEL = os.environ["MIXTRAL_Q_MODEL"]

client = openai.OpenAI(base_url=URL + "/v1", api_key=KEY, max_retries=0, timeout=120)


def cli(*args):
    """stdout of `mixtral-q ARGS -m MODEL` (bytes decoded as they are: no newline translation)."""
    out = subprocess.run([BIN, *args, "-m", MODEL, "--threads", "1"], check=True, capture_output=True)
    return out.stdout.decode("utf-8")


def generate(prompt, n):
    """What `generate --temp 0` prints after the prompt, and its prompt and generated token ids."""
    printed = cli("generate", "-p", prompt, "-n", str(n), "--temp", "0")
    assert printed.startswith(prompt) and printed.endswith("\n"), repr(printed)
    ids = json.loads(cli("generate", "-p", prompt, "-n", str(n), "--temp", "0", "--json"))
    return printed[len(prompt) : -1], ids["prompt_ids"], ids["generated_ids"]


def tokenize_chat(messages):
    """`tokenize --chat`: the rendered conversation and its token ids."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(messages, f)
    try:
        out = json.loads(cli("tokenize", "--chat", f.name, "--json"))
    finally:
        os.unlink(f.name)
    return out["text"], out["ids"]


def finish_reason(generated, n):
    return "length" if len(generated) == n else "stop"


def check(name, condition, detail=""):
    assert condition, f"{name}: {detail}"
    print(f"ok: {name}")


# Completions, not streamed: the first request on a fresh server.
prompt = "Once upon a time"
want_text, want_prompt, want_ids = generate(prompt, 12)
r = client.completions.create(model="any", prompt=prompt, max_tokens=12, temperature=0)
check("completion text = generate --temp 0", r.choices[0].text == want_text, f"{r.choices[0].text!r} vs {want_text!r}")
tokenized = json.loads(cli("tokenize", prompt, "--json"))["ids"]
check("completion prompt_tokens = tokenize", r.usage.prompt_tokens == len(tokenized) == len(want_prompt), r.usage)
check("completion completion_tokens = generated", r.usage.completion_tokens == len(want_ids), r.usage)
check("completion finish_reason", r.choices[0].finish_reason == finish_reason(want_ids, 12), r.choices[0])

# Completions, streamed.
prompt2 = "The quick brown fox"
want_text, _, want_ids = generate(prompt2, 16)
chunks = list(client.completions.create(model="any", prompt=prompt2, max_tokens=16, temperature=0, stream=True))
text = "".join(c.choices[0].text for c in chunks if c.choices)
check("streamed completion = generate --temp 0", text == want_text, f"{text!r} vs {want_text!r}")
check("one id per stream", len({c.id for c in chunks}) == 1)
last = chunks[-1]
check("stream ends with the finish reason", last.choices[0].finish_reason == finish_reason(want_ids, 16), last)
check("stream's last chunk has the usage", last.usage.completion_tokens == len(want_ids), last.usage)

# Chat, not streamed: the text is generate's on the rendered conversation.
messages = [{"role": "user", "content": "Tell me about the sea."}]
rendered, chat_ids = tokenize_chat(messages)
want_text, want_prompt, want_ids = generate(rendered, 10)
check("generate sees the ids tokenize --chat gives", want_prompt == chat_ids)
r1 = client.chat.completions.create(model="any", messages=messages, max_tokens=10, temperature=0)
reply = r1.choices[0].message
check("chat reply = generate --temp 0", reply.content == want_text, f"{reply.content!r} vs {want_text!r}")
check("chat role", reply.role == "assistant")
check("chat prompt_tokens = tokenize --chat", r1.usage.prompt_tokens == len(chat_ids), r1.usage)
check("chat completion_tokens", r1.usage.completion_tokens == len(want_ids), r1.usage)
check("chat finish_reason", r1.choices[0].finish_reason == finish_reason(want_ids, 10))

# Chat, streamed, with stream_options.include_usage (a last chunk with no choices).
messages_b = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is a river?"},
]
# Mixtral's template has no system role: the server folds it into the first user message, as the REPL.
rendered_b, ids_b = tokenize_chat([{"role": "user", "content": "Answer briefly.\n\nWhat is a river?"}])
want_text, _, want_ids = generate(rendered_b, 10)
stream = client.chat.completions.create(
    model="any", messages=messages_b, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}
)
chunks = list(stream)
check("first chunk is the assistant's role", chunks[0].choices[0].delta.role == "assistant")
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check("streamed chat = generate --temp 0 (system prompt folded)", text == want_text, f"{text!r} vs {want_text!r}")
check("usage chunk", chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(ids_b), chunks[-1])
finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
check("one finish reason", finishes == [finish_reason(want_ids, 10)], finishes)

# A second turn of the first conversation reuses its cache: the whole first exchange.
turn2 = messages + [{"role": "assistant", "content": reply.content}, {"role": "user", "content": "And rivers?"}]
r2 = client.chat.completions.create(model="any", messages=turn2, max_tokens=4, temperature=0)
cached = r2.usage.prompt_tokens_details.cached_tokens
timings = r2.to_dict()["timings"]
seen = r1.usage.prompt_tokens + r1.usage.completion_tokens
# All of the first exchange but, after max_tokens, its last token (sampled, never run).
check("second turn reuses the first exchange", cached >= seen - 1, f"{cached} cached of {seen}")
check("timings say the same", timings["cache_n"] == cached and timings["prompt_n"] == r2.usage.prompt_tokens - cached)
print(f"   second turn: {r2.usage.prompt_tokens} prompt tokens, {cached} from the cache, {timings['prompt_n']} processed")

# A stop sequence: the text up to it, finish_reason "stop".
full = client.completions.create(model="any", prompt=prompt, max_tokens=12, temperature=0).choices[0].text
stop = full[4:6]
cut = full[: full.index(stop)]
r = client.completions.create(model="any", prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
check("stop sequence", r.choices[0].text == cut and r.choices[0].finish_reason == "stop", f"{r.choices[0]} stop {stop!r}")
stream = client.completions.create(model="any", prompt=prompt, max_tokens=12, temperature=0, stop=stop, stream=True)
text = "".join(c.choices[0].text for c in stream if c.choices)
check("stop sequence, streamed", text == cut, f"{text!r} vs {cut!r}")

# Sampling: a seed makes it reproducible; llama.cpp's sampler settings are accepted.
extra = {"top_k": 20, "min_p": 0.05, "repeat_penalty": 1.1}
a, b = (
    client.completions.create(model="any", prompt="Seeded", max_tokens=12, temperature=0.9, seed=42, extra_body=extra)
    for _ in range(2)
)
check("same seed, same text", a.choices[0].text == b.choices[0].text, f"{a.choices[0].text!r} {b.choices[0].text!r}")

# The model list; the API key.
models = client.models.list()
check("models", [m.id for m in models.data] == [r.model], models)
try:
    openai.OpenAI(base_url=URL + "/v1", api_key="wrong", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError as e:
    check("a wrong key gets 401", e.status_code == 401 and e.body["code"] == "invalid_api_key", e.body)
try:
    urllib.request.urlopen(URL + "/v1/models")
    raise AssertionError("no key was accepted")
except urllib.error.HTTPError as e:
    check("no key gets 401", e.code == 401)
with urllib.request.urlopen(URL + "/health") as h:
    check("/health needs no key", json.load(h)["status"] == "ok")
try:
    client.chat.completions.create(model="any", messages=messages, n=2)
    raise AssertionError("n = 2 was accepted")
except openai.BadRequestError as e:
    check("n = 2 gets 400", e.status_code == 400 and e.body["param"] == "n", e.body)

print("all client checks passed")
