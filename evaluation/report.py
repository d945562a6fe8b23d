"""Writes an evaluation's outputs: results.json, report.md and three PNG plots.

- reward_vs_kl.png: one point per setting at (mean KL bound, mean reward), a line per strategy
  across the n sweep. For best-of-n the x positions are the theory curve log n − (n−1)/n
  (Beirami et al. 2024) and the rewards are measured; strategies with a KL estimator get a
  dashed second line at their mean estimate.
- harmless_ratio.png: harmless ratio per setting, one bar per prompt kind and one for all.
- reward_vs_tokens.png: mean reward against generated tokens per answer (compute), log x.
- judge.png (with `--judge`): proxy and judge gain against KL, the over-optimisation curve,
  next to a "Proxy vs judges" table (evaluation/judge.py).
- separation.png (with `--separation`): safe vs harmful prompts in each policy's last hidden
  layer, with KLDO's Bhattacharyya-distance metric (evaluation/separation.py).

With `--panel`, the tables gain a `distortion` column (evaluation/panel.py): best average
normalised panel utility among each answer's candidates over that of the answer, Σ over prompts,
with its bootstrap interval; `–` for a strategy whose candidates are not kept.

Every table cell of a ratio or mean shows its 95% interval (`<name>_ci`, clustered by prompt,
decoding/intervals.py) after the value, and the plots draw the same intervals as error bars
on the measured axis (reward, harmless ratio), so a difference inside them reads as noise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from runtime.plotting import pyplot

PLOTS = ("reward_vs_kl.png", "harmless_ratio.png", "reward_vs_tokens.png")


def write_report(out: Path, config: dict, entries: list[dict],
                 separation: list[dict] | None = None) -> None:
    """`separation`: evaluation/separation.py's results (`--separation`), a section of the
    report and separation.png."""
    from . import judge
    from . import separation as sep

    out.mkdir(parents=True, exist_ok=True)
    doc = {"config": config, "strategies": entries, **({"separation": separation}
                                                        if separation else {})}
    (out / "results.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    (out / "report.md").write_text(markdown(config, entries) + "\n".join(
        [*judge.markdown(config, entries), *sep.markdown(separation or [])]))
    plot_all(out, entries)
    if config.get("judges"):
        judge.plot(out / judge.PLOT, config, entries)
    if separation:
        sep.plot(out / sep.PLOT, separation)


# ------------------------------------------------------------------------------- markdown


def _f(x, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _fci(s: dict, key: str, digits: int = 3) -> str:
    """'value [lo, hi]' (the interval one digit shorter), or just the value when the interval is
    missing or a point (a constant such as the KL bound of best-of-n)."""
    ci = s.get(f"{key}_ci")
    if s.get(key) is None or ci is None or ci[0] == ci[1]:
        return _f(s.get(key), digits)
    d = max(digits - 1, 1)
    return f"{_f(s[key], digits)} [{ci[0]:.{d}f}, {ci[1]:.{d}f}]"


def _table(entries: list[dict], kind: str | None) -> list[str]:
    head = ["strategy", "n", "prompts", "harmless ratio", "mean reward", "mean cost", "KL bound",
            "KL estimate", "tokens/prompt", "win rate vs none"]
    if kind is None:
        head.insert(-1, "wall s")
    panel = any(e.get("distortion") is not None for e in entries)
    if panel:
        head.append("distortion (panel)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        s = e if kind is None else e["by_kind"].get(kind)
        if s is None:
            continue
        cells = [e["strategy"], str(e["n"]), str(s["prompts"]), _fci(s, "harmless_ratio"),
                 _fci(s, "mean_reward"), _fci(s, "mean_cost"), _fci(s, "mean_kl_bound"),
                 _fci(s, "mean_kl_estimate"), _fci(s, "tokens_per_prompt", 1),
                 _fci(s, "win_rate")]
        if kind is None:
            cells.insert(-1, _f(e["wall_s"], 1))
        if panel:
            cells.append(_fci(s, "distortion"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(config: dict, entries: list[dict]) -> str:
    c = config
    kinds = list(dict.fromkeys(k for e in entries for k in e["by_kind"]))
    threshold = c.get("harmless_threshold")
    lines = [
        "# alignserve eval\n",
        f"Model `{c.get('model')}` ({c.get('mode')}), prompts `{c.get('prompts')}` "
        f"({c.get('prompt_count')}), max_tokens {c.get('max_tokens')}, sampling temperature "
        f"{c.get('temperature')}. Reward `{c.get('reward')}`, cost `{c.get('cost')}` "
        f"(selection score = reward − {c.get('cost_weight')}·cost), soft best-of-n λ "
        f"{c.get('soft_temperature')}, strategy options {json.dumps(c.get('options'))}. "
        f"{c.get('samples', 1)} answer(s) per prompt and setting (seed {c.get('seed')}). "
        f"Total wall time {_f(c.get('total_wall_s'), 1)} s.\n",
        "Cells: value [95% interval]; intervals: " + (c.get("intervals") or "clustered by "
        "prompt") + ". An interval that contains another setting's value means the difference "
        "may be noise. A single prompt has no interval for means.\n",
        "Harmless: cost < " + (f"{threshold}" if threshold is not None else
                               "(no threshold: no cost scorer or none given)") +
        ". Win rate: against `none` on the same prompts, judged by the reward scorer; ties count "
        "½ (Beirami et al. 2024). KL: `none` 0; best_of_n bound log n − (n−1)/n and Beirami's "
        "estimate; rules returning one of n draws bound log n, estimate – (none known). "
        "Tokens: every token the engine generated per answer, all candidates included. Wall s: "
        "the setting's prompts, run concurrently.\n",
        *([f"Panel (one user each; `-`: a cost as utility): {', '.join(c['panel'])}. "
           "Distortion: Σ over prompts of the best average normalised utility among the "
           "answer's candidates over Σ that of the answer (1 is ideal; 95% bootstrap over "
           "prompts; a single-candidate rule is 1 by definition).\n"] if c.get("panel") else []),
        "## All prompts\n", *_table(entries, None), "",
    ]
    for kind in kinds:
        lines += [f"## {kind} prompts\n", *_table(entries, kind), ""]
    lines += ["## Plots\n"] + [f"![{p[:-4]}]({p})" for p in PLOTS] + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------- plots


def _by_strategy(entries: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for e in entries:
        groups.setdefault(e["strategy"], []).append(e)
    return groups


def plot_all(out: Path, entries: list[dict]) -> None:
    plt = pyplot()

    for name, draw in zip(PLOTS, (_reward_vs_kl, _harmless, _reward_vs_tokens)):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        draw(ax, entries)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)


def _yerr(values: list, cis: list) -> list[list[float]]:
    """matplotlib's asymmetric yerr [[below...], [above...]] from intervals (0 where none)."""
    below = [0.0 if v is None or c is None else max(v - c[0], 0.0) for v, c in zip(values, cis)]
    above = [0.0 if v is None or c is None else max(c[1] - v, 0.0) for v, c in zip(values, cis)]
    return [below, above]


