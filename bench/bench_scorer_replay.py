"""Scorer batching without an engine: the score calls of 16 best-of-8 requests, replayed.

Isolates what `runtime/batching.py` can win for a CPU text scorer (no engine sharing the cores,
no generation noise): 16 callers each score 8 responses (texts from a rollout folder, or the
dev prompts as stand-ins) with the `relevance` scorer, arriving all at once ("burst") or one
every `gap` seconds ("spread", the gap = one unbatched call's time / threads, so the unbatched
path just keeps up). Modes: unbatched (each call alone in the scorer threads), batched with one
batch per scorer at a time (the old ScoreBatcher), batched with one batch per scorer thread
(the default now). Reports the mean latency per call (arrival → its scores: what
`alignment.latency.score_s` measures) and the scorer's cost per text at batch 8 and 128.
Writes scorer_replay.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ROOT, fmt, load_prompts, markdown_table, write_results


def workload(args) -> list[tuple[str, list[str]]]:
    """16 (prompt, 8 responses) calls."""
    if args.rollouts:
        rows = [json.loads(l) for l in (args.rollouts / "rollouts.jsonl").read_text().splitlines()]
        by_prompt: dict[str, list[str]] = {}
        for r in rows:
            by_prompt.setdefault(r.get("prompt_text") or r.get("prompt"), []).append(
                r.get("response") or r.get("text"))
        calls = [(p, rs[: args.n]) for p, rs in by_prompt.items() if len(rs) >= args.n]
    else:
        texts = load_prompts(args.prompts, None)
        calls = [(p, [(p + " ") * 3] * args.n) for p in texts]
    return (calls * args.callers)[: args.callers]


async def replay(ctx_score, calls, gap: float) -> float:
    async def one(i: int, prompt: str, responses: list[str]) -> float:
        await asyncio.sleep(i * gap)
        t0 = time.perf_counter()
        await ctx_score(prompt, responses)
        return time.perf_counter() - t0

    lat = await asyncio.gather(*(one(i, p, r) for i, (p, r) in enumerate(calls)))
    return sum(lat) / len(lat)


async def main_async(args) -> dict:
    from decoding.context import DecodeContext
    from decoding.request import DecodeRequest
    from decoding.types import Sample, Sampling
    from runtime.batching import BatchingContext, ScoreBatcher
    from runtime.scorers import RelevanceScorer

    scorer = RelevanceScorer()
    executor = ThreadPoolExecutor(args.threads, thread_name_prefix="scorer")
    calls = workload(args)

    def scorer_of(ctx):
        async def score(prompt, responses):
            req = DecodeRequest(prompt_ids=[1], prompt_text=prompt, sampling=Sampling(8))
            return await ctx.score(scorer, req, [Sample([1], r, [], "stop") for r in responses])
        return score

    def modes():
        return {"unbatched": DecodeContext(None, executor),
                "batched, 1 batch at a time": BatchingContext(
                    None, executor, batcher=ScoreBatcher(executor, args.window_ms / 1000, 1024,
                                                         concurrency=1)),
                f"batched, {args.threads} batches at a time": BatchingContext(
                    None, executor, batcher=ScoreBatcher(executor, args.window_ms / 1000, 1024))}

    scorer.score(*calls[0])  # warm-up (model load, first-call allocations)
    t0 = time.perf_counter()
    for p, rs in calls[:4]:
        scorer.score(p, rs)
    per_call = (time.perf_counter() - t0) / 4
    t0 = time.perf_counter()
    scorer.score_pairs([(p, r) for p, rs in calls for r in rs])
    per_text_big = (time.perf_counter() - t0) / sum(len(rs) for _, rs in calls)
    out = {"per_text_s_batch_8": per_call / args.n, "per_text_s_batch_all": per_text_big,
           "load_avg": os.getloadavg()[0], "rounds": []}
    for r in range(args.repeats):
        for pattern, gap in (("burst", 0.0), ("spread", per_call / args.threads)):
            row = {"round": r, "pattern": pattern, "gap_s": gap}
            for mode, ctx in modes().items():
                row[mode] = await replay(scorer_of(ctx), calls, gap)
            out["rounds"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    executor.shutdown(wait=False)
    return out


def report(res: dict, args) -> str:
    names = [k for k in res["rounds"][0] if k not in ("round", "pattern", "gap_s")]
    cells = []
    for pattern in ("burst", "spread"):
        rows = [r for r in res["rounds"] if r["pattern"] == pattern]
        base = sum(r["unbatched"] for r in rows) / len(rows)
        for m in names:
            v = sum(r[m] for r in rows) / len(rows)
            cells.append([pattern, m, fmt(v, ".3f"), f"{v / base:.2f}×"])
    return "\n".join([
        "# Scorer batching, replayed without an engine\n",
        f"{args.callers} calls × {args.n} responses, reward `relevance` (all-MiniLM-L6-v2 on "
        f"CPU), {args.threads} scorer threads, window {args.window_ms:g} ms, means of "
        f"{args.repeats} rounds; {os.cpu_count()} CPU cores shared with other jobs (load "
        f"average {res['load_avg']:.0f} at the start). Cost per text: "
        f"{1000 * res['per_text_s_batch_8']:.1f} ms in a call of {args.n}, "
        f"{1000 * res['per_text_s_batch_all']:.1f} ms in one batch of all "
        f"{args.callers * args.n}.\n",
        *markdown_table(["arrival", "mode", "latency s / call", "× unbatched"], cells)]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=Path, default=ROOT / "bench" / "prompts-dev.jsonl")
    ap.add_argument("--rollouts", type=Path, help="A rollout folder: its responses as texts.")
    ap.add_argument("--callers", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--window-ms", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    res = asyncio.run(main_async(args))
    write_results(args.out, "scorer_replay", report(res, args), res)


if __name__ == "__main__":
    main()
