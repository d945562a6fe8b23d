"""The law of best-of-n over K scored samples (numpy only): one implementation, two users.

Best-of-n draws n i.i.d. answers and returns the highest-scoring one. Over the empirical law of
K reference samples (mass 1/K each), "draw n of the K with replacement, keep the best, break ties
uniformly" returns sample k with probability

    w_k = (F≤ₖⁿ − F<ₖⁿ) / mₖ,   F≤ₖ = #{j: s_j ≤ s_k}/K,  F<ₖ = #{j: s_j < s_k}/K,  mₖ = #{j: s_j = s_k}

(BOND, Sessa et al., arXiv 2407.14622, Theorem 1; vBoN, Amini et al., arXiv 2407.06057, §3: a tie
level's mass F≤ⁿ − F<ⁿ split evenly). Without ties, sorted ascending, sample k (1-based) gets
(k/K)ⁿ − ((k−1)/K)ⁿ (DESIGN-NOTES §4, "Constraints under the rule actually served"). Σ_k w_k = 1.

Users: BOND's forward term (finetune/bond.py, the best-of-n law of the reward) and the safety
constraint under the rule actually served (decoding/dual_rules.py, the best-of-n law of the
selection score r + λ·g). The server's best-of-n takes the first of equal scores among i.i.d.
draws, which by exchangeability is a uniform tie-break: the same law.
"""

from __future__ import annotations

import numpy as np


def bon_law(scores, n: int) -> np.ndarray:
    """w [..., K]: the best-of-n selection probabilities of each of the K samples in the last
    axis (module docstring); any leading axes are independent prompts. n ≥ 1."""
    if n < 1:
        raise ValueError("n must be ≥ 1")
    s = np.asarray(scores, dtype=np.float64)
    if s.shape[-1] == 0:
        return np.zeros(s.shape)
    k = s.shape[-1]
    order = np.argsort(s, axis=-1, kind="stable")
    ranked = np.take_along_axis(s, order, axis=-1)  # ascending
    pos = np.broadcast_to(np.arange(k), ranked.shape)
    new = np.ones(ranked.shape, dtype=bool)
    new[..., 1:] = ranked[..., 1:] != ranked[..., :-1]  # a tie level starts here
    # lt: index of the level's first member (#{j: s_j < s}); le: one past its last (#{≤}).
    lt = np.maximum.accumulate(np.where(new, pos, 0), axis=-1)
    end = np.ones(ranked.shape, dtype=bool)
    end[..., :-1] = new[..., 1:]
    le = np.flip(np.minimum.accumulate(np.flip(np.where(end, pos + 1, k), -1), axis=-1), -1)
    sorted_w = ((le / k) ** n - (lt / k) ** n) / (le - lt)
    out = np.empty_like(sorted_w)
    np.put_along_axis(out, order, sorted_w, axis=-1)
    return out


def bon_mean(scores, values, n: int) -> np.ndarray:
    """Σ_k w_k·v_k per prompt: the expectation of `values` under best-of-n by `scores`."""
    return np.sum(bon_law(scores, n) * np.asarray(values, dtype=np.float64), axis=-1)
