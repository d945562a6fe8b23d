"""Load on loopback against the session server (real vLLM engine): 32 concurrent clients, a fixed
number of requests mixing strategies (plain, best-of-n, soft best-of-n, speculative rejection;
JSON and SSE), small n and max_tokens so that 2 CPU cores finish in about a minute. Bounded in
count (REQUESTS) and time (DEADLINE_S). Every request must succeed; latency percentiles print
with `pytest -s`.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import time

import httpx
import pytest
from live import ROOT

pytestmark = pytest.mark.integration

CONCURRENCY = 32
REQUESTS = 96
DEADLINE_S = 480
MIX = [
    ("none", {}),
    ("best_of_n", {"strategy": "best_of_n", "n": 2}),
    ("soft_best_of_n", {"strategy": "soft_best_of_n", "n": 2, "temperature": 0.5}),
    ("speculative_rejection", {"strategy": "speculative_rejection", "n": 4, "alpha": 0.5,
                               "decision_tokens": 4}),
]
PROMPTS = ["Give me a tip for learning Python.", "Name a fruit and describe it.",
           "What is a good name for a cat?", "Say something kind about Mondays."]


def request_for(i: int, model: str) -> tuple[str, dict]:
    name, alignment = MIX[i % len(MIX)]
    body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": 12, "temperature": 0.8, "stream": i % 3 == 0}
    if alignment:
        body["alignment"] = alignment
    return name, body


def check(response: httpx.Response, stream: bool) -> str | None:
    """None when the answer is a complete success, else what went wrong."""
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    if not stream:
        body = response.json()
        return None if body["choices"][0]["finish_reason"] in ("stop", "length") else "no finish"
    data = [l[6:] for l in response.text.splitlines() if l.startswith("data: ")]
    if not data or data[-1] != "[DONE]":
        return "stream did not end with [DONE]"
    events = [json.loads(d) for d in data[:-1]]
    if any("error" in e for e in events):
        return f"in-band error: {[e for e in events if 'error' in e][0]}"
    if not any(e["choices"] and e["choices"][0]["finish_reason"] for e in events):
        return "stream without finish_reason"
    return None


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def test_concurrent_mixed_load_has_zero_errors(server, model_name):
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(REQUESTS):
        queue.put_nowait(i)
    results: list[tuple[str, float, str | None]] = []
    peak_in_flight = 0

    async def worker(client: httpx.AsyncClient):
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            name, body = request_for(i, model_name)
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/chat/completions", json=body)
                problem = check(r, body["stream"])
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            results.append((name, time.perf_counter() - t0, problem))

    async def watch_in_flight(client: httpx.AsyncClient):
        nonlocal peak_in_flight
        while True:
            text = (await client.get("/metrics")).text
            for line in text.splitlines():
                if line.startswith("alignserve:requests_in_flight "):
                    peak_in_flight = max(peak_in_flight, int(float(line.split()[1])))
            await asyncio.sleep(0.5)

    limits = httpx.Limits(max_connections=CONCURRENCY + 1)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=300, limits=limits) as client:
        watcher = asyncio.create_task(watch_in_flight(client))
        t0 = time.perf_counter()
        async with asyncio.timeout(DEADLINE_S):
            await asyncio.gather(*(worker(client) for _ in range(CONCURRENCY)))
        wall = time.perf_counter() - t0
        watcher.cancel()

    errors = [(n, p) for n, _, p in results if p]
    latencies = [t for _, t, _ in results]
    print(f"\nload: {len(results)} requests, concurrency {CONCURRENCY}, {len(errors)} errors, "
          f"wall {wall:.1f} s, {len(results) / wall:.2f} req/s, peak in flight {peak_in_flight}")
    print(f"load: latency p50 {pct(latencies, 50):.2f} s, p95 {pct(latencies, 95):.2f} s, "
          f"max {max(latencies):.2f} s")
    for name, _ in MIX:
        mine = [t for n, t, _ in results if n == name]
        print(f"load:   {name:<22} n={len(mine):<3} p50 {pct(mine, 50):.2f} s  "
              f"p95 {pct(mine, 95):.2f} s")
    assert len(results) == REQUESTS
    assert errors == [], errors[:5]
    assert peak_in_flight >= CONCURRENCY // 2  # the load really was concurrent


def test_metrics_the_deployment_relies_on_are_served(server):
    """The HPA (via Prometheus Adapter) and the Grafana dashboard read these series."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
             if line and not line.startswith("#")}
    for metric in ("vllm:num_requests_waiting", "alignserve:requests_in_flight",
                   "alignserve:engine_requests_unfinished", "alignserve:draining"):
        assert metric in names, metric
    # every vllm:* series a dashboard panel reads (TTFT, ITL, KV cache, prefix cache, ...)
    dashboard = (ROOT / "deploy" / "monitoring" / "grafana-dashboard.json").read_text()
    used = set(re.findall(r"\b(vllm:[a-zA-Z0-9_]+)", dashboard))
    assert len(used) >= 7 and used <= names, used - names
