"""What the benchmarks share: the repository on sys.path, the prompt file, an `alignserve serve`
subprocess (any server: `server_process`) and the HTTP requests sent to it (bounded in flight),
vLLM's prefix-cache counters, markdown tables and result files, figures, and the
log-interpolated best-of-n curve that speed-ups at equal reward are read from; headless
matplotlib and the prompt file come from runtime/."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the benchmarks run as scripts and import the project's packages
ALIGNSERVE = str(Path(sys.executable).parent / "alignserve")
# every server a benchmark starts, vLLM's own included, compiles the same way (runtime/engine.py:
# vLLM's AOT compile cache cannot be loaded back on CPU)
os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")

from runtime.plotting import pyplot  # noqa: E402, F401  (re-exported: what every benchmark plots with)
from runtime.prompts import prompt_texts as load_prompts  # noqa: E402, F401  (the prompts as strings)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def alignserve_server(log_path: Path, *flags: str) -> Iterator[str]:
    """A server on a free port (its base URL), ready to answer; always stopped afterwards."""
    port = free_port()
    cmd = [ALIGNSERVE, "serve", "--port", str(port), "--max-model-len", "1024",
           "--kv-cache-gib", "2", "--max-concurrent-requests", "256", *flags]
    with server_process(cmd, port, "/ready", log_path) as base:
        yield base


@contextlib.contextmanager
def server_process(cmd: Sequence[str], port: int, probe: str, log_path: Path) -> Iterator[str]:
    """Run `cmd` (a server listening on `port`) in its own process group; yield its base URL
    once `probe` answers 200; stop it afterwards whatever happened (SIGTERM: the server stops
    its engine; then the group is killed, so no engine process outlives the benchmark)."""
    import httpx

    log = open(log_path, "w")
    proc = subprocess.Popen(list(cmd), stdout=log, stderr=log, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(900):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}{probe}", timeout=2).status_code == 200:
                    break
            time.sleep(1)
        else:
            raise RuntimeError(f"server did not start; see {log_path}")
        yield base
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=90)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


# ---------------------------------------------------------------- requests to a running server

T = TypeVar("T")


async def gather_bounded(fn: Callable[[Any], Awaitable[T]], items: Iterable[Any],
                         in_flight: int | None = None) -> list[T]:
    """`fn(item)` for every item, at most `in_flight` at once (None: all at once), results in
    item order: how every benchmark loads a server."""
    gate = asyncio.Semaphore(in_flight) if in_flight else None

    async def bounded(item):
        if gate is None:
            return await fn(item)
        async with gate:
            return await fn(item)

    return list(await asyncio.gather(*(bounded(i) for i in items)))


def chat_body(prompt: str, max_tokens: int, alignment: dict | None = None, **fields) -> dict:
    """A chat completion for one user message at temperature 1 (the benchmarks' sampling)."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 1.0, **fields}
    if alignment:
        body["alignment"] = alignment
    return body


async def post_chat(client, body: dict) -> dict:
    """POST a (non-streamed) chat completion; the response's JSON."""
    r = await client.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    return r.json()


async def stream_chat(client, body: dict) -> dict:
    """A streamed chat completion: the text, the time to its first non-empty content
    (`ttft_s`), the arrival of every content delta (`deltas_s`), the whole request's time
    (`total_s`), the last `alignment` and `usage` seen."""
    t0 = time.perf_counter()
    out: dict = {"ttft_s": None, "deltas_s": [], "text": "", "alignment": None, "usage": None}
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            for choice in event.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    out["deltas_s"].append(time.perf_counter() - t0)
                    out["ttft_s"] = out["ttft_s"] or out["deltas_s"][-1]
                    out["text"] += piece
            out["alignment"] = event.get("alignment") or out["alignment"]
            out["usage"] = event.get("usage") or out["usage"]
    out["total_s"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------- tables, result files, figures

def load_range(rows: Sequence[dict], spec: str = ".1f") -> str:
    """'a–b': the lowest and highest 1-minute load average over rows that record theirs as
    `load_avg` = [at start, at end] (the machine's current one when no row has run yet)."""
    loads = [x for r in rows for x in r["load_avg"]] or [os.getloadavg()[0]]
    return f"{min(loads):{spec}}–{max(loads):{spec}}"


def fmt(value: Any, spec: str = "") -> str:
    """One table cell: '–' for a missing value (None or NaN), else `format(value, spec)`."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """The lines of a GitHub markdown table (cells already formatted, or str()-ed here)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def write_results(out: Path, name: str, markdown: str, data: Any) -> None:
    """`name`.md and `name`.json under `out` (created), and the markdown on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(markdown)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    print(markdown)


@contextlib.contextmanager
def figure(path: Path, ncols: int = 1, size: tuple[float, float] = (7, 4.5),
           legend_size: int = 8) -> Iterator[Any]:
    """Axes to draw on (one, or a tuple of `ncols`); on exit each gets a light grid and a
    legend where something is labelled, and the figure is saved to `path` and closed."""
    plt = pyplot()
    fig, axes = plt.subplots(1, ncols, figsize=size)
    yield axes
    for ax in (axes if ncols > 1 else [axes]):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=legend_size)
    save(fig, path)
    plt.close(fig)


def curve(ax, points: Sequence[dict], x: str, y: str, label: str, style: str = "o-",
          tag: Callable[[dict], str] | None = None) -> None:
    """One line through `points` (dicts) sorted by `x`, each point optionally tagged."""
    pts = sorted(points, key=lambda p: p[x])
    ax.plot([p[x] for p in pts], [p[y] for p in pts], style, label=label)
    for p in pts if tag else ():
        ax.annotate(tag(p), (p[x], p[y]), fontsize=7, textcoords="offset points", xytext=(3, 3))


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------- vLLM's prefix-cache counters

PREFIX_HITS, PREFIX_QUERIES = "vllm:prefix_cache_hits", "vllm:prefix_cache_queries"


def prefix_cache_counts(metrics_text: str) -> tuple[float, float]:
    """(hits, queries) in tokens, summed over engines, from a Prometheus text exposition
    (alignserve's /metrics, or `prometheus_client.generate_latest()` in-process). vLLM counts
    prompt tokens looked up in the prefix cache (queries) and those found there (hits)."""
    totals = counter_totals(metrics_text, (PREFIX_HITS, PREFIX_QUERIES))
    return totals[PREFIX_HITS], totals[PREFIX_QUERIES]


def prefix_cache_hit_rate(before: str, after: str) -> float | None:
    """Share of prompt tokens served from the prefix cache between two /metrics snapshots
    (None when no prompt tokens were looked up in between)."""
    (h0, q0), (h1, q1) = prefix_cache_counts(before), prefix_cache_counts(after)
    return (h1 - h0) / (q1 - q0) if q1 > q0 else None


def scrape(base_url: str) -> str:
    """The server's /metrics text."""
    import httpx

    return httpx.get(f"{base_url}/metrics", timeout=30).text


def counter_totals(metrics_text: str, names: Sequence[str]) -> dict[str, float]:
    """Totals of Prometheus counters `names` (without `_total`), summed over label sets."""
    totals = dict.fromkeys(names, 0.0)
    for line in metrics_text.splitlines():
        base = line.split("{", 1)[0].split(" ", 1)[0].removesuffix("_total")
        if base in totals and not line.startswith("#"):
            totals[base] += float(line.rsplit(" ", 1)[1])
    return totals


# ---------------------------------------------------------------- compute of aligned answers

COMPUTE_FIELDS = ("generated_tokens", "scorer_calls", "scored_tokens")


def compute_per_prompt(results: Sequence[Any]) -> dict[str, float | None]:
    """Mean compute per answer: engine tokens (`generated_tokens`), and the scorer's share —
    answers handed to scorers (`scorer_calls`) and the response tokens they read
    (`scored_tokens`; decoding/scorer_work.py), every partial answer of every speculative
    rejection decision point included. `results`: DecodeResults (in-process benchmarks) or
    alignment dicts (from the HTTP API). A field no result reports is None, never 0."""
    def get(r, key):
        if isinstance(r, dict):
            return r.get(key)
        return getattr(r, key) if key == "generated_tokens" else r.extra.get(key)

    out: dict[str, float | None] = {}
    for key in COMPUTE_FIELDS:
        values = [get(r, key) for r in results]
        out[f"{key}_per_prompt"] = (sum(values) / len(values)
                                    if values and None not in values else None)
    return out


# ---------------------------------------------------------------- the best-of-n curve

def log_interpolate(value: float, points: Sequence[tuple[float, float]]) -> tuple[float, bool]:
    """The cost (x) at which a curve of (cost, value) points reaches `value`, linear in
    log(cost) between neighbours (points ordered by cost). Returns (cost, exact): at or below
    the cheapest point, its cost; beyond the best point, that point's cost, a lower bound
    (exact=False)."""
    pts = sorted(points)
    best = max(pts, key=lambda p: p[1])
    if value >= best[1]:
        return best[0], value == best[1]
    if value <= pts[0][1]:
        return pts[0][0], True
    for (c0, v0), (c1, v1) in zip(pts, pts[1:]):
        if min(v0, v1) <= value <= max(v0, v1) and v1 != v0:
            f = (value - v0) / (v1 - v0)
            return math.exp(math.log(c0) + f * (math.log(c1) - math.log(c0))), True
    return best[0], False
