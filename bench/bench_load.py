"""A loaded server, side by side in one run: best-of-n, speculative rejection and blockwise CD.

One `alignserve serve` (started as bench/common.py starts it), 16 dev prompts in flight at once
over HTTP (chat completions, reward `relevance`, 64 new tokens, temperature 1), one row per
setting, run one after the other on the same server:
  best_of_n            N ∈ {4, 8, 16, 32, 64} (+ 128 with --with-128)
  speculative_rejection α = 0.5, N ∈ {16, 32, 64} (+ 128), decision_tokens 8, growth 2
                       (+ the same with `value: value:fudge` when --value-head is given)
  blockwise_cd         K = 8, M = 16, value = the reward on prefixes, 8 requests in flight,
                       against best_of_n N = 8 with 8 in flight.
Columns: wall time, requests/s, generated tokens, mean chosen reward, vLLM's prefix-cache hit
rate over the row (delta of `vllm:prefix_cache_hits` / `vllm:prefix_cache_queries` on /metrics)
and ratios to best-of-n at the same N; plus SpR's speed-up at equal reward: the wall time
best-of-n needs for SpR's mean reward (linear in log wall between measured N) over SpR's.
Writes load.md, load.json and load.png (mean reward vs wall time) under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path

from common import ROOT, alignserve_server, pyplot, save


def dev_prompts(path: Path, limit: int) -> list[str]:
    """`limit` prompts alternating helpful and adversarial ones (both kinds are served)."""
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    helpful = [r for r in rows if r.get("kind") != "adversarial"]
    adv = [r for r in rows if r.get("kind") == "adversarial"]
    return [r["prompt"] for pair in zip(helpful, adv) for r in pair][:limit]


def prefix_cache_counters(text: str) -> dict[str, float]:
    """Totals of vLLM's prefix-cache counters in a /metrics page (absent: not exposed)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        for name in ("vllm:prefix_cache_hits", "vllm:prefix_cache_queries"):
            if line.startswith((name + "_total", name + "{", name + " ")):
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


async def one(client, prompt: str, max_tokens: int, alignment: dict) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 1.0, "alignment": alignment}
    r = await client.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    return r.json()["choices"][0]["alignment"]


async def run_row(client, prompts, args, label: str, alignment: dict, in_flight: int) -> dict:
    gate = asyncio.Semaphore(in_flight)

    async def bounded(p):
        async with gate:
            return await one(client, p, args.max_tokens, alignment)

    before = prefix_cache_counters((await client.get("/metrics")).text)
    t0 = time.perf_counter()
    infos = await asyncio.gather(*(bounded(p) for p in prompts))
    wall = time.perf_counter() - t0
    after = prefix_cache_counters((await client.get("/metrics")).text)
    hits = after.get("vllm:prefix_cache_hits", math.nan) - before.get("vllm:prefix_cache_hits",
                                                                       math.nan)
    queries = (after.get("vllm:prefix_cache_queries", math.nan)
               - before.get("vllm:prefix_cache_queries", math.nan))
    return {"label": label, "strategy": alignment["strategy"], "n": alignment["n"],
            "in_flight": in_flight, "options": alignment, "wall_s": wall,
            "requests_per_s": len(prompts) / wall,
            "generated_tokens": sum(i["generated_tokens"] for i in infos),
            "mean_reward": sum(i["reward"] for i in infos) / len(infos),
            "prefix_cache_hit_rate": hits / queries if queries > 0 else None,
            "prefix_cache_queries": queries if queries == queries else None,
            "rounds": sum(i.get("rounds", 1) for i in infos) / len(infos)}


def settings(args) -> list[tuple[str, dict, int]]:
    base = {"reward": args.reward}
    bon_n = args.bon_n + ([128] if args.with_128 else [])
    spr_n = args.spr_n + ([128] if args.with_128 else [])
    spr = {"alpha": args.alpha, "decision_tokens": args.decision_tokens, "growth": 2.0}
    rows = [(f"best_of_n N={n}", {**base, "strategy": "best_of_n", "n": n}, args.in_flight)
            for n in bon_n]
    rows += [(f"SpR α={args.alpha} N={n}",
              {**base, "strategy": "speculative_rejection", "n": n, **spr}, args.in_flight)
             for n in spr_n]
    if args.value_head:
        rows += [(f"SpR α={args.alpha} N={n} value:fudge",
                  {**base, "strategy": "speculative_rejection", "n": n, **spr,
                   "value": "value:fudge"}, args.in_flight) for n in spr_n]
    if args.cd:
        rows += [("best_of_n N=8 (8 in flight)", {**base, "strategy": "best_of_n", "n": 8}, 8),
                 ("blockwise_cd K=8 M=16", {**base, "strategy": "blockwise_cd", "n": 8,
                                            "block_tokens": 16}, 8)]
    return rows


