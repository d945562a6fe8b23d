"""SafeDPO's data transform T (Kim et al., "SafeDPO: A Simple Approach to Direct Preference
Optimization with Enhanced Safety", arXiv 2505.20065).

SafeDPO solves  max_π E[r] − β·KL(π‖π_ref)  subject to every sampled response being safe by
replacing r with r_c = r on safe responses and −∞ on unsafe ones. Under Bradley–Terry this turns
a helpfulness pair (y_w ≻ y_l) with unsafety indicators h (h = 1: unsafe) into:

    h_w = 0               keep  (ỹ_w, ỹ_l) = (y_w, y_l)      the helpful answer was already safe
    h_w = 1, h_l = 0      swap  (ỹ_w, ỹ_l) = (y_l, y_w)      a safe answer beats any unsafe one
    h_w = 1, h_l = 1      drop  (the ICLR version of the paper drops these pairs: both have
                                 r_c = −∞, so the pair says nothing about the optimum)

After T, h̃_w = 0 for every kept pair; h̃_l is 1 exactly when the loser is unsafe. The loss
(finetune/losses.py) then adds the safety offset −(h̃_l − h̃_w)·Δ to the DPO logit.

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


def transform_pair(pair: PreferencePair) -> DPOExample | None:
    """T for one pair: the kept or swapped example, or None when both responses are unsafe."""
    w, l = pair.better, 1 - pair.better
    h_w, h_l = int(not pair.safe[w]), int(not pair.safe[l])
    if h_w and h_l:
        return None
    if h_w:  # the helpful answer is unsafe and the other one is safe: the safe one wins
        w, l, h_w, h_l = l, w, h_l, h_w
        action = "swap"
    else:
        action = "keep"
    return DPOExample(pair.prompt, pair.responses[w], pair.responses[l], h_w, h_l, action)


def safedpo_transform(pairs: list[PreferencePair]) -> tuple[list[DPOExample], dict[str, int]]:
    """Apply T to every pair; returns the examples and counts {keep, swap, drop, unsafe_rejected}."""
    out: list[DPOExample] = []
    counts: Counter[str] = Counter(keep=0, swap=0, drop=0, unsafe_rejected=0)
    for pair in pairs:
        ex = transform_pair(pair)
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
