"""A loaded server, side by side in one run: best-of-n, speculative rejection and blockwise CD.

One `alignserve serve` (started as bench/common.py starts it), 16 dev prompts in flight at once
over HTTP (streamed chat completions, reward `relevance`, 64 new tokens, temperature 1), one row
per setting, run one after the other on the same server:
  best_of_n            N ∈ {4, 8, 16, 32, 64} (+ 128 with --with-128)
  speculative_rejection α = 0.5, N ∈ {32, 64} (+ 128), decision_tokens 8, growth 2
                       (+ the same with `value: VALUE` when --value is given: a value head
                       scores the partial answers, the reward the finished survivors)
  blockwise_cd         K = 8, M = 16, value = the reward on prefixes, 8 requests in flight,
                       against best_of_n N = 8 with 8 in flight.
Columns: wall time, requests/s, generated tokens, mean chosen reward, mean time to the first
streamed text, scoring time per request, vLLM's prefix-cache hit rate over the row (Δ
`vllm:prefix_cache_hits` / Δ `vllm:prefix_cache_queries` on /metrics) and ratios to best-of-n
at the same N; plus SpR's speed-up at equal reward: the wall time best-of-n needs for SpR's mean
reward (linear in log wall between measured N) over SpR's. The machine's load average is
recorded per row (the header states the range). Writes load.md, load.json and load.png (mean
reward vs wall time) under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from pathlib import Path

from common import (
    ROOT,
    alignserve_server,
    chat_body,
    curve,
    figure,
    fmt,
    gather_bounded,
    load_prompts,
    load_range,
    log_interpolate,
    markdown_table,
    prefix_cache_counts,
    stream_chat,
    write_results,
)


async def run_row(client, prompts, args, label: str, alignment: dict, in_flight: int) -> dict:
    """Every prompt once with `alignment`, `in_flight` at a time; the row's measurements."""
    async def one(prompt: str) -> dict:
        out = await stream_chat(client, chat_body(prompt, args.max_tokens, alignment))
        return {**out["alignment"], "ttft_s": out["ttft_s"], "total_s": out["total_s"]}

    before = prefix_cache_counts((await client.get("/metrics")).text)
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    infos = await gather_bounded(one, prompts, in_flight)
    wall = time.perf_counter() - t0
    after = prefix_cache_counts((await client.get("/metrics")).text)
    hits, queries = after[0] - before[0], after[1] - before[1]
    mean = lambda key: sum(i[key] or 0.0 for i in infos) / len(infos)  # noqa: E731
    return {"label": label, "strategy": alignment["strategy"], "n": alignment["n"],
            "in_flight": in_flight, "options": alignment, "wall_s": wall,
            "requests_per_s": len(prompts) / wall,
            "generated_tokens": sum(i["generated_tokens"] for i in infos),
            "mean_reward": mean("reward"), "ttft_s": mean("ttft_s"), "total_s": mean("total_s"),
            "score_s": sum(i["latency"]["score_s"] for i in infos) / len(infos),
            "prefix_cache_hit_rate": hits / queries if queries > 0 else None,
            "prefix_cache_queries": queries, "rounds": mean("rounds") if "rounds" in infos[0]
            else None, "load_avg": [load0, os.getloadavg()[0]]}


def settings(args) -> list[tuple[str, dict, int, int]]:
    """(label, alignment, requests in flight, prompts) per row, most important first (a run
    cut short by --budget-min keeps what the table needs most)."""
    base = {"reward": args.reward}
    spr = {"strategy": "speculative_rejection", "alpha": args.alpha,
           "decision_tokens": args.decision_tokens, "growth": 2.0}

    def bon(n: int) -> tuple[str, dict, int, int]:
        return (f"best_of_n N={n}", {**base, "strategy": "best_of_n", "n": n}, args.in_flight,
                args.limit)

    def spr_row(n: int, value: str | None = None) -> tuple[str, dict, int, int]:
        extra = {"value": value} if value else {}
        return (f"SpR α={args.alpha} N={n}" + (f" value={value}" if value else ""),
                {**base, **spr, "n": n, **extra}, args.in_flight, args.limit)

    small = [n for n in args.bon_n if n <= 32]
    rows = [bon(n) for n in small if n >= 8][:1]  # best-of-8 first: CD's reference too
    if args.cd:
        if args.in_flight != 8 or 8 not in args.bon_n:  # else best_of_n N=8 is the reference
            rows.append(("best_of_n N=8 (8 in flight)", {**base, "strategy": "best_of_n", "n": 8},
                         8, args.limit))
        rows.append(("blockwise_cd K=8 M=16", {**base, "strategy": "blockwise_cd", "n": 8,
                                               "block_tokens": 16}, 8, args.limit))
    # then each SpR row with its best-of-N reference, then the rest of the best-of-n curve
    for n in [n for n in args.spr_n if n <= 32]:
        rows += [spr_row(n)] + ([bon(n)] if n in small else [])
    rows += [bon(n) for n in sorted(small, reverse=True) if n not in args.spr_n and n != 8]
    if args.value:
        rows += [spr_row(n, args.value) for n in args.spr_n if n <= 32]
    rows += [bon(n) for n in args.bon_n if n > 32] + [spr_row(n) for n in args.spr_n if n > 32]
    if args.with_128:  # the N = 128 pair, on --limit-128 prompts (its own reference)
        k = args.limit_128 or args.limit
        tag = "" if k == args.limit else f" ({k} prompts)"
        rows += [(f"best_of_n N=128{tag}", {**base, "strategy": "best_of_n", "n": 128},
                  min(args.in_flight, k), k),
                 (f"SpR α={args.alpha} N=128{tag}", {**base, **spr, "n": 128},
                  min(args.in_flight, k), k)]
    return rows