async def main_async(args) -> list[dict]:
    import httpx

    prompts = dev_prompts(args.prompts, args.limit)
    flags = ["--value-head", f"fudge={args.value_head}"] if args.value_head else []
    args.out.mkdir(parents=True, exist_ok=True)
    with alignserve_server(args.out / "load-server.log", *flags) as base:
        async with httpx.AsyncClient(base_url=base, timeout=3600) as client:
            await run_row(client, prompts[:2], args, "warm-up",
                          {"strategy": "best_of_n", "n": 2, "reward": args.reward}, 2)
            rows = []
            for label, alignment, in_flight in settings(args):
                rows.append(await run_row(client, prompts, args, label, alignment, in_flight))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def bon_wall_for(reward: float, bon: list[dict]) -> tuple[float, bool]:
    """Wall time best-of-n needs for `reward`, linear in log(wall) between measured points
    (ordered by N). Returns (wall, exact); beyond the best point, that point's wall is a lower
    bound (exact=False)."""
    pts = sorted((r["n"], r["wall_s"], r["mean_reward"]) for r in bon)
    best = max(pts, key=lambda p: p[2])
    if reward >= best[2]:
        return best[1], reward == best[2]
    if reward <= pts[0][2]:
        return pts[0][1], True  # at or below the smallest N: its time (an upper bound)
    for (_, w0, r0), (_, w1, r1) in zip(pts, pts[1:]):
        if min(r0, r1) <= reward <= max(r0, r1) and r1 != r0:
            f = (reward - r0) / (r1 - r0)
            return math.exp(math.log(w0) + f * (math.log(w1) - math.log(w0))), True
    return best[1], False


def annotate(rows: list[dict]) -> None:
    bon = [r for r in rows if r["strategy"] == "best_of_n" and r["in_flight"] == rows[0]["in_flight"]]
    ref = {r["n"]: r for r in bon}
    ref8 = next((r for r in rows if r["label"] == "best_of_n N=8 (8 in flight)"), None)
    for r in rows:
        if r["strategy"] == "best_of_n":
            continue  # the references themselves
        base = ref8 if r["strategy"] == "blockwise_cd" else ref.get(r["n"])
        if base is not None:
            r["wall_ratio"] = r["wall_s"] / base["wall_s"]
            r["token_ratio"] = r["generated_tokens"] / base["generated_tokens"]
            r["reward_vs_ref"] = r["mean_reward"] - base["mean_reward"]
        if r["strategy"] == "speculative_rejection" and len(bon) >= 2:
            need, exact = bon_wall_for(r["mean_reward"], bon)
            r["bon_wall_for_reward"], r["speedup_at_equal_reward"] = need, need / r["wall_s"]
            r["speedup_is_lower_bound"] = not exact


def report(rows: list[dict], args, elapsed: float) -> str:
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    lines = ["# A loaded server: best-of-n, speculative rejection, blockwise CD\n",
             f"{args.limit} dev prompts in flight at once over HTTP (blockwise CD and its "
             f"best-of-8 reference: 8), one `alignserve serve`, chat completions, reward "
             f"`{args.reward}`, {args.max_tokens} new tokens, temperature 1; SpR decision_tokens "
             f"{args.decision_tokens}, growth 2. Tokens: every token the engine generated, all "
             f"prompts. Ratios: to best-of-n at the same N (CD: to best-of-8 at 8 in flight). "
             f"Whole run {elapsed / 60:.0f} min.\n",
             "| setting | wall s | req/s | tokens | mean reward | prefix-cache hit rate | "
             "wall / BoN | tokens / BoN | reward − BoN | SpR speed-up at equal reward |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = r.get("speedup_at_equal_reward")
        sp = "–" if sp is None else ("≥ " if r["speedup_is_lower_bound"] else "") + f"{sp:.2f}×"
        lines.append(
            f"| {r['label']} | {r['wall_s']:.1f} | {r['requests_per_s']:.3f} | "
            f"{r['generated_tokens']} | {r['mean_reward']:.4f} | "
            f"{fmt(r['prefix_cache_hit_rate'], '.3f')} | {fmt(r.get('wall_ratio'), '.2f')} | "
            f"{fmt(r.get('token_ratio'), '.2f')} | {fmt(r.get('reward_vs_ref'), '+.4f')} | {sp} |")
    lines.append("\nSpR speed-up at equal reward = the wall time best-of-n needs for SpR's mean "
                 "reward (linear in log wall between the measured N) / SpR's wall time; '≥' "
                 "where SpR beats the best best-of-n measured. Prefix-cache hit rate = "
                 "Δ vllm:prefix_cache_hits / Δ vllm:prefix_cache_queries over the row.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        key = r["label"].rsplit(" N=", 1)[0] if "N=" in r["label"] else r["label"]
        key += " (8 in flight)" if r["in_flight"] == 8 and "in flight" not in key else ""
        groups.setdefault(key, []).append(r)
    for key, pts in groups.items():
        pts.sort(key=lambda r: r["wall_s"])
        ax.plot([p["wall_s"] for p in pts], [p["mean_reward"] for p in pts], "o-", label=key)
        for p in pts:
            ax.annotate(f"N={p['n']}", (p["wall_s"], p["mean_reward"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xscale("log")
    ax.set_xlabel("wall time of the row, s (log)")
    ax.set_ylabel("mean chosen reward")
    ax.set_title("Reward vs wall time, one loaded server")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prompts", type=Path, default=ROOT / "bench" / "prompts-dev.jsonl")
    ap.add_argument("--limit", type=int, default=16, help="Prompts, all in flight at once.")
    ap.add_argument("--in-flight", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reward", default="relevance")
    ap.add_argument("--bon-n", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--spr-n", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--with-128", action="store_true", help="Also best-of-128 and SpR N = 128.")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--decision-tokens", type=int, default=8)
    ap.add_argument("--no-cd", dest="cd", action="store_false", help="Skip the blockwise CD rows.")
    ap.add_argument("--value-head", type=Path, help="A FUDGE head: also SpR with value:fudge.")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = asyncio.run(main_async(args))
    annotate(rows)
    md = report(rows, args, time.perf_counter() - t0)
    (args.out / "load.md").write_text(md)
    (args.out / "load.json").write_text(json.dumps(rows, indent=2))
    plot(rows, args.out / "load.png")
    print(md)


if __name__ == "__main__":
    main()
