"""Load generator for experiments/bench_http.py, run as its own process (as `vllm bench serve` is,
so the clients do not share the server's interpreter): streams each request to an
OpenAI-compatible /v1/completions at its arrival offset, one thread per request, and records
what the client sees. Standard library only.

    python experiments/http_load.py REQUESTS.json RESULTS.json
REQUESTS.json: {"url": ..., "bodies": [request body, ...], "arrivals": [seconds, ...]}
RESULTS.json: {"start": t0, "end": t1, "records": [{"sent", "events": [text event times],
"end", "usage", "text"}, ...]} (time.perf_counter() seconds of this process).
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request


def stream(url: str, body: dict, t0: float, arrival: float) -> dict:
    time.sleep(max(0.0, arrival - (time.perf_counter() - t0)))
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    sent = time.perf_counter()
    events, text, usage = [], [], None
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                if c["text"]:
                    events.append(time.perf_counter())
                    text.append(c["text"])
    return {"sent": sent, "events": events, "end": time.perf_counter(), "usage": usage, "text": "".join(text)}


def main(requests_path: str, results_path: str) -> int:
    with open(requests_path) as f:
        spec = json.load(f)
    records = [None] * len(spec["bodies"])
    t0 = time.perf_counter()

    def client(i):
        try:
            records[i] = stream(spec["url"], spec["bodies"][i], t0, spec["arrivals"][i])
        except Exception as e:  # noqa: BLE001 - reported, and the run counts as failed
            records[i] = {"error": f"{type(e).__name__}: {e}"}

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(records))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with open(results_path, "w") as f:
        json.dump({"start": t0, "end": time.perf_counter(), "records": records}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
