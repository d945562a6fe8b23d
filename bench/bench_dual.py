"""CAN's λ*: predicted vs realised safety on the real engine (Huang et al., arXiv 2405.19544).

1. Rollouts (held-in prompts): K reference samples per prompt, reward `relevance`, cost
   `profanity` (valuenet.rollouts.collect, the code of `alignserve rollouts`; resumed if present).
2. For every β and threshold b: λ* = argmin D̂(λ) (decoding.dual.solve_dual) and the predicted
   safety E_{π_λ*}[g], g = −cost, on the rollouts. Thresholds are placed between the safety of the
   unconstrained optimum π_0 ∝ p·exp(r/β) and the reachable limit mean_i max_k g_ik (quantile q),
   so that every constraint is active and feasible.
   Also best-of-n's own λ_BoN(n) (decoding.dual_rules.solve_bon: the smallest λ whose exact
   best-of-n law on the rollouts meets b), what `cost_weight: "auto"` serves for best_of_n.
3. Fresh samples (held-in prompts again and held-out prompts): best_of_n with n=8 through the
   strategy registry; per setting we report the realised safety, with a bootstrap interval over
   prompts, of
   - best_of_n by r + λ_BoN(8)·g ("auto" for best_of_n: the rule's own λ),
   - best_of_n by r + λ*·g (what "auto" served before issue 26: not the rule λ* is solved for),
   - soft best-of-n at temperature β with λ* ("auto" for soft_best_of_n): the self-normalised
     softmax((r + λ*·g)/β) expectation on the pool, i.e. its expected safety given the pool,
   against the reference safety (mean over the pool) and reward-only best_of_n.
Writes OUT/dual.md, dual.json and dual.png. `--quick` is a smoke run (4 prompts, 16 tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np
from common import ROOT, figure, markdown_table, write_results

from decoding.dual import InfeasibleConstraint, achievable_safety, predicted_safety, solve_dual
from decoding.dual_rules import bon_safety_per_prompt, bootstrap_interval, solve_bon
from decoding.request import DecodeRequest, Objective
from decoding.strategies import STRATEGIES
from decoding.types import Sampling
from runtime.prompts import chat_prompt_ids, load_prompts
from runtime.settings import EngineSettings
from valuenet.data import Manifest, read_manifest, read_rollouts


def split_prompts(path: Path, limit: int):
    """Held in: every other helpful and every other adversarial prompt; held out: the rest, so
    both halves hold both kinds (pairs (helpful, adversarial) alternate between the halves)."""
    items = load_prompts(path)
    helpful = [p for p in items if p.kind != "adversarial"]
    adv = [p for p in items if p.kind == "adversarial"]
    pairs = list(zip(helpful, adv))[: (limit // 2 if limit else None)]
    return ([p for pair in pairs[0::2] for p in pair], [p for pair in pairs[1::2] for p in pair])


async def fresh_pools(rt, prompts, n: int, max_tokens: int, lam: float):
    """best_of_n (score r − λ·cost) on every prompt at once; returns per prompt the
    strategy's choice and its candidate pool (r, cost), for offline re-selection."""
    objective = Objective(await rt.scorers.get("relevance"), await rt.scorers.get("profanity"),
                          cost_weight=lam)
    reqs = [DecodeRequest(prompt_ids=chat_prompt_ids(rt.engine.tokenizer, p.prompt),
                          prompt_text=p.prompt, n=n, objective=objective, return_candidates=True,
                          sampling=Sampling(max_tokens=max_tokens, temperature=1.0))
            for p in prompts]
    results = await asyncio.gather(*(STRATEGIES["best_of_n"].run(r, rt.ctx) for r in reqs))
    return [{"chosen_cost": res.cost, "r": [c.reward for c in res.candidates],
             "cost": [c.cost for c in res.candidates]} for res in results]


