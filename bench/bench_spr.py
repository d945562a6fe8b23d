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
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ROOT, pyplot, save


def bon_tokens_for(reward: float, bon: list[dict]) -> tuple[float, bool]:
    """Tokens best-of-n needs for `reward`, linear in log(tokens) between measured points.
    Returns (tokens, exact); beyond the curve's best point, the largest N measured is a lower
    bound (exact=False)."""
    pts = sorted((r["tokens_per_prompt"], r["mean_reward"]) for r in bon)
    best = max(pts, key=lambda p: p[1])
    if reward >= best[1]:
        return best[0], reward == best[1]
    if reward <= pts[0][1]:
        return pts[0][0], True
    for (t0, r0), (t1, r1) in zip(pts, pts[1:]):
        if min(r0, r1) <= reward <= max(r0, r1) and r1 != r0:
            f = (reward - r0) / (r1 - r0)
            return math.exp(math.log(t0) + f * (math.log(t1) - math.log(t0))), True
    return best[0], False


async def run_setting(engine, executor, scorer, prompts, strategy, n, max_tokens, options):
    from decoding.protocols import DecodeContext, DecodeRequest, Objective, Sampling
    from decoding.strategies import STRATEGIES, options_for

    ctx = DecodeContext(engine, executor)
    reqs = [DecodeRequest(prompt_ids=ids, prompt_text=text, n=n, objective=Objective(scorer),
                          sampling=Sampling(max_tokens=max_tokens, temperature=1.0),
                          options=options_for(strategy, options)) for ids, text in prompts]
    t0 = time.perf_counter()
    results = await asyncio.gather(*(STRATEGIES[strategy].run(r, ctx) for r in reqs))
    wall = time.perf_counter() - t0
    return {"strategy": strategy, "n": n, **options, "wall_s": wall,
            "mean_reward": sum(r.reward for r in results) / len(results),
            "tokens_per_prompt": sum(r.generated_tokens for r in results) / len(results),
            "rounds": sum(r.extra.get("rounds", 1) for r in results) / len(results)}


async def main_async(args) -> list[dict]:
    from tqdm import tqdm

    from server.engine import VllmEngine
    from server.model_prep import prepare_embedded_model
    from server.scorers import ScorerRegistry, default_factories
    from server.settings import Settings

    engine = VllmEngine(str(prepare_embedded_model(Settings().home)), max_model_len=1024,
                        kv_cache_gib=3)
    executor = ThreadPoolExecutor(2)
    scorer = ScorerRegistry(default_factories(64), executor).load_now(args.reward)
    tok = engine.tokenizer
    rows = [json.loads(l) for l in args.prompts.read_text().splitlines() if l.strip()]
    if args.limit:  # keep both kinds: alternate helpful and adversarial
        helpful = [r for r in rows if r.get("kind") != "adversarial"]
        adv = [r for r in rows if r.get("kind") == "adversarial"]
        rows = [r for pair in zip(helpful, adv) for r in pair][: args.limit]
    prompts = []
    for r in rows:
        text = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                       add_generation_prompt=True)
        prompts.append((tok.encode(text, add_special_tokens=False), r["prompt"]))
    settings = [("best_of_n", n, {}) for n in args.bon_n] + [
        ("speculative_rejection", n, {"alpha": a, "decision_tokens": args.decision_tokens,
                                      "growth": 2.0})
        for a in args.alphas for n in args.spr_n]
    await run_setting(engine, executor, scorer, prompts[:2], "best_of_n", 2, 8, {})  # warm-up
    out = []
    for strategy, n, opts in tqdm(settings, desc="settings", file=sys.stderr):
        out.append(await run_setting(engine, executor, scorer, prompts, strategy, n,
                                     args.max_tokens, opts))
        tqdm.write(json.dumps(out[-1]), file=sys.stderr)
    engine.shutdown()
    return out


def report(rows: list[dict], args) -> str:
    bon = [r for r in rows if r["strategy"] == "best_of_n"]
    lo, hi = min(r["mean_reward"] for r in bon), max(r["mean_reward"] for r in bon)
    lines = ["# speculative rejection vs best-of-n\n",
             f"{args.limit or 'all'} dev prompts, max_tokens {args.max_tokens}, temperature 1.0, "
             f"reward `{args.reward}`, SpR decision_tokens {args.decision_tokens}, growth 2; "
             "one engine, one run. Tokens = every token the engine generated, per prompt.\n",
             "| method | N | α | mean reward | improvement | tokens/prompt | wall s | rounds | "
             "BoN tokens for same reward | speed-up |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        imp = (r["mean_reward"] - lo) / (hi - lo) if hi > lo else float("nan")
        r["improvement"] = imp
        if r["strategy"] == "best_of_n":
            lines.append(f"| best_of_n | {r['n']} | – | {r['mean_reward']:.4f} | {imp:.2f} | "
                         f"{r['tokens_per_prompt']:.0f} | {r['wall_s']:.1f} | 1 | – | – |")
            continue
        need, exact = bon_tokens_for(r["mean_reward"], bon)
        r["speedup"] = need / r["tokens_per_prompt"]
        r["speedup_is_lower_bound"] = not exact
        mark = "" if exact else "≥ "
        lines.append(f"| speculative_rejection | {r['n']} | {r['alpha']} | {r['mean_reward']:.4f} "
                     f"| {imp:.2f} | {r['tokens_per_prompt']:.0f} | {r['wall_s']:.1f} | "
                     f"{r['rounds']:.1f} | {mark}{need:.0f} | {mark}{r['speedup']:.2f}× |")
    lines.append("\nImprovement = (reward − min BoN reward) / (max BoN − min BoN). "
                 "Speed-up = BoN tokens needed for SpR's reward / SpR's tokens; '≥' where SpR "
                 "beats the best best-of-n measured (the largest N's tokens are then a lower bound).")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        key = "best_of_n" if r["strategy"] == "best_of_n" else f"SpR α={r['alpha']}"
        groups.setdefault(key, []).append(r)
    for key, pts in groups.items():
        pts.sort(key=lambda r: r["tokens_per_prompt"])
        ax.plot([p["tokens_per_prompt"] for p in pts], [p["mean_reward"] for p in pts], "o-",
                label=key)
        for p in pts:
            ax.annotate(f"N={p['n']}", (p["tokens_per_prompt"], p["mean_reward"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per prompt (log)")
    ax.set_ylabel("mean chosen reward")
    ax.set_title("Speculative rejection vs best-of-n")
    ax.grid(True, alpha=0.3)
    ax.legend()
    save(fig, path)


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
    args.out.mkdir(parents=True, exist_ok=True)
    rows = asyncio.run(main_async(args))
    md = report(rows, args)
    (args.out / "spr.md").write_text(md)
    (args.out / "spr.json").write_text(json.dumps(rows, indent=2))
    plot(rows, args.out / "spr.png")
    print(md)


if __name__ == "__main__":
    main()
