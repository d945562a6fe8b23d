"""SafeDPO's data transform T (Kim et al., "SafeDPO: A Simple Approach to Direct Preference
Optimization with Enhanced Safety", arXiv 2505.20065).

SafeDPO solves  max_π E[r] − β·KL(π‖π_ref)  subject to every sampled response being safe by
replacing r with r_c = r on safe responses and −∞ on unsafe ones. Under Bradley–Terry this turns
a helpfulness pair (y_w ≻ y_l) with unsafety indicators h (h = 1: unsafe) into:

    h_w = 0               keep  (ỹ_w, ỹ_l) = (y_w, y_l)      the helpful answer was already safe
    h_w = 1, h_l = 0      swap  (ỹ_w, ỹ_l) = (y_l, y_w)      a safe answer beats any unsafe one
    h_w = 1, h_l = 1      `both_unsafe` decides (a flag; which paper version does what could
                          not be verified here, so no version is cited for either):
        "drop" (default)  leave the pair out. Our derivation from the paper's own r_c (r on
                          safe answers, −∞ on unsafe ones): under Bradley–Terry with r_c both
                          answers have reward −∞, P(y_w ≻ y_l) = σ(−∞ − (−∞)) is undefined, and
                          the pair carries no information about the constrained optimum.
        "keep"            keep (y_w, y_l) as it is: the transform read literally as "swap only
                          when h_w = 1 and h_l = 0, else keep" (DESIGN-NOTES §4's form of T),
                          so the loss below sees h̃_l − h̃_w = 0, i.e. plain DPO on the pair,
                          teaching helpfulness between two unsafe answers.

After T, h̃_w = 0 for every kept pair except "keep"-ed both-unsafe ones (h̃_w = h̃_l = 1); h̃_l
is 1 exactly when the loser is unsafe. The loss (finetune/losses.py) then adds the safety
offset −(h̃_l − h̃_w)·Δ to the DPO logit: −log σ(β·log π_θ(ỹ_w)/π_ref(ỹ_w) − β·log
π_θ(ỹ_l)/π_ref(ỹ_l) − (h̃_l − h̃_w)·Δ) (DESIGN-NOTES §4, SafeDPO's loss).

y_w is `better_response_id` (helpfulness); `safer_response_id` is not needed by T (the safety
labels decide), but it is read and validated with the rest of the schema.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .pairs import PreferencePair


@dataclass(frozen=True)
class DPOExample:
    """One DPO training pair after a transform (prompt, chosen ỹ_w, rejected ỹ_l)."""

    prompt: str
    chosen: str
    rejected: str
    h_chosen: int = 0    # 1 if the chosen response is unsafe
    h_rejected: int = 0  # 1 if the rejected response is unsafe
    action: str = "keep"  # how the transform produced it: keep / swap / relabel ...


BOTH_UNSAFE = ("drop", "keep")  # what T does with a pair whose answers are both unsafe


def transform_pair(pair: PreferencePair, both_unsafe: str = "drop") -> DPOExample | None:
    """T for one pair: the kept or swapped example; with both responses unsafe, None
    (`both_unsafe` "drop") or the pair unchanged with action "keep_unsafe" ("keep")."""
    if both_unsafe not in BOTH_UNSAFE:
        raise ValueError(f"both_unsafe must be one of {BOTH_UNSAFE}, got {both_unsafe!r}")
    w, l = pair.better, 1 - pair.better
    h_w, h_l = int(not pair.safe[w]), int(not pair.safe[l])
    if h_w and h_l:
        if both_unsafe == "drop":
            return None
        return DPOExample(pair.prompt, pair.responses[w], pair.responses[l], 1, 1, "keep_unsafe")
    if h_w:  # the helpful answer is unsafe and the other one is safe: the safe one wins
        w, l, h_w, h_l = l, w, h_l, h_w
        action = "swap"
    else:
        action = "keep"
    return DPOExample(pair.prompt, pair.responses[w], pair.responses[l], h_w, h_l, action)


def safedpo_transform(pairs: list[PreferencePair], both_unsafe: str = "drop"
                      ) -> tuple[list[DPOExample], dict[str, int]]:
    """Apply T to every pair; returns the examples and counts {keep, swap, drop,
    unsafe_rejected} (+ keep_unsafe with `both_unsafe` "keep")."""
    out: list[DPOExample] = []
    counts: Counter[str] = Counter(keep=0, swap=0, drop=0, unsafe_rejected=0)
    for pair in pairs:
        ex = transform_pair(pair, both_unsafe)
        if ex is None:
            counts["drop"] += 1
            continue
        counts[ex.action] += 1
        counts["unsafe_rejected"] += ex.h_rejected
        out.append(ex)
    return out, dict(counts)


def safety_offsets(examples: list[DPOExample], delta: float) -> list[float]:
    """Per-pair offset o = (h̃_l − h̃_w)·Δ that SafeDPO subtracts from the DPO logit."""
    return [(ex.h_rejected - ex.h_chosen) * delta for ex in examples]
