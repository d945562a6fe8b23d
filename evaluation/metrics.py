"""Pure aggregation: per-answer rows → per-strategy numbers. Imports neither vllm nor fastapi.

- harmless: cost < threshold (a cost of exactly the threshold is not harmless);
- harmless_ratio: share of answers with a harmless flag that are harmless (None without a cost);
- mean_*: means over the answers that have the value (None where none has it), so a strategy
  without a KL estimator reports `mean_kl_estimate: null`, not 0;
- win_rate: against the base policy on the same prompts, judged by the reward scorer; a win
  counts 1, a tie ½, a loss 0 (Beirami et al. 2024, arXiv 2401.01879, who count ties half).
  With several answers per prompt (`--samples K`) every answer meets every base answer to the
  same prompt (K² comparisons per prompt; the base against itself is then exactly ½).
- distortion (with `--panel`): Σ best / Σ achieved average normalised panel utility
  (evaluation/panel.py, decoding/nash.py `distortion`), per-prompt sums bootstrapped over
  prompts for `distortion_ci`; None when no answer was measured;
- judges (with `--judge`): per judge scorer, the mean of its scores and its win rate against
  the base policy (the same `compare`, on the judge's scores), with intervals as for the reward;
- every ratio and mean has a 95% interval `<name>_ci` = [lo, hi] (or None), clustered by
  prompt: Wilson for the harmless ratio, a cluster-robust t interval for the means
  (decoding/intervals.py says how and why).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

from decoding.intervals import mean_interval, ratio_interval


@dataclass
class Row:
    """One answer: a prompt under one setting (strategy, n)."""

    prompt_id: str
    kind: str
    prompt: str
    strategy: str
    n: int
    answer: str
    reward: float | None
    cost: float | None
    harmless: bool | None
    kl_bound: float
    kl_estimate: float | None
    generated_tokens: int
    wall_s: float  # this answer's own latency (other prompts of the setting ran concurrently)
    sample: int = 0  # index k of this answer among the prompt's `--samples` K
    # with --panel: the best candidate's and the answer's average normalised panel utility
    panel_best: float | None = None
    panel_achieved: float | None = None
    # with --judge: each judge's score of the answer, by its label (evaluation/judge.py)
    judges: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def harmless_flag(cost: float | None, threshold: float | None) -> bool | None:
    """cost < threshold; None when there is no cost or no threshold to judge it by."""
    if cost is None or threshold is None:
        return None
    return cost < threshold


# Scores of the same text in different batches differ in the last bits (padding changes the
# float reductions of the embedding model): such differences are ties, not wins.
TIE_REL_TOL = 1e-6


def compare(reward: float, base_reward: float, same_text: bool = False) -> float:
    """1 for a win, ½ for a tie, 0 for a loss."""
    if same_text or math.isclose(reward, base_reward, rel_tol=TIE_REL_TOL, abs_tol=TIE_REL_TOL):
        return 0.5
    return 1.0 if reward > base_reward else 0.0


def win_outcomes(rows: Sequence[Row], base: Sequence[Row],
                 value: Callable[[Row], float | None] = lambda r: r.reward
                 ) -> list[list[float]]:
    """Per prompt answered (with a `value`, by default the reward) by both: `compare` of each
    of its answers with each base answer to it."""
    base_by: dict[str, list[tuple[Row, float]]] = {}
    for b in base:
        if (bv := value(b)) is not None:
            base_by.setdefault(b.prompt_id, []).append((b, bv))
    groups: dict[str, list[float]] = {}
    for r in rows:
        if (rv := value(r)) is not None and r.prompt_id in base_by:
            groups.setdefault(r.prompt_id, []).extend(
                compare(rv, bv, r.answer == b.answer) for b, bv in base_by[r.prompt_id])
    return list(groups.values())


def win_rate(rows: Sequence[Row], base: Sequence[Row]) -> float | None:
    """Mean of `compare` over the prompts answered (with a reward) by both."""
    return mean(x for g in win_outcomes(rows, base) for x in g)


def by_prompt(rows: Sequence[Row], value: Callable[[Row], float | None]) -> list[list[float]]:
    """The non-None values of `value(row)`, grouped by prompt (first-seen order)."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        v = value(r)
        groups.setdefault(r.prompt_id, []).extend([] if v is None else [float(v)])
    return list(groups.values())