async def main_async(args, t_start: float) -> list[dict]:
    import httpx

    prompts = load_prompts(args.prompts, max(args.limit, args.limit_128 or 0), mixed=True)
    flags = [f for name_path in args.value_head for f in ("--value-head", name_path)]
    flags += ["--enforce-eager", "true"] if args.enforce_eager else []
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with alignserve_server(args.out / "load-server.log", *flags) as base:
        async with httpx.AsyncClient(base_url=base, timeout=3600) as client:
            await run_row(client, prompts[:2], args, "warm-up",
                          {"strategy": "best_of_n", "n": 2, "reward": args.reward}, 2)
            for label, alignment, in_flight, k in settings(args):
                if args.budget_min and time.perf_counter() - t_start > 60 * args.budget_min:
                    args.skipped.append(label)
                    continue
                rows.append(await run_row(client, prompts[:k], args, label, alignment, in_flight))
                rows[-1]["prompts"] = k
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                finish(rows, args, t_start)  # the table so far, in case the run is cut short
    return rows


def finish(rows: list[dict], args, t_start: float) -> None:
    annotate(rows, args.in_flight, args.limit)
    write_results(args.out, "load", report(rows, args, time.perf_counter() - t_start), rows)
    plot(rows, args.out / "load.png")


def annotate(rows: list[dict], in_flight: int, limit: int) -> None:
    """Ratios to best-of-n at the same N and prompts (CD: best-of-8 at 8 in flight), and SpR's
    speed-up at equal reward on the best-of-n (wall, reward) curve of the full prompt set."""
    bon = [r for r in rows if r["strategy"] == "best_of_n" and r["in_flight"] == in_flight
           and r["prompts"] == limit]
    ref = {(r["n"], r["prompts"]): r for r in rows if r["strategy"] == "best_of_n"}
    ref8 = next((r for r in rows if r["strategy"] == "best_of_n" and r["n"] == 8
                 and r["in_flight"] == 8 and r["prompts"] == limit), None)
    curve_pts = [(r["wall_s"], r["mean_reward"]) for r in sorted(bon, key=lambda r: r["n"])]
    for r in rows:
        if r["strategy"] == "best_of_n":
            continue  # the references themselves
        base = ref8 if r["strategy"] == "blockwise_cd" else ref.get((r["n"], r["prompts"]))
        if base is not None:
            r["wall_ratio"] = r["wall_s"] / base["wall_s"]
            r["token_ratio"] = r["generated_tokens"] / base["generated_tokens"]
            r["reward_vs_ref"] = r["mean_reward"] - base["mean_reward"]
            r["ttft_ratio"] = r["ttft_s"] / base["ttft_s"]
        if r["strategy"] == "speculative_rejection" and len(bon) >= 2 and r["prompts"] == limit:
            need, exact = log_interpolate(r["mean_reward"], curve_pts)
            r["bon_wall_for_reward"], r["speedup_at_equal_reward"] = need, need / r["wall_s"]
            r["speedup_is_lower_bound"] = not exact


