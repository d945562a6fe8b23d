"""Blockwise controlled decoding vs best-of-n on the real engine, over HTTP, in one run.

Pipeline (a step is skipped when its output already exists under --work):
  1. `alignserve rollouts`: K samples per dev prompt from the reference policy, scored by the reward;
  2. `alignserve train-value --method fudge`: a prefix value head on those rollouts;
  3. one `alignserve serve --value-head fudge=HEAD`, then for every setting all prompts are sent
     at once, streamed:
       blockwise_cd, K ∈ {2, 4, 8} × M ∈ {8, 16, 32}, value = the FUDGE head (`value:fudge`)
                     and value = the reward scorer itself applied to the partial text;
       best_of_n, K ∈ {2, 4, 8} (the same reward).
Reports the mean chosen reward, generated tokens per prompt, time to the first streamed text
(TTFT) and total time per request; writes cd.md, cd.json and cd.png. The head is trained on
rollouts of the same prompts that are benchmarked (held-in prompts, fresh samples): say so
when quoting it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import (
    ALIGNSERVE,
    ROOT,
    alignserve_server,
    chat_body,
    curve,
    figure,
    fmt,
    gather_bounded,
    load_prompts,
    markdown_table,
    stream_chat,
    write_results,
)


def offline_steps(args) -> Path:
    """Rollouts and the FUDGE head (each reused when present); returns the head's folder."""
    rollouts, head = args.work / "rollouts", args.work / "head-fudge"
    if not (rollouts / "manifest.json").is_file() or args.fresh:
        subprocess.run([ALIGNSERVE, "rollouts", "--prompts", str(args.prompts), "--n",
                        str(args.rollout_n), "--max-tokens", str(args.max_tokens), "--reward",
                        args.reward, "--out", str(rollouts)], check=True)
    if not (head / "config.json").is_file() or args.fresh:
        subprocess.run([ALIGNSERVE, "train-value", "--data", str(rollouts), "--method", "fudge",
                        "--steps", str(args.train_steps), "--out", str(head)], check=True)
    return head


async def one_request(client, prompt: str, max_tokens: int, alignment: dict) -> dict:
    """One streamed chat request: TTFT (first non-empty content), total time, final accounting."""
    out = await stream_chat(client, chat_body(prompt, max_tokens, alignment))
    return {"ttft_s": out["ttft_s"], "total_s": out["total_s"], "text": out["text"],
            **out["alignment"]}


async def run_grid(base: str, prompts: list[str], args) -> list[dict]:
    import httpx

    settings = [("best_of_n", k, None, None) for k in args.k]
    for value in ("value:fudge", args.reward):
        settings += [("blockwise_cd", k, m, value) for k in args.k for m in args.m]
    rows = []
    async with httpx.AsyncClient(base_url=base, timeout=3600) as client:
        # warm-up: the head's and the scorer's first call, and the engine's first batch
        await one_request(client, "Hello", 8, {"strategy": "blockwise_cd", "n": 2,
                                               "block_tokens": 4, "value": "value:fudge"})
        for strategy, k, m, value in settings:
            alignment = {"strategy": strategy, "n": k, "reward": args.reward}
            if m is not None:
                alignment |= {"block_tokens": m, "value": value}
            t0 = time.perf_counter()
            out = await gather_bounded(
                lambda p, a=alignment: one_request(client, p, args.max_tokens, a), prompts)
            wall = time.perf_counter() - t0
            def mean(key: str, out: list = out) -> float:
                return sum(o[key] for o in out) / len(out)
            row = {"strategy": strategy, "K": k, "M": m, "value": value, "wall_s": wall,
                   "mean_reward": mean("reward"), "tokens_per_prompt": mean("generated_tokens"),
                   "ttft_s": mean("ttft_s"), "total_s": mean("total_s"),
                   "blocks": mean("blocks") if m is not None else None}
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
    return rows


def label(r: dict) -> str:
    if r["strategy"] == "best_of_n":
        return "best_of_n"
    return "blockwise, FUDGE head" if r["value"] == "value:fudge" else f"blockwise, {r['value']} on prefixes"


def report(rows: list[dict], args, n_prompts: int) -> str:
    lines = [
        "# Blockwise controlled decoding vs best-of-n\n",
        f"The first {n_prompts} prompts of {args.prompts.name} (all in flight per setting, "
        f"streamed), "
        f"max_tokens {args.max_tokens}, temperature 1.0, reward `{args.reward}`; FUDGE head "
        f"trained on {args.rollout_n} rollouts per prompt of the same prompts (held-in prompts, "
        f"fresh samples), frozen SmolLM2 backbone, {args.train_steps} steps; "
        f"{os.cpu_count()} CPU cores, no GPU; one run.\n",
        *markdown_table(
            ["method", "K", "M", "mean reward", "tokens/prompt", "blocks", "TTFT s", "total s",
             "wall s"],
            [[label(r), r["K"], r["M"] or "–", fmt(r["mean_reward"], ".3f"),
              fmt(r["tokens_per_prompt"], ".0f"), fmt(r["blocks"], ".1f"), fmt(r["ttft_s"], ".1f"),
              fmt(r["total_s"], ".1f"), fmt(r["wall_s"], ".1f")] for r in rows]),
    ]
    lines.append("\nTTFT = time to the first streamed text of a request (best-of-n streams its "
                 "answer once chosen); total = mean per-request latency; wall = the setting's "
                 "wall time with every prompt in flight.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((label(r), r["M"]), []).append(r)
    with figure(path, ncols=2, size=(12, 4.5), legend_size=7) as (ax, bx):
        for (name, m), pts in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1] or 0)):
            tag = name if m is None else f"{name}, M={m}"
            style = "k*-" if m is None else "o-"
            curve(ax, pts, "tokens_per_prompt", "mean_reward", tag, style)
            curve(bx, pts, "K", "ttft_s", tag, style)
        ax.set_xscale("log")
        ax.set_xlabel("generated tokens per prompt (log)")
        ax.set_ylabel("mean chosen reward")
        ax.set_title("reward vs compute (points: K = 2, 4, 8)")
        bx.set_xlabel("K (candidates per block / best-of-K)")
        bx.set_ylabel("mean time to first streamed text, s")
        bx.set_title("time to first text")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=Path, default=ROOT / "bench" / "prompts-dev.jsonl")
    ap.add_argument("--limit", type=int, default=16, help="Prompts benchmarked (0: all).")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reward", default="relevance")
    ap.add_argument("--k", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--m", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--rollout-n", type=int, default=16, help="Rollouts per prompt for the head.")
    ap.add_argument("--train-steps", type=int, default=400)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get(
        "ALIGNSERVE_HOME", Path.home() / ".cache" / "alignserve")) / "bench-cd")
    ap.add_argument("--fresh", action="store_true", help="Redo rollouts and training.")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    head = offline_steps(args)
    prompts = load_prompts(args.prompts, args.limit)
    with alignserve_server(args.out / "bench-cd-server.log", "--value-head",
                           f"fudge={head}") as base:
        rows = asyncio.run(run_grid(base, prompts, args))
    write_results(args.out, "cd", report(rows, args, len(prompts)), rows)
    plot(rows, args.out / "cd.png")


if __name__ == "__main__":
    main()
