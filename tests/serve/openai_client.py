"""Drives `grit serve` with the official `openai` Python client (tests/serve_openai.rs runs it).

Usage: python openai_client.py BASE_URL API_KEY
Prints one JSON object with what the client saw; exits non-zero on the first failed check.
"""
import json
import sys
import urllib.request

import openai
from openai import OpenAI

base_url, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key=key, max_retries=0)
out = {"openai_version": openai.__version__}
PROMPT = "Once upon a time"

# Models: the base and the start adapter with its parent.
models = client.models.list()
out["models"] = [m.id for m in models.data]

# Completions, greedy, base and adapter by model name; streaming adds up to the same text.
for name in ("base", "a1"):
    c = client.completions.create(model=name, prompt=PROMPT, max_tokens=24, temperature=0)
    out[f"completion_{name}"] = c.choices[0].text
    out[f"completion_{name}_usage"] = [c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens]
    s = client.completions.create(model=name, prompt=PROMPT, max_tokens=24, temperature=0, stream=True)
    out[f"completion_{name}_stream"] = "".join(ch.choices[0].text for ch in s if ch.choices)

# Chat, plain and streaming with usage.
msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
c = client.chat.completions.create(model="a1", messages=msgs, max_tokens=16, temperature=0)
out["chat"] = c.choices[0].message.content
out["chat_finish"] = c.choices[0].finish_reason
parts, usage = [], None
for ch in client.chat.completions.create(model="a1", messages=msgs, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}):
    if ch.choices and ch.choices[0].delta.content:
        parts.append(ch.choices[0].delta.content)
    if ch.usage:
        usage = ch.usage.completion_tokens
out["chat_stream"] = "".join(parts)
out["chat_stream_usage"] = usage

# Stacking through extra_body.
c = client.completions.create(model="base", prompt=PROMPT, max_tokens=24, temperature=0, extra_body={"adapters": [{"name": "a1", "scale": 1.0}]})
out["stacked_a1_only"] = c.choices[0].text

# Hot load (plain HTTP: the client has no adapters API), use by name, unload.
def call(method, path, body=None):
    req = urllib.request.Request(base_url + path, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return r.status, json.loads(r.read())

st, _ = call("POST", "/adapters", {"name": "hot", "path": "a1.gguf"})
out["hot_load_status"] = st
out["models_after_load"] = [m.id for m in client.models.list().data]
out["completion_hot"] = client.completions.create(model="hot", prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
st, _ = call("DELETE", "/adapters/hot")
out["hot_unload_status"] = st

# Errors surface as the client's typed exceptions.
errors = {}
def expect(label, exc, fn):
    try:
        fn()
    except exc as e:
        errors[label] = [type(e).__name__, e.status_code, (e.body or {}).get("message") if isinstance(e.body, dict) else str(e.body)]
        return
    raise SystemExit(f"{label}: no {exc.__name__}")

expect("unknown_model", openai.NotFoundError, lambda: client.completions.create(model="nope", prompt="x", max_tokens=2))
expect("unloaded_adapter", openai.NotFoundError, lambda: client.completions.create(model="hot", prompt="x", max_tokens=2))
expect("bad_temperature", openai.BadRequestError, lambda: client.chat.completions.create(model="base", messages=msgs, temperature=5))
expect("context_overflow", openai.BadRequestError, lambda: client.completions.create(model="base", prompt="word " * 700, max_tokens=4))
expect("wrong_key", openai.AuthenticationError, lambda: OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list())
out["errors"] = errors

# Embeddings (the client asks for base64 and decodes it).
e = client.embeddings.create(model="base", input=["hello", "goodbye"])
out["embedding_dims"] = [len(d.embedding) for d in e.data]
out["embedding_norm"] = sum(x * x for x in e.data[0].embedding)

print(json.dumps(out))
