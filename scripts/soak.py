"""Soak test (`make soak`; not in CI): a mixed normal and hostile load against one server for a
while, then checks that nothing leaked.

    python scripts/soak.py                       # starts `alignserve serve`, 30 minutes
    python scripts/soak.py --duration 180        # 3 minutes
    python scripts/soak.py --base-url http://host:8000 --api-key KEY [--server-pid PID]

`--concurrency` workers each pick a scenario from a seeded weighted mix (`MIX`): plain and
best-of-n chat, completions, streams read to the end, streams dropped mid-way (abrupt
disconnects), slow readers, /tokenize, bad JSON, bodies over the limit (with and without
content-length). Concurrent streams come from the workers overlapping.

At the end, once the load has stopped, it asserts (exit 1 otherwise):
- no leaks: the gauges in `LEAK_GAUGES` read 0 on /metrics (requests in flight, engine requests
  unfinished, admission slots, policy leases, requests queued at the policy gate), polled for a
  while to let aborted work drain;
- no 5xx other than the designed 502/503/504, and each hostile scenario got its expected 4xx;
- the server's RSS (all processes of its process group: API process and engine core) grew by
  less than `--rss-bound` (default 10%) from the end of the warm-up to the end.
and prints a table of scenarios × outcomes and the checks.

The pure parts (`Mix`, `parse_metrics`, `leak_failures`, `rss_growth_failure`, `table`) are
unit-tested (tests/unit/test_hardening_soak.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALIGNSERVE = str(Path(sys.executable).parent / "alignserve")

# name -> weight. Hostile scenarios are a third of the load.
MIX: dict[str, int] = {
    "chat": 4, "best_of_n": 3, "completion": 2, "stream": 3, "tokenize": 2,
    "stream_disconnect": 3, "slow_reader": 1, "bad_json": 1, "over_limit": 1,
    "over_limit_chunked": 1,
}
# Statuses a scenario may end with besides 200 (429: the server is full, by design).
EXPECTED = {"bad_json": {400}, "over_limit": {413}, "over_limit_chunked": {413}}
DESIGNED_5XX = {502, 503, 504}
# Gauges that must read 0 once the load stops; the first two must exist.
LEAK_GAUGES = ("alignserve:requests_in_flight", "alignserve:engine_requests_unfinished",
               "alignserve:admission_slots_held", "alignserve:policy_leases_held",
               "alignserve:policy_gate_queued")
REQUIRED_GAUGES = LEAK_GAUGES[:2]


class Mix:
    """Seeded weighted choice of scenarios: the same seed gives the same sequence."""

    def __init__(self, weights: dict[str, int], seed: int) -> None:
        if not weights or min(weights.values()) < 0 or not sum(weights.values()):
            raise ValueError("weights must be non-negative with a positive sum")
        self.names, self.weights = list(weights), list(weights.values())
        self._rng = random.Random(seed)

    def next(self) -> str:
        return self._rng.choices(self.names, self.weights)[0]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {metric name: sum of its samples} (labels summed over)."""
    out: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            out[name] += float(value)
        except ValueError:
            continue
    return dict(out)


def leak_failures(metrics: dict[str, float]) -> list[str]:
    """What leaked: every LEAK_GAUGE present must be 0; the REQUIRED ones must be present."""
    failures = [f"{g} missing from /metrics" for g in REQUIRED_GAUGES if g not in metrics]
    failures += [f"{g} = {metrics[g]:g} after the load (leak)" for g in LEAK_GAUGES
                 if metrics.get(g, 0.0) != 0.0]
    return failures


def rss_growth_failure(before: int, after: int, bound: float) -> str | None:
    """None when RSS grew by less than `bound` (a fraction), else why not."""
    if before <= 0:
        return "no RSS baseline"
    growth = (after - before) / before
    if growth >= bound:
        return f"RSS grew {growth:.1%} ({before >> 20} → {after >> 20} MiB), bound {bound:.0%}"
    return None


def status_failures(outcomes: dict[str, Counter]) -> list[str]:
    """500s (or undesigned 5xx), and hostile scenarios that did not get their 4xx."""
    failures = []
    for name, counts in sorted(outcomes.items()):
        for status, n in counts.items():
            if isinstance(status, int) and status >= 500 and status not in DESIGNED_5XX:
                failures.append(f"{name}: {n} × HTTP {status}")
            if name in EXPECTED and isinstance(status, int) and status not in EXPECTED[name] | {429}:
                failures.append(f"{name}: {n} × HTTP {status}, expected {sorted(EXPECTED[name])}")
    return failures


