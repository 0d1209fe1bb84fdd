"""Bad input to `mixtral-q serve` (run by tests/serve.rs against `--slots 1 --max-queue 1 --ctx 8192`):
every one gets OpenAI's error JSON with its 4xx status, and the server keeps serving. Raw HTTP, so
that the bodies can be as broken as a client can make them.
Environment: MIXTRAL_Q_URL, MIXTRAL_Q_BIN, MIXTRAL_Q_MODEL.
"""

import http.client
import json
import os
import subprocess
import time
import urllib.parse

URL = urllib.parse.urlparse(os.environ["MIXTRAL_Q_URL"])
BIN = os.environ["MIXTRAL_Q_BIN"]
MODEL = os.environ["MIXTRAL_Q_MODEL"]
CTX = 8192

USER = [{"role": "user", "content": "Hello."}]


def connect():
    return http.client.HTTPConnection(URL.hostname, URL.port, timeout=60)


def request(method, path, body=None):
    """(status, headers, parsed JSON body)."""
    c = connect()
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    c.request(method, path, body=data, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    raw = r.read()
    c.close()
    return r.status, r.headers, json.loads(raw)


def expect_error(name, status, method, path, body=None, param=None):
    got, headers, reply = request(method, path, body)
    assert got == status, f"{name}: status {got}, want {status}: {reply}"
    error = reply.get("error")
    assert isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"], f"{name}: {reply}"
    assert set(error) == {"message", "type", "param", "code"}, f"{name}: {reply}"
    if param is not None:
        assert error["param"] == param, f"{name}: param {error['param']!r}, want {param!r}"
    print(f"ok: {name} -> {status}: {error['message']}")
    return headers, error


def still_serving():
    status, _, reply = request("POST", "/v1/completions", {"prompt": "Still there?", "max_tokens": 3})
    assert status == 200 and reply["choices"][0]["finish_reason"] in ("stop", "length"), reply


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

expect_error("malformed JSON", 400, "POST", CHAT, b'{"messages": [')
expect_error("not JSON at all", 400, "POST", COMPLETIONS, b"\xff\xfe prompt")
expect_error("not an object", 400, "POST", CHAT, b"[1, 2]")
expect_error("no messages", 400, "POST", CHAT, {"model": "x"}, "messages")
expect_error("messages of the wrong type", 400, "POST", CHAT, {"messages": "hi"}, "messages")
expect_error("empty message list", 400, "POST", CHAT, {"messages": []}, "messages")
expect_error("unknown role", 400, "POST", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role")
expect_error("content of the wrong type", 400, "POST", CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content")
expect_error(
    "roles that do not alternate",
    400,
    "POST",
    CHAT,
    {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
    "messages",
)
expect_error("prompt of the wrong type", 400, "POST", COMPLETIONS, {"prompt": 5}, "prompt")
for field, value in [
    ("max_tokens", 0),
    ("max_tokens", -1),
    ("max_tokens", "10"),
    ("max_tokens", 2.5),
    ("temperature", -1),
    ("temperature", "hot"),
    ("top_p", 0),
    ("top_p", 1.5),
    ("min_p", 2),
    ("top_k", -1),
    ("repeat_penalty", 0),
    ("seed", "abc"),
    ("stream", "yes"),
    ("stop", 7),
    ("n", 3),
]:
    expect_error(f"{field} = {value!r}", 400, "POST", CHAT, {"messages": USER, field: value}, field)
    expect_error(f"completions {field} = {value!r}", 400, "POST", COMPLETIONS, {"prompt": "x", field: value}, field)
expect_error("max_completion_tokens = 0", 400, "POST", CHAT, {"messages": USER, "max_completion_tokens": 0}, "max_completion_tokens")

# A prompt longer than the context: 400 with both numbers.
long_prompt = "hello " * (CTX + 100)
ids = json.loads(subprocess.run([BIN, "tokenize", long_prompt, "--json", "-m", MODEL], check=True, capture_output=True).stdout)["ids"]
_, error = expect_error("prompt longer than the context", 400, "POST", COMPLETIONS, {"prompt": long_prompt}, "prompt")
assert str(CTX) in error["message"] and str(len(ids)) in error["message"], error
assert error["code"] == "context_length_exceeded", error
long_chat = [{"role": "user", "content": long_prompt}]
expect_error("conversation longer than the context", 400, "POST", CHAT, {"messages": long_chat}, "messages")

expect_error("body over the size limit", 413, "POST", COMPLETIONS, b'{"prompt": "' + b"x" * (5 << 20) + b'"}')
expect_error("unknown endpoint", 404, "POST", "/v1/embeddings", {"input": "x"})
expect_error("wrong method", 405, "GET", COMPLETIONS)
still_serving()
print("ok: still serving after the bad requests")


# Too many requests: one runs (the only slot), one waits (--max-queue 1), the next is refused.
def open_stream(prompt):
    c = connect()
    body = {"prompt": prompt, "max_tokens": CTX, "ignore_eos": True, "stream": True}
    c.request("POST", COMPLETIONS, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200, r.status
    return c, r


def health():
    return request("GET", "/health")[2]


running, running_response = open_stream("A long story")
first = running_response.readline()
assert first.startswith(b"data: "), first
waiting, _ = open_stream("Another long story")
deadline = time.time() + 30
while health()["requests_waiting"] != 1:
    assert time.time() < deadline, health()
    time.sleep(0.05)
headers, error = expect_error("queue full", 503, "POST", COMPLETIONS, {"prompt": "One more", "max_tokens": 2})
assert headers["Retry-After"] == "1", dict(headers)
print(f"ok: Retry-After {headers['Retry-After']}; health {health()}")

# Both clients hang up: the server stops them and frees the slot.
running.close()
waiting.close()
deadline = time.time() + 30
while (h := health())["slots_processing"] or h["requests_waiting"]:
    assert time.time() < deadline, h
    time.sleep(0.05)
print(f"ok: slot freed after the clients hung up: {h}")
still_serving()
print("ok: still serving")
print("all error checks passed")