def realised(pools, beta: float, lam: float, lam_bon: float | None,
             lam_sure: float | None = None) -> dict:
    """Safety (g = −cost) and reward of the selection rules on fresh pools, mean over prompts
    (intervals: bootstrap over prompts)."""
    r = np.array([p["r"] for p in pools])
    g = -np.array([p["cost"] for p in pools])
    pick = np.argmax(r + lam * g, axis=1)  # best_of_n's rule (first of ties, as the strategy)
    pick0 = np.argmax(r, axis=1)
    rows = np.arange(len(pools))
    z = (r + lam * g) / beta
    w = np.exp(z - z.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    soft = (w * g).sum(axis=1)
    served = {}
    for key, lam_rule in (("served_bon", lam_bon), ("sure_bon", lam_sure)):
        if lam_rule is not None:
            pick_b = np.argmax(r + lam_rule * g, axis=1)
            served.update({f"{key}_safety": float(g[rows, pick_b].mean()),
                           f"{key}_interval": bootstrap_interval(g[rows, pick_b]),
                           f"{key}_reward": float(r[rows, pick_b].mean())})
    return {**served, "bon_safety": float(g[rows, pick].mean()),
            "bon_interval": bootstrap_interval(g[rows, pick]),
            "bon_reward": float(r[rows, pick].mean()),
            "tilt_safety": float(soft.mean()), "tilt_interval": bootstrap_interval(soft),
            "tilt_reward": float((w * r).sum(axis=1).mean()),
            "reward_only_bon_safety": float(g[rows, pick0].mean()),
            "reference_safety": float(g.mean()), "reference_reward": float(r.mean())}


async def main_async(args) -> dict:
    from tqdm import tqdm

    from runtime.startup import open_runtime
    from valuenet.rollouts import RolloutConfig, collect, prepare_folder

    held_in, held_out = split_prompts(args.prompts, args.limit)
    t0 = time.perf_counter()
    engine = EngineSettings(max_model_len=1024, kv_cache_gib=2, default_reward="relevance")
    async with open_runtime(engine) as rt:
        startup = time.perf_counter() - t0
        cfg = RolloutConfig(args.rollout_n, args.max_tokens, 1.0, "relevance", "profanity")
        # Outside the repository (rows carry token ids and log-probs); resumed when rerun.
        folder = args.rollouts or (engine.home / "bench"
                                   / f"dual-rollouts-k{args.rollout_n}-t{args.max_tokens}")
        done = prepare_folder(folder, Manifest(model=rt.model_name, prompts=str(args.prompts),
                                               **{k: getattr(cfg, k) for k in (
                                                   "n", "max_tokens", "temperature", "reward",
                                                   "cost")}))
        todo = [p for p in held_in if p.id not in done]
        m = read_manifest(folder)
        m.count = len(read_rollouts(folder)[1])
        with tqdm(total=len(todo), desc="rollouts", file=sys.stderr) as bar:
            stats = await collect(rt, todo, cfg, folder, m, bar)
        _, rows = read_rollouts(folder)
        ids = [p.id for p in held_in]
        by = {i: sorted((x for x in rows if x.prompt_id == i), key=lambda x: x.sample) for i in ids}
        r = np.array([[x.reward for x in by[i]] for i in ids])
        g = -np.array([[x.cost for x in by[i]] for i in ids])
        settings = []
        for beta in args.betas:
            s0, reach = predicted_safety(r, g, beta, 0.0), achievable_safety(g)
            thresholds = args.thresholds or [s0 + q * (reach - s0) for q in args.quantiles]
            for b in thresholds:
                lam = float(solve_dual(r, g, beta, b))
                try:
                    bon = solve_bon(r, g, args.n, b)
                    lam_bon, bon_pred = bon.lam, bon.predicted_safety
                    bon_interval = bootstrap_interval(bon_safety_per_prompt(r, g, args.n,
                                                                            lam_bon))
                except InfeasibleConstraint:
                    lam_bon, bon_pred, bon_interval = None, None, None
                try:  # what `alignserve dual` stores by default (--confidence 0.95)
                    lam_sure = solve_bon(r, g, args.n, b, confidence=0.95).lam
                except InfeasibleConstraint:
                    lam_sure = None
                settings.append({"beta": beta, "threshold": b, "lambda": lam,
                                 "lambda_bon_95": lam_sure,
                                 "predicted_safety": predicted_safety(r, g, beta, lam),
                                 "lambda_bon": lam_bon, "predicted_bon_safety": bon_pred,
                                 "predicted_bon_interval": bon_interval,
                                 "unconstrained_safety": s0, "achievable_safety": reach})
        t1 = time.perf_counter()
        pools = {"held_in": await fresh_pools(rt, held_in, args.n, args.max_tokens,
                                              settings[0]["lambda"]),
                 "held_out": await fresh_pools(rt, held_out, args.n, args.max_tokens,
                                               settings[0]["lambda"])}
        fresh_s = time.perf_counter() - t1
    # the strategy's own choice must be the offline argmax (same rule, same scores)
    for p in pools["held_in"] + pools["held_out"]:
        k = int(np.argmax(np.array(p["r"]) - settings[0]["lambda"] * np.array(p["cost"])))
        assert abs(p["cost"][k] - p["chosen_cost"]) < 1e-12
    for s in settings:
        for name, pool in pools.items():
            s[name] = realised(pool, s["beta"], s["lambda"], s["lambda_bon"],
                               s.get("lambda_bon_95"))
    return {"config": {"prompts": str(args.prompts), "held_in": len(held_in),
                       "held_out": len(held_out), "rollout_n": args.rollout_n, "n": args.n,
                       "max_tokens": args.max_tokens, "reward": "relevance", "cost": "profanity",
                       "rollouts": str(folder), "startup_s": startup,
                       "rollout_tok_s": stats.tokens_per_s, "rollout_wall_s": stats.wall_s,
                       "fresh_wall_s": fresh_s, "quick": args.quick},
            "reference_safety_rollouts": float(g.mean()), "settings": settings}


def _iv(x: tuple | list | None) -> str:
    return "—" if x is None else f"[{x[0]:.4f}, {x[1]:.4f}]"


def report(res: dict) -> str:
    c, n = res["config"], res["config"]["n"]
    rows = []
    for s in res["settings"]:
        for name in ("held_in", "held_out"):
            x = s[name]
            served, sure = (f"{x[k + '_safety']:.4f} {_iv(x[k + '_interval'])}"
                            if k + "_safety" in x else "infeasible"
                            for k in ("served_bon", "sure_bon"))
            lam95 = s.get("lambda_bon_95")
            rows.append([f"{s['beta']:g}", f"{s['threshold']:.4f}", f"{s['lambda']:.4g}",
                         "—" if s["lambda_bon"] is None else f"{s['lambda_bon']:.4g}",
                         "—" if lam95 is None else f"{lam95:.4g}",
                         name.replace("_", "-"), sure, served,
                         f"{x['bon_safety']:.4f} {_iv(x['bon_interval'])}",
                         f"{x['tilt_safety']:.4f} {_iv(x['tilt_interval'])}",
                         f"{x['reward_only_bon_safety']:.4f}", f"{x['reference_safety']:.4f}",
                         f"{x.get('sure_bon_reward', float('nan')):.3f} / "
                         f"{x.get('served_bon_reward', float('nan')):.3f} / "
                         f"{x['bon_reward']:.3f} / {x['tilt_reward']:.3f} / "
                         f"{x['reference_reward']:.3f}"])
    lines = [
        "# CAN dual: predicted vs realised safety, under the rule actually served\n",
        f"Reward `relevance`, cost `profanity`, safety g = −cost. λ* and best-of-{n}'s own "
        f"λ_BoN({n}) from {c['held_in']} held-in prompts × {c['rollout_n']} reference samples "
        f"({c['max_tokens']} tokens, temperature 1); fresh pools of n = {n} on the held-in "
        f"prompts and on {c['held_out']} held-out prompts. Reference safety on the rollouts: "
        f"{res['reference_safety_rollouts']:.4f}. Intervals: 95 % bootstrap over prompts. "
        "One run" + (" (**--quick smoke run: too small to read anything into**)" if c["quick"]
                     else "") + ".\n",
        *markdown_table(
            ["β", "b", "λ*", f"λ_BoN({n})", f"λ_BoN,95%({n})", "set",
             f"best-of-{n} by r + λ_BoN,95%·g (auto)", f"best-of-{n} by r + λ_BoN·g (mean)",
             f"best-of-{n} by r + λ*·g (old auto)",
             "soft best-of-n at β, λ* (auto)", f"best-of-{n} (reward only)", "reference",
             "reward: auto BoN (95 %) / BoN at mean λ / old BoN / soft / reference"], rows)]
    lines += ["", "Predicted on the rollouts (held-in): π_λ* meets b with equality; best-of-"
              f"{n} at λ_BoN({n}):",
              *[f"- β = {s['beta']:g}, b = {s['threshold']:.4f}: "
                + ("infeasible at this n" if s["lambda_bon"] is None else
                   f"λ_BoN = {s['lambda_bon']:.4g}, predicted E[g] = "
                   f"{s['predicted_bon_safety']:.4f} {_iv(s['predicted_bon_interval'])}")
                for s in res["settings"]],
              "", f"λ_BoN,95%({n}) is what `alignserve dual` stores by default (--confidence "
              "0.95): the smallest λ whose one-sided 95 % bootstrap lower bound over the "
              f"reference prompts reaches b; λ_BoN({n}) meets b on their mean only "
              "(--confidence 0).",
              "", "The constraint is an average over prompts like the reference prompts, not a "
              "per-answer guarantee. Soft best-of-n's column is its expected safety given each "
              "fresh pool (Σ softmax((r + λ*·g)/β)·g), which tends to π_λ*'s as n grows; at n = "
              f"{n} it is not π_λ* itself. best-of-{n} by r + λ*·g is the rule λ* was wrongly "
              "applied to before; it is kept for comparison. Thresholds b lie between the "
              "unconstrained optimum's safety and the reachable limit mean_i max_k g_ik on the "
              "rollouts.",
              f"\nStart-up {c['startup_s']:.0f} s; rollouts {c['rollout_wall_s']:.0f} s "
              f"({c['rollout_tok_s']:.0f} tok/s); fresh pools {c['fresh_wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    s = res["settings"]
    x = list(range(len(s)))
    with figure(path, legend_size=7) as ax:
        ax.plot(x, [t["threshold"] for t in s], "k_", ms=20, label="threshold b")
        ax.plot(x, [t["predicted_safety"] for t in s], "o", label="predicted E_π_λ*[g] (rollouts)")
        for name, mark in (("held_in", "s"), ("held_out", "^")):
            ax.plot(x, [t[name]["tilt_safety"] for t in s], mark, mfc="none",
                    label=f"π_λ* on fresh pool ({name})")
            ax.plot(x, [t[name]["bon_safety"] for t in s], mark, alpha=0.4,
                    label=f"best-of-8 r − λ*·cost ({name})")
            ax.plot(x, [t[name].get("served_bon_safety", np.nan) for t in s], mark, ms=9,
                    label=f"best-of-8 r − λ_BoN·cost ({name})")
        ax.axhline(res["reference_safety_rollouts"], color="gray", ls=":",
                   label="reference E_p[g]")
        ax.set_xticks(x, [f"β={t['beta']:g}\nλ*={t['lambda']:.2g}" for t in s], fontsize=7)
        ax.set_ylabel("safety g = −profanity")
        ax.set_title("predicted vs realised safety under the rule served")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=Path, default=ROOT / "bench" / "prompts-dev.jsonl")
    ap.add_argument("--limit", type=int, default=0, help="Prompts used, half held in (0: all).")
    ap.add_argument("--rollout-n", type=int, default=16, help="Reference samples per prompt.")
    ap.add_argument("--n", type=int, default=8, help="Fresh best-of-n pool size.")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--betas", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    ap.add_argument("--quantiles", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                    help="b = s0 + q·(reachable − s0), s0 = safety of π_0 ∝ p·exp(r/β).")
    ap.add_argument("--thresholds", type=float, nargs="+", default=None,
                    help="Absolute thresholds b instead of --quantiles.")
    ap.add_argument("--rollouts", type=Path, default=None,
                    help="Rollout folder (default ALIGNSERVE_HOME/bench/dual-rollouts-k…-t…).")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--quick", action="store_true", help="Smoke run: 4 prompts, 8 samples, "
                    "16 tokens, one β and b; writes under /tmp unless --out is given.")
    args = ap.parse_args()
    if args.quick:
        args.limit, args.rollout_n, args.max_tokens = 4, 8, 16
        args.betas, args.quantiles = [0.1], [0.5]
        if args.out == ROOT / "bench" / "results":
            args.out = Path("/tmp/alignserve-bench-dual-quick")
    args.out.mkdir(parents=True, exist_ok=True)
    res = asyncio.run(main_async(args))
    write_results(args.out, "dual", report(res), res)
    plot(res, args.out / "dual.png")
    print(f"wrote {args.out}/dual.md, dual.json, dual.png")


if __name__ == "__main__":
    main()