def table(outcomes: dict[str, Counter], checks: list[tuple[str, str]]) -> str:
    """Scenarios × outcomes (status codes, 'dropped', 'error:<kind>'), then the checks."""
    cols = sorted({str(k) for c in outcomes.values() for k in c})
    head = ["scenario", *cols, "total"]
    rows = [[name, *(str(c.get(_key(col), 0)) for col in cols), str(sum(c.values()))]
            for name, c in sorted(outcomes.items())]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True))
             for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += ["", *(f"{name:<28} {result}" for name, result in checks)]
    return "\n".join(lines)


def _key(col: str) -> int | str:
    return int(col) if col.isdigit() else col


# -- the load ----------------------------------------------------------------------------


@dataclass
class Load:
    base_url: str
    headers: dict[str, str]
    model: str
    max_body_bytes: int
    outcomes: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))

    def chat(self, n_words: int, **extra) -> dict:
        return {"model": self.model, "max_tokens": 16, "messages": [
            {"role": "user", "content": "tell me something kind " * n_words}], **extra}

    async def run(self, client, name: str, rng: random.Random) -> None:
        try:
            outcome = await getattr(self, f"_{name}")(client, rng)
        except Exception as exc:  # noqa: BLE001  a client-side failure is an outcome too
            outcome = f"error:{type(exc).__name__}"
        self.outcomes[name][outcome] += 1

    async def _post(self, client, path: str, body: dict) -> int:
        return (await client.post(path, json=body, headers=self.headers)).status_code

    async def _chat(self, client, rng):
        return await self._post(client, "/v1/chat/completions", self.chat(rng.randint(1, 4)))

    async def _best_of_n(self, client, rng):
        return await self._post(client, "/v1/chat/completions", self.chat(
            2, alignment={"strategy": "best_of_n", "n": rng.choice([2, 4])}))

    async def _completion(self, client, rng):
        return await self._post(client, "/v1/completions", {
            "model": self.model, "prompt": "Once upon a time", "max_tokens": 16})

    async def _tokenize(self, client, rng):
        return await self._post(client, "/tokenize", {"prompt": "hello " * rng.randint(1, 500)})

    async def _stream(self, client, rng, keep: int | None = None, delay: float = 0.0):
        body = self.chat(2, stream=True, max_tokens=32)
        async with client.stream("POST", "/v1/chat/completions", json=body,
                                 headers=self.headers) as r:
            if r.status_code != 200:
                return r.status_code
            chunks = 0
            # small reads: a drop after 1–3 of them lands inside the stream, not after it
            async for _ in r.aiter_raw(64 if delay or keep else 4096):
                chunks += 1
                if keep is not None and chunks >= keep:
                    return "dropped"  # leaving the block closes the connection mid-stream
                if delay:
                    await asyncio.sleep(delay)
            return 200

    async def _stream_disconnect(self, client, rng):
        return await self._stream(client, rng, keep=rng.randint(1, 3))

    async def _slow_reader(self, client, rng):
        return await self._stream(client, rng, delay=0.2)

    async def _bad_json(self, client, rng):
        bad = rng.choice([b"{not json", b'{"model": ', b"\xff\xfe", b"[1, 2"])
        r = await client.post("/v1/chat/completions", content=bad,
                              headers={**self.headers, "Content-Type": "application/json"})
        return r.status_code

    async def _over_limit(self, client, rng):
        big = b'{"prompt": "' + b"x" * (self.max_body_bytes + 1) + b'"}'
        r = await client.post("/v1/completions", content=big,
                              headers={**self.headers, "Content-Type": "application/json"})
        return r.status_code

    async def _over_limit_chunked(self, client, rng):
        async def chunks():
            sent = 0
            while sent <= self.max_body_bytes:
                yield b"x" * 65536
                sent += 65536

        r = await client.post("/v1/completions", content=chunks(),
                              headers={**self.headers, "Content-Type": "application/json"})
        return r.status_code


async def drive(load: Load, mix: Mix, concurrency: int, duration_s: float, seed: int,
                on_warm: Callable[[], None], warm_s: float) -> None:
    import httpx

    deadline = time.monotonic() + duration_s
    warm_at, warmed = time.monotonic() + warm_s, False

    async def worker(i: int) -> None:
        nonlocal warmed
        rng = random.Random(seed * 1000 + i)
        async with httpx.AsyncClient(base_url=load.base_url, timeout=300) as client:
            while time.monotonic() < deadline:
                await load.run(client, mix.next(), rng)
                if not warmed and time.monotonic() >= warm_at:
                    warmed = True
                    on_warm()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))


# -- the server ----------------------------------------------------------------------------


