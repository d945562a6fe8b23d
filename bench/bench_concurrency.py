"""Load curve: requests per second against requests in flight (1 … 128), one server, one run.

One `alignserve serve` (as bench/common.py starts it, with `--max-num-seqs` raised past every
point so that the engine, not its cap, sets the curve, and a KV cache that holds them), streamed
chat completions of the dev prompts, 64 new tokens, temperature 1, reward `relevance`:
  plain                  no alignment (n = 1)
  best_of_n N=8          8 engine sequences per request
  speculative_rejection  N = 32, the strategy's defaults (issue 27's rule)
At each concurrency c, a closed loop keeps c requests in flight until max(--min-requests, c)
requests have been answered. Per point: requests/s, engine tokens/s (every token the engine
generated: `usage.completion_tokens` for plain, `alignment.generated_tokens` otherwise), p50 and
p99 request latency, p50 time to the first streamed text, and the 1-minute load average.

The knee of a curve is the first concurrency whose doubling adds less than `--knee-gain` (10 %)
to its requests/s: past it, more requests in flight only queue. Measured in engine sequences
(c × N at the start of each request) it is what `--max-num-seqs` should allow; measured in plain
requests, what `--max-concurrent-requests` should admit before answering 429. Writes
concurrency.md / .json / .png under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

from common import (
    ROOT,
    alignserve_server,
    chat_body,
    figure,
    fmt,
    gather_bounded,
    load_prompts,
    load_range,
    markdown_table,
    stream_chat,
    write_results,
)

STRATEGIES = {  # label: (alignment or None, engine sequences per request at its start)
    "plain": (None, 1),
    "best_of_n N=8": ({"strategy": "best_of_n", "n": 8}, 8),
    "SpR N=32 (defaults)": ({"strategy": "speculative_rejection", "n": 32}, 32),
}


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0 ≤ q ≤ 1) by linear interpolation between order statistics."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])


async def run_point(client, prompts: list[str], args, label: str, c: int) -> dict:
    """max(min_requests, c) requests of one strategy, c in flight; the point's measurements."""
    alignment, per_request = STRATEGIES[label]
    if alignment is not None:
        alignment = {**alignment, "reward": args.reward}
    count = max(args.min_requests, c)
    items = [prompts[i % len(prompts)] for i in range(count)]

    async def one(prompt: str) -> dict:
        body = chat_body(prompt, args.max_tokens, alignment,
                         stream_options={"include_usage": True})
        out = await stream_chat(client, body)
        tokens = (out["alignment"]["generated_tokens"] if alignment is not None
                  else out["usage"]["completion_tokens"])
        return {"total_s": out["total_s"], "ttft_s": out["ttft_s"], "tokens": tokens}

    load0, t0 = os.getloadavg()[0], time.perf_counter()
    answers = await gather_bounded(one, items, c)
    wall = time.perf_counter() - t0
    totals = [a["total_s"] for a in answers]
    ttfts = [a["ttft_s"] for a in answers if a["ttft_s"] is not None]
    return {"strategy": label, "in_flight": c, "sequences": c * per_request, "requests": count,
            "wall_s": wall, "requests_per_s": count / wall,
            "tokens_per_s": sum(a["tokens"] for a in answers) / wall,
            "p50_s": statistics.median(totals), "p99_s": percentile(totals, 0.99),
            "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
            "load_avg": [load0, os.getloadavg()[0]]}


def knee(points: list[dict], gain: float) -> dict | None:
    """The first point whose doubled concurrency adds less than `gain` to requests/s (the
    last point measured when throughput still grew there; None below two points)."""
    pts = sorted(points, key=lambda p: p["in_flight"])
    for p, q in zip(pts, pts[1:]):
        if q["requests_per_s"] < p["requests_per_s"] * (1 + gain):
            return p
    return pts[-1] if len(pts) >= 2 else None


def plan(args) -> list[tuple[str, int]]:
    """(strategy, concurrency) in run order: each curve from 1 up, the cheapest curve first (a
    run cut short by --budget-min keeps whole low ends rather than one expensive point)."""
    return [(label, c) for label in args.strategies for c in args.concurrency
            if c * STRATEGIES[label][1] <= args.max_sequences]


