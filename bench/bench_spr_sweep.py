"""Speculative rejection's schedule, swept: decision_tokens × α × schedule at several answer
lengths, against best-of-n's curve, in one run on one engine (the data behind SpR's defaults).

For every length L (max_tokens): best-of-n at N ∈ --bon-n, then SpR at N = --n for each schedule
("growth", "memory"), first decision d ∈ L × --fractions, and α ∈ --alphas (α 0.75 only at the
first length unless --all-alphas), then one row with the strategy's defaults (no options): what a
user who does not tune gets. All prompts run concurrently, as the server runs them (in-process
engine, bench_spr.run_setting). Per row: mean chosen reward, tokens and wall time against
best-of-N at the same N, and the speed-up at equal reward: the wall time best-of-n needs for
SpR's reward (linear in log wall between measured N; '≥' beyond the best) over SpR's wall.
Writes spr_sweep.md, spr_sweep.json and spr_sweep.png (reward vs wall, one panel per length).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path

from bench_spr import run_setting
from common import (
    ROOT,
    curve,
    figure,
    fmt,
    load_prompts,
    log_interpolate,
    markdown_table,
    write_results,
)

from runtime.prompts import chat_prompt_ids
from runtime.settings import EngineSettings


def grid(args) -> list[tuple[int, str, dict]]:
    """(length, strategy, options) in run order; N is args.n unless the options name one."""
    rows: list[tuple[int, str, dict]] = []
    for li, length in enumerate(args.lengths):
        rows += [(length, "best_of_n", {"n": n}) for n in args.bon_n
                 if li == 0 or n >= args.n // 4]  # later lengths: the curve near SpR's reward
        alphas = args.alphas if (li == 0 or args.all_alphas) else args.alphas[:1]
        fractions = args.fractions if li == 0 else args.fractions[:args.later_fractions]
        for schedule in ("growth", "memory"):
            for frac in fractions:
                for a in alphas if frac < max(args.fractions) else alphas[:1]:
                    rows.append((length, "speculative_rejection",
                                 {"schedule": schedule, "alpha": a,
                                  "decision_tokens": max(1, round(length * frac))}))
        rows.append((length, "speculative_rejection", {}))  # the defaults
        if li == 0:  # the larger N at the first length: best-of-n's curve and SpR's defaults
            for n in args.extra_n:
                rows += [(length, "best_of_n", {"n": n}), (length, "speculative_rejection",
                                                          {"n": n})]
    return rows


async def sweep(args) -> list[dict]:
    from tqdm import tqdm

    from runtime.startup import open_runtime

    settings = EngineSettings(max_model_len=1024, kv_cache_gib=3, default_reward=args.reward)
    out: list[dict] = []
    async with open_runtime(settings) as rt:
        scorer = rt.scorers.load_now(args.reward)
        prompts = [(chat_prompt_ids(rt.engine.tokenizer, p), p)
                   for p in load_prompts(args.prompts, args.limit, mixed=True)]
        await run_setting(rt.ctx, scorer, prompts[:2], "best_of_n", 2, 8, {})  # warm-up
        deadline = time.monotonic() + 60 * args.budget_min if args.budget_min else None
        for length, strategy, opts in tqdm(grid(args), desc="settings", file=sys.stderr):
            if deadline and time.monotonic() > deadline:
                tqdm.write("budget spent: remaining settings skipped", file=sys.stderr)
                break
            opts = dict(opts)
            n = opts.pop("n", args.n)
            row = await run_setting(rt.ctx, scorer, prompts, strategy, n, length, opts)
            row.update(length=length, defaults=strategy != "best_of_n" and not opts)
            if row["defaults"]:  # what the defaults resolved to, for the report
                row["resolved"] = resolved(length, n)
            out.append(row)
            tqdm.write(json.dumps(row), file=sys.stderr)
    return out


def resolved(length: int, n: int) -> str:
    """The schedule the strategy's defaults give at this length and N."""
    from decoding.speculative_rejection import SpeculativeRejection, first_decision

    o = SpeculativeRejection.Options()
    return f"{o.schedule} d={first_decision(length, n, o.alpha)} α={o.alpha}"


def label(r: dict) -> str:
    if r["strategy"] == "best_of_n":
        return f"best-of-{r['n']}"
    if r["defaults"]:
        return f"SpR N={r['n']} defaults ({r['resolved']})"
    return f"SpR {r['schedule']} d={r['decision_tokens']} α={r['alpha']}"