def report(rows: list[dict], args, elapsed: float) -> str:
    head = ("# A loaded server: best-of-n, speculative rejection, blockwise CD\n\n"
            f"{args.limit} dev prompts in flight at once over HTTP (blockwise CD and its best-of-8 "
            f"reference: 8), one `alignserve serve` (KV block size: the server's default), "
            f"streamed chat completions, reward `{args.reward}`, {args.max_tokens} new tokens, "
            f"temperature 1; SpR decision_tokens {args.decision_tokens}, growth 2. Tokens: every "
            "token the engine generated, all prompts. Ratios: to best-of-n at the same N (CD: to "
            f"best-of-8 at 8 in flight). One run, whole run {elapsed / 60:.0f} min"
            + (f" (not run, out of time: {', '.join(args.skipped)})" if args.skipped else "")
            + ". "
            f"**Contention:** {os.cpu_count()} CPU cores shared with other jobs; 1-minute load "
            f"average {load_range(rows, '.0f')} during the run (per row in load.json).\n")

    def speedup(r: dict) -> str:
        sp = r.get("speedup_at_equal_reward")
        return "–" if sp is None else ("≥ " if r["speedup_is_lower_bound"] else "") + f"{sp:.2f}×"

    table = markdown_table(
        ["setting", "wall s", "req/s", "tokens", "mean reward", "first text s", "score s/req",
         "prefix-cache hit rate", "wall / BoN", "tokens / BoN", "reward − BoN",
         "first text / BoN", "SpR speed-up at equal reward"],
        [[r["label"], fmt(r["wall_s"], ".1f"), fmt(r["requests_per_s"], ".3f"),
          r["generated_tokens"], fmt(r["mean_reward"], ".4f"), fmt(r["ttft_s"], ".1f"),
          fmt(r["score_s"], ".2f"), fmt(r["prefix_cache_hit_rate"], ".3f"),
          fmt(r.get("wall_ratio"), ".2f"), fmt(r.get("token_ratio"), ".2f"),
          fmt(r.get("reward_vs_ref"), "+.4f"), fmt(r.get("ttft_ratio"), ".2f"), speedup(r)]
         for r in rows])
    foot = ("\nSpR speed-up at equal reward = the wall time best-of-n needs for SpR's mean reward "
            "(linear in log wall between the measured N) / SpR's wall time; '≥' where SpR beats "
            "the best best-of-n measured. Prefix-cache hit rate = Δ vllm:prefix_cache_hits / "
            "Δ vllm:prefix_cache_queries over the row. First text: time to the first streamed "
            "content (best-of-n and SpR stream the answer once chosen; blockwise CD commits "
            "each accepted block). score s/req: `alignment.latency.score_s`.")
    return head + "\n" + "\n".join(table) + "\n" + foot + "\n"


def plot(rows: list[dict], path: Path) -> None:
    groups: dict[str, list[dict]] = {}  # one curve per label without its N (and in flight)
    for r in rows:
        key = re.sub(r" N=\d+", "", r["label"])
        key += " (8 in flight)" if r["in_flight"] == 8 and "in flight" not in key else ""
        groups.setdefault(key, []).append(r)
    with figure(path) as ax:
        for key, pts in groups.items():
            curve(ax, pts, "wall_s", "mean_reward", key, tag=lambda p: f"N={p['n']}")
        ax.set_xscale("log")
        ax.set_xlabel("wall time of the row, s (log)")
        ax.set_ylabel("mean chosen reward")
        ax.set_title("Reward vs wall time, one loaded server")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prompts", type=Path, default=ROOT / "bench" / "prompts-dev.jsonl")
    ap.add_argument("--limit", type=int, default=16, help="Prompts per row.")
    ap.add_argument("--in-flight", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reward", default="relevance")
    ap.add_argument("--bon-n", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--spr-n", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--with-128", action="store_true", help="Also best-of-128 and SpR N = 128.")
    ap.add_argument("--limit-128", type=int, help="Prompts for the N = 128 pair (default --limit).")
    ap.add_argument("--budget-min", type=float, help="Start no row after this many minutes "
                    "(rows run most important first; the skipped ones are listed).")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--decision-tokens", type=int, default=8)
    ap.add_argument("--no-cd", dest="cd", action="store_false", help="Skip the blockwise CD rows.")
    ap.add_argument("--value", help="Also SpR rows with this `alignment.value` (e.g. value:fudge).")
    ap.add_argument("--value-head", action="append", default=[], metavar="NAME=PATH",
                    help="A value head for the server (repeatable), served as value:NAME.")
    ap.add_argument("--enforce-eager", action="store_true",
                    help="Serve without torch.compile (starts in minutes on a busy CPU).")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    t0 = time.perf_counter()
    args.skipped = []
    rows = asyncio.run(main_async(args, t0))
    finish(rows, args, t0)


if __name__ == "__main__":
    main()