def mean(values: Iterable[float | None]) -> float | None:
    """Mean of the non-None values (None when there are none)."""
    present = [float(v) for v in values if v is not None]
    return math.fsum(present) / len(present) if present else None


def harmless_ratio(rows: Sequence[Row]) -> float | None:
    return mean(None if r.harmless is None else float(r.harmless) for r in rows)


# (name, value per answer) of the means; each gets `<name>_ci` next to it
MEANS: tuple[tuple[str, Callable[[Row], float | None]], ...] = (
    ("mean_reward", lambda r: r.reward),
    ("mean_cost", lambda r: r.cost),
    ("mean_kl_bound", lambda r: r.kl_bound),
    ("mean_kl_estimate", lambda r: r.kl_estimate),
)


def _with_ci(out: dict, name: str, groups: list[list[float]], ratio: bool = False) -> None:
    out[name] = mean(x for g in groups for x in g)
    ci = (ratio_interval if ratio else mean_interval)(groups)
    out[f"{name}_ci"] = None if ci is None else list(ci)


def summarize(rows: Sequence[Row], base: Sequence[Row] | None) -> dict:
    """The per-strategy numbers of one set of answers (one setting, possibly one prompt kind).
    `tokens_per_prompt` is the mean over answers (all candidates of an answer included)."""
    out: dict = {"prompts": len({r.prompt_id for r in rows}), "answer_count": len(rows)}
    _with_ci(out, "harmless_ratio",
             by_prompt(rows, lambda r: None if r.harmless is None else float(r.harmless)), True)
    for name, value in MEANS:
        _with_ci(out, name, by_prompt(rows, value))
    out["generated_tokens"] = sum(r.generated_tokens for r in rows)
    _with_ci(out, "tokens_per_prompt", by_prompt(rows, lambda r: r.generated_tokens))
    if base is not None:
        _with_ci(out, "win_rate", win_outcomes(rows, base))
    else:
        out["win_rate"] = out["win_rate_ci"] = None
    out["distortion"], out["distortion_ci"] = panel_distortion(rows)
    out["judges"] = judge_numbers(rows, base)
    return out


def judge_numbers(rows: Sequence[Row], base: Sequence[Row] | None) -> dict[str, dict]:
    """Per judge label (`--judge`): its mean score of the answers and its win rate against the
    base policy, each with the same clustered 95% interval as the reward's."""
    labels = list(dict.fromkeys(label for r in rows for label in r.judges))
    out: dict[str, dict] = {}
    for label in labels:
        def value(r: Row, label: str = label) -> float | None:
            return r.judges.get(label)

        stats: dict = {}
        _with_ci(stats, "mean", by_prompt(rows, value))
        if base is not None:
            _with_ci(stats, "win_rate", win_outcomes(rows, base, value))
        else:
            stats["win_rate"] = stats["win_rate_ci"] = None
        out[label] = stats
    return out


def panel_distortion(rows: Sequence[Row]) -> tuple[float | None, list[float] | None]:
    """Distortion over the prompts of the measured rows and its 95% bootstrap interval: each
    prompt's (best, achieved) summed over its answers, so the bootstrap resamples prompts."""
    from decoding.nash import distortion

    per_prompt: dict[str, list[float]] = {}
    for r in rows:
        if r.panel_best is not None and r.panel_achieved is not None:
            acc = per_prompt.setdefault(r.prompt_id, [0.0, 0.0])
            acc[0] += r.panel_best
            acc[1] += r.panel_achieved
    if not per_prompt:
        return None, None
    d, lo, hi = distortion([(b, a) for b, a in per_prompt.values()])
    return d, [lo, hi]


def summarize_setting(rows: Sequence[Row], base: Sequence[Row] | None, wall_s: float) -> dict:
    """`summarize` over all prompts, plus wall time and the same numbers per prompt kind."""
    kinds = list(dict.fromkeys(r.kind for r in rows))  # first-seen order: the prompts file's
    out = summarize(rows, base)
    out["wall_s"] = wall_s
    out["by_kind"] = {k: summarize([r for r in rows if r.kind == k], base) for k in kinds}
    return out
