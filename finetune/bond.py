"""Best-of-n distillation data: the BoN distribution of reference rollouts, quantiles, groups.

BOND (Sessa et al., "BOND: Aligning LLMs with Best-of-N Distillation", arXiv 2407.14622) and
vBoN (Amini et al., "Variational Best-of-N Alignment", arXiv 2407.06057) fine-tune a policy
towards π_BoN, the distribution of the answer best-of-n returns from n i.i.d. draws of π_ref.

The BoN distribution (BOND Theorem 1; vBoN §3). For a y whose reward no other answer shares,

    π_BoN(y) = p≤(y)ⁿ − p<(y)ⁿ = Σ_{i=1..n} C(n, i)·π_ref(y)ⁱ·p<(y)ⁿ⁻ⁱ
             = π_ref(y)·p≤(y)ⁿ⁻¹·Σ_{i=1..n} (p<(y)/p≤(y))ⁱ⁻¹        (≈ n·π_ref(y)·p≤(y)ⁿ⁻¹)

with p≤(y) = P_{y'~π_ref}[r(y') ≤ r(y)] and p<(y) the strict version. The first form we derived
(y wins when it is drawn i ≥ 1 times and every other draw is worse); the sum of binomial terms is
what vBoN's reference code computes (rycolab/vbon, examples/ppo_sentiments.py,
`exact_bon_reward`); the third form is BOND's "p≤ⁿ⁻¹ times a correction factor", which we could
read only in summaries (the full paper text was not readable here), and it equals the first one
algebraically (the correction factor's geometric sum times π_ref = p≤ − p<).

What this module computes from a rollout folder (K reference samples per prompt, scored):
- `bon_weights`: π_BoN over the K samples under the *empirical* reference (mass 1/K each;
  computed by decoding/bon_law.py, which the served-rule safety constraint uses too):
  w_k = (F≤ₖⁿ − F<ₖⁿ)/mₖ, F≤ₖ = #{j: r_j ≤ r_k}/K, F<ₖ = #{j: r_j < r_k}/K, mₖ = #{j: r_j = r_k}
  (a tie level's mass split evenly: best-of-n with a uniform tie-break). Σ_k w_k = 1. This is the
  exact expectation of "draw n of the K samples with replacement, keep the best", so the forward
  term of BOND (maximum likelihood on best-of-n samples) needs no resampling noise.
- `log_quantile`: log p̂≤(y) of a fresh policy sample against the prompt's K reference rewards,
  with vBoN's smoothed empirical CDF (their code: rank = #{j: r_j < r}, F = (rank + 1)/(K + 1)),
  never 0, so log p̂ is finite (BOND estimates the same quantile from reference samples).
- `load_groups` / `split_groups`: rollouts grouped by prompt, held-out prompts kept apart.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from decoding.bon_law import bon_law


@dataclass(frozen=True)
class BondGroup:
    """One prompt's K reference samples (token ids exactly as the engine sampled them)."""

    prompt_id: str
    prompt: str
    prompt_ids: list[int]
    samples: list[list[int]]   # [K][tokens]
    rewards: list[float]       # [K]
    ref_logps: list[float]     # [K] Σ_t log π_ref(y_t | ·) from the rollouts (after temperature)


def bon_weights(rewards: Sequence[float], n: int) -> list[float]:
    """π_BoN (best of n) over K samples with mass 1/K each (module docstring). n ≥ 1.
    The one implementation is decoding/bon_law.py, shared with the served-rule constraint."""
    return bon_law(list(rewards), n).tolist()


def log_quantile(reward: float, ref_rewards: Sequence[float]) -> float:
    """log p̂≤ of `reward` among the reference rewards: vBoN's smoothed empirical CDF,
    log((#{r_j < reward} + 1)/(K + 1)), in [log 1/(K+1), 0]."""
    rank = sum(x < reward for x in ref_rewards)
    return math.log((rank + 1) / (len(ref_rewards) + 1))


def load_groups(folder: Path) -> tuple[dict, list[BondGroup]]:
    """Group a rollout folder's rows by prompt. Returns (manifest as a dict, groups in file
    order). Prompts with fewer than 2 samples are dropped (no ranking); a row without a
    finite reward is an error."""
    from dataclasses import asdict

    from valuenet.data import read_rollouts

    manifest, rows = read_rollouts(Path(folder))
    by_prompt: dict[str, list] = defaultdict(list)
    for row in rows:
        if row.reward is None or not math.isfinite(row.reward):
            raise ValueError(f"{folder}: prompt {row.prompt_id} sample {row.sample} has no "
                             "finite reward")
        by_prompt[row.prompt_id].append(row)
    groups = []
    for pid, rs in by_prompt.items():
        if len(rs) < 2:
            continue
        rs.sort(key=lambda r: r.sample)
        groups.append(BondGroup(pid, rs[0].prompt, list(rs[0].prompt_ids),
                                [list(r.token_ids) for r in rs], [float(r.reward) for r in rs],
                                [float(sum(r.logprobs)) for r in rs]))
    if not groups:
        raise ValueError(f"{folder}: no prompt with ≥ 2 scored samples (rollouts --n ≥ 2)")
    return asdict(manifest), groups


def split_groups(groups: list[BondGroup], held_out: float,
                 seed: int) -> tuple[list[BondGroup], list[BondGroup]]:
    """Seeded split by prompt: round(held_out·G) prompts held out, at least one left to train."""
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    cut = min(round(held_out * len(groups)), len(groups) - 1)
    held = set(order[:cut])
    return ([g for i, g in enumerate(groups) if i not in held],
            [g for i, g in enumerate(groups) if i in held])


def data_stats(groups: list[BondGroup], n: int) -> dict:
    """Prompts, samples, mean reward of the reference and of its empirical best-of-n
    (Σ_k w_k·r_k: what a perfect distillation would reach on these prompts)."""
    if not groups:
        return {}
    ref = [sum(g.rewards) / len(g.rewards) for g in groups]
    bon = [sum(w * r for w, r in zip(bon_weights(g.rewards, n), g.rewards)) for g in groups]
    return {"prompts": len(groups), "samples": sum(len(g.rewards) for g in groups),
            "mean_reward_ref": sum(ref) / len(ref), f"mean_reward_bo{n}": sum(bon) / len(bon)}