def report(points: list[dict], args, elapsed: float, skipped: list[str]) -> str:
    head = ("# Load curve: requests/s against requests in flight\n\n"
            f"One `alignserve serve` (`--max-num-seqs {args.max_num_seqs}`, KV cache "
            f"{args.kv_cache_gib} GiB), streamed chat completions of the dev prompts, "
            f"{args.max_tokens} new tokens, temperature 1, reward `{args.reward}`; at each "
            f"concurrency c a closed loop answers max({args.min_requests}, c) requests. "
            f"{os.cpu_count()} CPU cores, no GPU; one run, {elapsed / 60:.0f} min; 1-minute load "
            f"average {load_range(points)}"
            + (f"; not run (out of time): {', '.join(skipped)}" if skipped else "") + ".\n")
    table = markdown_table(
        ["strategy", "in flight", "engine sequences", "requests", "req/s", "engine tok/s",
         "p50 latency s", "p99 latency s", "p50 first text s"],
        [[p["strategy"], p["in_flight"], p["sequences"], p["requests"],
          fmt(p["requests_per_s"], ".3f"), fmt(p["tokens_per_s"], ".0f"), fmt(p["p50_s"], ".1f"),
          fmt(p["p99_s"], ".1f"), fmt(p["ttft_p50_s"], ".1f")] for p in points])
    knees = []
    for label in args.strategies:
        k = knee([p for p in points if p["strategy"] == label], args.knee_gain)
        if k is not None:
            knees.append(f"- **{label}**: knee at {k['in_flight']} in flight = {k['sequences']} "
                         f"engine sequences ({k['requests_per_s']:.3f} req/s, "
                         f"{k['tokens_per_s']:.0f} engine tok/s, p99 {k['p99_s']:.1f} s)")
    foot = (f"\nKnee: the first concurrency whose doubling adds less than "
            f"{args.knee_gain:.0%} to requests/s.\n\n" + "\n".join(knees) + "\n")
    return head + "\n" + "\n".join(table) + "\n" + foot


def plot(points: list[dict], args, path: Path) -> None:
    with figure(path, ncols=3, size=(15, 4.5)) as (a_rps, a_lat, a_tok):
        for label in args.strategies:
            pts = sorted((p for p in points if p["strategy"] == label),
                         key=lambda p: p["in_flight"])
            if not pts:
                continue
            xs = [p["in_flight"] for p in pts]
            a_rps.plot(xs, [p["requests_per_s"] for p in pts], "o-", label=label)
            line = a_lat.plot(xs, [p["p50_s"] for p in pts], "o-", label=f"{label} p50")
            a_lat.plot(xs, [p["p99_s"] for p in pts], "x--", color=line[0].get_color(),
                       label=f"{label} p99")
            a_tok.plot([p["sequences"] for p in pts], [p["tokens_per_s"] for p in pts], "o-",
                       label=label)
        for ax, x, y in ((a_rps, "requests in flight", "requests / s"),
                         (a_lat, "requests in flight", "request latency s"),
                         (a_tok, "engine sequences in flight", "engine tokens / s")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel(x)
            ax.set_ylabel(y)
        a_lat.set_yscale("log")


async def main_async(args, t_start: float) -> None:
    import httpx

    prompts = load_prompts(args.prompts, 64, mixed=True)
    args.out.mkdir(parents=True, exist_ok=True)
    points: list[dict] = []
    skipped: list[str] = []
    flags = ["--max-num-seqs", str(args.max_num_seqs), "--kv-cache-gib", str(args.kv_cache_gib)]
    with alignserve_server(args.out / "concurrency-server.log", *flags) as base:
        async with httpx.AsyncClient(base_url=base, timeout=3600) as client:
            await run_point(client, prompts, args, "plain", 2)  # warm-up, not reported
            for label, c in plan(args):
                if args.budget_min and time.perf_counter() - t_start > 60 * args.budget_min:
                    skipped.append(f"{label} @ {c}")
                    continue
                points.append(await run_point(client, prompts, args, label, c))
                print(json.dumps(points[-1]), file=sys.stderr, flush=True)
                elapsed = time.perf_counter() - t_start
                write_results(args.out, "concurrency", report(points, args, elapsed, skipped),
                              points)
                plot(points, args, args.out / "concurrency.png")
    write_results(args.out, "concurrency",
                  report(points, args, time.perf_counter() - t_start, skipped), points)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--prompts", type=Path, default=ROOT / "bench" / "prompts-dev.jsonl")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    p.add_argument("--max-sequences", type=int, default=4096,
                   help="skip points that would start more engine sequences than this")
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--reward", default="relevance")
    p.add_argument("--max-num-seqs", type=int, default=1024)
    p.add_argument("--kv-cache-gib", type=float, default=6.0)
    p.add_argument("--knee-gain", type=float, default=0.10)
    p.add_argument("--budget-min", type=float, default=None,
                   help="stop starting new points after this many minutes")
    args = p.parse_args()
    asyncio.run(main_async(args, time.perf_counter()))


if __name__ == "__main__":
    main()
