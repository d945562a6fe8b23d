"""What the benchmarks share: the repository on sys.path, the prompt file, an `alignserve serve`
subprocess, and headless matplotlib."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the benchmarks run as scripts and import the project's packages
ALIGNSERVE = str(Path(sys.executable).parent / "alignserve")


def load_prompts(path: Path, limit: int | None) -> list[str]:
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    return [r["prompt"] for r in rows][:limit or None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def alignserve_server(log_path: Path, *flags: str) -> Iterator[str]:
    """A server on a free port (its base URL), ready to answer; always stopped afterwards."""
    import httpx

    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([ALIGNSERVE, "serve", "--port", str(port), "--max-model-len", "1024",
                             "--kv-cache-gib", "2", "--max-concurrent-requests", "256", *flags],
                            stdout=log, stderr=log,
                            start_new_session=True)  # its own process group: see `finally`
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(900):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}")
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise RuntimeError(f"server did not start; see {log_path}")
        yield base
    finally:
        # The server stops its engine on SIGTERM; the group kill is a safety net so that no
        # engine process outlives the benchmark whatever happened.
        proc.terminate()
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (benchmarks run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------- vLLM's prefix-cache counters

PREFIX_HITS, PREFIX_QUERIES = "vllm:prefix_cache_hits", "vllm:prefix_cache_queries"


def prefix_cache_counts(metrics_text: str) -> tuple[float, float]:
    """(hits, queries) in tokens, summed over engines, from a Prometheus text exposition
    (alignserve's /metrics, or `prometheus_client.generate_latest()` in-process). vLLM counts
    prompt tokens looked up in the prefix cache (queries) and those found there (hits)."""
    totals = {PREFIX_HITS: 0.0, PREFIX_QUERIES: 0.0}
    for line in metrics_text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        base = name.removesuffix("_total")  # prometheus_client adds `_total` to counters
        if base in totals and not line.startswith("#"):
            totals[base] += float(line.rsplit(" ", 1)[1])
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
