"""Controlled decoding (blockwise and tokenwise) vs best-of-n on the real engine, over HTTP,
side by side in one run.

Pipeline (a step is skipped when its output already exists under --work, or when the heads
are given with --head NAME=PATH, e.g. the ones of docs/value-heads.md trained on
valuenet/data/prompts-train.jsonl, which holds the dev prompts out):
  1. `alignserve rollouts`: K samples per dev prompt from the reference policy, scored by the reward;
  2. `alignserve train-value` (bench_value_heads.HEADS: fudge, cdq, fudge-adv): prefix value
     heads on them;
  3. one `alignserve serve --value-head NAME=HEAD ...`, then for every
     setting all prompts are sent at once, streamed:
       best_of_n, K ∈ --bon-k (K = 1 is plain sampling, scored);
       blockwise_cd, K ∈ --k × M ∈ --m, value ∈ --values: a head (`value:fudge`,
                     `value:cdq`, `value:fudge-adv`) or the reward scorer itself applied to the
                     partial text;
       tokenwise_cd, λ ∈ --lambdas, the CD-Q head in the engine's logits processor.
Reports the mean chosen reward, generated tokens per prompt, time to the first streamed text
(TTFT), total time per request, wall time per answer token and the KL estimate; writes cd.md,
cd.json and cd.png. Without --head the heads are trained on rollouts of the benchmarked
prompts themselves (held-in prompts, fresh samples): say so when quoting them.
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

from bench_value_heads import HEADS
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
    prefix_cache_hit_rate,
    stream_chat,
    write_results,
)


def needed_heads(args) -> list[str]:
    """The heads the grid uses: its `value:NAME` values, and cdq for tokenwise CD-Q."""
    names = [v.split(":", 1)[1] for v in args.values if v.startswith("value:")]
    return sorted(set(names) | ({"cdq"} if args.lambdas else set()))


def offline_steps(args) -> dict[str, Path]:
    """Rollouts and the heads the grid needs (each reused when present, or given with --head);
    returns head name → folder."""
    given = {name: args.head.get(name) for name in needed_heads(args)}
    if all(given.values()):
        return given
    unknown = sorted(set(given) - set(HEADS) - set(args.head))
    if unknown:
        raise SystemExit(f"bench_cd: no --head for {', '.join(unknown)} and no recipe to train "
                         f"it (known: {', '.join(HEADS)})")
    rollouts = args.work / "rollouts"
    if not (rollouts / "manifest.json").is_file() or args.fresh:
        subprocess.run([ALIGNSERVE, "rollouts", "--prompts", str(args.prompts), "--n",
                        str(args.rollout_n), "--max-tokens", str(args.max_tokens), "--reward",
                        args.reward, "--out", str(rollouts)], check=True)
    heads = {}
    for name, head in given.items():
        heads[name] = head or args.work / f"head-{name}"
        if head is None and (not (heads[name] / "config.json").is_file() or args.fresh):
            subprocess.run([ALIGNSERVE, "train-value", "--data", str(rollouts), *HEADS[name],
                            "--steps", str(args.train_steps), "--out", str(heads[name])],
                           check=True)
    return heads


def head_option(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--head takes NAME=PATH, got {text!r}")
    return name, Path(path).expanduser()


async def one_request(client, prompt: str, max_tokens: int, alignment: dict) -> dict:
    """One streamed chat request: TTFT (first non-empty content), total time, final accounting."""
    out = await stream_chat(client, chat_body(prompt, max_tokens, alignment))
    return {"ttft_s": out["ttft_s"], "total_s": out["total_s"], "text": out["text"],
            **out["alignment"]}


def grid(args) -> list[tuple[str, int, int | None, str | None, float | None]]:
    """(strategy, K, M, value, λ) of every setting, in the order they run."""
    settings = [("best_of_n", k, None, None, None) for k in args.bon_k]
    for value in args.values:
        settings += [("blockwise_cd", k, m, value, None) for k in args.k for m in args.m]
    settings += [("tokenwise_cd", 1, None, "value:cdq", lam) for lam in args.lambdas]
    return settings


def alignment_of(strategy: str, k: int, m: int | None, value: str | None, lam: float | None,
                 reward: str) -> dict:
    alignment = {"strategy": strategy, "n": k, "reward": reward}
    if strategy == "blockwise_cd":
        alignment |= {"block_tokens": m, "value": value}
    elif strategy == "tokenwise_cd":
        alignment = {"strategy": strategy, "value": value, "lambda": lam, "reward": reward}
    return alignment


async def run_grid(base: str, prompts: list[str], args) -> list[dict]:
    import httpx

    rows = []
    async with httpx.AsyncClient(base_url=base, timeout=3600) as client:
        # warm-up: the heads' and the scorer's first call, and the engine's first batch
        for value in (f"value:{m}" for m in needed_heads(args)):
            await one_request(client, "Hello", 8, {"strategy": "blockwise_cd", "n": 2,
                                                   "block_tokens": 4, "value": value})
        if args.lambdas:
            await one_request(client, "Hello", 8, alignment_of("tokenwise_cd", 1, None,
                                                               "value:cdq", 1.0, args.reward))
        for strategy, k, m, value, lam in grid(args):
            alignment = alignment_of(strategy, k, m, value, lam, args.reward)
            before, t0 = (await client.get("/metrics")).text, time.perf_counter()
            out = await gather_bounded(
                lambda p, a=alignment: one_request(client, p, args.max_tokens, a), prompts)
            wall = time.perf_counter() - t0
            hit_rate = prefix_cache_hit_rate(before, (await client.get("/metrics")).text)

            def mean(key: str, out: list = out) -> float:
                return sum(o[key] for o in out) / len(out)
            # wall time per answer token: every request's latency over its answer's tokens
            # (generated tokens / K: best-of-n and blockwise CD generate K per answer token)
            per_token = sum(o["total_s"] * k / max(1, o["generated_tokens"]) for o in out) / len(out)
            row = {"strategy": strategy, "K": k, "M": m, "value": value, "lambda": lam,
                   "wall_s": wall, "mean_reward": mean("reward"),
                   "tokens_per_prompt": mean("generated_tokens"), "ttft_s": mean("ttft_s"),
                   "total_s": mean("total_s"), "ms_per_answer_token": 1000 * per_token,
                   "kl_estimate": mean("kl_estimate"), "kl_bound": mean("kl_bound"),
                   "blocks": mean("blocks") if m is not None else None,
                   "prefix_cache_hit_rate": hit_rate}
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
            # the rows so far, should a long grid be interrupted (bench/results/*.tmp: ignored)
            (args.out / "cd.json.tmp").write_text(json.dumps(rows, indent=2))
    return rows


def label(r: dict) -> str:
    if r["strategy"] == "best_of_n":
        return "plain sampling" if r["K"] == 1 else "best_of_n"
    if r["strategy"] == "tokenwise_cd":
        return f"tokenwise CD-Q, λ={r['lambda']:g}"
    heads = {"value:fudge": "FUDGE head", "value:cdq": "CD-Q head",
             "value:fudge-adv": "FUDGE advantage head"}
    return f"blockwise, {heads.get(r['value'], str(r['value']) + ' on prefixes')}"


def report(rows: list[dict], args, n_prompts: int) -> str:
    lines = [
        "# Controlled decoding (blockwise, tokenwise) vs best-of-n\n",
        f"The first {n_prompts} prompts of {args.prompts.name} (all in flight per setting, "
        f"streamed), max_tokens {args.max_tokens}, temperature 1.0, reward `{args.reward}`; "
        + ("heads: " + ", ".join(f"{n} `{p}`" for n, p in sorted(args.head.items()))
           + " (trained on other prompts: see docs/value-heads.md)" if args.head else
           f"heads trained on {args.rollout_n} rollouts per prompt of the same prompts "
           f"(held-in prompts, fresh samples), {args.train_steps} steps")
        + f"; frozen SmolLM2 backbone; {os.cpu_count()} CPU cores, no GPU; one run.\n",
        *markdown_table(
            ["method", "K", "M", "mean reward", "tokens/prompt", "blocks", "TTFT s", "total s",
             "ms/answer token", "KL est.", "prefix-cache hit rate", "wall s"],
            [[label(r), r["K"], r["M"] or "–", fmt(r["mean_reward"], ".3f"),
              fmt(r["tokens_per_prompt"], ".0f"), fmt(r["blocks"], ".1f"), fmt(r["ttft_s"], ".1f"),
              fmt(r["total_s"], ".1f"), fmt(r["ms_per_answer_token"], ".0f"),
              fmt(r["kl_estimate"], ".2f"), fmt(r.get("prefix_cache_hit_rate"), ".3f"),
              fmt(r["wall_s"], ".1f")] for r in rows]),
    ]
    lines.append("\nTTFT = time to the first streamed text of a request (best-of-n streams its "
                 "answer once chosen); total = mean per-request latency; ms/answer token = "
                 "latency over the answer's tokens (generated / K); KL est. = the answer's "
                 "`kl_estimate` (nats; best-of-n and blockwise: Beirami's estimator, tokenwise: "
                 "Σₜ KL(πₜ‖pₜ) along the path); prefix-cache hit rate = Δ vllm:prefix_cache_hits / "
                 "Δ vllm:prefix_cache_queries over the setting (prompts seen by an earlier "
                 "setting stay cached, so later rows hit on the prompt too); wall = the "
                 "setting's wall time with every prompt in flight.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    groups: dict[str, list[dict]] = {}  # one curve per method: over K (best-of-n: 1 = plain)
    for r in rows:                       # or over λ (tokenwise), per M (blockwise)
        name = {"best_of_n": "best_of_n", "tokenwise_cd": "tokenwise CD-Q"}.get(
            r["strategy"], f"{label(r)}, M={r['M']}")
        groups.setdefault(name, []).append(r)
    with figure(path, ncols=2, size=(12, 4.5), legend_size=7) as (ax, bx):
        for tag, pts in sorted(groups.items()):
            pts.sort(key=lambda r: (r["K"], r["lambda"] or 0))
            style = {"best_of_n": "k*-", "tokenwise CD-Q": "s--"}.get(tag, "o-")
            curve(ax, pts, "tokens_per_prompt", "mean_reward", tag, style)
            curve(bx, pts, "K", "ttft_s", tag, style)
        ax.set_xscale("log")
        ax.set_xlabel("generated tokens per prompt (log)")
        ax.set_ylabel("mean chosen reward")
        ax.set_title("reward vs compute (points: K, or λ for tokenwise)")
        bx.set_xlabel("K (candidates per block / best-of-K; tokenwise: 1)")
        bx.set_ylabel("mean time to first streamed text, s")
        bx.set_title("time to first text")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=Path, default=ROOT / "bench" / "prompts-dev.jsonl")
    ap.add_argument("--limit", type=int, default=16, help="Prompts benchmarked (0: all).")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reward", default="relevance")
    ap.add_argument("--k", type=int, nargs="+", default=[2, 4, 8], help="Blockwise K.")
    ap.add_argument("--m", type=int, nargs="+", default=[8, 16, 32], help="Blockwise M.")
    ap.add_argument("--bon-k", type=int, nargs="+", default=[1, 2, 4, 8],
                    help="Best-of-n K (1: plain sampling).")
    ap.add_argument("--lambdas", type=float, nargs="*", default=[0.5, 1.0, 2.0, 4.0],
                    help="Tokenwise CD-Q λ (none: no tokenwise rows).")
    ap.add_argument("--values", nargs="+", default=None,
                    help="Blockwise values (default: value:fudge value:cdq and the reward).")
    ap.add_argument("--head", type=head_option, action="append", default=[], metavar="NAME=PATH",
                    help="A trained head, used as value:NAME (repeatable; cdq is tokenwise's). "
                         "A missing fudge, cdq or fudge-adv head is trained on rollouts of the "
                         "benchmarked prompts.")
    ap.add_argument("--rollout-n", type=int, default=16, help="Rollouts per prompt for the head.")
    ap.add_argument("--train-steps", type=int, default=400)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get(
        "ALIGNSERVE_HOME", Path.home() / ".cache" / "alignserve")) / "bench-cd")
    ap.add_argument("--fresh", action="store_true", help="Redo rollouts and training.")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    args.values = args.values or ["value:fudge", "value:cdq", args.reward]
    args.head = dict(args.head)
    args.out.mkdir(parents=True, exist_ok=True)
    heads = offline_steps(args)
    prompts = load_prompts(args.prompts, args.limit)
    flags = [f for name, head in heads.items() for f in ("--value-head", f"{name}={head}")]
    with alignserve_server(args.out / "bench-cd-server.log", *flags) as base:
        rows = asyncio.run(run_grid(base, prompts, args))
    write_results(args.out, "cd", report(rows, args, len(prompts)), rows)
    plot(rows, args.out / "cd.png")


if __name__ == "__main__":
    main()
