"""Feedback of other shapes from PKU-SafeRLHF-style pairs: KLDO's aligned / unaligned sets and
PRO's pairwise, binary and scalar feedback (finetune/losses.py has the losses).

Everything starts from one preference order over the two answers of a pair, SafeDPO's
(finetune/safedpo.py): a safe answer beats an unsafe one; between two safe answers the more
helpful one (`better_response_id`) wins; two unsafe answers tie (SafeDPO drops such pairs: they
say nothing about which answer is *safe*). For every distinct (prompt, answer) we then have

    s(y) = mean over the pairs y appears in of p(y ≻ partner) − ½ ∈ [−½, ½]

which is PRO's score function s(y) = E_{y'}[p(y ≻ y')] − ½ (arXiv 2505.23316, §3) with the
empirical distribution of partners. From it:

- **pairwise** (PRO): SafeDPO's transformed pairs (ỹ_w, ỹ_l), the same pairs `finetune safedpo`
  trains on, so the two are comparable;
- **scalar** (PRO): s(y) itself, one example per distinct answer;
- **binary** (PRO) and **KLDO's compliance/refusal sets** (arXiv 2502.00657): desirable / D⁺ =
  safe answers with s(y) > 0, undesirable / D⁻ = every unsafe answer. A safe answer with
  s(y) ≤ 0 (on the shipped data: the curt "I'm not sure." answers, which lose to the helpful safe
  answer as often as they beat the unsafe one) is left out of both: it is neither harmful nor
  the answer we want, and counting it as aligned would reward refusing benign questions,
  which KLDO's compliance/refusal data counts as *unaligned*. On the shipped synthetic pairs
  D⁺ holds the helpful answers to benign prompts (compliance) and the safe redirections of
  adversarial prompts (refusal); D⁻ the profane compliance with adversarial prompts and the
  profane answers to benign ones. The pairs carry no "this prompt is harmful" label, so the
  paper's rule (harmful prompt: refusal ∈ D⁺, compliance ∈ D⁻; benign prompt: the reverse)
  is approximated through the safety labels rather than applied directly.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from .pairs import PreferencePair
from .safedpo import DPOExample, safedpo_transform


@dataclass(frozen=True)
class Completion:
    """One answer with its feedback: `score` is s(y) ∈ [−½, ½] (scalar), ±½ (binary) or
    +1 / −1 (KLDO: aligned D⁺ / unaligned D⁻)."""

    prompt: str
    text: str
    score: float
    safe: bool


def preference(pair: PreferencePair) -> tuple[float, float]:
    """(p(y₀ ≻ y₁), p(y₁ ≻ y₀)) under SafeDPO's order (module docstring)."""
    safe0, safe1 = pair.safe
    if safe0 != safe1:
        return (1.0, 0.0) if safe0 else (0.0, 1.0)
    if not safe0:  # both unsafe: a tie
        return 0.5, 0.5
    return (1.0, 0.0) if pair.better == 0 else (0.0, 1.0)


def scores(pairs: list[PreferencePair]) -> list[Completion]:
    """s(y) for every distinct (prompt, answer), in order of first appearance."""
    wins: dict[tuple[str, str], list[float]] = defaultdict(list)
    safe: dict[tuple[str, str], bool] = {}
    for pair in pairs:
        for i, p in enumerate(preference(pair)):
            key = (pair.prompt, pair.responses[i])
            wins[key].append(p)
            safe[key] = safe.get(key, True) and pair.safe[i]  # unsafe once: unsafe
    return [Completion(k[0], k[1], sum(v) / len(v) - 0.5, safe[k]) for k, v in wins.items()]


def binary_feedback(pairs: list[PreferencePair]) -> list[Completion]:
    """+½ for safe answers with s > 0, −½ for unsafe ones; the rest dropped."""
    out = []
    for c in scores(pairs):
        if not c.safe:
            out.append(Completion(c.prompt, c.text, -0.5, False))
        elif c.score > 0:
            out.append(Completion(c.prompt, c.text, 0.5, True))
    return out


def kldo_sets(pairs: list[PreferencePair]) -> list[Completion]:
    """KLDO's aligned (+1, D⁺) and unaligned (−1, D⁻) completions: the binary split."""
    return [Completion(c.prompt, c.text, 1.0 if c.score > 0 else -1.0, c.safe)
            for c in binary_feedback(pairs)]


def pairwise_feedback(pairs: list[PreferencePair]) -> tuple[list[DPOExample], dict[str, int]]:
    """SafeDPO's transformed pairs (keep / swap / drop)."""
    return safedpo_transform(pairs)


def stats(completions: list[Completion]) -> dict:
    """Counts for the report: completions, positive / negative / zero scores, mean score."""
    n = len(completions)
    return {"completions": n, "positive": sum(c.score > 0 for c in completions),
            "negative": sum(c.score < 0 for c in completions),
            "zero": sum(c.score == 0 for c in completions),
            "mean_score": sum(c.score for c in completions) / n if n else 0.0}


FEEDBACK = {"binary": binary_feedback, "scalar": scores}  # unpaired PRO feedback builders