def group_rss(pid: int) -> int:
    """Bytes of RSS of every process in `pid`'s process group (API process, engine core)."""
    pgid, total = os.getpgid(pid), 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError):
            if os.getpgid(int(entry.name)) != pgid:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def start_server(args, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [ALIGNSERVE, "serve", "--host", "127.0.0.1", "--port", str(port), "--max-model-len",
           "1024", "--max-body-bytes", str(args.max_body_bytes), *args.server_arg]
    env = {**os.environ, "ALIGNSERVE_KV_CACHE_GIB": os.environ.get("ALIGNSERVE_KV_CACHE_GIB", "2")}
    with open(log, "w") as fh:  # its own process group: killed as a whole at the end
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(base_url: str, proc: subprocess.Popen | None, timeout_s: float = 600) -> None:
    import httpx

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"soak: the server exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                return
        time.sleep(1)
    raise SystemExit("soak: the server did not become ready")


def settled_metrics(base_url: str, headers: dict, wait_s: float = 60) -> dict[str, float]:
    """/metrics once the leak gauges read 0 (aborted work drains), or after `wait_s`."""
    import httpx

    end = time.monotonic() + wait_s
    while True:
        m = parse_metrics(httpx.get(f"{base_url}/metrics", headers=headers, timeout=10).text)
        if not leak_failures(m) or time.monotonic() >= end:
            return m
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", help="Target this server instead of starting one.")
    p.add_argument("--server-pid", type=int, help="With --base-url: its pid, for the RSS check.")
    p.add_argument("--api-key", default=os.environ.get("SOAK_API_KEY"))
    p.add_argument("--metrics-token", default=None, help="Bearer token for /metrics.")
    p.add_argument("--duration", type=float, default=1800.0, help="Seconds of load (default 30 min).")
    p.add_argument("--warm-up", type=float, default=None,
                   help="Seconds before the RSS baseline (default: 10%% of the duration).")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rss-bound", type=float, default=0.10)
    p.add_argument("--max-body-bytes", type=int, default=1_000_000,
                   help="The server's max_body_bytes (the over-limit bodies exceed it).")
    p.add_argument("--server-arg", action="append", default=[],
                   help="Extra `alignserve serve` argument (repeatable; started servers only).")
    p.add_argument("--log", type=Path, default=Path("soak-server.log"))
    args = p.parse_args(argv)

    proc = None
    if args.base_url:
        base_url, pid = args.base_url.rstrip("/"), args.server_pid
    else:
        proc, base_url = start_server(args, args.log)
        pid = proc.pid
        print(f"soak: server pid {pid} at {base_url} (log {args.log})", flush=True)
    try:
        return _soak(args, base_url, pid, proc)
    finally:
        if proc is not None:  # the whole group: API process and engine core
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def _soak(args, base_url: str, pid: int | None, proc) -> int:
    import httpx

    wait_ready(base_url, proc)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    mheaders = {"Authorization": f"Bearer {args.metrics_token}"} if args.metrics_token else {}
    model = httpx.get(f"{base_url}/v1/models", headers=headers).json()["data"][0]["id"]
    load = Load(base_url, headers, model, args.max_body_bytes)
    rss: dict[str, int] = {}

    def on_warm() -> None:
        if pid is not None:
            rss["before"] = group_rss(pid)

    warm_s = args.warm_up if args.warm_up is not None else args.duration / 10
    t0 = time.monotonic()
    asyncio.run(drive(load, Mix(MIX, args.seed), args.concurrency, args.duration, args.seed,
                      on_warm, warm_s))
    elapsed = time.monotonic() - t0
    metrics = settled_metrics(base_url, mheaders)
    checks: list[tuple[str, str]] = []
    failures = leak_failures(metrics) + status_failures(load.outcomes)
    for g in LEAK_GAUGES:
        checks.append((g.removeprefix("alignserve:"), f"{metrics[g]:g}" if g in metrics else "n/a"))
    if pid is not None and "before" in rss:
        after = group_rss(pid)
        why = rss_growth_failure(rss["before"], after, args.rss_bound)
        failures += [why] if why else []
        checks.append(("rss MiB (warm → end)", f"{rss['before'] >> 20} → {after >> 20} "
                       f"({(after - rss['before']) / rss['before']:+.1%})"))
    total = sum(sum(c.values()) for c in load.outcomes.values())
    checks.append(("requests / elapsed", f"{total} in {elapsed:.0f} s"))
    checks.append(("result", "PASS" if not failures else "FAIL: " + "; ".join(failures)))
    print(table(load.outcomes, checks), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