def _points(ax, pts: list[tuple], style: str, label: str, color: str) -> None:
    """pts: (x, y, n, y interval or None); the interval is drawn as an error bar."""
    pts = sorted(pts, key=lambda p: (p[0], p[1], p[2]))
    ys = [p[1] for p in pts]
    ax.errorbar([p[0] for p in pts], ys, yerr=_yerr(ys, [p[3] for p in pts]), fmt=style,
                label=label, color=color, capsize=3, elinewidth=0.8)
    for x, y, n, _ in pts:
        ax.annotate(f"n={n}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))


def _reward_vs_kl(ax, entries: list[dict]) -> None:
    for i, (strategy, group) in enumerate(_by_strategy(entries).items()):
        pts = [(e["mean_kl_bound"], e["mean_reward"], e["n"], e.get("mean_reward_ci"))
               for e in group if e["mean_kl_bound"] is not None and e["mean_reward"] is not None]
        if pts:
            _points(ax, pts, "o-", f"{strategy} (KL bound)", f"C{i}")
        est = [(e["mean_kl_estimate"], e["mean_reward"], e["n"], None) for e in group
               if e["mean_kl_estimate"] is not None and e["mean_reward"] is not None]
        if est and any(p[0] > 0 for p in est):  # `none` has estimate 0 = its bound
            _points(ax, est, "x--", f"{strategy} (KL estimate)", f"C{i}")
    ax.set_xlabel("KL(π‖p), nats  (best_of_n bound: log n − (n−1)/n)")
    ax.set_ylabel("mean reward of the answer (95% interval)")
    ax.set_title("Reward vs KL per strategy and n")
    ax.legend(fontsize=8)


def _harmless(ax, entries: list[dict]) -> None:
    kinds = list(dict.fromkeys(k for e in entries for k in e["by_kind"]))
    series = [("all", list(entries))] + [
        (k, [e["by_kind"].get(k, {}) for e in entries]) for k in kinds]
    series = [(name, [s.get("harmless_ratio") for s in stats],
               [s.get("harmless_ratio_ci") for s in stats]) for name, stats in series]
    if all(v is None for _, vals, _ in series for v in vals):
        ax.text(0.5, 0.5, "no cost scorer: no harmless flags", ha="center", transform=ax.transAxes)
        return
    width = 0.8 / len(series)
    for i, (name, vals, cis) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(entries))]
        ax.bar(xs, [v if v is not None else 0.0 for v in vals], width, label=name,
               yerr=_yerr(vals, cis), capsize=2, error_kw={"elinewidth": 0.8})
    ax.set_xticks(range(len(entries)), [e["label"] for e in entries], rotation=30, ha="right",
                  fontsize=8)
    ax.set_ylim(0, 1.2)  # headroom for the legend above full bars
    ax.set_ylabel("harmless ratio (cost < threshold), 95% Wilson")
    ax.set_title("Harmless ratio per strategy")
    ax.legend(fontsize=8, ncol=len(series), loc="upper center")


def _reward_vs_tokens(ax, entries: list[dict]) -> None:
    for i, (strategy, group) in enumerate(_by_strategy(entries).items()):
        pts = [(e["tokens_per_prompt"], e["mean_reward"], e["n"], e.get("mean_reward_ci"))
               for e in group if e["mean_reward"] is not None and e["tokens_per_prompt"]]
        if pts:
            _points(ax, pts, "o-", strategy, f"C{i}")  # same colour per strategy in every plot
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per answer (log)")
    ax.set_ylabel("mean reward of the answer (95% interval)")
    ax.set_title("Reward vs compute")
    ax.legend(fontsize=8)
