"""`alignserve eval --judge SCORER` (repeatable): score the answers with scorers the strategies
did not optimise, so that a gain can be told from reward hacking.

When the selection objective and the evaluation metric are the same scorer, every gain is
in-sample: best-of-n's mean reward rises with n by construction, whether or not the answers get
better. A judge is a second scorer that only reads the answers after the fact. The report puts
the proxy (the `--reward` scorer the strategies select by) and every judge side by side per
strategy and n, and `judge.png` draws both against KL: the over-optimisation curve (Gao et al.
2023, "Scaling Laws for Reward Model Overoptimization", arXiv 2210.10760, whose figures plot a
proxy and a gold reward model's scores against √KL: the proxy keeps rising while the gold score
flattens or falls; here the judge stands in for the gold model and the x axis is KL itself).

Rules, checked before anything slow runs:
- a judge must differ from the scorers the strategies optimise (`--reward`, `--cost`): equal
  names are refused, by name; a judge that is a member of a composite objective
  (`ensemble:A,B`, `calibrated:A`) is accepted with a warning (its gains are partly in-sample);
- `-NAME` judges a cost as a utility (higher is better), as in `--panel`; spell it
  `--judge=-profanity` (argparse reads a bare `-profanity` as a flag);
- no `ensemble:`/`calibrated:` judges: their scores are quantiles among the candidates scored in
  one call (runtime/ensemble.py), meaningless for answers scored per prompt after the fact;
  no `remote:` judges: judges are scored in this process (like the panel).

Scoring: once every setting has run, each judge scores each setting's answers to one prompt in
one call (`Scorer.score(prompt, answers)`, in a worker thread), from the runtime's registry in
process or a local registry of the same scorers with `--server`.

Numbers per setting (evaluation/metrics.py `judge_numbers`): the judge's mean and its win rate
against `none`, each with the eval's 95% interval (cluster-robust t over prompts, not a
bootstrap: decoding/intervals.py).

The figure: x = the setting's mean KL bound (best_of_n: log n − (n−1)/n, Beirami et al. 2024),
y = the gain over the base policy in units of the base policy's standard deviation of the same
score, (mean − mean_none) / sd_none, so that proxy and judge, on different scales, share one
axis and both start at 0 at KL 0 (a presentation choice of this module, not from a paper).
The error bars are the setting's interval mapped the same way (the base mean's own uncertainty
is not added). One panel per judge; solid: proxy, dashed: judge, one colour per strategy; every
strategy's line starts at the base point.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from decoding.protocols import Scorer

from .harness import SettingRun
from .panel import Member

log = logging.getLogger(__name__)
PLOT = "judge.png"
# refused as judges: relative (per-call quantile) scores, or not scorable in this process
_REFUSED_PREFIXES = ("ensemble:", "ensemble[", "calibrated:", "remote:")


def _members(objective: str) -> set[str]:
    """The registry names an objective scorer is built from (itself when not composite)."""
    if objective.startswith(("ensemble:", "ensemble[", "calibrated:")):
        from runtime.ensemble import parse

        return set(parse(objective).member_names)
    return {objective}


def parse_judges(labels: Sequence[str] | None, reward: str, cost: str | None) -> list[Member]:
    """`--judge` values → judges; ValueError naming the judge for one the eval must refuse
    (module docstring), a warning for one that shares a member with a composite objective."""
    members: list[Member] = []
    for raw in labels or []:
        label = raw.strip()
        name = label[1:] if label.startswith("-") else label
        if not name:
            raise ValueError(f"--judge {raw!r}: a scorer name (-NAME: a cost as a utility)")
        if name.startswith(_REFUSED_PREFIXES):
            raise ValueError(f"--judge {label!r}: one scorer scored in this process (no "
                             "ensemble:/calibrated:, whose scores are relative to one call's "
                             "candidates, and no remote:)")
        for role, objective in (("--reward", reward), ("--cost", cost)):
            if objective is None:
                continue
            if name == objective:
                raise ValueError(f"--judge {label!r} is the {role} scorer the strategies "
                                 "select by: its gains are in-sample. Judge with a scorer they "
                                 "did not optimise")
            if name in _members(objective):
                log.warning("--judge %r is a member of the %s objective %r: its gains are "
                            "partly in-sample", label, role, objective)
        if any(m.label == label for m in members):
            raise ValueError(f"--judge {label!r} given twice")
        members.append(Member(label, name, -1.0 if label.startswith("-") else 1.0))
    return members


async def load(judges: Sequence[Member], registry) -> list[Scorer]:
    """Each judge's scorer from `registry` (runtime.scorers.ScorerRegistry), before the run."""
    return [await registry.get(m.name) for m in judges]


async def score_runs(runs: Sequence[SettingRun], judges: Sequence[Member],
                     scorers: Sequence[Scorer]) -> None:
    """Fill `Row.judges` of every answer: one `score` call per judge, setting and prompt."""
    for run in runs:
        groups: dict[str, list] = {}
        for row in run.rows:
            groups.setdefault(row.prompt_id, []).append(row)
        for judge, scorer in zip(judges, scorers):
            for rows in groups.values():
                values = await asyncio.to_thread(scorer.score, rows[0].prompt,
                                                 [r.answer for r in rows])
                for row, v in zip(rows, values):
                    row.judges[judge.label] = judge.sign * float(v)


