"""Speculative rejection vs best-of-n on the real engine, side by side in one run.

Same engine (in-process vLLM), same prompts, same reward scorer, same sampling. For every
setting all prompts run concurrently (continuous batching), exactly as the server runs them.
Reports mean chosen reward, the improvement score relative to best-of-n's min/max range (as in
Sun et al. 2024), generated tokens per prompt, wall time, and the speed-up: the tokens best-of-n
needs to reach SpR's reward (log-interpolated along the best-of-n curve) over SpR's tokens.
Writes bench/results/spr.md, spr.json and spr.png (reward vs generated tokens, log scale).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from common import (
    ROOT,
    compute_per_prompt,
    curve,
    figure,
    fmt,
    load_prompts,
    log_interpolate,
    markdown_table,
    write_results,
)

from decoding.request import DecodeRequest, Objective
from decoding.strategies import STRATEGIES, options_for
from decoding.types import Sampling
from runtime.prompts import chat_prompt_ids
from runtime.settings import EngineSettings


async def run_setting(ctx, scorer, prompts, strategy, n, max_tokens, options):
    reqs = [DecodeRequest(prompt_ids=ids, prompt_text=text, n=n, objective=Objective(scorer),
                          sampling=Sampling(max_tokens=max_tokens, temperature=1.0),
                          options=options_for(strategy, options)) for ids, text in prompts]
    t0 = time.perf_counter()
    results = await asyncio.gather(*(STRATEGIES[strategy].run(r, ctx) for r in reqs))
    wall = time.perf_counter() - t0
    return {"strategy": strategy, "n": n, **options, "wall_s": wall,
            "mean_reward": sum(r.reward for r in results) / len(results),
            "tokens_per_prompt": sum(r.generated_tokens for r in results) / len(results),
            "rounds": sum(r.extra.get("rounds", 1) for r in results) / len(results),
            **compute_per_prompt(results)}


async def main_async(args) -> list[dict]:
    from runtime.startup import open_runtime

    settings = EngineSettings(max_model_len=1024, kv_cache_gib=3, default_reward=args.reward)
    async with open_runtime(settings) as rt:
        return await _run_all(rt, args)


async def _run_all(rt, args) -> list[dict]:
    from tqdm import tqdm

    scorer = rt.scorers.load_now(args.reward)
    tok = rt.engine.tokenizer
    prompts = [(chat_prompt_ids(tok, p), p)  # both kinds in a short run
               for p in load_prompts(args.prompts, args.limit, mixed=bool(args.limit))]
    settings = [("best_of_n", n, {}) for n in args.bon_n] + [
        ("speculative_rejection", n, {"alpha": a, "decision_tokens": args.decision_tokens,
                                      "growth": 2.0})
        for a in args.alphas for n in args.spr_n]
    await run_setting(rt.ctx, scorer, prompts[:2], "best_of_n", 2, 8, {})  # warm-up
    out = []
    for strategy, n, opts in tqdm(settings, desc="settings", file=sys.stderr):
        out.append(await run_setting(rt.ctx, scorer, prompts, strategy, n,
                                     args.max_tokens, opts))
        tqdm.write(json.dumps(out[-1]), file=sys.stderr)
    return out


def report(rows: list[dict], args) -> str:
    bon = [r for r in rows if r["strategy"] == "best_of_n"]
    lo, hi = min(r["mean_reward"] for r in bon), max(r["mean_reward"] for r in bon)
    curve_pts = [(r["tokens_per_prompt"], r["mean_reward"]) for r in bon]
    cells = []
    for r in rows:
        r["improvement"] = (r["mean_reward"] - lo) / (hi - lo) if hi > lo else float("nan")
        need = mark = None
        if r["strategy"] != "best_of_n":
            need, exact = log_interpolate(r["mean_reward"], curve_pts)
            r["speedup"] = need / r["tokens_per_prompt"]
            r["speedup_is_lower_bound"] = not exact
            mark = "" if exact else "≥ "
        cells.append([r["strategy"], r["n"], r.get("alpha", "–"), fmt(r["mean_reward"], ".4f"),
                      fmt(r["improvement"], ".2f"), fmt(r["tokens_per_prompt"], ".0f"),
                      fmt(r["wall_s"], ".1f"), 1 if need is None else fmt(r["rounds"], ".1f"),
                      "–" if need is None else f"{mark}{need:.0f}",
                      "–" if need is None else f"{mark}{r['speedup']:.2f}×"])
    lines = ["# speculative rejection vs best-of-n\n",
             f"{args.limit or 'all'} dev prompts, max_tokens {args.max_tokens}, temperature 1.0, "
             f"reward `{args.reward}`, SpR decision_tokens {args.decision_tokens}, growth 2; "
             "one engine, one run. Tokens = every token the engine generated, per prompt.\n",
             *markdown_table(["method", "N", "α", "mean reward", "improvement", "tokens/prompt",
                              "wall s", "rounds", "BoN tokens for same reward", "speed-up"], cells)]
    lines.append("\nImprovement = (reward − min BoN reward) / (max BoN − min BoN). "
                 "Speed-up = BoN tokens needed for SpR's reward / SpR's tokens; '≥' where SpR "
                 "beats the best best-of-n measured (the largest N's tokens are then a lower bound).")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        key = "best_of_n" if r["strategy"] == "best_of_n" else f"SpR α={r['alpha']}"
        groups.setdefault(key, []).append(r)
    with figure(path) as ax:
        for key, pts in groups.items():
            curve(ax, pts, "tokens_per_prompt", "mean_reward", key, tag=lambda p: f"N={p['n']}")
        ax.set_xscale("log")
        ax.set_xlabel("generated tokens per prompt (log)")
        ax.set_ylabel("mean chosen reward")
        ax.set_title("Speculative rejection vs best-of-n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=Path, default=ROOT / "bench" / "prompts-dev.jsonl")
    ap.add_argument("--limit", type=int, default=16, help="Prompts used (0: all).")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reward", default="relevance")
    ap.add_argument("--bon-n", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--spr-n", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--decision-tokens", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    rows = asyncio.run(main_async(args))
    md = report(rows, args)  # annotates the rows (improvement, speed-up) before they are saved
    write_results(args.out, "spr", md, rows)
    plot(rows, args.out / "spr.png")


if __name__ == "__main__":
    main()