def log_fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares reward = a + b·ln(wall) over best-of-n's points: with a few prompts the
    measured curve is not monotone (best-of-16 can beat best-of-32 by chance), the fit is."""
    if len(points) < 2:
        return None
    xs, ys = [math.log(w) for w, _ in points], [r for _, r in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return (my - b * mx, b) if b > 0 else None


def analyse(rows: list[dict]) -> None:
    """Adds wall / tokens ratios to best-of-n at the same N and the equal-reward speed-up."""
    for length in sorted({r["length"] for r in rows}):
        mine = [r for r in rows if r["length"] == length]
        bon = [r for r in mine if r["strategy"] == "best_of_n"]
        wall_curve = [(r["wall_s"], r["mean_reward"]) for r in bon]
        fit = log_fit(wall_curve)
        for r in mine:
            if r["strategy"] == "best_of_n" or not wall_curve:
                continue
            ref = next((b for b in bon if b["n"] == r["n"]), None)
            if ref is not None:
                r["wall_vs_bon"] = r["wall_s"] / ref["wall_s"]
                r["tokens_vs_bon"] = r["tokens_per_prompt"] / ref["tokens_per_prompt"]
            need, exact = log_interpolate(r["mean_reward"], wall_curve)
            r["equal_reward_speedup"], r["speedup_exact"] = need / r["wall_s"], exact
            if fit is not None:  # the same against the fitted curve (less noisy)
                r["fitted_speedup"] = math.exp((r["mean_reward"] - fit[0]) / fit[1]) / r["wall_s"]


def report(rows: list[dict], args) -> str:
    lines = ["# speculative rejection: the schedule sweep\n",
             f"{args.limit} dev prompts (both kinds) in flight at once, reward `{args.reward}`, "
             f"temperature 1, SpR N = {args.n}; one in-process engine, one run. d = tokens "
             "before the first decision. Ratios: to best-of-n at the same N and length. "
             "Speed-up at equal reward: best-of-n's wall for SpR's reward (linear in log wall "
             "between the measured N; '≥' where SpR beats the largest N) / SpR's wall; on the fitted curve: "
             "the same against a least-squares fit reward = a + b·ln(wall) over best-of-n's rows "
             "(with few prompts the measured curve need not be monotone).\n"]
    for length in sorted({r["length"] for r in rows}):
        cells = []
        for r in (r for r in rows if r["length"] == length):
            spr = r["strategy"] != "best_of_n"
            mark = "" if r.get("speedup_exact", True) else "≥ "
            cells.append([label(r), fmt(r["mean_reward"], ".4f"), fmt(r["tokens_per_prompt"], ".0f"),
                          fmt(r["wall_s"], ".1f"), fmt(r["rounds"], ".1f") if spr else "1",
                          fmt(r.get("tokens_vs_bon"), ".2f") if spr else "–",
                          fmt(r.get("wall_vs_bon"), ".2f") if spr else "–",
                          f"{mark}{r['equal_reward_speedup']:.2f}×"
                          if "equal_reward_speedup" in r else "–",
                          f"{r['fitted_speedup']:.2f}×" if "fitted_speedup" in r else "–"])
        lines += [f"\n## {length} new tokens\n",
                  *markdown_table(["setting", "mean reward", "tokens/prompt", "wall s", "rounds",
                                   "tokens / BoN (same N)", "wall / BoN (same N)",
                                   "speed-up at equal reward", "… on the fitted curve"],
                                  cells)]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    lengths = sorted({r["length"] for r in rows})
    with figure(path, ncols=len(lengths), size=(5 * len(lengths), 4.5), legend_size=7) as axes:
        for ax, length in zip(axes if len(lengths) > 1 else [axes], lengths):
            mine = [r for r in rows if r["length"] == length]
            curve(ax, [r for r in mine if r["strategy"] == "best_of_n"], "wall_s", "mean_reward",
                  "best-of-n", tag=lambda p: f"N={p['n']}")
            for schedule, style in (("growth", "s"), ("memory", "^")):
                pts = [r for r in mine if r.get("schedule") == schedule and not r["defaults"]]
                ax.plot([p["wall_s"] for p in pts], [p["mean_reward"] for p in pts], style,
                        label=f"SpR {schedule}", alpha=0.7)
            for p in (r for r in mine if r["defaults"]):
                ax.plot([p["wall_s"]], [p["mean_reward"]], "*", markersize=14,
                        label=f"SpR N={p['n']} defaults")
            ax.set_xscale("log")
            ax.set_title(f"{length} new tokens")
            ax.set_xlabel("wall s (log)")
            ax.set_ylabel("mean chosen reward")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=Path, default=ROOT / "bench" / "prompts-dev.jsonl")
    ap.add_argument("--limit", type=int, default=8, help="Prompts in flight per row.")
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--n", type=int, default=32, help="SpR's N.")
    ap.add_argument("--bon-n", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--extra-n", type=int, nargs="*", default=[64],
                    help="At the first length only: best-of-n and SpR (defaults) at these N.")
    ap.add_argument("--fractions", type=float, nargs="+", default=[1 / 16, 1 / 8, 1 / 4],
                    help="First decision at these fractions of the length.")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--all-alphas", action="store_true", help="Every α at every length.")
    ap.add_argument("--later-fractions", type=int, default=2,
                    help="After the first length, only the first this many --fractions.")
    ap.add_argument("--reward", default="relevance")
    ap.add_argument("--budget-min", type=float, help="Start no row after this many minutes.")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--report-only", type=Path, metavar="JSON",
                    help="Rebuild the report and figure from a previous run's spr_sweep.json.")
    args = ap.parse_args()
    rows = (json.loads(args.report_only.read_text()) if args.report_only
            else asyncio.run(sweep(args)))
    analyse(rows)
    write_results(args.out, "spr_sweep", report(rows, args), rows)
    plot(rows, args.out / "spr_sweep.png")


if __name__ == "__main__":
    main()