# ----------------------------------------------------------------------------- report


def _cell(stats: dict | None, key: str, digits: int = 3) -> str:
    if stats is None or stats.get(key) is None:
        return "–"
    ci = stats.get(f"{key}_ci")
    if ci is None or ci[0] == ci[1]:
        return f"{stats[key]:.{digits}f}"
    return f"{stats[key]:.{digits}f} [{ci[0]:.{digits - 1}f}, {ci[1]:.{digits - 1}f}]"


def markdown(config: dict, entries: list[dict]) -> list[str]:
    """The report's section: proxy and judges per strategy and n (empty without judges)."""
    judges = config.get("judges") or []
    if not judges:
        return []
    head = ["strategy", "n", "KL bound", f"proxy `{config.get('reward')}` mean",
            "proxy win rate"]
    for j in judges:
        head += [f"judge `{j}` mean", f"judge `{j}` win rate"]
    lines = ["## Proxy vs judges\n",
             f"Proxy: the reward scorer `{config.get('reward')}` the strategies select by"
             + (f" (with the cost `{config.get('cost')}`)" if config.get("cost") else "")
             + f"; judges, which no strategy optimises: {', '.join(f'`{j}`' for j in judges)} "
             "(`-NAME`: a cost as a utility). Cells: value [95% interval, cluster-robust t "
             "over prompts]; win rates against `none` on the same prompts, ties ½. A proxy "
             "that keeps rising while a judge flattens or falls is over-optimisation "
             "(evaluation/judge.py).\n",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        cells = [e["strategy"], str(e["n"]), _cell(e, "mean_kl_bound"),
                 _cell(e, "mean_reward"), _cell(e, "win_rate")]
        for j in judges:
            stats = (e.get("judges") or {}).get(j)
            cells += [_cell(stats, "mean"), _cell(stats, "win_rate")]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, "", f"![proxy and judges vs KL]({PLOT})", ""]


def _base_scale(entries: list[dict], key: str) -> tuple[float, float] | None:
    """(mean, sd) of one score over the base policy's answers; sd 1 when it has no spread."""
    base = next((e for e in entries if e["strategy"] == "none"), None)
    if base is None:
        return None
    values = [_value(a, key) for a in base["answers"]]
    present = [v for v in values if v is not None]
    if not present:
        return None
    sd = statistics.stdev(present) if len(present) > 1 else 0.0
    return statistics.fmean(present), (sd if sd > 0 and math.isfinite(sd) else 1.0)


def _value(answer: dict, key: str) -> float | None:
    return answer["reward"] if key == "proxy" else (answer.get("judges") or {}).get(key)


def _curve(entries: list[dict], key: str) -> list[tuple[float, float, float, float, int]]:
    """(KL, gain, gain lo, gain hi, n) per entry, in base-policy sds (module docstring)."""
    scale = _base_scale(entries, key)
    if scale is None:
        return []
    mu, sd = scale
    pts = []
    for e in entries:
        stats = e if key == "proxy" else (e.get("judges") or {}).get(key) or {}
        mean_key = "mean_reward" if key == "proxy" else "mean"
        m, ci = stats.get(mean_key), stats.get(f"{mean_key}_ci")
        if m is None or e.get("mean_kl_bound") is None:
            continue
        lo, hi = ci if ci is not None else (m, m)
        pts.append((e["mean_kl_bound"], (m - mu) / sd, (lo - mu) / sd, (hi - mu) / sd, e["n"]))
    return pts


def plot(path: Path, config: dict, entries: list[dict]) -> None:
    """judge.png: one panel per judge, proxy (solid) and judge (dashed) gain against KL."""
    from runtime.plotting import pyplot

    plt = pyplot()
    judges = config.get("judges") or []
    fig, axes = plt.subplots(1, len(judges), figsize=(6.4 * len(judges), 4.8), squeeze=False)
    base = [e for e in entries if e["strategy"] == "none"]
    families: dict[str, list[dict]] = {}
    for e in entries:
        if e["strategy"] != "none":
            families.setdefault(e["strategy"], []).append(e)
    if not families:  # only the base policy: draw its point alone
        families = {"none": base}
    for ax, judge in zip(axes[0], judges):
        for i, (strategy, group) in enumerate(families.items()):
            line = base + group if strategy != "none" else group
            for key, style, what in (("proxy", "o-", f"proxy {config.get('reward')}"),
                                     (judge, "s--", f"judge {judge}")):
                pts = sorted(_curve(line, key))
                if not pts:
                    continue
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                yerr = [[max(p[1] - p[2], 0.0) for p in pts], [max(p[3] - p[1], 0.0) for p in pts]]
                ax.errorbar(xs, ys, yerr=yerr, fmt=style, color=f"C{i}", capsize=3,
                            elinewidth=0.8, label=f"{strategy}: {what}")
                if key == "proxy":
                    for x, y, *_, n in pts:
                        ax.annotate(f"n={n}", (x, y), fontsize=7, textcoords="offset points",
                                    xytext=(3, 3))
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_xlabel("KL(π‖p) bound, nats (best_of_n: log n − (n−1)/n)")
        ax.set_ylabel("gain over none, in sd of none's scores (95% interval)")
        ax.set_title(f"Proxy {config.get('reward')} vs judge {judge} against KL", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
