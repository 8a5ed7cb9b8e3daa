"""Load and speed clients for `grit serve` (standard library only; loopback HTTP).

  serve_client.py load  URL --clients 32 --requests 256 --max-tokens 32
      32 threads send a fixed number of chat requests in total; prints completion %, errors by
      status, throughput and p50/p99 latency as one JSON line (exit 1 if < 90 % complete or any
      error other than 429).
  serve_client.py speed URL --model NAME --tokens 128 --streams 1
      `streams` concurrent streaming completions of exactly `tokens` tokens (ignore_eos);
      prints per-stream decode tokens/s (first to last chunk) and aggregate tokens/s.
"""
import argparse
import http.client
import json
import statistics
import sys
import threading
import time
from urllib.parse import urlparse

PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"


def post(url, path, body, stream=False):
    u = urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    c.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    return c, c.getresponse()


def load(a):
    lock = threading.Lock()
    next_i = [0]
    lat, statuses, tokens = [], {}, [0]

    def worker():
        while True:
            with lock:
                i = next_i[0]
                if i >= a.requests:
                    return
                next_i[0] += 1
            body = {"model": a.model, "messages": [{"role": "user", "content": f"Request {i}: tell me a short story about a fisherman."}],
                    "max_tokens": a.max_tokens, "temperature": 0.7, "seed": i}
            t0 = time.perf_counter()
            try:
                c, r = post(a.url, "/v1/chat/completions", body)
                data = r.read()
                st = r.status
                c.close()
            except Exception as e:  # connection errors count as errors
                st, data = f"exc:{type(e).__name__}", b""
            dt = time.perf_counter() - t0
            with lock:
                statuses[st] = statuses.get(st, 0) + 1
                if st == 200:
                    lat.append(dt)
                    tokens[0] += json.loads(data)["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker) for _ in range(a.clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    ok = statuses.get(200, 0)
    errors = {str(k): v for k, v in statuses.items() if k not in (200, 429)}
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
    res = {"clients": a.clients, "requests": a.requests, "completed": ok, "completed_pct": 100.0 * ok / a.requests,
           "rejected_429": statuses.get(429, 0), "errors": errors, "wall_s": wall, "requests_per_s": ok / wall,
           "completion_tokens_per_s": tokens[0] / wall, "p50_s": statistics.median(lat) if lat else None, "p99_s": q[98]}
    print(json.dumps(res))
    return 0 if res["completed_pct"] >= 90 and not errors else 1


def one_stream(a, i, out):
    body = {"model": a.model, "prompt": PROMPT if a.streams == 1 else f"{PROMPT} ({i})", "max_tokens": a.tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    c, r = post(a.url, "/v1/completions", body, stream=True)
    if r.status != 200:
        raise SystemExit(f"HTTP {r.status}: {r.read()[:300]}")
    times, n = [], 0
    while True:
        line = r.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        if line == b"data: [DONE]":
            break
        ch = json.loads(line[6:])
        if ch["choices"] and ch["choices"][0]["text"]:
            times.append(time.perf_counter())
            n += 1
    c.close()
    out[i] = {"start": t0, "first": times[0], "last": times[-1], "chunks": n}


def speed(a):
    out = [None] * a.streams
    ts = [threading.Thread(target=one_stream, args=(a, i, out)) for i in range(a.streams)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    per = [(o["chunks"] - 1) / (o["last"] - o["first"]) for o in out]
    wall = max(o["last"] for o in out) - min(o["start"] for o in out)
    decode_wall = max(o["last"] for o in out) - max(o["first"] for o in out)
    print(json.dumps({"model": a.model, "streams": a.streams, "tokens": a.tokens,
                      "per_stream_tok_s": statistics.median(per),
                      "aggregate_tok_s": a.streams * a.tokens / wall,
                      "aggregate_decode_tok_s": sum(o["chunks"] - 1 for o in out) / max(decode_wall, 1e-9) if a.streams > 1 else per[0]}))
    return 0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["load", "speed"])
    p.add_argument("url")
    p.add_argument("--model", default="base")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--streams", type=int, default=1)
    a = p.parse_args()
    sys.exit(load(a) if a.mode == "load" else speed(a))


if __name__ == "__main__":
    main()
