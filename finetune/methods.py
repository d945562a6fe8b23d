"""KLDO and PRO as objectives of the explicit loop (finetune/loop.py): their sequences,
batch layout, loss and report statistics. Losses in finetune/losses.py, data in
finetune/feedback.py.

Report statistics (the keys finetune/report.py tabulates), r = β·log π_θ/π_ref per answer:
`loss` the method's loss over the whole split (KLDO: its unnormalised form −DV, whatever
`normalize` the training used); `chosen_reward` / `rejected_reward` mean r of
the desirable (D⁺, s > 0, ỹ_w) and undesirable (D⁻, s < 0, ỹ_l) answers; `reward_margin` their
difference; `accuracy` pairwise: share of pairs with r_w > r_l, unpaired: share of answers with
s ≠ 0 whose r has the sign of s (0 at step 0, where every r is 0); KLDO also `kl_estimate`:
the Donsker–Varadhan *lower bound* −L of KL(D⁺‖D⁻) with the implicit reward as critic (a bound
for that critic, tight only at the optimal one; not an unbiased estimate of the KL).
"""

from __future__ import annotations

import random

import torch

from .feedback import Completion
from .loop import Objective
from .losses import kldo_loss, pro_pairwise_loss, pro_unpaired_loss
from .safedpo import DPOExample
from .utils import pick_balanced, pick_indices


def _side_stats(r: torch.Tensor, score: torch.Tensor) -> dict:
    pos, neg = r[score > 0], r[score < 0]
    signed = score != 0
    chosen = float(pos.mean()) if pos.numel() else 0.0
    rejected = float(neg.mean()) if neg.numel() else 0.0
    return {"chosen_reward": chosen, "rejected_reward": rejected,
            "reward_margin": chosen - rejected,
            "accuracy": float((torch.sign(r[signed]) == torch.sign(score[signed])).float().mean())
            if bool(signed.any()) else 0.0}


def kldo_objective(completions: list[Completion], beta: float, ema_rate: float,
                   normalize: bool = True) -> Objective:
    """KLDO on aligned (score > 0) and unaligned (score < 0) completions. A step takes
    ⌈batch/2⌉ of each, as the reference implementation's loader interleaves them; `ema_rate`
    > 0 uses the moving-average gradient of the log-mean-exp term (losses.log_mean_exp), and the
    average restarts every epoch (a pass's worth of completions), as the reference trainer's
    `reset_moving_avg` does; `normalize` (the reference's default) see losses.kldo_loss."""
    score = torch.tensor([c.score for c in completions])
    pos = [i for i, c in enumerate(completions) if c.score > 0]
    neg = [i for i, c in enumerate(completions) if c.score < 0]
    state: dict = {"ema": None, "labels": None, "seen": 0}

    def sample(rng: random.Random, batch: int) -> list[int]:
        if state["seen"] >= len(completions):  # a new epoch: the EMA starts afresh
            state["ema"], state["seen"] = None, 0
        idx = pick_balanced(rng, pos, neg, batch)
        state["seen"] += len(idx)
        state["labels"] = score[idx]
        return idx

    def loss(lp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        lab = state["labels"]
        running = None
        if ema_rate > 0:
            with torch.no_grad():
                batch_mean = float(torch.exp(beta * (lp[lab < 0] - ref[lab < 0])).mean())
            ema = state["ema"]
            state["ema"] = batch_mean if ema is None else ema_rate * batch_mean + (
                1 - ema_rate) * ema
            running = state["ema"]
        return kldo_loss(lp[lab > 0], ref[lab > 0], lp[lab < 0], ref[lab < 0], beta, running,
                         normalize)

    def stats(lp: torch.Tensor, ref: torch.Tensor) -> dict:
        value = float(kldo_loss(lp[score > 0], ref[score > 0], lp[score < 0], ref[score < 0],
                                beta))
        return {"pairs": len(completions), "loss": value, "kl_estimate": -value,
                **_side_stats(beta * (lp - ref), score)}

    if not pos or not neg:
        raise ValueError(f"KLDO needs aligned and unaligned completions, got {len(pos)} "
                         f"aligned and {len(neg)} unaligned")
    return Objective("kldo", [(c.prompt, c.text) for c in completions], sample, loss, stats)


def pro_unpaired_objective(completions: list[Completion], beta: float, alpha: float,
                           name: str) -> Objective:
    """PRO with binary or scalar feedback: `batch` random completions per step."""
    score = torch.tensor([c.score for c in completions])
    state = {"idx": []}

    def sample(rng: random.Random, batch: int) -> list[int]:
        state["idx"] = pick_indices(rng, list(range(len(completions))), batch)
        return state["idx"]

    def loss(lp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return pro_unpaired_loss(lp, ref, score[state["idx"]], beta, alpha).mean()

    def stats(lp: torch.Tensor, ref: torch.Tensor) -> dict:
        return {"pairs": len(completions),
                "loss": float(pro_unpaired_loss(lp, ref, score, beta, alpha).mean()),
                **_side_stats(beta * (lp - ref), score)}

    if not completions:
        raise ValueError("PRO: no completions with feedback")
    return Objective(name, [(c.prompt, c.text) for c in completions], sample, loss, stats)


def pro_pairwise_objective(examples: list[DPOExample], beta: float, alpha: float) -> Objective:
    """PRO with pairwise feedback: sequence 2i is pair i's ỹ_w, 2i + 1 its ỹ_l."""
    sequences = [s for ex in examples for s in ((ex.prompt, ex.chosen), (ex.prompt, ex.rejected))]
    unsafe_loser = torch.tensor([bool(ex.h_rejected) for ex in examples])

    def sample(rng: random.Random, batch: int) -> list[int]:
        rows = pick_indices(rng, list(range(len(examples))), batch)
        return [2 * i for i in rows] + [2 * i + 1 for i in rows]

    def loss(lp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        (pc, pr), (rc, rr) = lp.chunk(2), ref.chunk(2)
        return pro_pairwise_loss(pc, pr, rc, rr, beta, alpha).mean()

    def stats(lp: torch.Tensor, ref: torch.Tensor) -> dict:
        pc, pr, rc, rr = lp[0::2], lp[1::2], ref[0::2], ref[1::2]
        r_w, r_l = beta * (pc - rc), beta * (pr - rr)
        margin = r_w - r_l
        out = {"pairs": len(examples),
               "loss": float(pro_pairwise_loss(pc, pr, rc, rr, beta, alpha).mean()),
               "reward_margin": float(margin.mean()), "accuracy": float((margin > 0).float().mean()),
               "chosen_reward": float(r_w.mean()), "rejected_reward": float(r_l.mean())}
        if bool(unsafe_loser.any()):
            out["accuracy_unsafe_rejected"] = float((margin[unsafe_loser] > 0).float().mean())
        return out

    if not examples:
        raise ValueError("PRO pairwise: no pairs left after SafeDPO's transform")
    return Objective("pro-pairwise", sequences, sample, loss, stats)
